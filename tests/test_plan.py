"""The memory planner (`probsft plan`, :mod:`probsft_megatron.plan`).

* Static parts byte-exact against really built models (torchrun, gloo, CPU): weights, megatron
  DDP's gradient buffer and the optimizer state summed from the tensors, for tiny models and
  the SmolLM2-135M shape at TP=1, TP=2, PP=2, DP=2 and TP/PP=2 x DP=2, with and without the
  distributed optimizer, float32 and bfloat16 parameters; a negative control shows that the
  padding rules matter (the test can fail).
* Activations: the bytes autograd keeps for backward, counted on one real forward at two
  sequence lengths (TP=1, TP=2, TP=2+SP; SDPA and megatron's local attention; selective and
  full recompute), equal to the analytic count with CPU kernels. (megatron's recompute saves
  the CUDA RNG state; without CUDA the worker stands in an empty one, see
  tests/mp/plan_worker.py. The whole-step peak is compared in benchmarks/plan_accuracy.py.)
* The recipes: every recipe of >= 1B parameters ships the cheapest layout that fits one node
  of 8 x 80 GB, its "8 x 141 GB" comment is the planner's recommendation there, and the table
  in docs/training.md is what `probsft plan --recipes-table` prints.
* The check the launchers call: refusal in one line with the recommended layout and the
  override flag, arithmetic only (no torch, no megatron import); CLI table, JSON, bad input
  (one line, exit 2), the recompute and optimizer choices read from the config's fields.
* ``--help`` of every subcommand exits 0 (argparse %-formats help strings only then).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from conftest import MP_DIR, REPO, read_json, run_torchrun
from probsft_megatron import plan as P
from probsft_megatron.cli import SUBCOMMANDS, main
from probsft_megatron.config import load_config
from probsft_megatron.errors import ConfigError

sys.path.insert(0, str(MP_DIR))
from plan_worker import MODELS

STATIC_KEYS = ("weights", "grad_buffer", "main_params", "adam_moments", "adam_steps")


# -- megatron's buffer layout, by hand ---------------------------------------------------------
def test_grad_buffer_padding_rules_by_hand():
    params = [P.Param("a", 100), P.Param("b", 10)]
    plain = P.grad_buffer(params, dp=2, distributed_optimizer=False)
    assert (plain.numel, plain.numel_unpadded, plain.ranges) == (
        110,
        110,
        [(10, 110, 0), (0, 10, 0)],
    )
    # reverse order; "a" starts at 64 (128-byte alignment); the bucket ends at lcm(2, 128)
    dist = P.grad_buffer(params, dp=2, distributed_optimizer=True)
    assert dist.ranges == [(64, 164, 0), (0, 10, 0)] and dist.buckets == [(0, 256)]
    assert dist.shard_numels(2, 0) == [64, 10] and dist.shard_numels(2, 1) == [36, 0]
    # dp=3: lcm(3, 128) = 384
    assert P.grad_buffer(params, dp=3, distributed_optimizer=True).numel == 384
    # a shared embedding closes the bucket before it and gets its own
    shared = [P.Param("emb", 50, shared_embedding=True), P.Param("w", 30)]
    buf = P.grad_buffer(shared, dp=2, distributed_optimizer=True)
    assert buf.buckets == [(0, 128), (128, 256)] and buf.ranges == [(128, 178, 1), (0, 30, 0)]
    # without the distributed optimizer the attribute changes nothing
    assert P.grad_buffer(shared, dp=2).numel == 80


def test_stage_parameters_add_up_to_the_model():
    for name in ("tiny-qwen2", "tiny-odd-tied", "smollm2-135m"):
        model = MODELS[name]
        total = model.num_parameters()
        assert sum(p.numel for p in P.stage_parameters(model)) == total
        stages = [P.stage_parameters(model, pp=2, pp_rank=r) for r in range(2)]
        extra = model.vocab_size * model.hidden_size if model.tie_word_embeddings else 0
        assert sum(p.numel for s in stages for p in s) == total + extra
        assert stages[1][-1].shared_embedding == bool(model.tie_word_embeddings)


def test_issue_arithmetic_for_qwen2_5_14b():
    """The issue's numbers: bf16 weights ~29.5 GB, fp32 gradients ~59 GB, 1/8 of fp32 master
    weights and Adam moments ~22 GB at TP=1 PP=1 DP=8 with the distributed optimizer."""
    cfg = load_config(
        "math-qwen2.5-14b",
        ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"],
    )
    st = P.static_memory(cfg.model, P.layout_of(cfg, 8), P.workload_of(cfg))
    assert st.weights / 1e9 == pytest.approx(29.5, abs=0.1)
    assert st.grad_buffer / 1e9 == pytest.approx(59.1, abs=0.1)
    assert st.optimizer / 1e9 == pytest.approx(22.2, abs=0.1)
    plain = P.static_memory(
        cfg.model,
        dataclasses.replace(P.layout_of(cfg, 8), distributed_optimizer=False),
        P.workload_of(cfg),
    )
    assert plain.optimizer / st.optimizer == pytest.approx(8, rel=1e-3)


# -- against built models (torchrun, gloo) ---------------------------------------------------
def _static_specs(models, layouts, opts, dtypes):
    return ",".join(
        f"{m}:{lay}:{o}:{d}" for m in models for lay in layouts for o in opts for d in dtypes
    )


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One torchrun per world size (1, 2, 4), several layouts each."""
    d = tmp_path_factory.mktemp("plan")
    runs = {
        1: {
            "static": _static_specs(
                ["tiny-qwen2", "tiny-odd-tied"], ["tp1"], ["plain"], ["fp32", "bf16"]
            )
            + ",smollm2-135m:tp1:plain:fp32",
            "saved": "act-qwen2:1:nosp:sdpa:none,act-qwen2:1:nosp:local:none,"
            "act-qwen2:1:nosp:sdpa:selective,act-qwen2:1:nosp:sdpa:uniform1,"
            "act-qwen2:1:nosp:sdpa:uniform2,act-qwen2:1:nosp:sdpa:block1",
        },
        2: {
            "static": ",".join(
                [
                    _static_specs(
                        ["tiny-qwen2", "tiny-odd-tied"], ["tp2", "pp2"], ["plain"], ["fp32", "bf16"]
                    ),
                    _static_specs(
                        ["tiny-qwen2", "tiny-odd-tied"],
                        ["dp"],
                        ["plain", "distopt"],
                        ["fp32", "bf16"],
                    ),
                    "smollm2-135m:pp2:plain:fp32,smollm2-135m:dp:distopt:fp32",
                ]
            ),
            "saved": "act-qwen2:2:nosp:sdpa:none,act-qwen2:2:sp:sdpa:none,"
            "act-qwen2:2:sp:local:none",
        },
        4: {
            "static": "tiny-odd-tied:pp2dp:distopt:bf16,tiny-qwen2:pp2dp:distopt:fp32,"
            "tiny-qwen2:tp2dp:distopt:fp32,tiny-odd-tied:tp2dp:distopt:bf16",
            "saved": "",
        },
    }
    out = {"static": [], "saved": [], "unsupported": []}
    for nproc, spec in runs.items():
        path = d / f"w{nproc}.json"
        args = ["--out", str(path), "--static", spec["static"]]
        if spec["saved"]:
            args += ["--saved", spec["saved"]]
        run_torchrun("plan_worker.py", nproc, args, timeout=900)
        got = read_json(path)
        for key in out:
            out[key] += got.get(key, [])
    return out


def _predicted_static(rec: dict, **changes) -> dict:
    layout = P.Layout(
        tp=rec["tp"], pp=rec["pp"], dp=rec["dp"], distributed_optimizer=rec["distributed_optimizer"]
    )
    st = P.static_memory(
        MODELS[rec["model"]],
        layout,
        P.Workload(params_dtype=rec["dtype"]),
        rec["pp_rank"],
        rec["dp_rank"],
    )
    return {k: getattr(st, k) for k in STATIC_KEYS}


@pytest.mark.multirank
@pytest.mark.slow
def test_static_parts_are_byte_exact(measured):
    recs = measured["static"]
    seen = {
        (r["model"], r["tp"], r["pp"], r["dp"], r["distributed_optimizer"], r["dtype"])
        for r in recs
    }
    # the layouts the issue names, for the tiny models and the SmolLM2-135M shape
    for model in ("tiny-qwen2", "tiny-odd-tied"):
        for dtype in ("fp32", "bf16"):
            for layout in [
                (1, 1, 1, False),
                (2, 1, 1, False),
                (1, 2, 1, False),
                (1, 1, 2, False),
                (1, 1, 2, True),
            ]:
                assert (model, *layout, dtype) in seen, (model, layout, dtype)
    for layout in [(1, 1, 1, False), (1, 2, 1, False), (1, 1, 2, True)]:
        assert ("smollm2-135m", *layout, "fp32") in seen
    assert {(r["tp"], r["pp"], r["dp"]) for r in recs if r["distributed_optimizer"]} >= {
        (1, 1, 2),
        (2, 1, 2),
        (1, 2, 2),
    }
    for rec in recs:
        got = {k: rec[k] for k in STATIC_KEYS}
        assert got == _predicted_static(rec), rec
        assert rec["adam_moments"] > 0 and rec["weights"] > 0


@pytest.mark.multirank
@pytest.mark.slow
def test_padding_rules_matter(measured):
    """Negative control: a layout without megatron's padding (no 64-element alignment, no
    lcm(DP, 128) bucket end, no bucket of its own for a shared embedding) misses the measured
    buffers, so the exact equality above can fail."""
    dist = [r for r in measured["static"] if r["distributed_optimizer"]]
    unaligned, merged, shared_cases = 0, 0, 0
    for rec in dist:
        params = P.stage_parameters(MODELS[rec["model"]], rec["tp"], rec["pp"], rec["pp_rank"])
        unaligned += rec["grad_buffer"] != sum(p.numel for p in params) * 4  # float32 grads
        if any(p.shared_embedding for p in params):
            shared_cases += 1
            flat = [dataclasses.replace(p, shared_embedding=False) for p in params]
            merged += rec["grad_buffer"] != P.grad_buffer(flat, rec["dp"], True).numel * 4
    assert unaligned >= len(dist) * 3 // 4, (unaligned, len(dist))
    assert shared_cases >= 2 and merged >= 1, (shared_cases, merged)


def _predicted_saved(rec: dict) -> int:
    rc = rec["recompute"]
    model = MODELS[rec["model"]]
    layout = P.Layout(
        tp=rec["tp"],
        sequence_parallel=rec["sp"],
        recompute=rc.get("recompute_granularity", "none"),
        recompute_method=rc.get("recompute_method"),
        recompute_num_layers=rc.get("recompute_num_layers"),
    )
    work = P.Workload(
        micro_batch_size=rec["micro_batch"],
        seq_length=rec["seq"],
        params_dtype="fp32",
        attention=rec["attention"],
        kernels="cpu",
    )
    layer = P.layer_activations(model, layout, work)
    rope = rec["seq"] * model.hidden_size // model.num_attention_heads * 4
    kept, _ = P.recompute_terms(layer, layout, model.num_layers, rope)
    tokens = rec["micro_batch"] * rec["seq"]
    return kept + tokens * 8 + P.loss_head(model, layout, work).saved


@pytest.mark.multirank
@pytest.mark.slow
def test_activations_kept_for_backward_are_exact(measured):
    recs = measured["saved"]
    assert not measured["unsupported"], measured["unsupported"]
    kinds = {
        (r["tp"], r["sp"], r["attention"], json.dumps(r["recompute"], sort_keys=True)) for r in recs
    }
    assert len(kinds) == 9, kinds
    for kind in kinds:  # two sequence lengths each; bytes grow with the sequence
        rows = sorted(
            (
                r
                for r in recs
                if (r["tp"], r["sp"], r["attention"], json.dumps(r["recompute"], sort_keys=True))
                == kind
            ),
            key=lambda r: r["seq"],
        )
        assert {r["seq"] for r in rows} == {64, 128} and rows[0]["saved"] < rows[-1]["saved"]
    for rec in recs:
        assert rec["saved"] == _predicted_saved(rec), rec
    # recompute and SP save what they should
    by = {
        (
            r["tp"],
            r["sp"],
            r["attention"],
            json.dumps(r["recompute"], sort_keys=True),
            r["seq"],
            r["rank"],
        ): r["saved"]
        for r in recs
    }
    none, full = (
        json.dumps({}),
        json.dumps(
            {
                "recompute_granularity": "full",
                "recompute_method": "uniform",
                "recompute_num_layers": 1,
            },
            sort_keys=True,
        ),
    )
    assert by[(1, False, "sdpa", full, 128, 0)] < by[(1, False, "sdpa", none, 128, 0)] / 4
    assert by[(2, True, "sdpa", none, 128, 0)] < by[(2, False, "sdpa", none, 128, 0)]


# -- the recipes and the docs table ---------------------------------------------------------
def _node_recipes() -> list[str]:
    return P.node_recipes()


def test_node_recipes_are_the_1_5b_to_14b_ones():
    names = _node_recipes()
    assert "math-qwen2.5-14b" in names and "math-qwen2.5-1.5b" in names
    assert "tiny-figfont-cpu" not in names and "demo-smollm2" not in names
    for name in names:
        assert 1.0e9 <= load_config(name).model.num_parameters() <= 16e9


@pytest.mark.parametrize("recipe", _node_recipes())
def test_recipe_ships_the_cheapest_layout_that_fits_8x80(recipe):
    cfg = load_config(recipe)
    plan = P.plan(cfg, gpus=8, gpu_memory_gb=80)
    assert plan.requested.fits, plan.requested.reason
    assert plan.recommended is not None
    assert plan.requested.layout == plan.recommended.layout, (
        plan.requested.layout.label(),
        plan.recommended.layout.label(),
    )
    cfg.parallel.validate(8, cfg.model)  # the layout is valid for a node of 8 processes


@pytest.mark.parametrize("recipe", _node_recipes())
def test_recipe_comment_on_8x141_is_the_planners_choice(recipe):
    from probsft_megatron import resources

    text = resources.find("recipes", recipe).read_text()
    line = re.search(r"^# 8 x 141 GB: (.*)$", text, re.M)
    assert line, f"{recipe}: no '# 8 x 141 GB:' line"
    changes = [] if line.group(1).strip() == "no change" else line.group(1).split()
    cfg = load_config(recipe, changes)
    rec = P.plan(load_config(recipe), gpus=8, gpu_memory_gb=141).recommended
    assert rec is not None and P.layout_of(cfg, 8) == rec.layout, (recipe, rec.layout.label())


def test_docs_table_is_what_the_planner_prints():
    doc = (REPO / "docs" / "training.md").read_text()
    assert P.recipes_table() in doc, "docs/training.md: rerun `probsft plan --recipes-table`"


# -- the check before submission, and the CLI --------------------------------------------------
def test_check_fits_refuses_in_one_line_with_the_fix():
    cfg = load_config(
        "math-qwen2.5-14b",
        ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"],
    )
    verdict = P.check_fits(cfg, 8, 80)
    assert not verdict.fits and "\n" not in verdict.message
    assert verdict.message.startswith("will not fit: TP=1 PP=1 DP=8 dist-opt needs ")
    assert "parallel.tensor_model_parallel_size=4" in verdict.message
    assert P.OVERRIDE_FLAG in verdict.message
    fixed = load_config("math-qwen2.5-14b", verdict.recommended.overrides())
    assert P.check_fits(fixed, 8, 80).fits
    # the cheaper layouts were rejected for their memory, not skipped
    reasons = {c.layout.label(): c.reason for c in verdict.plan.rejected}
    assert reasons["TP=1 PP=1 DP=8 dist-opt"].startswith("needs ")
    assert reasons["TP=2 PP=1 DP=4 SP dist-opt"].startswith("needs ")


def test_recompute_comes_last_and_nothing_fits_is_said():
    cfg = load_config("math-qwen2.5-7b")
    small = P.plan(cfg, gpus=8, gpu_memory_gb=40)
    rec = small.recommended
    assert rec is not None and rec.layout.recompute != "none"
    kinds = [c.layout.recompute for c in small.rejected]
    plain = [lay for lay in P.candidate_layouts(cfg.model, 8, 8) if lay.recompute == "none"]
    assert kinds[: len(plain)] == ["none"] * len(plain) and "none" not in kinds[len(plain) :]
    assert [c.layout for c in small.rejected[: len(plain)]] == plain  # every one was tried
    assert [(lay.pp, lay.tp) for lay in plain] == sorted((lay.pp, lay.tp) for lay in plain)
    verdict = P.check_fits(load_config("math-qwen2.5-14b"), 8, 40)
    assert not verdict.fits and verdict.recommended is None
    assert "no layout fits" in verdict.message and "\n" not in verdict.message


def test_impossible_layouts_are_named():
    model = MODELS["smollm2-135m"]  # 9 heads, 3 query groups
    cand = P.evaluate(model, P.Layout(tp=2), P.Workload(), 80)
    assert not cand.fits and cand.reason == "TP=2 does not divide model.num_attention_heads=9"
    with pytest.raises(ConfigError, match="recompute_method"):
        P.Layout(recompute="full")
    with pytest.raises(ConfigError, match="does not divide the 15 layers"):
        P.estimate(
            model,
            P.Layout(pp=2, recompute="full", recompute_method="uniform", recompute_num_layers=2),
            P.Workload(),
        )


def test_the_check_counts_on_the_meta_device_and_leaves_no_process_group():
    """check_fits is what train/launch call before submitting: it builds the 7B model's stages
    on the meta device (no weight memory: 15 GB of bf16 weights would show in the peak RSS)
    and tears down the one-process world it built them in. Peak RSS: 0.42 GB in a developer
    tree, 2.78 GB once in a fresh-clone CI run (not reproduced); the bound is 4 GB."""
    code = (
        "import resource, sys\n"
        "import torch.distributed as dist\n"
        "from probsft_megatron import plan\n"
        "from probsft_megatron.config import load_config\n"
        "cfg = load_config('math-qwen2.5-7b', ['parallel.tensor_model_parallel_size=1',\n"
        "                                      'parallel.sequence_parallel=false'])\n"
        "v = plan.check_fits(cfg, 8, 80)\n"
        "assert not v.fits and 'tensor_model_parallel_size=4' in v.message, v.message\n"
        "assert not dist.is_initialized()\n"
        "rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
        "assert rss_gb < 4, rss_gb\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_stage_parameters_are_the_built_models(monkeypatch):
    """The count is the model the project builds: megatron's names and order, and a change to
    the model builder (here: norms with a bias) changes the plan with no second definition to
    edit (the negative control: the planner cannot be reading a list of its own)."""
    import torch

    from probsft_megatron import model as M
    from probsft_megatron.plan import static as S

    model = MODELS["tiny-qwen2"]
    names = [p.name for p in P.stage_parameters(model, tp=2, pp=2, pp_rank=1)]
    assert names[0] == "decoder.layers.0.input_layernorm.weight"
    assert names[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]
    before = P.stage_parameters(model)

    class BiasedNorm(torch.nn.LayerNorm):
        def __init__(self, config, hidden_size, eps=1e-5, **_):
            super().__init__(hidden_size, eps=eps)

    S._meta_stage.cache_clear()
    monkeypatch.setattr(M, "SequenceParallelRMSNorm", BiasedNorm)
    try:
        after = P.stage_parameters(model)
    finally:
        S._meta_stage.cache_clear()
    added = {p.name for p in after} - {p.name for p in before}
    assert "decoder.layers.0.input_layernorm.bias" in added
    assert len(added) == 2 * model.num_layers + 1
    extra = sum(p.numel for p in after) - sum(p.numel for p in before)
    assert extra == (2 * model.num_layers + 1) * model.hidden_size


def test_cli_table_json_and_errors(capsys):
    assert main(["plan", "--config", "math-qwen2.5-7b"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^requested    TP=4 PP=1 DP=2 SP dist-opt: fits \(\d+\.\d GiB\)$", out, re.M)
    assert "optimizer state:" in out and "with SP" in out and "fused chunk 512" in out
    code = main(
        [
            "plan",
            "--config",
            "math-qwen2.5-7b",
            "--json",
            "parallel.tensor_model_parallel_size=1",
            "parallel.sequence_parallel=false",
        ]
    )
    rep = json.loads(capsys.readouterr().out)
    assert code == 1 and not rep["requested"]["fits"]
    assert rep["recommended"]["label"] == "TP=4 PP=1 DP=2 SP dist-opt"
    parts = rep["requested"]["per_gpu_gib"]
    assert parts["total"] > 80 and parts["gradient_buffer"] == pytest.approx(
        2 * parts["weights"], rel=1e-3
    )
    alt = rep["alternatives"]
    assert alt["optimizer_state_gib"]["not_distributed"] > alt["optimizer_state_gib"]["distributed"]
    assert (
        alt["activations_gib"]["no_sp"]["full_uniform_1"] < alt["activations_gib"]["no_sp"]["none"]
    )
    assert alt["loss_head_gib"]["fused_chunk_512"] < alt["loss_head_gib"]["unfused"]
    assert [r["label"] for r in rep["rejected"]][:2] == [
        "TP=1 PP=1 DP=8 dist-opt",
        "TP=2 PP=1 DP=4 SP dist-opt",
    ]
    for argv, fragment in [
        (["plan", "--config", "math-qwen2.5-7b", "--gpus", "0"], "--gpus must be >= 1"),
        (["plan", "--config", "math-qwen2.5-7b", "--gpu-memory", "-1"], "--gpu-memory"),
        (["plan", "--config", "math-qwen2.5-7b", "--gpus", "6"], "does not divide the 6 GPUs"),
        (["plan"], "needs --config"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and fragment in err, err


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--config", "no-such-recipe"], "config 'no-such-recipe' not found"),
        (["--config", "math-qwen2.5-7b", "no_such.key=1"], "unknown config key 'no_such'"),
        (["--config", "math-qwen2.5-7b", "--gpus", "0"], "--gpus must be >= 1"),
        (["--config", "math-qwen2.5-7b", "--gpus", "-8"], "--gpus must be >= 1"),
        (["--config", "math-qwen2.5-7b", "--gpu-memory", "-1"], "--gpu-memory must be a positive"),
        (["--config", "math-qwen2.5-7b", "--gpu-memory", "nan"], "--gpu-memory must be a positive"),
        (["--config", "math-qwen2.5-7b", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
        (["--config", "math-qwen2.5-7b", "--margin-gb", "-1"], "--margin-gb must be a number >= 0"),
        (
            ["--config", "math-qwen2.5-7b", "--margin-gb", "inf"],
            "--margin-gb must be a number >= 0",
        ),
        (["--config", "math-qwen2.5-7b", "--gpus", "6"], "TP*PP = 4*1 does not divide the 6 GPUs"),
        (
            ["--config", "math-qwen2.5-7b", "parallel.recompute_granularity=partial"],
            "parallel.recompute_granularity='partial' is invalid",
        ),
    ],
)
def test_bad_plan_input_is_one_line_with_exit_2(argv, fragment, capsys):
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
    assert captured.out == ""


def test_recompute_and_optimizer_choices_come_from_the_config():
    cfg = load_config(
        "math-qwen2.5-7b",
        [
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=block",
            "parallel.recompute_num_layers=2",
            "optim.use_distributed_optimizer=false",
            "optim.grad_reduce_in_fp32=false",
        ],
    )
    layout = P.layout_of(cfg, 8)
    assert (layout.recompute, layout.recompute_method, layout.recompute_num_layers) == (
        "full",
        "block",
        2,
    )
    assert not layout.distributed_optimizer
    assert "parallel.recompute_method=block" in layout.overrides()
    work = P.workload_of(cfg)
    assert not work.grad_reduce_in_fp32 and work.grad_bytes == work.param_bytes == 2
    # selective recompute carries no method; the config's method default is not used
    selective = P.layout_of(
        load_config("math-qwen2.5-7b", ["parallel.recompute_granularity=selective"]), 8
    )
    assert (selective.recompute, selective.recompute_method) == ("selective", None)


def test_an_unconverted_checkpoint_plans_with_the_recipes_model(tmp_path, capsys, caplog):
    """A recipe's init.checkpoint that does not exist yet (converted by the launch) is
    planned with the recipe's model and says so; a converted one gives its own model."""
    missing = tmp_path / "models" / "not-yet"
    argv = ["plan", "--config", "math-qwen2.5-7b", "--json", f"init.checkpoint={missing}"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"]["parameters"] == load_config("math-qwen2.5-7b").model.num_parameters()
    assert any("planning with the recipe's model" in r.message for r in caplog.records)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_of_every_subcommand_exits_0(command, capsys):
    """argparse %-formats help strings when it prints them: a help text with a bare ``%``
    (``5%``) raises TypeError at ``--help`` only, so every subcommand's help is printed."""
    from probsft_megatron import extras

    if extras.missing_module(command) is not None:  # refused in one line, before any help
        assert main([command, "--help"]) == 2
        assert "extra" in capsys.readouterr().err
        return
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: probsft {command}")
