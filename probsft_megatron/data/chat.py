"""Conversations: render with the tokenizer's chat template, mark the trained tokens, cut.

Trained: each trained assistant message's tokens plus its end-of-turn token, nothing else, located
by the template's ``{% generation %}`` blocks or, for any template, by prefix renders
(docs/data.md); a token is trained when any of its characters is."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probsft_megatron.errors import ConfigError, DataError


def has_generation_blocks(template: str | None) -> bool:
    """Whether ``template`` marks assistant text with ``{% generation %}`` blocks."""
    return bool(template) and bool(re.search(r"\{%-?\s*generation\s*-?%\}", template))


def load_template(spec: str) -> str:
    """The Jinja text of a shipped template's name (``qwen2.5``) or a ``.jinja`` file;
    ``spec`` itself when it is a Jinja string."""
    from probsft_megatron.config import CHAT_TEMPLATES
    from probsft_megatron.resources import packaged_configs

    if spec in CHAT_TEMPLATES:
        path = packaged_configs() / "chat_templates" / f"{spec}.jinja"
    elif spec.endswith(".jinja") and "{" not in spec:
        path = Path(spec).expanduser()
    else:
        return spec
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"data.chat_template={spec!r}: cannot read {path} ({exc.strerror or exc}); "
            "name a readable .jinja file or a shipped template"
        ) from None


@dataclass
class Rendered:
    """One conversation rendered (``text``) and tokenized (``ids``, character ``offsets``);
    per assistant message the token range it trains (``spans``) and its loss weight (``weights``);
    ``method``: ``generation`` or ``prefix``."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    spans: list[tuple[int, int]]
    weights: list[float]
    method: str


def _apply(tokenizer, messages, template, tools, where: str, **kwargs):
    """``apply_chat_template`` (the text unless ``kwargs`` ask for tokens); DataError on error."""
    kwargs.setdefault("tokenize", False)
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tools=tools or None, **kwargs
        )
    except Exception as exc:  # Jinja raises several exception types
        raise DataError(f"{where}: the chat template failed on this conversation: {exc}") from None


def _prefix_spans(tokenizer, messages, template, tools, text, offsets, where) -> list:
    # the text of every special token (end-of-turn markers among them)
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials.update(t.content for t in decoder.values() if getattr(t, "special", False))
    specials.discard("")
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _apply(tokenizer, messages[:i], template, tools, where, add_generation_prompt=True)
        upto = _apply(tokenizer, messages[: i + 1], template, tools, where)
        if not (text.startswith(head) and text.startswith(upto) and len(upto) > len(head)):
            raise DataError(
                f"{where}: the chat template renders the conversation up to message {i} "
                "differently from the whole conversation, so its assistant turns cannot be "
                "located; use a template with {% generation %} blocks (data.chat_template="
                "qwen2.5, llama-3, chatml or your own)"
            )
        start = len(head)
        ends = [upto.rfind(s, start) + len(s) for s in specials if upto.rfind(s, start) >= 0]
        end = max(ends, default=len(upto))
        # the tokens with a character in [start, end)
        hit = [k for k, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        spans.append((hit[0], hit[-1] + 1) if hit else (0, 0))
    return spans


def _generation_spans(tokenizer, messages, template, tools, ids, where) -> list | None:
    """Spans from the template's generation blocks; None when they do not line up one run
    per assistant message (the caller then uses the prefix method)."""
    kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    out = _apply(tokenizer, messages, template, tools, where, **kwargs)
    if list(out["input_ids"]) != list(ids):
        return None
    edges = np.flatnonzero(np.diff(np.array([0, *out["assistant_masks"], 0], dtype=bool))).tolist()
    runs = list(zip(edges[::2], edges[1::2]))  # [start, end) of each run of assistant tokens
    return runs if len(runs) == sum(m["role"] == "assistant" for m in messages) else None


def render_conversation(
    tokenizer, messages: list[dict], template: str, tools=None, where: str = "a record"
) -> Rendered:
    """Render, tokenize and locate the assistant spans of one conversation (module doc)."""
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    text = _apply(tokenizer, clean, template, tools, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    gen = has_generation_blocks(template)
    spans = _generation_spans(tokenizer, clean, template, tools, ids, where) if gen else None
    method = "prefix" if spans is None else "generation"
    if spans is None:
        spans = _prefix_spans(tokenizer, clean, template, tools, text, offsets, where)
    weights = [float(m.get("weight", 1.0)) for m in messages if m["role"] == "assistant"]
    return Rendered(text, ids, offsets, spans, weights, method)


@dataclass(frozen=True)
class Cut:
    """A conversation's ``ids`` and ``loss_mask`` within ``max_length``; trained assistant
    turns kept whole (``turns_kept``) of those rendered (``turns_trained``); ``cut``: None,
    ``"turn"`` (after a whole turn) or ``"inside"`` (a turn lost its end-of-turn token)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    turns_kept: int
    turns_trained: int
    cut: str | None


def cut_conversation(rendered: Rendered, max_length: int, mode: str) -> Cut | None:
    """``rendered`` within ``max_length`` tokens (None: no trained token would remain).
    ``mode`` ``turn``: end after the last trained turn that fits whole (else as ``right``);
    ``right``: cut at ``max_length``; ``error`` is the caller's."""
    weights = np.zeros(len(rendered.ids), dtype=np.float32)
    for (a, b), w in zip(rendered.spans, rendered.weights):
        weights[a:b] = w
    ids = np.asarray(rendered.ids, dtype=np.int64)
    trained = [(a, b) for (a, b), w in zip(rendered.spans, rendered.weights) if w > 0 and b > a]
    cut, kept = None, len(trained)
    if len(ids) > max_length:
        whole = [b for a, b in trained if b <= max_length]
        if mode == "turn" and whole:
            end, cut = whole[-1], "turn"
        else:
            end = max_length
            cut = "inside" if any(a < end < b for a, b in trained) else "turn"
        kept = sum(b <= end for _, b in trained)  # the spans are in order
        ids, weights = ids[:end], weights[:end]
    label_mask = np.zeros(len(ids), dtype=np.float32)
    label_mask[:-1] = weights[1:]
    if not (label_mask > 0).any():
        return None
    return Cut(ids, label_mask, kept, len(trained), cut)
