"""Capability probe: how much prior does the base model have for the training responses?

The probe runs the base model forward-only over (a sample of) the SFT examples, distributed
exactly like training (megatron's pipeline schedule, TP/PP/DP, the same vocab-parallel cross
entropy or fused output layer), and measures the probability ``p = exp(-ce)`` the model gives
every response token. The report holds the token-probability distribution, a per-example
list, the task's place on the model-capability continuum and the recommended objective.

One module per concern:

* :mod:`.examples`: the sample (:func:`load_examples`), its identity (:func:`probe_key`) and
  the report cache (:func:`cache_dir`, :func:`read_cached`);
* :mod:`.measure`: the distributed measurement and the :func:`probe` job;
* :mod:`.report`: statistics, placement, the table and plot, report files, and
  :func:`resolve_threshold_names` (percentile objective names -> absolute thresholds);
* :mod:`.auto`: ``loss.objective: auto`` for training (:func:`resolve_auto_objective`).

Thresholds and their justification: ``docs/probe.md``.
"""

from probsft_megatron.probe.auto import CHOICE_FILE, resolve_auto_objective
from probsft_megatron.probe.examples import (
    DEFAULT_SAMPLES,
    ProbeExamples,
    cache_dir,
    load_examples,
    model_fingerprint,
    probe_key,
    read_cached,
)
from probsft_megatron.probe.measure import (
    DTYPES,
    build_probe_model,
    measure,
    probe,
    resolve_dtype,
    run_probe,
)
from probsft_megatron.probe.report import (
    FORMAT,
    FORMAT_VERSION,
    HISTOGRAM_BINS,
    PLOT_FILE,
    RECOMMENDATIONS,
    REPORT_FILE,
    STRONG_MEAN_P,
    TABLE_PERCENTILES,
    WEAK_MEAN_P,
    build_probe_report,
    format_table,
    load_report,
    place,
    plot_report,
    resolve_threshold_names,
    write_outputs,
)

__all__ = [
    "CHOICE_FILE",
    "DEFAULT_SAMPLES",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "HISTOGRAM_BINS",
    "PLOT_FILE",
    "RECOMMENDATIONS",
    "REPORT_FILE",
    "STRONG_MEAN_P",
    "TABLE_PERCENTILES",
    "WEAK_MEAN_P",
    "ProbeExamples",
    "build_probe_model",
    "build_probe_report",
    "cache_dir",
    "format_table",
    "load_examples",
    "load_report",
    "measure",
    "model_fingerprint",
    "place",
    "plot_report",
    "probe",
    "probe_key",
    "read_cached",
    "resolve_auto_objective",
    "resolve_dtype",
    "resolve_threshold_names",
    "run_probe",
    "write_outputs",
]
