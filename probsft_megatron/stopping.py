"""What ends a training run early, losing nothing but the step in flight: stop signals
(saved and stopped at the same step boundary on every rank, exit 75; a second Ctrl-C stops at
once, 130), non-finite losses and gradients (stopped before anything of the step is saved,
exit 2), and a lost rank (one line instead of a traceback, exit 2)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from probsft_megatron.errors import ProbsftError

logger = logging.getLogger(__name__)

# sysexits' EX_TEMPFAIL: not 0, so nothing waiting for a finished run (afterok) starts on it
INTERRUPTED_EXIT_CODE = 75
HARD_STOP_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class NonFiniteError(ProbsftError):
    """The loss or the gradient norm of a step was NaN or infinite; nothing of it was saved."""


class RankLostError(ProbsftError):
    """A collective failed: another rank of the job died or stopped answering."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _ranks(ranks: tuple[int, ...]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


@dataclass(frozen=True)
class Boundary:
    """What every rank agreed on after one step (:meth:`Stopper.boundary`)."""

    step: int
    signals: dict[int, int]  # rank -> the first stop signal it received
    loss_ranks: tuple[int, ...] = ()  # ranks whose own loss sums were not finite
    grad_ranks: tuple[int, ...] = ()  # ranks whose own gradients (before DP) were not finite
    loss_nonfinite: bool = False  # the step's global loss (on the last pipeline stage)
    grad_norm_nonfinite: bool = False
    grad_norm: float = 0.0

    @property
    def stop(self) -> bool:
        return bool(self.signals)

    @property
    def nonfinite(self) -> bool:
        return bool(
            self.loss_ranks or self.grad_ranks or self.loss_nonfinite or self.grad_norm_nonfinite
        )

    def signal_text(self) -> str:
        """``SIGUSR1 on rank 1`` / ``SIGTERM on ranks 0, 1``."""
        names = sorted({signal_name(s) for s in self.signals.values()})
        return f"{'/'.join(names)} on {_ranks(tuple(sorted(self.signals)))}"

    def problem(self) -> str:
        at, norm = f"at step {self.step}", f"gradient norm {self.grad_norm}"
        if self.loss_ranks:
            return f"non-finite loss {at} on {_ranks(self.loss_ranks)}"
        if self.grad_ranks:
            return f"non-finite gradients {at} on {_ranks(self.grad_ranks)} (finite loss; {norm})"
        if self.loss_nonfinite:
            return f"non-finite loss {at} (every rank's own part was finite)"
        return (
            f"non-finite {norm} {at} (every rank's own gradients were finite; their norm "
            "overflowed)"
        )

    def error(self, checkpoint: Path | None, announce: bool = True) -> NonFiniteError:
        kept = "no checkpoint was written"
        if checkpoint is not None:
            kept = f"the newest checkpoint, {checkpoint}, is from before it"
        return NonFiniteError(
            f"{self.problem()}; the run stopped without logging or saving that step, and "
            f"{kept}; lower optim.lr (or optim.clip_grad) or check that step's data, then run "
            "the same command to continue from the checkpoint",
            announce=announce,
        )


@dataclass(eq=False)
class Stopper:
    """The run's guard (a context manager): stop-signal handlers that only record the signal,
    the step-boundary agreement, collective failures as :class:`RankLostError`."""

    dist_timeout_s: float | None = None
    announce: bool = True
    checkpoints: Any = None
    step: int = field(default=0, init=False)
    received: list[int] = field(default_factory=list, init=False)
    _previous: dict[int, Any] = field(default_factory=dict, init=False)
    # called when the run ends, however it ends (a second Ctrl-C too)
    at_exit: list[Any] = field(default_factory=list, init=False)

    def _release(self) -> None:
        while self.at_exit:
            try:
                self.at_exit.pop()()
            except Exception as exc:  # a clean-up must not hide the run's own outcome
                logger.warning("while ending the run: %s", exc)

    def __enter__(self) -> Stopper:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        else:  # signal handlers can only be set in the main thread
            logger.debug("not in the main thread: stop signals keep their handlers")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        if exc is not None and is_collective_failure(exc):
            raise self.rank_lost(exc) from None

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            self._hard_stop()
        first = not self.received
        self.received.append(signum)
        if first and self.announce:
            now = f"finishing step {self.step}" if self.step else "training one step"
            text = f"{signal_name(signum)} received: {now}, then saving a checkpoint and stopping"
            if signum == signal.SIGINT:
                text += " (Ctrl-C again stops at once, without saving)"
            _say(text)

    def _hard_stop(self) -> None:
        """Second Ctrl-C: end this process and its helpers now, without a traceback."""
        if self.announce:
            latest = self.checkpoints.latest if self.checkpoints is not None else None
            kept = f" (newest checkpoint: {latest})" if latest else ""
            _say(f"second interrupt: stopped at once during step {self.step}, nothing saved{kept}")
        self._release()
        with contextlib.suppress(Exception):  # best effort while going down
            import psutil

            for child in psutil.Process().children(recursive=True):
                child.kill()
        os._exit(HARD_STOP_EXIT_CODE)

    def boundary(self, stats, device: torch.device | str = "cpu") -> Boundary:
        """What all ranks agree on after step ``self.step``, from this rank's
        :class:`~probsft_megatron.runtime.StepStats` (one all-reduce of ``5 x world`` ints)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        me = dist.get_rank() if dist.is_initialized() else 0
        flags = torch.zeros(5, world, dtype=torch.int64)
        flags[0, me] = self.received[0] if self.received else 0
        flags[1, me] = not stats.local_loss_finite
        flags[2, me] = not stats.local_grads_finite
        flags[3, me] = stats.loss is not None and not math.isfinite(stats.loss)
        flags[4, me] = not math.isfinite(stats.grad_norm)
        if world > 1:
            flags = flags.to(device)
            dist.all_reduce(flags)
        signals, loss, grads, loss_nonfinite, norm_nonfinite = flags.cpu().tolist()
        return Boundary(
            step=self.step,
            signals={r: s for r, s in enumerate(signals) if s},
            loss_ranks=tuple(r for r, bad in enumerate(loss) if bad),
            grad_ranks=tuple(r for r, bad in enumerate(grads) if bad),
            loss_nonfinite=any(loss_nonfinite),
            grad_norm_nonfinite=any(norm_nonfinite),
            grad_norm=stats.grad_norm,
        )

    def rank_lost(self, exc: BaseException) -> RankLostError:
        rank = dist.get_rank() if dist.is_initialized() else 0
        wait = ""
        if self.dist_timeout_s:
            wait = f" (a collective waits train.dist_timeout_s={self.dist_timeout_s:g} s)"
        newest = self.checkpoints.newest() if self.checkpoints is not None else None
        kept = f"the newest checkpoint is {newest}" if newest else "no checkpoint of this run yet"
        return RankLostError(
            f"rank {rank} lost contact with the other ranks during step {self.step}: "
            f"{collective_reason(exc)}; another process of the job died or stopped "
            f"answering{wait}; {kept}; run the same command to resume once every rank can run"
        )


_COLLECTIVE_RE = re.compile(
    r"gloo|nccl|timed out|connection (reset|closed|refused)|broken pipe|socket", re.IGNORECASE
)


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (gloo/NCCL: a peer gone, a timeout)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_RE.search(str(exc)))


def collective_reason(exc: BaseException) -> str:
    """The backend's message, short: without its source location, first sentence only."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    text = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return text[:200] or type(exc).__name__


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Block :data:`STOP_SIGNALS` in the main thread during a save: the writer's helper
    processes inherit the mask, so SLURM's signals to the job step cannot kill them mid-save."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def record_event(output_dir: str | Path, event: str, **fields: Any) -> None:
    """Append one line to ``<output_dir>/events.jsonl``: the run's starts, stops and faults."""
    line = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    path = Path(output_dir) / "events.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")


def ignore_stop_signals() -> None:
    """Ignore :data:`STOP_SIGNALS` from now on (a process whose run is over, exiting)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def exit_code(summary: dict[str, Any]) -> int:
    """0, or :data:`INTERRUPTED_EXIT_CODE` when a signal stopped the run."""
    return INTERRUPTED_EXIT_CODE if summary.get("interrupted") else 0


def _say(text: str) -> None:
    """One ``[probsft]`` line on stderr, safe inside a signal handler."""
    with contextlib.suppress(OSError, ValueError):
        os.write(sys.stderr.fileno(), f"\n[probsft] {text}\n".encode())
