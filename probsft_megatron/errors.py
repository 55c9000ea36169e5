"""User-facing errors: a ``ProbsftError`` is a user's mistake, one ``error: ...`` line."""


class ProbsftError(Exception):
    """A user's mistake, reported as one line by the CLI; in a multi-rank job every rank
    raises it and only the one with ``announce`` prints it."""

    def __init__(self, message: str = "", announce: bool = True) -> None:
        super().__init__(message)
        self.announce = announce


class ConfigError(ProbsftError, ValueError):
    """Invalid configuration (unknown key, impossible layout, bad value)."""


class DataError(ProbsftError, ValueError):
    """Invalid or missing training/evaluation data."""


class CheckpointError(ProbsftError):
    """A checkpoint or model folder that cannot be used."""
