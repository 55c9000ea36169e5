"""SLURM cluster profiles (``configs/clusters/<name>.yaml``, documented in ``example.yaml``), their
checks, and the NeMo-Run executors built from them (``LocalTunnel``: sbatch runs here)."""

from __future__ import annotations

import dataclasses
import math
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
#: Port of torchrun's c10d rendezvous on the train job's first node (in a container).
RDZV_PORT = 29500
#: A multi-node train job on bare nodes hosts torchrun's rendezvous store in its batch script.
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
#: Every train job requeues itself when training exits 75 (stopped on a signal, checkpoint saved).
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
#: srun options of a multi-node train job after NeMo-Run's: ``--label`` prefixes lines with the
#: node; ``--kill-on-bad-exit=0`` overrides ``=1``, which let the first agent to exit 75 kill all.
TRAIN_SRUN_ARGS = ["--label", "--kill-on-bad-exit=0"]
#: Integer fields of a profile and their least value.
_INT_FIELDS = {"gpus_per_node": 0, "nodes": 1, "nproc_per_node": 1, "cpus_per_task": 1}
_SIGNAL_RE = re.compile(r"^((R|B|RB|BR):)?(SIG)?[A-Z0-9]+(@\d+)?$")


@dataclass
class ClusterProfile:
    """One cluster's submission settings (the fields of a ``configs/clusters/*.yaml`` file)."""

    account: str  # sbatch --account
    gpus_per_node: int  # 0: a CPU partition, no GPU request
    partition: str | None = None
    qos: str | None = None
    nodes: int = 1  # of the train job; the other steps use one
    #: Time limit per step kind, or one for all, in a form of :func:`time_limit_seconds`.
    time: dict[str, str] | str = field(default_factory=dict)
    container_image: str | None = None  # pyxis/enroot; bare nodes when omitted
    container_mounts: list[str] = field(default_factory=list)  # SRC:DST
    env: dict[str, str] = field(default_factory=dict)  # exported in every job
    job_name_prefix: str = "probsft-"
    work_dir: str | None = None  # default --work-dir, on the shared file system
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, e.g. 0 for all of it
    exclusive: bool | None = None  # true renders a bare --exclusive (sbatch refuses =False)
    nproc_per_node: int | None = None  # default gpus_per_node, or 1 on a CPU partition
    gpu_memory_gb: float | None = None  # for the memory planner's check before submission
    signal: str | None = None  # the train job's warning signal (--signal), e.g. USR1@120
    name: str = ""  # the profile's file name, set by load_profile

    def __post_init__(self) -> None:
        where = f"cluster profile '{self.name}'" if self.name else "cluster profile"
        if not isinstance(self.account, str) or not self.account.strip():
            raise ConfigError(
                f"{where}: 'account' is missing; set the SLURM account to charge "
                "(see configs/clusters/example.yaml)"
            )
        for key, low in _INT_FIELDS.items():
            value = getattr(self, key)
            if value is None and key in ("nproc_per_node", "cpus_per_task"):
                continue
            if type(value) is not int or value < low:  # a bool is no count
                hint = " (0 for a CPU partition)" if key == "gpus_per_node" else ""
                raise ConfigError(
                    f"{where}: '{key}' must be an integer >= {low}{hint} (got {value!r})"
                )
        if self.exclusive is not None and not isinstance(self.exclusive, bool):
            raise ConfigError(
                f"{where}: 'exclusive' must be true or false (got {self.exclusive!r})"
            )
        memory = self.gpu_memory_gb
        if memory is not None and not (type(memory) in (int, float) and 0 < memory < math.inf):
            raise ConfigError(
                f"{where}: 'gpu_memory_gb' must be a positive number of GB per "
                f"GPU, e.g. 80 (got {memory!r})"
            )
        sig = self.signal
        if sig is not None and not (isinstance(sig, str) and _SIGNAL_RE.match(sig)):
            raise ConfigError(
                f"{where}: signal={sig!r} is not an sbatch --signal value; "
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
        return self.time.get(kind, "04:00:00")

    def placeholders(self) -> list[str]:
        """Fields that still hold an ``<...>`` placeholder (the example profile's values)."""
        found = []
        for f in dataclasses.fields(self):
            texts = getattr(self, f.name)
            if isinstance(texts, dict):
                texts = list(texts.values())
            elif not isinstance(texts, list):
                texts = [texts]
            if any(isinstance(t, str) and _PLACEHOLDER_RE.search(t) for t in texts):
                found.append(f.name)
        return found


def list_profiles() -> list[str]:
    """Names of the profiles shipped in ``configs/clusters``."""
    return resources.names("clusters")


def load_profile(ref: str) -> ClusterProfile:
    """Load a profile by file path or by name under ``configs/clusters``."""
    path = Path(ref) if Path(ref).is_file() else resources.find("clusters", ref) or Path(ref)
    if not path.is_file():
        raise ConfigError(
            f"cluster profile {ref!r} not found (a file, or a name under "
            f"configs/clusters: {', '.join(list_profiles()) or 'none'})"
        )
    data = read_yaml_mapping(path, "cluster profile fields")
    fields = {f.name for f in dataclasses.fields(ClusterProfile)} - {"name"}
    if unknown := sorted(set(data) - fields):
        raise ConfigError(
            f"cluster profile {path}: unknown field '{unknown[0]}'; valid fields: "
            f"{', '.join(sorted(fields))}"
        )
    required = {
        "account": "set the SLURM account to charge",
        "gpus_per_node": "set the number of GPUs on each node (0 for a CPU partition)",
    }
    for key, what in required.items():
        if data.get(key) is None:
            raise ConfigError(f"cluster profile {path}: '{key}' is missing; {what}")
    return ClusterProfile(**data, name=path.stem)


def check_layout(profile: ClusterProfile, nodes: int, nproc: int, tp: int, pp: int) -> None:
    """Refuse a training job whose processes cannot be split into TP*PP model replicas."""
    where = f"cluster profile '{profile.name}'"
    if profile.gpus_per_node and nproc > profile.gpus_per_node:
        raise ConfigError(
            f"{where}: {nproc} processes per node exceed gpus_per_node="
            f"{profile.gpus_per_node}; lower --nproc or raise gpus_per_node"
        )
    world = nodes * nproc
    gpus = profile.gpus_per_node
    what, per_node = ("GPUs", "gpus_per_node") if gpus else ("processes", "processes per node")
    if world % (tp * pp):
        raise ConfigError(
            f"{where}: nodes*{per_node} = {nodes}*{nproc} = {world} {what} is not "
            f"divisible by TP*PP = {tp}*{pp} = {tp * pp}; use a multiple of {tp * pp} {what} "
            "or change parallel.tensor_model_parallel_size / pipeline_model_parallel_size"
        )


def sbatch_fields(profile: ClusterProfile, kind: str) -> dict[str, Any]:
    """The optional sbatch settings of one step's job; None leaves the flag out (NeMo-Run
    renders True as a bare flag, anything else as ``--flag=value``: never False)."""
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
    """The training agent's (torchrun's) options in the train job, one agent per node. Several
    nodes: the c10d rendezvous on the first node (the batch script's store on bare nodes, the
    first agent's on :data:`RDZV_PORT` in a container); the batch script expands ``$`` words."""
    from probsft_megatron.launchers.experiment import single_node_agent_args

    if nodes == 1:
        return single_node_agent_args(nproc_per_node)
    port = "${PROBSFT_RDZV_PORT}" if profile.container_image is None else str(RDZV_PORT)
    rdzv = f"--rdzv-backend c10d --rdzv-endpoint $head_node_ip:{port}"
    return [
        *f"{rdzv} --rdzv-id $SLURM_JOB_ID --nnodes {nodes}".split(),
        *f"--nproc-per-node {nproc_per_node} --node-rank $SLURM_NODEID --tee 3".split(),
    ]


def slurm_executor(
    profile: ClusterProfile, kind: str, *, job_dir: str, nodes: int, nproc_per_node: int
) -> Any:
    """The NeMo-Run ``SlurmExecutor`` of one step: ``train`` on ``nodes`` nodes, an agent per
    node, requeued on exit 75; others one process on one node. A job whose dependency failed is
    cancelled; without a container this interpreter's folder leads PATH."""
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
