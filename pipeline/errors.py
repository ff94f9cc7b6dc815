"""Errors the CLI reports as one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A config key or value that cannot work; the message names the key and the values."""


class DataError(ValueError):
    """Input data that cannot be read as declared; the message names the file and line."""
