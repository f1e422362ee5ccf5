"""Rank-aware logging and the reporting rank's metric sinks (log line, JSON lines, TensorBoard)."""
