"""The fused linear + objective loss equals megatron's unfused output layer + vocab-parallel CE.

Single process (TP=1, fp32): loss sum, normalizer count, statistics, ``d_hidden`` and
``d_weight`` against the unfused computation for every objective family (absolute and
percentile thresholds, with and without the global-batch pre-pass), chunk sizes that do and do
not divide the token count, and the whole tiny GPT model with tied and untied embeddings
(megatron's ``GPTModel`` against :class:`~probsft_megatron.fused_head.FusedHeadGPTModel`).
Multi-rank (torchrun, 2 gloo processes): TP=2, TP=2+SP at the op level against the unfused
path at the same layout, and TP=2, TP=2+SP, PP=2, DP=2 training steps against a TP=1 unfused
run (the fused head adds its weight gradient to DDP's buffer, reduced over DP);
a negative control drops the TP reduction of the sum of exponentials and must be caught.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from conftest import read_json, run_torchrun
from mp.tiny_model import TINY_QWEN2
from probsft_megatron import cpu_backend, fused_head, fused_loss, runtime
from probsft_megatron.errors import ConfigError
from probsft_megatron.loss import LossConfig, ObjectiveLoss, reduce_stats, token_ce_triple
from probsft_megatron.model import ParallelConfig, build_gpt_model, transformer_config
from probsft_megatron.objectives import resolve_percentile

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def tp1():
    """Megatron's model-parallel state for one process (TP=1), torn down afterwards."""
    from megatron.core import parallel_state

    was_active = cpu_backend.is_active()
    owned = not parallel_state.model_parallel_is_initialized()
    if owned:
        runtime.init_distributed(ParallelConfig())
    yield parallel_state.get_tensor_model_parallel_group()
    if owned:
        runtime.shutdown()
        if not was_active:
            cpu_backend.deactivate()


def _inputs(seed, b=3, s=11, h=16, vocab=48, dtype=torch.float32):
    """Random hidden states and weight; labels drawn from the model so p spreads over (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) * 0.6
    with torch.no_grad():
        probs = torch.softmax(hidden @ weight.T, -1).view(-1, vocab)
        labels = torch.multinomial(probs, 1, generator=g).view(b, s)
    mask = (torch.rand(b, s, generator=g) < 0.7).float()
    return hidden.to(dtype), weight.to(dtype), labels, mask


def _unfused_ce(h, w, labels):
    """megatron's path: [s, b, h] @ W^T -> vocab_parallel_cross_entropy -> CE [b, s]."""
    from megatron.core import tensor_parallel

    logits = h.transpose(0, 1) @ w.T
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.T.contiguous()).T


def _unfused(hidden, weight, labels, mask, loss, threshold=None):
    """megatron's path: [s, b, h] @ W^T -> vocab_parallel_cross_entropy -> ObjectiveLoss."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = loss(_unfused_ce(h, w, labels), mask, threshold=threshold)
    if torch.is_grad_enabled():
        out[0].backward()
    return out, h.grad, w.grad


def _fused(hidden, weight, labels, mask, loss, group, chunk_size, scale=1.0, threshold=None):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_loss.fused_objective_loss(
        h, w, labels, mask, loss, tp_group=group, chunk_size=chunk_size, threshold=threshold
    )
    if torch.is_grad_enabled():
        (out[0] * scale).backward()
    return out, h.grad, w.grad


def _assert_same(got, ref, rtol=RTOL, atol=ATOL):
    (g_sum, g_n, g_extra), g_dh, g_dw = got
    (r_sum, r_n, r_extra), r_dh, r_dw = ref
    torch.testing.assert_close(g_sum, r_sum, rtol=rtol, atol=atol)
    assert int(g_n) == int(r_n)
    torch.testing.assert_close(g_extra["stats"], r_extra["stats"], rtol=rtol, atol=atol)
    if r_dh is not None:
        torch.testing.assert_close(g_dh, r_dh, rtol=rtol, atol=atol)
        torch.testing.assert_close(g_dw, r_dw, rtol=rtol, atol=atol)


OBJECTIVES = [
    "original",
    "p",
    "GeneralFamily-8",
    "GeneralFamily-0",
    "OnlyTopP-0.3",
    "OnlyBottomP-0.4",
    "OnlyTopLogP-0.3",
    "OnlyBottomLogP-0.5",
    "UnlikehoodTop-0.2",
    "UnlikehoodBottom-0.1",
    "OnlyBottomP-K50",
    "OnlyTopLogP-K30",
]


@pytest.mark.parametrize("chunk_size", [5, 1000])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_op_matches_unfused(tp1, name, chunk_size):
    hidden, weight, labels, mask = _inputs(seed=sum(map(ord, name)))
    cfg = LossConfig(objective=name)
    ref = _unfused(hidden, weight, labels, mask, ObjectiveLoss(cfg))
    if ObjectiveLoss(cfg).objective.thresholded:
        kept, resp = ref[0][2]["stats"][2], ref[0][2]["stats"][1]
        assert 0 < kept < resp, "the threshold must keep a strict part of the tokens"
    got = _fused(hidden, weight, labels, mask, ObjectiveLoss(cfg), tp1, chunk_size)
    _assert_same(got, ref)
    # masked tokens get exactly zero gradient
    assert float(got[1][mask == 0].abs().max()) == 0.0


@pytest.mark.parametrize("name", ["OnlyTopP-K30", "UnlikehoodBottom-K70"])
def test_op_matches_unfused_with_global_percentile(tp1, name):
    """The pre-pass's measurement (each row's response-token CE) agrees between the paths,
    and with the threshold it resolves over several micro-batches both paths train alike."""
    micro = [_inputs(seed=s) for s in (1, 2, 3)]
    loss = ObjectiveLoss(LossConfig(objective=name))
    rows = {"ref": [], "fused": []}
    with torch.no_grad():
        for hidden, weight, labels, mask in micro:
            rows["ref"] += token_ce_triple(_unfused_ce(hidden, weight, labels), mask)[2]["token_ce"]
            ce = fused_loss.fused_token_ce(hidden, weight, labels, mask, tp_group=tp1, chunk_size=4)
            rows["fused"] += token_ce_triple(ce, mask)[2]["token_ce"]
    q = {
        path: resolve_percentile(torch.exp(-torch.cat(r)), loss.objective.threshold.value)
        for path, r in rows.items()
    }
    assert q["fused"] == pytest.approx(q["ref"], rel=1e-6)
    for hidden, weight, labels, mask in micro:
        ref = _unfused(hidden, weight, labels, mask, loss, threshold=q["ref"])
        got = _fused(hidden, weight, labels, mask, loss, tp1, 4, threshold=q["fused"])
        _assert_same(got, ref)


def test_response_normalization_forward_only_and_grad_scale(tp1):
    hidden, weight, labels, mask = _inputs(seed=11)
    cfg = LossConfig(objective="OnlyTopP-0.3", normalization="response")
    ref = _unfused(hidden, weight, labels, mask, ObjectiveLoss(cfg))
    _assert_same(_fused(hidden, weight, labels, mask, ObjectiveLoss(cfg), tp1, 6), ref)
    # an upstream gradient other than 1 (e.g. a loss scale) scales both gradients
    scaled = _fused(hidden, weight, labels, mask, ObjectiveLoss(cfg), tp1, 6, scale=3.0)
    torch.testing.assert_close(scaled[1], 3.0 * ref[1], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(scaled[2], 3.0 * ref[2], rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        got = _fused(hidden, weight, labels, mask, ObjectiveLoss(cfg), tp1, 6)
    _assert_same(got, (ref[0], None, None))


def test_comparison_detects_a_wrong_weight(tp1):
    """Negative control: a 1e-3 change of one output row must fail the comparison."""
    hidden, weight, labels, mask = _inputs(seed=5)
    cfg = LossConfig(objective="p")
    ref = _unfused(hidden, weight, labels, mask, ObjectiveLoss(cfg))
    wrong = weight.clone()
    wrong[labels[mask > 0][0]] += 1e-3
    with pytest.raises(AssertionError):
        _assert_same(_fused(hidden, wrong, labels, mask, ObjectiveLoss(cfg), tp1, 5), ref)


def test_empty_mask_gives_zero_loss_and_gradients(tp1):
    hidden, weight, labels, _ = _inputs(seed=6)
    (loss_sum, n, extra), dh, dw = _fused(
        hidden,
        weight,
        labels,
        torch.zeros(labels.shape),
        ObjectiveLoss(LossConfig(objective="p")),
        tp1,
        4,
    )
    assert float(loss_sum) == 0.0 and int(n) == 0
    assert float(dh.abs().max()) == 0.0 and float(dw.abs().max()) == 0.0
    assert reduce_stats([extra])["response_tokens"] == 0


def test_bf16_stays_close_to_fp32(tp1):
    """The GPU dtype path: bf16 logits, float32 softmax and weight-gradient accumulator."""
    hidden, weight, labels, mask = _inputs(seed=8)
    cfg = LossConfig(objective="original")
    ref = _unfused(hidden, weight, labels, mask, ObjectiveLoss(cfg))
    (loss_sum, _, _), dh, dw = _fused(
        hidden.bfloat16(), weight.bfloat16(), labels, mask, ObjectiveLoss(cfg), tp1, 5
    )
    assert dh.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(loss_sum, ref[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dh.float(), ref[1], rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(dw.float(), ref[2], rtol=5e-2, atol=2e-2)
    # float32 hidden states with a bf16 weight (megatron's Float16Module hands the last
    # stage's output back in float32) multiply in the weight's dtype, like the output layer
    (mixed_sum, _, _), mixed_dh, mixed_dw = _fused(
        hidden.bfloat16().float(), weight.bfloat16(), labels, mask, ObjectiveLoss(cfg), tp1, 5
    )
    assert mixed_dh.dtype == torch.float32
    torch.testing.assert_close(mixed_sum, loss_sum, rtol=0, atol=0)
    torch.testing.assert_close(mixed_dh, dh.float(), rtol=0, atol=0)
    torch.testing.assert_close(mixed_dw, dw, rtol=0, atol=0)


def _fused_into_main_grad(hidden, weight, labels, mask, loss, group, chunk_size, prefill):
    """The fused op with a megatron-DDP-style ``main_grad`` (float32) buffer on the weight."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    w.main_grad = prefill.clone()
    out = fused_loss.fused_objective_loss(
        h, w, labels, mask, loss, tp_group=group, chunk_size=chunk_size
    )
    return out, h, w


@pytest.mark.parametrize("name", ["p", "OnlyTopLogP-0.3", "OnlyBottomP-K50"])
def test_weight_grad_goes_into_main_grad(tp1, name):
    """With a DDP gradient buffer the weight gradient is added to it during the forward and
    never allocated on its own: ``main_grad`` ends at its old value + the unfused gradient,
    ``weight.grad`` stays empty, ``d_hidden`` is unchanged."""
    hidden, weight, labels, mask = _inputs(seed=21)
    cfg = LossConfig(objective=name)
    ref = _unfused(hidden, weight, labels, mask, ObjectiveLoss(cfg))
    prefill = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    out, h, w = _fused_into_main_grad(
        hidden, weight, labels, mask, ObjectiveLoss(cfg), tp1, 4, prefill
    )
    # added during the forward already: nothing is held for the backward
    torch.testing.assert_close(w.main_grad - prefill, ref[2], rtol=RTOL, atol=ATOL)
    out[0].backward()
    assert w.grad is None
    torch.testing.assert_close(w.main_grad - prefill, ref[2], rtol=RTOL, atol=ATOL)
    _assert_same((out, h.grad, ref[2]), ref)
    # weight_grad='autograd' keeps the old behaviour even when a buffer exists
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    w2.main_grad = prefill.clone()
    fused_loss.fused_objective_loss(
        h2, w2, labels, mask, ObjectiveLoss(cfg), tp_group=tp1, chunk_size=4, weight_grad="autograd"
    )[0].backward()
    torch.testing.assert_close(w2.grad, ref[2], rtol=RTOL, atol=ATOL)
    assert torch.equal(w2.main_grad, prefill)


def test_frozen_output_weight_gets_no_weight_gradient_work(tp1):
    """A frozen output weight (no requires_grad): d_hidden as unfused, no weight gradient,
    its DDP buffer (if any) untouched."""
    hidden, weight, labels, mask = _inputs(seed=23)
    cfg = LossConfig(objective="OnlyTopP-0.3")
    ref = _unfused(hidden, weight, labels, mask, ObjectiveLoss(cfg))
    h, w = hidden.clone().requires_grad_(True), weight.clone()
    w.main_grad = torch.zeros(weight.shape)
    out = fused_loss.fused_objective_loss(
        h, w, labels, mask, ObjectiveLoss(cfg), tp_group=tp1, chunk_size=4
    )
    (out[0] * 2.0).backward()  # no buffer in use, so any upstream gradient is fine
    torch.testing.assert_close(h.grad, 2.0 * ref[1], rtol=RTOL, atol=ATOL)
    assert w.grad is None and float(w.main_grad.abs().max()) == 0.0


def test_main_grad_bf16_and_guards(tp1):
    """bf16 weights accumulate into a float32 buffer (in vocabulary blocks) to the same values
    as the private float32 accumulator; an upstream gradient other than 1 is refused."""
    hidden, weight, labels, mask = _inputs(seed=22, vocab=50)
    cfg = LossConfig(objective="original")
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    zeros = torch.zeros(weight.shape)
    out, _, w = _fused_into_main_grad(hb, wb, labels, mask, ObjectiveLoss(cfg), tp1, 3, zeros)
    out[0].backward()
    _, _, ref_dw = _fused(hb, wb, labels, mask, ObjectiveLoss(cfg), tp1, 3)
    assert w.main_grad.dtype == torch.float32 and w.grad is None
    torch.testing.assert_close(w.main_grad.bfloat16(), ref_dw, rtol=0, atol=0)
    # the scale cannot be applied to what the forward already added
    out, _, _ = _fused_into_main_grad(
        hidden, weight, labels, mask, ObjectiveLoss(cfg), tp1, 4, zeros
    )
    with pytest.raises(RuntimeError, match="weight_grad='autograd'"):
        (out[0] * 2.0).backward()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="no main_grad buffer"):
        fused_loss.fused_objective_loss(
            h, w, labels, mask, ObjectiveLoss(cfg), tp_group=tp1, weight_grad="main_grad"
        )
    with pytest.raises(ValueError, match="weight_grad='bogus' is invalid"):
        fused_loss.fused_objective_loss(
            h, w, labels, mask, ObjectiveLoss(cfg), tp_group=tp1, weight_grad="bogus"
        )


def _tiny_models(tied: bool):
    cfg = dataclasses.replace(TINY_QWEN2, tie_word_embeddings=tied)
    tconfig = transformer_config(cfg, ParallelConfig())
    unfused = build_gpt_model(cfg, tconfig)
    fused = build_gpt_model(cfg, tconfig, fused_head=True)
    fused.load_state_dict(unfused.state_dict())
    assert set(fused.state_dict()) == set(unfused.state_dict())
    assert isinstance(fused.output_layer, fused_head.FusedOutputLayer)
    return cfg, unfused, fused


def _assert_same_param_grads(fused, unfused, attr: str) -> None:
    """Every parameter's gradient (``attr``: ``grad`` or DDP's ``main_grad``) agrees. fp32
    rounding of differently blocked matmuls grows through the layers: each gradient is
    compared to 1e-5 of its largest entry (at least 1e-5 absolute)."""
    ref_params = dict(unfused.named_parameters())
    for key, param in fused.named_parameters():
        want = getattr(ref_params[key], attr)
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(
            getattr(param, attr),
            want,
            rtol=0,
            atol=RTOL * scale,
            msg=lambda m, key=key: f"{key}: {m}",
        )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", ["original", "UnlikehoodTop-0.2", "OnlyBottomP-K40"])
def test_model_gradients_match(tp1, tied, name):
    """Whole model, TP=1: same loss and the same gradient for every parameter."""
    cfg, unfused, fused = _tiny_models(tied)
    g = torch.Generator().manual_seed(3)
    b, s = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) < 0.8).float()
    pos = torch.arange(s)[None].expand(b, -1)
    with torch.no_grad():
        # a logit scale that spreads p, and labels drawn from the model itself, so
        # thresholds keep part of the tokens
        for m in (unfused, fused):
            fused_head.output_weight(m).mul_(4.0 if tied else 40.0)
        probs = torch.softmax(unfused(tokens, pos, None), -1).view(b * s, -1)
        labels = torch.multinomial(probs, 1, generator=g).view(b, s)
    ref = ObjectiveLoss(LossConfig(objective=name))(unfused(tokens, pos, None, labels=labels), mask)
    ref[0].backward()
    got = runtime.head_loss(
        fused(tokens, pos, None),
        loss=ObjectiveLoss(LossConfig(objective=name, chunk_size=5)),
        model=fused,
        labels=labels,
        loss_mask=mask,
    )
    got[0].backward()
    torch.testing.assert_close(got[0], ref[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[2]["stats"], ref[2]["stats"], rtol=RTOL, atol=ATOL)
    if name != "original":
        assert 0 < float(ref[2]["stats"][2]) < float(ref[2]["stats"][1])
    _assert_same_param_grads(fused, unfused, "grad")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_ddp_main_grad_matches_unfused(tp1, tied):
    """Under megatron's DistributedDataParallel the fused head adds the output weight's
    gradient straight into the float32 grad buffer; every parameter's ``main_grad`` equals
    the unfused model's after the backward and DDP's gradient sync."""
    from probsft_megatron import compat

    cfg, unfused, fused = _tiny_models(tied)
    tconfig = transformer_config(cfg, ParallelConfig())
    models = {
        k: compat.wrap_ddp(m, tconfig, use_distributed_optimizer=False)
        for k, m in (("unfused", unfused), ("fused", fused))
    }
    g = torch.Generator().manual_seed(4)
    b, s = 2, 16
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) < 0.8).float()
    pos = torch.arange(s)[None].expand(b, -1)
    loss = ObjectiveLoss(LossConfig(objective="p", chunk_size=7))
    for name, ddp in models.items():
        ddp.zero_grad_buffer()
        if name == "unfused":
            out = loss(ddp(tokens, pos, None, labels=labels), mask)
        else:
            out = runtime.head_loss(
                ddp(tokens, pos, None), loss=loss, model=ddp, labels=labels, loss_mask=mask
            )
            # the head's weight gradient is in the buffer before the backward runs
            assert float(fused_head.output_weight(fused).main_grad.abs().max()) > 0
        out[0].backward()
        ddp.finish_grad_sync()
    assert fused_head.output_weight(fused).grad is None
    _assert_same_param_grads(fused, unfused, "main_grad")


def test_fused_head_model_and_its_guards(tp1):
    """The fused-head model keeps the output layer's parameter object (initialized like the
    unfused model's from the same seed), returns hidden states, refuses labels and unfused
    losses; the forward step of a fused loss hands its hidden states to the fused head."""
    cfg = TINY_QWEN2
    tconfig = transformer_config(cfg, ParallelConfig())
    torch.manual_seed(0)
    unfused = build_gpt_model(cfg, tconfig)
    torch.manual_seed(0)
    fused = build_gpt_model(cfg, tconfig, fused_head=True)
    assert fused_head.head_is_fused(fused) and not fused_head.head_is_fused(unfused)
    assert fused.output_layer.weight is fused_head.output_weight(fused)
    for (k, a), (_, b) in zip(
        sorted(unfused.state_dict().items()), sorted(fused.state_dict().items())
    ):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    tokens = torch.zeros(1, 4, dtype=torch.long)
    pos = torch.arange(4)[None]
    assert tuple(fused(tokens, pos, None).shape) == (1, 4, cfg.hidden_size)
    with pytest.raises(RuntimeError, match="fused loss head"):
        fused(tokens, pos, None, labels=tokens)
    with pytest.raises(RuntimeError, match="needs a model built"):
        runtime.head_loss(
            unfused(tokens, pos, None),
            loss=ObjectiveLoss(LossConfig()),
            model=unfused,
            labels=tokens,
            loss_mask=torch.ones(1, 4),
        )
    for option, value in (("mtp_num_layers", 1), ("defer_embedding_wgrad_compute", True)):
        with pytest.raises(ConfigError, match=option):  # checked before anything is built
            fused_head.FusedHeadGPTModel(
                types.SimpleNamespace(**{option: value}), None, cfg.vocab_size, 16
            )
    step = runtime.loss_head(ObjectiveLoss(LossConfig(implementation="fused")), "cpu")
    batch = runtime.Batch(tokens, tokens, torch.ones(1, 4), pos)
    out, loss_func = step.forward_step()(iter([batch]), fused)
    assert tuple(out.shape) == (1, 4, cfg.hidden_size) and loss_func.func is runtime.head_loss


# -- multi-rank ----------------------------------------------------------------------------
LAYOUTS = ("tp2", "tp2_sp", "pp2", "dp2")


@pytest.fixture(scope="module")
def multirank(tmp_path_factory):
    d = tmp_path_factory.mktemp("fused")
    init = str(d / "init")
    run_torchrun(
        "fused_worker.py",
        1,
        ["--layouts", "ref", "--save-init", "--init-ckpt", init, "--out", str(d / "ref.json")],
    )
    run_torchrun(
        "fused_worker.py",
        2,
        ["--layouts", ",".join(LAYOUTS), "--init-ckpt", init, "--out", str(d / "fused.json")],
    )
    return read_json(d / "ref.json")["train"]["ref"], read_json(d / "fused.json")


def _op_ok(rec: dict) -> bool:
    return (
        rec["count"] == 0
        and rec["loss"] <= RTOL * max(1.0, rec["ref_loss"])
        and rec["stats"] <= RTOL * max(1.0, rec["ref_loss"], rec["ref_count"])
        and rec["d_hidden"] <= RTOL * max(1.0, rec["ref_d_hidden"])
        and rec["d_weight"] <= RTOL * max(1.0, rec["ref_d_weight"])
    )


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_multirank_op_matches_unfused(multirank, layout):
    _, got = multirank
    for name, rec in got["op"][layout].items():
        assert _op_ok(rec), (layout, name, rec)
        if name not in ("original", "p", "GeneralFamily-8"):  # thresholds keep a part
            assert 0 < rec["ref_count"] < rec["ref_response"], (name, rec)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multirank_training_matches_tp1_unfused(multirank, layout):
    ref, got = multirank
    for tie, per_obj in got["train"][layout].items():
        for name, series in per_obj.items():
            expect = ref[tie][name]
            assert all(g > 1e-3 for g in expect["grad_norm"]), (tie, name, expect)
            if name not in ("original", "p", "GeneralFamily-8"):
                assert all(0.05 < f < 0.95 for f in expect["frac_kept"]), (tie, name, expect)
            for key in ("loss", "grad_norm"):
                assert len(series[key]) == len(expect[key])
                for step, (a, b) in enumerate(zip(series[key], expect[key])):
                    assert abs(a - b) <= RTOL * max(1.0, abs(b)), (
                        layout,
                        tie,
                        name,
                        key,
                        step,
                        a,
                        b,
                    )


@pytest.mark.multirank
def test_multirank_negative_control_is_detected(tmp_path):
    out = tmp_path / "broken.json"
    run_torchrun(
        "fused_worker.py",
        2,
        ["--layouts", "tp2", "--op-only", "--break-sumexp-reduce", "--out", str(out)],
    )
    recs = read_json(out)["op"]["tp2"]
    assert not any(_op_ok(rec) for rec in recs.values()), recs
