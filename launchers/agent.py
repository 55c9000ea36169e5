"""torchrun for training: the same options, with stop signals and exit codes that keep a
checkpoint.

    python -m probsft_megatron.launchers.agent [torchrun options] -m probsft_megatron.train ...

``probsft train --nproc N`` and the train step of ``probsft launch`` (local and SLURM) start
training through this agent instead of ``torchrun``. It runs torch's elastic agent
(``torch.distributed.run``) in this process, with two differences:

* **Signals.** SIGTERM, SIGUSR1 and SIGINT belong to the training processes, which finish
  their step, save and exit 75 (:mod:`probsft_megatron.stopping`). torchrun's own agent
  instead dies of SIGUSR1 (the default action; SLURM's ``--signal=USR1@T`` and ``scancel
  --signal=USR1`` reach every process of a job step), or on SIGTERM/SIGINT signals the
  workers itself, kills them 30 s later and exits 1 with a traceback. Here the agent never
  dies of them: inside a SLURM step (``SLURM_STEP_ID`` is set) slurmd already signals every
  process, so the agent only notes them; elsewhere (a terminal, ``kill``) the workers run in
  sessions of their own and see no terminal signal, so the agent passes each one on to them.
  A second Ctrl-C kills the workers and their helper processes at once (nothing of the step
  in flight is saved; the newest checkpoint stays) and the agent exits 130.
* **Exit codes.** When every worker that failed exited with one of :data:`QUIET_EXIT_CODES`
  (2: it printed a one-line error; 75: interrupted with a checkpoint saved; 130: stopped at
  once), the agent exits with that code and prints nothing more; torchrun would print its
  ``ChildFailedError`` report with a traceback and exit 1, hiding the 75 that a SLURM batch
  script needs to requeue the job. Any other failure keeps torchrun's report.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from probsft_megatron.stopping import (
    HARD_STOP_EXIT_CODE,
    INTERRUPTED_EXIT_CODE,
    STOP_SIGNALS,
)

QUIET_EXIT_CODES = (2, INTERRUPTED_EXIT_CODE, HARD_STOP_EXIT_CODE)
"""Worker exit codes after which the agent exits quietly with the same code."""
TORCH_SIGNALS = "SIGHUP,SIGQUIT"
"""Signals left to torch's agent (``--signals-to-handle``): the stop signals are ours."""
KILL_AFTER_S = 5.0
"""After a second Ctrl-C, processes of the workers that started meanwhile are killed this
much later."""


def in_slurm_step() -> bool:
    """Whether this process is a task of a SLURM job step (slurmd signals all its processes)."""
    return "SLURM_STEP_ID" in os.environ


class SignalRelay:
    """The agent's handlers for the stop signals: note them, and outside a SLURM step pass
    them on to the worker processes (this process's children)."""

    def __init__(self, forward: bool) -> None:
        self.forward = forward
        self.interrupts = 0
        self.hard_stop = False
        self._seen: list = []  # psutil.Process of every descendant seen at a hard stop
        self._previous: dict[int, object] = {}

    def install(self) -> SignalRelay:
        # imported here, not in the handler: a second Ctrl-C that lands while the first
        # handler is still importing it would find psutil half initialized
        import psutil  # noqa: F401

        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _workers(self, recursive: bool = False) -> list:
        import psutil

        try:
            return psutil.Process().children(recursive=recursive)
        except psutil.Error:
            return []

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts == 2:
                self._stop_now()
                return
        if not self.forward:
            return
        for worker in self._workers():
            try:
                worker.send_signal(signum)
            except Exception:  # a worker that just ended
                pass

    def _stop_now(self) -> None:
        """Second Ctrl-C: kill every worker and its helper processes at once, say so.

        The agent does it rather than each worker: a worker blocked in a collective runs its
        own handler only once the collective returns, which it does with an error when a
        faster worker has already gone, and it would then report a lost rank instead."""
        self.hard_stop = True
        self._seen = self._workers(recursive=True)
        _say(
            "second interrupt: stopped at once; the step in flight is not saved, the newest "
            "checkpoint stays (resume with the same command)"
        )
        self.kill_leftovers()
        timer = threading.Timer(KILL_AFTER_S, self.kill_leftovers)  # any started meanwhile
        timer.daemon = True
        timer.start()

    def kill_leftovers(self) -> None:
        """Kill what remains of the workers after a hard stop (their helper processes too)."""
        for proc in self._seen:
            try:
                if proc.is_running():
                    proc.kill()
            except Exception:  # already gone
                pass


class _QuietFailures(logging.Filter):
    """Drops torch's ``failed (exitcode: N)`` error line for the quiet exit codes, and after
    a second Ctrl-C for the workers the agent killed itself."""

    def __init__(self, relay: SignalRelay) -> None:
        super().__init__()
        self.relay = relay

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("failed (exitcode: ") and record.args:
            code = record.args[0]
            if self.relay.hard_stop and isinstance(code, int) and code < 0:
                return False
            return code not in QUIET_EXIT_CODES
        return True


def _say(text: str) -> None:
    try:
        os.write(sys.stderr.fileno(), f"\n[probsft] {text}\n".encode())
    except (OSError, ValueError):
        pass


def quiet_code(failures: dict, hard_stop: bool) -> int | None:
    """The agent's exit code when every failure is a quiet one, else None.

    ``failures``: torch's ``ProcessFailure`` per rank (``exitcode`` < 0: killed by a signal).
    A worker that died of SIGTERM was ended by torch's agent itself, which sends it to the
    workers still running once one has exited (a training process handles SIGTERM until its
    run is over, so no other SIGTERM kills it). After a second Ctrl-C, workers that died of
    SIGINT or were killed count as stopped at once. Precedence: stopped at once, then an
    error, then interrupted.
    """
    codes = set()
    for failure in failures.values():
        code = failure.exitcode
        if hard_stop and code in (-signal.SIGINT, -signal.SIGKILL, -signal.SIGTERM):
            code = HARD_STOP_EXIT_CODE
        if code != -signal.SIGTERM:
            codes.add(code)
    if not codes or not codes <= set(QUIET_EXIT_CODES):
        return None
    for code in (HARD_STOP_EXIT_CODE, 2, INTERRUPTED_EXIT_CODE):
        if code in codes:
            return code
    return None


def main(argv: list[str] | None = None) -> int:
    """Run torch's elastic agent with ``argv`` (torchrun's command line); returns the exit
    code (see the module docstring)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    args.signals_to_handle = TORCH_SIGNALS
    relay = SignalRelay(forward=not in_slurm_step()).install()
    quiet = _QuietFailures(relay)
    api_logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    api_logger.addFilter(quiet)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        code = quiet_code(exc.failures, relay.hard_stop)
        if code is None:
            raise
        return code
    finally:
        relay.restore()
        api_logger.removeFilter(quiet)
        if relay.hard_stop:
            relay.kill_leftovers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
