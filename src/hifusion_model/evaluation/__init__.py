"""Scoring predictions: metrics, the baselines a model must beat, and the HER2ST protocols."""
