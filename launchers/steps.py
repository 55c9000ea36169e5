"""What a launched step decides only when it runs (``python -m probsft_megatron.launchers.steps``):
``export`` a run's newest complete checkpoint to a Hugging Face folder, and ``rdzv-store``, the
c10d rendezvous store of a multi-node SLURM train job, hosted by its batch script."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from probsft_megatron.errors import CheckpointError
from probsft_megatron.fileio import atomic_write_json, atomic_write_text

EXPORT_INFO = "probsft_export.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def export_latest(train_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export the newest complete checkpoint under ``train_dir`` to ``out`` (built under a hidden
    name, then renamed); CheckpointError without a complete checkpoint or a tokenizer."""
    from probsft_megatron.checkpoint import latest_checkpoint
    from probsft_megatron.converters import peft_export
    from probsft_megatron.converters.api import megatron_to_hf
    from probsft_megatron.tokenizers import load_tokenizer

    train_dir, out = Path(train_dir), Path(out)
    ckpt = latest_checkpoint(train_dir / "checkpoints")
    if ckpt is None:
        raise CheckpointError(
            f"no complete checkpoint under {train_dir / 'checkpoints'}; "
            "the train step did not finish (see its log)"
        )
    staging = out.parent / f".{out.name}.export"
    if peft_export.peft_record(ckpt) is not None:  # LoRA: the adapters merged into the base
        peft_export.export(ckpt, staging, merge=True, overwrite=True)
    else:
        megatron_to_hf(ckpt, staging, overwrite=True)
    state = json.loads((ckpt / "train_state.json").read_text())
    if not any((staging / name).is_file() for name in _TOKENIZER_FILES):
        spec = state.get("config", {}).get("init", {}).get("tokenizer")
        if not spec:
            raise CheckpointError(
                f"{ckpt} has no hf/ template and its run named no "
                "init.tokenizer, so the export would have no tokenizer"
            )
        load_tokenizer(spec).save_pretrained(staging)
    atomic_write_json(staging / EXPORT_INFO, {"checkpoint": str(ckpt), "step": state.get("step")})
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def serve_rdzv_store(port_file: str | os.PathLike, max_s: float | None = None) -> None:
    """Host a multi-tenant ``TCPStore`` on a free port, write the port to ``port_file``, serve
    until the parent process exits (or ``max_s`` seconds pass, or SIGTERM)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    parent = os.getppid()
    store = TCPStore(
        "0.0.0.0",
        0,
        is_master=True,
        multi_tenant=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=60),
    )
    atomic_write_text(port_file, f"{store.port}\n")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    deadline = time.monotonic() + (math.inf if max_s is None else max_s)
    while not stop and os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    """Command line of the run-time helpers; user errors print one line and exit 2."""
    ap = argparse.ArgumentParser(
        prog="python -m probsft_megatron.launchers.steps", description=__doc__.splitlines()[0]
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="export the newest complete checkpoint of a run to HF")
    p.add_argument("--train-dir", required=True, help="the run's train.output_dir")
    p.add_argument("--out", required=True, help="Hugging Face folder to write (replaced)")
    p = sub.add_parser("rdzv-store", help="host torchrun's rendezvous store for a SLURM job")
    p.add_argument("--port-file", required=True, help="file that receives the store's port")
    p.add_argument("--max-seconds", type=float, help="stop after this long (default: never)")
    args = ap.parse_args(argv)
    if args.command == "rdzv-store":
        serve_rdzv_store(args.port_file, max_s=args.max_seconds)
        return 0
    from probsft_megatron.console import run_main  # logging set-up, one-line user errors

    return run_main(lambda: print(export_latest(args.train_dir, args.out)))


if __name__ == "__main__":
    sys.exit(main())
