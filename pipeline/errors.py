"""Errors the CLI reports as one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A config key or value that cannot work; the message names the key and the values."""
