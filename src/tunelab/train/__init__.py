"""Training: the loop on accelerate, checkpoints, optimizer and schedule, logging."""
