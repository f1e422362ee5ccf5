"""The errors a user can act on: one family, each message naming the flag or file and the numbers.

The ``megatron-mimo`` entry point catches :class:`MimoError` on every rank and prints one line
(no traceback unless ``--log-level DEBUG``). Anything else is a bug and keeps its traceback.
No heavy imports here: config and CLI use these in a bare interpreter.
"""


class MimoError(Exception):
    """Base of every error caused by input (flags, files, checkpoints, data), not by a bug."""


class ConfigError(MimoError, ValueError):
    """A configuration or layout value is invalid; the message names the field and the numbers."""


class CheckpointError(MimoError, RuntimeError):
    """A checkpoint cannot be saved or loaded as asked; the message names the file and what to do."""


class DataError(MimoError, RuntimeError):
    """Training data is missing, malformed or does not match the job; the message names the file."""


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def require_positive(owner: str, **values: int) -> None:
    """Raise ConfigError naming ``owner.field`` for any value that is not an int >= 1."""
    for name, value in values.items():
        require(isinstance(value, int) and value >= 1, f"{owner}.{name} must be >= 1, got {value}")


class ConvertError(MimoError, ValueError):
    """A Hugging Face directory cannot be converted as asked; the message names the file."""
