"""TP=2, TP=2+SP, PP=2 and DP=2 training steps reproduce the single-rank reference.

A single-rank run pre-trains the tiny Qwen2-style model briefly (so token probabilities
spread over (0, 1) and thresholds keep a real fraction of tokens), saves it as a torch_dist
checkpoint, and trains 3 steps per objective. Each multi-rank layout loads that checkpoint
(resharded on load) and trains on the same global batches; per-step losses and grad norms
must agree to 1e-5. A negative control breaks the TP reduction of the vocab-parallel cross
entropy and must be caught by the same comparison.
"""
from __future__ import annotations

import pytest

from conftest import read_json, run_torchrun

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

OBJECTIVES = "original,p,GeneralFamily-8,OnlyTopP-0.3,OnlyBottomP-K50,UnlikehoodTop-0.5"
TOL = 1e-5
LAYOUTS = {
    "tp2": ["--tp", "2"],
    "tp2_sp": ["--tp", "2", "--sp"],
    "pp2": ["--pp", "2"],
    "dp2": [],
    "dp2_distributed_optimizer": ["--distributed-optimizer"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    run_torchrun("parity_worker.py", 1, ["--init-ckpt", str(d / "init"), "--save-init",
                                         "--objectives", OBJECTIVES, "--out", str(d / "ref.json")])
    return d, read_json(d / "ref.json")["results"]


def max_diff(ref: dict, got: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for obj, series in ref.items():
        for key in ("loss", "grad_norm"):
            assert len(got[obj][key]) == len(series[key]), (obj, key)
            for step, (a, b) in enumerate(zip(series[key], got[obj][key])):
                if abs(a - b) > worst:
                    worst, where = abs(a - b), f"{obj} {key} step {step + 1}"
    return worst, where


def test_reference_is_informative(reference):
    """The reference exercises every objective: nonzero gradients, thresholds keep a part."""
    _, ref = reference
    for obj, series in ref.items():
        assert all(g > 1e-4 for g in series["grad_norm"]), (obj, series["grad_norm"])
    for obj in ("OnlyTopP-0.3", "OnlyBottomP-K50", "UnlikehoodTop-0.5"):
        assert all(0.02 < f < 0.98 for f in ref[obj]["frac_kept"]), (obj, ref[obj]["frac_kept"])
    assert all(abs(f - 0.5) < 0.05 for f in ref["OnlyBottomP-K50"]["frac_kept"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_rank(reference, layout):
    d, ref = reference
    out = d / f"{layout}.json"
    run_torchrun("parity_worker.py", 2, [*LAYOUTS[layout], "--init-ckpt", str(d / "init"),
                                         "--objectives", OBJECTIVES, "--out", str(out)])
    worst, where = max_diff(ref, read_json(out)["results"])
    print(f"{layout}: max |diff| = {worst:.2e} ({where})")
    assert worst <= TOL, f"{layout} deviates from TP=1 by {worst:.3e} at {where}"


def test_broken_tp_reduction_is_detected(reference):
    """Negative control: without the SUM all-reduces the TP=2 run must not match."""
    d, ref = reference
    out = d / "broken.json"
    run_torchrun("parity_worker.py", 2, ["--tp", "2", "--break-tp-reduction", "--init-ckpt",
                                         str(d / "init"), "--objectives", OBJECTIVES,
                                         "--out", str(out)])
    worst, where = max_diff(ref, read_json(out)["results"])
    print(f"broken TP reduction: max |diff| = {worst:.2e} ({where})")
    assert worst > 1e-2
