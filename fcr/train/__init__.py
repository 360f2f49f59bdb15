"""Training: the accelerate loop, checkpoints, fine-tuning runs from parameters."""
