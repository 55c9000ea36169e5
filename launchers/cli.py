"""`probsft launch`: plan a NeMo-Run experiment, print it, then run it here, submit it to SLURM
or (``--dryrun``) only write its job scripts; ``status|logs|cancel`` follow a submission."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import shutil
import sys
from pathlib import Path

from probsft_megatron.errors import ConfigError, ProbsftError
from probsft_megatron.launchers import jobs

_PAIRS = {"metavar": "KEY=VALUE"}
#: argparse settings of the options that are not plain strings.
_KWARGS = {
    "target": {"nargs": "*", "metavar": "sweep NAME | status|logs|cancel EXP"},
    "--executor": {"choices": ("local", "slurm"), "default": "local"},
    **dict.fromkeys(
        ("--dryrun", "--detach", "--no-fit-check", "--prepare"), {"action": "store_true"}
    ),
    "--lines": {"type": int, "default": 20},
    **dict.fromkeys(("--nproc", "--nodes"), {"type": int}),
    "--set": {"dest": "overrides", "action": "extend", "nargs": "+", "default": [], **_PAIRS},
    "--hf": {"action": "append", "default": [], "metavar": "[PRESET=]DIR"},
    "--eval-args": {"default": ""},
    "--env": {"action": "append", "default": [], **_PAIRS},
    "--peft": {"choices": ("none", "lora")},
}
#: Every option's help, in the order `--help` lists them.
_HELP = {
    "target": "`sweep NAME` runs a sweep from configs/sweeps (`sweep` lists them); `status EXP`, "
    "`logs EXP [STEP]` and `cancel EXP` act on a submitted SLURM experiment (its folder, "
    "id or title)",
    "--dataset": "math, medical, figfont or custom",
    "--model": "model preset (configs/models), e.g. qwen2.5-7b",
    "--objective": "training objective, e.g. original, p, GeneralFamily-8",
    "--executor": "run here with torchrun (default) or submit to SLURM",
    "--dryrun": "write the job scripts (sbatch for slurm) and print where; launch nothing",
    "--detach": "slurm: return once the jobs are queued instead of waiting for them",
    "--no-fit-check": "submit a training layout even when the memory planner says it will not "
    "fit the GPUs (the profile's gpu_memory_gb)",
    "--lines": "status/logs: how many log lines to show per step (default 20)",
    "--profile": "cluster profile: a name under configs/clusters or a YAML file",
    "--nproc": "training processes per node (local default 1; slurm: the profile's "
    "nproc_per_node, else gpus_per_node, else 1)",
    "--nodes": "training nodes (slurm; default: the profile's)",
    "--set": "training overrides, e.g. optim.lr=4e-5",
    "--hf": "Hugging Face backbone folder to convert (per preset for sweeps over models)",
    "--work-dir": "models/, runs/ and experiments/ go here (local default ./outputs; slurm "
    "default: the profile's work_dir)",
    "--recipe": "recipe to use instead of the (dataset, model) lookup",
    "--eval-task": "eval tasks, comma-separated (default: the dataset's)",
    "--eval-args": "extra `probsft eval` arguments in one string, e.g. '--limit 8 --n 4'",
    "--env": "environment variable for every step",
    "--peft": "lora: every run trains LoRA adapters (peft.method=lora; its export step merges "
    "them into the base for evaluation)",
    "--prepare": "build each run's tokenized store in a step of its own (probsft data prepare, "
    "one CPU process) before its training",
    "--sweep": "same as the positional `sweep NAME`",
    "--only": "sweeps: keep these objectives (comma-separated labels)",
    "--thresholds": "sweeps: percentile -> threshold table (configs/sweeps/thresholds or a file)",
    "--probe-report": "sweeps: resolve percentile thresholds from this probe report",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the launch options on ``parser``."""
    for flag, text in _HELP.items():
        parser.add_argument(flag, help=text, **_KWARGS.get(flag, {}))


def _hf_folders(items: list[str]) -> dict[str, str]:
    """``--hf DIR`` (any model) and ``--hf PRESET=DIR`` as {preset or ANY_MODEL: absolute dir}."""
    from probsft_megatron.config import list_presets
    from probsft_megatron.launchers.experiment import ANY_MODEL

    presets = set(list_presets())
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = (key, value) if sep and key in presets else (ANY_MODEL, item)
        out[key] = os.path.abspath(value)
    return out


def _sweep_ref(args: argparse.Namespace) -> str | None:
    target = args.target
    if (target and target[0] != "sweep") or len(target) > 2:
        raise ConfigError(
            f"unexpected arguments {' '.join(target)!r}; the positional forms "
            "are `probsft launch sweep NAME` and `probsft launch status|logs|cancel "
            "EXPERIMENT` (training overrides follow --set)"
        )
    if len(target) == 2 and args.sweep and args.sweep != target[1]:
        raise ConfigError("give the sweep once: `sweep NAME` or --sweep NAME")
    return target[1] if len(target) == 2 else args.sweep


def _print_sweeps() -> int:
    from probsft_megatron import resources
    from probsft_megatron.launchers.sweeps import load_sweep

    for name in resources.names("sweeps"):
        parts = load_sweep(name)
        runs = sum(len(s.settings) * len(s.objectives) for s in parts)
        combines = "combines " + ", ".join(s.name for s in parts)
        description = parts[0].description if len(parts) == 1 else combines
        print(f"{name:28s} {runs:3d} runs  {description}")
    return 0


def _placement(args: argparse.Namespace):
    """(profile or None, nodes, processes per node, layout check, work dir) of the launch."""
    if args.executor == "local":
        if args.profile or (args.nodes or 1) > 1:
            raise ConfigError("--profile and --nodes apply to --executor slurm only")
        return None, 1, args.nproc or 1, None, args.work_dir or "outputs"
    from probsft_megatron.launchers.slurm import check_layout, list_profiles, load_profile

    if not args.profile:
        raise ConfigError(
            "--executor slurm needs --profile NAME|FILE (profiles in "
            f"configs/clusters: {', '.join(list_profiles()) or 'none'})"
        )
    profile = load_profile(args.profile)
    nodes = args.nodes or profile.nodes
    nproc = args.nproc or profile.processes_per_node()
    if (placeholders := profile.placeholders()) and not args.dryrun:
        raise ConfigError(
            f"cluster profile '{profile.name}' still has placeholders in "
            f"{', '.join(placeholders)}; fill them in before submitting"
        )
    work_dir = args.work_dir or profile.work_dir
    if work_dir is None:
        raise ConfigError(
            f"cluster profile '{profile.name}' has no work_dir; pass "
            "--work-dir DIR on the shared file system"
        )
    return profile, nodes, nproc, functools.partial(check_layout, profile, nodes, nproc), work_dir


def _fit_check(args: argparse.Namespace, profile, nodes: int, nproc: int):
    """:attr:`LaunchOptions.fit_check`: ``plan.check_fits`` for the profile's ``gpu_memory_gb``
    or this CUDA device, or a note of why it is skipped (flag, CPU partition, no size, no CUDA)."""
    from probsft_megatron import hardware

    where = f"cluster profile '{profile.name}'" if profile is not None else ""
    why = None
    if args.no_fit_check:
        why = "--no-fit-check"
    elif profile is not None and not profile.gpus_per_node:
        why = f"{where} is a CPU partition (gpus_per_node: 0)"
    elif profile is not None and profile.gpu_memory_gb is None:
        why = f"{where} has no gpu_memory_gb (set it to check layouts before submission)"
    elif profile is None and not hardware.cuda_available():
        why = "no GPU here (the planner estimates GPU memory, not the host's RAM)"
    if why is not None:
        return lambda name, cfg: f"memory fit check skipped: {why}"
    if profile is not None:
        gpu_memory = float(profile.gpu_memory_gb)
    else:
        import torch

        gpu_memory = torch.cuda.get_device_properties(0).total_memory / 2**30

    def check(name: str, cfg) -> str:
        from probsft_megatron.plan import check_fits

        verdict = check_fits(cfg, nodes * nproc, gpu_memory, gpus_per_node=nproc)
        if not verdict.fits:
            raise ConfigError(f"run {name}: {verdict.message}")
        return f"run {name}: memory {verdict.message}"

    return check


def _requests(args: argparse.Namespace, sweep: str | None):
    """(run requests, notes, experiment title or None) of a single launch or a sweep."""
    from probsft_megatron.launchers.experiment import RunRequest

    if sweep is None:
        if missing := [f"--{k}" for k in ("dataset", "model", "objective") if not getattr(args, k)]:
            raise ConfigError(
                f"missing {', '.join(missing)} (or run a sweep: probsft launch sweep NAME)"
            )
        if args.only or args.thresholds or args.probe_report:
            raise ConfigError("--only, --thresholds and --probe-report apply to sweeps only")
        run = RunRequest(args.dataset, args.model, args.objective, recipe=args.recipe)
        run.overrides = list(args.overrides)
        return [run], [], None
    from probsft_megatron.launchers.sweeps import expand_sweep

    if args.objective or args.recipe:
        raise ConfigError("a sweep sets the objectives and recipes; drop --objective/--recipe")
    only = [o for o in (args.only or "").split(",") if o.strip()]
    keys = ("dataset", "model", "thresholds", "probe_report", "overrides")
    requests, notes = expand_sweep(sweep, only=only, **{k: getattr(args, k) for k in keys})
    return requests, notes, f"sweep-{Path(sweep).stem}"


def _report(mode: str, plan, exp_dir: Path) -> int:
    """Say where the scripts, jobs, results and runs report are; 1 when a local run failed."""
    if mode == "dryrun":
        print(f"dry run: experiment written to {exp_dir}")
        for script in sorted(exp_dir.glob("*_sbatch.sh")):
            print(f"  sbatch script: {script}")
        return 0
    from probsft_megatron import report

    failed = []
    if mode == "submit":
        print(f"submitted {len(plan.steps)} jobs; experiment record and logs: {exp_dir}")
        for s in jobs.ExperimentRecord.load(exp_dir).steps:
            after = f" (after {', '.join(s.after)})" if s.after else ""
            print(f"  job {s.job_id}: {s.name}{after}")
        for r in plan.runs:
            print(f"  {r.name}: results will be in {r.eval_summary}")
    else:
        failed = _print_results({r.name: r.eval_summary for r in plan.runs})
    print(
        f"report: probsft report {plan.work_dir} (writes "
        f"{report.default_out_dir([plan.work_dir]) / 'report.md'}; "
        "`probsft launch status` builds it too)"
    )
    if failed:
        print(
            f"error: {len(failed)} run(s) produced no eval summary; step logs are under {exp_dir}",
            file=sys.stderr,
        )
        return 1
    return 0


def _print_results(summaries: dict[str, Path]) -> list[str]:
    """Print each run's eval summary path (and its summary.md); returns the runs without one."""
    missing = [name for name, summary in summaries.items() if not summary.is_file()]
    for name, summary in summaries.items():
        print(f"{name}: {'missing' if name in missing else 'ok'} {summary}")
        if (summary.parent / "summary.md").is_file():
            print((summary.parent / "summary.md").read_text(), end="")
    return missing


def _status_report(record, states: dict) -> None:
    """Print the work dir's runs report with the jobs' states (one line if it cannot be built)."""
    from probsft_megatron import report

    work_dir = Path(record.exp_dir).parents[2]  # WORK/experiments/<title>/<id>
    step_states = {s.name: states[s.job_id].state for s in record.steps if s.job_id in states}
    logs = {s.name: str(log) for s in record.steps if (log := s.log_path()) is not None}
    try:
        rep = report.build_report([work_dir], step_states=step_states, step_logs=logs)
    except ProbsftError as exc:
        print(f"report: not built ({exc})")
        return
    print("", *report.format_tables(rep, heading=""), sep="\n")
    print(f"report: {report.default_out_dir([work_dir]) / 'report.md'}")


def _job_command(args: argparse.Namespace) -> int:
    """`probsft launch status|logs|cancel EXPERIMENT [STEP]` on a submitted experiment."""
    command, rest = args.target[0], args.target[1:]
    if not rest or len(rest) > (2 if command == "logs" else 1):
        usage = "logs EXPERIMENT [STEP]" if command == "logs" else f"{command} EXPERIMENT"
        raise ConfigError(
            f"usage: probsft launch {usage} (EXPERIMENT: the folder that "
            "`probsft launch` printed, an experiment id or a title)"
        )
    if args.lines < 1:
        raise ConfigError(f"--lines must be >= 1 (got {args.lines})")
    roots = [args.work_dir]
    if args.profile:
        from probsft_megatron.launchers.slurm import load_profile

        roots.append(load_profile(args.profile).work_dir)
    roots = [root for root in (*roots, "outputs") if root]
    record = jobs.ExperimentRecord.load(jobs.find_experiment(rest[0], roots))
    if command == "cancel":
        jobs.cancel(record)
        return 0
    if command == "status":
        states = jobs.job_states(s.job_id for s in record.steps if s.job_id)
        code = jobs.report(record, states, lines=args.lines)
        _status_report(record, states)
        return code
    steps = [record.step(rest[1])] if len(rest) == 2 else record.steps
    for step in steps:
        log = step.log_path()
        print(f"==> {step.name} (job {step.job_id or '-'}): {log or 'no log yet'}")
        for row in jobs.tail(log, args.lines):
            print(row)
    return 0


def _wait_and_report(exp_dir: Path) -> int:
    """Follow a submitted experiment until its jobs end; 1 when a step failed."""
    record = jobs.ExperimentRecord.load(exp_dir)
    print(
        f"waiting for {len(record.steps)} jobs (Ctrl-C stops waiting; the jobs keep running; "
        f"`probsft launch status {exp_dir}` shows them)",
        flush=True,
    )
    try:
        states = jobs.wait(record)
    except KeyboardInterrupt:
        print(
            f"\nstopped waiting; the jobs keep running: probsft launch status|logs|cancel "
            f"{exp_dir}",
            file=sys.stderr,
        )
        return 130
    print()
    code = jobs.report(record, states)
    if code == 0:
        _print_results({name: Path(run["eval_summary"]) for name, run in record.runs.items()})
    else:
        print(
            f"error: experiment {record.exp_id} failed; see the step logs above "
            f"(probsft launch logs {exp_dir} STEP)",
            file=sys.stderr,
        )
    return code


def run(args: argparse.Namespace) -> int:
    """Plan, print and dry-run / run / submit the experiment; returns the exit code."""
    if args.target and args.target[0] in ("status", "logs", "cancel"):
        return _job_command(args)  # reads files and asks SLURM: no heavy imports
    from probsft_megatron.launchers import experiment as ex

    if args.peft:  # a whole launch or sweep on adapters (or not)
        args.overrides = [*args.overrides, f"peft.method={args.peft}"]
    sweep = _sweep_ref(args)
    if args.target == ["sweep"] and sweep is None:
        return _print_sweeps()
    for flag, value in (("nproc", args.nproc), ("nodes", args.nodes)):
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} must be >= 1 (got {value})")
    profile, nodes, nproc, layout_check, work_dir = _placement(args)
    if profile is not None and not args.dryrun and shutil.which("sbatch") is None:
        raise ConfigError(
            "--executor slurm submits its jobs with sbatch, which is not on PATH here; run "
            "probsft launch on a SLURM login node (where sbatch, squeue and sacct are), or "
            "pass --dryrun to write the job scripts only"
        )
    if "<" in work_dir and ">" in work_dir:
        raise ConfigError(f"work directory {work_dir!r} is a placeholder; pass --work-dir DIR")
    from probsft_megatron.manifest import writable_folder

    if (problem := writable_folder(work_dir)) is not None:
        raise ConfigError(f"work directory {work_dir} {problem}; pass --work-dir DIR (a folder)")
    hf = _hf_folders(args.hf)
    try:
        eval_args = shlex.split(args.eval_args)
    except ValueError as exc:
        raise ConfigError(
            f"--eval-args {args.eval_args!r} cannot be split into arguments "
            f"({exc}); quote it as one string, e.g. --eval-args '--limit 8'"
        ) from None
    if args.eval_task is not None:  # each name is a task of probsft eval, before any write
        from probsft_megatron.eval.tasks import get_task

        for name in args.eval_task.split(","):
            get_task(name.strip())
    for item in args.env:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"--env {item!r} must look like KEY=VALUE")
    options = ex.LaunchOptions(
        work_dir=os.path.abspath(work_dir),
        world_size=nodes * nproc,
        hf=hf,
        env=dict(item.split("=", 1) for item in args.env),
        eval_tasks=args.eval_task,
        eval_args=eval_args,
        layout_check=layout_check,
        fit_check=_fit_check(args, profile, nodes, nproc),
        prepare=args.prepare,
    )
    requests, notes, title = _requests(args, sweep)
    plan = ex.plan_experiment(title, requests, options)
    plan.notes[:0] = notes
    missing = [f for f in hf.values() if not os.path.isfile(os.path.join(f, "config.json"))]
    if missing and not args.dryrun:  # a dry run may name paths of another machine
        raise ConfigError(
            f"--hf {missing[0]} is not a Hugging Face folder (no config.json); "
            "name the backbone's checkpoint folder"
        )
    print(plan.describe(nodes, nproc), flush=True)
    if profile is None:
        executor_for = functools.partial(ex.local_executor, nproc_per_node=nproc)
        agent_args = None  # one node: the default of ex.step_command
    else:
        from probsft_megatron.launchers import slurm

        job_dir = str(Path(plan.work_dir) / "experiments")
        executor_for = functools.partial(
            slurm.slurm_executor, profile, job_dir=job_dir, nodes=nodes, nproc_per_node=nproc
        )
        agent_args = slurm.agent_args(profile, nodes, nproc)
    mode = "dryrun" if args.dryrun else ("run" if profile is None else "submit")
    if args.detach and mode != "submit":
        raise ConfigError(
            "--detach applies to a SLURM submission (--executor slurm without --dryrun)"
        )
    exp_dir = ex.execute(plan, executor_for, mode, agent_args)
    code = _report(mode, plan, exp_dir)
    return _wait_and_report(exp_dir) if mode == "submit" and not args.detach else code
