"""megatron-mimo."""
