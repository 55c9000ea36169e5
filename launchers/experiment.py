"""From (dataset, model, objective) to one NeMo-Run experiment: convert -> [prepare] -> train ->
export -> eval, planned as plain data (:class:`ExperimentPlan`), then run by :func:`execute`."""

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
from datetime import datetime
from pathlib import Path
from typing import Any

from probsft_megatron.config import TrainJobConfig, list_recipes, load_config, load_preset, load_raw
from probsft_megatron.errors import ConfigError, ProbsftError
from probsft_megatron.launchers import jobs
from probsft_megatron.objectives import parse_objective
from probsft_megatron.tokenizers import tokenizer_spec

DATASETS = ("math", "medical", "figfont", "custom")
#: Evaluation tasks of each dataset (the paper's math protocol for math).
EVAL_TASKS = {**{d: d for d in DATASETS}, "math": "math500,minerva_math,olympiadbench,aime24,amc23"}
CLI_MODULE = "probsft_megatron.cli"
TRAIN_MODULE = "probsft_megatron.train"
STEPS_MODULE = "probsft_megatron.launchers.steps"
#: torchrun's agent for training, keeping the stop signals and exit codes (agent.py).
AGENT_MODULE = "probsft_megatron.launchers.agent"
#: Key of :attr:`LaunchOptions.hf` for a Hugging Face folder given without a preset name.
ANY_MODEL = "*"


@dataclass
class Step:
    """``python -m module *args`` with ``env`` added; ``kind``: convert, prepare, train (torchrun
    on every node), export or eval; ``after``: steps that must succeed first."""

    name: str
    kind: str
    module: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        return ["python", "-m", self.module, *self.args]


@dataclass
class RunRequest:
    """One (dataset, model, objective) chain; ``label`` names its run (default: the objective's
    canonical name), ``overrides`` are dotted training overrides."""

    dataset: str
    model: str
    objective: str
    label: str | None = None
    overrides: list[str] = field(default_factory=list)
    recipe: str | None = None


@dataclass
class LaunchOptions:
    """Settings shared by every run of an experiment."""

    work_dir: str  # models/, runs/ and experiments/ (NeMo-Run records, sbatch scripts)
    world_size: int = 1  # training processes the configs are validated for
    hf: dict[str, str] = field(default_factory=dict)  # HF backbone per preset (or ANY_MODEL)
    env: dict[str, str] = field(default_factory=dict)  # added to every step
    eval_tasks: str | None = None  # comma-separated; default EVAL_TASKS[dataset]
    eval_args: list[str] = field(default_factory=list)  # extra `probsft eval` arguments
    #: Called with (TP, PP) of each run before its config is validated (cluster profiles).
    layout_check: Callable[[int, int], None] | None = None
    #: Memory planner's check of (run name, validated config): a note, or ConfigError (no fit).
    fit_check: Callable[[str, TrainJobConfig], str] | None = None
    #: Add a `probsft data prepare` step (one CPU process) per distinct data setting.
    prepare: bool = False


@dataclass
class RunPlan:
    """One run: what it trains and where its outputs land (the run record's entry)."""

    name: str
    dataset: str
    model: str
    objective: str  # canonical name
    recipe: str
    run_dir: str
    hf_dir: str = field(init=False)
    eval_dir: str = field(init=False)
    overrides: list[str] = field(default_factory=list)
    layout: dict[str, int] = field(default_factory=dict)  # world size and parallel sizes
    config: dict[str, Any] = field(default_factory=dict)  # the config as validated at launch

    def __post_init__(self) -> None:
        self.hf_dir = str(Path(self.run_dir) / "hf")
        self.eval_dir = str(Path(self.run_dir) / "eval")

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
        """One line per note, and per step its command."""
        lines = [f"experiment {self.title}: {len(self.steps)} steps, {len(self.runs)} run(s)"]
        lines += [f"note: {n}" for n in dict.fromkeys(self.notes)]
        agent = f"python -m {AGENT_MODULE} --nnodes {nodes} --nproc-per-node {nproc_per_node}"
        for step in self.steps:
            argv = [*agent.split(), *step.argv()[1:]] if step.kind == "train" else step.argv()
            after = f" (after {', '.join(step.after)})" if step.after else ""
            lines.append(f"  [{step.name}]{after}\n    {shlex.join(argv)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RecipeChoice:
    """The recipe a run uses, overrides that adapt it to the run's model, and why."""

    ref: str
    overrides: tuple[str, ...] = ()
    note: str | None = None


def _recipe_identity(raw: dict[str, Any]) -> tuple[str, str | None]:
    """(dataset, model preset) that a raw recipe trains."""
    data, model = raw.get("data") or {}, raw.get("model")
    dataset = {"numina": "math", "m23k": "medical"}.get(data.get("format"), "custom")
    dataset = "figfont" if data.get("source") == "figfont" else dataset
    model = model.get("preset") if isinstance(model, dict) else model
    return dataset, model if isinstance(model, str) else None


def _model_size(preset: str) -> float:
    """Rough parameter count of a preset (enough to rank models by size)."""
    m = load_preset(preset)
    h, ffn = m.get("hidden_size", 0), m.get("ffn_hidden_size", 0)
    return m.get("num_layers", 0) * (4 * h * h + 3 * h * ffn) + m.get("vocab_size", 0) * h


def resolve_recipe(dataset: str, model: str, explicit: str | None = None) -> RecipeChoice:
    """The recipe of (dataset, model): ``explicit``, else ``<dataset>-<model>``, else any
    recipe training that model on that dataset, else (with a note) the dataset's recipe for
    the nearest model size with the model swapped in. Raises ConfigError when none fits."""
    if explicit is not None:
        trains, trained_model = _recipe_identity(load_raw(explicit))
        if trains != dataset:
            raise ConfigError(
                f"recipe {explicit!r} trains on {trains} data, not "
                f"{dataset}; pass the matching --dataset"
            )
        return RecipeChoice(explicit, () if trained_model == model else (f"model={model}",))
    identity = {name: _recipe_identity(load_raw(name)) for name in list_recipes()}
    exact = f"{dataset}-{model}"
    matches = [name for name, ident in identity.items() if ident == (dataset, model)]
    if matches:
        return RecipeChoice(exact if exact in matches else matches[0])
    generic = [n for n, (d, m) in identity.items() if d == dataset and m and n == f"{d}-{m}"]
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


def safe_name(text: str) -> str:
    """``text`` reduced to characters safe in file and SLURM job names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


@dataclass
class _Planner:
    """Adds each run's steps to ``plan``; runs share conversions and prepare steps."""

    plan: ExperimentPlan
    options: LaunchOptions
    converts: dict[str, str] = field(default_factory=dict)  # model dir -> convert step name
    prepares: dict[str, str] = field(default_factory=dict)  # data settings -> prepare step

    def backbone(self, run: RunPlan, cfg: TrainJobConfig, hf: str | None) -> list[str]:
        """Add a convert step of ``hf`` and ``init.checkpoint`` if needed; the steps to wait for."""
        notes, model, name, recipe = self.plan.notes, run.model, run.name, run.recipe
        megatron = cfg.init.checkpoint
        if megatron is None and hf:
            megatron = str(Path(self.options.work_dir) / "models" / model)
            run.overrides.append(f"init.checkpoint={megatron}")
        if megatron is None:
            if cfg.peft.enabled:  # adapters of a random base: nothing on disk to merge them into
                raise ConfigError(
                    f"run {name}: peft.method=lora adapts a base model, but recipe {recipe} "
                    f"starts from random weights; pass --hf DIR (the {model} Hugging Face "
                    "folder) or --set init.checkpoint=MEGATRON_DIR"
                )
            if not cfg.init.tokenizer:
                raise ConfigError(
                    f"run {name}: recipe {recipe} starts from no checkpoint; pass --hf DIR "
                    f"(the {model} Hugging Face folder) or --set init.checkpoint=MEGATRON_DIR"
                )
            notes.append(
                f"run {name} trains {model} from random initialization "
                f"(no init.checkpoint, no --hf; tokenizer {cfg.init.tokenizer})"
            )
            return []
        if (Path(megatron) / "model_config.json").is_file():
            notes.append(f"using the existing Megatron model dir {megatron} (no conversion)")
            return []
        if not hf:
            notes.append(
                f"run {name}: init.checkpoint {megatron} is not a Megatron model dir "
                "on this machine; it must exist where the job runs (or pass --hf)"
            )
            return []
        if megatron not in self.converts:
            step_name = safe_name(f"convert-{model}")
            while any(s.name == step_name for s in self.plan.steps):
                step_name += "_"
            self.converts[megatron] = step_name
            args = ["convert", "hf-to-megatron", "--hf", hf, "--out", megatron]
            self.plan.steps.append(Step(step_name, "convert", CLI_MODULE, args))
        return [self.converts[megatron]]

    def prepare(self, run: RunPlan, cfg: TrainJobConfig, after: list[str], hf: str | None):
        """Add ``probsft data prepare`` once per (data settings, tokenizer); steps to wait for."""
        if not cfg.data.cache:
            self.plan.notes.append(
                f"run {run.name}: data.cache is false, so there is no store to prepare"
            )
            return after
        # a backbone converted from --hf: the conversion copies its tokenizer unchanged, and
        # the store is keyed by the tokenizer's content
        tokenizer = tokenizer_spec(cfg.init) or hf
        key = repr((sorted(asdict(cfg.data).items()), tokenizer))
        if key not in self.prepares:
            name = self.prepares[key] = safe_name(f"prepare-{run.name}")
            data = [o for o in run.overrides if o.strip().startswith("data.")]
            args = ["data", "prepare", "--config", run.recipe, "--tokenizer", tokenizer, *data]
            self.plan.steps.append(Step(name, "prepare", CLI_MODULE, args, after=after))
        return [*after, self.prepares[key]]


def plan_experiment(
    title: str | None, requests: list[RunRequest], options: LaunchOptions
) -> ExperimentPlan:
    """Plan ``requests`` (one chain each, conversions shared by model) as experiment ``title``
    (None: its first run's name). Raises ConfigError for an unknown dataset, preset, objective
    or recipe key, an impossible layout, a missing backbone, or two runs of one name."""
    work = Path(options.work_dir)
    plan = ExperimentPlan(title=safe_name(title or ""), work_dir=str(work), steps=[], runs=[])
    planner = _Planner(plan, options)
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
        overrides = [*choice.overrides, f"loss.objective={objective}"]
        overrides += [f"train.output_dir={run_dir}", *req.overrides]
        cfg = load_config(choice.ref, overrides)
        if cfg.train.output_dir != str(run_dir):
            raise ConfigError(
                "train.output_dir is chosen by the launcher (WORK_DIR/runs/NAME); "
                "remove it from --set and choose --work-dir instead"
            )
        if options.layout_check is not None:
            p = cfg.parallel
            options.layout_check(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
        cfg.validate(options.world_size)
        if options.fit_check is not None:
            plan.notes.append(options.fit_check(name, cfg))
        config = cfg.to_dict()
        layout = {"world_size": options.world_size, **config.get("parallel", {})}
        run = RunPlan(name, req.dataset, req.model, objective, choice.ref, str(run_dir))
        run.overrides, run.layout, run.config = overrides, layout, config
        hf = options.hf.get(req.model, options.hf.get(ANY_MODEL))
        after = planner.backbone(run, cfg, hf)
        if options.prepare:
            after = planner.prepare(run, cfg, after, hf)
        tasks = options.eval_tasks or EVAL_TASKS[req.dataset]
        has_data = any(a == "--data" or a.startswith("--data=") for a in options.eval_args)
        if {"medical", "custom"} & set(tasks.split(",")) and not has_data:
            raise ConfigError(
                f"eval task(s) {tasks} read a local jsonl; pass "
                "--eval-args '--data FILE' (and fields, see probsft eval --help)"
            )
        plan.runs.append(run)
        export = ["export", "--train-dir", run.run_dir, "--out", run.hf_dir]
        # --overwrite: a requeued or re-launched step redoes its own eval
        evaluate = ["eval", "--model", run.hf_dir, "--task", tasks, "--out", run.eval_dir]
        evaluate += ["--overwrite", *options.eval_args]
        train = ["--config", choice.ref, *overrides]
        plan.steps += [
            Step(f"train-{name}", "train", TRAIN_MODULE, train, after=after),
            Step(f"export-{name}", "export", STEPS_MODULE, export, after=[f"train-{name}"]),
            Step(f"eval-{name}", "eval", CLI_MODULE, evaluate, after=[f"export-{name}"]),
        ]
    for step in plan.steps:
        step.env = dict(options.env)
    plan.title = plan.title or plan.runs[0].name
    return plan


def import_nemo_run() -> Any:
    """``nemo_run``, imported without the deprecation warnings of its optional server stack."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nemo_run
    return nemo_run


def local_executor(kind: str, nproc_per_node: int) -> Any:
    """A NeMo-Run ``LocalExecutor`` for a step of ``kind`` (``train``: ``nproc_per_node`` tasks);
    this interpreter's folder leads ``PATH`` so that ``python`` is the one of this environment."""
    run = import_nemo_run()
    env = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    if kind != "train":
        return run.LocalExecutor(env_vars=env)
    return run.LocalExecutor(ntasks_per_node=nproc_per_node, env_vars={**env, "LOGLEVEL": "INFO"})


def single_node_agent_args(nproc_per_node: int) -> list[str]:
    """torchrun options on one node: a local rendezvous, every rank's output kept (``--tee``)."""
    return ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc_per_node), "--tee", "3"]


def step_command(
    step: Step, executor: Any, agent_args: list[str] | None = None
) -> tuple[str, list[str]]:
    """(module, arguments) that ``executor`` runs for ``step`` (``train``: the agent with
    ``agent_args``, default one node). A SLURM step's arguments are shell-quoted for its batch
    script (the agent's ``$`` words are not); a local step gets its argv as is (no shell)."""
    slurm = isinstance(executor, import_nemo_run().SlurmExecutor)
    args = [shlex.quote(a) for a in step.args] if slurm else list(step.args)
    if step.kind != "train":
        return step.module, args
    agent_args = agent_args or single_node_agent_args(executor.nproc_per_node())
    return AGENT_MODULE, [*agent_args, "-m", step.module, *args]


def execute(
    plan: ExperimentPlan,
    executor_for: Callable[[str], Any],
    mode: str,
    agent_args: list[str] | None = None,
) -> Path:
    """Turn ``plan`` into a NeMo-Run experiment, return its folder; ``mode``: ``dryrun`` (job
    scripts only), ``run`` (local, steps in plan order) or ``submit`` (SLURM, a job per step
    after its ``after`` jobs). Writes the run record (a local run's when it ends, however)."""
    run = import_nemo_run()
    exp_id = f"{plan.title}_{time.time_ns()}"
    exp_dir = Path(plan.work_dir) / "experiments" / plan.title / exp_id
    status = {"dryrun": "dry run", "run": "launched", "submit": "submitted"}[mode]
    runs = {r.name: {**asdict(r), "eval_summary": str(r.eval_summary)} for r in plan.runs}
    record = jobs.ExperimentRecord(plan.title, exp_id, str(exp_dir), status, [], runs)
    record.command = ["probsft", *sys.argv[1:]]
    record.submitted_at = datetime.now().astimezone().isoformat(timespec="seconds")
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
        ids: dict[str, str] = {}  # step name -> NeMo-Run job id
        for step in plan.steps:
            executor = executor_for(step.kind)
            record.executor = "slurm" if isinstance(executor, run.SlurmExecutor) else "local"
            module, args = step_command(step, executor, agent_args)
            log_dir, command = str(exp_dir / step.name), ["python", "-m", module, *args]
            launched = (step.name, step.kind, list(step.after), None, step.name, log_dir, command)
            record.steps.append(jobs.LaunchedStep(*launched))
            script = run.Script(
                path=module, args=args, env=dict(step.env), entrypoint="python", m=True
            )
            deps = [ids[a] for a in step.after] if mode == "submit" else None
            ids[step.name] = exp.add(script, executor=executor, name=step.name, dependencies=deps)
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


def _sbatch_error(exc: BaseException) -> str:
    """sbatch's own error lines on one line, from the exception NeMo-Run let through."""
    seen = exc
    while seen is not None:
        stderr = getattr(getattr(seen, "result", None), "stderr", None)
        if stderr:
            errors = [ln for ln in stderr.splitlines() if "error" in ln.lower()]
            return jobs.one_line("\n".join(errors) or stderr)
        seen = seen.__cause__ or seen.__context__  # invoke's UnexpectedExit may be a cause
    return f"{type(exc).__name__}: {jobs.one_line(str(exc))}"


def _submit(record: Any, exp: Any) -> None:
    """Queue every step's job and fill in ``record``'s job ids and log folders; a job sbatch
    refuses cancels those queued, marks the record failed and raises ProbsftError."""
    error = None
    try:
        exp.run(detach=True)
    except Exception as exc:
        error = _sbatch_error(exc)
    by_name = {job.id: job for job in exp.jobs}
    for step in record.steps:
        if (job := by_name.get(step.name)) is None:
            continue
        # a NeMo-Run app handle: slurm_tunnel://nemo_run/<job id>[/...]
        parts = (job.handle or "").partition("://")[2].split("/")
        step.job_id = parts[1] if len(parts) > 1 and parts[1] else None
        details = job.executor.job_details
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
