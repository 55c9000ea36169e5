"""The one logging set-up and the one error wrapper of every command-line entry point.

Library modules log through ``logging.getLogger(__name__)`` (never ``print`` for
diagnostics); a command's *result* (a table, a path, JSON) goes to stdout. An entry point
calls :func:`run_main`, which sets up logging once and turns a :class:`ProbsftError` (a
user's mistake) into one ``error: ...`` line on stderr and exit code 2.

Quiet by default: megatron-core prints a handful of ``UserWarning``\\ s on every CPU command
("Transformer Engine and Apex are not installed", deprecation notes of its own options),
and numpy warns about subnormals once the CPU fallback flushes them. They say nothing about
the user's job, so they are hidden unless asked for: ``-v`` / ``--verbose`` on the command
line, or ``PROBSFT_LOG_LEVEL=DEBUG`` in the environment (also ``INFO``, the default, and
``WARNING`` for less). The level is written back to the environment so processes started by
``torchrun`` log the same way.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

from probsft_megatron.errors import ProbsftError

LOG_LEVEL_ENV = "PROBSFT_LOG_LEVEL"
LOGGER = "probsft_megatron"
_HANDLER_MARK = "_probsft_handler"

# (category, message regex, module regex) of the third-party warnings hidden by default
QUIET_WARNINGS = (
    (UserWarning, "", r"megatron\."),  # TE/Apex fallbacks, deprecated megatron options
    (UserWarning, r"The value of the smallest subnormal", ""),  # numpy, with flushed denormals
)


class _Format(logging.Formatter):
    """``[probsft] message``; warnings and errors name their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return f"[probsft] {text}"


def log_level(verbose: int = 0) -> int:
    """The level asked for: DEBUG with ``verbose``, else ``$PROBSFT_LOG_LEVEL``, else INFO."""
    if verbose:
        return logging.DEBUG
    name = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    level = logging.getLevelName(name) if name else logging.INFO
    return level if isinstance(level, int) else logging.INFO


def setup_logging(verbose: int = 0) -> int:
    """Configure the ``probsft_megatron`` loggers for a command (idempotent); returns the level.

    Messages go to stderr as ``[probsft] ...``; records still propagate to the root logger
    (so test harnesses capture them). Below DEBUG-verbosity the third-party warnings of
    :data:`QUIET_WARNINGS` are filtered out.
    """
    level = log_level(verbose)
    os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(getattr(h, _HANDLER_MARK, False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
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
    """Run an entry point's ``command`` with logging set up; a ProbsftError becomes one
    ``error: ...`` line on stderr and exit code 2. Returns the exit code."""
    setup_logging(verbose)
    try:
        return int(command() or 0)
    except ProbsftError as exc:  # a user's mistake: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
