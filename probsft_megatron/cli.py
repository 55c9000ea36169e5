"""`probsft` console entry point: one thin subcommand per library module.

Exit codes: 0 success, 2 a usage error or a ProbsftError, 1 a failed run."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from probsft_megatron import extras

# subcommand -> (its module, relative to probsft_megatron unless absolute; its help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "objectives": (".objectives_cli", "list or validate training objectives"),
    "train": (".train_cli", "supervised fine-tuning on Megatron-Core"),
    "convert": (".converters.cli", "Hugging Face <-> Megatron checkpoints"),
    "eval": (".eval.cli", "vLLM evaluation of a Hugging Face model"),
    "probe": (".probe_cli", "token-probability probe of a base model on a dataset"),
    "launch": (".launchers.cli", "NeMo-Run experiments (local or SLURM)"),
    "data": (".data_cli", "generate or inspect SFT datasets"),
    "plan": (".plan_cli", "per-GPU memory estimate and the cheapest layout that fits"),
    "report": (".report_cli", "compare the runs of an experiment or sweep: tables and figures"),
}
VERBOSE_HELP = "debug logging, including megatron's own warnings (also PROBSFT_LOG_LEVEL)"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probsft", description=__doc__.splitlines()[0])
    verbose = {"action": "count", "help": VERBOSE_HELP}
    parser.add_argument("-v", "--verbose", default=0, **verbose)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module_name = importlib.util.resolve_name(module_name, "probsft_megatron")
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-v", "--verbose", default=argparse.SUPPRESS, **verbose)
        if only not in (None, name):
            continue
        try:  # the pip extra first, so a lazy import inside cannot fail with a traceback
            missing = extras.missing_module(name)
            if missing is not None:
                raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a missing extra, or a module not installed
            reason = extras.explain_missing(name, module_name, exc.name)
            p.parse_known_args = lambda *_, r=reason: (argparse.Namespace(_unavailable=r), [])
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in SUBCOMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if isinstance(getattr(args, "overrides", None), list):  # key=value words after an option
        args.overrides += [w for w in extra if "=" in w and not w.startswith("-")]
        extra = [w for w in extra if "=" not in w or w.startswith("-")]
    if extra:
        see = f"see probsft {args.command or ''} --help"
        parser.error(f"unrecognized arguments: {' '.join(extra)} ({see})")
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    from probsft_megatron.console import run_main

    return run_main(lambda: args._run(args), getattr(args, "verbose", 0))


if __name__ == "__main__":
    sys.exit(main())
