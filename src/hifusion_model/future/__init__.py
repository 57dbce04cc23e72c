"""Experimental API, as in scikit-image's ``future``: it may change or leave without notice.

Nothing in the default recipe depends on it; import it by its full path.
"""
