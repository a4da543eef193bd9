"""Training: optimiser, checkpoints, logging and the train loop."""
