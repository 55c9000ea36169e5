"""``loss.normalization=sample``: every example's (or assistant turn's) mean token loss,
averaged over the examples of the global batch, whatever the rows, packing and micro-batches.

A float64 reference computes each example's mean directly from its own tokens; the loss
under test sees the same examples laid out as padded rows, packed rows (positions restart
per example) and split over several micro-batches, summed as megatron does (loss sums and
normalizer counts added, one division). The multi-rank cases (TP, SP, PP, DP, distributed
optimizer, gradient accumulation, packing) are in tests/test_parallel_parity.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from probsft_megatron.config import LossConfig
from probsft_megatron.errors import ConfigError
from probsft_megatron.loss import ObjectiveLoss, reduce_stats, sample_weights, step_loss
from probsft_megatron.objectives import parse_objective

OBJECTIVES = ["original", "p", "GeneralFamily-3", "OnlyTopP-0.5"]


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(2**32)
    print(f"random seed {seed}")
    return random.Random(seed)


def _examples(rng: random.Random, n: int) -> list[dict]:
    """Examples of varied lengths, each with 1-3 trained turns (weights 1 or 0.5), a CE
    per position (float64, differentiable), the label convention (last position 0)."""
    out = []
    for _ in range(n):
        mask: list[float] = [0.0] * rng.randint(1, 4)
        for _turn in range(rng.randint(1, 3)):
            w = rng.choice([1.0, 1.0, 0.5])
            mask += [w] * rng.randint(1, 7) + [0.0] * rng.randint(1, 3)
        mask[-1] = 0.0
        ce = torch.tensor([rng.uniform(0.01, 3.0) for _ in mask], dtype=torch.float64)
        out.append({"mask": torch.tensor(mask, dtype=torch.float64), "ce": ce})
    return out


def _turns(mask: torch.Tensor) -> list[list[int]]:
    runs, cur = [], []
    for t, m in enumerate(mask.tolist() + [0.0]):
        if m > 0:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


def _reference(examples, objective: str, unit: str, q=None) -> torch.Tensor:
    """Each unit's weighted mean of f over its trained tokens (threshold-dropped tokens add
    0 but count), averaged over the units."""
    obj = parse_objective(objective)
    means = []
    for ex in examples:
        f = obj.loss_from_ce(ex["ce"])
        keep = obj.keep_mask(ex["ce"], q).to(torch.float64)
        groups = _turns(ex["mask"]) if unit == "turn" else [_turns(ex["mask"])]
        for g in groups:
            idx = torch.tensor(sorted(sum(g, [])) if unit == "example" else g)
            m = ex["mask"][idx]
            means.append((f[idx] * keep[idx] * m).sum() / m.sum())
    return torch.stack(means).mean()


def _layout(examples, rows: int, packed: bool, seq: int):
    """Micro-batches of ``rows`` rows: one example per row (right-padded) or several packed
    per row (positions restart); returns ``[(ce [b, s], mask [b, s], position_ids [b, s])]``
    with ce a view of each example's own tensor (gradients flow back to it)."""
    units = []
    if packed:
        row, used = [], 0
        for ex in examples:
            if used + len(ex["mask"]) > seq and row:
                units.append(row)
                row, used = [], 0
            row.append(ex)
            used += len(ex["mask"])
        units.append(row)
    else:
        units = [[ex] for ex in examples]
    out = []
    for i in range(0, len(units), rows):
        group = units[i : i + rows]
        ces, masks, poss = [], [], []
        for row in group:
            parts_ce = [ex["ce"] for ex in row]
            parts_m = [ex["mask"] for ex in row]
            parts_p = [torch.arange(len(ex["mask"])) for ex in row]
            pad = seq - sum(len(m) for m in parts_m)
            parts_ce.append(torch.zeros(pad, dtype=torch.float64))
            parts_m.append(torch.zeros(pad, dtype=torch.float64))
            parts_p.append(torch.arange(1, pad + 1))  # padding never starts a trained unit
            ces.append(torch.cat(parts_ce))
            masks.append(torch.cat(parts_m))
            poss.append(torch.cat(parts_p))
        out.append((torch.stack(ces), torch.stack(masks), torch.stack(poss)))
    return out


def _global(loss: ObjectiveLoss, batches, threshold=None):
    """What megatron computes: the sums of the micro-batches' loss sums and counts."""
    total, count, reports = 0.0, 0, []
    for ce, mask, pos in batches:
        loss_sum, n, rep = loss(ce, mask, threshold=threshold, position_ids=pos)
        total = total + loss_sum
        count += int(n)
        reports.append(rep)
    return total / count, count, reduce_stats(reports)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("unit", ["example", "turn"])
def test_sample_mean_is_exact_for_every_layout(rng, objective, unit):
    examples = _examples(rng, 13)
    ref = _reference(examples, objective, unit)
    n_units = sum(len(_turns(e["mask"])) if unit == "turn" else 1 for e in examples)
    loss = ObjectiveLoss(LossConfig(objective, normalization="sample", sample_unit=unit))
    seq = max(len(e["mask"]) for e in examples) * 3
    for rows, packed in [(1, False), (4, False), (13, False), (1, True), (2, True)]:
        got, count, stats = _global(loss, _layout(examples, rows, packed, seq))
        assert count == n_units == stats["units"]
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        assert step_loss(stats, "sample") == pytest.approx(float(ref), rel=1e-12)
    # gradients: each example's CE gets d(mean)/d(ce) from the reference expression
    for ex in examples:
        ex["ce"].requires_grad_(True)
    _global(loss, _layout(examples, 2, True, seq))[0].backward()
    got_grads = [ex["ce"].grad.clone() for ex in examples]
    for ex in examples:
        ex["ce"].grad = None
    _reference(examples, objective, unit).backward()
    for ex, g in zip(examples, got_grads):
        torch.testing.assert_close(g, ex["ce"].grad, rtol=1e-12, atol=1e-12)


def test_token_normalization_is_not_the_sample_mean(rng):
    """Negative control: the token-level mean (the default) of the same examples differs,
    and so does a sample mean that ignores the packed boundaries (a row taken as one unit)."""
    examples = _examples(rng, 9)
    ref = _reference(examples, "original", "example")
    seq = max(len(e["mask"]) for e in examples) * 3
    packed = _layout(examples, 1, True, seq)
    token = _global(ObjectiveLoss(LossConfig("original", normalization="response")), packed)[0]
    assert abs(float(token - ref)) > 1e-3
    rows_as_units = [(ce, m, torch.arange(m.shape[1]).expand_as(m)) for ce, m, _ in packed]
    sample = ObjectiveLoss(LossConfig("original", normalization="sample"))
    wrong = _global(sample, rows_as_units)[0]
    assert abs(float(wrong - ref)) > 1e-3


def test_sample_weights_sum_to_one_per_unit_and_count_units():
    mask = torch.tensor([[0, 1, 1, 0, 0, 2, 0, 0, 1, 0, 0, 0]], dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1]])  # three examples, one empty
    w, n = sample_weights(mask, pos, "example")
    assert int(n) == 2
    assert w[0, :7].sum().item() == pytest.approx(1.0) and w[0, 7:10].sum().item() == 1.0
    assert w[0, 5].item() == pytest.approx(0.5)
    w, n = sample_weights(mask, pos, "turn")
    assert int(n) == 3 and w[0, 1].item() == 0.5 and w[0, 5].item() == 1.0


def test_sample_normalization_config():
    with pytest.raises(ConfigError, match="loss.normalization=sample needs loss.implementation"):
        LossConfig(normalization="sample", implementation="fused")
    with pytest.raises(ConfigError, match="loss.sample_unit='row' is invalid"):
        LossConfig(sample_unit="row")
    assert LossConfig().normalization == "kept"  # the default stays token-level


def test_metrics_record_the_units_of_a_sample_normalized_step():
    from probsft_megatron.metrics import step_record
    from probsft_megatron.runtime import StepStats

    base = dict(
        grad_norm=1.0,
        update_successful=True,
        loss=0.5,
        mean_p=0.5,
        frac_kept=1.0,
        mean_w=1.0,
        response_tokens=10,
        tokens=20,
        positions=24,
    )
    assert step_record(1, 1e-3, StepStats(**base, units=3), 1.0)["units"] == 3
    assert "units" not in step_record(1, 1e-3, StepStats(**base, units=0), 1.0)
