"""Errors a line engineer reads: one line, naming the culprit."""


class LinewatchError(Exception):
    """Base of every error the CLI turns into a one-line message and a non-zero exit."""

    exit_code = 1


class ConfigError(LinewatchError):
    """A configuration file or override is invalid; the message names key and file."""

    exit_code = 2


class DataError(LinewatchError):
    """An input image, mask or data-set layout is missing, empty or unreadable."""


class ModelFileError(LinewatchError):
    """A model file is of another format version, corrupt, or not a model file."""


class WireError(LinewatchError):
    """A transport message failed validation; the reason is in the message."""
