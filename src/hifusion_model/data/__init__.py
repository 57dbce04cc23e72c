"""Slides, sections, spot grids, gene panels and the samples a model trains on.

Everything here speaks micrometres: a slide knows its µm/px, spots are placed and cut in µm.
"""
