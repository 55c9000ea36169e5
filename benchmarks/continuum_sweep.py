"""The continuum, measured: objective margins over tasks of graded prior strength, with seeds.

For every task the base model is probed (``probsft probe``: mean token p of the training
responses), then fine-tuned with NLL (``original``), ``-p`` (``p``) and a third,
prior-leaning objective (``GeneralFamily-10``) for several seeds (``probsft train``),
exported (``probsft convert megatron-to-hf``) and evaluated on held-out items with vLLM
(``probsft eval``). Data come from ``probsft data generate``. A mechanism check trains NLL
and ``-p`` on the model-strong ``self-addition`` task with 30% of its training answers
replaced by wrong ones and evaluates on the same clean test set.

Every step is the product's own command, run as a subprocess with a log file; a run whose
``result.json`` exists is skipped, so an interrupted sweep resumes where it stopped. Large
artifacts (checkpoints, exported models) are deleted once a run is evaluated.

    python benchmarks/continuum_sweep.py                  # the CPU sweep (SmolLM2-135M)
    python benchmarks/continuum_sweep.py --size tiny      # a few-minute smoke test
    python benchmarks/continuum_sweep.py --report-only    # tables and figures from results
    python benchmarks/continuum_sweep.py --size full --hf-model DIR --math-data FILE \\
        --medical-train FILE --medical-test FILE --nproc 8   # the GPU configuration

Results: ``benchmarks/results/continuum_sweep_<size>_<device>.{json,md}``, the figure
``..._margins.png`` (margin vs probe mean p, 95% intervals over seeds, the placement
bounds) and ``..._curves.png`` (training curves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, device_tag, write_results

from probsft_megatron.fileio import atomic_write, atomic_write_json

BOUNDS = (0.35, 0.65)
"""The probe's placement bounds (model-weak below the first, model-strong from the second)."""

SMALL = dict(
    tasks=[
        "count",
        "self-addition",
        "addition",
        "addition-answer",
        "addition-words",
        "figlet-mini",
    ],
    objectives=["original", "p", "GeneralFamily-10"],
    seeds=[0, 1, 2],
    n_train=128,
    n_test=128,
    self_questions=1800,
    batch=8,
    lr=5e-5,
    warmup=0.1,
    epochs=1,
    probe_samples=128,
    corrupt=0.3,
    mechanism_task="self-addition",
    mechanism_objectives=["original", "p"],
)
TINY = dict(
    SMALL,
    tasks=["self-addition", "figlet-mini"],
    objectives=["original", "p"],
    seeds=[0],
    n_train=16,
    n_test=16,
    self_questions=300,
    probe_samples=16,
    mechanism_objectives=["original"],
)

# The GPU configuration: Qwen2.5-1.5B on the paper's three tasks with the paper's recipes
# (hyperparameters in configs/recipes); the user supplies the base model and the two
# training sets that are hub downloads.
# The medical and figfont recipes are written for Qwen2.5-7B (TP=4); Qwen2.5-1.5B has two
# KV groups, so it runs them at TP=2 (with the recipes' other settings unchanged).
_AT_1P5B = ["model=qwen2.5-1.5b", "parallel.tensor_model_parallel_size=2"]
FULL_TASKS = {
    "math": dict(
        recipe="math-qwen2.5-1.5b",
        data_arg="math_data",
        overrides=[],
        eval=["--task", "math500,minerva_math,olympiadbench,aime24,aime25,amc23"],
    ),
    "medical": dict(
        recipe="medical-qwen2.5-7b",
        data_arg="medical_train",
        overrides=_AT_1P5B,
        eval=["--task", "medical", "--data", "{medical_test}"],
    ),
    "figfont": dict(
        recipe="figfont-qwen2.5-7b", data_arg=None, overrides=_AT_1P5B, eval=["--task", "figfont"]
    ),
}
FULL = dict(
    tasks=list(FULL_TASKS),
    objectives=["original", "p", "GeneralFamily-10"],
    seeds=[0, 1, 2],
    probe_samples=1024,
    corrupt=0.3,
    mechanism_task=None,
    mechanism_objectives=[],
)
SIZES = {"tiny": TINY, "small": SMALL, "full": FULL}

# two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency)
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    below = [k for k in _T975 if k <= df]
    return _T975[max(below)] if df < 30 else 1.96


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t interval (None for fewer than two values)."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, None
    return m, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def probsft(*args: str) -> list[str]:
    return [sys.executable, "-m", "probsft_megatron.cli", *args]


class Runner:
    """Runs each step as a subprocess with its own log; records wall times."""

    def __init__(self, work: Path, dry_run: bool = False) -> None:
        self.work, self.dry_run = work, dry_run
        self.times: dict[str, float] = {}
        if not dry_run:
            (work / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, argv: list[str], done: Path | None = None) -> None:
        if done is not None and done.exists():
            return
        if self.dry_run:
            print(" ".join(argv))
            return
        print(f"[sweep] {time.strftime('%H:%M:%S')} {name} ...", flush=True)
        t0 = time.perf_counter()
        log = self.work / "logs" / f"{name}.log"
        with open(log, "w") as f:
            rc = subprocess.call(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONWARNINGS="ignore"),
                start_new_session=True,
            )
        self.times[name] = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(
                f"[sweep] {name} failed (exit {rc}); log {log}:\n{log.read_text()[-3000:]}"
            )
        print(f"[sweep] {name}: {self.times[name]:.0f} s", flush=True)
        path = self.work / "stage_times.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        atomic_write_json(path, old | {name: self.times[name]})


# ----------------------------------------------------------------------------- small sizes


class SmallSweep:
    """SmolLM2-135M-Instruct on the generated tasks of probsft_megatron.tasks_gen."""

    def __init__(self, work: Path, size: dict, runner: Runner) -> None:
        self.work, self.size, self.r = work, size, runner
        self.model = work / "smollm2-megatron"
        self.base_hf = work / "base-hf"

    def prepare_model(self) -> None:
        self.r.run(
            "convert",
            probsft("convert", "smollm2", "--out", str(self.model)),
            done=self.model / "model_config.json",
        )
        self.r.run(
            "export-base",
            probsft(
                "convert", "megatron-to-hf", "--ckpt", str(self.model), "--out", str(self.base_hf)
            ),
            done=self.base_hf / "config.json",
        )

    def data_dir(self, task: str) -> Path:
        return self.work / "data" / task

    def prepare_task(self, task: str) -> None:
        from probsft_megatron.tasks_gen import get_task

        spec, s, d = get_task(task), self.size, self.data_dir(task)
        tok = str(self.model / "hf")
        self.r.run(
            f"data-{task}-test",
            probsft(
                "data",
                "generate",
                task,
                "--split",
                "test",
                "--n",
                str(s["n_test"]),
                "--render-with",
                tok,
                "--out",
                str(d / "test.jsonl"),
            ),
            done=d / "test.jsonl",
        )
        if task == "self-addition":
            questions = ["--split", "train", "--n", str(s["self_questions"])]
            self.r.run(
                f"data-{task}-questions",
                probsft(
                    "data",
                    "generate",
                    task,
                    *questions,
                    "--render-with",
                    tok,
                    "--out",
                    str(d / "questions.jsonl"),
                ),
                done=d / "questions.jsonl",
            )
            self.r.run(
                f"data-{task}-base-answers",
                self.eval_argv(task, self.base_hf, d / "base-answers", data=d / "questions.jsonl"),
                done=d / "base-answers" / "summary.json",
            )
            samples = str(d / "base-answers" / "custom" / "samples.jsonl")
            self.r.run(
                f"data-{task}-train",
                probsft(
                    "data",
                    "generate",
                    task,
                    *questions,
                    "--from-eval",
                    samples,
                    "--max-records",
                    str(s["n_train"]),
                    "--out",
                    str(d / "train.jsonl"),
                ),
                done=d / "train.jsonl",
            )
            if task == s["mechanism_task"]:
                self.r.run(
                    f"data-{task}-train-corrupt",
                    probsft(
                        "data",
                        "generate",
                        task,
                        *questions,
                        "--from-eval",
                        samples,
                        "--max-records",
                        str(s["n_train"]),
                        "--corrupt",
                        str(s["corrupt"]),
                        "--out",
                        str(d / "train-corrupt.jsonl"),
                    ),
                    done=d / "train-corrupt.jsonl",
                )
        else:
            self.r.run(
                f"data-{task}-train",
                probsft(
                    "data",
                    "generate",
                    task,
                    "--split",
                    "train",
                    "--n",
                    str(s["n_train"]),
                    "--out",
                    str(d / "train.jsonl"),
                ),
                done=d / "train.jsonl",
            )
            if task == s["mechanism_task"]:
                self.r.run(
                    f"data-{task}-train-corrupt",
                    probsft(
                        "data",
                        "generate",
                        task,
                        "--split",
                        "train",
                        "--n",
                        str(s["n_train"]),
                        "--corrupt",
                        str(s["corrupt"]),
                        "--out",
                        str(d / "train-corrupt.jsonl"),
                    ),
                    done=d / "train-corrupt.jsonl",
                )
        variants = ["train"] + (["train-corrupt"] if task == s["mechanism_task"] else [])
        for v in variants:
            out = self.work / "probe" / f"{task}{v[5:]}"
            self.r.run(
                f"probe-{task}{v[5:]}",
                probsft(
                    "probe",
                    "--model",
                    str(self.model),
                    "--data",
                    str(d / f"{v}.jsonl"),
                    "--samples",
                    str(s["probe_samples"]),
                    "--out",
                    str(out),
                    f"data.max_length={spec.max_length}",
                ),
                done=out / "report.json",
            )

    def eval_argv(self, task: str, model: Path, out: Path, data: Path | None = None) -> list:
        from probsft_megatron.tasks_gen import get_task

        spec = get_task(task)
        return probsft(
            "eval",
            "--model",
            str(model),
            "--task",
            "custom",
            "--data",
            str(data or self.data_dir(task) / "test.jsonl"),
            "--grader",
            spec.grader,
            "--prompt-format",
            "raw",
            "--max-new-tokens",
            str(spec.max_new_tokens),
            "--temperature",
            "0",
            "--n",
            "1",
            "--out",
            str(out),
        )

    def run_one(self, task: str, variant: str, objective: str, seed: int) -> None:
        from probsft_megatron.tasks_gen import get_task

        spec, s = get_task(task), self.size
        name = f"{task}{'-corrupt' if variant == 'corrupt' else ''}-{objective}-s{seed}"
        run = self.work / "runs" / name
        if (run / "result.json").exists():
            return
        train_file = self.data_dir(task) / (
            "train-corrupt.jsonl" if variant == "corrupt" else "train.jsonl"
        )
        t0 = time.perf_counter()
        self.r.run(
            f"train-{name}",
            probsft(
                "train",
                "--config",
                "demo-smollm2",
                f"init.checkpoint={self.model}",
                f"data.train_files=[{train_file}]",
                f"data.max_length={spec.max_length}",
                f"data.num_samples={s['n_train']}",
                f"train.global_batch_size={s['batch']}",
                f"train.micro_batch_size={s['batch']}",
                f"train.epochs={s['epochs']}",
                f"optim.lr={s['lr']}",
                f"optim.warmup_ratio={s['warmup']}",
                f"train.seed={seed}",
                f"loss.objective={objective}",
                f"train.output_dir={run / 'train'}",
                "train.keep_last=1",
            ),
            done=run / "train" / "summary.json",
        )
        if self.r.dry_run:
            return
        summary = json.loads((run / "train" / "summary.json").read_text())
        self.r.run(
            f"export-{name}",
            probsft(
                "convert",
                "megatron-to-hf",
                "--ckpt",
                summary["checkpoint"],
                "--out",
                str(run / "hf"),
            ),
            done=run / "hf" / "config.json",
        )
        self.r.run(
            f"eval-{name}",
            self.eval_argv(task, run / "hf", run / "eval"),
            done=run / "eval" / "summary.json",
        )
        metrics = json.loads((run / "eval" / "custom" / "summary.json").read_text())["metrics"]
        atomic_write_json(
            run / "result.json",
            {
                "task": task,
                "variant": variant,
                "objective": objective,
                "seed": seed,
                "exact": metrics["avg@n"],
                "score": metrics.get("mean_score", metrics["avg@n"]),
                "grader": spec.grader,
                "test_items": metrics["problems"],
                "train_steps": summary["steps"],
                "history": summary["history"],
                "seconds": {k: v for k, v in self.r.times.items() if k.endswith(name)},
                "wall_s": time.perf_counter() - t0,
            },
        )
        shutil.rmtree(run / "train" / "checkpoints", ignore_errors=True)
        shutil.rmtree(run / "hf", ignore_errors=True)

    def run_all(self) -> None:
        s = self.size
        self.prepare_model()
        for task in s["tasks"]:
            self.prepare_task(task)
        for seed in s["seeds"]:  # seed-major: every finished round is a complete replicate
            for task in s["tasks"]:
                for objective in s["objectives"]:
                    self.run_one(task, "clean", objective, seed)
            for objective in s["mechanism_objectives"]:
                self.run_one(s["mechanism_task"], "corrupt", objective, seed)


# ----------------------------------------------------------------------------- report


def probe_summary(path: Path) -> dict[str, Any]:
    rep = json.loads(path.read_text())
    pct = rep.get("percentiles", {})
    return {
        "tokens": rep.get("tokens"),
        "mean_p": rep.get("mean_p"),
        "median_p": rep.get("median_p"),
        "p20": pct.get("20"),
        "frac_p_gt_0.9": rep.get("frac_p_gt_0.9"),
        "per_example": rep.get("per_example_summary"),
        "per_example_p10_p90": [
            ((rep.get("per_example_summary") or {}).get("percentiles") or {}).get(k)
            for k in ("10", "90")
        ],
        "placement": (rep.get("placement") or {}).get("regime"),
        "recommended": (rep.get("recommendation") or {}).get("objective"),
    }


def overrun(samples_path: Path) -> float | None:
    """Fraction of completions that begin with the reference answer and go on past it: the
    right answer without the stop (end of turn) after it."""
    if not samples_path.exists():
        return None
    rows = [json.loads(x) for x in samples_path.read_text().splitlines() if x.strip()]
    hits = [
        r["completions"][0].strip().startswith(r["reference"].strip())
        and r["completions"][0].strip() != r["reference"].strip()
        for r in rows
    ]
    return sum(hits) / len(hits) if hits else None


def collect(work: Path, size: dict) -> dict[str, Any]:
    rows = []
    for p in sorted((work / "runs").glob("*/result.json")):
        row = json.loads(p.read_text())
        row.setdefault("overrun", overrun(p.parent / "eval" / "custom" / "samples.jsonl"))
        rows.append(row)
    probes = {}
    for task in size["tasks"]:
        for suffix in ("", "-corrupt"):
            p = work / "probe" / f"{task}{suffix}" / "report.json"
            if p.exists():
                probes[task + suffix] = probe_summary(p)
    self_gen = None
    base = work / "data" / "self-addition" / "base-answers" / "custom" / "summary.json"
    if base.exists():
        m = json.loads(base.read_text())["metrics"]
        self_gen = {"questions": m["problems"], "base_exact": m["avg@n"]}
    return {"rows": rows, "probes": probes, "self_generation": self_gen}


def margins(
    rows: list[dict], task: str, variant: str, objective: str, key: str, baseline: str = "original"
) -> dict[str, Any] | None:
    """Seed-paired margin objective - baseline: mean, 95% half-width, per-seed values."""
    by_seed = {}
    for r in rows:
        if r["task"] == task and r["variant"] == variant:
            by_seed.setdefault(r["seed"], {})[r["objective"]] = r[key]
    diffs = [
        v[objective] - v[baseline] for v in by_seed.values() if objective in v and baseline in v
    ]
    if not diffs:
        return None
    m, h = mean_ci(diffs)
    return {"mean": m, "ci95": h, "n": len(diffs), "per_seed": diffs}


def summarize(data: dict, size: dict) -> dict[str, Any]:
    rows, out = data["rows"], {}
    variants = [(t, "clean") for t in size["tasks"]]
    if size.get("mechanism_task"):
        variants.append((size["mechanism_task"], "corrupt"))
    for task, variant in variants:
        key = task + ("-corrupt" if variant == "corrupt" else "")
        entry: dict[str, Any] = {"probe": data["probes"].get(key), "objectives": {}, "margins": {}}
        objectives = size["objectives"] if variant == "clean" else size["mechanism_objectives"]
        for obj in objectives:
            sel = [
                r
                for r in rows
                if r["task"] == task and r["variant"] == variant and r["objective"] == obj
            ]
            if not sel:
                continue
            stats = {}
            for metric in ("exact", "score"):
                m, h = mean_ci([r[metric] for r in sel])
                stats[metric] = {"mean": m, "ci95": h}
            last = [r["history"][-1] for r in sel if r["history"]]
            stats["seeds"] = len(sel)
            stats["final_mean_p"] = statistics.mean(h["mean_p"] for h in last) if last else None
            entry["objectives"][obj] = stats
            if obj != "original":
                entry["margins"][obj] = {
                    metric: margins(rows, task, variant, obj, metric)
                    for metric in ("exact", "score")
                }
        out[key] = entry
    return out


def _fmt(stat: dict | None, pct: bool = False) -> str:
    if not stat:
        return "-"
    h = stat.get("ci95")
    return (
        f"{stat['mean']:+.3f} ± {h:.3f}"
        if pct and h is not None
        else (
            f"{stat['mean']:+.3f}"
            if pct
            else (f"{stat['mean']:.3f} ± {h:.3f}" if h is not None else f"{stat['mean']:.3f}")
        )
    )


def markdown(data: dict, summary: dict, size: dict, meta: dict) -> str:
    objs = size["objectives"]
    setup = (
        f"SmolLM2-135M-Instruct; {size.get('n_train')} training examples per task, "
        f"global batch {size.get('batch')}, lr {size.get('lr')}, "
        f"{size.get('epochs')} epoch; {size.get('n_test')} held-out test items"
        if meta["size"] != "full"
        else "Qwen2.5-1.5B; the paper's recipes (configs/recipes) for math, medical, figfont"
    )
    lines = [
        f"# Continuum sweep, {meta['size']} size ({meta['device']})",
        "",
        f"{setup}; seeds {', '.join(map(str, size['seeds']))}; intervals are 95% "
        "Student t over seeds (margins paired by seed).",
        "",
        "## Probe and margins per task",
        "",
        "| task | probe mean p | median p | 20th pct p | per-example mean p, 10th-90th "
        "pct | placement | "
        + " | ".join(f"{o} exact" for o in objs)
        + " | "
        + " | ".join(f"{o} - NLL exact" for o in objs[1:])
        + " | "
        + " | ".join(f"{o} - NLL similarity" for o in objs[1:])
        + " |",
        "|---" * (6 + len(objs) + 2 * (len(objs) - 1)) + "|",
    ]
    for key, e in summary.items():
        if key.endswith("-corrupt"):
            continue
        pr = e["probe"] or {}
        lo, hi = pr.get("per_example_p10_p90") or (None, None)
        cells = [
            key,
            f"{pr.get('mean_p', float('nan')):.3f}",
            f"{pr.get('median_p', float('nan')):.3f}",
            f"{pr.get('p20') or float('nan'):.3f}",
            f"{lo:.3f}-{hi:.3f}" if lo is not None else "-",
            str(pr.get("placement")),
        ]
        cells += [_fmt((e["objectives"].get(o) or {}).get("exact")) for o in objs]
        cells += [_fmt((e["margins"].get(o) or {}).get("exact"), pct=True) for o in objs[1:]]
        cells += [_fmt((e["margins"].get(o) or {}).get("score"), pct=True) for o in objs[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    mech = [k for k in summary if k.endswith("-corrupt")]
    if mech:
        task = mech[0][: -len("-corrupt")]
        lines += [
            "",
            f"## Mechanism check: {task} with {size['corrupt']:.0%} of training answers wrong",
            "",
            "| training data | probe mean p | "
            + " | ".join(f"{o} exact" for o in size["mechanism_objectives"])
            + " | p - NLL exact |",
            "|---|---|" + "---|" * (len(size["mechanism_objectives"]) + 1),
        ]
        for key, label in ((task, "clean"), (mech[0], f"{size['corrupt']:.0%} corrupted")):
            e = summary.get(key) or {}
            pr = e.get("probe") or {}
            cells = [label, f"{pr.get('mean_p', float('nan')):.3f}"]
            cells += [
                _fmt((e.get("objectives", {}).get(o) or {}).get("exact"))
                for o in size["mechanism_objectives"]
            ]
            cells.append(_fmt((e.get("margins", {}).get("p") or {}).get("exact"), pct=True))
            lines.append("| " + " | ".join(cells) + " |")
    if data.get("self_generation"):
        g = data["self_generation"]
        lines += [
            "",
            f"self-addition training data: the base model answered "
            f"{g['questions']} training questions, {g['base_exact']:.1%} of them "
            "exactly in its concise form and correctly; those answers are the "
            "training responses.",
        ]
    lines += [
        "",
        "## Every run",
        "",
        "| task | data | objective | seed | exact | similarity | right answer, not stopped "
        "| final train mean p | steps | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        data["rows"], key=lambda r: (r["task"], r["variant"], r["objective"], r["seed"])
    ):
        last = r["history"][-1] if r["history"] else {}
        lines.append(
            f"| {r['task']} | {r['variant']} | {r['objective']} | {r['seed']} | "
            f"{r['exact']:.3f} | {r['score']:.3f} | "
            f"{'-' if r.get('overrun') is None else format(r['overrun'], '.3f')} | "
            f"{last.get('mean_p', 0):.3f} | "
            f"{r['train_steps']} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        f"Runs: {len(data['rows'])}; sweep wall time {meta['wall_min']:.0f} min "
        f"(sum of the recorded step times), {meta['note']}",
    ]
    return "\n".join(lines)


def plot(data: dict, summary: dict, size: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs = size["objectives"][1:]
    colors = {"p": "C0", "GeneralFamily-10": "C1", "OnlyTopP-K20": "C2"}
    fig, axes = plt.subplots(
        1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.25, 1.25, 0.9]}
    )
    tasks = [k for k in summary if not k.endswith("-corrupt")]
    for ax, metric, title in (
        (axes[0], "exact", "exact match"),
        (axes[1], "score", "similarity (Jaro-Winkler; exact for exact-graded tasks)"),
    ):
        ax.axvspan(0, BOUNDS[0], color="tab:red", alpha=0.06)
        ax.axvspan(BOUNDS[1], 1, color="tab:green", alpha=0.06)
        for b in BOUNDS:
            ax.axvline(b, color="grey", ls="--", lw=1)
        ax.axhline(0, color="black", lw=0.8)
        for j, obj in enumerate(objs):
            xs, ys, es, spread = [], [], [], [[], []]
            for task in tasks:
                e, pr = summary[task], summary[task]["probe"]
                m = (e["margins"].get(obj) or {}).get(metric)
                if not m or not pr:
                    continue
                x = pr["mean_p"] + (j - (len(objs) - 1) / 2) * 0.012
                xs.append(x)
                ys.append(m["mean"])
                es.append(m["ci95"] or 0.0)
                lo, hi = pr.get("per_example_p10_p90") or (None, None)
                spread[0].append(max(0.0, x - lo) if lo is not None else 0.0)
                spread[1].append(max(0.0, hi - x) if hi is not None else 0.0)
            color = colors.get(obj, f"C{j}")
            ax.errorbar(xs, ys, xerr=spread, fmt="none", ecolor=color, alpha=0.3, lw=1)
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                fmt="o",
                capsize=4,
                color=color,
                label=f"{'-p' if obj == 'p' else obj} - NLL",
            )
        for task in tasks:
            pr = summary[task]["probe"]
            if pr:
                ax.text(
                    pr["mean_p"],
                    0.02,
                    task,
                    transform=ax.get_xaxis_transform(),
                    rotation=90,
                    fontsize=7,
                    va="bottom",
                    ha="right",
                    color="dimgrey",
                )
        ax.set(
            xlim=(0, 1),
            xlabel="probe mean token p of the base model (training responses)",
            ylabel=f"margin over NLL ({metric})",
            title=f"margin, {title}",
        )
        ax.text(
            BOUNDS[0] / 2,
            0.98,
            "model-weak",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            color="tab:red",
        )
        ax.text(
            (BOUNDS[1] + 1) / 2,
            0.98,
            "model-strong",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            color="tab:green",
        )
        ax.legend(loc="best", fontsize=8)
    ax = axes[2]
    mech = [k for k in summary if k.endswith("-corrupt")]
    if mech:
        task = mech[0][: -len("-corrupt")]
        mobjs = size["mechanism_objectives"]
        width = 0.8 / len(mobjs)
        for j, obj in enumerate(mobjs):
            vals, errs = [], []
            for key in (task, mech[0]):
                st = ((summary.get(key) or {}).get("objectives", {}).get(obj) or {}).get("exact")
                vals.append(st["mean"] if st else float("nan"))
                errs.append((st or {}).get("ci95") or 0.0)
            ax.bar(
                [i + (j - (len(mobjs) - 1) / 2) * width for i in range(2)],
                vals,
                width,
                yerr=errs,
                capsize=4,
                label="NLL" if obj == "original" else ("-p" if obj == "p" else obj),
                color=f"C{j + 2}",
            )
        ax.set_xticks([0, 1], ["clean", f"{size['corrupt']:.0%} wrong answers"])
        ax.set(ylim=(0, 1), ylabel="test exact match", title=f"mechanism: {task}")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.tight_layout()
    margins_png = stem.with_name(stem.name + "_margins.png")
    atomic_write(margins_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

    keys = list(summary)
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.1 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        task, variant = (key[:-8], "corrupt") if key.endswith("-corrupt") else (key, "clean")
        for j, obj in enumerate(
            sorted({r["objective"] for r in data["rows"]}, key=size["objectives"].index)
        ):
            hist = [
                r["history"]
                for r in data["rows"]
                if r["task"] == task
                and r["variant"] == variant
                and r["objective"] == obj
                and r["history"]
            ]
            if not hist:
                continue
            steps = [h["step"] for h in hist[0]]
            for h in hist:
                ax.plot(
                    [x["step"] for x in h],
                    [x["mean_p"] for x in h],
                    color=f"C{j}",
                    alpha=0.25,
                    lw=0.8,
                )
            mean = [
                statistics.mean(h[i]["mean_p"] for h in hist if i < len(h))
                for i in range(len(steps))
            ]
            ax.plot(
                steps,
                mean,
                color=f"C{j}",
                lw=1.8,
                label="NLL" if obj == "original" else ("-p" if obj == "p" else obj),
            )
        ax.set(title=key, xlabel="optimizer step", ylabel="train mean p (batch)", ylim=(0, 1))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    curves_png = stem.with_name(stem.name + "_curves.png")
    atomic_write(curves_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return [margins_png, curves_png]


def report(work: Path, size_name: str, size: dict, out_dir: Path, note: str) -> None:
    data = collect(work, size)
    if not data["rows"]:
        raise SystemExit(f"[sweep] no finished runs under {work / 'runs'}")
    summary = summarize(data, size)
    steps = (
        json.loads((work / "stage_times.json").read_text())
        if (work / "stage_times.json").exists()
        else {}
    )
    for r in data["rows"]:
        steps = {**r["seconds"], **steps}
    wall = sum(steps.values())
    meta = {"device": device_name(), "size": size_name, "wall_min": wall / 60, "note": note}
    stem = out_dir / f"continuum_sweep_{size_name}_{device_tag()}"
    md = markdown(data, summary, size, meta)
    pngs = plot(data, summary, size, stem)
    md += "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
    result = {
        **meta,
        "settings": dict(size),
        "summary": summary,
        "probes": data["probes"],
        "self_generation": data["self_generation"],
        "rows": [
            {k: v for k, v in r.items() if k != "history"}
            | {
                "history": [
                    {k: h[k] for k in ("step", "loss", "mean_p", "lr")} for h in r["history"]
                ]
            }
            for r in data["rows"]
        ],
        "step_seconds": steps,
    }
    write_results(out_dir, stem.name, result, md)
    print(md)


# ----------------------------------------------------------------------------- full size


def full_sweep(args, size: dict, runner: Runner) -> None:
    """Qwen2.5-1.5B on math / medical / figfont with the paper's recipes (GPU)."""
    work = Path(args.work).absolute()
    model = work / "qwen2.5-1.5b-megatron"
    paths = {
        "math_data": args.math_data,
        "medical_train": args.medical_train,
        "medical_test": args.medical_test,
    }
    tasks = args.tasks.split(",") if args.tasks else size["tasks"]
    for task in tasks:
        spec = FULL_TASKS[task]
        if spec["data_arg"] and not paths[spec["data_arg"]]:
            raise SystemExit(
                f"--size full, task {task}: pass --{spec['data_arg'].replace('_', '-')}"
                f" FILE (or leave the task out with --tasks)"
            )
        if task == "medical" and not args.medical_test:
            raise SystemExit("--size full, task medical: pass --medical-test FILE")
    if not args.hf_model:
        raise SystemExit("--size full: pass --hf-model DIR (a Qwen2.5-1.5B Hugging Face folder)")
    runner.run(
        "convert",
        probsft("convert", "hf-to-megatron", "--hf", args.hf_model, "--out", str(model)),
        done=model / "model_config.json",
    )
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else size["seeds"]
    objectives = args.objectives.split(",") if args.objectives else size["objectives"]
    for task in tasks:
        spec = FULL_TASKS[task]
        data = [f"data.train_files=[{paths[spec['data_arg']]}]"] if spec["data_arg"] else []
        probe_out = work / "probe" / task
        runner.run(
            f"probe-{task}",
            probsft(
                "probe",
                "--model",
                str(model),
                "--data",
                spec["recipe"],
                "--samples",
                str(size["probe_samples"]),
                "--nproc",
                str(args.nproc),
                "--out",
                str(probe_out),
                *data,
            ),
            done=probe_out / "report.json",
        )
        for seed in seeds:
            for obj in objectives:
                run = work / "runs" / f"{task}-{obj}-s{seed}"
                runner.run(
                    f"train-{task}-{obj}-s{seed}",
                    probsft(
                        "train",
                        "--config",
                        spec["recipe"],
                        "--nproc",
                        str(args.nproc),
                        f"init.checkpoint={model}",
                        *data,
                        *spec["overrides"],
                        f"train.seed={seed}",
                        f"loss.objective={obj}",
                        f"train.output_dir={run / 'train'}",
                    ),
                    done=run / "train" / "summary.json",
                )
                ckpt = (
                    json.loads((run / "train" / "summary.json").read_text())["checkpoint"]
                    if not runner.dry_run
                    else str(run / "train" / "checkpoints" / "last")
                )
                runner.run(
                    f"export-{task}-{obj}-s{seed}",
                    probsft("convert", "megatron-to-hf", "--ckpt", ckpt, "--out", str(run / "hf")),
                    done=run / "hf" / "config.json",
                )
                ev = [a.format(**paths) for a in spec["eval"]]
                runner.run(
                    f"eval-{task}-{obj}-s{seed}",
                    probsft(
                        "eval",
                        "--model",
                        str(run / "hf"),
                        *ev,
                        "--tensor-parallel-size",
                        "1",
                        "--out",
                        str(run / "eval"),
                    ),
                    done=run / "eval",
                )
                if not runner.dry_run:
                    write_full_result(run, task, obj, seed)


def write_full_result(run: Path, task: str, objective: str, seed: int) -> None:
    """result.json of a full-size run: the eval metrics averaged over the task's benchmarks
    (math: the six test sets; exact = avg@n, similarity = Jaro-Winkler where graded so)."""
    summaries = [json.loads(p.read_text()) for p in sorted((run / "eval").glob("*/summary.json"))]
    exact = statistics.mean(s["metrics"]["avg@n"] for s in summaries)
    score = statistics.mean(
        s["metrics"].get("mean_score", s["metrics"]["avg@n"]) for s in summaries
    )
    train = json.loads((run / "train" / "summary.json").read_text())
    atomic_write_json(
        run / "result.json",
        {
            "task": task,
            "variant": "clean",
            "objective": objective,
            "seed": seed,
            "exact": exact,
            "score": score,
            "grader": ",".join(s["grader"] for s in summaries),
            "per_benchmark": {s["task"]: s["metrics"] for s in summaries},
            "test_items": sum(s["metrics"]["problems"] for s in summaries),
            "train_steps": train["steps"],
            "history": train["history"],
            "seconds": {},
            "wall_s": 0.0,
        },
    )


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--work", help="work folder (default outputs/continuum_sweep_<size>)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tasks", help="comma-separated subset of the size's tasks")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the size's)")
    ap.add_argument("--objectives", help="comma-separated objectives, NLL (original) first")
    ap.add_argument("--report-only", action="store_true", help="only tables and figures")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--note", default="", help="a line for the report (e.g. the machine load)")
    g = ap.add_argument_group("--size full (GPU)")
    g.add_argument("--hf-model", help="Qwen2.5-1.5B Hugging Face folder")
    g.add_argument("--math-data", help="NuminaMath-CoT training file (jsonl/parquet)")
    g.add_argument("--medical-train", help="m23k training file")
    g.add_argument("--medical-test", help="medical multiple-choice test jsonl")
    g.add_argument("--nproc", type=int, default=1, help="GPUs on this node")
    args = ap.parse_args()

    size = dict(SIZES[args.size])
    if args.tasks:
        size["tasks"] = args.tasks.split(",")
    if args.seeds:
        size["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.objectives:
        size["objectives"] = args.objectives.split(",")
    if size["objectives"][0] != "original":
        raise SystemExit("--objectives must start with original (the NLL baseline)")
    if size.get("mechanism_task") not in size["tasks"]:
        size["mechanism_task"], size["mechanism_objectives"] = None, []
    work = Path(args.work or f"outputs/continuum_sweep_{args.size}").absolute()
    if not args.dry_run:
        work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, dry_run=args.dry_run)
    if args.size == "full":
        if not args.report_only:
            full_sweep(args, size, runner)
        if not args.dry_run:
            report(work, args.size, size, Path(args.out), args.note)
        return 0
    if not args.report_only:
        sweep = SmallSweep(work, size, runner)
        sweep.run_all()
    if not args.dry_run:
        report(work, args.size, size, Path(args.out), args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
