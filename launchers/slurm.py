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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from probsft_megatron import resources
from probsft_megatron.config import read_yaml_mapping
from probsft_megatron.errors import ConfigError


#: Step kinds that get their own SLURM job; ``train`` spans all nodes under torchrun.
STEP_KINDS = ("convert", "train", "export", "eval")
_TIME_RE = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")
_PLACEHOLDER_RE = re.compile(r"<[^<>]+>")


@dataclass
class ClusterProfile:
    """One cluster's submission settings (the fields of a ``configs/clusters/*.yaml`` file)."""

    account: str
    """SLURM account charged for the jobs (``sbatch --account``); required."""
    gpus_per_node: int
    """GPUs requested on every node; training runs one process per GPU."""
    partition: str | None = None
    """SLURM partition (``--partition``); the cluster's default when omitted."""
    qos: str | None = None
    """Quality of service (``--qos``), if the cluster uses one."""
    nodes: int = 1
    """Nodes of the training job (convert, export and eval use one node)."""
    time: dict[str, str] | str = field(default_factory=dict)
    """Time limit per step kind (``convert``, ``train``, ``export``, ``eval``), or one string
    for all; ``[D-]HH:MM[:SS]``. Unset kinds get ``DEFAULT_TIME``."""
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
    """Request whole nodes (``--exclusive``)."""
    name: str = ""
    """The profile's name (its file name); set by :func:`load_profile`."""

    DEFAULT_TIME = "04:00:00"

    def __post_init__(self) -> None:
        where = f"cluster profile '{self.name}'" if self.name else "cluster profile"
        if not isinstance(self.account, str) or not self.account.strip():
            raise ConfigError(f"{where}: 'account' is missing; set the SLURM account to charge "
                              "(see configs/clusters/example.yaml)")
        for key in ("gpus_per_node", "nodes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: '{key}' must be an integer >= 1 (got {value!r})")
        if isinstance(self.time, str):
            self.time = {kind: self.time for kind in STEP_KINDS}
        if not isinstance(self.time, dict):
            raise ConfigError(f"{where}: 'time' must be a string or a mapping of "
                              f"{', '.join(STEP_KINDS)} to [D-]HH:MM[:SS]")
        for kind, value in self.time.items():
            if kind not in STEP_KINDS:
                raise ConfigError(f"{where}: unknown step '{kind}' under 'time'; use "
                                  f"{', '.join(STEP_KINDS)}")
            if not isinstance(value, str) or not _TIME_RE.match(value):
                raise ConfigError(f"{where}: time.{kind}={value!r} is not a SLURM time limit; "
                                  "write [D-]HH:MM[:SS] in quotes, e.g. '04:00:00'")
        if not isinstance(self.container_mounts, list) or any(
                not isinstance(m, str) or ":" not in m for m in self.container_mounts):
            raise ConfigError(f"{where}: 'container_mounts' must be a list of 'SRC:DST' strings")
        if not isinstance(self.env, dict):
            raise ConfigError(f"{where}: 'env' must be a mapping of variable names to values")
        self.env = {str(k): str(v) for k, v in self.env.items()}

    def time_for(self, kind: str) -> str:
        """The time limit of a step kind."""
        return self.time.get(kind, self.DEFAULT_TIME)

    def placeholders(self) -> list[str]:
        """Fields that still hold an ``<...>`` placeholder (the example profile's values)."""
        found = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            texts = (value if isinstance(value, list) else
                     list(value.values()) if isinstance(value, dict) else [value])
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
        raise ConfigError(f"cluster profile {ref!r} not found (a file, or a name under "
                          f"configs/clusters: {', '.join(list_profiles()) or 'none'})")
    data = read_yaml_mapping(path, "cluster profile fields")
    fields = {f.name for f in dataclasses.fields(ClusterProfile)} - {"name"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"cluster profile {path}: unknown field '{unknown[0]}'; valid fields: "
                          f"{', '.join(sorted(fields))}")
    for key in ("account", "gpus_per_node"):
        if data.get(key) is None:
            what = ("set the SLURM account to charge" if key == "account"
                    else "set the number of GPUs on each node")
            raise ConfigError(f"cluster profile {path}: '{key}' is missing; {what}")
    return ClusterProfile(**data, name=path.stem)


def check_layout(profile: ClusterProfile, nodes: int, nproc_per_node: int, tp: int, pp: int,
                 ) -> None:
    """Refuse a training job whose processes cannot be split into TP*PP model replicas."""
    where = f"cluster profile '{profile.name}'"
    if nproc_per_node > profile.gpus_per_node:
        raise ConfigError(f"{where}: {nproc_per_node} processes per node exceed gpus_per_node="
                          f"{profile.gpus_per_node}; lower --nproc or raise gpus_per_node")
    world = nodes * nproc_per_node
    if world % (tp * pp):
        raise ConfigError(
            f"{where}: nodes*gpus_per_node = {nodes}*{nproc_per_node} = {world} GPUs is not "
            f"divisible by TP*PP = {tp}*{pp} = {tp * pp}; use a multiple of {tp * pp} GPUs "
            "or change parallel.tensor_model_parallel_size / pipeline_model_parallel_size")


def slurm_executor(profile: ClusterProfile, kind: str, *, job_dir: str, nodes: int,
                   nproc_per_node: int) -> Any:
    """The NeMo-Run ``SlurmExecutor`` of one step.

    ``train`` runs on ``nodes`` nodes with ``nproc_per_node`` processes each under torchrun
    (NeMo-Run turns that into one srun task per node running ``torchrun --nnodes ...``); the
    other steps run one process on one node. Every step requests the profile's GPUs per node.
    """
    from probsft_megatron.launchers.experiment import import_nemo_run

    run = import_nemo_run()
    distributed = kind == "train"
    return run.SlurmExecutor(
        account=profile.account,
        partition=profile.partition,
        qos=profile.qos,
        nodes=nodes if distributed else 1,
        ntasks_per_node=nproc_per_node if distributed else 1,
        gpus_per_node=profile.gpus_per_node,
        cpus_per_task=profile.cpus_per_task,
        mem=profile.mem,
        exclusive=profile.exclusive,
        time=profile.time_for(kind),
        container_image=profile.container_image,
        container_mounts=list(profile.container_mounts),
        env_vars=dict(profile.env),
        job_name_prefix=profile.job_name_prefix,
        launcher="torchrun" if distributed else None,
        tunnel=run.LocalTunnel(job_dir=job_dir),
        packager=run.Packager(),
    )
