"""Tokenized SFT examples: chat template or plain concatenation, truncation, loss masks.

Prompt/response records and conversations (:mod:`.chat`: every trained assistant turn plus
its end-of-turn token) both become one example each: ``(input_ids, loss_mask)`` by
:meth:`SFTDataset.encode_record`, the per-record function. ``loss_mask`` values are loss
weights: 1 on trained labels (a message's own ``weight`` where a conversation sets one).

Loss-mask convention: ``loss_mask[t] == 1`` iff the *next* token ``input_ids[t + 1]`` is a
response token (the end-of-sequence token that ends the response included), so with
``labels[t] = input_ids[t + 1]`` the loss is exactly the response tokens' negative
log-likelihood. The last position of an example is never trained.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from probsft_megatron.config import DataConfig
from probsft_megatron.data.chat import cut_conversation, load_template, render_conversation
from probsft_megatron.data.records import load_records
from probsft_megatron.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 1024  # examples tokenized per call (bounds the Python-int lists in memory)


def _resolve_template(cfg: DataConfig, tokenizer) -> str | None:
    """The Jinja template to render with, or None for plain concatenation."""
    if cfg.chat_template == "none":
        return None
    if cfg.chat_template == "auto":
        # m23k prompts are already chat-formatted for their model family.
        if cfg.format == "m23k":
            return None
        return getattr(tokenizer, "chat_template", None) or None
    return load_template(cfg.chat_template)


def _prompt_lengths(masks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per example, the tokens before its first trained label plus one (1 when none is
    trained): the prompt of a single-turn example."""
    trained = np.flatnonzero(masks > 0)
    starts, ends = offsets[:-1], offsets[1:]
    k = np.searchsorted(trained, starts)
    first = trained[np.minimum(k, max(len(trained) - 1, 0))] if len(trained) else starts
    inside = (k < len(trained)) & (first < ends)
    return np.where(inside, first - starts, 0).astype(np.int64) + 1


class SFTDataset:
    """Tokenized SFT examples (all in memory, int32 token storage).

    ``dataset[i]`` is ``{"input_ids": LongTensor[n], "loss_mask": FloatTensor[n]}`` with
    ``n <= cfg.max_length`` and ``loss_mask[t] = 1`` iff ``input_ids[t + 1]`` is a response
    token. Every untruncated example ends with the tokenizer's eos token. ``stats``:
    ``n_examples`` (kept), ``n_truncated`` (cut at the right),
    ``n_dropped`` (prompt alone fills ``max_length``), ``n_template_fallback`` (prompt
    tokens were not a prefix of the conversation tokens), ``n_tokens``,
    ``n_response_tokens`` (trained labels); for conversations also ``n_conversations``,
    ``n_turns_trained`` (trained assistant turns in the renders), ``n_turns_kept`` (kept
    whole), ``n_cut_at_turn`` / ``n_cut_inside_turn`` (how truncation cut). ``pad_id`` is
    the tokenizer's pad token (its end-of-sequence token when it has none).
    """

    def __init__(self, cfg: DataConfig, tokenizer, records: list[dict] | None = None):
        """Tokenize ``records`` (default: :func:`load_records` of ``cfg``) in this process.
        :func:`probsft_megatron.data.store.open_dataset` maps a tokenized store instead
        (built once, in parallel) and is what training uses."""
        self._setup(cfg, tokenizer)
        records = load_records(cfg) if records is None else records
        tokens, masks, lengths = self.encode_records(records)
        self._attach(tokens, masks, lengths, len(records))

    def _setup(self, cfg: DataConfig, tokenizer) -> None:
        """The settings every example needs (template, eos, pad) and zeroed ``stats``."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = _resolve_template(cfg, tokenizer)
        if self.template is None and cfg.system_prompt is not None:
            raise ConfigError(
                "data.system_prompt needs a chat template (data.chat_template is "
                "none or the tokenizer has none); put the text into the prompts "
                "or set data.chat_template"
            )
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ConfigError("the tokenizer has no eos_token; SFT responses must end with one")
        self.eos_id = int(eos_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)

        self.stats = {
            "n_examples": 0,
            "n_truncated": 0,
            "n_dropped": 0,
            "n_template_fallback": 0,
            "n_tokens": 0,
            "n_response_tokens": 0,
            "n_conversations": 0,
            "n_turns_trained": 0,
            "n_turns_kept": 0,
            "n_cut_at_turn": 0,
            "n_cut_inside_turn": 0,
        }

    def encode_records(self, records: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every kept record's tokens and loss mask, concatenated (int64, float32), and the
        tokens per kept record; counts into ``stats``."""
        tokens: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for start in range(0, len(records), _TOKENIZE_CHUNK):
            chunk = records[start : start + _TOKENIZE_CHUNK]
            for encoded in self._encode_chunk(chunk):
                if encoded is None:
                    continue
                tokens.append(encoded[0])
                masks.append(encoded[1])
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        if not tokens:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), lengths
        return np.concatenate(tokens), np.concatenate(masks).astype(np.float32), lengths

    def _attach(
        self, tokens: np.ndarray, masks: np.ndarray, lengths: np.ndarray, n_records: int
    ) -> None:
        """Hold the examples :meth:`encode_records` made of ``n_records`` records."""
        if not len(lengths):
            raise DataError(
                f"no usable examples among {n_records} records "
                f"(dropped: {self.stats['n_dropped']}); raise data.max_length"
            )
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self._tokens = np.asarray(tokens).astype(np.int32)
        flat = np.asarray(masks, dtype=np.float32)
        binary = bool(np.all((flat == 0) | (flat == 1)))
        self._masks = flat.astype(np.uint8) if binary else flat  # 1 byte/token when 0/1
        self.prompt_lengths = _prompt_lengths(flat, self._offsets)
        self.stats.update(
            n_examples=len(self.lengths),
            n_tokens=int(self.lengths.sum()),
            n_response_tokens=int((flat > 0).sum()),
        )
        self._warn(n_records)

    @classmethod
    def from_arrays(
        cls, cfg: DataConfig, tokenizer, arrays: dict[str, np.ndarray], stats: dict
    ) -> SFTDataset:
        """The dataset whose :meth:`arrays` are ``arrays`` (e.g. memory-mapped from a
        tokenized store) and whose ``stats`` are ``stats``; nothing is tokenized."""
        ds = cls.__new__(cls)
        ds._setup(cfg, tokenizer)
        ds._tokens, ds._masks = arrays["tokens"], arrays["masks"]
        ds._offsets = np.asarray(arrays["offsets"], dtype=np.int64)
        ds.lengths = np.diff(ds._offsets)
        ds.prompt_lengths = np.asarray(arrays["prompt_lengths"], dtype=np.int64)
        ds.stats.update(stats)
        return ds

    def arrays(self) -> dict[str, np.ndarray]:
        """What :meth:`from_arrays` needs: ``tokens`` (int32), ``masks`` (uint8 0/1 or
        float32 weights), ``offsets`` (int64, ``[n + 1]``), ``prompt_lengths`` (int64)."""
        return {
            "tokens": self._tokens,
            "masks": self._masks,
            "offsets": self._offsets,
            "prompt_lengths": self.prompt_lengths,
        }

    # -- building

    def _encode_chunk(self, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """``(input_ids, loss_mask)`` per record (None: dropped), in record order."""
        out: list = [None] * len(records)
        plain = [i for i, r in enumerate(records) if "messages" not in r]
        for i in range(len(records)):
            if "messages" in records[i]:
                out[i] = self.encode_record(records[i])
        if plain:
            pairs = self._tokenize([records[i] for i in plain])
            for i, (prompt_ids, response_ids) in zip(plain, pairs):
                ids = self._truncate(prompt_ids, response_ids, records[i])
                if ids is not None:
                    mask = np.zeros(len(ids), dtype=np.float32)
                    mask[max(len(prompt_ids), 1) - 1 : len(ids) - 1] = 1.0
                    out[i] = (ids, mask)
        return out

    def encode_record(self, record: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """One record as ``(input_ids int64 [n], loss_mask float32 [n])`` within
        ``max_length`` (the module's loss-mask convention), or None when it is dropped.
        Updates ``stats``. Conversations: :func:`~.chat.render_conversation` and
        :func:`~.chat.cut_conversation`."""
        if "messages" not in record:
            (pair,) = self._tokenize([record])
            ids = self._truncate(*pair, record)
            if ids is None:
                return None
            mask = np.zeros(len(ids), dtype=np.float32)
            mask[max(len(pair[0]), 1) - 1 : len(ids) - 1] = 1.0
            return ids, mask
        where = record.get("origin", "a record")
        if self.template is None:
            raise ConfigError(
                f"{where} is a conversation but there is no chat template (data.chat_template "
                "is none or the tokenizer has none); set data.chat_template (e.g. chatml, "
                "qwen2.5, llama-3)"
            )
        messages = record["messages"]
        if self.cfg.system_prompt is not None and messages[0]["role"] != "system":
            system = {"role": "system", "content": self.cfg.system_prompt, "weight": 0.0}
            messages = [system, *messages]
        rendered = render_conversation(
            self.tokenizer, messages, self.template, record.get("tools"), where
        )
        limit = self.cfg.max_length
        if len(rendered.ids) > limit and self.cfg.truncation == "error":
            raise DataError(
                f"{where} has {len(rendered.ids)} tokens, more than data.max_length={limit}; "
                "raise data.max_length or set data.truncation=turn"
            )
        cut = cut_conversation(rendered, limit, self.cfg.truncation)
        self.stats["n_conversations"] += 1
        if cut is None:
            self.stats["n_dropped"] += 1
            return None
        self.stats["n_turns_trained"] += cut.turns_trained
        self.stats["n_turns_kept"] += cut.turns_kept
        if cut.cut is not None:
            self.stats["n_truncated"] += 1
            self.stats["n_cut_at_turn" if cut.cut == "turn" else "n_cut_inside_turn"] += 1
        return cut.ids, cut.loss_mask

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _render(self, record: dict, with_response: bool) -> str:
        messages = [{"role": "user", "content": record["prompt"]}]
        if self.cfg.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        if with_response:
            messages.append({"role": "assistant", "content": record["response"]})
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=not with_response,
            )
        except Exception as exc:  # Jinja errors surface as several exception types
            raise ConfigError(
                f"the chat template failed on {record.get('origin', 'a record')}: {exc}"
            ) from None

    def _tokenize(self, records: list[dict]) -> list[tuple[list[int], list[int]]]:
        """``(prompt_ids, response_ids)`` per record, before truncation."""
        if self.template is None:
            prompts = self._encode([r["prompt"] for r in records])
            responses = self._encode([r["response"] for r in records])
            return [(p, r + [self.eos_id]) for p, r in zip(prompts, responses)]
        prompt_texts = [self._render(r, with_response=False) for r in records]
        full_texts = [self._render(r, with_response=True) for r in records]
        prompts = self._encode(prompt_texts)
        fulls = self._encode(full_texts)
        out = []
        for record, p_text, f_text, p_ids, f_ids in zip(
            records, prompt_texts, full_texts, prompts, fulls
        ):
            if f_ids[: len(p_ids)] == p_ids:
                response_ids = f_ids[len(p_ids) :]
            else:
                # Token boundaries differ (or the template renders the prompt differently
                # once an answer follows): concatenate prompt and response tokens instead.
                self.stats["n_template_fallback"] += 1
                if f_text.startswith(p_text):
                    response_ids = self._encode([f_text[len(p_text) :]])[0]
                else:
                    response_ids = self._encode([record["response"]])[0] + [self.eos_id]
            if self.eos_id in response_ids:
                # Stop at the end-of-sequence token: what a template renders after it
                # (e.g. a newline after <|im_end|>) is never generated, so never trained.
                last = len(response_ids) - 1 - response_ids[::-1].index(self.eos_id)
                response_ids = response_ids[: last + 1]
            else:
                # The turn ends with a token other than eos (a base model's tokenizer, e.g.
                # Qwen2.5: eos <|endoftext|>, turns end with <|im_end|>): generation stops at
                # eos, so the example must end with it.
                response_ids = response_ids + [self.eos_id]
            out.append((p_ids, response_ids))
        return out

    def _truncate(
        self, prompt_ids: list[int], response_ids: list[int], record: dict
    ) -> np.ndarray | None:
        """The example's tokens within ``max_length``, or None when it is dropped."""
        limit = self.cfg.max_length
        n = len(prompt_ids) + len(response_ids)
        if n > limit:
            if self.cfg.truncation == "error":
                raise DataError(
                    f"{record.get('origin', 'an example')} has {n} tokens, more than "
                    f"data.max_length={limit}; raise data.max_length or set "
                    "data.truncation=right"
                )
            if len(prompt_ids) >= limit:
                self.stats["n_dropped"] += 1
                return None
            self.stats["n_truncated"] += 1
        return np.array((prompt_ids + response_ids)[:limit], dtype=np.int64)

    def _warn(self, n_records: int) -> None:
        s, limit = self.stats, self.cfg.max_length
        if s["n_truncated"]:
            logger.warning(
                "%d of %d examples were longer than data.max_length=%d tokens and were "
                "cut (data.truncation=%s); raise data.max_length to keep them whole",
                s["n_truncated"],
                n_records,
                limit,
                self.cfg.truncation,
            )
        if s["n_conversations"] and s["n_turns_kept"] < s["n_turns_trained"]:
            logger.warning(
                "conversations: %d of %d trained assistant turns kept whole (%d cut after a "
                "whole turn, %d cut inside a turn, whose end-of-turn token is then not trained)",
                s["n_turns_kept"],
                s["n_turns_trained"],
                s["n_cut_at_turn"],
                s["n_cut_inside_turn"],
            )
        if s["n_dropped"]:
            logger.warning(
                "%d of %d examples were dropped: their prompt alone fills "
                "data.max_length=%d tokens; raise data.max_length to keep them",
                s["n_dropped"],
                n_records,
                limit,
            )
        if s["n_template_fallback"]:
            logger.warning(
                "%d of %d examples: the chat template's prompt tokens are not a prefix "
                "of the whole conversation's tokens; their prompt and response were "
                "tokenized separately and concatenated",
                s["n_template_fallback"],
                n_records,
            )

    # -- access

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        ids = torch.from_numpy(self._tokens[a:b].astype(np.int64))
        loss_mask = torch.from_numpy(self._masks[a:b].astype(np.float32))
        return {"input_ids": ids, "loss_mask": loss_mask}
