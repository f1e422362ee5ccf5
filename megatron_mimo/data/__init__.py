"""Training data: deterministic mock image-text samples and the per-branch resumable sampler."""
