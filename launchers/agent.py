"""torchrun for training: torch's elastic agent, but the stop signals belong to the workers (a
second Ctrl-C kills them at once, exit 130), and when every failed worker exited 2, 75 or 130 the
agent exits with that code, quietly, instead of torchrun's traceback and 1 (docs/launchers.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

from probsft_megatron.stopping import HARD_STOP_EXIT_CODE, INTERRUPTED_EXIT_CODE, STOP_SIGNALS

#: Worker exit codes after which the agent exits quietly with the same code.
QUIET_EXIT_CODES = (2, INTERRUPTED_EXIT_CODE, HARD_STOP_EXIT_CODE)
TORCH_SIGNALS = "SIGHUP,SIGQUIT"  # left to torch's agent: the stop signals are ours
KILL_AFTER_S = 5.0  # after a second Ctrl-C, workers' processes started meanwhile die this late


class SignalRelay:
    """The agent's stop-signal handlers: count them and, with ``forward``, pass them to workers."""

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

        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
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
            with contextlib.suppress(Exception):  # a worker that just ended
                worker.send_signal(signum)

    def _stop_now(self) -> None:
        """Second Ctrl-C: kill every worker and its helpers at once, not worker by worker."""
        self.hard_stop = True
        self._seen = self._workers(recursive=True)
        text = (
            "second interrupt: stopped at once; the step in flight is not saved, the newest "
            "checkpoint stays (resume with the same command)"
        )
        with contextlib.suppress(OSError, ValueError):
            os.write(sys.stderr.fileno(), f"\n[probsft] {text}\n".encode())
        self.kill_leftovers()
        timer = threading.Timer(KILL_AFTER_S, self.kill_leftovers)  # any started meanwhile
        timer.daemon = True
        timer.start()

    def keep_log(self, record: logging.LogRecord) -> bool:
        """Log filter: drops torch's ``failed (exitcode: N)`` for quiet codes and killed workers."""
        if not (str(record.msg).startswith("failed (exitcode: ") and record.args):
            return True
        code = record.args[0]
        killed = self.hard_stop and isinstance(code, int) and code < 0
        return not killed and code not in QUIET_EXIT_CODES

    def kill_leftovers(self) -> None:
        for proc in self._seen:
            with contextlib.suppress(Exception):  # already gone
                if proc.is_running():
                    proc.kill()


def quiet_code(failures: dict, hard_stop: bool) -> int | None:
    """The agent's exit code when every failure (torch's ``ProcessFailure`` per rank) is quiet,
    else None; precedence 130, 2, 75. A death by SIGTERM (torch's agent cleaning up) is ignored;
    after a second Ctrl-C, deaths by SIGINT, SIGKILL or SIGTERM count as 130."""
    killed = (-signal.SIGINT, -signal.SIGKILL, -signal.SIGTERM) if hard_stop else ()
    codes = {HARD_STOP_EXIT_CODE if f.exitcode in killed else f.exitcode for f in failures.values()}
    codes.discard(-signal.SIGTERM)
    if not codes or not codes <= set(QUIET_EXIT_CODES):
        return None
    return next(c for c in (HARD_STOP_EXIT_CODE, 2, INTERRUPTED_EXIT_CODE) if c in codes)


def main(argv: list[str] | None = None) -> int:
    """Run torch's elastic agent with ``argv`` (torchrun's command line); returns the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    args.signals_to_handle = TORCH_SIGNALS
    relay = SignalRelay(forward="SLURM_STEP_ID" not in os.environ).install()
    api_logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    api_logger.addFilter(relay.keep_log)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        if (code := quiet_code(exc.failures, relay.hard_stop)) is None:
            raise
        return code
    finally:
        relay.restore()
        api_logger.removeFilter(relay.keep_log)
        if relay.hard_stop:
            relay.kill_leftovers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
