"""Objective library against an independent float64 reference built from the full softmax.

The reference computes p = exp(log_softmax(logits))[target] and f(p) directly from p;
the library path computes ce = F.cross_entropy(..., reduction="none") and
Objective.loss_from_ce(ce). Both are normalized by the number of kept tokens (clamped at 1)
and compared on the loss value and on the autograd gradient wrt the logits.

Tolerances (float64, machine eps 2.2e-16; atol 1e-13 throughout for entries near 0):
- loss and logit gradient: rtol 1e-12 (observed <= 1e-14 over 30 seeds). The log(1 - p)
  family gets rtol 1e-9: both paths get 1 - p = d by cancellation (logsumexp minus the target
  logit, logits up to ~20 here), so their weights p/(1-p) may disagree by ~20 * 2.2e-16 / d,
  up to ~4e-9 at the documented floor d = 1e-6 (observed <= 4e-11).
- w(p) vs autograd d f / d ce: exact by construction of the backward; w(p) vs the analytic
  formula: rtol 1e-9 (1 - exp(-ce) in the test loses digits for small ce); w(p) vs a central
  finite difference of the loss values: rtol 1e-6.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from probsft_megatron.cli import main as cli_main
from probsft_megatron.errors import ConfigError
from probsft_megatron.objectives import (
    UNLIKELIHOOD_EPS,
    Objective,
    ObjectiveError,
    Threshold,
    list_objectives,
    parse_objective,
    resolve_percentile,
)

np = pytest.importorskip("numpy")

EPS = 1e-6  # documented floor on 1 - p for the log(1 - p) family
WMAX = (1 - EPS) / EPS  # documented weight cap
CE0 = -math.log1p(-EPS)  # ce at which 1 - p == EPS


# ----------------------------------------------------------------------------- reference


def ref_f(obj: Objective, p: torch.Tensor, a: float | None = None) -> torch.Tensor:
    """f(p) written from the paper's table, directly in p (float64)."""
    family = obj.family
    a = obj.a if a is None else a
    if family in ("nll", "logp_thr") or (family == "general" and a == 0):
        return -torch.log(p)
    if family in ("p", "p_thr"):
        return 1 - p
    if family == "general":
        return (1 - p**a) / a
    # log(1 - p) where 1 - p >= EPS; tangent line in ce = -log p below (documented cap)
    p_safe = torch.minimum(p, torch.full_like(p, 1 - EPS))
    exact = torch.log1p(-p_safe)
    tangent = math.log(EPS) + WMAX * (-torch.log(p) - CE0)
    return torch.where(1 - p >= EPS, exact, tangent)


def ref_keep(obj: Objective, p: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    if obj.threshold is None:
        return resp.clone()
    q = obj.threshold.value
    if obj.threshold.percentile:
        q = float(np.percentile(p[resp].detach().numpy(), q)) if resp.any() else float("nan")
    keep = p >= q if obj.threshold.side == "top" else p <= q
    return resp & keep


def ref_loss_and_grad(obj, logits, y, resp, f=ref_f, normalize_by_kept=True):
    x = logits.detach().clone().requires_grad_(True)
    p = torch.log_softmax(x, dim=-1).gather(1, y[:, None]).squeeze(1).exp()
    keep = ref_keep(obj, p.detach(), resp)
    denom = keep.sum() if normalize_by_kept else resp.sum()
    loss = (f(obj, p) * keep).sum() / denom.clamp(min=1)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, keep


def lib_loss_and_grad(obj, logits, y, resp):
    x = logits.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(x, y, reduction="none")
    q = None
    if obj.needs_percentile:
        q = resolve_percentile(torch.exp(-ce.detach())[resp], obj.threshold.value)
    keep = resp & obj.keep_mask(ce.detach(), q)
    loss = (obj.loss_from_ce(ce) * keep).sum() / keep.sum().clamp(min=1)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, keep


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> bool:
    """True when finite and |actual - expected| <= atol + rtol * |expected| everywhere."""
    if actual.shape != expected.shape or not torch.isfinite(actual).all():
        return False
    return bool(((actual - expected).abs() <= atol + rtol * expected.abs()).all())


def make_batch(n: int = 48, vocab: int = 32, seed: int | None = None):
    """Random float64 logits with rows at p ~ 0, p near 1 (above/below the floor), p == 1, ties."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    logits = 2 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,), generator=g)
    special = {0: -60.0, 1: 12.0, 2: 16.0, 3: 18.0, 4: 40.0, 5: 1000.0, 6: 8.0, 7: 3.0}
    for row, value in special.items():
        logits[row, y[row]] = value
    logits[8:12] = logits[0:4]  # exact ties
    y[8:12] = y[0:4]
    resp = torch.rand(n, generator=g) > 0.2
    resp[:12] = True
    return logits, y, resp


SPECS = [
    "original",
    "p",
    "dft",
    "GeneralFamily-0",
    "GeneralFamily-0.5",
    "GeneralFamily-1",
    "GeneralFamily-8",
    "OnlyTopP-0.5",
    "OnlyBottomP-0.3",
    "OnlyTopLogP-0.2",
    "OnlyBottomLogP-0.9",
    "UnlikehoodTop-0.4",
    "UnlikehoodBottom-0.7",
    "OnlyTopP-K20",
    "OnlyBottomP-K50",
    "OnlyTopLogP-K70",
    "OnlyBottomLogP-K5",
    "UnlikehoodTop-K60",
    "UnlikehoodBottom-K80",
    "OnlyTopP-K0",
    "OnlyBottomP-K100",
]


def tolerances(obj: Objective) -> tuple[float, float]:
    return (1e-9, 1e-13) if obj.family == "unlikelihood_thr" else (1e-12, 1e-13)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("spec", SPECS)
def test_loss_and_logit_grad_match_float64_reference(spec):
    obj = parse_objective(spec)
    logits, y, resp = make_batch()
    ref_loss, ref_grad, ref_keep_mask = ref_loss_and_grad(obj, logits, y, resp)
    loss, grad, keep = lib_loss_and_grad(obj, logits, y, resp)
    assert torch.equal(keep, ref_keep_mask)
    if obj.thresholded and obj.threshold.value not in (0.0, 100.0):
        assert 0 < keep.sum() < resp.sum()  # the threshold really drops tokens here
    rtol, atol = tolerances(obj)
    assert close(loss, ref_loss, rtol, atol), (loss, ref_loss)
    assert close(grad, ref_grad, rtol, atol), (grad - ref_grad).abs().max()
    assert grad.abs().sum() > 0


def test_negative_controls_are_detected():
    """The same helper must flag a wrong weight, a wrong normalizer and a wrong mask side."""
    logits, y, resp = make_batch()
    obj = parse_objective("GeneralFamily-8")
    loss, grad, _ = lib_loss_and_grad(obj, logits, y, resp)
    # wrong weight p^(a+1): f(p) = (1 - p^(a+1)) / (a+1)
    _, wrong_grad, _ = ref_loss_and_grad(
        obj, logits, y, resp, f=lambda o, p: ref_f(o, p, a=o.a + 1)
    )
    assert not close(grad, wrong_grad, *tolerances(obj))

    thr = parse_objective("OnlyTopP-0.5")
    loss, grad, _ = lib_loss_and_grad(thr, logits, y, resp)
    wrong_loss, _, _ = ref_loss_and_grad(thr, logits, y, resp, normalize_by_kept=False)
    assert not close(loss, wrong_loss, *tolerances(thr))
    other_side = parse_objective("OnlyBottomP-0.5")
    wrong_loss, _, _ = ref_loss_and_grad(other_side, logits, y, resp)
    assert not close(loss, wrong_loss, *tolerances(thr))


@pytest.mark.parametrize("spec", ["OnlyBottomP-1e-300", "OnlyTopP-K20", "UnlikehoodTop-0.4", "p"])
def test_empty_keep_set_gives_zero_loss_and_grad(spec):
    obj = parse_objective(spec)
    logits, y, resp = make_batch(n=16)
    if spec != "OnlyBottomP-1e-300":
        resp = torch.zeros_like(resp)  # no response tokens at all
    loss, grad, keep = lib_loss_and_grad(obj, logits, y, resp)
    assert keep.sum() == 0
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- weights

CE_VALUES = [0.0, 1e-12, 1e-7, CE0 / 2, CE0, 2 * CE0, 1e-3, 0.1, 0.7, 2.0, 10.0, 50.0, 700.0, 1e4]


def analytic_w(obj: Objective, ce: torch.Tensor) -> torch.Tensor:
    p = torch.exp(-ce)
    if obj.family in ("nll", "logp_thr"):
        return torch.ones_like(ce)
    if obj.family in ("p", "p_thr"):
        return p
    if obj.family == "general":
        return p**obj.a
    return torch.minimum(p / (1 - p), torch.full_like(p, WMAX))


@pytest.mark.parametrize(
    "spec",
    [
        "original",
        "p",
        "GeneralFamily-0",
        "GeneralFamily-0.5",
        "GeneralFamily-1",
        "GeneralFamily-8",
        "OnlyTopP-0.5",
        "OnlyBottomLogP-K10",
        "UnlikehoodTop-0.1",
    ],
)
def test_weight_is_dloss_dce(spec):
    obj = parse_objective(spec)
    ce = torch.tensor(CE_VALUES, dtype=torch.float64, requires_grad=True)
    loss = obj.loss_from_ce(ce)
    (dce,) = torch.autograd.grad(loss.sum(), ce)
    w = obj.weight_from_ce(ce)
    assert not w.requires_grad
    assert torch.isfinite(loss).all() and torch.isfinite(dce).all()
    assert close(dce, w, 1e-12, 0.0)
    assert close(w, analytic_w(obj, ce.detach()), 1e-9, 0.0)
    # the weight is the slope of the loss values: central differences where they resolve it
    # (away from ce = 0, and not where f has saturated so that w < 1e-6)
    c = ce.detach()[(ce.detach() >= 1e-3) & (w > 1e-6)]
    assert c.numel() >= 3
    h = 1e-5 * c
    fd = (obj.loss_from_ce(c + h) - obj.loss_from_ce(c - h)) / (2 * h)
    assert close(fd, obj.weight_from_ce(c), 1e-6, 1e-300)
    # float32 and bfloat16 ce stay finite too
    for dtype in (torch.float32, torch.bfloat16):
        low = ce.detach().to(dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(obj.loss_from_ce(low).sum(), low)
        assert torch.isfinite(obj.loss_from_ce(low)).all() and torch.isfinite(g).all()


def test_unlikelihood_floor_is_continuous_and_bounded():
    assert UNLIKELIHOOD_EPS == EPS
    obj = parse_objective("UnlikehoodTop-0.5")
    ce = torch.tensor(
        [0.0, CE0 * (1 - 1e-9), CE0, CE0 * (1 + 1e-9)], dtype=torch.float64, requires_grad=True
    )
    loss = obj.loss_from_ce(ce)
    (dce,) = torch.autograd.grad(loss.sum(), ce)
    assert loss[0].item() == pytest.approx(math.log(EPS) - WMAX * CE0, rel=1e-12)
    assert dce[0].item() == pytest.approx(WMAX, rel=1e-12)  # capped, not zeroed
    assert close(loss[1:], torch.full((3,), math.log(EPS), dtype=torch.float64), 1e-9, 0)
    assert close(dce[1:], torch.full((3,), WMAX, dtype=torch.float64), 1e-6, 0)
    assert (dce <= WMAX * (1 + 1e-12)).all()


def test_general_family_zero_is_nll_and_small_a_converges():
    ce = torch.rand(64, dtype=torch.float64) * 5
    ce[0] = 0.0
    ce.requires_grad_(True)
    nll = parse_objective("original")
    g0 = parse_objective("GeneralFamily-0")
    assert torch.equal(g0.loss_from_ce(ce), nll.loss_from_ce(ce))
    assert torch.equal(g0.loss_from_ce(ce), ce)
    (d0,) = torch.autograd.grad(g0.loss_from_ce(ce).sum(), ce)
    assert torch.equal(d0, torch.ones_like(ce))
    err = {
        a: (parse_objective(f"GeneralFamily-{a}").loss_from_ce(ce) - ce).abs().max().item()
        for a in (1e-3, 1e-6)
    }
    assert err[1e-6] < 1e-5 * 5**2  # |f_a - ce| <= a * ce^2 / 2
    assert err[1e-6] < err[1e-3] / 100


def test_keep_mask_semantics():
    ce = -torch.log(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    p = torch.exp(-ce)
    top = parse_objective("OnlyTopP-0.5")
    assert torch.equal(top.keep_mask(ce), p >= 0.5)
    assert torch.equal(top.keep_mask(ce, q=0.05), torch.ones(3, dtype=torch.bool))
    assert torch.equal(parse_objective("OnlyBottomLogP-0.5").keep_mask(ce), p <= 0.5)
    assert parse_objective("p").keep_mask(ce).all()
    # the comparison includes equality, like the seed: p == 1 passes p <= 1, p == 0 passes p >= 0
    edge = torch.tensor([0.0, math.inf], dtype=torch.float64)
    assert torch.equal(parse_objective("OnlyBottomP-1").keep_mask(edge), torch.tensor([True, True]))
    assert torch.equal(parse_objective("OnlyTopP-0").keep_mask(edge), torch.tensor([True, True]))
    pct = parse_objective("OnlyTopP-K50")
    with pytest.raises(ValueError, match="resolve_percentile"):
        pct.keep_mask(ce)
    assert not pct.keep_mask(ce, q=float("nan")).any()  # percentile of no tokens keeps nothing


# ----------------------------------------------------------------------------- parsing

VALID = [
    ("original", "original", "nll", None, None),
    ("nll", "original", "nll", None, None),
    ("logp", "original", "nll", None, None),
    ("p", "p", "p", None, None),
    ("dft", "p", "p", None, None),
    ("GeneralFamily-8", "GeneralFamily-8", "general", 8.0, None),
    ("GeneralFamily-0.50", "GeneralFamily-0.5", "general", 0.5, None),
    ("convexity-0.1", "GeneralFamily-0.1", "general", 0.1, None),
    ("GeneralFamily-1e-6", "GeneralFamily-1e-06", "general", 1e-6, None),
    ("OnlyTopP-0", "OnlyTopP-0", "p_thr", None, Threshold(0.0, False, "top")),
    (
        "OnlyTopP-0.5858418226242066",
        "OnlyTopP-0.5858418226242066",
        "p_thr",
        None,
        Threshold(0.5858418226242066, False, "top"),
    ),
    ("OnlyBottomP-1.0", "OnlyBottomP-1", "p_thr", None, Threshold(1.0, False, "bottom")),
    ("OnlyTopLogP-0.9", "OnlyTopLogP-0.9", "logp_thr", None, Threshold(0.9, False, "top")),
    ("OnlyBottomLogP-0.2", "OnlyBottomLogP-0.2", "logp_thr", None, Threshold(0.2, False, "bottom")),
    (
        "UnlikehoodTop-0.3",
        "UnlikehoodTop-0.3",
        "unlikelihood_thr",
        None,
        Threshold(0.3, False, "top"),
    ),
    (
        "UnlikelihoodBottom-0.7",
        "UnlikehoodBottom-0.7",
        "unlikelihood_thr",
        None,
        Threshold(0.7, False, "bottom"),
    ),
    ("OnlyTopP-K20", "OnlyTopP-K20", "p_thr", None, Threshold(20.0, True, "top")),
    ("onlybottomp-k100", "OnlyBottomP-K100", "p_thr", None, Threshold(100.0, True, "bottom")),
    ("UnlikehoodTop-K0", "UnlikehoodTop-K0", "unlikelihood_thr", None, Threshold(0.0, True, "top")),
    ({"name": "GeneralFamily", "a": 8}, "GeneralFamily-8", "general", 8.0, None),
    ({"name": "convexity", "a": "2.5"}, "GeneralFamily-2.5", "general", 2.5, None),
    ({"name": "OnlyTopP", "q": 0.5}, "OnlyTopP-0.5", "p_thr", None, Threshold(0.5, False, "top")),
    (
        {"name": "OnlyTopP", "percentile": 20},
        "OnlyTopP-K20",
        "p_thr",
        None,
        Threshold(20.0, True, "top"),
    ),
    ({"name": "p"}, "p", "p", None, None),
    (
        {"name": "OnlyTopLogP-K30"},
        "OnlyTopLogP-K30",
        "logp_thr",
        None,
        Threshold(30.0, True, "top"),
    ),
]


@pytest.mark.parametrize("spec,name,family,a,threshold", VALID)
def test_parse_valid_and_round_trip(spec, name, family, a, threshold):
    obj = parse_objective(spec)
    assert (obj.name, obj.family, obj.a, obj.threshold) == (name, family, a, threshold)
    assert parse_objective(obj.name) == obj
    assert parse_objective(obj) is obj
    assert obj.thresholded == (threshold is not None)
    assert obj.needs_percentile == bool(threshold and threshold.percentile)


INVALID = [
    "foo",
    "",
    "GeneralFamily",
    "OnlyTopP",
    "GeneralFamily-abc",
    "GeneralFamily--1",
    "GeneralFamily-nan",
    "GeneralFamily-inf",
    "GeneralFamily-K20",
    "OnlyTopP-1.5",
    "OnlyTopP-1",
    "OnlyTopP--0.1",
    "OnlyBottomP-0",
    "OnlyBottomP-1.01",
    "OnlyTopLogP-1",
    "UnlikehoodBottom-0",
    "OnlyTopP-K101",
    "OnlyTopP-K-1",
    "OnlyTopP-Kx",
    "p-0.5",
    "original-1",
    {"name": "GeneralFamily", "a": -1},
    {"name": "GeneralFamily", "a": float("inf")},
    {"name": "OnlyTopP", "q": 0.5, "percentile": 20},
    {"name": "p", "a": 1},
    {"name": "OnlyTopP", "a": 1},
    {"name": "GeneralFamily", "q": 0.5},
    {"name": "OnlyTopP", "q": True},
    {"name": "OnlyTopP", "q": 0.5, "foo": 1},
    {"a": 1},
    {"name": "OnlyTopP-0.5", "q": 0.5},
    {"name": "OnlyTopP", "percentile": 150},
    42,
    None,
    Objective(name="p", family="nll"),
]


@pytest.mark.parametrize("spec", INVALID, ids=repr)
def test_parse_invalid_lists_valid_forms(spec):
    with pytest.raises(ObjectiveError) as info:
        parse_objective(spec)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "\n" not in message
    for form in ("original", "GeneralFamily-<a>", "OnlyTopP-<q>", "UnlikehoodBottom-<q>", "K<k>"):
        assert form in message


def test_negative_a_says_why():
    with pytest.raises(ObjectiveError, match=r"a must be finite and >= 0.*p\^a grows"):
        parse_objective("GeneralFamily--0.5")


def test_list_and_describe():
    rows = list_objectives()
    assert [r["form"] for r in rows] == [
        "original",
        "p",
        "GeneralFamily-<a>",
        "OnlyTopP-<q>",
        "OnlyBottomP-<q>",
        "OnlyTopLogP-<q>",
        "OnlyBottomLogP-<q>",
        "UnlikehoodTop-<q>",
        "UnlikehoodBottom-<q>",
    ]
    for r in rows:
        assert set(r) == {"form", "f", "w", "mask", "example", "aliases"}
        parse_objective(r["example"])
    d = parse_objective("GeneralFamily-8").describe()
    assert set(d) == {"name", "f", "w", "mask", "normalization"}
    assert (d["name"], d["f"], d["w"]) == ("GeneralFamily-8", "(1 - p^8) / 8", "p^8")
    d = parse_objective("OnlyBottomP-K20").describe()
    assert "p <= q" in d["mask"] and "percentile 20" in d["mask"]
    assert "kept tokens" in d["normalization"]


# ----------------------------------------------------------------------------- percentile


@pytest.mark.parametrize("n", [1, 2, 7, 1001])
def test_resolve_percentile_matches_numpy(n):
    x = torch.rand(n, dtype=torch.float64)
    x[: n // 3] = torch.round(x[: n // 3] * 10) / 10  # ties
    for k in (0, 0.5, 5, 12.34, 20, 33.3, 50, 66.66, 87.5, 99.9, 100):
        expected = float(np.percentile(x.numpy(), k))
        assert abs(resolve_percentile(x, k) - expected) <= 1e-12
        x32 = x.float()  # float32 input is resolved in float64
        expected = float(np.percentile(x32.numpy().astype(np.float64), k))
        assert abs(resolve_percentile(x32, k) - expected) <= 1e-12


def test_resolve_percentile_edge_cases():
    assert math.isnan(resolve_percentile(torch.empty(0), 20))
    with pytest.raises(ValueError):
        resolve_percentile(torch.rand(4), 101)
    with pytest.raises(ValueError):
        resolve_percentile(torch.rand(2, 2), 50)


def test_resolve_percentile_beyond_torch_quantile_limit():
    n = 2**24 + 5  # torch.quantile refuses more than 2**24 elements
    x = torch.arange(n, dtype=torch.float64).flip(0)
    assert resolve_percentile(x, 20) == pytest.approx(0.2 * (n - 1), rel=1e-15)


# ----------------------------------------------------------------------------- CLI


def test_cli_table_and_json(capsys):
    assert cli_main(["objectives"]) == 0
    out = capsys.readouterr().out
    for form in ("original", "GeneralFamily-<a>", "UnlikehoodBottom-<q>", "p^a", "p / (1 - p)"):
        assert form in out
    assert cli_main(["objectives", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == list_objectives()


def test_cli_describe(capsys):
    assert cli_main(["objectives", "--describe", "convexity-0.5"]) == 0
    out = capsys.readouterr().out
    assert "GeneralFamily-0.5" in out and "p^0.5" in out and "(1 - p^0.5) / 0.5" in out
    assert cli_main(["objectives", "--describe", "OnlyTopP-K20", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "OnlyTopP-K20" and info["family"] == "p_thr"
    assert info["threshold"] == {"value": 20.0, "percentile": True, "side": "top"}


@pytest.mark.parametrize("bad", ["OnlyTopP-1.5", "GeneralFamily--1", "nonsense"])
def test_cli_describe_invalid(capsys, bad):
    assert cli_main(["objectives", "--describe", bad]) == 2  # a usage error, like all others
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "GeneralFamily-<a>" in lines[0]


def test_console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "probsft")
    if not os.path.exists(exe):
        pytest.skip("probsft console script not installed")
    done = subprocess.run(
        [exe, "objectives", "--describe", "dft"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "name:" in done.stdout and " p\n" in done.stdout
    done = subprocess.run(
        [exe, "objectives", "--describe", "OnlyBottomP-0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ")


def test_the_loss_uses_the_jobs_parsed_objective(tmp_path):
    """The objective is parsed once, by the loss section; the Job and the loss take that
    object (the same one, not a re-parse of the config string). Negative control: another
    LossConfig has a parse of its own."""
    from probsft_megatron.config import LossConfig, load_config
    from probsft_megatron.job import resolve_job
    from probsft_megatron.loss import ObjectiveLoss

    cfg = load_config(
        "tiny-figfont-cpu",
        ["loss.objective=OnlyTopP-0.5", "init.tokenizer=smollm2", f"train.output_dir={tmp_path}"],
    )
    job = resolve_job(cfg, 1)
    loss = ObjectiveLoss(job.loss, None)
    assert loss.objective is job.objective and loss.objective.name == "OnlyTopP-0.5"
    bare = ObjectiveLoss(LossConfig("OnlyTopP-0.5"))
    assert bare.objective is not job.objective and bare.objective == job.objective
