"""Checkpoints: a manager over stateful pieces, what a checkpoint holds, on-disk storage.

The training loop hands the manager its pieces; this package never imports the loop."""
