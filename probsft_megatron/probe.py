"""Capability probe: how much prior does the base model have for the training responses?

The probe runs the base model forward-only over (a sample of) the SFT examples, distributed
exactly like training (megatron's pipeline schedule, TP/PP/DP, the same vocab-parallel cross
entropy or fused output layer), and measures the probability ``p = exp(-ce)`` the model gives
every response token. The report holds the token-probability distribution (mean, median,
mean NLL, integer percentiles 0..100, fractions above 0.5 / 0.9, a histogram), a per-example
list, the task's place on the model-capability continuum and the recommended objective.
:func:`resolve_threshold_names` turns percentile objective names (``OnlyTopP-K20``) into the
absolute thresholds of a report, and :func:`resolve_auto_objective` implements
``loss.objective: auto`` for training. Thresholds and their justification: ``docs/probe.md``.

Distributed contract of :func:`probe` (every rank of the job calls it with the same
arguments): each rank tokenizes the same sample; :class:`~probsft_megatron.data.GlobalBatchLoader`
splits it over the DP ranks and micro-batches (padding rows are recorded as nothing); the
last pipeline stage of every DP rank records per-example token CE (identical on all TP
ranks), the DP ranks all-gather it, the last-stage rank with DP rank 0 and TP rank 0 builds
the report and broadcasts it, and every rank returns the same report. Global rank 0 writes
the files.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from probsft_megatron import platform, runtime
from probsft_megatron.fileio import atomic_write, atomic_write_json
from probsft_megatron.errors import CheckpointError, ConfigError, DataError
from probsft_megatron.loss import LossConfig, ObjectiveLoss
from probsft_megatron.model import ModelConfig, ParallelConfig
from probsft_megatron.objectives import parse_objective

FORMAT = "probsft-probe"
FORMAT_VERSION = 1
DEFAULT_SAMPLES = 512
"""Examples probed when no count is given (also what ``loss.objective: auto`` probes)."""
TABLE_PERCENTILES = (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
"""The percentiles printed; the report stores every integer percentile 0..100."""
HISTOGRAM_BINS = 100

STRONG_MEAN_P = 0.65
"""Mean response-token p at or above which a task is model-strong (see docs/probe.md):
the paper's model-strong anchor (Qwen2.5-Math-1.5B on NuminaMath-CoT, median p 0.9936 and
20th percentile 0.586) has mean p >= 0.5 * 0.9936 + 0.3 * 0.586 = 0.673."""
WEAK_MEAN_P = 0.35
"""Mean response-token p below which a task is model-weak: the paper's model-weak anchor
(figlet-font words, near-zero prior on the 2-5 letter word) has mean p <= 1/3 for a word of
two or more tokens even if the end-of-turn token after it were certain."""

RECOMMENDATIONS: dict[str, dict[str, Any]] = {
    "model-strong": {
        "objective": "p",
        "alternatives": ["GeneralFamily-10", "OnlyTopP-K20"],
        "reason": "near the model-strong end prior-leaning objectives (-p, -p^10, thresholded "
                  "variants) consistently outperform NLL",
    },
    "intermediate": {
        "objective": "original",
        "alternatives": ["GeneralFamily-0.5", "p"],
        "reason": "in the intermediate region no single objective prevails; NLL is the "
                  "default, sweep the alternatives to decide",
    },
    "model-weak": {
        "objective": "original",
        "alternatives": [],
        "reason": "toward the model-weak end NLL dominates: prior-leaning objectives give "
                  "tokens the model cannot predict almost no gradient",
    },
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
"""Model precisions. The cross entropy itself is float32 in every case (megatron's
vocab-parallel CE casts the logits), so float64 bounds the error of p by that CE (~5e-7)."""
CHOICE_FILE = "objective_choice.json"
REPORT_FILE = "report.json"
PLOT_FILE = "probe.png"


# -- data --------------------------------------------------------------------------------

@dataclasses.dataclass
class ProbeExamples:
    """The tokenized probe sample: ``dataset`` (an SFTDataset) and, per example, its record
    ``origin`` (None for all when the data config dropped records, which breaks the
    record -> example correspondence; the report's ``data.dropped`` says how many)."""

    dataset: Any
    origins: list[str | None]
    records_available: int
    data_config: Any

    def fingerprint(self) -> str:
        """sha256 of exactly what is measured: every example's tokens and loss mask."""
        h = hashlib.sha256()
        for i in range(len(self.dataset)):
            item = self.dataset[i]
            h.update(item["input_ids"].numpy().astype(np.int64).tobytes())
            h.update(item["loss_mask"].numpy().astype(np.uint8).tobytes())
        return h.hexdigest()


def load_examples(data_cfg, tokenizer, samples: int | None = DEFAULT_SAMPLES) -> ProbeExamples:
    """Tokenize ``samples`` examples of ``data_cfg`` (all of them when ``None``).

    A sample is a seeded random choice (``data_cfg.seed``) of records kept in file order;
    figlet-font items are independent draws, so the first ``samples`` are generated. The
    examples are tokenized and truncated exactly as for training.
    """
    from probsft_megatron.data import SFTDataset, load_records

    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1 (got {samples})")
    cfg = copy.deepcopy(data_cfg)
    if cfg.source == "figfont" and samples is not None:
        cfg.num_samples = min(cfg.num_samples or samples, samples)
    records = load_records(cfg)
    available = len(records)
    if samples is not None and available > samples:
        keep = sorted(random.Random(f"probsft-probe:{cfg.seed}").sample(range(available), samples))
        records = [records[i] for i in keep]
    dataset = SFTDataset(cfg, tokenizer, records=records)
    origins: list[str | None] = ([r["origin"] for r in records] if len(dataset) == len(records)
                                 else [None] * len(dataset))
    return ProbeExamples(dataset, origins, available, cfg)


# -- model identity and cache ------------------------------------------------------------

def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of a Megatron model dir's config and weight metadata (names, sizes, mtimes).

    Cheap for any model size (no weight is read); a re-converted or retrained model changes it.
    """
    root = Path(model_dir)
    cfg_file = root / "model_config.json"
    weights = root / "weights"
    if not cfg_file.is_file() or not (weights / "metadata.json").is_file():
        raise CheckpointError(f"{root} is not a Megatron model dir (needs model_config.json and "
                              "weights/metadata.json); convert it with `probsft convert "
                              "hf-to-megatron`")
    h = hashlib.sha256(cfg_file.read_bytes())
    for f in sorted(p for p in weights.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(weights)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if f.name in ("metadata.json", ".metadata"):
            h.update(f.read_bytes())
    return h.hexdigest()


def probe_key(model_dir: str | os.PathLike, dtype: str, examples: ProbeExamples) -> str:
    """Cache key of a probe: the model's fingerprint, the dtype and the exact tokens."""
    ident = {"format_version": FORMAT_VERSION, "model": model_fingerprint(model_dir),
             "dtype": dtype, "tokens": examples.fingerprint()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    """``<probsft cache>/probe``: one folder per probe key with report.json and probe.png."""
    from probsft_megatron.eval.models import default_cache_dir

    return default_cache_dir() / "probe"


def read_cached(key: str) -> dict | None:
    """The cached report of ``key``, or None."""
    path = cache_dir() / key / REPORT_FILE
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("key") == key else None


# -- measuring -----------------------------------------------------------------------------

class TokenRecorder(ObjectiveLoss):
    """A megatron ``loss_func`` that records each row's response-token CE and trains nothing.

    It stands in for :class:`ObjectiveLoss` in :func:`probsft_megatron.runtime.make_forward_step`,
    so the CE comes from exactly the training path: megatron's vocab-parallel cross entropy
    (``implementation="unfused"``) or the fused output layer (``"fused"``, which calls a
    collecting loss with the full ``[b, s]`` CE). Call it on the last pipeline stage only
    (megatron does); ``rows`` gets one float64 CPU tensor per micro-batch row, in call order.
    """

    def __init__(self, implementation: str = "unfused", chunk_size: int = 4096) -> None:
        super().__init__(LossConfig(objective="original", implementation=implementation,
                                    chunk_size=chunk_size))
        self.rows: list[torch.Tensor] = []

    @property
    def collecting(self) -> bool:
        return True

    def __call__(self, ce: torch.Tensor, loss_mask: torch.Tensor):
        response = loss_mask.to(ce.device) > 0
        detached = ce.detach().to(torch.float64)
        for row in range(ce.shape[0]):
            self.rows.append(detached[row][response[row]].cpu())
        return ce.sum() * 0.0, torch.zeros((), dtype=torch.int), {}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def measure(model_chunks: list, examples: ProbeExamples, *, micro_batch_size: int,
            implementation: str = "unfused", chunk_size: int = 4096) -> dict[int, np.ndarray]:
    """Forward-only pass over every probe example; a collective over the whole job.

    Contract: call on every rank after megatron's groups exist, with this rank's model
    chunks (bare ``GPTModel`` stages or training's DDP-wrapped ones) and the same
    ``examples`` everywhere. The examples are split over the DP ranks and micro-batches of
    ``micro_batch_size`` rows by :class:`~probsft_megatron.data.GlobalBatchLoader` (contiguous
    shares of each global batch, documented order), padded to one sequence length (a multiple
    of 8*TP); megatron's schedule runs them forward-only, so under PP the activations flow
    stage to stage and only the last stage computes the CE. Global rank 0 shows progress
    (tokens/s, ETA) on stderr. Returns ``{example index:
    float64 CE of its response tokens}`` for the examples of this DP rank on last-stage ranks
    (identical on every TP rank), ``{}`` on other stages.
    """
    from megatron.core import parallel_state as ps

    from probsft_megatron import compat
    from probsft_megatron.data import GlobalBatchLoader, epoch_permutation

    dataset = examples.dataset
    n = len(dataset)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    mbs = max(1, min(micro_batch_size, -(-n // dp)))
    per_call = max(1, min(4 * pp, -(-n // (mbs * dp))))
    global_batch = mbs * dp * per_call
    seq_length = _round_up(int(dataset.lengths.max()), 8 * tp)
    seed = examples.data_config.seed
    loader = GlobalBatchLoader(dataset, global_batch_size=global_batch, micro_batch_size=mbs,
                               dp_rank=dp_rank, dp_size=dp, seq_length=seq_length, seed=seed,
                               pad_id=dataset.pad_id, drop_last=False)
    # The loader's documented order: global batch k holds units [k*G, (k+1)*G) of the epoch
    # permutation, DP rank r its contiguous share; rows beyond the examples are padding.
    order = epoch_permutation(n, seed, 0)
    share = global_batch // dp
    recorder = TokenRecorder(implementation, chunk_size)
    forward_step = runtime.make_forward_step(recorder, platform.device())
    run = compat.get_forward_backward_func()
    progress = None
    if dist.get_rank() == 0:
        from tqdm import tqdm

        progress = tqdm(total=int(dataset.lengths.sum()), desc="probe", unit="tok",
                        unit_scale=True, dynamic_ncols=True, file=sys.stderr)
    row_examples: list[int] = []
    for step, micro_batches in enumerate(loader):
        unit = order[step * global_batch:(step + 1) * global_batch]
        mine = unit[dp_rank * share:(dp_rank + 1) * share]
        for row, index in enumerate(mine):
            expected = dataset[index]["input_ids"]
            got = micro_batches[row // mbs].tokens[row % mbs, :len(expected)]
            if not torch.equal(got, expected):
                raise RuntimeError("the global batch loader's row order differs from its "
                                   "documented contract; the probe cannot attribute tokens")
        row_examples += list(mine) + [-1] * (share - len(mine))
        with torch.no_grad():
            run(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                model=model_chunks, num_microbatches=len(micro_batches),
                seq_length=seq_length, micro_batch_size=mbs, forward_only=True)
        if progress is not None:
            progress.update(int(dataset.lengths[unit].sum()))
    if progress is not None:
        progress.close()
    if not runtime.is_last_stage():
        return {}
    if len(recorder.rows) != len(row_examples):
        raise RuntimeError(f"the probe recorded {len(recorder.rows)} rows for "
                           f"{len(row_examples)} scheduled rows")
    return {index: ce.numpy() for index, ce in zip(row_examples, recorder.rows) if index >= 0}


# -- the report ----------------------------------------------------------------------------

def _percentiles(values: np.ndarray, which: Iterable[int]) -> dict[str, float]:
    """Linear-interpolation percentiles (numpy's default, as objectives.resolve_percentile)."""
    which = list(which)
    return {str(k): float(v) for k, v in zip(which, np.percentile(values, which))}


def _num(x: float) -> str:
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"


def place(mean_p: float) -> dict[str, Any]:
    """The task's place on the capability continuum from the mean response-token p."""
    if mean_p >= STRONG_MEAN_P:
        regime, why = "model-strong", f"mean p {_num(mean_p)} >= {STRONG_MEAN_P}"
    elif mean_p < WEAK_MEAN_P:
        regime, why = "model-weak", f"mean p {_num(mean_p)} < {WEAK_MEAN_P}"
    else:
        regime, why = "intermediate", f"{WEAK_MEAN_P} <= mean p {_num(mean_p)} < {STRONG_MEAN_P}"
    return {"regime": regime, "score": "mean_p", "value": mean_p, "reason": why,
            "thresholds": {"model-strong": f"mean_p >= {STRONG_MEAN_P}",
                           "model-weak": f"mean_p < {WEAK_MEAN_P}"}}


def build_report(ce_by_example: dict[int, np.ndarray], examples: ProbeExamples, *,
                 model_dir: str | os.PathLike, model: ModelConfig, dtype: str, key: str,
                 layout: dict[str, int], elapsed_s: float) -> dict[str, Any]:
    """The JSON-serializable report from every example's response-token CE."""
    n = len(examples.dataset)
    missing = sorted(set(range(n)) - set(ce_by_example))
    if missing:
        raise RuntimeError(f"the probe has no result for {len(missing)} example(s), "
                           f"e.g. {missing[0]}")
    ce = np.concatenate([ce_by_example[i] for i in range(n)]) if n else np.zeros(0)
    if ce.size == 0:
        raise DataError("the probe sample has no response tokens; check data.response_key "
                        "and data.max_length")
    p = np.exp(-ce)
    # Every example has at least one response token (SFTDataset drops prompt-only ones).
    per_example = [{"example": i, "origin": examples.origins[i],
                    "tokens": int(ce_by_example[i].size),
                    "mean_p": float(np.exp(-ce_by_example[i]).mean()),
                    "mean_nll": float(ce_by_example[i].mean())} for i in range(n)]
    means = np.array([e["mean_p"] for e in per_example])
    counts, _ = np.histogram(p, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    stats = examples.dataset.stats
    placement = place(float(p.mean()))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "key": key,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": str(Path(model_dir).absolute()), "arch": model.arch,
                  "num_layers": model.num_layers, "hidden_size": model.hidden_size,
                  "num_parameters": model.num_parameters()},
        "data": {"config": dataclasses.asdict(examples.data_config),
                 "records_available": examples.records_available, "examples": n,
                 "truncated": stats["n_truncated"], "dropped": stats["n_dropped"]},
        "dtype": dtype, "layout": layout, "elapsed_s": elapsed_s,
        "tokens": int(p.size),
        "mean_p": float(p.mean()),
        "median_p": float(np.median(p)),
        "mean_nll": float(ce.mean()),
        "frac_p_gt_0.5": float((p > 0.5).mean()),
        "frac_p_gt_0.9": float((p > 0.9).mean()),
        "percentiles": _percentiles(p, range(101)),
        "histogram": {"range": [0.0, 1.0], "bins": HISTOGRAM_BINS, "counts": counts.tolist()},
        "per_example_summary": {
            "mean": float(means.mean()),
            "percentiles": _percentiles(means, (0, 10, 25, 50, 75, 90, 100)),
        },
        "per_example": per_example,
        "placement": placement,
        "recommendation": dict(RECOMMENDATIONS[placement["regime"]]),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a human-readable table."""
    pl, rec = report["placement"], report["recommendation"]
    lay, data = report["layout"], report["data"]
    source = ("figfont" if data["config"]["source"] == "figfont"
              else ", ".join(data["config"]["train_files"]))
    lines = [
        f"model  {report['model']['path']}",
        f"data   {source}: {report['tokens']} response tokens in {data['examples']} examples "
        f"(of {data['records_available']} records)",
        f"run    {report['dtype']}, TP={lay['tp']} PP={lay['pp']} DP={lay['dp']}, "
        f"{report['elapsed_s']:.1f} s, {report['created']}",
        f"  mean p    {_num(report['mean_p'])}    median p  {_num(report['median_p'])}    "
        f"mean NLL  {report['mean_nll']:.4f}",
        f"  p > 0.5   {100 * report['frac_p_gt_0.5']:6.2f}%   p > 0.9   "
        f"{100 * report['frac_p_gt_0.9']:6.2f}%",
        "  percentile   p",
    ]
    lines += [f"  {k:>10}   {report['percentiles'][str(k)]:.6g}" for k in TABLE_PERCENTILES]
    ex = report["per_example_summary"]
    q = ex["percentiles"]
    lines.append(f"  per-example mean p: mean {_num(ex['mean'])}  min {_num(q['0'])}  "
                 f"median {_num(q['50'])}  max {_num(q['100'])}")
    lines.append(f"  placement: {pl['regime']} ({pl['reason']})")
    alts = ", ".join(rec["alternatives"]) or "none"
    lines.append(f"  recommended objective: {rec['objective']}  (alternatives to sweep: {alts})")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG with the histogram of token p and the CDFs of token p and per-example mean p,
    written to a temporary name and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    counts = np.asarray(report["histogram"]["counts"])
    edges = np.linspace(0.0, 1.0, report["histogram"]["bins"] + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(edges[:-1], counts / max(counts.sum(), 1), width=np.diff(edges), align="edge",
             color="tab:blue")
    for value, label, style in ((report["mean_p"], "mean", "--"),
                                (report["median_p"], "median", ":")):
        left.axvline(value, color="k", linestyle=style, label=f"{label} {value:.3f}")
    left.set(xlabel="p of the target token", ylabel="fraction of response tokens",
             title=f"{report['tokens']} response tokens", xlim=(0, 1))
    left.legend()
    pct = np.arange(101)
    right.plot([report["percentiles"][str(k)] for k in pct], pct / 100, label="token p")
    means = sorted(e["mean_p"] for e in report["per_example"])
    right.step(means, np.arange(1, len(means) + 1) / len(means), where="post",
               label="per-example mean p")
    for bound, label in ((WEAK_MEAN_P, "mean-p bounds: weak | strong"), (STRONG_MEAN_P, None)):
        right.axvline(bound, color="grey", linewidth=0.8, label=label)
    right.set(xlabel="p", ylabel="cumulative fraction", xlim=(0, 1), ylim=(0, 1),
              title=f"{report['placement']['regime']} -> {report['recommendation']['objective']}")
    right.legend(loc="upper left")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """``report.json`` and ``probe.png`` into ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_report(report, out / PLOT_FILE)
    atomic_write_json(out / REPORT_FILE, report)
    return out / REPORT_FILE


def load_report(report: dict | str | os.PathLike) -> dict[str, Any]:
    """A report given as a dict, a report.json path or a folder holding one."""
    if isinstance(report, dict):
        return report
    path = Path(report)
    if path.is_dir():
        path = path / REPORT_FILE
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the probe report {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path} is not a JSON probe report") from None
    if data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a probe report (written by `probsft probe`)")
    return data


def resolve_threshold_names(report: dict | str | os.PathLike,
                            names: Iterable[str | dict]) -> dict[str, str]:
    """Map percentile objective names to the absolute thresholds of a probe report.

    ``OnlyTopP-K20`` becomes ``OnlyTopP-<20th percentile of the report's token p>`` (the
    paper's figure-5 runs train with that fixed threshold); names without a percentile come
    back canonical. ``report``: a report dict, a report.json path or its folder. Returns
    ``{name as given: canonical absolute name}`` in input order (dict specs are keyed by
    their canonical name). Percentiles must be integers (the report stores 0..100). A
    percentile equal to 1 (top) or 0 (bottom) is moved just inside the objective's range
    (the float below 1, or the smallest normal float above 0), which keeps the same tokens.
    """
    data = load_report(report)
    out: dict[str, str] = {}
    for spec in names:
        objective = parse_objective(spec)
        label = spec if isinstance(spec, str) else objective.name
        if not objective.needs_percentile:
            out[label] = objective.name
            continue
        k = objective.threshold.value
        if not float(k).is_integer():
            raise ConfigError(f"{label}: a probe report holds integer percentiles 0..100, "
                              f"not {k:g}; use K{round(k)}")
        q = float(data["percentiles"][str(int(k))])
        if objective.threshold.side == "top":
            q = min(q, math.nextafter(1.0, 0.0))
        else:
            q = max(q, sys.float_info.min)  # smallest normal float: CPU runs flush subnormals
        prefix = objective.name.rsplit("-", 1)[0]
        out[label] = parse_objective(f"{prefix}-{q!r}").name
    return out


# -- running it ------------------------------------------------------------------------------

def resolve_dtype(dtype: str) -> str:
    """``auto`` -> bfloat16 with CUDA, float32 on the CPU (training's ``precision: auto``)."""
    if dtype == "auto":
        return "bfloat16" if platform.cuda_available() else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"probe dtype {dtype!r} is invalid; use auto, {', '.join(DTYPES)}")
    return dtype


def _reporter_rank(is_reporter: bool) -> int:
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(is_reporter))
    return flags.index(True)


def _broadcast(obj: Any, src: int) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def run_probe(model_chunks: list, examples: ProbeExamples, *, model_dir: str | os.PathLike,
              model: ModelConfig, dtype: str, key: str, micro_batch_size: int,
              implementation: str = "unfused", chunk_size: int = 4096) -> dict[str, Any]:
    """Measure and report (collective; see the module docstring). Every rank returns the report."""
    from megatron.core import parallel_state as ps

    start = time.perf_counter()
    local = measure(model_chunks, examples, micro_batch_size=micro_batch_size,
                    implementation=implementation, chunk_size=chunk_size)
    last = runtime.is_last_stage()
    merged: dict[int, np.ndarray] = {}
    if last:
        parts: list[Any] = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
        for part in parts:
            merged.update(part)
    reporter = (last and ps.get_data_parallel_rank() == 0
                and ps.get_tensor_model_parallel_rank() == 0)
    src = _reporter_rank(reporter)
    report = None
    if reporter:
        report = build_report(merged, examples, model_dir=model_dir, model=model, dtype=dtype,
                              key=key, layout=_layout(), elapsed_s=time.perf_counter() - start)
    return _broadcast(report, src)


def build_probe_model(model_dir: str | os.PathLike, model: ModelConfig, parallel: ParallelConfig,
                      dtype: str) -> list:
    """This rank's pipeline stage of the model in ``model_dir``, weights loaded (resharded to
    the current TP/PP layout; collective), in eval mode. Returns ``[gpt]``."""
    from probsft_megatron.model import build_gpt_model, transformer_config

    tconfig = transformer_config(model, parallel, params_dtype=DTYPES[dtype])
    gpt = build_gpt_model(model, tconfig).to(platform.device())
    runtime.load_model_weights(gpt, str(Path(model_dir) / "weights"))
    gpt.eval()
    return [gpt]


def _read_model(model_dir: str | os.PathLike) -> ModelConfig:
    from probsft_megatron.train import read_model_dir_config

    return read_model_dir_config(model_dir)


def _default_tokenizer(model_dir: str | os.PathLike) -> str:
    hf = Path(model_dir) / "hf"
    if not hf.is_dir():
        raise ConfigError(f"{model_dir} has no hf/ folder with tokenizer files; pass a tokenizer "
                          "(--tokenizer DIR or 'smollm2')")
    return str(hf)


def probe(model_dir: str | os.PathLike, data_cfg, *, tokenizer: str | None = None,
          samples: int | None = DEFAULT_SAMPLES, parallel: ParallelConfig | None = None,
          micro_batch_size: int = 4, dtype: str = "auto", out_dir: str | os.PathLike | None = None,
          use_cache: bool = True) -> dict[str, Any]:
    """Probe the Megatron model dir ``model_dir`` on ``data_cfg``; returns the report.

    Collective when run under torchrun (every rank calls it with the same arguments; see the
    module docstring); a plain process runs alone. Starts and shuts down megatron's groups
    itself unless they already exist (then ``parallel`` must match them). The report is
    cached under :func:`cache_dir` by :func:`probe_key` (model fingerprint, dtype, exact
    tokens), so the layout does not change it; ``use_cache=False`` measures again and
    replaces the cached entry. With ``out_dir`` global rank 0 also writes report.json and
    probe.png there.
    """
    from megatron.core import parallel_state as ps

    from probsft_megatron.tokenizers import load_tokenizer

    parallel = parallel or ParallelConfig()
    model = _read_model(model_dir)
    dtype = resolve_dtype(dtype)
    if micro_batch_size < 1:
        raise ConfigError(f"micro batch size must be >= 1 (got {micro_batch_size})")
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1 (got {samples})")
    was_active = platform.is_active()
    own = not ps.model_parallel_is_initialized()
    if own:
        runtime.init_distributed(parallel, model=model)
    elif (_layout()["tp"], _layout()["pp"]) != (parallel.tensor_model_parallel_size,
                                                parallel.pipeline_model_parallel_size):
        raise ConfigError(f"the probe was asked for TP={parallel.tensor_model_parallel_size} "
                          f"PP={parallel.pipeline_model_parallel_size} but this job's groups are "
                          f"TP={_layout()['tp']} PP={_layout()['pp']}")
    try:
        tok = load_tokenizer(tokenizer or _default_tokenizer(model_dir))
        examples = load_examples(data_cfg, tok, samples)
        key = probe_key(model_dir, dtype, examples)
        report = _broadcast(read_cached(key) if use_cache and dist.get_rank() == 0 else None, 0)
        if report is None:
            chunks = build_probe_model(model_dir, model, parallel, dtype)
            report = run_probe(chunks, examples, model_dir=model_dir, model=model, dtype=dtype,
                               key=key, micro_batch_size=micro_batch_size)
            del chunks
            if dist.get_rank() == 0:
                write_outputs(report, cache_dir() / key)
        if out_dir is not None and dist.get_rank() == 0:
            write_outputs(report, out_dir)
        dist.barrier()
    finally:
        if own:
            runtime.shutdown()
            if not was_active:
                platform.deactivate()
    return report


# -- loss.objective: auto ------------------------------------------------------------------

def is_auto(objective: Any) -> bool:
    """Whether a ``loss.objective`` value asks for the probe's choice."""
    return isinstance(objective, str) and objective.strip().lower() == "auto"


def resolve_auto_objective(cfg, model_chunks: list | None = None) -> tuple[str, dict[str, Any]]:
    """The objective for ``loss.objective: auto`` and the evidence for it (collective).

    Call on every rank of a training job after megatron's groups exist, before the loss is
    built. The probe measures the base model ``cfg.init.checkpoint`` on ``DEFAULT_SAMPLES``
    examples of ``cfg.data`` in the training precision. The choice comes from, in order:
    ``<output_dir>/objective_choice.json`` of an earlier start of this run with the same
    probe key (a resumed run keeps its objective), the probe cache, or a new measurement
    (cached afterwards). ``model_chunks``: training's freshly loaded (untrained) model, used
    instead of building a second copy; pass None after a resume. Global rank 0 writes
    ``<output_dir>/objective_choice.json`` and the report and plot under
    ``<output_dir>/probe/``. Every rank returns ``(objective name, evidence)``; the evidence
    records ``source``: ``run`` | ``cache`` | ``measured``.
    """
    from probsft_megatron.tokenizers import load_tokenizer

    if cfg.init.checkpoint is None:
        raise ConfigError("loss.objective=auto probes the base model: set init.checkpoint to a "
                          "Megatron model dir (probsft convert hf-to-megatron)")
    model_dir = cfg.init.checkpoint
    dtype = ("bfloat16" if cfg.train.precision == "bf16" or (
        cfg.train.precision == "auto" and platform.cuda_available()) else "float32")
    tokenizer = load_tokenizer(cfg.init.tokenizer or _default_tokenizer(model_dir))
    examples = load_examples(cfg.data, tokenizer, DEFAULT_SAMPLES)
    key = probe_key(model_dir, dtype, examples)
    out_dir = Path(cfg.train.output_dir)
    choice_file = out_dir / CHOICE_FILE
    found: tuple[str, dict | None] = ("measured", None)
    if dist.get_rank() == 0:
        recorded = json.loads(choice_file.read_text()) if choice_file.is_file() else {}
        cached = read_cached(key)
        if recorded.get("key") == key:
            found = ("run", recorded["report"])
        elif cached is not None:
            found = ("cache", cached)
    source, report = _broadcast(found, 0)
    if report is None:
        model = _read_model(model_dir)
        chunks = model_chunks or build_probe_model(model_dir, model, cfg.parallel, dtype)
        report = run_probe(chunks, examples, model_dir=model_dir, model=model, dtype=dtype,
                           key=key, micro_batch_size=cfg.train.micro_batch_size,
                           implementation=cfg.loss.implementation if model_chunks else "unfused",
                           chunk_size=cfg.loss.chunk_size)
        del chunks
    objective = parse_objective(report["recommendation"]["objective"]).name
    evidence = {
        "objective": objective, "source": source, "key": key,
        "cache": str(cache_dir() / key / REPORT_FILE),
        "placement": report["placement"], "recommendation": report["recommendation"],
        "statistics": {k: report[k] for k in ("tokens", "mean_p", "median_p", "mean_nll",
                                              "frac_p_gt_0.5", "frac_p_gt_0.9")},
        "percentiles": {str(k): report["percentiles"][str(k)] for k in TABLE_PERCENTILES},
    }
    if dist.get_rank() == 0:
        if source != "cache":
            write_outputs(report, cache_dir() / key)
        write_outputs(report, out_dir / "probe")
        atomic_write_json(choice_file, dict(evidence, report=report))
        print(f"[probsft] loss.objective=auto -> {objective}: {report['placement']['regime']} "
              f"({report['placement']['reason']}; probe {source}, key {key})", file=sys.stderr)
    dist.barrier()
    return objective, evidence
