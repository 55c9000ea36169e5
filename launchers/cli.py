"""`probsft launch`: one command from (dataset, model, objective) to evaluated results.

    probsft launch --dataset figfont --model qwen2.5-7b --objective p --hf /models/Qwen2.5-7B
    probsft launch --dataset math --model qwen2.5-7b --objective p --executor slurm \
        --profile mycluster --hf /models/Qwen2.5-7B \
        --set data.train_files=[/data/numina.jsonl] --dryrun
    probsft launch sweep convexity-math --executor slurm --profile mycluster \
        --hf /models/Qwen2.5-Math-1.5B ...
    probsft launch sweep                      # list the sweeps
    probsft launch status|logs|cancel EXPERIMENT   # a submitted SLURM experiment

Builds one NeMo-Run experiment (convert -> train -> export -> eval for every run), prints its
steps, then runs it here (``--executor local``: torchrun on this node, waiting for the end),
submits it (``--executor slurm``: one job per step, chained by dependencies, then waits for
the jobs with a progress display unless ``--detach``), or with ``--dryrun`` only writes the
job scripts and says where.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from probsft_megatron.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the launch options on ``parser``."""
    parser.add_argument(
        "target",
        nargs="*",
        metavar="sweep NAME | status|logs|cancel EXP",
        help="`sweep NAME` runs a sweep from configs/sweeps (`sweep` lists "
        "them); `status EXP`, `logs EXP [STEP]` and `cancel EXP` act on a "
        "submitted SLURM experiment (its folder, id or title)",
    )
    parser.add_argument("--dataset", help="math, medical, figfont or custom")
    parser.add_argument("--model", help="model preset (configs/models), e.g. qwen2.5-7b")
    parser.add_argument("--objective", help="training objective, e.g. original, p, GeneralFamily-8")
    parser.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default="local",
        help="run here with torchrun (default) or submit to SLURM",
    )
    parser.add_argument(
        "--dryrun",
        action="store_true",
        help="write the job scripts (sbatch for slurm) and print where; launch nothing",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="slurm: return once the jobs are queued instead of waiting for them",
    )
    parser.add_argument(
        "--no-fit-check",
        action="store_true",
        help="submit a training layout even when the memory planner says it "
        "will not fit the GPUs (the profile's gpu_memory_gb)",
    )
    parser.add_argument(
        "--lines",
        type=int,
        default=20,
        help="status/logs: how many log lines to show per step (default 20)",
    )
    parser.add_argument(
        "--profile", help="cluster profile: a name under configs/clusters or a YAML file"
    )
    parser.add_argument(
        "--nproc",
        type=int,
        help="training processes per node (local default 1; slurm: the profile's "
        "nproc_per_node, else gpus_per_node, else 1)",
    )
    parser.add_argument("--nodes", type=int, help="training nodes (slurm; default: the profile's)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="training overrides, e.g. optim.lr=4e-5",
    )
    parser.add_argument(
        "--hf",
        action="append",
        default=[],
        metavar="[PRESET=]DIR",
        help="Hugging Face backbone folder to convert (per preset for sweeps over models)",
    )
    parser.add_argument(
        "--work-dir",
        help="models/, runs/ and experiments/ go here (local default ./outputs; "
        "slurm default: the profile's work_dir)",
    )
    parser.add_argument("--recipe", help="recipe to use instead of the (dataset, model) lookup")
    parser.add_argument("--eval-task", help="eval tasks, comma-separated (default: the dataset's)")
    parser.add_argument(
        "--eval-args",
        default="",
        help="extra `probsft eval` arguments in one string, e.g. '--limit 8 --n 4'",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for every step",
    )
    parser.add_argument(
        "--peft",
        choices=("none", "lora"),
        help="lora: every run trains LoRA adapters (peft.method=lora; its export step merges "
        "them into the base for evaluation)",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="build each run's tokenized store in a step of its own (probsft data prepare, "
        "one CPU process) before its training",
    )
    parser.add_argument("--sweep", help="same as the positional `sweep NAME`")
    parser.add_argument("--only", help="sweeps: keep these objectives (comma-separated labels)")
    parser.add_argument(
        "--thresholds",
        help="sweeps: percentile -> threshold table (configs/sweeps/thresholds or a file)",
    )
    parser.add_argument(
        "--probe-report", help="sweeps: resolve percentile thresholds from this probe report"
    )


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def _hf_folders(items: list[str]) -> dict[str, str]:
    """``--hf DIR`` (any model) and ``--hf PRESET=DIR`` as {preset or ANY_MODEL: absolute dir}."""
    from probsft_megatron.config import list_presets
    from probsft_megatron.launchers.experiment import ANY_MODEL

    presets = set(list_presets())
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key in presets:
            out[key] = os.path.abspath(value)
        else:
            out[ANY_MODEL] = os.path.abspath(item)
    return out


JOB_COMMANDS = ("status", "logs", "cancel")


def _sweep_ref(args: argparse.Namespace) -> str | None:
    target = list(args.target)
    if (target and target[0] != "sweep") or len(target) > 2:
        raise ConfigError(
            f"unexpected arguments {' '.join(target)!r}; the positional forms "
            "are `probsft launch sweep NAME` and `probsft launch status|logs|cancel "
            "EXPERIMENT` (training overrides follow --set)"
        )
    if len(target) == 2:
        if args.sweep and args.sweep != target[1]:
            raise ConfigError("give the sweep once: `sweep NAME` or --sweep NAME")
        return target[1]
    return args.sweep


def _print_sweeps() -> int:
    from probsft_megatron.launchers.sweeps import list_sweeps, load_sweep

    for name in list_sweeps():
        parts = load_sweep(name)
        runs = sum(len(s.settings) * len(s.objectives) for s in parts)
        description = (
            parts[0].description
            if len(parts) == 1
            else "combines " + ", ".join(s.name for s in parts)
        )
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
    placeholders = profile.placeholders()
    if placeholders and not args.dryrun:
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

    def layout_check(tp: int, pp: int) -> None:
        check_layout(profile, nodes, nproc, tp, pp)

    return profile, nodes, nproc, layout_check, work_dir


def _fit_check(args: argparse.Namespace, profile, nodes: int, nproc: int):
    """The memory planner's check of each run's training layout before anything is written
    or submitted (:func:`probsft_megatron.plan.check_fits`, on the meta device): a callable
    (run name, config) -> the plan's note line, raising :class:`ConfigError` (the planner's
    line: the recommended layout and ``--no-fit-check``) for a layout that will not fit.

    The GPU size is the profile's ``gpu_memory_gb`` (SLURM) or this machine's CUDA device
    (local). Skipped, saying so, with ``--no-fit-check``, on a CPU partition
    (``gpus_per_node: 0``), for a profile without ``gpu_memory_gb`` and locally without CUDA:
    the planner estimates GPU memory, not a host's RAM."""

    def skipped(why: str):
        return lambda name, cfg: f"memory fit check skipped: {why}"

    if args.no_fit_check:
        return skipped("--no-fit-check")
    if profile is not None:
        if not profile.gpus_per_node:
            return skipped(
                f"cluster profile '{profile.name}' is a CPU partition (gpus_per_node: 0)"
            )
        if profile.gpu_memory_gb is None:
            return skipped(
                f"cluster profile '{profile.name}' has no gpu_memory_gb (set it to "
                "check layouts before submission)"
            )
        gpu_memory = float(profile.gpu_memory_gb)
    else:
        from probsft_megatron import hardware

        if not hardware.cuda_available():
            return skipped("no GPU here (the planner estimates GPU memory, not the host's RAM)")
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
        missing = [f"--{k}" for k in ("dataset", "model", "objective") if not getattr(args, k)]
        if missing:
            raise ConfigError(
                f"missing {', '.join(missing)} (or run a sweep: probsft launch sweep NAME)"
            )
        if args.only or args.thresholds or args.probe_report:
            raise ConfigError("--only, --thresholds and --probe-report apply to sweeps only")
        return (
            [
                RunRequest(
                    args.dataset,
                    args.model,
                    args.objective,
                    overrides=list(args.overrides),
                    recipe=args.recipe,
                )
            ],
            [],
            None,
        )
    from probsft_megatron.launchers.sweeps import expand_sweep

    if args.objective or args.recipe:
        raise ConfigError("a sweep sets the objectives and recipes; drop --objective/--recipe")
    requests, notes = expand_sweep(
        sweep,
        dataset=args.dataset,
        model=args.model,
        only=[o for o in (args.only or "").split(",") if o.strip()],
        thresholds=args.thresholds,
        probe_report=args.probe_report,
        overrides=args.overrides,
    )
    return requests, notes, f"sweep-{Path(sweep).stem}"


def _report(mode: str, plan, exp_dir: Path) -> int:
    """Say where the scripts, jobs or results are; exit code 1 when a local run failed."""
    if mode == "dryrun":
        print(f"dry run: experiment written to {exp_dir}")
        for script in sorted(exp_dir.glob("*_sbatch.sh")):
            print(f"  sbatch script: {script}")
        return 0
    if mode == "submit":
        from probsft_megatron.launchers.jobs import ExperimentRecord

        record = ExperimentRecord.load(exp_dir)
        print(f"submitted {len(plan.steps)} jobs; experiment record and logs: {exp_dir}")
        for s in record.steps:
            after = f" (after {', '.join(s.after)})" if s.after else ""
            print(f"  job {s.job_id}: {s.name}{after}")
        for r in plan.runs:
            print(f"  {r.name}: results will be in {r.eval_summary}")
        _report_hint(plan.work_dir)
        return 0
    failed = [r for r in plan.runs if not r.eval_summary.is_file()]
    for r in plan.runs:
        print(f"{r.name}: {'missing' if r in failed else 'ok'} {r.eval_summary}")
        summary_md = Path(r.eval_dir) / "summary.md"
        if summary_md.is_file():
            print(summary_md.read_text(), end="")
    _report_hint(plan.work_dir)
    if failed:
        print(
            f"error: {len(failed)} run(s) produced no eval summary; step logs are under {exp_dir}",
            file=sys.stderr,
        )
        return 1
    return 0


def _report_hint(work_dir: str) -> None:
    """Where the experiment's runs report (``probsft report``) goes."""
    from probsft_megatron import report

    out = report.default_out_dir([work_dir])
    print(
        f"report: probsft report {work_dir} (writes {out / 'report.md'}; "
        "`probsft launch status` builds it too)"
    )


def _status_report(record, states: dict) -> None:
    """Build the work directory's runs report (``probsft report``) with the jobs' states and
    print its tables; a report that cannot be built yet (no run started) is one line."""
    from probsft_megatron import report
    from probsft_megatron.errors import ProbsftError

    work_dir = Path(record.exp_dir).parents[2]  # WORK/experiments/<title>/<id>
    step_states = {s.name: states[s.job_id].state for s in record.steps if s.job_id in states}
    logs = {s.name: str(log) for s in record.steps if (log := s.log_path()) is not None}
    try:
        rep = report.build_report([work_dir], step_states=step_states, step_logs=logs)
    except ProbsftError as exc:
        print(f"report: not built ({exc})")
        return
    print()
    for line in report.format_tables(rep, heading=""):
        print(line)
    print(f"report: {report.default_out_dir([work_dir]) / 'report.md'}")


def _job_command(args: argparse.Namespace) -> int:
    """`probsft launch status|logs|cancel EXPERIMENT [STEP]` on a submitted experiment."""
    from probsft_megatron.launchers import jobs

    command, rest = args.target[0], args.target[1:]
    if not rest or len(rest) > (2 if command == "logs" else 1):
        usage = "logs EXPERIMENT [STEP]" if command == "logs" else f"{command} EXPERIMENT"
        raise ConfigError(
            f"usage: probsft launch {usage} (EXPERIMENT: the folder that "
            "`probsft launch` printed, an experiment id or a title)"
        )
    if args.lines < 1:
        raise ConfigError(f"--lines must be >= 1 (got {args.lines})")
    roots = [args.work_dir] if args.work_dir else []
    if args.profile:
        from probsft_megatron.launchers.slurm import load_profile

        work_dir = load_profile(args.profile).work_dir
        if work_dir:
            roots.append(work_dir)
    roots.append("outputs")
    record = jobs.ExperimentRecord.load(jobs.find_experiment(rest[0], roots))
    if command == "cancel":
        jobs.cancel(record)
        return 0
    if command == "status":
        states = jobs.job_states(s.job_id for s in record.steps if s.job_id)
        code = jobs.report(record, states, sys.stdout, lines=args.lines)
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
    from probsft_megatron.launchers import jobs

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
    code = jobs.report(record, states, sys.stdout)
    if code == 0:
        for name, run in record.runs.items():
            print(f"{name}: ok {run['eval_summary']}")
            summary_md = Path(run["eval_summary"]).parent / "summary.md"
            if summary_md.is_file():
                print(summary_md.read_text(), end="")
    else:
        print(
            f"error: experiment {record.exp_id} failed; see the step logs above "
            f"(probsft launch logs {exp_dir} STEP)",
            file=sys.stderr,
        )
    return code


def run(args: argparse.Namespace) -> int:
    """Plan, print and dry-run / run / submit the experiment; returns the exit code."""
    if args.target and args.target[0] in JOB_COMMANDS:
        return _job_command(args)  # reads files and asks SLURM: no heavy imports
    from probsft_megatron.launchers import experiment as ex

    if getattr(args, "peft", None):  # a whole launch or sweep on adapters (or not)
        args.overrides = [*args.overrides, f"peft.method={args.peft}"]
    sweep = _sweep_ref(args)
    if args.target == ["sweep"] and sweep is None:
        return _print_sweeps()
    for flag in ("nproc", "nodes"):
        value = getattr(args, flag)
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

    problem = writable_folder(work_dir)
    if problem is not None:
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
    options = ex.LaunchOptions(
        work_dir=os.path.abspath(work_dir),
        world_size=nodes * nproc,
        hf=hf,
        env=_pairs(args.env, "--env"),
        eval_tasks=args.eval_task,
        eval_args=eval_args,
        layout_check=layout_check,
        fit_check=_fit_check(args, profile, nodes, nproc),
        prepare=bool(getattr(args, "prepare", False)),
    )
    requests, notes, title = _requests(args, sweep)
    plan = ex.plan_experiment(title, requests, options)
    plan.notes[:0] = notes
    if not args.dryrun:  # a dry run may name paths of another machine (the cluster's)
        for folder in hf.values():
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise ConfigError(
                    f"--hf {folder} is not a Hugging Face folder (no config.json); "
                    "name the backbone's checkpoint folder"
                )
    print(plan.describe(nodes, nproc))
    sys.stdout.flush()

    if profile is None:

        def executor_for(step: ex.Step):
            return ex.local_executor(step, nproc)

        agent_args = ex.single_node_agent_args(nproc)
    else:
        from probsft_megatron.launchers.slurm import agent_args as slurm_agent_args
        from probsft_megatron.launchers.slurm import slurm_executor

        job_dir = str(Path(plan.work_dir) / "experiments")

        def executor_for(step: ex.Step):
            return slurm_executor(
                profile, step.kind, job_dir=job_dir, nodes=nodes, nproc_per_node=nproc
            )

        agent_args = slurm_agent_args(profile, nodes, nproc)

    mode = "dryrun" if args.dryrun else ("run" if profile is None else "submit")
    if args.detach and mode != "submit":
        raise ConfigError(
            "--detach applies to a SLURM submission (--executor slurm without --dryrun)"
        )
    exp_dir = ex.execute(plan, executor_for, mode, agent_args)
    code = _report(mode, plan, exp_dir)
    if mode == "submit" and not args.detach:
        code = _wait_and_report(exp_dir)
    return code
