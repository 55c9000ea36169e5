"""Config loading: recipes, presets, dotted overrides, and bad input failing before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from probsft_megatron.config import (
    apply_override,
    build_config,
    list_presets,
    list_recipes,
    load_config,
)
from probsft_megatron.errors import ConfigError

PRESETS = {
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
    "qwen2.5-14b",
    "qwen2.5-math-1.5b",
    "qwen2.5-math-7b",
    "qwen2.5-coder-7b",
    "llama-3.2-3b",
    "llama-3.1-8b",
    "deepseek-math-7b-base",
    "smollm2-135m",
    "tiny-qwen2",
    "tiny-llama",
}


def test_every_seed_backbone_has_a_preset():
    assert PRESETS <= set(list_presets())


def _load_with_files(recipe: str):
    """File-based recipes need the user's data files: validation says so; name a placeholder."""
    cfg = load_config(recipe)
    if cfg.data.source != "file":
        return cfg
    with pytest.raises(ConfigError, match="data.train_files"):
        cfg.validate(world_size=8)
    return load_config(recipe, ["data.train_files=[train.jsonl]"])


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_loads_and_validates(recipe):
    cfg = _load_with_files(recipe)
    assert cfg.train.global_batch_size >= cfg.train.micro_batch_size
    p = cfg.parallel
    smallest = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    cfg.validate(world_size=smallest)  # the recipe's own layout with DP = 1
    if cfg.train.global_batch_size == 256:  # the paper's runs: also a full 8-GPU node
        cfg.validate(world_size=8)


def test_seed_hyperparameters_in_recipes():
    math = _load_with_files("math-qwen2.5-math-1.5b")
    assert (
        math.optim.lr,
        math.train.global_batch_size,
        math.data.max_length,
        math.train.epochs,
    ) == (5e-5, 256, 3072, 1)
    fig = load_config("figfont-qwen2.5-7b")
    assert (fig.optim.lr, fig.data.max_length, fig.optim.weight_decay) == (5e-5, 800, 1e-5)
    assert _load_with_files("math-qwen2.5-14b").optim.lr == 2e-5


def test_overrides_are_typed():
    cfg = load_config(
        "tiny-figfont-cpu",
        [
            "optim.lr=4e-5",
            "train.max_steps=3",
            "loss.objective=GeneralFamily-8",
            "parallel.sequence_parallel=true",
            "model.num_layers=4",
        ],
    )
    assert cfg.optim.lr == 4e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 3
    assert cfg.loss.objective == "GeneralFamily-8"
    assert cfg.parallel.sequence_parallel is True
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 128  # preset kept


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lrr=1", "train.lrr"),
        ("optimizer.lr=1", "optimizer"),
        ("optim.lr=fast", "optim.lr"),
        ("train.micro_batch_size=2.5", "train.micro_batch_size"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
        ("loss.normalization=mean", "loss.normalization"),
        ("model=gpt5", "gpt5"),
        ("trainlr", "section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("tiny-figfont-cpu", [override])


@pytest.mark.parametrize(
    "overrides,world,needle",
    [
        (["parallel.tensor_model_parallel_size=2"], 3, "does not divide the world size"),
        (
            ["parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"],
            2,
            "does not divide",
        ),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "global_batch_size"),
        (["train.global_batch_size=4", "train.micro_batch_size=2"], 4, "global_batch_size"),
        (["model=smollm2-135m", "parallel.tensor_model_parallel_size=2"], 2, "num_attention_heads"),
        (["parallel.sequence_parallel=true"], 1, "sequence_parallel"),
        (["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"], 2, "num_layers"),
        (["data.max_length=4096"], 1, "max_position_embeddings"),
    ],
)
def test_impossible_layouts_fail_validation(overrides, world, needle):
    cfg = load_config("tiny-figfont-cpu", overrides)
    with pytest.raises(ConfigError, match=needle):
        cfg.validate(world)


def test_unknown_key_in_yaml_and_missing_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny-figfont-cpu\ntrain:\n  epochz: 2\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config("no-such-recipe")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))


def test_apply_override_into_preset_name():
    raw = apply_override(
        {"model": "tiny-qwen2", "data": {"source": "figfont"}}, "model.num_layers=6"
    )
    cfg = build_config(raw)
    assert cfg.model.arch == "qwen2" and cfg.model.num_layers == 6


def test_cli_rejects_bad_layout_before_spawning(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "probsft_megatron.cli",
            "train",
            "--config",
            "tiny-figfont-cpu",
            "--nproc",
            "3",
            "parallel.tensor_model_parallel_size=2",
            f"train.output_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: TP*PP = 2*1 = 2 does not divide the world size 3")
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_attention_resolves_to_sdpa_without_te():
    from probsft_megatron.model import resolve_attention

    assert resolve_attention("auto") == "sdpa"  # no CUDA / TE on this machine
    assert resolve_attention("local") == "local"
    with pytest.raises(ConfigError, match="train.attention"):
        resolve_attention("flash")
    cfg = load_config("tiny-figfont-cpu", ["train.attention=te"])
    with pytest.raises(ConfigError, match="Transformer Engine is not installed"):
        cfg.validate(1)
    with pytest.raises(ConfigError, match="train.attention"):
        load_config("tiny-figfont-cpu", ["train.attention=fast"]).validate(1)


def test_logging_is_quiet_by_default_and_verbose_on_request(monkeypatch):
    """megatron's own warnings are filtered unless -v or PROBSFT_LOG_LEVEL=DEBUG asks for
    them; the level reaches child processes through the environment."""
    import logging
    import warnings

    from probsft_megatron import console

    def shown(module: str) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            if console.log_level() > logging.DEBUG:
                console.quiet_warnings()
            warnings.warn_explicit(
                "Apex is not installed. Falling back to Torch Norm",
                UserWarning,
                "backends.py",
                21,
                module=module,
            )
        return bool(caught)

    monkeypatch.delenv(console.LOG_LEVEL_ENV, raising=False)
    assert console.log_level() == logging.INFO
    assert not shown("megatron.core.models.backends")
    assert shown("probsft_megatron.model")  # our own warnings are never hidden
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "debug")
    assert console.log_level() == logging.DEBUG and shown("megatron.core.models.backends")
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "nonsense")
    assert console.log_level() == logging.INFO
    monkeypatch.delenv(console.LOG_LEVEL_ENV)
    assert console.log_level(verbose=1) == logging.DEBUG
    assert console.setup_logging(verbose=1) == logging.DEBUG
    assert __import__("os").environ[console.LOG_LEVEL_ENV] == "DEBUG"
    monkeypatch.delenv(console.LOG_LEVEL_ENV)
    assert console.setup_logging() == logging.INFO  # the default for the tests that follow


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=-1", "optim.lr must be > 0 (got -1) (the peak learning rate, e.g. 5e-5)"),
        ("optim.lr=inf", "optim.lr must be a finite number (got inf)"),
        ("optim.adam_beta1=1", "optim.adam_beta1 must be in [0, 1) (got 1)"),
        ("train.max_steps=0", "train.max_steps must be >= 1 (got 0) (or null: every step"),
        ("model.rope_scaling_factor=-2", "model.rope_scaling_factor must be > 0 (got -2)"),
        ("data.padding=left", "data.padding='left' is invalid; use one of longest, max_length"),
        ("train.epochs=2.5", "train.epochs expects int, got 2.5"),
        ("optim.lr=true", "optim.lr expects a number, got True"),
        ("train.max_steps=false", "train.max_steps expects a number, got False"),
        ("optim=5", "optim expects a mapping, got 5"),
        ("train.epochz=2", "unknown config key 'train.epochz'; valid keys under 'train' are: "),
    ],
)
def test_pydantic_errors_read_as_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-figfont-cpu", [override])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_sections_are_checked_however_they_are_built():
    """Code that builds or replaces a section gets the same one-line errors as a recipe;
    command-line forms (comma lists, null) become the declared types."""
    import dataclasses

    from probsft_megatron.config import OptimConfig, TrainConfig

    cfg = load_config(
        "tiny-figfont-cpu",
        ["data.val_files=a.jsonl,b.jsonl", "train.max_steps=null", "train.resume=no"],
    )
    assert cfg.data.val_files == ["a.jsonl", "b.jsonl"]
    assert cfg.train.max_steps is None and cfg.train.resume is False
    assert dataclasses.replace(cfg.optim, lr=1e-4).lr == 1e-4  # a valid change passes
    with pytest.raises(ConfigError, match=r"^optim\.lr must be > 0 \(got 0\)"):
        dataclasses.replace(cfg.optim, lr=0)
    with pytest.raises(ConfigError, match="is above optim.lr"):
        OptimConfig(lr=1e-5, min_lr=1e-4)
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'"):
        TrainConfig(bogus=1)
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size must be >= 1 \(got 0\)"):
        TrainConfig(8, 0)  # positional arguments are named by their field
    with pytest.raises(ConfigError, match=r"^data\.train_files\[1\] expects a string"):
        load_config("tiny-figfont-cpu", ["data.train_files=[a.jsonl, [b]]"])


def test_log_lines_follow_stderr_when_it_is_replaced(capsys):
    """The log handler writes to the current ``sys.stderr``: a command run in-process under a
    capture that is then closed leaves no handler behind writing to the closed stream."""
    import contextlib
    import io
    import logging

    from probsft_megatron import console

    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        console.setup_logging()
        logging.getLogger("probsft_megatron.test").info("into the first")
    first.close()
    second = io.StringIO()
    with contextlib.redirect_stderr(second):
        console.setup_logging()
        logging.getLogger("probsft_megatron.test").info("into the second")
    assert second.getvalue() == "[probsft] into the second\n"
    logging.getLogger("probsft_megatron.test").warning("onto stderr")
    assert capsys.readouterr().err.endswith("[probsft] warning: onto stderr\n")
