"""Every benchmark still runs: each script in ``benchmarks/`` at a size that takes seconds, and
``scripts/gpu_benchmarks.sh run`` with ``SMOKE=1`` on the CPU.

:data:`BENCHMARKS` is the table: script -> smoke arguments -> result file -> the fields the
docs' and README's tables are built from. A script that runs through
``scripts/gpu_benchmarks.sh`` (``args=None``) is checked on that script's smoke run, so the
shell script and the Python scripts it calls break CI together. A new ``benchmarks/*.py``
without a row here fails :func:`test_every_benchmark_has_a_smoke_entry`. Results go to
pytest's ``tmp_path``, never over the committed ``benchmarks/results``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
GPU_SCRIPT = REPO / "scripts" / "gpu_benchmarks.sh"
HELPERS = {"common.py"}
"""Modules of benchmarks/ that are imported by the scripts, not run."""


@dataclass(frozen=True)
class Bench:
    args: str | None
    """Smoke arguments (shell words; ``{tmp}`` is the test's scratch folder; ``--out`` is
    added); None: run by ``SMOKE=1 scripts/gpu_benchmarks.sh run``."""
    results: dict[str, str] = field(default_factory=dict)
    """Result JSON (under the out folder) -> its required fields, space-separated: ``a.b``
    nests, ``rows[].x`` means every element of ``rows`` has ``x``. Each JSON has its ``.md``
    table beside it."""
    prints: tuple[str, ...] = ()
    """Regular expressions the script's standard output must match (dry runs)."""


BENCHMARKS: dict[str, Bench] = {
    "objective_overhead.py": Bench(
        "--steps 1 --rounds 1 --micro-batches 1 --micro-batch-size 2 --seq 32",
        {
            "objective_overhead_cpu.json": "device micro_batches micro_batch_size seq "
            "steps_per_round rounds threads clock weights_unchanged load_average_1min.before "
            "load_average_1min.after load_average_1min.per_round rows[].variant "
            "rows[].median_step_s rows[].median_cpu_s rows[].ratio rows[].ratio_wall "
            "rows[].ratio_cpu rows[].extra_forward"
        },
    ),
    "fused_loss.py": Bench(
        None,
        {
            "fused_loss_cpu.json": "meta.device meta.dtype meta.vocab meta.hidden "
            "meta.timing_rounds meta.memory_method meta.complete rows[].tokens rows[].label "
            "rows[].time_s rows[].peak_bytes rows[].d_weight_bytes"
        },
    ),
    "throughput.py": Bench(
        None,
        {
            "throughput_cpu_small_seq128.json": "device failed rows[].variant "
            "rows[].median_step_s rows[].tokens_per_s rows[].vs_huggingface "
            "rows[].peak_memory_gib rows[].achieved_tflops rows[].mfu rows[].dtype"
        },
    ),
    "plan_accuracy.py": Bench(
        None,
        {
            "plan_accuracy_cpu_small.json": "device rows[].head rows[].seq "
            "rows[].static_measured rows[].static_estimated rows[].static_exact "
            "rows[].dynamic_measured rows[].dynamic_estimated rows[].dynamic_error "
            "rows[].estimated_parts"
        },
    ),
    "convert_memory.py": Bench(
        "--shape tiny --work {tmp}/work",
        {
            "convert_memory_tiny.json": "model parameters model_bytes baseline_rss machine "
            "directions.hf_to_megatron.peak_rss directions.hf_to_megatron.peak_rss_ratio "
            "directions.hf_to_megatron.conversion_rss_ratio "
            "directions.hf_to_megatron.peak_tree_pss_ratio "
            "directions.megatron_to_hf.peak_rss_ratio directions.megatron_to_hf.seconds"
        },
    ),
    "lora.py": Bench(
        "--shape tiny --steps 1 --warmup 1 --seq 32",
        {
            "lora_cpu_tiny.json": "device shape rank seq rows[].variant "
            "rows[].trainable_parameters rows[].grad_buffer_bytes rows[].optimizer_state_bytes "
            "rows[].peak_rss_bytes rows[].median_step_s lora_over_full.trainable_parameters "
            "lora_over_full.peak_rss_bytes lora_over_full.median_step_s"
        },
    ),
    "data_efficiency.py": Bench(
        "--max-lengths 64 --examples 32 --global-batch 8 --micro-batch 4 --steps 1 "
        "--records 200 --ranks 1 --scratch {tmp}",
        {
            "data_efficiency_layout_cpu.json": "device length_mix rows[].max_length "
            "rows[].layout rows[].positions_per_token rows[].median_step_s",
            "data_efficiency_store_cpu.json": "device rows[].records rows[].ranks rows[].cache "
            "rows[].per_rank",
        },
    ),
    # the continuum runs train SmolLM2 and start vLLM per run (minutes): their dry runs
    "continuum.py": Bench(
        "--dry-run --work {tmp}/work",
        prints=(
            r"\] convert: .*probsft_megatron\.cli convert smollm2",
            r"\] probe-weak: .*cli probe .*data\.max_length=384",
            r"\] train-strong-original-s0: .*-m probsft_megatron\.train .*loss\.objective=original",
            r"\] eval-weak-p-s1: .*cli eval .*--grader jaro_winkler",
            r"27 stages; nothing was run or written",
        ),
    ),
    "continuum_sweep.py": Bench(
        "--size tiny --dry-run --work {tmp}/work",
        prints=(
            r"cli convert smollm2",
            r"cli data generate figlet-mini --split test",
            r"cli train --config demo-smollm2 .*loss\.objective=p ",
            r"cli probe .*self-addition",
        ),
    ),
}


def _env() -> dict[str, str]:
    # one thread: the smoke sizes gain nothing from two, and a loaded CI machine loses less
    return dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def missing_fields(data: dict, fields: str) -> list[str]:
    """The fields of ``fields`` (space-separated; ``a.b``, ``rows[].x``) that ``data`` lacks."""
    missing = []
    for spec in fields.split():
        nodes = [data]
        for part in spec.split("."):
            listed = part.endswith("[]")
            key = part.removesuffix("[]")
            nxt = []
            for node in nodes:
                if not isinstance(node, dict) or key not in node:
                    missing.append(spec)
                    break
                value = node[key]
                if listed:
                    if not isinstance(value, list) or not value:
                        missing.append(spec)
                        break
                    nxt.extend(value)
                else:
                    nxt.append(value)
            else:
                nodes = nxt
                continue
            break
    return missing


def check_results(out: Path, bench: Bench) -> dict[str, dict]:
    loaded = {}
    for name, fields in bench.results.items():
        path = out / name
        assert path.is_file(), f"{name} was not written; {sorted(p.name for p in out.iterdir())}"
        data = json.loads(path.read_text())
        assert not missing_fields(data, fields), f"{name} lacks {missing_fields(data, fields)}"
        md = path.with_suffix(".md")
        assert md.is_file() and "|---" in md.read_text(), f"{md.name}: no markdown table"
        loaded[name] = data
    assert not list(out.glob("*.tmp*")), "a temporary file was left behind"
    return loaded


@pytest.fixture(scope="module")
def gpu_smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``SMOKE=1 scripts/gpu_benchmarks.sh run OUT`` once for the module."""
    out = tmp_path_factory.mktemp("gpu_smoke")
    proc = subprocess.run(
        ["bash", str(GPU_SCRIPT), "run", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=dict(_env(), SMOKE="1", PYTHON=sys.executable),
    )
    return out, proc


def test_every_benchmark_has_a_smoke_entry():
    scripts = {p.name for p in BENCH.glob("*.py")} - HELPERS
    assert scripts == set(BENCHMARKS), (
        f"benchmarks without a smoke entry: {sorted(scripts - set(BENCHMARKS))}; "
        f"entries without a script: {sorted(set(BENCHMARKS) - scripts)} (tests/test_benchmarks.py)"
    )


def test_field_check_reports_what_is_missing():
    """Negative control: the field check fails on what a broken benchmark would write."""
    data = {"device": "x", "rows": [{"ratio": 1.0}, {"variant": "p"}], "meta": {"dtype": "f"}}
    fields = "device meta.dtype meta.vocab rows[].ratio rows[].variant gone[].x"
    missing = ["meta.vocab", "rows[].ratio", "rows[].variant", "gone[].x"]
    assert missing_fields(data, fields) == missing
    assert missing_fields({"rows": []}, "rows[].x") == ["rows[].x"]
    # and the comparison of a regenerated report with the committed one
    assert _close({"a": [1.0, {"b": 2}]}, {"a": [1.0, {"b": 2}]}) == []
    assert _close({"a": [1.0, {"b": 2}]}, {"a": [1.001, {"b": 3}]}) == [
        ".a[0]: 1.0 != 1.001",
        ".a[1].b: 2 != 3",
    ]
    assert _close({"a": 1}, {"c": 1}) and _close([1], [1, 2])


@pytest.mark.parametrize("script", sorted(BENCHMARKS))
def test_benchmark_smoke(script, tmp_path, request):
    bench = BENCHMARKS[script]
    if bench.args is None:
        out, proc = request.getfixturevalue("gpu_smoke")
        tail = (proc.stdout + proc.stderr)[-4000:]
        assert proc.returncode == 0, f"gpu_benchmarks.sh failed:\n{tail}"
    else:
        out = tmp_path / "results"
        args = [a.replace("{tmp}", str(tmp_path)) for a in shlex.split(bench.args)]
        proc = subprocess.run(
            [sys.executable, str(BENCH / script), *args, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env=_env(),
        )
        assert proc.returncode == 0, f"{script} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
        for pattern in bench.prints:
            assert re.search(pattern, proc.stdout), f"{script} printed no match of {pattern!r}"
        if not bench.results:
            assert not out.exists(), f"{script}'s dry run wrote {out}"
            assert not (tmp_path / "work").exists(), f"{script}'s dry run wrote its work folder"
    data = check_results(out, bench)
    if script == "objective_overhead.py":
        result = data["objective_overhead_cpu.json"]
        assert result["weights_unchanged"] is True and result["clock"] == "cpu"
        variants = [r["variant"] for r in result["rows"]]
        assert variants[0] == "megatron CE (baseline)" and result["rows"][0]["ratio"] == 1.0
        assert {"original", "p", "OnlyTopP-K20"} <= set(variants)
    if script == "throughput.py":
        result = data["throughput_cpu_small_seq128.json"]
        assert [r["variant"] for r in result["rows"]] == ["sdpa", "huggingface"]
        assert result["failed"] == []
    if script == "fused_loss.py":
        rows = data["fused_loss_cpu.json"]["rows"]
        assert [r["label"] for r in rows] == ["unfused", "fused@256"]
        assert all(r["time_s"] > 0 and r["peak_bytes"] > 0 for r in rows)


def test_gpu_script_order_log_and_budget(gpu_smoke):
    """Stages in order of value (fused head, MFU, planner), each logged as done, the stated
    H100 estimate at the top, and a total within the 10 minutes of one device command."""
    out, proc = gpu_smoke
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = (out / "gpu_benchmarks.log").read_text()
    done = re.findall(r"\[gpu_benchmarks\] (.+): done in \d+ s", log)
    assert done == [
        "fused loss head",
        "throughput and MFU",
        "planner error",
        "packed sequences through TE",
    ], log[-3000:]
    assert "FAILED" not in log
    head = GPU_SCRIPT.read_text().split("set -euo pipefail")[0]
    assert re.search(r"Time on one H100 \(estimated from FLOPs and bytes", head)
    budget = int(re.search(r"BUDGET_S:-(\d+)", GPU_SCRIPT.read_text()).group(1))
    caps = [int(c) for c in re.findall(r'^\s*stage "[^"]+" (\d+) ', GPU_SCRIPT.read_text(), re.M)]
    assert budget <= 570 and len(caps) == 4 and sum(caps) <= budget


def test_gpu_script_stops_at_its_budget(tmp_path):
    """Negative control for the time limit: with the budget spent no stage starts, the run
    says so and exits 1 (a device run ends inside its limit instead of being killed)."""
    proc = subprocess.run(
        ["bash", str(GPU_SCRIPT), "run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(_env(), SMOKE="1", PYTHON=sys.executable, BUDGET_S="5"),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = (tmp_path / "gpu_benchmarks.log").read_text()
    assert log.count("skipped, the time budget (5 s) is spent") == 4, log
    assert not list(tmp_path.glob("*.json"))


def _close(a, b, path: str = "") -> list[str]:
    """Where two JSON values differ (floats to 1e-9 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if b == pytest.approx(a, rel=1e-9, abs=1e-12) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_continuum_sweep_report_rebuilds_the_committed_tables(tmp_path):
    """The sweep's report stage on the committed runs: the work folder is rebuilt from
    ``benchmarks/results/continuum_sweep_small_cpu.json`` (each run's result, the probes, the
    self-generation count, the step times), ``--report-only`` runs, and its summary, runs
    and markdown tables must equal the committed ones (the numbers docs/continuum.md and the
    README quote), with both figures drawn."""
    committed = json.loads((BENCH / "results" / "continuum_sweep_small_cpu.json").read_text())
    work, out = tmp_path / "work", tmp_path / "out"

    def put(path: Path, data) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    for r in committed["rows"]:
        name = f"{r['task']}{'-corrupt' if r['variant'] == 'corrupt' else ''}"
        put(work / "runs" / f"{name}-{r['objective']}-s{r['seed']}" / "result.json", r)
    for key, pr in committed["probes"].items():
        report = {
            "tokens": pr["tokens"],
            "mean_p": pr["mean_p"],
            "median_p": pr["median_p"],
            "percentiles": {"20": pr["p20"]},
            "frac_p_gt_0.9": pr["frac_p_gt_0.9"],
            "per_example_summary": pr["per_example"],
            "placement": {"regime": pr["placement"]},
            "recommendation": {"objective": pr["recommended"]},
        }
        put(work / "probe" / key / "report.json", report)
    gen = committed["self_generation"]
    put(
        work / "data" / "self-addition" / "base-answers" / "custom" / "summary.json",
        {"metrics": {"problems": gen["questions"], "avg@n": gen["base_exact"]}},
    )
    put(work / "stage_times.json", committed["step_seconds"])
    argv = ["--size", "small", "--report-only", "--work", str(work), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "continuum_sweep.py"), *argv, "--note", committed["note"]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=_env(),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    stem = "continuum_sweep_small_cpu"
    fresh = json.loads((out / f"{stem}.json").read_text())
    for key in ("summary", "probes", "self_generation", "rows", "settings", "wall_min"):
        assert not _close(committed[key], fresh[key], key), _close(committed[key], fresh[key])[:5]

    def tables(md: str) -> list[str]:
        return [line for line in md.splitlines() if line.startswith("|")]

    committed_md = (BENCH / "results" / f"{stem}.md").read_text()
    assert tables((out / f"{stem}.md").read_text()) == tables(committed_md)
    assert len(tables(committed_md)) > 60
    for png in ("margins", "curves"):
        assert (out / f"{stem}_{png}.png").stat().st_size > 10_000
