"""Runs report (`probsft report`): the runs of an experiment or sweep side by side.

Not to be confused with the evaluation's own per-run report (``eval/report.py``) or the
probe's (:mod:`probsft_megatron.probe.report`): this package reads many finished, failed or
still running runs and compares them, the way the paper's tables and figures do.

Inputs are folders, recognised by what they hold:

* a work directory of ``probsft launch`` (``WORK/runs/<run>/``, ``WORK/experiments/``): every
  run under ``runs/``, the runs the experiment records name that have not started yet, the
  state of every launched step, and any probe report under ``WORK``;
* a training run folder (``config.json``, ``metrics.jsonl``, ``summary.json``,
  ``checkpoints/``, optionally ``eval/`` and ``probe/``), as ``probsft train`` writes it;
* an evaluation folder written by ``probsft eval --out`` (for instance the base model's):
  a row without training;
* a probe report (``report.json`` of ``probsft probe``, or its folder);
* a folder whose sub-folders are any of the above.

Only files are read (JSON, JSON lines, the launcher's run record and NeMo-Run's end states),
never private functions of the training, probe, eval or launcher code, so a report can be
built on any machine that sees the folders. Runs that differ only by ``train.seed`` (and by
where they were written) form one group, shown as the mean with a 95% Student-t interval over seeds.

Outputs (:func:`build_report`): ``report.json`` (everything as data), ``report.md`` (tables with
the figures embedded) and PNG figures: training curves of every run, score against the
convexity parameter ``a`` and against the threshold for sweeps, and the probe's token-p
distribution with the weight curves ``w(p)`` of the compared objectives.

The modules, in the order data flows through them:

* :mod:`~probsft_megatron.report.files`: reading JSON/JSON lines/YAML, telling run, eval and
  probe folders apart, an eval folder's task metrics;
* :mod:`~probsft_megatron.report.records`: the launcher's run record of each experiment,
  its steps' states, a failed step's error;
* :mod:`~probsft_megatron.report.runs`: one run (objective, model, data, training, status);
* :mod:`~probsft_megatron.report.collect`: the runs and probes under the given paths;
* :mod:`~probsft_megatron.report.stats`: the Student-t interval over seeds;
* :mod:`~probsft_megatron.report.tables`: seed groups and the comparison tables as data;
* :mod:`~probsft_megatron.report.figures`: the PNG figures (matplotlib, optional);
* :mod:`~probsft_megatron.report.markdown`: ``report.md`` and the printed tables;
* :mod:`~probsft_megatron.report.build`: :func:`build_report`, the output folder's checks
  and the writing.
"""

from __future__ import annotations

from probsft_megatron.report.build import (
    FORMAT,
    FORMAT_VERSION,
    REPORT_DIR,
    build_report,
    check_out_dir,
    default_out_dir,
)
from probsft_megatron.report.collect import Collection, collect
from probsft_megatron.report.figures import plot_curves, plot_probe, plot_sweep, weight_curve
from probsft_megatron.report.files import PROBE_FORMAT, read_eval
from probsft_megatron.report.markdown import format_tables, render_markdown
from probsft_megatron.report.records import StepOutcome, read_experiment_records
from probsft_megatron.report.runs import (
    STATUSES,
    TAIL,
    dataset_name,
    model_name,
    objective_info,
    read_eval_only,
    read_run,
)
from probsft_megatron.report.stats import summarize_values, t_quantile
from probsft_megatron.report.tables import METRICS, build_tables, group_runs

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METRICS",
    "PROBE_FORMAT",
    "REPORT_DIR",
    "STATUSES",
    "TAIL",
    "Collection",
    "StepOutcome",
    "build_report",
    "build_tables",
    "check_out_dir",
    "collect",
    "dataset_name",
    "default_out_dir",
    "format_tables",
    "group_runs",
    "model_name",
    "objective_info",
    "plot_curves",
    "plot_probe",
    "plot_sweep",
    "read_eval",
    "read_eval_only",
    "read_experiment_records",
    "read_run",
    "render_markdown",
    "summarize_values",
    "t_quantile",
    "weight_curve",
]
