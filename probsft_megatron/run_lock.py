"""One training run per output folder: ``<train.output_dir>/run.lock``, created by rank 0
with ``O_CREAT | O_EXCL`` (atomic on local disks, NFS v3+ and Lustre) and held for the run's
whole life. A gone holder's lock (a dead process on this host, an ended SLURM job; a
requeued job keeps its id and continues its own run) is taken over with a warning."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from probsft_megatron.errors import ProbsftError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
FORMAT = "probsft-run-lock"
# SLURM job states after which the job runs no more (a requeued job is PENDING again)
SLURM_ENDED = frozenset(
    "BOOT_FAIL CANCELLED COMPLETED DEADLINE FAILED NODE_FAIL OUT_OF_MEMORY PREEMPTED "
    "TIMEOUT".split()
)


class RunLockedError(ProbsftError):
    """``train.output_dir`` is held by another run."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run lock."""

    host: str
    pid: int
    pid_started: float | None = None
    slurm_job_id: str | None = None
    started: str = ""
    command: str = ""

    @classmethod
    def current(cls) -> Holder:
        """This process, as it writes itself into a lock."""
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=_process_started(os.getpid()),
            slurm_job_id=os.environ.get("SLURM_JOB_ID") or None,
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            command=" ".join(sys.argv)[:500],
        )

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on host {self.host}{job}, started {self.started}"

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n"


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), None when it does not exist."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def parse(text: str) -> Holder | None:
    """The holder a lock file names, None when its text is not a lock (empty, cut, foreign)."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return None
        return Holder(
            host=str(data["host"]),
            pid=int(data["pid"]),
            pid_started=None if data.get("pid_started") is None else float(data["pid_started"]),
            slurm_job_id=str(data["slurm_job_id"]) if data.get("slurm_job_id") else None,
            started=str(data.get("started", "")),
            command=str(data.get("command", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _first_word(argv: list[str]) -> tuple[str | None, str]:
    """The first word of a command's stdout (None when it fails) and its stderr."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, ""
    words = proc.stdout.split()  # "CANCELLED by 0" is one state in two words
    return (words[0] if proc.returncode == 0 and words else None), proc.stderr


def slurm_job_state(job_id: str) -> str | None:
    """SLURM's state of job ``job_id`` (``ENDED``: squeue no longer knows it), or None when
    neither squeue nor sacct can tell."""
    state, err = _first_word(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if state is not None:
        return state
    state, _ = _first_word(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    if state is None and "invalid job id" in err.lower():
        return "ENDED"
    return state


def gone_reason(holder: Holder, me: Holder | None = None) -> tuple[str, str] | None:
    """Why ``holder`` no longer runs, as ``(kind, phrase)``: kind ``"own"`` (this SLURM job
    requeued: the same job id) or ``"stale"``; None while it may still run."""
    me = me or Holder.current()
    same_host = holder.host == me.host
    if same_host and (started := _process_started(holder.pid)) is not None:
        if holder.pid_started is None or abs(started - holder.pid_started) < 1.0:
            return None  # alive (the same pid, started at the same time)
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        return "own", f"it is this SLURM job ({holder.slurm_job_id}), requeued"
    if same_host:
        return "stale", f"pid {holder.pid} is no longer running on this host"
    if holder.slurm_job_id:
        state = slurm_job_state(holder.slurm_job_id)
        if state is not None and state.upper() in SLURM_ENDED | {"ENDED"}:
            return "stale", f"SLURM job {holder.slurm_job_id} has ended ({state})"
    return None


def _held_message(out: Path, lock: Path, holder: Holder | None, text: str) -> str:
    if holder is None:
        return (
            f"train.output_dir {out} has a lock file that names no run ({lock}: "
            f"{text[:60]!r}): a run is starting there, or one died while starting; if no run "
            f"uses the folder, delete {lock}, or choose another train.output_dir"
        )
    cmd = f" ({holder.command})" if holder.command else ""
    if holder.host == socket.gethostname():
        how = "wait for it to end"
    elif holder.slurm_job_id:
        how = f"wait for it to end (or scancel {holder.slurm_job_id})"
    else:
        how = f"wait for it to end (if that run is gone, delete {lock})"
    return (
        f"train.output_dir {out} is in use by another training run: {holder.describe()}{cmd}; "
        f"two runs in one folder overwrite each other's checkpoints and metrics: {how}, or "
        "choose another train.output_dir"
    )


def _read(lock: Path) -> tuple[str, Holder | None]:
    """The lock file's text (empty when there is none) and the holder it names."""
    try:
        text = lock.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    return text, parse(text)


def check_free(output_dir: str | os.PathLike) -> None:
    """Read-only: RunLockedError when a live run holds ``output_dir`` (for the command line
    before it starts anything; :func:`acquire` decides for real)."""
    out = Path(output_dir)
    lock = out / LOCK_FILE
    text, holder = _read(lock) if lock.is_file() else ("", None)
    if holder is None and not text:
        return  # none, released while we looked, or being written: acquire() decides
    if holder is None or gone_reason(holder) is None:
        raise RunLockedError(_held_message(out, lock, holder, text))


def _create(lock: Path, me: Holder) -> None:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, me.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_gone(lock: Path, text: str) -> bool:
    """Delete ``lock`` if it still holds ``text`` (a gone holder's) under an O_EXCL mutex (one
    of several runs taking over deletes, none a lock created meanwhile); whether this one did."""
    mutex = lock.with_name(LOCK_FILE + ".takeover")
    try:
        _create(mutex, Holder.current())
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):  # left by a process that died taking over
            if time.time() - mutex.stat().st_mtime > 60:
                mutex.unlink(missing_ok=True)
        time.sleep(0.2)
        return False
    try:
        if _read(lock)[0] != text:
            return False
        lock.unlink(missing_ok=True)
        return True
    finally:
        mutex.unlink(missing_ok=True)


def acquire(output_dir: str | os.PathLike) -> Holder:
    """Take the lock of ``output_dir`` for this process; returns the holder written. A gone
    holder's lock is taken over; RunLockedError (one line) when a live run holds it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    me = Holder.current()
    removed = None  # (kind, why, holder) of the gone lock this process deleted
    for _ in range(20):
        with contextlib.suppress(FileExistsError):
            _create(lock, me)
            if removed is not None and removed[0] == "own":
                logger.info("continuing this run in %s: %s", out, removed[1])
            elif removed is not None:
                logger.warning(
                    "took over the lock of %s from a run that is gone (%s; %s); this run "
                    "continues from the newest checkpoint there",
                    out,
                    removed[2].describe(),
                    removed[1],
                )
            return me
        text, holder = _read(lock)
        if holder is None and text == "":
            time.sleep(0.5)  # created a moment ago and not written yet, or just released
            text, holder = _read(lock)
            if text == "" and not lock.exists():
                continue
        reason = gone_reason(holder, me) if holder is not None else None
        if reason is None:
            raise RunLockedError(_held_message(out, lock, holder, text))
        if _remove_gone(lock, text):
            removed = (*reason, holder)
    raise RunLockedError(
        f"train.output_dir {out}: could not take {lock}, other runs keep taking it; run one "
        "training run per train.output_dir"
    )


def release(output_dir: str | os.PathLike, me: Holder | None) -> None:
    """Remove the lock of ``output_dir`` when it is still ``me``'s (idempotent)."""
    lock = Path(output_dir) / LOCK_FILE
    holder = _read(lock)[1]
    if me is None or holder is None:
        return
    if (holder.host, holder.pid, holder.started) == (me.host, me.pid, me.started):
        lock.unlink(missing_ok=True)


def hold(output_dir: str | os.PathLike, device=None) -> Callable[[], None]:
    """Every rank: rank 0 takes the lock (:func:`acquire`), all agree in one all-reduce (or
    raise RunLockedError, printed by rank 0); returns its release (a no-op on other ranks)."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    holder, error = None, None
    if rank == 0:
        try:
            holder = acquire(output_dir)
        except RunLockedError as exc:
            error = exc
    if world > 1:
        refused = torch.tensor([1 if error is not None else 0], dtype=torch.int64, device=device)
        dist.all_reduce(refused)
        if error is None and int(refused.item()):
            in_use = f"train.output_dir {output_dir} is in use by another training run"
            error = RunLockedError(in_use, announce=False)
    if error is not None:
        raise error
    return functools.partial(release, output_dir, holder)
