"""Hugging Face <-> Megatron checkpoint conversion.

Subjects: tiny random Qwen2 (untied and tied), Llama-3 (GQA + llama3 rope scaling) and
deepseek-math-style Llama (no GQA) models written by transformers; SmolLM2-135M-Instruct's
real weights (the embedded default); a tiny Qwen2 with the real Qwen tokenizer (vocab_size
151936) on real text.

* Logits parity with transformers in fp32, max |diff| <= 1e-4, at TP=1, TP=2 and PP=2: the
  converted torch_dist checkpoint is loaded (resharded) by a torchrun worker that builds the
  model the way training does. SmolLM2 has 9 heads / 3 kv heads, so TP=2 is impossible for
  it; it runs at TP=1 and PP=2, and the TP=2 refusal is tested instead.
* Negative controls through the same checker: plain [Q;K;V] concatenation, [up; gate]
  order and interleaved RoPE must produce a large diff.
* HF -> Megatron -> HF is bit-exact (tensors, dtypes, config and tokenizer files).
* Refusals are one line naming the field; failed writes leave nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_torchrun
from mp.tiny_hf import qwen_tokenizer, tiny_hf_checkpoint
from probsft_megatron import compat, manifest
from probsft_megatron import model_dir as layout
from probsft_megatron.cli import main
from probsft_megatron.converters import api, mapping, megatron_io
from probsft_megatron.errors import CheckpointError, ConfigError, ProbsftError
from probsft_megatron.model import ModelConfig, ParallelConfig

TOL = 1e-4
CONTROL_MIN_DIFF = 1e-2
SEQ = 64
TINY_KINDS = ("qwen2", "qwen2_tied", "llama3", "deepseek")
SUBJECTS = (*TINY_KINDS, "qwen_tokenizer", "smollm2")
TEXTS = [
    "The quick brown fox jumps over the lazy dog. Megatron splits each weight matrix across "
    "tensor-parallel ranks, and the converter must put every head where the kernel expects it.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n# 数学: 1 + 1 = 2, "
    "naïve café résumé — and the answer is 42.",
]


def max_abs_diff(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """The parity checker: max |logit difference| (inf on a shape mismatch)."""
    if reference.shape != candidate.shape:
        return float("inf")
    return (reference.double() - candidate.double()).abs().max().item()


def text_tokens(hf_dir: Path) -> torch.Tensor:
    """The two texts tokenized and cut to a common length: ``[2, s]``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = [tok(t)["input_ids"] for t in TEXTS]
    n = min(len(i) for i in ids)
    assert n >= 32, n
    return torch.tensor([i[:n] for i in ids])


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits.float()


def plain_qkv_views(param, model):
    """Negative control: q, k, v stacked as [Q; K; V] instead of grouped per kv head."""
    q = model.num_attention_heads * model.head_dim
    kv = model.num_query_groups * model.head_dim
    return param[:q], param[q : q + kv], param[q + kv :]


def swapped_fc1_views(param, model):
    """Negative control: [up; gate] instead of [gate; up]."""
    f = model.ffn_hidden_size
    return param[f:], param[:f]


@pytest.fixture(scope="module")
def subjects(tmp_path_factory, smollm2_megatron) -> dict[str, dict]:
    """name -> {hf, megatron, tokens, reference logits}; plus the negative-control dirs."""
    root = tmp_path_factory.mktemp("convert")
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict] = {}
    for kind in TINY_KINDS:
        hf = tiny_hf_checkpoint(root / kind, kind, seed=len(out))
        out[kind] = {"hf": hf, "tokens": torch.randint(0, 512, (2, SEQ), generator=gen)}
    tok = qwen_tokenizer()
    hf = tiny_hf_checkpoint(
        root / "qwen_tokenizer",
        "qwen2_tied",
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        tokenizer_dir=tok,
    )
    out["qwen_tokenizer"] = {"hf": hf, "tokens": text_tokens(hf)}
    smollm2 = smollm2_megatron
    smollm2_hf = Path(layout.read_model_dir(smollm2).source["hf_path"])
    out["smollm2"] = {"hf": smollm2_hf, "megatron": smollm2, "tokens": text_tokens(smollm2_hf)}
    for name, s in out.items():
        if "megatron" not in s:
            s["megatron"] = api.hf_to_megatron(s["hf"], root / f"{name}_megatron").path
        s["reference"] = hf_logits(s["hf"], s["tokens"])
        torch.save(s["tokens"], root / f"{name}_tokens.pt")
        s["tokens_file"] = root / f"{name}_tokens.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mapping, "qkv_views", plain_qkv_views)
        out["qwen2"]["control_qkv_concat"] = api.hf_to_megatron(
            out["qwen2"]["hf"], root / "qkv_concat"
        ).path
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mapping, "fc1_views", swapped_fc1_views)
        out["qwen2"]["control_up_gate"] = api.hf_to_megatron(
            out["qwen2"]["hf"], root / "up_gate"
        ).path
    out["_root"] = root
    return out


def _run_logits(subjects: dict, nproc: int, jobs: list[dict]) -> dict[str, torch.Tensor]:
    root = subjects["_root"]
    for job in jobs:
        job["out"] = str(root / f"{job.pop('name')}.pt")
    jobs_file = root / f"jobs_{nproc}.json"
    jobs_file.write_text(json.dumps(jobs))
    run_torchrun("convert_worker.py", nproc, ["logits", "--jobs", str(jobs_file)], timeout=400)
    return {Path(j["out"]).stem: torch.load(j["out"]) for j in jobs}


def _job(subjects, name, tp, pp, tag, model_dir=None, **overrides) -> dict:
    s = subjects[name]
    return {
        "name": f"{name}_{tag}",
        "model_dir": str(model_dir or s["megatron"]),
        "tokens": str(s["tokens_file"]),
        "tp": tp,
        "pp": pp,
        "overrides": overrides,
    }


@pytest.fixture(scope="module")
def single_rank(subjects) -> dict[str, torch.Tensor]:
    """TP=1 logits of every subject and of the three negative controls (one torchrun)."""
    jobs = [_job(subjects, name, 1, 1, "tp1") for name in SUBJECTS]
    q = subjects["qwen2"]
    jobs += [
        _job(subjects, "qwen2", 1, 1, "control_qkv_concat", q["control_qkv_concat"]),
        _job(subjects, "qwen2", 1, 1, "control_up_gate", q["control_up_gate"]),
        _job(subjects, "qwen2", 1, 1, "control_rope_interleaved", rotary_interleaved=True),
    ]
    return _run_logits(subjects, 1, jobs)


@pytest.fixture(scope="module")
def two_ranks(subjects) -> dict[str, torch.Tensor]:
    """TP=2 (all but SmolLM2) and PP=2 logits (one torchrun with two processes)."""
    jobs = [_job(subjects, name, 2, 1, "tp2") for name in SUBJECTS if name != "smollm2"]
    jobs += [_job(subjects, name, 1, 2, "pp2") for name in SUBJECTS]
    return _run_logits(subjects, 2, jobs)


# ------------------------------------------------------------------ logits parity (multi-rank)
def _assert_logits_match(subjects, runs: dict, name: str, layout: str) -> None:
    diff = max_abs_diff(subjects[name]["reference"], runs[f"{name}_{layout}"])
    print(f"{name} {layout.upper()}: max |diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.multirank
@pytest.mark.parametrize("name", SUBJECTS)
def test_logits_parity_tp1(subjects, single_rank, name):
    _assert_logits_match(subjects, single_rank, name, "tp1")


@pytest.mark.multirank
@pytest.mark.parametrize("name", [n for n in SUBJECTS if n != "smollm2"])
def test_logits_parity_tp2(subjects, two_ranks, name):
    _assert_logits_match(subjects, two_ranks, name, "tp2")


@pytest.mark.multirank
@pytest.mark.parametrize("name", SUBJECTS)
def test_logits_parity_pp2(subjects, two_ranks, name):
    _assert_logits_match(subjects, two_ranks, name, "pp2")


@pytest.mark.multirank
@pytest.mark.parametrize("control", ["qkv_concat", "up_gate", "rope_interleaved"])
def test_negative_controls_are_detected(subjects, single_rank, control):
    diff = max_abs_diff(subjects["qwen2"]["reference"], single_rank[f"qwen2_control_{control}"])
    print(f"control {control}: max |diff| = {diff:.2e}")
    assert diff > CONTROL_MIN_DIFF


def test_smollm2_cannot_run_at_tp2(subjects):
    """SmolLM2's 9 heads / 3 kv heads do not split over 2 ranks: refused before any group."""
    model = layout.read_model_dir(subjects["smollm2"]["megatron"]).model
    assert (model.num_attention_heads, model.num_query_groups) == (9, 3)
    with pytest.raises(ConfigError, match="num_attention_heads=9 is not divisible"):
        ParallelConfig(tensor_model_parallel_size=2).validate(2, model)


def test_qwen_tokenizer_subject(subjects):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(subjects["qwen_tokenizer"]["hf"])
    assert len(tok) == 151646
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert layout.read_model_dir(subjects["qwen_tokenizer"]["megatron"]).model.vocab_size == 151936


# ------------------------------------------------------------------ round trips
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", SUBJECTS)
def test_roundtrip_is_bit_exact(subjects, tmp_path, name):
    s = subjects[name]
    export = api.megatron_to_hf(s["megatron"], tmp_path / "export")
    src, got = _tensors(s["hf"]), _tensors(export)
    assert sorted(got) == sorted(src)
    for key, value in src.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    src_cfg = json.loads((s["hf"] / "config.json").read_text())
    assert json.loads((export / "config.json").read_text()) == src_cfg
    if src_cfg.get("tie_word_embeddings"):
        assert "lm_head.weight" not in got
    for f in s["hf"].iterdir():
        if (
            f.is_file()
            and f.name != "config.json"
            and not f.name.startswith(".")
            and not f.name.endswith(layout.WEIGHT_FILE_SUFFIXES)
        ):
            assert (export / f.name).read_bytes() == f.read_bytes(), f.name


def test_sharded_bf16_source_and_export(tmp_path):
    """A sharded bf16 source (index file) converts in bf16 and exports sharded again;
    transformers loads the export and reproduces the source's logits exactly."""
    from transformers import AutoModelForCausalLM

    fp32 = tiny_hf_checkpoint(tmp_path / "fp32", "llama3")
    source = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16)
    source.save_pretrained(tmp_path / "bf16", max_shard_size="300KB")
    assert (tmp_path / "bf16" / api.SAFETENSORS_INDEX).is_file()
    md = api.hf_to_megatron(tmp_path / "bf16", tmp_path / "megatron")
    assert md.dtype == "bfloat16"
    export = api.megatron_to_hf(md.path, tmp_path / "export", max_shard_size="200KB")
    index = json.loads((export / api.SAFETENSORS_INDEX).read_text())
    files = sorted(export.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    src, got = _tensors(tmp_path / "bf16"), _tensors(export)
    assert sorted(src) == sorted(got) and all(torch.equal(src[k], got[k]) for k in src)
    tokens = torch.randint(0, 512, (1, 16))
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, source(tokens).logits)
    md32 = api.hf_to_megatron(tmp_path / "bf16", tmp_path / "megatron32", dtype="float32")
    stored = compat.checkpoint_tensor_dtype(str(md32.weights), "embedding.word_embeddings.weight")
    assert stored == torch.float32


def test_cli_roundtrip_with_template(tmp_path, capsys):
    hf = tiny_hf_checkpoint(tmp_path / "hf", "deepseek")
    assert main(["convert", "hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "mg")]) == 0
    # Without hf/ the export needs --hf-template for the config and tokenizer files.
    (tmp_path / "bare").mkdir()
    for part in (layout.MODEL_CONFIG_FILE, layout.WEIGHTS_DIR):
        (tmp_path / "mg" / part).rename(tmp_path / "bare" / part)
    manifest.write_manifest(tmp_path / "bare", manifest.MODEL_DIR)
    assert (
        main(
            [
                "convert",
                "megatron-to-hf",
                "--ckpt",
                str(tmp_path / "bare"),
                "--out",
                str(tmp_path / "out"),
                "--hf-template",
                str(hf),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == [str(tmp_path / "mg"), str(tmp_path / "out")]
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (hf / "config.json").read_text()
    )
    # Without any template a config is generated; transformers still loads the weights.
    api.megatron_to_hf(tmp_path / "bare", tmp_path / "generated")
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 512, (1, 16))
    assert max_abs_diff(hf_logits(hf, tokens), hf_logits(tmp_path / "generated", tokens)) == 0.0
    assert json.loads((tmp_path / "generated" / "generation_config.json").read_text()) == {}
    generated = AutoModelForCausalLM.from_pretrained(tmp_path / "generated")
    assert generated.config.num_key_value_heads == 4


# ------------------------------------------------------------------ refusals, one line each
def _write_config(folder: Path, kind: str = "llama3", **changes) -> Path:
    from mp.tiny_hf import TINY_CONFIGS

    cfg = dict(TINY_CONFIGS[kind], model_type="qwen2" if kind.startswith("qwen2") else "llama")
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
REFUSALS = {
    "architecture": (
        dict(architectures=["MistralForCausalLM"], model_type="mistral"),
        "architectures=",
    ),
    "llama_attention_bias": (dict(attention_bias=True), "attention_bias=True"),
    "mlp_bias": (dict(mlp_bias=True), "mlp_bias=True"),
    "sliding_window": (dict(kind="qwen2", use_sliding_window=True), "use_sliding_window=True"),
    "rope_yarn": (
        dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        "rope_scaling.rope_type='yarn'",
    ),
    "rope_linear_v5": (
        dict(
            rope_scaling=None,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        ),
        "rope_scaling.rope_type='linear'",
    ),
    "llama3_low_freq": (
        dict(rope_scaling=dict(_LLAMA3, low_freq_factor=2.0)),
        "rope_scaling.low_freq_factor=2.0",
    ),
    "llama3_high_freq": (
        dict(rope_scaling=dict(_LLAMA3, high_freq_factor=8.0)),
        "rope_scaling.high_freq_factor=8.0",
    ),
    "llama3_original_max": (
        dict(rope_scaling=dict(_LLAMA3, original_max_position_embeddings=4096)),
        "rope_scaling.original_max_position_embeddings=4096",
    ),
    "hidden_act": (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "quantized": (dict(quantization_config={"quant_method": "gptq"}), "quantization_config='gptq'"),
    "rope_theta": (dict(rope_theta=10000.5), "rope_theta=10000.5"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refuses_unrepresentable_config(tmp_path, capsys, case):
    changes, needle = REFUSALS[case]
    changes = dict(changes)
    folder = _write_config(tmp_path / "hf", changes.pop("kind", "llama3"), **changes)
    with pytest.raises(CheckpointError) as info:
        api.hf_to_megatron(folder, tmp_path / "out")
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    argv = ["convert", "hf-to-megatron", "--hf", str(folder), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists() and not layout.staging_path(tmp_path / "out").exists()


def test_refuses_tie_mismatches(tmp_path):
    untied = tiny_hf_checkpoint(tmp_path / "untied", "qwen2")
    cfg = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    with pytest.raises(
        CheckpointError, match="tie_word_embeddings=true but lm_head.weight differs"
    ):
        api.hf_to_megatron(untied, tmp_path / "out")
    tied = tiny_hf_checkpoint(tmp_path / "tied", "qwen2_tied")
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=False)))
    with pytest.raises(
        CheckpointError, match="tie_word_embeddings=false but the checkpoint has no lm_head"
    ):
        api.hf_to_megatron(tied, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not layout.staging_path(tmp_path / "out").exists()


def test_refuses_missing_extra_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_hf_checkpoint(tmp_path / "hf", "deepseek")
    cfg = json.loads((hf / "config.json").read_text())
    tensors = load_file(hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=512)))
    with pytest.raises(
        CheckpointError,
        match=r"mlp.gate_proj.weight has shape \[256, 128\], "
        r"config.json implies \[512, 128\]",
    ):
        api.hf_to_megatron(hf, tmp_path / "out")
    (hf / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k},
        hf / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        api.hf_to_megatron(hf, tmp_path / "out")
    save_file(
        dict(tensors, **{"model.layers.0.self_attn.o_proj.bias": torch.zeros(128)}),
        hf / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match="no place for.*o_proj.bias"):
        api.hf_to_megatron(hf, tmp_path / "out")
    (hf / "model.safetensors").unlink()
    torch.save(tensors, hf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors are converted"):
        api.hf_to_megatron(hf, tmp_path / "out")


def test_template_must_describe_the_checkpoint(subjects, tmp_path):
    with pytest.raises(
        CheckpointError,
        match="describes num_query_groups=4 but the checkpoint has num_query_groups=2",
    ):
        api.megatron_to_hf(
            subjects["llama3"]["megatron"], tmp_path / "out", hf_template=subjects["deepseek"]["hf"]
        )


# ------------------------------------------------------------------ layout and atomic writes
def test_failed_write_leaves_nothing_and_overwrite_is_explicit(tmp_path, monkeypatch):
    hf = tiny_hf_checkpoint(tmp_path / "hf", "qwen2_tied")
    out = tmp_path / "megatron"

    def crash(*_args, **_kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(megatron_io, "save_weights", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            api.hf_to_megatron(hf, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    md = api.hf_to_megatron(hf, out)
    with pytest.raises(ProbsftError, match="already holds a Megatron model dir.*--overwrite"):
        api.hf_to_megatron(hf, out)
    api.hf_to_megatron(hf, out, overwrite=True)
    assert layout.read_model_dir(out).model == md.model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "megatron"]
    assert sorted(p.name for p in out.iterdir()) == [
        layout.HF_DIR,
        layout.MODEL_CONFIG_FILE,
        manifest.MANIFEST_FILE,
        layout.WEIGHTS_DIR,
    ]
    assert manifest.verify(out)  # every file listed, sizes and checksums match
    # --overwrite replaces only a previous output of the same kind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ProbsftError, match="holds other files, not a Megatron model dir"):
        api.hf_to_megatron(hf, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_read_model_dir_errors(tmp_path):
    hf = _write_config(tmp_path / "hf")
    with pytest.raises(
        CheckpointError, match="no model_config.json.*probsft convert hf-to-megatron"
    ):
        layout.read_model_dir(hf)
    layout.write_model_config(tmp_path, ModelConfig(), dtype="float32")
    with pytest.raises(CheckpointError, match=r"no torch_dist weights"):
        layout.read_model_dir(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        api.hf_to_megatron(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConfigError, match="size '2 parsecs'"):
        api.parse_size("2 parsecs")
    assert api.parse_size("2GiB") == 2 * 1024**3 and api.parse_size("500MB") == 500 * 1000**2
