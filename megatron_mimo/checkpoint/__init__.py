"""Checkpoints: a manager over stateful pieces, what a checkpoint holds, on-disk storage.

Nothing here imports ``megatron_mimo.training``: the trainer hands the manager its pieces."""
