"""`probsft probe`: token-probability probe of a base model on SFT data (docs/probe.md).

Every input is checked before any work (:func:`check_inputs`); ``--nproc N`` runs the probe
under ``torchrun --nproc-per-node N``."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from probsft_megatron import console
from probsft_megatron.errors import CheckpointError, ConfigError
from probsft_megatron.input_checks import (
    DATA_SUFFIXES,
    TOKENIZER_FILES,
    check_data_files,
    check_model_dir,
    check_tokenizer,
    check_vocab_fits,
)

logger = logging.getLogger(__name__)

REQUIRED = (
    ("--model", "Megatron model dir, or a Hugging Face folder (converted once, cached)"),
    ("--data", "recipe (path or name), a .jsonl/.json/.parquet file, or 'figfont'"),
)
VALUE_FLAGS = (
    ("--samples", int, None, "examples to probe (a seeded random sample; default 512)"),
    ("--out", str, None, "also write report.json and probe.png into this folder"),
    ("--nproc", int, 1, "processes (devices) on this node"),
    ("--tp", int, 1, "tensor-parallel size"),
    ("--pp", int, 1, "pipeline-parallel size"),
    ("--micro-batch-size", int, 4, "rows per forward micro-batch"),
)
PROBE_FLAGS = (  # training's layout keys in a layout message -> the probe's own flags
    ("parallel.tensor_model_parallel_size", "--tp"),
    ("parallel.pipeline_model_parallel_size", "--pp"),
    ("the number of processes", "--nproc"),
    ("pick a TP", "pick a --tp"),
)
SWITCHES = (
    ("--refresh", "ignore and replace a cached report"),
    ("--overwrite", "replace the report.json and probe.png of an earlier probe in --out"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    for flag, help_text in REQUIRED:
        p.add_argument(flag, required=True, help=help_text)
    for flag, kind, default, help_text in VALUE_FLAGS:
        p.add_argument(flag, type=kind, default=default, help=help_text)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float64"),
        help="model precision (auto: bfloat16 on GPU, float32 on CPU, like training; "
        "float64 for reference checks)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder or 'smollm2' (default: the model's hf/)")
    for flag, help_text in SWITCHES:
        p.add_argument(flag, action="store_true", help=help_text)
    p.add_argument("overrides", nargs="*", help="data overrides, e.g. data.max_length=2048")


def data_config(spec: str, overrides: list[str], command: str = "probsft probe"):
    """The DataConfig of ``--data``: a data file, ``figfont``, or a recipe's data section
    (``command`` names the command in an error message)."""
    from probsft_megatron.config import apply_override, build_config, load_config

    bad = [o for o in overrides if not o.strip().startswith("data.")]
    if bad:
        raise ConfigError(
            f"override {bad[0]!r} is not a data.* key; `{command}` only takes "
            "data overrides (e.g. data.max_length=2048)"
        )
    raw = {"source": "figfont"} if spec == "figfont" else {"source": "file", "train_files": [spec]}
    if spec == "figfont" or Path(spec).suffix.lower() in DATA_SUFFIXES:
        cfg = build_config(functools.reduce(apply_override, overrides, {"data": raw})).data
    else:
        cfg = load_config(spec, overrides).data
    check_data_files(cfg, "--data")
    return cfg


def _model_config(model: Path):
    """The ModelConfig of a Megatron model dir or a Hugging Face folder (before conversion)."""
    from probsft_megatron.converters.hf_config import model_config_from_hf
    from probsft_megatron.model_dir import read_model_config

    if (model / "model_config.json").is_file():
        return read_model_config(model)
    path = model / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckpointError(
            f"{path} is not valid JSON; restore it or save the model again"
        ) from None
    return model_config_from_hf(cfg, where=str(path))


def check_inputs(args: argparse.Namespace):
    """Check every input before any conversion or model (one error line each): the numbers, the
    model and its layout, the data, ``--out``, the tokenizer. Returns (DataConfig, layout)."""
    from probsft_megatron import manifest
    from probsft_megatron.config import ParallelConfig, validate_layout
    from probsft_megatron.data.records import check_first_records

    for flag, kind, _, _ in VALUE_FLAGS:
        value = _value(args, flag)
        if kind is int and value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    model = Path(args.model)
    kind = manifest.folder_kind(model)
    if kind in (manifest.MODEL_DIR, manifest.TRAINING_CHECKPOINT, manifest.TRAINING_RUN):
        check_model_dir(model, "--model", training_checkpoint_ok=False)
    elif not model.exists():
        raise CheckpointError(
            f"--model {model} does not exist; pass a converted model dir or a Hugging Face folder"
        )
    elif not (model / "config.json").is_file():
        raise CheckpointError(
            f"--model {model} is neither a Megatron model dir (model_config.json) nor a "
            "Hugging Face folder (config.json)"
        )
    else:
        manifest.verify(model)  # an export written by probsft must be intact
    config = _model_config(model)
    layout = ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
    )
    launched = os.environ.get("TORCHELASTIC_RUN_ID") is not None  # a rank under torchrun
    try:
        validate_layout(layout, int(os.environ["WORLD_SIZE"]) if launched else args.nproc, config)
    except ConfigError as exc:  # the probe's flags, not the training keys it does not take
        message = functools.reduce(lambda m, pair: m.replace(*pair), PROBE_FLAGS, str(exc))
        raise ConfigError(message) from None
    data = data_config(args.data, args.overrides)
    check_first_records(data)
    if args.out is not None:
        inputs = [("--model", model), ("--tokenizer", args.tokenizer)]
        if data.source == "file":
            inputs += [("--data", f) for f in data.train_files]
        manifest.check_output(args.out, flag="--out", inputs=inputs)
        _check_earlier_report(Path(args.out), args.overwrite)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = str(model / "hf") if (model / "model_config.json").is_file() else str(model)
        if not any((Path(tokenizer) / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(
                f"{tokenizer} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); pass "
                "--tokenizer DIR (a folder with them) or --tokenizer smollm2"
            )
    else:
        check_tokenizer(tokenizer, "--tokenizer")
    check_vocab_fits(tokenizer, config.vocab_size, "the tokenizer")
    return data, layout


def _check_earlier_report(out: Path, overwrite: bool) -> None:
    """A probe's report.json in ``out`` is replaced only with ``--overwrite``, another never."""
    from probsft_megatron.probe.report import REPORT_FILE, load_report

    if not (out / REPORT_FILE).exists():
        return
    try:
        load_report(out / REPORT_FILE)
    except ConfigError:
        raise ConfigError(
            f"--out {out} holds a {REPORT_FILE} that probsft probe did not write; --overwrite "
            "replaces only a probe's report: choose another --out"
        ) from None
    if not overwrite:
        raise ConfigError(
            f"--out {out} already holds a probe report ({REPORT_FILE}); pass --overwrite to "
            "replace it, or choose another --out"
        )


def megatron_model_dir(path: str) -> Path:
    """``path`` if it is a Megatron model dir; a Hugging Face folder is converted once into
    ``<probsft cache>/megatron/<name>-<hash of its path, config and weight files>``."""
    from probsft_megatron.converters.api import hf_to_megatron
    from probsft_megatron.embedded import default_cache_dir

    folder = Path(path)
    if (folder / "model_config.json").is_file():
        return folder
    h = hashlib.sha256(str(folder.resolve()).encode())
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = default_cache_dir() / "megatron" / f"{folder.resolve().name}-{h.hexdigest()[:12]}"
    if not (target / "model_config.json").is_file():
        logger.info("converting %s to a Megatron model dir at %s (once)", folder, target)
        hf_to_megatron(folder, target, overwrite=True)
    return target


def _value(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def _child_command(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """The torchrun command that runs this probe on ``--nproc`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(args.nproc), "-m", "probsft_megatron.probe_cli"]
    cmd += ["--model", str(model_dir), "--data", args.data, "--dtype", args.dtype]
    for flag in [f for f, *_ in VALUE_FLAGS if f != "--nproc"] + ["--tokenizer"]:
        value = _value(args, flag)
        if value is not None:
            cmd += [flag, str(value)]
    cmd += [flag for flag, _ in SWITCHES if getattr(args, flag[2:], False)]
    return cmd + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    """Probe and print the table (rank 0); spawns torchrun for ``--nproc`` > 1."""
    import torch.distributed as dist

    data, parallel = check_inputs(args)
    under_torchrun = dist.is_torchelastic_launched()
    model_dir = Path(args.model) if under_torchrun else megatron_model_dir(args.model)
    if not under_torchrun and args.nproc > 1:  # the layout was checked by check_inputs
        return subprocess.call(_child_command(args, model_dir))
    from probsft_megatron import probe

    report = probe.probe(
        model_dir,
        data,
        tokenizer=args.tokenizer,
        samples=probe.DEFAULT_SAMPLES if args.samples is None else args.samples,
        parallel=parallel,
        micro_batch_size=args.micro_batch_size,
        dtype=args.dtype,
        out_dir=args.out,
        use_cache=not args.refresh,
    )
    if not under_torchrun or os.environ.get("RANK") == "0":
        print(probe.format_table(report))
        where = Path(args.out) if args.out else probe.cache_dir() / report["key"]
        print(f"  report: {where / probe.REPORT_FILE}\n  plot:   {where / probe.PLOT_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probsft probe", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return console.run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
