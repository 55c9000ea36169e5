"""`probsft objectives [--describe NAME] [--json]`: the table of every objective form with
f(p), w(p) and mask, or one spec's canonical name and formulas (exit 2 if invalid)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from probsft_megatron.objectives import list_objectives, parse_objective


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--describe",
        metavar="NAME",
        help="validate an objective spec (e.g. GeneralFamily-8, OnlyTopP-K20) "
        "and print its canonical name, f(p), w(p) and mask",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    head, *body = [  # the header is a row of the column names
        "  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)).rstrip()
        for r in [dict(zip(columns, columns)), *rows]
    ]
    return "\n".join([head, "  ".join("-" * w for w in widths), *body])


def run(args: argparse.Namespace) -> int:
    """List the objectives, or describe ``args.describe`` (ObjectiveError if invalid)."""
    if args.describe is None:
        rows = list_objectives()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            r["aliases"] = ", ".join(r["aliases"])
        print(_table(rows, ["form", "f", "w", "mask", "aliases"]))
        print(
            "\nw(p) = -f'(p) * p multiplies the NLL gradient. <q>: absolute probability "
            "(top 0 <= q < 1, bottom 0 < q <= 1);\nK<k>: k-th percentile (0..100) of the "
            "batch's response-token p. Details: probsft objectives --describe NAME."
        )
        return 0
    objective = parse_objective(args.describe)
    info = objective.describe()
    if args.json:
        threshold = objective.threshold and dataclasses.asdict(objective.threshold)
        info.update(family=objective.family, a=objective.a, threshold=threshold)
        print(json.dumps(info, indent=2))
        return 0
    labels = ("name", "loss f(p)", "weight w(p)", "mask", "normalization")  # of info's keys
    width = max(map(len, labels))
    for label, value in zip(labels, info.values(), strict=True):
        print(f"{label + ':':<{width + 1}}  {value}")
    return 0
