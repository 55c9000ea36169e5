"""LoRA under TP=2, TP=2+SP, PP=2, DP=2 and DP=2 with the distributed optimizer reproduces
TP=1, with negative controls.

``tests/mp/lora_worker.py`` trains LoRA adapters (rank 4, non-zero ``B`` at the start) on a
tiny Qwen2 shape (qkv bias, untied) and a tiny Llama shape (no bias, tied embeddings) with
several objectives and both loss heads: once at TP=1 (one process; it also writes the base
checkpoints every layout loads) and once in two processes that set up every layout in turn
in the same launch. Per-step losses and grad norms must agree to 1e-5 (relative), and every
adapter's sum and sum of squares after three Adam steps (which reflect its gradients) to 1e-4.
Negative controls in the same launch, at TP=2: the row-parallel adapter's replicated ``B``
keeps its rank's partial gradient (no TP all-reduce), and the gated fc1's ``B`` is split as
one block instead of per gate/up half; both must be caught by the same comparison.
"""

from __future__ import annotations

import pytest

from conftest import read_json, run_torchrun

LAYOUTS = ("tp2", "tp2_sp", "pp2", "dp2", "dp2_distributed_optimizer")
CONTROLS = ("tp2!row-grad", "tp2!glu-shard")
TOL_STEP = 1e-5
TOL_ADAPTER = 1e-4


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_parity")
    common = ["--init-dir", str(d / "init")]
    run_torchrun("lora_worker.py", 1, ["--reference", *common, "--out", str(d / "ref.json")])
    run_torchrun(
        "lora_worker.py",
        2,
        ["--layouts", ",".join(LAYOUTS + CONTROLS), *common, "--out", str(d / "layouts.json")],
        timeout=900,
    )
    return read_json(d / "ref.json")["tp1"], read_json(d / "layouts.json")


def deviations(ref: dict, got: dict) -> dict[str, tuple[float, str]]:
    """Largest relative deviation of the step figures and of the adapters, with where."""
    worst = {"step": (0.0, ""), "adapter": (0.0, "")}

    def note(kind, value, where):
        if value > worst[kind][0]:
            worst[kind] = (value, where)

    for run, series in ref.items():
        for key in ("loss", "grad_norm"):
            assert len(got[run][key]) == len(series[key]) == 3, (run, key)
            for step, (a, b) in enumerate(zip(series[key], got[run][key])):
                note("step", abs(a - b) / max(1.0, abs(a)), f"{run} {key} step {step + 1}")
        assert set(got[run]["adapters"]) == set(series["adapters"]), run
        for name, (s, q) in series["adapters"].items():
            s2, q2 = got[run]["adapters"][name]
            note("adapter", max(abs(s - s2), abs(q - q2)) / max(1.0, q), f"{run} {name}")
    return worst


@pytest.mark.multirank
@pytest.mark.slow
def test_reference_is_informative(parity):
    ref, _ = parity
    assert len(ref) == 5
    for run, series in ref.items():
        assert all(g > 1e-4 for g in series["grad_norm"]), (run, series["grad_norm"])
        assert len(series["adapters"]) == 2 * 4 * 2, run  # 2 layers x 4 linears x (A, B)
        assert 0.0 < series["trainable_fraction"] < 0.1, run


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_layout_matches_single_rank(parity, layout):
    ref, got = parity
    worst = deviations(ref, got[layout])
    print(f"{layout}: {worst}")
    assert worst["step"][0] <= TOL_STEP, f"{layout}: {worst['step']}"
    assert worst["adapter"][0] <= TOL_ADAPTER, f"{layout}: {worst['adapter']}"


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("control", CONTROLS)
def test_broken_lora_sharding_is_detected(parity, control):
    ref, got = parity
    worst = deviations(ref, got[control])
    print(f"{control}: {worst}")
    assert max(worst["step"][0], worst["adapter"][0]) > 1e-3, worst
