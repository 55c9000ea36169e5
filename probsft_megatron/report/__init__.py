"""Runs report (``probsft report``): the runs of an experiment or sweep side by side, read
from their folders' files only (docs/report.md). Data flows ``files`` -> ``records`` ->
``runs`` -> ``collect`` -> ``tables`` -> ``figures`` / ``markdown`` -> ``build``."""

from __future__ import annotations

from probsft_megatron.report.build import FORMAT, build_report, default_out_dir
from probsft_megatron.report.collect import collect
from probsft_megatron.report.figures import weight_curve
from probsft_megatron.report.markdown import format_tables
from probsft_megatron.report.runs import read_run
from probsft_megatron.report.tables import summarize_values, t_quantile

__all__ = [
    "FORMAT",
    "build_report",
    "collect",
    "default_out_dir",
    "format_tables",
    "read_run",
    "summarize_values",
    "t_quantile",
    "weight_curve",
]
