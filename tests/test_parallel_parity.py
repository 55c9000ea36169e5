"""TP=2, TP=2+SP, PP=2 and DP=2 training steps reproduce the single-rank reference, and
activation recomputation changes nothing.

A single-rank run pre-trains the tiny Qwen2-style model briefly (so token probabilities
spread over (0, 1) and thresholds keep a real fraction of tokens), saves it as a torch_dist
checkpoint, and trains 3 steps per objective. Each multi-rank layout loads that checkpoint
(resharded on load) and trains on the same global batches; per-step losses and grad norms
must agree to 1e-5 (one layout also recomputes every layer in the backward). A negative
control breaks the TP reduction of the vocab-parallel cross entropy and must be caught by
the same comparison. The single-rank cases run in one torchrun launch and every two-process
case in another (``parity_worker.py --cases``: one process group, megatron's groups rebuilt
per case).

In one process (TP=1): ``parallel.recompute_granularity`` selective and full (uniform and
block) give the losses and grad norms of no recomputation, and really recompute (the core
attention, or whole layers, run a second time in the backward).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import read_json, run_torchrun

OBJECTIVES = "original,p,GeneralFamily-8,OnlyTopP-0.3,OnlyBottomP-K50,UnlikehoodTop-0.5"
TOL = 1e-5
LAYOUTS = {
    "tp2": ["--tp", "2"],
    "tp2_sp": ["--tp", "2", "--sp"],
    "pp2": ["--pp", "2"],
    "dp2": [],
    "dp2_distributed_optimizer": ["--distributed-optimizer"],
    "tp2_full_recompute": ["--tp", "2", "--recompute", "full:uniform:1"],
}


def run_cases(d, nproc: int, cases: list[list[str]]) -> None:
    """Every case (parity_worker's arguments, the shared init checkpoint added) in one launch."""
    init = ["--init-ckpt", str(d / "init")]
    cases_file = d / f"cases_{nproc}.json"
    cases_file.write_text(json.dumps([[*case, *init] for case in cases]))
    run_torchrun("parity_worker.py", nproc, ["--cases", str(cases_file)], timeout=1800)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-rank runs: the pre-trained init checkpoint and the padded reference, the
    varied-length reference and the sample-normalized one."""
    d = tmp_path_factory.mktemp("parity")
    run_cases(
        d,
        1,
        [
            ["--save-init", "--objectives", OBJECTIVES, "--out", str(d / "ref.json")],
            ["--varlen", "--objectives", OBJECTIVES, "--out", str(d / "varlen_ref.json")],
            [
                "--varlen",
                "--normalization",
                "sample",
                "--objectives",
                SAMPLE_OBJECTIVES,
                "--out",
                str(d / "sample_ref.json"),
            ],
        ],
    )
    return d, read_json(d / "ref.json")["results"]


@pytest.fixture(scope="module")
def two_ranks(reference):
    """Every two-process case of this module in one launch, each writing its <case>.json."""
    d, _ = reference
    cases = [
        [*LAYOUTS[name], "--objectives", OBJECTIVES, "--out", str(d / f"{name}.json")]
        for name in sorted(LAYOUTS)
    ]
    cases += [
        [*VARLEN_LAYOUTS[name], "--varlen", "--objectives", OBJECTIVES]
        + ["--out", str(d / f"varlen_{name}.json")]
        for name in sorted(VARLEN_LAYOUTS)
    ]
    cases += [
        [*SAMPLE_LAYOUTS[name], "--varlen", "--normalization", "sample"]
        + ["--objectives", SAMPLE_OBJECTIVES, "--out", str(d / f"sample_{name}.json")]
        for name in sorted(SAMPLE_LAYOUTS)
    ]
    cases.append(
        ["--tp", "2", "--break-tp-reduction", "--objectives", OBJECTIVES]
        + ["--out", str(d / "broken.json")]
    )
    run_cases(d, 2, cases)
    return d


def max_diff(ref: dict, got: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for obj, series in ref.items():
        for key in ("loss", "grad_norm"):
            assert len(got[obj][key]) == len(series[key]), (obj, key)
            for step, (a, b) in enumerate(zip(series[key], got[obj][key])):
                if abs(a - b) > worst:
                    worst, where = abs(a - b), f"{obj} {key} step {step + 1}"
    return worst, where


@pytest.mark.multirank
@pytest.mark.slow
def test_reference_is_informative(reference):
    """The reference exercises every objective: nonzero gradients, thresholds keep a part."""
    _, ref = reference
    for obj, series in ref.items():
        assert all(g > 1e-4 for g in series["grad_norm"]), (obj, series["grad_norm"])
    for obj in ("OnlyTopP-0.3", "OnlyBottomP-K50", "UnlikehoodTop-0.5"):
        assert all(0.02 < f < 0.98 for f in ref[obj]["frac_kept"]), (obj, ref[obj]["frac_kept"])
    assert all(abs(f - 0.5) < 0.05 for f in ref["OnlyBottomP-K50"]["frac_kept"])


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_rank(reference, two_ranks, layout):
    d, ref = reference
    out = d / f"{layout}.json"
    worst, where = max_diff(ref, read_json(out)["results"])
    print(f"{layout}: max |diff| = {worst:.2e} ({where})")
    assert worst <= TOL, f"{layout} deviates from TP=1 by {worst:.3e} at {where}"


@pytest.mark.multirank
@pytest.mark.slow
def test_broken_tp_reduction_is_detected(reference, two_ranks):
    """Negative control: without the SUM all-reduces the TP=2 run must not match."""
    d, ref = reference
    out = d / "broken.json"
    worst, where = max_diff(ref, read_json(out)["results"])
    print(f"broken TP reduction: max |diff| = {worst:.2e} ({where})")
    assert worst > 1e-2


# -- varied lengths: dynamic padding and packing, every layout ------------------------------------
VARLEN_LAYOUTS = {
    "tp2_sp": ["--tp", "2", "--sp"],
    "pp2": ["--pp", "2"],
    "dp2": [],
}
VARLEN_MODES = ("max_length", "longest", "packed")


def varlen_diff(ref: dict, got: dict, mode: str) -> tuple[float, str]:
    """Largest |diff| of ``mode``'s losses and grad norms to the reference's padded rows."""
    padded = {k.split("/")[0]: v for k, v in ref.items() if k.endswith("/max_length")}
    return max_diff(padded, {k.split("/")[0]: v for k, v in got.items() if k.endswith(f"/{mode}")})


@pytest.fixture(scope="module")
def varlen_reference(reference):
    d, _ = reference
    out = d / "varlen_ref.json"
    return d, read_json(out)["results"]


@pytest.mark.multirank
@pytest.mark.slow
def test_dynamic_padding_and_packing_match_padded_rows(varlen_reference):
    """One rank: examples of varied lengths padded to the micro-batch's longest, or packed
    into one row with their boundaries, give the losses and grad norms of rows padded to
    max_length for every objective; attention across the packed boundaries does not."""
    _, ref = varlen_reference
    first = OBJECTIVES.split(",")[0]
    for mode in VARLEN_MODES[1:]:
        worst, where = varlen_diff(ref, ref, mode)
        print(f"TP=1 {mode}: max |diff| to max_length padding = {worst:.2e} ({where})")
        assert worst <= TOL, (mode, worst, where)
    control = ref[f"{first}/packed_crossing"]["loss"]
    worst = max(abs(a - b) for a, b in zip(control, ref[f"{first}/max_length"]["loss"]))
    print(f"negative control (attention across boundaries): loss |diff| = {worst:.2e}")
    assert worst > 1e-3


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(VARLEN_LAYOUTS))
def test_dynamic_padding_and_packing_match_single_rank(varlen_reference, two_ranks, layout):
    d, ref = varlen_reference
    out = d / f"varlen_{layout}.json"
    got = read_json(out)["results"]
    for mode in VARLEN_MODES:
        worst, where = varlen_diff(ref, got, mode)
        print(f"{layout} {mode}: max |diff| to TP=1 max_length = {worst:.2e} ({where})")
        assert worst <= TOL, f"{layout} {mode} deviates by {worst:.3e} at {where}"
    first = OBJECTIVES.split(",")[0]
    control = got[f"{first}/packed_crossing"]["loss"]
    assert max(abs(a - b) for a, b in zip(control, ref[f"{first}/max_length"]["loss"])) > 1e-3


# -- loss.normalization=sample: each example's mean, averaged over the global batch ---------------
SAMPLE_OBJECTIVES = "original,OnlyTopP-0.3"
SAMPLE_LAYOUTS = {
    "tp2_sp": ["--tp", "2", "--sp"],
    "pp2": ["--pp", "2"],
    "dp2_distributed_optimizer": ["--distributed-optimizer"],
}


@pytest.fixture(scope="module")
def sample_reference(reference):
    d, _ = reference
    out = d / "sample_ref.json"
    return d, read_json(out)["results"]


@pytest.mark.multirank
@pytest.mark.slow
def test_sample_normalization_is_layout_free_on_one_rank(sample_reference, varlen_reference):
    """One rank, two micro-batches per step (gradient accumulation): padded rows, dynamic
    padding and packed rows give the same per-example means; the token-level loss of the same
    batches (negative control) does not."""
    _, ref = sample_reference
    for mode in VARLEN_MODES[1:]:
        worst, where = varlen_diff(ref, ref, mode)
        print(f"sample, TP=1 {mode}: max |diff| to max_length padding = {worst:.2e} ({where})")
        assert worst <= TOL, (mode, worst, where)
    _, token = varlen_reference
    worst = max(
        abs(a - b)
        for a, b in zip(ref["original/max_length"]["loss"], token["original/max_length"]["loss"])
    )
    print(f"negative control (token-level normalization): loss |diff| = {worst:.2e}")
    assert worst > 1e-3


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(SAMPLE_LAYOUTS))
def test_sample_normalization_matches_single_rank(sample_reference, two_ranks, layout):
    """TP+SP, PP and DP with the distributed optimizer, each with padded, dynamically padded
    and packed micro-batches, reproduce the single-rank per-example means (the negative
    control, token-level normalization of the same batches, is the one-rank test's)."""
    d, ref = sample_reference
    out = d / f"sample_{layout}.json"
    got = read_json(out)["results"]
    for mode in VARLEN_MODES:
        worst, where = varlen_diff(ref, got, mode)
        print(f"sample {layout} {mode}: max |diff| to TP=1 max_length = {worst:.2e} ({where})")
        assert worst <= TOL, f"{layout} {mode} deviates by {worst:.3e} at {where}"


# -- activation recomputation, one process ------------------------------------------------------
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full_uniform": {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    },
    "full_block": {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": 2,
    },
}


def _counting_batches(steps: int, rows: int, seq: int, vocab: int):
    """Counting sequences with some noise: the loss moves, p spreads over (0, 1)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = torch.randint(0, vocab, (rows, 1), generator=g)
        tokens = (start + torch.arange(seq + 1)[None]) % vocab
        noisy = torch.rand(rows, seq + 1, generator=g) < 0.3
        tokens = torch.where(noisy, torch.randint(0, vocab, tokens.shape, generator=g), tokens)
        mask = (torch.arange(seq)[None] >= 3).float().expand(rows, -1).contiguous()
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def _train_with(recompute: dict, objective: str, steps: int = 3) -> dict:
    """Losses, grad norms and forward calls (layers, core attention) of a few steps."""
    from mp.tiny_model import TINY_QWEN2
    from probsft_megatron import compat, runtime
    from probsft_megatron.attention import SDPAttention
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import ParallelConfig, transformer_config

    model = dataclasses.replace(TINY_QWEN2, num_layers=2)
    parallel = ParallelConfig(**recompute)
    compat.seed_model_parallel(1234)  # the same initial weights for every variant
    chunks, optimizer = runtime.build_training_model(
        model, transformer_config(model, parallel), lr=1e-2
    )
    calls = {"layer": 0, "core_attention": 0}
    for module in chunks[0].modules():
        kind = (
            "core_attention"
            if isinstance(module, SDPAttention)
            else "layer"
            if type(module).__name__ == "TransformerLayer"
            else None
        )
        if kind:
            module.register_forward_hook(
                lambda *_, kind=kind: calls.__setitem__(kind, calls[kind] + 1)
            )
    step = runtime.loss_head(ObjectiveLoss(LossConfig(objective)), "cpu")
    out = {"loss": [], "grad_norm": []}
    seq, mbs = 24, 2
    pos = torch.arange(seq)[None].expand(mbs, -1).contiguous()
    for tokens, labels, mask in _counting_batches(steps, 2 * mbs, seq, model.vocab_size):
        micro = [
            runtime.Batch(tokens[i : i + mbs], labels[i : i + mbs], mask[i : i + mbs], pos)
            for i in range(0, 2 * mbs, mbs)
        ]
        stats = runtime.train_step(
            chunks, optimizer, step, micro, seq_length=seq, micro_batch_size=mbs
        )
        out["loss"].append(stats.loss)
        out["grad_norm"].append(stats.grad_norm)
    out["calls"] = calls
    return out


@pytest.fixture(scope="module")
def tp1_groups():
    from probsft_megatron import cpu_backend, runtime
    from probsft_megatron.config import ParallelConfig

    was_active = cpu_backend.is_active()
    runtime.init_distributed(ParallelConfig())
    yield
    runtime.shutdown()
    if not was_active:
        cpu_backend.deactivate()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["original", "OnlyTopP-K50"])
def test_recomputation_changes_no_figure_and_really_recomputes(tp1_groups, objective):
    runs = {name: _train_with(recompute, objective) for name, recompute in RECOMPUTE.items()}
    ref = runs["none"]
    assert ref["loss"][-1] != ref["loss"][0] and all(g > 1e-4 for g in ref["grad_norm"])
    for name, run in runs.items():
        worst = max(
            abs(a - b) / max(1.0, abs(b))
            for key in ("loss", "grad_norm")
            for a, b in zip(run[key], ref[key])
        )
        print(
            f"{objective} {name}: max relative difference to no recomputation {worst:.1e}, "
            f"forward calls {run['calls']}"
        )
        assert worst <= 1e-6, (name, run, ref)
    # 3 steps x 2 micro-batches x 2 layers; a percentile objective adds its forward-only pass
    forwards = 3 * 2 * (2 if objective.startswith("OnlyTopP-K") else 1)
    trained = 3 * 2
    assert ref["calls"] == {"layer": 2 * forwards, "core_attention": 2 * forwards}
    # selective: the core attention runs again in each layer's backward
    assert runs["selective"]["calls"] == {
        "layer": 2 * forwards,
        "core_attention": 2 * (forwards + trained),
    }
    # full: every (uniform) or the first two (block) layers run again in the backward
    for name in ("full_uniform", "full_block"):
        assert runs[name]["calls"]["layer"] == 2 * (forwards + trained), (name, runs[name])
