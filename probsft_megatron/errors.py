"""User-facing errors: a ``ProbsftError`` is a user's mistake, one ``error: ...`` line."""


class ProbsftError(Exception):
    """A user's mistake, one line from the CLI (of a job's ranks, those with ``announce``)."""

    def __init__(self, message: str = "", announce: bool = True) -> None:
        super().__init__(message)
        self.announce = announce


class ConfigError(ProbsftError, ValueError):
    """Invalid configuration (unknown key, impossible layout, bad value)."""


class DataError(ProbsftError, ValueError):
    """Invalid or missing training/evaluation data."""


class CheckpointError(ProbsftError):
    """A checkpoint or model folder that cannot be used."""
