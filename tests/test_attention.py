"""SDPA core attention equals megatron's local attention (fp32, CPU) at TP=1 and TP=2,
plain causal and with packed sequences (SDPA: a ``thd`` row with ``cu_seqlens`` and no mask;
local: the block-diagonal mask); one sequence across the documents must be caught."""

from __future__ import annotations

import pytest

from conftest import read_json, run_torchrun

pytestmark = [pytest.mark.multirank]
TOL = 1e-5


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_sdpa_matches_local(tmp_path, tp, packed):
    out = tmp_path / "diff.json"
    run_torchrun(
        "attention_worker.py",
        tp,
        ["--tp", str(tp), "--out", str(out), *(["--packed"] if packed else [])],
    )
    res = read_json(out)
    print(
        f"TP={tp} packed={packed}: logits {res['logits']:.2e} (scale "
        f"{res['logits_scale']:.2f}), grads (relative) {res['grads']:.2e}"
    )
    assert res["logits"] <= TOL and res["grads"] <= TOL


def test_attention_across_packed_documents_is_detected(tmp_path):
    out = tmp_path / "diff.json"
    run_torchrun("attention_worker.py", 1, ["--packed", "--break-mask", "--out", str(out)])
    assert read_json(out)["logits"] > 1e-2
