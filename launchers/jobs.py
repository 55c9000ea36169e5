"""Launched experiments: the run record (``probsft_experiment.json``), SLURM job states (``sacct``,
else ``squeue``), progress, logs (srun's output, else the batch script's) and cancel."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from probsft_megatron.errors import ProbsftError
from probsft_megatron.fileio import atomic_write_json

RECORD = "probsft_experiment.json"
#: Job states of SLURM and of NeMo-Run's local runs by class.
STATE_CLASSES = {
    "failed": "FAILED CANCELLED TIMEOUT NODE_FAIL PREEMPTED OUT_OF_MEMORY BOOT_FAIL DEADLINE "
    "REVOKED UNKNOWN_FAILED",
    "succeeded": "COMPLETED SUCCEEDED SUCCESS",
    "running": "RUNNING COMPLETING STARTING",
    "queued": "PENDING SUBMITTED QUEUED CONFIGURING REQUEUED UNSUBMITTED",
}
_CLASS_OF = {state: c for c, states in STATE_CLASSES.items() for state in states.split()}
#: Job states after which a job will not run again by itself.
TERMINAL = frozenset(s for s, c in _CLASS_OF.items() if c in ("failed", "succeeded"))
UNKNOWN = "UNKNOWN"  # a job that SLURM does not (yet) report
POLL_S = 3.0
HEARTBEAT_S = 60.0
_SACCT_FIELDS = "JobIDRaw,State,ElapsedRaw,NodeList,ExitCode,Start"


def state_class(state: str | None) -> str | None:
    """A job state as ``failed``, ``running``, ``queued``, ``succeeded`` or None (unknown)."""
    return _CLASS_OF.get(state.upper()) if state else None


@dataclass
class LaunchedStep:
    """One launched step: its command, its SLURM job (None for a local one), its log folder."""

    name: str
    kind: str
    after: list[str]
    job_id: str | None
    job_name: str
    log_dir: str
    command: list[str] = field(default_factory=list)

    def log_path(self) -> Path | None:
        """The srun output of the latest (re)start, else the batch script's; None if neither."""
        if self.job_id is None:
            return None
        folder = Path(self.log_dir)
        runs = folder.glob(f"log-{self.job_name}_{self.job_id}_*.out")
        batch = folder / f"sbatch_{self.job_name}_{self.job_id}.out"
        return max(runs, key=_restart, default=None) or (batch if batch.is_file() else None)


def _restart(path: Path) -> tuple[int, str]:
    """Sort key of srun logs: the (re)start number, then the name."""
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1, path.name


@dataclass
class ExperimentRecord:
    """What was launched: the experiment's folder, its executor, steps and runs."""

    title: str
    exp_id: str
    exp_dir: str
    status: str  # dry run, launched (local), submitted (SLURM) or failed (see error)
    steps: list[LaunchedStep]
    #: run name -> the fields of its experiment.RunPlan (the config as validated at launch)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    executor: str = "slurm"  # or local
    command: list[str] = field(default_factory=list)  # the `probsft launch` command line
    error: str | None = None
    submitted_at: str = ""

    def save(self) -> Path:
        return atomic_write_json(Path(self.exp_dir) / RECORD, asdict(self))

    @classmethod
    def load(cls, exp_dir: str | os.PathLike) -> ExperimentRecord:
        data = json.loads((Path(exp_dir) / RECORD).read_text())
        data["steps"] = [LaunchedStep(**s) for s in data["steps"]]
        return cls(**data)

    def step(self, ref: str) -> LaunchedStep:
        """A step by name, or by a unique prefix or kind (``train``)."""
        matches = [s for s in self.steps if s.name == ref] or [
            s for s in self.steps if s.name.startswith(ref) or s.kind == ref
        ]
        if len(matches) == 1:
            return matches[0]
        names = ", ".join(s.name for s in self.steps)
        what = "several steps match" if matches else "no step matches"
        raise ProbsftError(f"{what} {ref!r} in experiment {self.exp_id}; steps: {names}")


@dataclass
class JobState:
    """One job as SLURM reports it."""

    state: str
    elapsed_s: int | None = None
    nodes: str = ""
    exit_code: str = ""
    start: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def never_ran(self) -> bool:
        """Ended without ever starting (cancelled while pending)."""
        return self.terminal and not self.elapsed_s and self.start in ("", "None", "Unknown")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _rows(cmd: list[str]) -> list[list[str]] | None:
    """The ``|``-separated rows a SLURM client prints; [] when it fails, None if not here."""
    try:
        proc = _run(cmd)
    except FileNotFoundError:
        return None
    return [line.split("|") for line in proc.stdout.splitlines()] if proc.returncode == 0 else []


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """SLURM's view of ``job_ids`` (sacct, else squeue); ProbsftError without a SLURM client."""
    ids = [j for j in dict.fromkeys(job_ids) if j]
    if not ids:
        return {}
    out: dict[str, JobState] = {}
    sacct = _rows(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", _SACCT_FIELDS])
    for parts in sacct or []:
        if len(parts) >= 6 and parts[0] in ids:
            elapsed = int(parts[2]) if parts[2].isdigit() else None
            state = parts[1].split()[0] if parts[1] else UNKNOWN
            out[parts[0]] = JobState(state, elapsed, *parts[3:6])
    if missing := [j for j in ids if j not in out]:
        squeue = _rows(["squeue", "-h", "-j", ",".join(missing), "-o", "%i|%T|%M|%N"])
        if squeue is None and sacct is None:
            raise ProbsftError(
                "neither sacct nor squeue is on PATH; run this where the "
                "SLURM client commands are available (a login node)"
            )
        for parts in squeue or []:
            if len(parts) == 4 and parts[0] in missing:
                out[parts[0]] = JobState(parts[1], time_limit_seconds(parts[2]), parts[3])
    return {j: out.get(j, JobState(UNKNOWN)) for j in ids}


_TIME_RE = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?")


def time_limit_seconds(value: str) -> int | None:
    """Seconds of a SLURM time limit in one of sbatch's forms (``MM``, ``MM:SS``,
    ``HH:MM:SS``, ``D-HH[:MM[:SS]]``; ``30:00`` is thirty minutes), or None for another form
    or a field out of range. squeue's elapsed times (``%M``) are written the same way."""
    m = _TIME_RE.fullmatch(value.strip())
    if m is None:
        return None
    days, first = m.group(1, 2)
    fields = [int(f) for f in m.groups()[1:] if f is not None]
    if any(f >= 60 for f in fields[1:]):
        return None
    if days is None and len(fields) < 3:  # MM[:SS], the minutes unbounded
        return 60 * fields[0] + sum(fields[1:])
    if len(first) > (3 if days is None else 2) or (days is not None and fields[0] >= 24):
        return None  # HH:MM:SS has up to 3 digits of hours, D-HH[:MM[:SS]] below 24
    return 86400 * int(days or 0) + sum(f * u for f, u in zip(fields, (3600, 60, 1)))


def _fmt_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    h, rem = divmod(int(seconds), 3600)
    return f"{h:d}:{rem // 60:02d}:{rem % 60:02d}"


def tail(path: Path | None, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (none when it does not exist)."""
    if path is None or not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    # progress bars rewrite one line with carriage returns: keep what a terminal would show
    rows = [row.rsplit("\r", 1)[-1] if row.rstrip("\r") else row for row in text.splitlines()]
    return rows[-lines:]


_PREFIX_RE = re.compile(r"^(\d+: )?(\[\w+\]:)?\s*")
_ERROR_RE = re.compile(r"^(error: \S.*|([A-Za-z_][\w.]*)?(Error|Exception): \S.*)$")


def error_lines(path: Path | None, limit: int = 3) -> list[str]:
    """The distinct ``error: ...`` and Python exception lines of a log (in a multi-node log often
    far above the end), first seen first, without srun's task label and torchrun's rank prefix."""
    if path is None or not path.is_file():
        return []
    found: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = _PREFIX_RE.sub("", raw.rstrip("\n").rsplit("\r", 1)[-1], count=1).strip()
            if _ERROR_RE.match(line) and line not in found:
                found.append(line)
                if len(found) == limit:
                    break
    return found


def report(record: ExperimentRecord, states: dict[str, JobState], lines: int = 20) -> int:
    """Print one line per step (name, job, state, elapsed, log) and the errors and log tail of
    every failed step; returns 1 when a step failed or never ran (or the submission failed)."""
    print(f"experiment {record.exp_id}  ({record.exp_dir})")
    if record.status == "failed":
        print(f"submission failed: {record.error}")
    width = max([len(s.name) for s in record.steps] + [4])
    print(f"{'STEP':{width}s}  {'JOB':>7s}  {'STATE':11s}  {'ELAPSED':>8s}  LOG")
    failed, skipped = [], []
    for s in record.steps:
        st = states.get(s.job_id or "", JobState("NOT_SUBMITTED"))
        log = s.log_path()
        where = str(log) if log else ("(never ran)" if st.never_ran else "-")
        elapsed = _fmt_elapsed(st.elapsed_s)
        print(f"{s.name:{width}s}  {s.job_id or '-':>7s}  {st.state:11s}  {elapsed:>8s}  {where}")
        if st.never_ran:
            skipped.append(s.name)
        elif st.terminal and st.state != "COMPLETED":
            failed.append(s)
    for s in failed:
        st, log = states[s.job_id], s.log_path()
        code = f" with exit code {st.exit_code}" if st.exit_code else ""
        print(f"\nstep {s.name} (job {s.job_id}) ended {st.state}{code}")
        for row in error_lines(log):
            print(f"  {row}")
        print(f"last {lines} lines of {log}:")
        for row in tail(log, lines):
            print(f"  {row}")
    if skipped:
        print(f"\nnever ran (cancelled while waiting for their turn): {', '.join(skipped)}")
    return 1 if failed or skipped or record.status == "failed" else 0


def wait(record: ExperimentRecord) -> dict[str, JobState]:
    """Poll until every job of ``record`` has ended, printing state changes; the final states."""
    ids = [s.job_id for s in record.steps if s.job_id]
    names = {s.job_id: s.name for s in record.steps}
    width = max(len(n) for n in names.values())
    start = last_print = time.monotonic()
    seen: dict[str, str] = {}
    while True:
        states = job_states(ids)
        now = time.monotonic()
        stamp = f"[{_fmt_elapsed(now - start)}]"
        for j, st in states.items():
            if seen.get(j) != st.state:
                seen[j] = st.state
                detail = _fmt_elapsed(st.elapsed_s) if st.terminal and st.elapsed_s else ""
                detail = st.nodes if st.state == "RUNNING" else detail
                line = f"{stamp} {names[j]:{width}s}  job {j:>6s}  {st.state:11s} {detail}"
                print(line.rstrip(), flush=True)
                last_print = now
        if all(states[j].terminal for j in ids):
            return states
        if now - last_print >= HEARTBEAT_S:
            active = [f"{names[j]} {states[j].state}" for j in ids if not states[j].terminal]
            print(f"{stamp} waiting: {', '.join(active)}", flush=True)
            last_print = now
        time.sleep(POLL_S)


def cancel(record: ExperimentRecord) -> int:
    """scancel every job of ``record`` that has not ended; returns how many were cancelled."""
    states = job_states(s.job_id for s in record.steps if s.job_id)
    live = [j for j, st in states.items() if not st.terminal]
    if not live:
        print(f"experiment {record.exp_id}: no job left to cancel")
        return 0
    proc = _run(["scancel", *live])
    if proc.returncode != 0:
        raise ProbsftError(f"scancel {' '.join(live)} failed: {one_line(proc.stderr)}")
    print(f"experiment {record.exp_id}: cancelled jobs {', '.join(live)}")
    return len(live)


def one_line(text: str) -> str:
    """The non-blank lines of ``text`` joined with ``; ``."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def find_experiment(ref: str, roots: list[str]) -> Path:
    """An experiment folder from a path, or an id or title (newest) under ``ROOT/experiments``."""
    path = Path(ref)
    if path.is_file() and path.name == RECORD:
        path = path.parent
    if (path / RECORD).is_file():
        return path
    candidates: list[Path] = []
    # an id or a title is one plain name; a path that is not an experiment folder matches none
    is_name = len(path.parts) == 1 and not path.is_absolute() and not set(ref) & set("*?[]")
    for root in roots if is_name else ():
        base = Path(root) / "experiments"
        candidates += [p.parent for p in base.glob(f"*/{ref}/{RECORD}")]
        candidates += [p.parent for p in base.glob(f"{ref}/*/{RECORD}")]
    if candidates:
        return max(candidates, key=lambda p: (p / RECORD).stat().st_mtime)
    where = ", ".join(str(Path(r) / "experiments") for r in roots) or "nowhere"
    raise ProbsftError(
        f"no submitted experiment {ref!r}: not a folder with {RECORD}, nor an experiment id or "
        f"title under {where}; pass the folder that `probsft launch` printed (or --work-dir)"
    )
