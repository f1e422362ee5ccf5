"""Exception types shared by config, topology and CLI (no heavy imports)."""


class ConfigError(ValueError):
    """A configuration or layout value is invalid; the message names the field and the numbers.

    The CLI prints it as one line and exits non-zero, without a traceback.
    """


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded as asked; the message says why and what to do."""
