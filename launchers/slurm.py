"""SLURM cluster profiles (``configs/clusters/<name>.yaml``) and the NeMo-Run executors built
from them.

A profile says where and how jobs run: account, partition, nodes, GPUs per node, time limits,
container image and mounts, environment, job-name prefix, and the work directory on the shared
file system. Every field is documented in ``configs/clusters/example.yaml`` and
``docs/launchers.md``. A profile is checked when it is loaded (unknown keys, missing account,
bad values) and again against the training layout (:func:`check_layout`), so a mistake fails
with one sentence before anything is submitted.

Jobs are submitted from a node that sees the cluster's file system (a login node): the
executors use NeMo-Run's ``LocalTunnel``, which writes the sbatch scripts under
``<work_dir>/experiments`` and calls ``sbatch`` there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probsft_megatron import resources
from probsft_megatron.config import read_yaml_mapping
from probsft_megatron.errors import ConfigError
from probsft_megatron.launchers.jobs import time_limit_seconds

#: Step kinds that get their own SLURM job; ``train`` spans all nodes under torchrun.
STEP_KINDS = ("convert", "train", "export", "eval")
_PLACEHOLDER_RE = re.compile(r"<[^<>]+>")
#: torchrun's rendezvous across the nodes of the train job (on the job's first node).
RDZV_BACKEND = "c10d"
RDZV_PORT = 29500
#: Lines of a multi-node train job's batch script (bare nodes) that start torchrun's
#: rendezvous store in the batch script itself, on a free port of the first node, and make
#: every torchrun agent a client of it (see ``launchers/steps.py``, ``rdzv-store``).
RDZV_STORE_SETUP = """\
# torchrun's rendezvous store runs here, not inside one of the torchrun agents, so that no
# agent takes it down while the others still shut down
probsft_rdzv_file=$(mktemp)
python -m probsft_megatron.launchers.steps rdzv-store --port-file "$probsft_rdzv_file" &
for _ in $(seq 1200); do [ -s "$probsft_rdzv_file" ] && break; sleep 0.1; done
PROBSFT_RDZV_PORT=$(cat "$probsft_rdzv_file")
rm -f "$probsft_rdzv_file"
if [ -z "$PROBSFT_RDZV_PORT" ]; then
    echo "error: the rendezvous store did not start" \
         "(python -m probsft_megatron.launchers.steps rdzv-store)" >&2
    exit 1
fi
export PET_RDZV_CONF=is_host=0"""
#: Lines of every train job's batch script: training that stopped on a signal after saving a
#: checkpoint exits 75 (``stopping.INTERRUPTED_EXIT_CODE``); the batch script then requeues
#: its job, which resumes from that checkpoint, and the steps that wait for it (``afterok``)
#: keep waiting. A signal that also reaches the batch shell (``scancel`` without
#: ``--signal``, the time limit itself) ends the shell before it gets there: no requeue.
REQUEUE_SETUP = """\
# training exits 75 after saving a checkpoint on a stop signal sent to this job's steps
# (the profile's warning signal, scancel --signal=USR1): requeue the job to resume from it
probsft_requeue() {
    if [ "$?" -eq 75 ]; then
        echo "training stopped on a signal after saving a checkpoint: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
}
trap probsft_requeue EXIT"""
#: srun options of a multi-node train job, after NeMo-Run's own (the last one counts):
#: ``--label`` prefixes every line with the task that printed it ("0: ...", "1: ..."; task i
#: runs on the job's node i). ``--kill-on-bad-exit=0`` replaces NeMo-Run's ``=1``: with it,
#: the first agent to exit 75 after the collective save got the other agent terminated
#: (measured: srun exit 143 instead of 75, so the job was not requeued). Tasks that do not
#: end together are still ended by srun 60 s after the first one (NeMo-Run's ``--wait=60``),
#: and a rank whose peer died stops on its own within ``train.dist_timeout_s``.
TRAIN_SRUN_ARGS = ["--label", "--kill-on-bad-exit=0"]
_SIGNAL_RE = re.compile(r"^((R|B|RB|BR):)?(SIG)?[A-Z0-9]+(@\d+)?$")


@dataclass
class ClusterProfile:
    """One cluster's submission settings (the fields of a ``configs/clusters/*.yaml`` file)."""

    account: str
    """SLURM account charged for the jobs (``sbatch --account``); required."""
    gpus_per_node: int
    """GPUs requested on every node (``--gpus-per-node``); 0 for a CPU partition: no GPU
    request. Training runs one process per GPU unless ``nproc_per_node`` says otherwise."""
    partition: str | None = None
    """SLURM partition (``--partition``); the cluster's default when omitted."""
    qos: str | None = None
    """Quality of service (``--qos``), if the cluster uses one."""
    nodes: int = 1
    """Nodes of the training job (convert, export and eval use one node)."""
    time: dict[str, str] | str = field(default_factory=dict)
    """Time limit per step kind (``convert``, ``train``, ``export``, ``eval``), or one string
    for all, in a form of :func:`time_limit_seconds`. Unset kinds get ``DEFAULT_TIME``."""
    container_image: str | None = None
    """Container image (pyxis/enroot, ``--container-image``) with probsft-megatron installed;
    jobs run on the bare nodes when omitted."""
    container_mounts: list[str] = field(default_factory=list)
    """``SRC:DST`` mounts (``--container-mounts``): data, models and the work directory."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported in every job (e.g. HF_HOME, NCCL settings)."""
    job_name_prefix: str = "probsft-"
    """Prefix of every SLURM job name; the step name follows (``probsft-train-...``)."""
    work_dir: str | None = None
    """Default ``--work-dir`` on the shared file system: converted models, runs, sbatch scripts."""
    cpus_per_task: int | None = None
    """CPUs per task (``--cpus-per-task``)."""
    mem: str | None = None
    """Memory per node (``--mem``, e.g. ``0`` for all of it)."""
    exclusive: bool | None = None
    """Request whole nodes: ``true`` renders a bare ``--exclusive``; ``false`` or omitted
    renders nothing (sbatch rejects ``--exclusive=False``)."""
    nproc_per_node: int | None = None
    """Training processes per node; default ``gpus_per_node``, or 1 on a CPU partition
    (``gpus_per_node: 0``). ``probsft launch --nproc`` overrides it."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU in GB (80 for an 80 GB H100). ``probsft launch`` checks with it that
    the train step's layout fits (:func:`probsft_megatron.plan.check_fits`) before anything
    is submitted; omitted, or on a CPU partition, the check is skipped and the plan says so."""
    signal: str | None = None
    """Warning signal before the time limit for the train job (``--signal``), e.g.
    ``USR1@120``: SLURM sends SIGUSR1 to the job's processes 120 s before the limit."""
    name: str = ""
    """The profile's name (its file name); set by :func:`load_profile`."""

    DEFAULT_TIME = "04:00:00"

    def __post_init__(self) -> None:
        where = f"cluster profile '{self.name}'" if self.name else "cluster profile"
        if not isinstance(self.account, str) or not self.account.strip():
            raise ConfigError(
                f"{where}: 'account' is missing; set the SLURM account to charge "
                "(see configs/clusters/example.yaml)"
            )
        for key, low in (("gpus_per_node", 0), ("nodes", 1), ("nproc_per_node", 1)):
            value = getattr(self, key)
            if value is None and key == "nproc_per_node":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                hint = " (0 for a CPU partition)" if key == "gpus_per_node" else ""
                raise ConfigError(
                    f"{where}: '{key}' must be an integer >= {low}{hint} (got {value!r})"
                )
        for key in ("exclusive",):
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{where}: '{key}' must be true or false (got {value!r})")
        if self.gpu_memory_gb is not None and (
            isinstance(self.gpu_memory_gb, bool)
            or not isinstance(self.gpu_memory_gb, (int, float))
            or not 0 < self.gpu_memory_gb < float("inf")
        ):
            raise ConfigError(
                f"{where}: 'gpu_memory_gb' must be a positive number of GB per "
                f"GPU, e.g. 80 (got {self.gpu_memory_gb!r})"
            )
        if self.signal is not None and (
            not isinstance(self.signal, str) or not _SIGNAL_RE.match(self.signal)
        ):
            raise ConfigError(
                f"{where}: signal={self.signal!r} is not an sbatch --signal value; "
                "write SIGNAL@SECONDS, e.g. 'USR1@120' (optionally 'B:USR1@120')"
            )
        for key in ("partition", "qos", "container_image", "work_dir"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{where}: '{key}' must be a string (got {value!r})")
        if self.mem is not None:
            if isinstance(self.mem, bool) or not isinstance(self.mem, (str, int)):
                raise ConfigError(f"{where}: 'mem' must be a size such as '64G' or '0'")
            self.mem = str(self.mem)
        if self.cpus_per_task is not None and (
            isinstance(self.cpus_per_task, bool)
            or not isinstance(self.cpus_per_task, int)
            or self.cpus_per_task < 1
        ):
            raise ConfigError(
                f"{where}: 'cpus_per_task' must be an integer >= 1 (got {self.cpus_per_task!r})"
            )
        if isinstance(self.time, str):
            self.time = dict.fromkeys(STEP_KINDS, self.time)
        if not isinstance(self.time, dict):
            raise ConfigError(
                f"{where}: 'time' must be a string or a mapping of "
                f"{', '.join(STEP_KINDS)} to HH:MM:SS or D-HH:MM:SS"
            )
        for kind, value in self.time.items():
            if kind not in STEP_KINDS:
                raise ConfigError(
                    f"{where}: unknown step '{kind}' under 'time'; use {', '.join(STEP_KINDS)}"
                )
            if not isinstance(value, str) or time_limit_seconds(value) is None:
                raise ConfigError(
                    f"{where}: time.{kind}={value!r} is not a SLURM time limit; "
                    "write HH:MM:SS or D-HH:MM:SS in quotes (minutes and "
                    "seconds below 60), e.g. '04:00:00'"
                )
        if not isinstance(self.container_mounts, list) or any(
            not isinstance(m, str) or ":" not in m for m in self.container_mounts
        ):
            raise ConfigError(f"{where}: 'container_mounts' must be a list of 'SRC:DST' strings")
        if not isinstance(self.env, dict):
            raise ConfigError(f"{where}: 'env' must be a mapping of variable names to values")
        self.env = {str(k): str(v) for k, v in self.env.items()}

    def processes_per_node(self) -> int:
        """Training processes per node: ``nproc_per_node``, else one per GPU, else 1."""
        return self.nproc_per_node or self.gpus_per_node or 1

    def time_for(self, kind: str) -> str:
        """The time limit of a step kind."""
        return self.time.get(kind, self.DEFAULT_TIME)

    def placeholders(self) -> list[str]:
        """Fields that still hold an ``<...>`` placeholder (the example profile's values)."""
        found = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            texts = (
                value
                if isinstance(value, list)
                else list(value.values())
                if isinstance(value, dict)
                else [value]
            )
            if any(isinstance(t, str) and _PLACEHOLDER_RE.search(t) for t in texts):
                found.append(f.name)
        return found


def list_profiles() -> list[str]:
    """Names of the profiles shipped in ``configs/clusters``."""
    return resources.names("clusters")


def load_profile(ref: str) -> ClusterProfile:
    """Load a profile by file path or by name under ``configs/clusters``."""
    path = Path(ref)
    if not path.is_file():
        path = resources.find("clusters", ref) or path
    if not path.is_file():
        raise ConfigError(
            f"cluster profile {ref!r} not found (a file, or a name under "
            f"configs/clusters: {', '.join(list_profiles()) or 'none'})"
        )
    data = read_yaml_mapping(path, "cluster profile fields")
    fields = {f.name for f in dataclasses.fields(ClusterProfile)} - {"name"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"cluster profile {path}: unknown field '{unknown[0]}'; valid fields: "
            f"{', '.join(sorted(fields))}"
        )
    for key in ("account", "gpus_per_node"):
        if data.get(key) is None:
            what = (
                "set the SLURM account to charge"
                if key == "account"
                else "set the number of GPUs on each node (0 for a CPU partition)"
            )
            raise ConfigError(f"cluster profile {path}: '{key}' is missing; {what}")
    return ClusterProfile(**data, name=path.stem)


def check_layout(
    profile: ClusterProfile,
    nodes: int,
    nproc_per_node: int,
    tp: int,
    pp: int,
) -> None:
    """Refuse a training job whose processes cannot be split into TP*PP model replicas."""
    where = f"cluster profile '{profile.name}'"
    if profile.gpus_per_node and nproc_per_node > profile.gpus_per_node:
        raise ConfigError(
            f"{where}: {nproc_per_node} processes per node exceed gpus_per_node="
            f"{profile.gpus_per_node}; lower --nproc or raise gpus_per_node"
        )
    world = nodes * nproc_per_node
    what = "GPUs" if profile.gpus_per_node else "processes"
    per_node = "gpus_per_node" if profile.gpus_per_node else "processes per node"
    if world % (tp * pp):
        raise ConfigError(
            f"{where}: nodes*{per_node} = {nodes}*{nproc_per_node} = {world} {what} is not "
            f"divisible by TP*PP = {tp}*{pp} = {tp * pp}; use a multiple of {tp * pp} {what} "
            "or change parallel.tensor_model_parallel_size / pipeline_model_parallel_size"
        )


def sbatch_fields(profile: ClusterProfile, kind: str) -> dict[str, Any]:
    """The optional sbatch settings of one step's job, each in a form sbatch accepts.

    ``None`` means "leave the flag out": NeMo-Run renders ``True`` as a bare flag
    (``--exclusive``) and any other value as ``--flag=value``, so a ``False`` must never reach
    it (sbatch rejects ``--exclusive=False``). No GPU request on a CPU partition.
    """
    return {
        "partition": profile.partition,
        "qos": profile.qos,
        "gpus_per_node": profile.gpus_per_node or None,
        "cpus_per_task": profile.cpus_per_task,
        "mem": profile.mem,
        "exclusive": True if profile.exclusive else None,
        "signal": profile.signal if kind == "train" else None,
        "time": profile.time_for(kind),
    }


def agent_args(profile: ClusterProfile, nodes: int, nproc_per_node: int) -> list[str]:
    """The training agent's (torchrun's) options in the train job, one agent per node.

    One node: a local rendezvous (``--standalone``). Several: the c10d rendezvous on the job's
    first node (the batch script's store on ``$PROBSFT_RDZV_PORT`` on bare nodes, the first
    agent's on :data:`RDZV_PORT` in a container), the job id as rendezvous id, SLURM's node
    id as node rank; the ``$`` words are expanded by the batch script's shell.
    """
    if nodes == 1:
        return [
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc_per_node),
            "--tee",
            "3",
        ]
    own_store = profile.container_image is None
    port = "${PROBSFT_RDZV_PORT}" if own_store else str(RDZV_PORT)
    return [
        "--rdzv-backend",
        RDZV_BACKEND,
        "--rdzv-endpoint",
        f"$head_node_ip:{port}",
        "--rdzv-id",
        "$SLURM_JOB_ID",
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(nproc_per_node),
        "--node-rank",
        "$SLURM_NODEID",
        "--tee",
        "3",
    ]


def slurm_executor(
    profile: ClusterProfile, kind: str, *, job_dir: str, nodes: int, nproc_per_node: int
) -> Any:
    """The NeMo-Run ``SlurmExecutor`` of one step.

    ``train`` runs on ``nodes`` nodes, one srun task per node running the training agent
    (``python -m probsft_megatron.launchers.agent``, torchrun with the stop signals left to
    training, with the options of :func:`agent_args`) with ``nproc_per_node`` processes
    each; the other steps run one process on one node. Every step
    requests the profile's GPUs per node (none when ``gpus_per_node`` is 0). A multi-node
    train job on bare nodes hosts torchrun's rendezvous store in its batch script
    (:data:`RDZV_STORE_SETUP`); with a container image the first agent hosts it on port
    :data:`RDZV_PORT`, as NeMo-Run does. A train job requeues itself when training stopped on
    a signal after saving (:data:`REQUEUE_SETUP`). A job whose dependency failed is cancelled
    by SLURM (``--kill-on-invalid-dep=yes``) instead of pending forever. Without a container
    image the jobs run this interpreter's environment: its folder leads ``PATH``.
    """
    from probsft_megatron.launchers.experiment import import_nemo_run

    run = import_nemo_run()
    distributed = kind == "train"
    env = dict(profile.env)
    if profile.container_image is None and "PATH" not in env:
        env["PATH"] = f"{os.path.dirname(sys.executable)}:$PATH"
    own_store = distributed and nodes > 1 and profile.container_image is None
    setup = None
    if distributed:
        env.setdefault("LOGLEVEL", "INFO")  # torchrun's agent says which ranks run where
        setup = "\n".join([RDZV_STORE_SETUP] * own_store + [REQUEUE_SETUP])
    return run.SlurmExecutor(
        account=profile.account,
        nodes=nodes if distributed else 1,
        ntasks_per_node=1,  # train: one training agent per node, which starts the processes
        torchrun_nproc_per_node=nproc_per_node if distributed else None,
        **sbatch_fields(profile, kind),
        container_image=profile.container_image,
        container_mounts=list(profile.container_mounts),
        env_vars=env,
        job_name_prefix=profile.job_name_prefix,
        setup_lines=setup,
        srun_args=TRAIN_SRUN_ARGS if distributed and nodes > 1 else None,
        additional_parameters={"kill_on_invalid_dep": "yes"},
        poll_estimated_start_time=False,
        tunnel=run.LocalTunnel(job_dir=job_dir),
        packager=run.Packager(),
    )
