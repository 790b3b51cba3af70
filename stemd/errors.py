"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""


class StemdError(Exception):
    """Base for every error that is the user's input, not a bug: printed without traceback."""


class ConfigError(StemdError):
    """A configuration file or option is invalid; the message names the key."""


class CheckpointError(StemdError):
    """A model file is missing, corrupt or not a stemd checkpoint."""


class InputError(StemdError):
    """An image or frame cannot be denoised (wrong shape, NaN/inf, too small, unreadable)."""


class ModelOutputError(StemdError):
    """A model produced non-finite pixels (NaN or inf): never published, never written."""
