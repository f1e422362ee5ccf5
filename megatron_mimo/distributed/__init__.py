"""Process groups and device: per-branch HyperCommGrid topology, device/backend choice, init/teardown."""
