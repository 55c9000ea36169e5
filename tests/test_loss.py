"""The stateless objective loss: sums, normalizer counts, statistics, thresholds (one process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probsft_megatron.errors import ConfigError
from probsft_megatron.loss import (
    LossConfig,
    MicroBatchPercentile,
    ObjectiveLoss,
    objective_loss,
    reduce_stats,
    step_loss,
    token_ce_triple,
)
from probsft_megatron.objectives import parse_objective, resolve_percentile


def _inputs(seed: int, b: int = 3, s: int = 17, v: int = 50):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    # make some tokens near-certain so p spans (0, 1)
    sure = torch.rand(b, s, generator=g) < 0.3
    logits[sure, labels[sure]] += 12
    mask = (torch.rand(b, s, generator=g) < 0.7).float()
    return logits, labels, mask


def _ce(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(
        labels.shape
    )


@pytest.mark.parametrize(
    "name,normalization",
    [
        ("original", "kept"),
        ("p", "kept"),
        ("GeneralFamily-3", "kept"),
        ("OnlyTopP-0.5", "kept"),
        ("OnlyTopP-0.5", "response"),
        ("OnlyBottomLogP-0.2", "kept"),
    ],
)
def test_sum_count_and_stats_match_reference(name, normalization):
    logits, labels, mask = _inputs(seed=hash(name) % 1000)
    loss = ObjectiveLoss(LossConfig(objective=name, normalization=normalization))
    loss_sum, n, extra = loss(_ce(logits, labels), mask)

    # independent float64 reference from the full softmax
    p = torch.softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    resp = mask > 0
    if name == "original":
        f, keep = -torch.log(p), resp
        w = torch.ones_like(p)
    elif name == "p":
        f, keep, w = 1 - p, resp, p
    elif name == "GeneralFamily-3":
        f, keep, w = (1 - p**3) / 3, resp, p**3
    elif name == "OnlyTopP-0.5":
        f, keep, w = 1 - p, resp & (p >= 0.5), p
    else:  # OnlyBottomLogP-0.2
        f, keep, w = -torch.log(p), resp & (p <= 0.2), torch.ones_like(p)
    assert 0 < keep.sum() < resp.sum() or not loss.objective.thresholded
    torch.testing.assert_close(loss_sum, f[keep].sum(), rtol=1e-9, atol=1e-9)
    expected_n = keep.sum() if normalization == "kept" else resp.sum()
    assert n.dtype == torch.int32 and int(n) == int(expected_n)

    stats = reduce_stats([extra])
    assert stats["response_tokens"] == int(resp.sum())
    assert stats["kept_tokens"] == int(keep.sum())
    assert stats["mean_p"] == pytest.approx(float(p[resp].mean()), rel=1e-9)
    assert stats["frac_kept"] == pytest.approx(int(keep.sum()) / int(resp.sum()), rel=1e-12)
    assert stats["mean_w"] == pytest.approx(float((w * keep).sum() / resp.sum()), rel=1e-9)
    assert step_loss(stats, normalization) == pytest.approx(float(f[keep].sum() / expected_n))


def test_empty_mask_gives_zero_loss_and_no_nan():
    logits, labels, _ = _inputs(seed=3)
    logits.requires_grad_(True)
    loss = ObjectiveLoss(LossConfig(objective="OnlyTopP-0.5"))
    loss_sum, n, extra = loss(_ce(logits, labels), torch.zeros(labels.shape))
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0.0 and int(n) == 0
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().max()) == 0.0
    stats = reduce_stats([extra])
    assert stats["mean_p"] == 0.0 and stats["frac_kept"] == 0.0
    assert step_loss(stats, "kept") == 0.0


def test_percentile_prepass_uses_the_whole_batch():
    """A threshold resolved over all micro-batches together (the pre-pass measures each
    row's response-token CE) differs from each micro-batch's own percentile, and the loss
    keeps exactly the tokens at or above it."""
    micro = [_inputs(seed=s) for s in (11, 12, 13)]
    loss = ObjectiveLoss(LossConfig(objective="OnlyTopP-K30"))
    rows = []
    for logits, labels, mask in micro:
        out, n, report = token_ce_triple(_ce(logits, labels), mask)
        assert float(out) == 0.0 and int(n) == 0  # measuring only
        assert len(report["token_ce"]) == labels.shape[0]
        rows += report["token_ce"]
    q = resolve_percentile(torch.exp(-torch.cat(rows)), 30)
    all_p = np.concatenate([torch.exp(-_ce(lg, lb))[m > 0].numpy() for lg, lb, m in micro])
    assert q == pytest.approx(float(np.percentile(all_p, 30)), abs=1e-12)
    kept = sum(int(loss(_ce(lg, lb), m, threshold=q)[1]) for lg, lb, m in micro)
    assert kept == int((all_p >= q).sum())
    # negative control: per-micro-batch percentiles give a different threshold here
    per_micro = [
        float(np.percentile(torch.exp(-_ce(lg, lb))[m > 0].numpy(), 30)) for lg, lb, m in micro
    ]
    assert any(abs(x - q) > 1e-6 for x in per_micro)


def test_without_prepass_falls_back_to_micro_batch_percentile():
    logits, labels, mask = _inputs(seed=5)
    loss = ObjectiveLoss(LossConfig(objective="OnlyBottomP-K50"))
    assert loss.threshold() == MicroBatchPercentile(50.0, None)
    _, n, _ = loss(_ce(logits, labels), mask)
    resp = int((mask > 0).sum())
    assert abs(int(n) - resp / 2) <= 1


def test_the_loss_is_stateless():
    """Calls are pure: the same inputs give the same triple whatever ran before, the loss
    object cannot be changed, and a percentile objective without a threshold is refused."""
    objective = parse_objective("OnlyTopP-K40")
    logits, labels, mask = _inputs(seed=7)
    ce = _ce(logits, labels)
    loss = ObjectiveLoss(LossConfig(objective="OnlyTopP-K40"))
    first = loss(ce, mask, threshold=0.2, record_p=True)
    loss(_ce(*_inputs(seed=8)[:2]), _inputs(seed=8)[2])  # something else in between
    again = loss(ce, mask, threshold=0.2, record_p=True)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    torch.testing.assert_close(first[2]["stats"], again[2]["stats"], rtol=0, atol=0)
    p = torch.exp(-ce)[mask > 0]
    torch.testing.assert_close(first[2]["p"], p)
    direct = objective_loss(ce, mask, objective, 0.2, normalization="kept")
    torch.testing.assert_close(direct[0], first[0], rtol=0, atol=0)
    assert int(direct[1]) == int((p >= 0.2).sum())
    with pytest.raises(AttributeError, match="immutable"):
        loss.config = LossConfig()
    with pytest.raises(ValueError, match="percentile threshold"):
        objective_loss(ce, mask, objective, None)


def test_recorded_p_is_gathered_into_the_step_stats():
    micro = [_inputs(seed=s) for s in (21, 22)]
    loss = ObjectiveLoss(LossConfig(objective="p"))
    reports = [loss(_ce(lg, lb), m, record_p=True)[2] for lg, lb, m in micro]
    stats = reduce_stats(reports, extra={"tokens": 17})
    want = torch.cat([torch.exp(-_ce(lg, lb))[m > 0] for lg, lb, m in micro]).float()
    torch.testing.assert_close(stats["p"], want)
    assert stats["tokens"] == 17.0
    assert "p" not in reduce_stats([loss(_ce(*micro[0][:2]), micro[0][2])[2]])


def test_bad_loss_config_is_one_clear_error():
    with pytest.raises(ConfigError, match="loss.normalization"):
        LossConfig(normalization="mean")
    with pytest.raises(ConfigError, match="loss.implementation"):
        LossConfig(implementation="triton")
    with pytest.raises(ConfigError):
        ObjectiveLoss(LossConfig(objective="NotAnObjective-3"))
