"""User-facing errors: the CLI prints their message and exits with code 2."""


class CosyToolsError(Exception):
    """Bad input from the user (files, arguments, dumps): a clear message, no traceback."""


class CheckpointError(CosyToolsError):
    """A checkpoint file is unreadable or does not fit the model."""


class ConfigError(CosyToolsError):
    """A model config (yaml / config.json) is unreadable or unsupported."""


class InputError(CosyToolsError):
    """Text, audio or tensor inputs that the model cannot take."""
