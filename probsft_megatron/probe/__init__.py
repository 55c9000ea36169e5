"""Capability probe: the base model's probability ``p = exp(-ce)`` of every response token,
measured forward-only and distributed like training; the report places the task on the
model-capability continuum and recommends an objective (docs/probe.md)."""

from probsft_megatron.probe.auto import CHOICE_FILE, resolve_auto_objective
from probsft_megatron.probe.examples import DEFAULT_SAMPLES, cache_dir, load_examples, probe_key
from probsft_megatron.probe.measure import probe
from probsft_megatron.probe.report import (
    FORMAT,
    PLOT_FILE,
    RECOMMENDATIONS,
    REPORT_FILE,
    STRONG_MEAN_P,
    WEAK_MEAN_P,
    format_table,
    place,
    resolve_threshold_names,
)

__all__ = [
    "CHOICE_FILE",
    "DEFAULT_SAMPLES",
    "FORMAT",
    "PLOT_FILE",
    "RECOMMENDATIONS",
    "REPORT_FILE",
    "STRONG_MEAN_P",
    "WEAK_MEAN_P",
    "cache_dir",
    "format_table",
    "load_examples",
    "place",
    "probe",
    "probe_key",
    "resolve_auto_objective",
    "resolve_threshold_names",
]
