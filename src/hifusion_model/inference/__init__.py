"""Prediction of every spot of a section or a grid, and each prediction's uncertainty."""
