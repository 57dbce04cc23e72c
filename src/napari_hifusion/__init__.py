"""napari plugin for HiFusion: readers, sample data and dock widgets over :mod:`hifusion_model`."""

from hifusion_model import __version__

__all__ = ["__version__"]
