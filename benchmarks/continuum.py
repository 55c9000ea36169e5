"""The paper's sign pattern at small scale: NLL vs -p on a model-strong and a model-weak task.

SmolLM2-135M-Instruct is fine-tuned with ``original`` (NLL) and ``p`` (-p) on

* a model-strong task: two-digit addition in the model's own answer style (its base
  accuracy is already high; the probe puts it at the strong end), and
* a model-weak task: figlet-font decoding (near-zero prior; the probe puts it at the weak end),

for several seeds, then evaluated with vLLM (greedy; exact match, and Jaro-Winkler for
figfont). The paper predicts -p >= NLL on the strong task and NLL > -p on the weak one.
Results (JSON + markdown, mean and spread over seeds) go to benchmarks/results/ named by
device; the conclusion is printed whichever way it comes out.

    python benchmarks/continuum.py                   # CPU, reduced size
    python benchmarks/continuum.py --size full       # a GPU machine
    python benchmarks/continuum.py --dry-run         # print every stage's command, run nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import device_name, device_tag, write_results

from probsft_megatron.demo import Stages, _probsft, _write_jsonl, arithmetic_records

SIZES = {
    # train examples, test examples, epochs, global batch, max length
    "small": dict(strong=(192, 64), weak=(64, 32), epochs=1, batch=16, strong_len=64, weak_len=384),
    "full": dict(
        strong=(4000, 500), weak=(8000, 500), epochs=1, batch=64, strong_len=64, weak_len=800
    ),
}


class DryStages:
    """Prints each stage's command instead of running it (``--dry-run``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.names: list[str] = []

    def run(self, name: str, argv: list[str], done: Path | None = None) -> None:
        self.names.append(name)
        print(f"[dry-run] {name}: {' '.join(argv)}")


def make_tasks(work: Path, size: dict, tok) -> dict[str, dict]:
    """The two tasks' settings; their data files are written unless ``tok`` is None."""
    from probsft_megatron.figfont import figfont_records

    if tok is None:
        return {
            "strong (addition)": dict(
                dir=work / "data" / "strong", max_len=size["strong_len"], grader="exact", max_new=24
            ),
            "weak (figfont)": dict(
                dir=work / "data" / "weak",
                max_len=size["weak_len"],
                grader="jaro_winkler",
                max_new=12,
            ),
        }

    def chat(prompt: str) -> str:
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    tasks = {}
    n_train, n_test = size["strong"]
    d = work / "data" / "strong"
    d.mkdir(parents=True, exist_ok=True)
    _write_jsonl(d / "train.jsonl", arithmetic_records(n_train, 0))
    _write_jsonl(
        d / "test.jsonl",
        [
            {"prompt": chat(r["prompt"]), "reference": r["response"]}
            for r in arithmetic_records(n_test, 1000)
        ],
    )
    tasks["strong (addition)"] = dict(dir=d, max_len=size["strong_len"], grader="exact", max_new=24)
    n_train, n_test = size["weak"]
    d = work / "data" / "weak"
    d.mkdir(parents=True, exist_ok=True)
    _write_jsonl(
        d / "train.jsonl",
        [
            {"prompt": r["prompt"], "response": r["response"]}
            for r in figfont_records("train", n=n_train)
        ],
    )
    _write_jsonl(
        d / "test.jsonl",
        [
            {"prompt": chat(r["prompt"]), "reference": r["response"]}
            for r in figfont_records("test", n=n_test)
        ],
    )
    tasks["weak (figfont)"] = dict(
        dir=d, max_len=size["weak_len"], grader="jaro_winkler", max_new=12
    )
    return tasks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--objectives", default="original,p")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--work", default="outputs/continuum")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args()
    size = SIZES[args.size]
    work = Path(args.work).absolute()
    dry = args.dry_run
    if not dry:
        work.mkdir(parents=True, exist_ok=True)
    stages = DryStages() if dry else Stages(work)
    t0 = time.perf_counter()

    model_dir = work / "smollm2-megatron"
    stages.run(
        "convert",
        _probsft("convert", "smollm2", "--out", str(model_dir)),
        done=model_dir / "model_config.json",
    )
    from probsft_megatron.tokenizers import load_tokenizer

    tasks = make_tasks(work, size, None if dry else load_tokenizer(str(model_dir / "hf")))
    rows = []
    for task, spec in tasks.items():
        tag = task.split()[0]
        probe_dir = work / "probe" / tag
        stages.run(
            f"probe-{tag}",
            _probsft(
                "probe",
                "--model",
                str(model_dir),
                "--data",
                str(spec["dir"] / "train.jsonl"),
                "--samples",
                "128",
                "--out",
                str(probe_dir),
                f"data.max_length={spec['max_len']}",
            ),
            done=probe_dir / "report.json",
        )
        probe = {} if dry else json.loads((probe_dir / "report.json").read_text())
        for obj in args.objectives.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                name = f"{tag}-{obj}-s{seed}"
                run = work / "runs" / name
                stages.run(
                    f"train-{name}",
                    [
                        sys.executable,
                        "-m",
                        "probsft_megatron.train",
                        "--config",
                        "demo-smollm2",
                        f"init.checkpoint={model_dir}",
                        f"data.train_files=[{spec['dir'] / 'train.jsonl'}]",
                        f"data.max_length={spec['max_len']}",
                        f"train.epochs={size['epochs']}",
                        f"train.global_batch_size={size['batch']}",
                        f"optim.lr={args.lr}",
                        f"train.seed={seed}",
                        f"loss.objective={obj}",
                        f"train.output_dir={run}",
                    ],
                    done=run / "summary.json",
                )
                ckpt = (
                    str(run / "checkpoints" / "<last>")
                    if dry
                    else json.loads((run / "summary.json").read_text())["checkpoint"]
                )
                stages.run(
                    f"export-{name}",
                    _probsft("convert", "megatron-to-hf", "--ckpt", ckpt, "--out", str(run / "hf")),
                    done=run / "hf" / "config.json",
                )
                stages.run(
                    f"eval-{name}",
                    _probsft(
                        "eval",
                        "--model",
                        str(run / "hf"),
                        "--task",
                        "custom",
                        "--data",
                        str(spec["dir"] / "test.jsonl"),
                        "--grader",
                        spec["grader"],
                        "--prompt-format",
                        "raw",
                        "--max-new-tokens",
                        str(spec["max_new"]),
                        "--temperature",
                        "0",
                        "--n",
                        "1",
                        "--out",
                        str(run / "eval"),
                    ),
                    done=run / "eval" / "summary.json",
                )
                if dry:
                    continue
                samples = [
                    json.loads(x)
                    for x in next((run / "eval").glob("*/samples.jsonl")).read_text().splitlines()
                    if x.strip()
                ]
                rows.append(
                    {
                        "task": task,
                        "objective": obj,
                        "seed": seed,
                        "exact": sum(bool(s["correct"][0]) for s in samples) / len(samples),
                        "score": sum(float(s["scores"][0]) for s in samples) / len(samples)
                        if "scores" in samples[0]
                        else None,
                        "probe_mean_p": probe.get("mean_p"),
                        "placement": probe.get("placement"),
                    }
                )

    if dry:
        print(f"[dry-run] {len(stages.names)} stages; nothing was run or written")
        return 0
    table = [
        "| task | objective | seeds | exact match mean | spread (min-max) | score mean |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict[str, float]] = {}
    for task in tasks:
        for obj in args.objectives.split(","):
            sel = [r for r in rows if r["task"] == task and r["objective"] == obj]
            ex = [r["exact"] for r in sel]
            sc = [r["score"] for r in sel if r["score"] is not None]
            summary.setdefault(task, {})[obj] = statistics.mean(sc or ex)
            score = f"{statistics.mean(sc):.3f}" if sc else "-"
            table.append(
                f"| {task} | {obj} | {len(sel)} | {statistics.mean(ex):.3f} | "
                f"{min(ex):.3f}-{max(ex):.3f} | {score} |"
            )
    verdicts = []
    for task, by_obj in summary.items():
        if {"original", "p"} <= set(by_obj):
            better = (
                "p"
                if by_obj["p"] > by_obj["original"]
                else ("original" if by_obj["original"] > by_obj["p"] else "tie")
            )
            verdicts.append(
                f"{task}: {better} is better ({by_obj['p']:.3f} for p vs "
                f"{by_obj['original']:.3f} for original)"
            )
    result = {
        "device": device_name(),
        "size": args.size,
        "lr": args.lr,
        "rows": rows,
        "verdicts": verdicts,
        "seconds": time.perf_counter() - t0,
        "stage_seconds": stages.times,
    }
    md = [
        f"# Continuum at {args.size} size ({result['device']})",
        "",
        *table,
        "",
        "Paper's prediction: p >= original on the strong task, original > p on the weak task.",
        *[f"- {v}" for v in verdicts],
        "",
        f"Total time: {result['seconds'] / 60:.1f} min.",
    ]
    print("\n".join(md))
    write_results(args.out, f"continuum_{args.size}_{device_tag()}", result, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
