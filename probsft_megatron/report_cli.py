"""`probsft report PATH... [--out DIR]`: compare the runs of an experiment or sweep; writes
report.json, report.md and PNG figures and prints the comparison table (docs/report.md)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``probsft report``."""
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="experiment/sweep work directory, run folder, eval folder or probe "
        "report (several allowed, e.g. one work directory per seed)",
    )
    p.add_argument(
        "--out", help="output folder (default: PATH/report for one folder, else ./report)"
    )
    p.add_argument(
        "--metric",
        default="avg@n",
        help="per-task number of the table: avg@n (accuracy, default), mean_score, "
        "exact, boxed_rate or pass@K",
    )
    p.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="REPORT",
        help="a probe report (report.json or its folder) to draw with the "
        "objectives' weights; repeatable",
    )
    p.add_argument("--no-figures", action="store_true", help="write report.json and report.md only")


def run(args: argparse.Namespace) -> int:
    """Build the report; print the table and where it went. Returns the exit code."""
    from probsft_megatron.report import build_report, format_tables
    from probsft_megatron.report.markdown import counts_text

    report = build_report(
        args.paths, args.out, metric=args.metric, probes=args.probe, figures=not args.no_figures
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print("\n".join(format_tables(report, heading="")).rstrip())
    print(f"\n{len(report['runs'])} run(s): {counts_text(report['status_counts'])}")
    figures = len(report["figures"])
    print(f"report: {report['out_dir']}/report.md (data: report.json, {figures} figure(s))")
    sys.stdout.flush()
    return 0
