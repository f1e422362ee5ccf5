"""Training data: mock samples or Energon datasets, read per rank so both branches see the same
samples, with a per-rank state a checkpoint keeps (see docs/data.md)."""
