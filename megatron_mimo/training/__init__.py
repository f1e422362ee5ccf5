"""Training: job assembly, the step, the Trainer loop, optimizer and schedulers, train state, stops."""
