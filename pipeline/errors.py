"""Errors the CLI reports as one clear line instead of a traceback, and the exit codes they end with.

`slurm/train.sh` relaunches a failed training step, except after these exit codes: restarting cannot fix
a wrong config, bad data or a checkpoint that cannot be written.
"""

EXIT_USER_ERROR = 2  # ConfigError, DataError
EXIT_CHECKPOINT_ERROR = 3  # CheckpointError


class ConfigError(ValueError):
    """A config key or value that cannot work; the message names the key and the values."""


class DataError(ValueError):
    """Input data that cannot be read as declared; the message names the file and line."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path and what is left intact."""
