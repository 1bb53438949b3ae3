"""Training: fit, the training device and precision, the lean step, what a training step costs."""
