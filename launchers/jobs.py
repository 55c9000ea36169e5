"""Launched experiments: the run record, job states, progress, logs, cancel.

``probsft launch`` writes ``probsft_experiment.json`` (:data:`RECORD`, an
:class:`ExperimentRecord`) into the experiment folder for every executor: what each run
trains (recipe, overrides, objective, model, layout and the validated config), and each
step's command, SLURM job id, the steps it waits for and where its log is written. It is the
one source the later commands (``probsft launch status|logs|cancel EXPERIMENT``, the wait
after submission) and the runs report (``probsft report``) read. SLURM jobs' states come
from ``sacct`` (the accounting database: states survive the jobs), falling back to
``squeue`` for jobs that accounting does not list yet.

A step's log is the output of its ``srun`` (``log-<job name>_<job id>_<restart>.out`` in the
step's folder: the program's stdout and stderr, one file per (re)start); before the srun
starts, or when it never did, the batch script's own log (``sbatch_<job name>_<job id>.out``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from probsft_megatron.errors import ProbsftError
from probsft_megatron.fileio import atomic_write_json

RECORD = "probsft_experiment.json"
STATE_CLASSES = {
    "failed": (
        "FAILED CANCELLED TIMEOUT NODE_FAIL PREEMPTED OUT_OF_MEMORY BOOT_FAIL DEADLINE "
        "REVOKED UNKNOWN_FAILED"
    ),
    "succeeded": "COMPLETED SUCCEEDED SUCCESS",
    "running": "RUNNING COMPLETING STARTING",
    "queued": "PENDING SUBMITTED QUEUED CONFIGURING REQUEUED UNSUBMITTED",
}
"""Job states of SLURM and of NeMo-Run's local runs by class."""
_CLASS_OF = {state: c for c, states in STATE_CLASSES.items() for state in states.split()}
#: Job states after which a job will not run again by itself.
TERMINAL = frozenset(s for s, c in _CLASS_OF.items() if c in ("failed", "succeeded"))
#: Shown for a job that SLURM does not (yet) report.
UNKNOWN = "UNKNOWN"


def state_class(state: str | None) -> str | None:
    """A job state (NeMo-Run's or SLURM's) as ``failed``, ``running``, ``queued``,
    ``succeeded`` or None (unknown)."""
    return _CLASS_OF.get(state.upper()) if state else None


POLL_S = 3.0
HEARTBEAT_S = 60.0


@dataclass
class LaunchedStep:
    """One launched step: its command, its SLURM job (None for a local one) and where its
    logs go."""

    name: str
    kind: str
    after: list[str]
    job_id: str | None
    job_name: str
    log_dir: str
    command: list[str] = field(default_factory=list)

    def log_path(self) -> Path | None:
        """The step's newest log: the srun output of the latest (re)start, else the batch
        script's output; None while neither exists."""
        if self.job_id is None:
            return None
        folder = Path(self.log_dir)
        runs = sorted(
            folder.glob(f"log-{self.job_name}_{self.job_id}_*.out"),
            key=lambda p: (_restart(p), p.name),
        )
        if runs:
            return runs[-1]
        batch = folder / f"sbatch_{self.job_name}_{self.job_id}.out"
        return batch if batch.is_file() else None


def _restart(path: Path) -> int:
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


@dataclass
class ExperimentRecord:
    """What was launched: the experiment's folder, its executor, steps and runs."""

    title: str
    exp_id: str
    exp_dir: str
    status: str
    """``dry run``, ``launched`` (local), ``submitted`` (SLURM), or ``failed`` when the
    submission itself failed (``error`` says why)."""
    steps: list[LaunchedStep]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """run name -> what it trains: ``dataset``, ``model``, ``objective`` (canonical name),
    ``recipe``, ``overrides``, ``layout``, ``run_dir``, ``eval_summary`` and ``config`` (the
    training config as the launcher validated it)."""
    executor: str = "slurm"
    """``local`` or ``slurm``."""
    command: list[str] = field(default_factory=list)
    """The ``probsft launch`` command line."""
    error: str | None = None
    submitted_at: str = ""

    def save(self) -> Path:
        return atomic_write_json(Path(self.exp_dir) / RECORD, asdict(self))

    @classmethod
    def load(cls, exp_dir: str | os.PathLike) -> ExperimentRecord:
        path = Path(exp_dir) / RECORD
        data = json.loads(path.read_text())
        data["steps"] = [LaunchedStep(**s) for s in data["steps"]]
        return cls(**data)

    def step(self, ref: str) -> LaunchedStep:
        """A step by name, or by a unique prefix or kind (``train``)."""
        for s in self.steps:
            if s.name == ref:
                return s
        matches = [s for s in self.steps if s.name.startswith(ref) or s.kind == ref]
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
    end: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """SLURM's view of ``job_ids``: sacct first, squeue for the jobs it does not list.

    Raises :class:`ProbsftError` when neither command can be run (no SLURM client here).
    """
    ids = [j for j in dict.fromkeys(job_ids) if j]
    if not ids:
        return {}
    out: dict[str, JobState] = {}
    try:
        proc = _run(
            [
                "sacct",
                "-X",
                "-n",
                "-P",
                "-j",
                ",".join(ids),
                "-o",
                "JobIDRaw,State,ElapsedRaw,NodeList,ExitCode,Start,End",
            ]
        )
        have_sacct = True
    except FileNotFoundError:
        have_sacct = False
        proc = None
    if proc is not None and proc.returncode == 0:
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) < 7 or parts[0] not in ids:
                continue
            elapsed = int(parts[2]) if parts[2].isdigit() else None
            out[parts[0]] = JobState(
                parts[1].split()[0] if parts[1] else UNKNOWN,
                elapsed,
                parts[3],
                parts[4],
                parts[5],
                parts[6],
            )
    missing = [j for j in ids if j not in out]
    if missing:
        try:
            proc = _run(["squeue", "-h", "-j", ",".join(missing), "-o", "%i|%T|%M|%N"])
        except FileNotFoundError:
            if not have_sacct:
                raise ProbsftError(
                    "neither sacct nor squeue is on PATH; run this where the "
                    "SLURM client commands are available (a login node)"
                ) from None
            proc = None
        if proc is not None and proc.returncode == 0:
            for line in proc.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 4 and parts[0] in missing:
                    out[parts[0]] = JobState(parts[1], time_limit_seconds(parts[2]), parts[3])
    for j in ids:
        out.setdefault(j, JobState(UNKNOWN))
    return out


_TIME_FORMS = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d{1,2})(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
    r"|(?P<h>\d{1,3}):(?P<hm>\d{1,2}):(?P<hs>\d{1,2})"
    r"|(?P<m>\d+)(?::(?P<ms>\d{1,2}))?)$"
)


def time_limit_seconds(value: str) -> int | None:
    """Seconds of a SLURM time limit in one of sbatch's forms (``MM``, ``MM:SS``,
    ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``), or None if ``value`` is none of
    them or has a field out of range (seconds and minutes after hours < 60, hours after days
    < 24). Note sbatch's reading of two fields: ``30:00`` is thirty minutes, not hours.
    squeue's elapsed times (``%M``) are written the same way."""
    m = _TIME_FORMS.match(value.strip())
    if m is None:
        return None
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "days" in g:
        hours, minutes, seconds = g["dh"], g.get("dm", 0), g.get("ds", 0)
        if hours >= 24:
            return None
        hours += 24 * g["days"]
    elif "h" in g:
        hours, minutes, seconds = g["h"], g["hm"], g["hs"]
    else:
        hours, minutes, seconds = 0, g["m"], g.get("ms", 0)
        if seconds >= 60:
            return None
        return 60 * minutes + seconds
    if minutes >= 60 or seconds >= 60:
        return None
    return 3600 * hours + 60 * minutes + seconds


def _fmt_elapsed(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def tail(path: Path | None, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (none when it does not exist)."""
    if path is None or not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    # progress bars rewrite one line with carriage returns: keep what a terminal would show
    rows = [row.rsplit("\r", 1)[-1] if row.rstrip("\r") else row for row in text.splitlines()]
    return rows[-lines:]


_PREFIX_RE = re.compile(r"^(\d+: )?(\[\w+\]:)?\s*")
_ERROR_RE = re.compile(r"^(error: \S.*|([A-Za-z_][\w.]*)?(Error|Exception): \S.*)$")


def error_lines(path: Path | None, limit: int = 3) -> list[str]:
    """The distinct error lines of a log, first seen first: the project's one-line
    ``error: ...`` messages and Python exceptions with a message, without srun's task label
    and torchrun's rank prefix. They are often far above the end of a multi-node log, where
    the launchers print their own summaries."""
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


def never_ran(state: JobState) -> bool:
    """A job that ended without ever starting (cancelled while pending)."""
    return state.terminal and not state.elapsed_s and state.start in ("", "None", "Unknown")


def status_table(record: ExperimentRecord, states: dict[str, JobState]) -> str:
    """One line per step: name, job id, state, elapsed time, log path."""
    width = max([len(s.name) for s in record.steps] + [4])
    lines = [f"{'STEP':{width}s}  {'JOB':>7s}  {'STATE':11s}  {'ELAPSED':>8s}  LOG"]
    for s in record.steps:
        st = states.get(s.job_id or "", JobState("NOT_SUBMITTED"))
        log = s.log_path()
        where = str(log) if log else ("(never ran)" if never_ran(st) else "-")
        lines.append(
            f"{s.name:{width}s}  {s.job_id or '-':>7s}  {st.state:11s}  "
            f"{_fmt_elapsed(st.elapsed_s):>8s}  {where}"
        )
    return "\n".join(lines)


def failed_steps(record: ExperimentRecord, states: dict[str, JobState]) -> list[LaunchedStep]:
    """Steps that ran and ended in another state than COMPLETED (not those that never ran)."""
    out = []
    for s in record.steps:
        st = states.get(s.job_id or "")
        if st is not None and st.terminal and not st.ok and not never_ran(st):
            out.append(s)
    return out


def report(
    record: ExperimentRecord, states: dict[str, JobState], out: TextIO, lines: int = 20
) -> int:
    """Print the status table and the log tail of every failed step; 0 when no step failed
    and every job is known, 1 when one failed (or the submission did)."""
    print(f"experiment {record.exp_id}  ({record.exp_dir})", file=out)
    if record.status == "failed":
        print(f"submission failed: {record.error}", file=out)
    print(status_table(record, states), file=out)
    failed = failed_steps(record, states)
    for s in failed:
        st = states[s.job_id or ""]
        log = s.log_path()
        print(
            f"\nstep {s.name} (job {s.job_id}) ended {st.state}"
            f"{' with exit code ' + st.exit_code if st.exit_code else ''}",
            file=out,
        )
        for row in error_lines(log):
            print(f"  {row}", file=out)
        print(f"last {lines} lines of {log}:", file=out)
        for row in tail(log, lines):
            print(f"  {row}", file=out)
    skipped = [
        s.name
        for s in record.steps
        if s.job_id and never_ran(states.get(s.job_id, JobState(UNKNOWN)))
    ]
    if skipped:
        print(
            f"\nnever ran (cancelled while waiting for their turn): {', '.join(skipped)}", file=out
        )
    return 1 if failed or skipped or record.status == "failed" else 0


def wait(
    record: ExperimentRecord,
    out: TextIO = sys.stdout,
    *,
    poll_s: float = POLL_S,
    heartbeat_s: float = HEARTBEAT_S,
    states_fn: Callable = job_states,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, JobState]:
    """Poll SLURM until every job of ``record`` has ended, printing one line per state change
    (and a reminder of what still runs every ``heartbeat_s``). Returns the final states."""
    ids = [s.job_id for s in record.steps if s.job_id]
    names = {s.job_id: s.name for s in record.steps}
    width = max(len(n) for n in names.values())
    start = last_print = clock()
    seen: dict[str, str] = {}
    while True:
        states = states_fn(ids)
        now = clock()
        stamp = f"[{_fmt_elapsed(now - start)}]"
        for j in ids:
            st = states[j]
            if seen.get(j) != st.state:
                seen[j] = st.state
                detail = (
                    st.nodes
                    if st.state == "RUNNING"
                    else (_fmt_elapsed(st.elapsed_s) if st.terminal and st.elapsed_s else "")
                )
                print(
                    f"{stamp} {names[j]:{width}s}  job {j:>6s}  {st.state:11s} {detail}".rstrip(),
                    file=out,
                    flush=True,
                )
                last_print = now
        if all(states[j].terminal for j in ids):
            return states
        if now - last_print >= heartbeat_s:
            active = [f"{names[j]} {states[j].state}" for j in ids if not states[j].terminal]
            print(f"{stamp} waiting: {', '.join(active)}", file=out, flush=True)
            last_print = now
        sleep(poll_s)


def cancel(record: ExperimentRecord, out: TextIO = sys.stdout) -> int:
    """scancel every job of ``record`` that has not ended; returns how many were cancelled."""
    states = job_states(s.job_id for s in record.steps if s.job_id)
    live = [j for j, st in states.items() if not st.terminal]
    if not live:
        print(f"experiment {record.exp_id}: no job left to cancel", file=out)
        return 0
    proc = _run(["scancel", *live])
    if proc.returncode != 0:
        raise ProbsftError(f"scancel {' '.join(live)} failed: {_one_line(proc.stderr)}")
    print(f"experiment {record.exp_id}: cancelled jobs {', '.join(live)}", file=out)
    return len(live)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def find_experiment(ref: str, roots: list[str]) -> Path:
    """An experiment folder from a path, an experiment id or a title (its newest
    experiment), searched under ``<root>/experiments`` for each root."""
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
        f"no submitted experiment {ref!r}: not a folder with {RECORD}, nor an "
        f"experiment id or title under {where}; pass the folder that "
        "`probsft launch` printed (or --work-dir)"
    )


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
