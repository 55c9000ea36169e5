"""Tokenized SFT examples: every record (prompt/response, or a conversation via :mod:`.chat`)
becomes one ``(input_ids, loss_mask)``, with chat template or plain concatenation, truncated;
the mask's values are loss weights (label convention: :mod:`probsft_megatron.data`)."""

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
STATS = tuple(
    """n_examples n_truncated n_dropped n_template_fallback n_tokens n_response_tokens
    n_conversations n_turns_trained n_turns_kept n_cut_at_turn n_cut_inside_turn""".split()
)


class SFTDataset:
    """``dataset[i]``: ``{"input_ids": LongTensor[n], "loss_mask": FloatTensor[n]}``, ``n <=
    cfg.max_length``, every untruncated example ending with eos. ``stats``: the :data:`STATS`
    counts (docs/data.md); ``pad_id``: the tokenizer's pad token (else its eos token)."""

    def __init__(self, cfg: DataConfig, tokenizer, records: list[dict] | None = None):
        """Tokenize ``records`` (default: :func:`load_records` of ``cfg``) in this process;
        training maps a store instead (:func:`probsft_megatron.data.store.open_dataset`)."""
        self._setup(cfg, tokenizer)
        records = load_records(cfg) if records is None else records
        arrays = self.encode_records(records)
        self.finish(len(arrays["prompt_lengths"]), len(arrays["tokens"]), len(records))
        self._hold(arrays)

    @classmethod
    def encoder(cls, cfg: DataConfig, tokenizer) -> SFTDataset:
        """A dataset holding no examples yet, for :meth:`encode_records` (the store's builder)."""
        ds = cls.__new__(cls)
        ds._setup(cfg, tokenizer)
        return ds

    @classmethod
    def from_arrays(
        cls, cfg: DataConfig, tokenizer, arrays: dict[str, np.ndarray], stats: dict
    ) -> SFTDataset:
        """The dataset of ``arrays`` (:meth:`encode_records`' keys; a store's) and ``stats``."""
        ds = cls.encoder(cfg, tokenizer)
        ds._hold(arrays)
        ds.stats.update(stats)
        return ds

    def _setup(self, cfg: DataConfig, tokenizer) -> None:
        """The settings every example needs (template, eos, pad) and zeroed ``stats``."""
        self.cfg, self.tokenizer = cfg, tokenizer
        # the Jinja template to render with, or None for plain concatenation
        if cfg.chat_template == "none" or (cfg.chat_template == "auto" and cfg.format == "m23k"):
            self.template = None  # m23k prompts are already chat-formatted for their model family
        elif cfg.chat_template == "auto":
            self.template = getattr(tokenizer, "chat_template", None) or None
        else:
            self.template = load_template(cfg.chat_template)
        if self.template is None and cfg.system_prompt is not None:
            raise ConfigError(
                "data.system_prompt needs a chat template (data.chat_template is none or the "
                "tokenizer has none); put the text into the prompts or set data.chat_template"
            )
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token; SFT responses must end with one")
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)
        self.stats = dict.fromkeys(STATS, 0)

    def _hold(self, arrays: dict[str, np.ndarray]) -> None:
        self._tokens, self._masks = arrays["tokens"], arrays["masks"]
        self._offsets = np.asarray(arrays["offsets"], dtype=np.int64)
        self.lengths = np.diff(self._offsets)
        self.prompt_lengths = np.asarray(arrays["prompt_lengths"], dtype=np.int64)

    def encode_records(self, records: list[dict]) -> dict[str, np.ndarray]:
        """The kept records' examples: ``tokens`` (int32) and ``masks`` (uint8 when every weight
        is 0/1, else float32) concatenated, ``offsets``, ``prompt_lengths``; counts in ``stats``."""
        chunks = (records[k : k + _TOKENIZE_CHUNK] for k in range(0, len(records), _TOKENIZE_CHUNK))
        kept = [example for c in chunks for example in self._encode_chunk(c) if example is not None]
        tokens = np.concatenate([np.zeros(0, np.int64), *(ids for ids, _ in kept)])
        masks = np.concatenate([np.zeros(0, np.float32), *(m for _, m in kept)])
        offsets = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in kept])]).astype(np.int64)
        # the prompt of a single-turn example: the tokens before its first trained label, + 1
        prompts = np.array([np.argmax(m > 0) + 1 for _, m in kept], dtype=np.int64)
        self.stats["n_response_tokens"] += int((masks > 0).sum())
        binary = bool(np.all((masks == 0) | (masks == 1)))
        return {
            "tokens": tokens.astype(np.int32),
            "masks": masks.astype(np.uint8) if binary else masks,  # 1 byte/token when 0/1
            "offsets": offsets,
            "prompt_lengths": prompts,
        }

    def finish(self, n_examples: int, n_tokens: int, n_records: int) -> None:
        """Record the totals of ``n_records`` encoded records and warn about what was cut;
        DataError when none was kept."""
        if not n_examples:
            raise DataError(
                f"no usable examples among {n_records} records "
                f"(dropped: {self.stats['n_dropped']}); raise data.max_length"
            )
        self.stats.update(n_examples=n_examples, n_tokens=n_tokens)
        s, limit = self.stats, self.cfg.max_length
        if s["n_truncated"]:
            logger.warning(
                f"{s['n_truncated']} of {n_records} examples were longer than data.max_length="
                f"{limit} tokens and were cut (data.truncation={self.cfg.truncation}); raise "
                "data.max_length to keep them whole"
            )
        if s["n_conversations"] and s["n_turns_kept"] < s["n_turns_trained"]:
            logger.warning(
                f"conversations: {s['n_turns_kept']} of {s['n_turns_trained']} trained assistant "
                f"turns kept whole ({s['n_cut_at_turn']} cut after a whole turn, "
                f"{s['n_cut_inside_turn']} cut inside a turn, whose end-of-turn token is then "
                "not trained)"
            )
        if s["n_dropped"]:
            logger.warning(
                f"{s['n_dropped']} of {n_records} examples were dropped: their prompt alone "
                f"fills data.max_length={limit} tokens; raise data.max_length to keep them"
            )
        if s["n_template_fallback"]:
            logger.warning(
                f"{s['n_template_fallback']} of {n_records} examples: the chat template's prompt "
                "tokens are not a prefix of the whole conversation's tokens; their prompt and "
                "response were tokenized separately and concatenated"
            )

    def _encode_chunk(self, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """``(input_ids, loss_mask)`` per record (None: dropped), in record order."""
        out = [self._conversation(r) if "messages" in r else None for r in records]
        plain = [i for i, r in enumerate(records) if "messages" not in r]
        pairs = self._tokenize([records[i] for i in plain])
        for i, (prompt_ids, response_ids) in zip(plain, pairs):
            out[i] = self._truncate(prompt_ids, response_ids, records[i])
        return out

    def _conversation(self, record: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """A conversation's example (:func:`~.chat.render_conversation`, then
        :func:`~.chat.cut_conversation`), or None when it is dropped."""
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
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

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
        out = []
        for record, p_text, f_text, p_ids, f_ids in zip(
            records, prompt_texts, full_texts, self._encode(prompt_texts), self._encode(full_texts)
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
                # What a template renders after eos (ChatML's newline) is never generated.
                last = len(response_ids) - 1 - response_ids[::-1].index(self.eos_id)
                response_ids = response_ids[: last + 1]
            else:
                # Turns end with a token other than eos (Qwen2.5 base: <|im_end|>, eos
                # <|endoftext|>); generation stops at eos, so the example must end with it.
                response_ids = response_ids + [self.eos_id]
            out.append((p_ids, response_ids))
        return out

    def _truncate(
        self, prompt_ids: list[int], response_ids: list[int], record: dict
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The example's ``(input_ids, loss_mask)`` within ``max_length`` (None: dropped)."""
        limit = self.cfg.max_length
        n = len(prompt_ids) + len(response_ids)
        if n > limit:
            if self.cfg.truncation == "error":
                raise DataError(
                    f"{record.get('origin', 'an example')} has {n} tokens, more than "
                    f"data.max_length={limit}; raise data.max_length or set data.truncation=right"
                )
            if len(prompt_ids) >= limit:
                self.stats["n_dropped"] += 1
                return None
            self.stats["n_truncated"] += 1
        ids = np.array((prompt_ids + response_ids)[:limit], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.float32)
        mask[max(len(prompt_ids), 1) - 1 : len(ids) - 1] = 1.0
        return ids, mask

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        ids = torch.from_numpy(self._tokens[a:b].astype(np.int64))
        loss_mask = torch.from_numpy(self._masks[a:b].astype(np.float32))
        return {"input_ids": ids, "loss_mask": loss_mask}
