"""Logging set-up and error wrapper of every entry point: ``[probsft]`` lines on stderr, a
ProbsftError as one ``error:`` line (exit 2), third-party noise hidden unless ``-v``."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

from probsft_megatron.errors import ProbsftError

LOG_LEVEL_ENV = "PROBSFT_LOG_LEVEL"
_HANDLER_MARK = "_probsft_handler"

# (category, message regex, module regex) hidden by default
QUIET_WARNINGS = (
    (UserWarning, "", r"megatron\."),  # TE/Apex fallbacks, deprecated megatron options
    (UserWarning, r"The value of the smallest subnormal", ""),  # numpy, with flushed denormals
)


class _Format(logging.Formatter):
    """``[probsft] message``; warnings and errors name their level."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"[probsft] {level}{super().format(record)}"


class _Stderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, so a handler set up under
    a redirection (a library caller's, a test's capture) never writes to a closed stream."""

    stream = property(lambda self: sys.stderr, lambda self, stream: None)


def log_level(verbose: int = 0) -> int:
    """The level asked for: DEBUG with ``verbose``, else ``$PROBSFT_LOG_LEVEL``, else INFO."""
    name = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    return logging.DEBUG if verbose else logging.getLevelNamesMapping().get(name, logging.INFO)


def setup_logging(verbose: int = 0) -> int:
    """Configure the ``probsft_megatron`` loggers (idempotent; records still propagate to the
    root logger) and export the level to child processes; returns the level."""
    level = log_level(verbose)
    os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)
    logger = logging.getLogger("probsft_megatron")
    logger.setLevel(level)
    if not any(getattr(h, _HANDLER_MARK, False) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format("%(message)s"))
        setattr(handler, _HANDLER_MARK, True)
        logger.addHandler(handler)
    if level > logging.DEBUG:
        quiet_warnings()
    return level


def quiet_warnings() -> None:
    """Hide the third-party warnings of :data:`QUIET_WARNINGS` in this process."""
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def run_main(command: Callable[[], int | None], verbose: int = 0) -> int:
    """Run ``command`` with logging set up: its exit code (2 for a ProbsftError, one line)."""
    setup_logging(verbose)
    try:
        return int(command() or 0)
    except ProbsftError as exc:  # a user's mistake: one line, no traceback
        if exc.announce:  # of a job's ranks that all raise it, those that print
            print(f"error: {exc}", file=sys.stderr)
        return 2
