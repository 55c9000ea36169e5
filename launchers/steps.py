"""Run-time helpers of launched experiments: what a step can only decide once it runs.

    python -m probsft_megatron.launchers.steps export --train-dir RUN_DIR --out HF_DIR

``export`` picks the newest complete checkpoint under ``RUN_DIR/checkpoints`` (it does not
exist when the experiment is built), exports it with the converters' ``megatron_to_hf``
(the function behind ``probsft convert megatron-to-hf``) and, for a run that started from
random weights and so has no Hugging Face template, adds the training tokenizer so that vLLM
can load the folder. The folder is assembled under a hidden name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from probsft_megatron.errors import CheckpointError

EXPORT_INFO = "probsft_export.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def export_latest(train_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the newest complete checkpoint of a training run as a Hugging Face folder.

    Returns ``out``, which holds the weights, config, tokenizer and ``probsft_export.json``
    (the checkpoint and step it came from). Raises :class:`CheckpointError` when the run has
    no complete checkpoint or no tokenizer can be found.
    """
    from probsft_megatron.checkpoint import latest_checkpoint
    from probsft_megatron.converters.api import megatron_to_hf

    train_dir, out = Path(train_dir), Path(out)
    ckpt = latest_checkpoint(train_dir / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {train_dir / 'checkpoints'}; "
                              "the train step did not finish (see its log)")
    staging = out.parent / f".{out.name}.export"
    megatron_to_hf(ckpt, staging, overwrite=True)
    state = json.loads((ckpt / "train_state.json").read_text())
    if not any((staging / name).is_file() for name in _TOKENIZER_FILES):
        spec = state.get("config", {}).get("init", {}).get("tokenizer")
        if not spec:
            raise CheckpointError(f"{ckpt} has no hf/ template and its run named no "
                                  "init.tokenizer, so the export would have no tokenizer")
        from probsft_megatron.tokenizers import load_tokenizer

        load_tokenizer(spec).save_pretrained(staging)
    (staging / EXPORT_INFO).write_text(json.dumps(
        {"checkpoint": str(ckpt), "step": state.get("step")}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line of the run-time helpers; user errors print one line and exit 2."""
    ap = argparse.ArgumentParser(prog="python -m probsft_megatron.launchers.steps",
                                 description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="export the newest complete checkpoint of a run to HF")
    p.add_argument("--train-dir", required=True, help="the run's train.output_dir")
    p.add_argument("--out", required=True, help="Hugging Face folder to write (replaced)")
    args = ap.parse_args(argv)
    from probsft_megatron.console import run_main

    return run_main(lambda: print(export_latest(args.train_dir, args.out)))


if __name__ == "__main__":
    sys.exit(main())
