"""From (dataset, model, objective) to one NeMo-Run experiment: convert -> train -> export -> eval.

The experiment is first built as plain data, an :class:`ExperimentPlan`: a list of
:class:`Step` objects, each a ``python -m MODULE ARGS`` command with its environment and
the steps it waits for. Only :func:`execute` turns a plan into NeMo-Run tasks (``run.Script``)
on an executor, so a plan can be inspected, printed and tested without NeMo-Run; it also
writes the run record (:mod:`probsft_megatron.launchers.jobs`) that later commands and the
runs report read.

One run's steps::

    convert   probsft convert hf-to-megatron --hf HF --out WORK/models/MODEL
              (only with --hf and while no Megatron model dir exists there)
    prepare   probsft data prepare --config RECIPE --tokenizer TOKENIZER [data.* overrides]
              (only with --prepare: one CPU process builds the tokenized store, once per
              distinct data setting, before training maps it)
    train     python -m probsft_megatron.launchers.agent [torchrun options] \
                  -m probsft_megatron.train --config RECIPE loss.objective=... \
                  train.output_dir=WORK/runs/NAME [init.checkpoint=...] [--set overrides]
    export    python -m probsft_megatron.launchers.steps export --train-dir WORK/runs/NAME \
                  --out WORK/runs/NAME/hf            (the newest complete checkpoint)
    eval      probsft eval --model WORK/runs/NAME/hf --task TASKS --out WORK/runs/NAME/eval

Hyperparameters come from the recipe of (dataset, model) in ``configs/recipes``: the recipe
``<dataset>-<model>``, else any recipe training that model on that dataset, else (with a note)
the dataset's recipe for the nearest model size with the model swapped in. A dataset without
any recipe is an error that lists the recipes. The whole training config is loaded and
validated for the job's world size while the plan is built, so mistakes fail before anything
is submitted.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from probsft_megatron.config import TrainJobConfig, list_recipes, load_config, load_preset, load_raw
from probsft_megatron.errors import ConfigError
from probsft_megatron.objectives import parse_objective
from probsft_megatron.tokenizers import tokenizer_spec

DATASETS = ("math", "medical", "figfont", "custom")
#: Evaluation tasks of each dataset (the paper's math protocol for math).
EVAL_TASKS = {
    "math": "math500,minerva_math,olympiadbench,aime24,amc23",
    "figfont": "figfont",
    "medical": "medical",
    "custom": "custom",
}
CLI_MODULE = "probsft_megatron.cli"
TRAIN_MODULE = "probsft_megatron.train"
STEPS_MODULE = "probsft_megatron.launchers.steps"
AGENT_MODULE = "probsft_megatron.launchers.agent"
"""torchrun's agent for training, keeping the stop signals and exit codes (launchers/agent.py)."""
ANY_MODEL = "*"
"""Key of :attr:`LaunchOptions.hf` for a Hugging Face folder given without a preset name."""


@dataclass
class Step:
    """One command of an experiment: ``python -m module *args`` with ``env`` added.

    ``kind`` is ``convert``, ``prepare`` (``probsft data prepare``), ``train`` (run under
    torchrun on every node of the job), ``export`` or ``eval``; ``after`` names the steps that
    must succeed first.
    """

    name: str
    kind: str
    module: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)

    def argv(self, python: str = "python") -> list[str]:
        """The command line of one process of this step."""
        return [python, "-m", self.module, *self.args]


@dataclass
class RunRequest:
    """One (dataset, model, objective) chain to plan; ``label`` names its run (default: the
    objective's canonical name), ``overrides`` are dotted training overrides."""

    dataset: str
    model: str
    objective: str
    label: str | None = None
    overrides: list[str] = field(default_factory=list)
    recipe: str | None = None


@dataclass
class LaunchOptions:
    """Settings shared by every run of an experiment."""

    work_dir: str
    """Root of converted models (``models/``), runs (``runs/``) and NeMo-Run experiment
    records with their sbatch scripts (``experiments/``)."""
    world_size: int = 1
    """Training processes (nodes * processes per node) the configs are validated for."""
    hf: dict[str, str] = field(default_factory=dict)
    """Hugging Face backbone folder per model preset (``ANY_MODEL`` for every model)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment added to every step."""
    eval_tasks: str | None = None
    """Comma-separated eval tasks; default: :data:`EVAL_TASKS` of the run's dataset."""
    eval_args: list[str] = field(default_factory=list)
    """Extra ``probsft eval`` arguments (``--limit 8``, ``--data FILE``, ...)."""
    layout_check: Callable[[int, int], None] | None = None
    """Called with (TP, PP) of each run before the config is validated (cluster profiles)."""
    fit_check: Callable[[str, TrainJobConfig], str] | None = None
    """Called with each run's name and validated config before any step is planned: the
    memory planner's check (``probsft launch`` builds it from the profile's
    ``gpu_memory_gb``); raises :class:`ConfigError` for a layout that will not fit, else
    returns a line for the plan's notes."""
    prepare: bool = False
    """Add a ``prepare`` step before each training: ``probsft data prepare`` builds the
    run's tokenized store (one process, no GPU needed), once per distinct data setting, so
    the training job only maps it."""


@dataclass
class RunPlan:
    """One run: what it trains and where its outputs land (the run record's entry)."""

    name: str
    dataset: str
    model: str
    objective: str
    """The objective's canonical name."""
    recipe: str
    run_dir: str
    hf_dir: str
    eval_dir: str
    overrides: list[str] = field(default_factory=list)
    layout: dict[str, int] = field(default_factory=dict)
    """World size and parallel sizes the config was validated for."""
    config: dict[str, Any] = field(default_factory=dict)
    """The training config as validated at launch."""

    def record(self) -> dict[str, Any]:
        """This run as the experiment record stores it."""
        return {**asdict(self), "eval_summary": str(self.eval_summary)}

    @property
    def eval_summary(self) -> Path:
        """The evaluation's ``summary.json`` (present once the run succeeded)."""
        return Path(self.eval_dir) / "summary.json"


@dataclass
class ExperimentPlan:
    """An experiment as plain data: steps in a valid execution order, runs, and notes."""

    title: str
    work_dir: str
    steps: list[Step]
    runs: list[RunPlan]
    notes: list[str] = field(default_factory=list)

    def describe(self, nodes: int = 1, nproc_per_node: int = 1) -> str:
        """A human-readable listing: one line per step with its command."""
        lines = [f"experiment {self.title}: {len(self.steps)} steps, {len(self.runs)} run(s)"]
        lines += [f"note: {n}" for n in dict.fromkeys(self.notes)]
        for step in self.steps:
            argv = step.argv()
            if step.kind == "train":
                argv = [
                    "python",
                    "-m",
                    AGENT_MODULE,
                    "--nnodes",
                    str(nodes),
                    "--nproc-per-node",
                    str(nproc_per_node),
                    *argv[1:],
                ]
            after = f" (after {', '.join(step.after)})" if step.after else ""
            lines.append(f"  [{step.name}]{after}\n    {shlex.join(argv)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RecipeChoice:
    """The recipe a run uses, overrides that adapt it to the run's model, and why."""

    ref: str
    overrides: tuple[str, ...] = ()
    note: str | None = None


# -- recipes ------------------------------------------------------------------------------


def _recipe_dataset(raw: dict[str, Any]) -> str:
    data = raw.get("data") or {}
    if data.get("source") == "figfont":
        return "figfont"
    return {"numina": "math", "m23k": "medical"}.get(data.get("format"), "custom")


def _recipe_model(raw: dict[str, Any]) -> str | None:
    model = raw.get("model")
    if isinstance(model, dict):
        model = model.get("preset")
    return model if isinstance(model, str) else None


def _model_size(preset: str) -> float:
    """Rough parameter count of a preset (enough to rank models by size)."""
    m = load_preset(preset)
    h, ffn = m.get("hidden_size", 0), m.get("ffn_hidden_size", 0)
    return m.get("num_layers", 0) * (4 * h * h + 3 * h * ffn) + m.get("vocab_size", 0) * h


def resolve_recipe(dataset: str, model: str, explicit: str | None = None) -> RecipeChoice:
    """The recipe of (dataset, model); see the module docstring for the order of choices."""
    if explicit is not None:
        raw = load_raw(explicit)
        if _recipe_dataset(raw) != dataset:
            raise ConfigError(
                f"recipe {explicit!r} trains on {_recipe_dataset(raw)} data, not "
                f"{dataset}; pass the matching --dataset"
            )
        same = _recipe_model(raw) == model
        return RecipeChoice(explicit, () if same else (f"model={model}",))
    known = {name: load_raw(name) for name in list_recipes()}
    identity = {name: (_recipe_dataset(raw), _recipe_model(raw)) for name, raw in known.items()}
    exact = f"{dataset}-{model}"
    if identity.get(exact) == (dataset, model):
        return RecipeChoice(exact)
    matches = [name for name, ident in identity.items() if ident == (dataset, model)]
    if matches:
        return RecipeChoice(matches[0])
    generic = [
        name
        for name, (d, m) in identity.items()
        if d == dataset and m is not None and name == f"{d}-{m}"
    ]
    if not generic:
        listing = ", ".join(f"{n} ({d}, {m})" for n, (d, m) in identity.items())
        raise ConfigError(
            f"no recipe for dataset {dataset!r} with model {model!r}, and none for "
            f"that dataset to fall back on; recipes: {listing}; "
            "pass --recipe FILE (a YAML recipe, see configs/recipes)"
        )
    size = _model_size(model)
    nearest = min(generic, key=lambda n: (abs(math.log(_model_size(identity[n][1]) / size)), n))
    note = (
        f"no recipe {exact}; using the hyperparameters of {nearest} (nearest model size) "
        f"with model={model}; add configs/recipes/{exact}.yaml to pin them"
    )
    return RecipeChoice(nearest, (f"model={model}",), note)


# -- planning -----------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """``text`` reduced to characters safe in file and SLURM job names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _is_model_dir(path: str) -> bool:
    return (Path(path) / "model_config.json").is_file()


def _plan_backbone(
    plan: ExperimentPlan,
    converts: dict[str, str],
    req: RunRequest,
    name: str,
    cfg: TrainJobConfig,
    recipe: str,
    overrides: list[str],
    options: LaunchOptions,
) -> list[str]:
    """Decide where run ``name`` starts from; adds a convert step (once per Megatron model
    dir, recorded in ``converts``) and ``init.checkpoint`` to ``overrides`` when needed.
    Returns the steps its training waits for."""
    megatron = cfg.init.checkpoint
    hf = options.hf.get(req.model, options.hf.get(ANY_MODEL))
    if megatron is None and hf:
        megatron = str(Path(options.work_dir) / "models" / req.model)
        overrides.append(f"init.checkpoint={megatron}")
    if megatron is None:
        if cfg.peft.enabled:  # adapters of a random base: nothing on disk to merge them into
            raise ConfigError(
                f"run {name}: peft.method=lora adapts a base model, but recipe {recipe} starts "
                f"from random weights; pass --hf DIR (the {req.model} Hugging Face folder) or "
                "--set init.checkpoint=MEGATRON_DIR"
            )
        if not cfg.init.tokenizer:
            raise ConfigError(
                f"run {name}: recipe {recipe} starts from no checkpoint; pass --hf DIR "
                f"(the {req.model} Hugging Face folder) or --set init.checkpoint=MEGATRON_DIR"
            )
        plan.notes.append(
            f"run {name} trains {req.model} from random initialization "
            f"(no init.checkpoint, no --hf; tokenizer {cfg.init.tokenizer})"
        )
        return []
    if _is_model_dir(megatron):
        plan.notes.append(f"using the existing Megatron model dir {megatron} (no conversion)")
        return []
    if not hf:
        plan.notes.append(
            f"run {name}: init.checkpoint {megatron} is not a Megatron model dir "
            "on this machine; it must exist where the job runs (or pass --hf)"
        )
        return []
    if megatron not in converts:
        step_name = safe_name(f"convert-{req.model}")
        while any(s.name == step_name for s in plan.steps):
            step_name += "_"
        converts[megatron] = step_name
        plan.steps.append(
            Step(
                step_name,
                "convert",
                CLI_MODULE,
                ["convert", "hf-to-megatron", "--hf", hf, "--out", megatron],
                dict(options.env),
            )
        )
    return [converts[megatron]]


def _plan_prepare(
    plan: Any,
    prepares: dict[str, str],
    name: str,
    cfg: TrainJobConfig,
    recipe: str,
    overrides: list[str],
    after: list[str],
    env: dict[str, str],
) -> list[str]:
    """Add the step that builds run ``name``'s tokenized store (``probsft data prepare`` with
    the run's recipe, its ``data.*`` overrides and its tokenizer: what training fingerprints),
    after the backbone's conversion (the converted folder holds the tokenizer); one step per
    distinct (data settings, tokenizer), shared by the runs that use it. Returns the steps
    the run's training waits for."""
    if not cfg.data.cache:
        plan.notes.append(f"run {name}: data.cache is false, so there is no store to prepare")
        return after
    tokenizer = tokenizer_spec(cfg.init)
    if tokenizer is None:  # _plan_backbone has refused such a run already
        return after
    import dataclasses

    key = repr((sorted(dataclasses.asdict(cfg.data).items()), tokenizer))
    if key not in prepares:
        step_name = safe_name(f"prepare-{name}")
        prepares[key] = step_name
        data_overrides = [o for o in overrides if o.strip().startswith("data.")]
        plan.steps.append(
            Step(
                step_name,
                "prepare",
                CLI_MODULE,
                ["data", "prepare", "--config", recipe, "--tokenizer", tokenizer, *data_overrides],
                dict(env),
                list(after),
            )
        )
    return [*after, prepares[key]]


def plan_experiment(
    title: str | None,
    requests: list[RunRequest],
    options: LaunchOptions,
) -> ExperimentPlan:
    """Plan the steps of ``requests`` (one chain each, conversions shared by model); the
    experiment is called ``title``, or after its first run when ``title`` is None.

    Raises :class:`ConfigError` (one line) for an unknown dataset, preset, objective or
    recipe key, an impossible layout, a missing backbone, or two runs with the same name.
    """
    work = Path(options.work_dir)
    plan = ExperimentPlan(title=safe_name(title or ""), work_dir=str(work), steps=[], runs=[])
    converts: dict[str, str] = {}  # Megatron model dir -> convert step name
    prepares: dict[str, str] = {}  # data settings and tokenizer -> prepare step name
    models = sorted({req.model for req in requests})
    if len(models) > 1 and ANY_MODEL in options.hf:
        raise ConfigError(
            f"the runs use several models ({', '.join(models)}); name the "
            "backbone of each with --hf PRESET=DIR"
        )
    for req in requests:
        if req.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {req.dataset!r}; use one of {', '.join(DATASETS)}")
        load_preset(req.model)
        objective = parse_objective(req.objective).name
        choice = resolve_recipe(req.dataset, req.model, req.recipe)
        if choice.note:
            plan.notes.append(choice.note)
        name = safe_name(f"{req.dataset}-{req.model}-{req.label or objective}")
        if any(r.name == name for r in plan.runs):
            raise ConfigError(f"two runs are named {name}; give them different labels")
        run_dir = work / "runs" / name
        overrides = [
            *choice.overrides,
            f"loss.objective={objective}",
            f"train.output_dir={run_dir}",
            *req.overrides,
        ]
        cfg = load_config(choice.ref, overrides)
        if cfg.train.output_dir != str(run_dir):
            raise ConfigError(
                "train.output_dir is chosen by the launcher (WORK_DIR/runs/NAME); "
                "remove it from --set and choose --work-dir instead"
            )
        if options.layout_check is not None:
            options.layout_check(
                cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
            )
        cfg.validate(options.world_size)
        if options.fit_check is not None:
            plan.notes.append(options.fit_check(name, cfg))

        after = _plan_backbone(plan, converts, req, name, cfg, choice.ref, overrides, options)
        if options.prepare:
            after = _plan_prepare(
                plan, prepares, name, cfg, choice.ref, overrides, after, options.env
            )
        tasks = options.eval_tasks or EVAL_TASKS[req.dataset]
        has_data = any(a == "--data" or a.startswith("--data=") for a in options.eval_args)
        if {"medical", "custom"} & set(tasks.split(",")) and not has_data:
            raise ConfigError(
                f"eval task(s) {tasks} read a local jsonl; pass "
                "--eval-args '--data FILE' (and fields, see probsft eval --help)"
            )
        hf_dir, eval_dir = run_dir / "hf", run_dir / "eval"
        plan.steps += [
            Step(
                f"train-{name}",
                "train",
                TRAIN_MODULE,
                ["--config", choice.ref, *overrides],
                dict(options.env),
                after,
            ),
            Step(
                f"export-{name}",
                "export",
                STEPS_MODULE,
                ["export", "--train-dir", str(run_dir), "--out", str(hf_dir)],
                dict(options.env),
                [f"train-{name}"],
            ),
            Step(
                f"eval-{name}",
                "eval",
                CLI_MODULE,
                [
                    "eval",
                    "--model",
                    str(hf_dir),
                    "--task",
                    tasks,
                    "--out",
                    str(eval_dir),
                    "--overwrite",  # a requeued or re-launched step redoes its own eval
                    *options.eval_args,
                ],
                dict(options.env),
                [f"export-{name}"],
            ),
        ]
        config = cfg.to_dict()
        plan.runs.append(
            RunPlan(
                name,
                req.dataset,
                req.model,
                objective,
                choice.ref,
                str(run_dir),
                str(hf_dir),
                str(eval_dir),
                overrides=overrides,
                layout={"world_size": options.world_size, **config.get("parallel", {})},
                config=config,
            )
        )
    plan.title = plan.title or plan.runs[0].name
    return plan


# -- NeMo-Run -----------------------------------------------------------------------------


def import_nemo_run() -> Any:
    """``nemo_run``, imported without the deprecation warnings of its optional server stack."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nemo_run
    return nemo_run


def local_executor(step: Step, nproc_per_node: int) -> Any:
    """A NeMo-Run ``LocalExecutor`` for one step: for ``train`` the training agent with
    ``nproc_per_node`` processes (:func:`execute` writes its command), one process otherwise.
    This interpreter's folder leads ``PATH`` so that ``python`` is the one of this
    environment."""
    run = import_nemo_run()
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    if step.kind == "train":
        return run.LocalExecutor(
            ntasks_per_node=nproc_per_node, env_vars={"PATH": path, "LOGLEVEL": "INFO"}
        )
    return run.LocalExecutor(env_vars={"PATH": path})


def single_node_agent_args(nproc_per_node: int) -> list[str]:
    """The training agent's torchrun options for ``nproc_per_node`` processes on one node: a
    local rendezvous on a free port (``--standalone``). ``--tee 3`` keeps every rank's output
    in the step's log and in torchrun's per-rank files. (Several SLURM nodes:
    :func:`probsft_megatron.launchers.slurm.agent_args`.)"""
    return ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node), "--tee", "3"]


def step_command(
    step: Step,
    executor: Any,
    agent_args: list[str] | None = None,
) -> tuple[str, list[str]]:
    """(module, arguments) that ``executor`` runs for ``step``.

    ``train`` runs through the training agent (:data:`AGENT_MODULE`) with ``agent_args``
    (default: one node with the executor's processes per node). NeMo-Run writes a SLURM
    step's arguments into a bash script as they are, so they are shell-quoted here (the
    agent's ``$head_node_ip``-style words stay as they are, for the script to expand); a local
    step gets them unquoted, as its own argv (no shell), so a ``--set`` value such as
    ``data.train_files=[a.jsonl]`` reaches training intact.
    """
    run = import_nemo_run()
    args = list(step.args)
    if isinstance(executor, run.SlurmExecutor):
        args = [shlex.quote(a) for a in args]
    if step.kind != "train":
        return step.module, args
    if agent_args is None:
        agent_args = single_node_agent_args(executor.nproc_per_node())
    return AGENT_MODULE, [*agent_args, "-m", step.module, *args]


def experiment_dir(plan: ExperimentPlan, exp_id: str) -> Path:
    """Where NeMo-Run records an experiment of ``plan`` (and writes its sbatch scripts)."""
    return Path(plan.work_dir) / "experiments" / plan.title / exp_id


def execute(
    plan: ExperimentPlan,
    executor_for: Callable[[Step], Any],
    mode: str,
    agent_args: list[str] | None = None,
) -> Path:
    """Turn ``plan`` into a NeMo-Run experiment and dry-run, run or submit it.

    ``agent_args``: the training agent's torchrun options for the train steps (default: one
    node, :func:`single_node_agent_args`; see :func:`step_command`).

    ``mode``: ``dryrun`` (write the job scripts, launch nothing), ``run`` (local: the steps
    one after another in plan order, waiting for each) or ``submit`` (SLURM: every step is a
    job that depends on its ``after`` steps; returns once all are queued). Every mode writes
    the run record (:class:`~probsft_megatron.launchers.jobs.ExperimentRecord`) into the
    experiment's directory (a local run: when it ends, also by an error or Ctrl-C); returns
    that directory.
    """
    from probsft_megatron.launchers import jobs

    run = import_nemo_run()
    if mode not in ("dryrun", "run", "submit"):
        raise ValueError(f"mode must be dryrun, run or submit, got {mode!r}")
    exp_id = f"{plan.title}_{time.time_ns()}"
    exp_dir = experiment_dir(plan, exp_id)
    record = jobs.ExperimentRecord(
        title=plan.title,
        exp_id=exp_id,
        exp_dir=str(exp_dir),
        status={"dryrun": "dry run", "run": "launched", "submit": "submitted"}[mode],
        steps=[],
        runs={r.name: r.record() for r in plan.runs},
        command=["probsft", *sys.argv[1:]],
        submitted_at=jobs.now_iso(),
    )
    # a submission reports through the run record (jobs.py), not NeMo-Run's console
    exp = run.Experiment(
        plan.title,
        id=exp_id,
        base_dir=plan.work_dir,
        enable_goodbye_message=False,
        log_level="WARN",
        clean_mode=mode == "submit",
    )
    with exp:
        job_ids: dict[str, str] = {}
        for step in plan.steps:
            executor = executor_for(step)
            record.executor = "slurm" if isinstance(executor, run.SlurmExecutor) else "local"
            module, args = step_command(step, executor, agent_args)
            record.steps.append(
                jobs.LaunchedStep(
                    step.name,
                    step.kind,
                    list(step.after),
                    None,
                    step.name,
                    str(exp_dir / step.name),
                    ["python", "-m", module, *args],
                )
            )
            script = run.Script(
                path=module, args=args, env=dict(step.env), entrypoint="python", m=True
            )
            deps = [job_ids[a] for a in step.after] if mode == "submit" else None
            job_ids[step.name] = exp.add(
                script, executor=executor, name=step.name, dependencies=deps
            )
        if mode == "dryrun":
            exp.dryrun(log=False, delete_exp_dir=False)
            record.save()
        elif mode == "submit":
            _submit(record, exp)
        else:  # NeMo-Run creates the folder when the run starts: the record follows the run
            try:
                exp.run(sequential=True)
            finally:
                record.save()
    return exp_dir


def _slurm_job_id(handle: str) -> str | None:
    """The SLURM job id in a NeMo-Run app handle (``slurm_tunnel://nemo_run/<id>[/...]``)."""
    parts = handle.partition("://")[2].split("/")
    return parts[1] if len(parts) > 1 and parts[1] else None


def _sbatch_error(exc: BaseException) -> str:
    """sbatch's own error lines on one line, from the exception NeMo-Run let through (invoke's
    ``UnexpectedExit`` carries the command's result, possibly as the cause of another)."""
    from probsft_megatron.launchers.jobs import _one_line

    seen = exc
    while seen is not None:
        result = getattr(seen, "result", None)
        stderr = getattr(result, "stderr", None)
        if stderr:
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()] or lines
            return _one_line("\n".join(errors))
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {_one_line(str(exc))}"


def _submit(record: Any, exp: Any) -> None:
    """Queue every step's job and complete ``record`` with their job ids and log folders.

    A submission that SLURM refuses (sbatch's error) cancels the jobs already queued for this
    experiment, marks the record failed and raises :class:`ProbsftError` with sbatch's own
    message on one line.
    """
    from probsft_megatron.errors import ProbsftError

    error = None
    try:
        exp.run(detach=True)
    except Exception as exc:
        error = _sbatch_error(exc)
    by_name = {job.id: job for job in exp.jobs}
    for step in record.steps:
        job = by_name.get(step.name)
        details = job.executor.job_details if job is not None else None
        step.job_id = _slurm_job_id(job.handle) if job is not None and job.handle else None
        if details is not None:
            step.job_name = details.job_name or step.job_name
            step.log_dir = details.folder or step.log_dir
    if error is None:
        record.save()
        return
    record.status, record.error = "failed", error
    failed = next((s.name for s in record.steps if s.job_id is None), "?")
    queued = [s.job_id for s in record.steps if s.job_id]
    if queued:
        subprocess.run(["scancel", *queued], capture_output=True, stdin=subprocess.DEVNULL)
    record.save()
    extra = f"; cancelled the jobs already queued ({', '.join(queued)})" if queued else ""
    raise ProbsftError(
        f"sbatch refused the job of step {failed}: {error}{extra}; "
        f"experiment marked failed in {record.exp_dir}"
    )
