"""Model builders: each takes its branch's process groups explicitly (no parallel_state)."""
