"""LoRA on megatron-core (:mod:`probsft_megatron.lora`), one process (TP=1).

* a LoRA model with ``B = 0`` gives the base model's logits exactly; with a non-zero ``B`` it
  gives the logits of the base model whose weights are merged ``W + (alpha/r) B A``
  (negative control: the unmerged base differs);
* the base is frozen before DDP: no gradient buffer for it, optimizer state only for the
  adapters, and training moves only the adapters;
* every objective trains through the adapters, and the fused head gives the unfused head's
  losses and grad norms;
* bad ``peft.*`` keys are refused in one line.

The multi-rank parity of the adapters (TP=2, TP=2+SP, PP=2, DP=2) is in
``tests/test_lora_parity.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mp.tiny_model import TINY_QWEN2
from probsft_megatron import cpu_backend, runtime
from probsft_megatron.config import ConfigError, PeftConfig, load_config
from probsft_megatron.loss import LossConfig, ObjectiveLoss
from probsft_megatron.model import ParallelConfig, build_gpt_model, transformer_config

LORA = PeftConfig(method="lora", rank=4, alpha=8.0)
OBJECTIVES = (
    "original",
    "p",
    "GeneralFamily-0.5",
    "OnlyTopP-K50",
    "OnlyBottomLogP-K50",
    "UnlikehoodTop-K50",
)
"""Objectives whose gradient does not vanish on the random tiny model (percentile thresholds:
absolute ones such as p >= 0.3 keep no token of a random model)."""


@pytest.fixture(scope="module")
def tp1():
    from megatron.core import parallel_state

    was_active = cpu_backend.is_active()
    owned = not parallel_state.model_parallel_is_initialized()
    if owned:
        runtime.init_distributed(ParallelConfig())
    yield
    if owned:
        runtime.shutdown()
        if not was_active:
            cpu_backend.deactivate()


SHAPE = {"seq_length": 16, "micro_batch_size": 2}


def _batch(seed=0, b=2, s=16, vocab=TINY_QWEN2.vocab_size):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (b, 1), generator=g)
    tokens = (start + torch.arange(s + 1)[None, :]) % vocab
    pos = torch.arange(s)[None, :].expand(b, -1).contiguous()
    mask = torch.ones(b, s)
    mask[:, : s // 4] = 0
    return runtime.Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask, pos)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch.tokens, batch.position_ids, None)


def _base_and_lora():
    from probsft_megatron import lora

    tconfig = transformer_config(TINY_QWEN2, ParallelConfig())
    base = build_gpt_model(TINY_QWEN2, tconfig)
    adapted = build_gpt_model(TINY_QWEN2, tconfig, peft=LORA)
    missing = adapted.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(lora.is_adapter(k) for k in missing), missing
    lora.prepare_model(adapted, LORA)
    return base, adapted


def _merge_into(base, adapted) -> None:
    """``W + (alpha/r) B A`` of every adapted linear into ``base`` (TP=1)."""
    from probsft_megatron import lora

    named = dict(base.named_modules())
    adapted_names = {id(m): n for n, m in adapted.named_modules()}
    with torch.no_grad():
        for _, _, module in lora.adapter_modules(adapted):
            target = named[adapted_names[id(module)]]
            target.weight += module.lora_scaling * module.lora_B @ module.lora_A


def test_zero_b_is_the_base_and_nonzero_b_is_the_merged_base(tp1):
    from probsft_megatron import lora

    base, adapted = _base_and_lora()
    batch = _batch()
    ref = _logits(base, batch)
    assert torch.equal(_logits(adapted, batch), ref)
    assert len(lora.adapter_modules(adapted)) == 4 * TINY_QWEN2.num_layers

    lora.init_adapters(adapted, seed=3, b_std=0.05)
    got = _logits(adapted, batch)
    unmerged = (got - ref).abs().max().item()
    assert unmerged > 1e-3, unmerged  # negative control: the adapters change the output
    _merge_into(base, adapted)
    merged = (got - _logits(base, batch)).abs().max().item()
    print(f"LoRA vs merged weights: {merged:.2e} (vs unmerged base {unmerged:.2e})")
    assert merged < 1e-5


def test_base_is_frozen_without_grad_buffer_or_optimizer_state(tp1):
    from probsft_megatron import lora

    tconfig = transformer_config(TINY_QWEN2, ParallelConfig())
    chunks, optimizer = runtime.build_training_model(TINY_QWEN2, tconfig, peft=LORA, lr=1e-2)
    gpt = chunks[0].module
    adapters = {n: p for n, p in gpt.named_parameters() if lora.is_adapter(n)}
    frozen = {n: p for n, p in gpt.named_parameters() if not lora.is_adapter(n)}
    assert adapters and frozen
    assert all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for p in frozen.values())
    n_adapter = sum(p.numel() for p in adapters.values())
    h, r, L = TINY_QWEN2.hidden_size, LORA.rank, TINY_QWEN2.num_layers
    qkv_out = (TINY_QWEN2.num_attention_heads + 2 * TINY_QWEN2.num_query_groups) * (
        h // TINY_QWEN2.num_attention_heads
    )
    ffn = TINY_QWEN2.ffn_hidden_size
    expected = L * r * ((h + qkv_out) + (h + h) + (h + 2 * ffn) + (ffn + h))
    assert n_adapter == expected, (n_adapter, expected)
    # megatron DDP: one gradient buffer, sized for the adapters only
    grad_numel = sum(buf.grad_data.numel() for buf in chunks[0].buffers)
    assert n_adapter <= grad_numel < n_adapter + 64 * len(adapters), (grad_numel, n_adapter)
    assert not any(hasattr(p, "main_grad") for p in frozen.values())
    held = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in held) == n_adapter
    # the planner counts the same: frozen base weights, and buffer and state for the adapters
    from probsft_megatron.config import LORA_TARGETS
    from probsft_megatron.plan.layout import Layout, Workload
    from probsft_megatron.plan.static import static_memory

    workload = Workload(params_dtype="fp32", lora_rank=LORA.rank, lora_targets=LORA_TARGETS)
    planned = static_memory(TINY_QWEN2, Layout(distributed_optimizer=False), workload)
    assert planned.weights == sum(p.numel() * 4 for p in gpt.parameters())
    assert planned.grad_buffer == grad_numel * 4
    assert planned.adam_moments == n_adapter * 8
    full = static_memory(
        TINY_QWEN2, Layout(distributed_optimizer=False), Workload(params_dtype="fp32")
    )
    assert full.grad_buffer > 4 * planned.grad_buffer  # negative control: full trains all

    before = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    fwd = runtime.loss_head(ObjectiveLoss(LossConfig("original")), "cpu")
    losses = []
    for step in range(3):
        stats = runtime.train_step(chunks, optimizer, fwd, [_batch(step)], **SHAPE)
        losses.append(stats.loss)
        assert stats.grad_norm > 0
    assert all(torch.equal(before[n], p) for n, p in frozen.items())
    moved = [n for n, p in adapters.items() if not torch.equal(before[n], p)]
    assert len(moved) == len(adapters), sorted(set(adapters) - set(moved))
    states = [s for s in optimizer.optimizer.state.values() if s]
    assert len(states) == len(adapters)


def _train(objective: str, implementation: str, steps: int = 3):
    tconfig = transformer_config(TINY_QWEN2, ParallelConfig())
    loss_config = LossConfig(objective, implementation=implementation, chunk_size=8)
    torch.manual_seed(7)  # the same base weights for both heads
    chunks, optimizer = runtime.build_training_model(
        TINY_QWEN2, tconfig, peft=LORA, lr=1e-2, loss_config=loss_config
    )
    from probsft_megatron import lora

    lora.init_adapters(chunks[0].module, seed=1, b_std=0.02)  # a non-zero B: A gets gradients
    fwd = runtime.loss_head(ObjectiveLoss(loss_config), "cpu")
    out = []
    for step in range(steps):
        stats = runtime.train_step(chunks, optimizer, fwd, [_batch(step % 2)], **SHAPE)
        out.append((stats.loss, stats.grad_norm))
    return out


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_through_lora_with_both_heads(tp1, objective):
    unfused = _train(objective, "unfused")
    fused = _train(objective, "fused")
    assert all(g > 1e-6 and torch.isfinite(torch.tensor(loss)) for loss, g in unfused)
    assert unfused[-1][0] != unfused[0][0]  # the adapters learn
    for (a, ga), (b, gb) in zip(unfused, fused):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (objective, unfused, fused)
        assert abs(ga - gb) <= 1e-5 * max(1.0, ga), (objective, unfused, fused)


# -- bad input: one line each (rows for the bad-input suite) ---------------------------------
@pytest.mark.parametrize(
    "override, words",
    [
        ("peft.rank=0", "peft.rank must be >= 1 (got 0)"),
        ("peft.rank=-4", "peft.rank must be >= 1 (got -4)"),
        ("peft.target_modules=linear_qkv,q_proj", "'q_proj', which is not a linear LoRA"),
        ("peft.target_modules=output_layer", "output layer and embeddings stay frozen"),
        ("peft.method=dora", "peft.method='dora' is invalid"),
        ("peft.alpha=0", "peft.alpha must be > 0"),
        ("peft.dropout=1.5", "peft.dropout must be in [0, 1)"),
    ],
)
def test_bad_peft_keys_fail_in_one_line(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["peft.method=lora", override])
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_peft_config_all_linear_and_defaults():
    assert PeftConfig().enabled is False
    cfg = load_config(None, ["peft.method=lora", "peft.target_modules=all-linear"]).peft
    assert cfg.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert dataclasses.replace(cfg, rank=8).rank == 8


# -- checkpoints: adapters only, bit-exact resume, another base refused ----------------------
TRAIN = [
    "--config",
    "tiny-figfont-cpu",
    "data.num_samples=64",
    "data.max_length=256",
    "train.tensorboard=false",
    "train.histogram_interval=0",
    "train.save_interval=2",
    "peft.method=lora",
    "peft.rank=4",
    "optim.lr=1e-2",
]


def _train_run(out, *extra, expect_ok=True):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "probsft_megatron.train", *TRAIN, f"train.output_dir={out}"]
    # a single-process run of its own: not the port or rank of this module's in-process group
    group = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in group}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [*cmd, *extra], capture_output=True, text=True, timeout=600, env=env, start_new_session=True
    )
    if expect_ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _step_losses(out):
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_lora_checkpoint_holds_adapters_and_resumes_bit_exact(tmp_path):
    import json

    from megatron.core import dist_checkpointing

    ref = tmp_path / "ref"
    _train_run(ref, "train.max_steps=4")
    out = tmp_path / "resumed"
    _train_run(out, "train.max_steps=2")
    ckpt = out / "checkpoints" / "step_0000002"
    peft = json.loads((ckpt / "peft.json").read_text())
    assert peft["rank"] == 4 and len(peft["base_fingerprint"]) == 64
    keys = list(dist_checkpointing.load_tensors_metadata(str(ckpt / "weights")))
    model_keys = [k for k in keys if not k.startswith("optimizer")]
    assert model_keys and all(k.endswith(("lora_A", "lora_B")) for k in model_keys), model_keys
    _train_run(out, "train.max_steps=4")  # resumes from step 2
    want, got = _step_losses(ref), _step_losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)]  # bit-exact on CPU
    assert got[4] != got[2]

    # another base (a different seed draws other random weights), and a full-weights resume
    other = _train_run(out, "train.max_steps=6", "train.seed=7", expect_ok=False)
    lines = [x for x in other.stderr.splitlines() if "adapters of another base model" in x]
    assert other.returncode == 2 and len(lines) == 1, other.stderr[-3000:]
    full = _train_run(out, "train.max_steps=6", "peft.method=none", expect_ok=False)
    assert full.returncode == 2 and "holds LoRA adapters, not full weights" in full.stderr, (
        full.stderr[-3000:]
    )


@pytest.mark.slow
def test_docs_lora_table_is_what_the_planner_prints():
    """docs/lora.md's full-vs-LoRA table is `probsft plan --lora-table` (rerun it there)."""
    from conftest import REPO
    from probsft_megatron import plan as P

    doc = (REPO / "docs" / "lora.md").read_text()
    assert P.lora_table() in doc, "docs/lora.md: rerun `probsft plan --lora-table`"


def test_launch_peft_lora_trains_every_run_on_adapters(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "probsft_megatron.cli", "launch", "--dataset", "figfont"]
    cmd += ["--model", "tiny-llama", "--objective", "p", "--dryrun"]
    base = ["--set", f"init.checkpoint={tmp_path / 'base'}"]  # a base (made where jobs run)
    runs = {}
    for name, extra in (("lora", ["--peft", "lora", *base]), ("full", base)):
        proc = subprocess.run(
            [*cmd, "--work-dir", str(tmp_path / name), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [x for x in proc.stdout.splitlines() if "-m probsft_megatron.train" in x]
    assert len(runs["lora"]) == 1 and "peft.method=lora" in runs["lora"][0]
    assert "peft.method" not in runs["full"][0]  # negative control
    # LoRA on the recipe's random weights: nothing to adapt or merge into, refused at once
    proc = subprocess.run(
        [*cmd, "--work-dir", str(tmp_path / "random"), "--peft", "lora"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in proc.stderr.splitlines() if "starts from random weights" in x]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
