"""The embedded default, end to end on a CPU: ``make demo`` / ``python -m probsft_megatron.demo``.

SmolLM2-135M-Instruct probed, fine-tuned, exported and evaluated (docs/demo/README.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from probsft_megatron.errors import ConfigError
from probsft_megatron.fileio import atomic_write_json, atomic_write_text

OBJECTIVES = ("original", "p")
SIZES = {
    # training examples (global batch 16: 12 or 2 steps), test prompts, epochs
    "full": {"train_examples": 192, "test_examples": 64, "epochs": 1},
    "smoke": {"train_examples": 32, "test_examples": 8, "epochs": 1},
}
SETTINGS_FILE = "demo_settings.json"  # a demo folder's settings; a rerun must use the same
# how close a rerun on another CPU must come to a committed report (docs/demo/README.md)
TOLERANCE = {
    "loss": 5e-4,  # final training loss of each objective, absolute
    "mean_p": 5e-3,  # final mean p of each objective, and the probe's mean and median p
    "flipped_answers": 4,  # greedy test answers that may differ per model (of 64)
}
CONTINUUM_NOTE = (
    "A single run of each objective at this size says little about the recommendation: in "
    "the measured continuum sweep (docs/continuum.md: this model, six tasks, three seeds) "
    "no task, this one included, separated `-p` from NLL beyond the seed-to-seed spread, "
    "with NLL ahead by 0.05 on average here (0.714 vs 0.664 exact match). The placement "
    "rule comes from the paper's larger models."
)
SMOKE_NOTE = (
    "Size `smoke` checks that every stage of the pipeline runs and fits together; with two "
    "training steps per objective its numbers say nothing about the objectives."
)


def arithmetic_records(n: int, seed: int) -> list[dict[str, str]]:
    """Two-digit additions in the model's own answer style (``"37 + 48 = 85"``)."""
    rng = random.Random(seed)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    return [{"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}"} for a, b in pairs]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class Stages:
    """Runs each stage as a subprocess with a log file and records its wall time."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.times: dict[str, float] = {}
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, argv: list[str], done: Path | None = None) -> None:
        if done is not None and done.exists():
            print(f"[demo] {name}: reusing {done}")
            self.times[name] = 0.0
            return
        print(f"[demo] {name} ...", flush=True)
        t0 = time.perf_counter()
        log = self.work / "logs" / f"{name}.log"
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        with open(log, "w") as f:
            rc = subprocess.call(
                argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.times[name] = time.perf_counter() - t0
        if rc != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"[demo] {name} failed (exit {rc}); log {log}:\n{tail}")
        print(f"[demo] {name}: {self.times[name]:.0f} s", flush=True)


def _probsft(*args: str) -> list[str]:
    return [sys.executable, "-m", "probsft_megatron.cli", *args]


def plot(report: dict[str, Any], histories: dict[str, list[dict]], path: Path) -> None:
    from probsft_megatron.report.figures import pyplot

    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.6))
    for name, rows in histories.items():
        for ax, key in zip(axes, ("loss", "mean_p")):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
    axes[0].set(title="training loss (own objective)", xlabel="step")
    axes[1].set(title="mean p of response tokens", xlabel="step", ylim=(0, 1))
    accuracy = report["accuracy"]
    axes[2].bar(list(accuracy), list(accuracy.values()), color=["grey", "C0", "C1"])
    axes[2].set(title="test exact match", ylim=(0, 1))
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo", help="work and report folder")
    ap.add_argument(
        "--size",
        choices=tuple(SIZES),
        default="full",
        help="full (the committed report, ~7 min on 2 cores) or smoke (the same pipeline on "
        "a few examples, for tests)",
    )
    ap.add_argument("--train-examples", type=int, help="default: the size's (full 192)")
    ap.add_argument("--test-examples", type=int, help="default: the size's (full 64)")
    ap.add_argument("--epochs", type=int, help="default: the size's (1)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    compare_help = "a committed report.json this run must reproduce within the stated tolerances"
    ap.add_argument("--compare", metavar="REPORT_JSON", help=compare_help)
    args = ap.parse_args(argv)
    from probsft_megatron.console import run_main

    return run_main(lambda: run(args))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {"size": args.size, "lr": args.lr, "seed": args.seed}
    for key, default in SIZES[args.size].items():
        value = getattr(args, key)
        settings[key] = default if value is None else value
        if settings[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} {value} must be at least 1")
    return settings


def _check_out(work: Path, settings: dict[str, Any]) -> None:
    """``--out`` is a writable folder that is new, empty, or a demo of the same settings."""
    from probsft_megatron.manifest import writable_folder

    problem = writable_folder(work)
    if problem is not None:
        raise ConfigError(f"--out {work} {problem}; name a folder that can be written")
    if not work.is_dir() or not any(work.iterdir()):
        return
    try:
        earlier = json.loads((work / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"--out {work} holds other files, not a demo folder; choose another --out"
        ) from None
    if earlier != settings:
        changed = ", ".join(
            f"{k} {earlier.get(k)} -> {v}" for k, v in settings.items() if earlier.get(k) != v
        )
        raise ConfigError(
            f"--out {work} holds a demo made with other settings ({changed}); its finished "
            "stages would be reused: choose another --out or remove the folder"
        )


def _read_reference(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        ref = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--compare {path} cannot be read as JSON ({exc})") from None
    if not isinstance(ref, dict) or not {"final", "accuracy", "correct"} <= set(ref):
        raise ConfigError(
            f"--compare {path} is not a demo report.json (no final losses, accuracy and "
            "answers); pass the report.json of a demo run"
        )
    return ref


def run(args: argparse.Namespace) -> int:
    """The demo; every argument is checked before the first stage starts."""
    settings = _settings(args)
    work = Path(args.out).absolute()
    _check_out(work, settings)
    reference = _read_reference(args.compare)
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / SETTINGS_FILE, settings)
    stages = Stages(work)

    # 1. the embedded model, as Hugging Face and as a Megatron model dir
    model_dir = work / "smollm2-megatron"
    convert = _probsft("convert", "smollm2", "--out", str(model_dir))
    stages.run("convert", convert, done=model_dir / "model_config.json")
    hf_base = work / "smollm2-hf"  # beside the model dir: an export may not lie inside it
    export = _probsft("convert", "megatron-to-hf", "--ckpt", str(model_dir), "--out", str(hf_base))
    stages.run("export-base", export, done=hf_base / "config.json")

    # 2. the task: generated offline, disjoint train/test by seed
    data = work / "data"
    data.mkdir(exist_ok=True)
    train_file, test_file = data / "train.jsonl", data / "test.jsonl"
    _write_jsonl(train_file, arithmetic_records(settings["train_examples"], args.seed))
    # evaluation prompts are rendered with the same chat template training applies
    from probsft_megatron.tokenizers import load_tokenizer

    tok = load_tokenizer(str(model_dir / "hf"))
    test = []
    for r in arithmetic_records(settings["test_examples"], args.seed + 1000):
        user = [{"role": "user", "content": r["prompt"]}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        test.append({"prompt": prompt, "reference": r["response"]})
    _write_jsonl(test_file, test)

    # 3. where does the task sit on the continuum?
    probe_dir = work / "probe"
    argv = _probsft("probe", "--model", str(model_dir), "--data", str(train_file))
    argv += ["--out", str(probe_dir), "data.max_length=64"]
    stages.run("probe", argv, done=probe_dir / "report.json")
    probe = json.loads((probe_dir / "report.json").read_text())

    # 4. fine-tune with each objective, export, evaluate
    train = [sys.executable, "-m", "probsft_megatron.train", "--config", "demo-smollm2"]
    train += [f"init.checkpoint={model_dir}", f"data.train_files=[{train_file}]"]
    train += [f"train.epochs={settings['epochs']}", f"optim.lr={args.lr}"]
    train.append(f"train.seed={args.seed}")
    evals, histories = {"base": hf_base}, {}
    for obj in OBJECTIVES:
        run_dir = work / "runs" / obj
        argv = [*train, f"loss.objective={obj}", f"train.output_dir={run_dir}"]
        stages.run(f"train-{obj}", argv, done=run_dir / "summary.json")
        summary = json.loads((run_dir / "summary.json").read_text())
        histories[obj], hf, ckpt = summary["history"], run_dir / "hf", summary["checkpoint"]
        cmd = _probsft("convert", "megatron-to-hf", "--ckpt", ckpt, "--out", str(hf))
        stages.run(f"export-{obj}", cmd, done=hf / "config.json")
        evals[obj] = hf
    flags = "--task custom --grader exact --prompt-format raw --max-new-tokens 24"
    flags += " --temperature 0 --n 1"
    for name, hf in evals.items():
        out = work / "eval" / name
        argv = _probsft("eval", "--model", str(hf), "--data", str(test_file), "--out", str(out))
        stages.run(f"eval-{name}", [*argv, *flags.split()], done=out / "summary.json")

    # 5. the report
    total = time.perf_counter() - t_start
    report = _report(work, settings, evals, probe, histories, stages.times, total)
    plot(report, histories, work / "report.png")
    lines = _markdown(report, probe)
    report_md = atomic_write_text(work / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(work / "report.json", report)
    print("\n".join(lines[:12]))
    print(f"\n[demo] finished in {report['total_seconds'] / 60:.1f} min; report: {report_md}")
    if reference is None:
        return 0
    problems = compare(report, reference)
    if problems:
        print(f"[demo] this run does NOT reproduce {args.compare}:", *problems, sep="\n  ")
        return 1
    print(f"[demo] reproduces {args.compare} within the tolerances {TOLERANCE}")
    return 0


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _report(work, settings, evals, probe, histories, stage_seconds, total) -> dict[str, Any]:
    """report.json: the settings, the probe, each run's final step, each model's answers."""
    accuracy, correct, first = {}, {}, {}
    for name in evals:
        samples = next((work / "eval" / name).glob("*/samples.jsonl")).read_text().splitlines()
        rows = [json.loads(line) for line in samples if line.strip()]
        correct[name] = [bool(r["correct"][0]) for r in rows]
        accuracy[name] = sum(correct[name]) / len(rows)
        first[name] = rows[0]["completions"][0]
    final = {obj: {k: h[-1][k] for k in ("step", "loss", "mean_p")} for obj, h in histories.items()}
    return {
        "settings": settings,
        "probe": {
            **{k: probe[k] for k in ("mean_p", "median_p", "placement") if k in probe},
            "recommended": (probe.get("recommendation") or {}).get("objective"),
        },
        "final": final,
        "accuracy": accuracy,
        "correct": correct,
        "first_completion": first,
        "stage_seconds": stage_seconds,
        "total_seconds": total,
        "machine": _machine(),
        "tolerance": TOLERANCE,
    }


def compare(report: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Where ``report`` differs from ``reference`` beyond :data:`TOLERANCE` (empty: none)."""
    problems = []
    if report["settings"] != reference.get("settings"):
        return [f"other settings: {report['settings']} vs {reference.get('settings')}"]

    def close(what: str, got: float, want: float, tol: float) -> None:
        if not (math.isfinite(got) and abs(got - want) <= tol):
            problems.append(f"{what} {got:.4f} vs {want:.4f} (tolerance {tol})")

    for key in ("mean_p", "median_p"):
        close(f"probe {key}", report["probe"][key], reference["probe"][key], TOLERANCE["mean_p"])
    for obj, ref in reference["final"].items():
        got = report["final"][obj]
        if got["step"] != ref["step"]:
            problems.append(f"{obj}: trained {got['step']} steps vs {ref['step']}")
        close(f"{obj} final loss", got["loss"], ref["loss"], TOLERANCE["loss"])
        close(f"{obj} final mean p", got["mean_p"], ref["mean_p"], TOLERANCE["mean_p"])
    for name, ref in reference["correct"].items():
        flipped = sum(a != b for a, b in zip(report["correct"][name], ref, strict=True))
        if flipped > TOLERANCE["flipped_answers"]:
            got, want = report["accuracy"][name], reference["accuracy"][name]
            problems.append(
                f"{name}: {flipped} of {len(ref)} greedy answers flipped (exact match "
                f"{got:.3f} vs {want:.3f}; tolerance {TOLERANCE['flipped_answers']})"
            )
    return problems


def _markdown(report: dict[str, Any], probe: dict[str, Any]) -> list[str]:
    settings, accuracy, final = report["settings"], report["accuracy"], report["final"]
    placement = probe.get("placement") or {}
    m, tol = report["machine"], report["tolerance"]
    return [
        "# probsft-megatron demo: NLL vs -p on SmolLM2-135M-Instruct (CPU)",
        "",
        "Task: two-digit addition in the model's answer style (`What is 37 + 48?` -> "
        f"`37 + 48 = 85`), {settings['train_examples']} training and {settings['test_examples']} "
        f"test examples generated offline; {settings['epochs']} epoch(s), lr {settings['lr']}, "
        f"seed {settings['seed']}, global batch 16, max length 64 (size `{settings['size']}`).",
        "",
        f"Probe of the base model on the training responses: mean p "
        f"{probe.get('mean_p', float('nan')):.3f}, median p "
        f"{probe.get('median_p', float('nan')):.3f}"
        f" -> **{placement.get('regime', '?')}** ({placement.get('reason', '')}); "
        f"recommended objective: `{report['probe']['recommended'] or '?'}`.",
        "",
        "| model | steps | final train loss | final mean p | test exact match |",
        "|---|---|---|---|---|",
        f"| base | - | - | - | {accuracy['base']:.3f} |",
        *(
            f"| {obj} | {last['step']} | {last['loss']:.4f} | {last['mean_p']:.3f} "
            f"| {accuracy[obj]:.3f} |"
            for obj, last in final.items()  # in OBJECTIVES order
        ),
        "",
        "The training loss column is each run's own objective (NLL for `original`, "
        "1-p for `p`), so only the mean p and accuracy columns compare across rows.",
        "",
        CONTINUUM_NOTE if settings["size"] == "full" else SMOKE_NOTE,
        "",
        "![training curves and accuracy](report.png)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in report["stage_seconds"].items()),
        f"| **total** | **{report['total_seconds']:.0f}** |",
        "",
        "First test example, greedy completion per model:",
        "",
        *(f"- {name}: `{text.strip()[:80]}`" for name, text in report["first_completion"].items()),
        "",
        "## Reproducing this report",
        "",
        f"Made by `python -m probsft_megatron.demo --size {settings['size']}` on {m['cpu']} "
        f"({m['cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}, Python "
        f"{m['python']}; nothing was downloaded from a model hub. A run is deterministic on one "
        "machine. A rerun on another CPU reproduces this report when each final training loss is "
        f"within {tol['loss']} of the table's, each final mean p and the probe's mean and median p "
        f"within {tol['mean_p']}, and at most {tol['flipped_answers']} greedy test answers per "
        "model differ from this run's (report.json lists every answer's correctness): other SIMD "
        "kernels and thread counts change the last bits of every step, and a few greedy answers "
        "sit near a tie. The demo checks this itself with `--compare REPORT.json` (`make demo` "
        "compares with docs/demo/report.json) and exits 1 listing what differs; stage times depend "
        "on the machine and its load and are not compared.",
    ]


if __name__ == "__main__":
    sys.exit(main())
