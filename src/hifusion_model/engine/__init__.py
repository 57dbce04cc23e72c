"""Training: recipes, the trainer, resume, multi-GPU, self-supervised pretraining."""
