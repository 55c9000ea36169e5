"""User-facing errors.

A ``ProbsftError`` is a user's mistake (config, data, checkpoint, CLI argument). Its message
is one sentence that says what is wrong, where, and how to fix it; the CLI prints it as a
single ``error: ...`` line instead of a traceback.
"""


class ProbsftError(Exception):
    """A user's mistake, reported as one line by the CLI."""


class ConfigError(ProbsftError, ValueError):
    """Invalid configuration (unknown key, impossible layout, bad value)."""


class DataError(ProbsftError, ValueError):
    """Invalid or missing training/evaluation data."""


class CheckpointError(ProbsftError):
    """A checkpoint or model folder that cannot be used."""
