"""`probsft data`: list and generate the built-in SFT tasks (``tasks``, ``generate``), inspect
a dataset as training tokenizes it (``inspect``: lengths, truncation, the trained tokens of a
few records marked), or tokenize a recipe's data into its store (``prepare``)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from probsft_megatron.errors import ConfigError, ProbsftError
from probsft_megatron.input_checks import DATA_SUFFIXES

#: argparse settings of the options that are not plain strings
_KWARGS = {
    "--out": {"required": True},
    **dict.fromkeys(("--overwrite", "--json"), {"action": "store_true"}),
    "--split": {"default": "train", "choices": ("train", "test")},
    **dict.fromkeys(("--n", "--limit", "--num-proc"), {"type": int}),
    "--seed": {"type": int, "default": 0},
    "--max-records": {"type": int, "metavar": "N"},
    "--corrupt": {"type": float, "default": 0.0, "metavar": "FRACTION"},
    "--render-with": {"metavar": "TOKENIZER"},
    "--from-eval": {"metavar": "SAMPLES"},
    "--show": {"type": int, "default": 3},
    # inspect re-reads everything from the data on with parse_intermixed_args, so that data.*
    # overrides may follow the options: `inspect FILE --tokenizer T data.max_length=512`
    "items": {"nargs": argparse.REMAINDER, "metavar": "DATA [data.key=value ...]"},
    "--config": {"required": True, "metavar": "RECIPE"},
    "overrides": {"nargs": "*", "metavar": "data.key=value"},
}
#: Each action's options and their help, in the order --help lists them.
_GENERATE = {
    "task": "task name (probsft data tasks lists them)",
    "--out": "output .jsonl file (written atomically)",
    "--overwrite": "replace an existing --out (only a file written by probsft data generate)",
    "--split": "train or test items (disjoint by construction)",
    "--n": "number of records (default: the whole split)",
    "--seed": "which items, in which order",
    "--max-records": "keep at most the first N records (after --from-eval filtering, before "
    "--corrupt)",
    "--corrupt": "replace this fraction of responses by wrong answers (noise studies)",
    "--render-with": "render prompts with this tokenizer's chat template (a folder or "
    "'smollm2'), for probsft eval --task custom --prompt-format raw",
    "--from-eval": "self-addition: keep the correct completions of this probsft eval "
    "samples.jsonl (evaluated on the same --split/--n/--seed questions)",
}
_INSPECT = {
    "--tokenizer": "tokenizer folder or 'smollm2' (default: a recipe's init.tokenizer / "
    "init.checkpoint; smollm2 for files)",
    "--limit": "inspect only the first N records",
    "--show": "records shown with their trained tokens marked",
    "--json": "print the report as JSON",
    "items": "a .jsonl/.json/.parquet file, 'figfont', or a recipe; then data overrides, "
    "e.g. data.max_length=512",
}
_PREPARE = {
    "--config": "recipe (.yaml or name)",
    "--tokenizer": "tokenizer folder or 'smollm2' (default: the recipe's tokenizer)",
    "--num-proc": "tokenizing processes (default: every CPU this may use)",
    "--json": "print the result as JSON",
    "overrides": "data overrides of the recipe",
}
#: action -> (help, description or None: the help, options)
_ACTIONS = {
    "tasks": ("list the generated tasks", None, {}),
    "generate": ("write a generated task as JSON lines", None, _GENERATE),
    "inspect": ("token lengths, truncation and a sample of a dataset", None, _INSPECT),
    "prepare": (
        "tokenize a recipe's data once into its store (what training maps)",
        "tokenize a recipe's data once into its fingerprinted store under data.cache_dir "
        "($PROBSFT_CACHE/data), in parallel; training then maps it",
        _PREPARE,
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    for action, (text, description, options) in _ACTIONS.items():
        parser = sub.add_parser(action, help=text, description=description or text)
        for flag, help_text in options.items():
            parser.add_argument(flag, help=help_text, **_KWARGS.get(flag, {}))


def _inspect_args(args: argparse.Namespace) -> argparse.Namespace:
    """The inspect options wherever they stood, with ``data`` and ``overrides``."""
    parser = argparse.ArgumentParser(prog="probsft data inspect", add_help=False)
    for flag in ("--tokenizer", "--limit", "--show", "--json"):
        parser.add_argument(flag, **_KWARGS.get(flag, {}))
    parser.add_argument("data")
    parser.add_argument("overrides", nargs="*")
    parser.set_defaults(**vars(args))  # the options given before the data
    if not args.items:
        raise ConfigError("probsft data inspect needs the data: a file, 'figfont' or a recipe")
    try:
        return parser.parse_intermixed_args(args.items)
    except SystemExit:
        raise ConfigError(
            f"cannot read the inspect arguments {' '.join(args.items)!r}; usage: probsft data "
            "inspect DATA [--tokenizer T] [--limit N] [--json] [data.key=value ...]"
        ) from None


def run(args: argparse.Namespace) -> int:
    actions = {"tasks": _tasks, "generate": _generate, "inspect": _inspect, "prepare": _prepare}
    if args.data_command not in actions:
        raise ConfigError(
            "probsft data needs an action: tasks, generate TASK --out FILE, "
            "inspect DATA or prepare --config RECIPE (probsft data --help)"
        )
    return actions[args.data_command](args)


def _tasks(args: argparse.Namespace) -> int:
    from probsft_megatron import tasks_gen

    figfont = ("the paper's figlet-font task (40,000 train, 5,000 test)", "800", "jaro_winkler")
    rows = [(n, s.description, str(s.max_length), s.grader) for n, s in tasks_gen.TASKS.items()]
    rows.append((tasks_gen.FIGFONT, *figfont))
    header = ("task", "description", "max_length", "grader")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from probsft_megatron import tasks_gen
    from probsft_megatron.fileio import atomic_write_text
    from probsft_megatron.manifest import overlap, writable_folder

    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".json"):
        raise ConfigError(f"--out {out} must end in .jsonl (JSON lines)")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the .jsonl file to write")
    if (problem := writable_folder(out.absolute().parent)) is not None:
        raise ConfigError(
            f"--out {out} cannot be written: its folder {out.absolute().parent} "
            f"{problem}; name a file in a folder that can be written"
        )
    for flag, value in (("--n", args.n), ("--max-records", args.max_records)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    if not 0.0 <= args.corrupt <= 1.0:
        raise ConfigError(f"--corrupt must be a fraction in [0, 1] (got {args.corrupt})")
    if args.from_eval is not None:
        if not Path(args.from_eval).is_file():
            raise ConfigError(
                f"--from-eval {args.from_eval} is not a file; name the "
                "samples.jsonl of a probsft eval run"
            )
        if overlap(out, args.from_eval) == "is":
            raise ConfigError(
                f"--out {out} is the input --from-eval {args.from_eval}: writing "
                "it would destroy the input; choose another --out"
            )
    if out.exists():  # replaced only with --overwrite, and only a file this command wrote
        first = None
        with contextlib.suppress(OSError, ValueError), open(out, encoding="utf-8") as f:
            first = json.loads(f.readline())
        fields = {"prompt", "response", "reference", "task"}
        if not isinstance(first, dict) or not fields <= set(first):
            raise ConfigError(
                f"--out {out} already exists and is not a file written by probsft data generate; "
                "--overwrite replaces only such a file: choose another --out or remove it yourself"
            )
        if not args.overwrite:
            raise ConfigError(
                f"--out {out} already holds generated {first['task']} records; pass --overwrite "
                "to replace it, or choose another --out"
            )
    recs = tasks_gen.records(args.task, args.split, n=args.n, seed=args.seed)
    info: dict = {}
    if args.from_eval is not None:
        if args.task != "self-addition":
            raise ConfigError(f"--from-eval applies to self-addition, not {args.task}")
        recs, info = tasks_gen.self_answer_records(recs, args.from_eval)
        if not recs:
            raise ConfigError(
                f"none of the {info['questions']} completions in {args.from_eval} was correct "
                "and complete; evaluate with a larger --max-new-tokens or more questions"
            )
    recs = recs[: args.max_records]
    if args.corrupt:
        recs = tasks_gen.corrupt(recs, args.corrupt, seed=args.seed)
        info["corrupted"] = sum(r["corrupted"] for r in recs)
    if args.render_with is not None:
        from probsft_megatron.tokenizers import load_tokenizer

        recs = tasks_gen.render_prompts(recs, load_tokenizer(args.render_with))
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in recs))
    extra = "".join(f", {k} {v}" for k, v in info.items())
    print(f"wrote {len(recs)} {args.task} {args.split} records to {out}{extra}")
    return 0


def _resolve(spec: str, overrides: list[str], tokenizer: str | None):
    """(DataConfig, tokenizer spec) of a data file, figfont or a recipe."""
    from probsft_megatron.config import load_config
    from probsft_megatron.probe_cli import data_config
    from probsft_megatron.tokenizers import tokenizer_spec

    if spec == "figfont" or Path(spec).suffix.lower() in DATA_SUFFIXES:
        return data_config(spec, overrides, "probsft data inspect"), tokenizer or "smollm2"
    if Path(spec).is_file() and Path(spec).suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(
            f"cannot tell what {spec} is from its name: probsft data inspect takes "
            "a .jsonl/.json/.parquet data file, 'figfont' or a recipe (.yaml); rename the file"
        )
    if bad := [o for o in overrides if not o.strip().startswith("data.")]:
        raise ConfigError(
            f"override {bad[0]!r} is not a data.* key; `probsft data inspect` "
            "only takes data overrides (e.g. data.max_length=2048)"
        )
    cfg = load_config(spec, overrides)
    cfg.data.validate()
    tokenizer = tokenizer_spec(cfg.init) if tokenizer is None else tokenizer
    if tokenizer is None:
        raise ConfigError(
            f"recipe {spec} names no tokenizer (init.tokenizer or init.checkpoint); pass "
            "--tokenizer DIR (a folder with tokenizer files) or --tokenizer smollm2"
        )
    return cfg.data, tokenizer


def _spread(values) -> dict:
    import numpy as np

    v = np.asarray(values)
    return {
        "min": int(v.min()),
        "median": float(np.median(v)),
        "p95": float(np.percentile(v, 95)),
        "max": int(v.max()),
        "mean": float(v.mean()),
    }


def segments(tokenizer, ids, loss_mask) -> list[tuple[str, bool]]:
    """The example's text as ``(text, trained)`` pieces: runs of tokens that are trained
    (the labels ``loss_mask`` selects) or not, each decoded."""
    trained = [False] + [float(m) > 0 for m in loss_mask[:-1]]  # token k is label k - 1
    bounds = [k for k in range(len(ids)) if k == 0 or trained[k] != trained[k - 1]] + [len(ids)]
    return [(tokenizer.decode(list(ids[a:b])), trained[a]) for a, b in zip(bounds, bounds[1:])]


def marked_text(pieces: list[tuple[str, bool]], color: bool = False) -> str:
    """``pieces`` joined, trained ones green (``color``) or between ``[[`` and ``]]``."""
    return "".join(
        (f"\033[32m{t}\033[0m" if color else f"[[{t}]]") if on else t for t, on in pieces
    )


_CUTS = (
    ("n_cut_inside_turn", "inside an assistant turn (its end-of-turn token is not trained)"),
    ("n_cut_at_turn", "after a whole assistant turn"),
    ("n_truncated", "at data.max_length"),
)


def _shown(cfg, tok, records: list[dict]) -> Iterator[dict]:
    """``records`` as training tokenizes them, with their trained tokens."""
    from probsft_megatron.data import SFTDataset

    quiet = logging.getLogger("probsft_megatron.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the whole data set's warnings were given already
    try:
        for record in records:
            try:
                ds = SFTDataset(cfg, tok, [record])
            except ProbsftError as exc:  # e.g. dropped: the prompt alone fills max_length
                yield {"origin": record.get("origin"), "dropped": str(exc)}
                continue
            ids, mask = ds[0]["input_ids"].tolist(), ds[0]["loss_mask"].tolist()
            pieces = segments(tok, ids, mask)
            trained = sum(m > 0 for m in mask)
            s = ds.stats
            yield {
                "origin": record.get("origin"),
                "tokens": len(ids),
                "trained": trained,
                "masked": len(ids) - trained,
                "turns_trained": s["n_turns_trained"],
                "turns_kept": s["n_turns_kept"],
                "cut": next((text for key, text in _CUTS if s[key]), None),
                "text": marked_text(pieces),
                "segments": pieces,
            }
    finally:
        quiet.setLevel(level)


def inspect(
    spec: str,
    overrides: list[str] | None = None,
    tokenizer: str | None = None,
    limit: int | None = None,
    show: int = 3,
) -> dict:
    """Records, token lengths (untruncated), what ``data.max_length`` cuts or drops, and the
    first ``show`` records with their trained tokens marked."""
    from probsft_megatron.data import SFTDataset, load_records
    from probsft_megatron.tokenizers import load_tokenizer

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if show < 0:
        raise ConfigError(f"--show must be >= 0, got {show}")
    cfg, tok_spec = _resolve(spec, list(overrides or []), tokenizer)
    if limit is not None:
        cfg = dataclasses.replace(cfg, num_samples=min(limit, cfg.num_samples or limit))
    tok = load_tokenizer(tok_spec)
    records = load_records(cfg)
    # untruncated lengths: the same tokenization with room for everything
    untruncated = dataclasses.replace(cfg, max_length=2**31 - 1, truncation="right")
    whole = SFTDataset(untruncated, tok, records)
    lengths, prompts = whole.lengths, whole.prompt_lengths
    dropped = prompts >= cfg.max_length
    first_ids = whole[0]["input_ids"].tolist()
    p0 = int(prompts[0])
    try:
        cut_stats = SFTDataset(cfg, tok, records).stats
    except ProbsftError:  # nothing would be left to train
        cut_stats = dict.fromkeys(whole.stats, 0)
    parts = {"total": lengths, "prompt": prompts, "response": lengths - prompts}
    tokens = {key: _spread(values) for key, values in parts.items()}
    conversations = None
    if whole.stats["n_conversations"]:
        tokens["trained"] = _spread(
            [int((whole[i]["loss_mask"] > 0).sum()) for i in range(len(whole))]
        )
        conversations = {
            "conversations": whole.stats["n_conversations"],
            "assistant_turns_trained": whole.stats["n_turns_trained"],
            "assistant_turns_kept": cut_stats["n_turns_kept"],
            "cut_after_a_turn": cut_stats["n_cut_at_turn"],
            "cut_inside_a_turn": cut_stats["n_cut_inside_turn"],
            "truncation": cfg.truncation,
        }
    trained = cut_stats["n_response_tokens"]
    return {
        "data": spec,
        "tokenizer": tok_spec,
        "records": len(records),
        "chat_template": whole.template is not None,
        "template_fallback": whole.stats["n_template_fallback"],
        "tokens": tokens,
        "max_length": cfg.max_length,
        "truncated": int(((lengths > cfg.max_length) & ~dropped).sum()),
        "dropped": int(dropped.sum()),
        "response_tokens_lost": int(whole.stats["n_response_tokens"] - trained),
        "trained_tokens": int(trained),
        "masked_tokens": int(cut_stats["n_tokens"] - trained),
        "conversations": conversations,
        "shown": list(_shown(cfg, tok, records[:show])),
        "sample": {
            "origin": records[0].get("origin"),
            "prompt": tok.decode(first_ids[:p0]),
            "response": tok.decode(first_ids[p0:]),
            "tokens": len(first_ids),
            "prompt_tokens": p0,
        },
    }


def format_report(r: dict, color: bool = False) -> str:
    c = r.get("conversations")
    fallback = f" ({r['template_fallback']} tokenized separately)" if r["template_fallback"] else ""
    lines = [
        f"{r['data']}: {r['records']} records, tokenizer {r['tokenizer']}, chat template "
        f"{'yes' if r['chat_template'] else 'no'}{fallback}"
    ]
    if c:
        lines.append(
            f"conversations: {c['conversations']}, assistant turns kept whole "
            f"{c['assistant_turns_kept']} of {c['assistant_turns_trained']} "
            f"(data.truncation={c['truncation']}: {c['cut_after_a_turn']} cut after a whole "
            f"turn, {c['cut_inside_a_turn']} inside a turn)"
        )
    lines += ["", "tokens      min   median      p95      max     mean"]
    # a conversation's "prompt" ends at its first answer: its trained tokens say more
    for key in ("total", "trained") if c else ("total", "prompt", "response"):
        t = r["tokens"][key]
        lines.append(
            f"{key:<9}{t['min']:>6} {t['median']:>8.1f} {t['p95']:>8.1f} "
            f"{t['max']:>8} {t['mean']:>8.1f}"
        )
    n = r["records"]
    lines += [
        "",
        f"data.max_length={r['max_length']}: {r['truncated']} of {n} examples "
        f"would be cut ({100 * r['truncated'] / n:.1f}%), {r['dropped']} dropped (prompt "
        f"alone too long), {r['response_tokens_lost']} response tokens lost",
        f"trained tokens {r['trained_tokens']}, masked {r['masked_tokens']}",
    ]
    if not c:
        sample = r["sample"]
        lines += [
            "",
            f"sample ({sample['origin']}, {sample['tokens']} tokens, "
            f"{sample['prompt_tokens']} prompt):",
            "--- prompt ---",
            sample["prompt"],
            "--- response (trained) ---",
            sample["response"],
        ]
    for shown in r.get("shown", []):
        lines += ["", f"=== {shown['origin']} ==="]
        if "dropped" in shown:
            lines.append(f"dropped: {shown['dropped']}")
            continue
        turns = shown["turns_trained"]
        lines.append(
            f"{shown['tokens']} tokens: {shown['trained']} trained, {shown['masked']} masked"
            + (f"; assistant turns kept {shown['turns_kept']} of {turns}" if turns else "")
            + (f"; cut {shown['cut']}" if shown["cut"] else "")
        )
        lines.append(marked_text(shown["segments"], color) if color else shown["text"])
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    args = _inspect_args(args)
    report = inspect(args.data, args.overrides, args.tokenizer, args.limit, args.show)
    color = not args.json and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(json.dumps(report, indent=2) if args.json else format_report(report, color))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """Build (or find) the tokenized store of a recipe's data; what training will map."""
    from probsft_megatron.data import store
    from probsft_megatron.tokenizers import load_tokenizer

    if args.num_proc is not None and args.num_proc < 1:
        raise ConfigError(f"--num-proc must be >= 1, got {args.num_proc}")
    cfg, tokenizer_spec = _resolve(args.config, list(args.overrides), args.tokenizer)
    if not cfg.cache:
        raise ConfigError(
            "data.cache is false: training tokenizes in memory and reads no store; "
            "remove data.cache=false to prepare one"
        )
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_spec)
    key, _ = store.fingerprint(cfg, tok)
    found = store.open_store(store.store_root(cfg) / key) is not None
    ds = store.open_dataset(cfg, tok, num_proc=args.num_proc)
    counts = ("examples", "tokens", "response_tokens", "truncated", "dropped")
    r = {
        "store": str(ds.store_path),
        "built": not found,
        "seconds": round(time.perf_counter() - t0, 2),
        **{key: int(ds.stats[f"n_{key}"]) for key in counts},
    }
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        verb = "built" if r["built"] else "already built"
        print(
            f"{verb}: {r['store']}\n{r['examples']:,} examples, {r['tokens']:,} tokens "
            f"({r['response_tokens']:,} trained), {r['truncated']:,} truncated, "
            f"{r['dropped']:,} dropped; {r['seconds']:.1f} s"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probsft data", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ProbsftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
