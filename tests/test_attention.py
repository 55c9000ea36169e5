"""SDPA core attention equals megatron's local attention (fp32, CPU) at TP=1 and TP=2,
plain causal and with packed sequences (SDPA: a ``thd`` row with ``cu_seqlens`` and no mask;
local: the block-diagonal mask); one sequence across the documents must be caught. One
torchrun launch per TP size runs all of its cases."""

from __future__ import annotations

import pytest

from conftest import read_json, run_torchrun

pytestmark = [pytest.mark.multirank]
TOL = 1e-5


@pytest.fixture(scope="module")
def diffs(tmp_path_factory) -> dict[int, dict]:
    """TP size -> case -> the worker's differences (the negative control at TP=1)."""
    d = tmp_path_factory.mktemp("attention")
    out = {}
    for tp, cases in ((1, "causal,packed,broken"), (2, "causal,packed")):
        run_torchrun(
            "attention_worker.py",
            tp,
            ["--tp", str(tp), "--cases", cases, "--out", str(d / f"tp{tp}.json")],
        )
        out[tp] = read_json(d / f"tp{tp}.json")
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_sdpa_matches_local(diffs, tp, packed):
    res = diffs[tp]["packed" if packed else "causal"]
    print(
        f"TP={tp} packed={packed}: logits {res['logits']:.2e} (scale "
        f"{res['logits_scale']:.2f}), grads (relative) {res['grads']:.2e}"
    )
    assert res["logits"] <= TOL and res["grads"] <= TOL


def test_attention_across_packed_documents_is_detected(diffs):
    assert diffs[1]["broken"]["logits"] > 1e-2
