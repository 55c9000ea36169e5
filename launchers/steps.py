"""Run-time helpers of launched experiments: what a step can only decide once it runs.

    python -m probsft_megatron.launchers.steps export --train-dir RUN_DIR --out HF_DIR
    python -m probsft_megatron.launchers.steps rdzv-store --port-file FILE

``export`` picks the newest complete checkpoint under ``RUN_DIR/checkpoints`` (it does not
exist when the experiment is built), exports it with the converters' ``megatron_to_hf``
(the function behind ``probsft convert megatron-to-hf``; a LoRA run's adapters are merged
into its base, :mod:`probsft_megatron.converters.peft_export`) and, for a run that started from
random weights and so has no Hugging Face template, adds the training tokenizer so that vLLM
can load the folder. The folder is assembled under a hidden name and renamed when complete.

``rdzv-store`` hosts the TCP store of torchrun's c10d rendezvous for a multi-node SLURM train
job. It runs in the job's batch script (on the first node) and every torchrun agent joins it as
a client (``is_host=0``). When an agent hosts the store instead, as torchrun does by default,
it takes the store down as soon as it exits, and the agents still shutting down print a
connection-error stack trace although the run succeeded. The store binds a free port, writes
it to ``--port-file`` (atomically) and lives until its parent, the batch script, exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
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
        raise CheckpointError(
            f"no complete checkpoint under {train_dir / 'checkpoints'}; "
            "the train step did not finish (see its log)"
        )
    staging = out.parent / f".{out.name}.export"
    from probsft_megatron.converters import peft_export

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
        from probsft_megatron.tokenizers import load_tokenizer

        load_tokenizer(spec).save_pretrained(staging)
    (staging / EXPORT_INFO).write_text(
        json.dumps({"checkpoint": str(ckpt), "step": state.get("step")}, indent=2) + "\n"
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def serve_rdzv_store(
    port_file: str | os.PathLike, *, poll_s: float = 1.0, max_s: float | None = None
) -> None:
    """Host a multi-tenant ``TCPStore`` on a free port, write the port to ``port_file`` and
    serve until the parent process exits (or ``max_s`` seconds pass, or SIGTERM)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from probsft_megatron.fileio import atomic_write_text

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
    start = time.monotonic()
    while (
        not stop and os.getppid() == parent and (max_s is None or time.monotonic() - start < max_s)
    ):
        time.sleep(poll_s)


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
