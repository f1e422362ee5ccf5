"""Exception types shared by config, topology and CLI (no heavy imports)."""


class ConfigError(ValueError):
    """A configuration or layout value is invalid; the message names the field and the numbers.

    The CLI prints it as one line and exits non-zero, without a traceback.
    """


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded as asked; the message says why and what to do."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def require_positive(owner: str, **values: int) -> None:
    """Raise ConfigError naming ``owner.field`` for any value that is not an int >= 1."""
    for name, value in values.items():
        require(isinstance(value, int) and value >= 1, f"{owner}.{name} must be >= 1, got {value}")
