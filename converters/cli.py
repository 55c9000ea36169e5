"""`probsft convert`: Hugging Face <-> Megatron checkpoints (docs/converters.md); a LoRA
checkpoint exports as a PEFT adapter folder, or with ``--merge`` as full weights. ``--out``
may not be, contain or lie inside an input; ``--overwrite`` replaces only an output of its kind."""

from __future__ import annotations

import argparse

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    p = sub.add_parser("hf-to-megatron", help="HF safetensors folder -> Megatron model dir")
    p.add_argument("--hf", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--out", required=True, help="Megatron model dir to write")
    p.add_argument("--dtype", choices=_DTYPES, help="weights dtype (default: the checkpoint's)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that holds a previous Megatron model dir",
    )
    p = sub.add_parser("megatron-to-hf", help="Megatron model dir -> HF safetensors folder")
    p.add_argument(
        "--ckpt", required=True, help="Megatron model dir (model_config.json + weights/)"
    )
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--hf-template", help="folder with config/tokenizer files (default: CKPT/hf)")
    p.add_argument("--dtype", choices=_DTYPES, help="exported dtype (default: the checkpoint's)")
    p.add_argument(
        "--max-shard-size", default="2GiB", help="largest safetensors file (default 2GiB)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out that holds a previous export of probsft",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="LoRA checkpoint: write full weights W + (alpha/r) B A instead of a PEFT adapter",
    )
    p.add_argument(
        "--base", help="LoRA checkpoint: its base model dir (default: the run's init.checkpoint)"
    )
    p = sub.add_parser("smollm2", help="convert the embedded SmolLM2-135M-Instruct (cached)")
    p.add_argument("--out", help="Megatron model dir to write (default: in the probsft cache)")


def run(args: argparse.Namespace) -> int:
    """Run one conversion and print its output folder; user errors raise ``ProbsftError``."""
    from probsft_megatron.converters import api, peft_export

    if args.direction == "hf-to-megatron":
        out = api.hf_to_megatron(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite).path
    elif args.direction == "smollm2":
        out = api.default_model_dir(args.out)
    else:
        options = dict(hf_template=args.hf_template, dtype=args.dtype, overwrite=args.overwrite)
        options.update(max_shard_size=args.max_shard_size)
        try:
            lora = peft_export.peft_record(args.ckpt) is not None
        except (OSError, ValueError):  # unreadable: megatron_to_hf refuses it in one line
            lora = False
        if args.merge or args.base is not None or lora:
            out = peft_export.export(
                args.ckpt, args.out, merge=args.merge, base=args.base, **options
            )
        else:
            out = api.megatron_to_hf(args.ckpt, args.out, **options)
    print(out)
    return 0
