"""The paper's ablations as sweeps (``configs/sweeps``): every objective on every (dataset, model)
setting, or a combination of sweeps. Percentile objectives (``OnlyTopP-K20``) keep the percentile
in their run's name and train with the threshold of a probe report or a threshold table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from probsft_megatron import resources
from probsft_megatron.config import read_yaml_mapping
from probsft_megatron.errors import ConfigError
from probsft_megatron.launchers.experiment import RunRequest
from probsft_megatron.objectives import parse_objective


@dataclass(frozen=True)
class Setting:
    """A (dataset, model) pair of a sweep, with training overrides of its own."""

    dataset: str
    model: str
    overrides: tuple[str, ...] = ()


@dataclass
class Sweep:
    """A loaded sweep: every objective on every setting."""

    name: str
    description: str
    settings: list[Setting]
    objectives: list[str]
    thresholds: str | None = None


@dataclass
class ThresholdTable:
    """Absolute thresholds by percentile, measured for one (model, dataset)."""

    source: str
    model: str | None
    dataset: str | None
    percentiles: dict[float, float]

    def resolve(self, name: str) -> str:
        """``OnlyTopP-K20`` -> ``OnlyTopP-<the 20th percentile>`` (canonical spelling)."""
        objective = parse_objective(name)
        k = objective.threshold.value
        if k not in self.percentiles:
            known = ", ".join(f"{p:g}" for p in sorted(self.percentiles))
            raise ConfigError(
                f"threshold table {self.source} has no {k:g}th percentile (for "
                f"{name}); it lists {known}"
            )
        prefix = objective.name.rsplit("-", 1)[0]
        return parse_objective(f"{prefix}-{self.percentiles[k]!r}").name


def _find(ref: str, kind: str, what: str) -> Path:
    path = Path(ref) if Path(ref).is_file() else resources.find(kind, ref) or Path(ref)
    if not path.is_file():
        names = ", ".join(resources.names(kind))
        raise ConfigError(f"{what} {ref!r} not found (a file, or one of: {names})")
    return path


def load_sweep(ref: str, _seen: tuple[str, ...] = ()) -> list[Sweep]:
    """The sweep(s) of a file or name; a combining file returns each part in order."""
    path = _find(ref, "sweeps", "sweep")
    if path.stem in _seen:
        raise ConfigError(f"sweep {path.stem} includes itself")
    data = read_yaml_mapping(path, "a sweep")
    allowed = {"description", "settings", "objectives", "thresholds", "sweeps"}
    if unknown := sorted(set(data) - allowed):
        raise ConfigError(
            f"sweep {path}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(allowed))}"
        )
    if "sweeps" in data:
        return [s for part in data["sweeps"] for s in load_sweep(str(part), _seen + (path.stem,))]
    settings = []
    for item in data.get("settings") or []:
        if not isinstance(item, dict) or set(item) - {"set"} != {"dataset", "model"}:
            raise ConfigError(
                f"sweep {path}: each setting needs dataset and model (and "
                f"optionally set: [key=value, ...]); got {item!r}"
            )
        overrides = tuple(str(o) for o in item.get("set") or [])
        settings.append(Setting(str(item["dataset"]), str(item["model"]), overrides))
    objectives = [str(o) for o in data.get("objectives") or []]
    if not settings or not objectives:
        raise ConfigError(f"sweep {path} needs at least one setting and one objective")
    description = str(data.get("description", ""))
    return [Sweep(path.stem, description, settings, objectives, data.get("thresholds"))]


def load_threshold_table(ref: str) -> ThresholdTable:
    """A table of absolute thresholds by percentile (file or name under thresholds/)."""
    path = _find(ref, "sweeps/thresholds", "threshold table")
    data = read_yaml_mapping(path, "a threshold table")
    table = data.get("percentiles")
    if not isinstance(table, dict) or not table:
        raise ConfigError(
            f"threshold table {path}: 'percentiles' must map percentiles "
            "(0-100) to absolute probabilities"
        )
    percentiles = {}
    for k, q in table.items():
        numbers = isinstance(k, (int, float)) and isinstance(q, (int, float))
        if not (numbers and 0 <= k <= 100 and 0 <= q <= 1):  # NaN fails the comparisons
            raise ConfigError(
                f"threshold table {path}: entry {k!r}: {q!r} must be a "
                "percentile in [0, 100] mapped to a probability in [0, 1]"
            )
        percentiles[float(k)] = float(q)
    return ThresholdTable(str(path), data.get("model"), data.get("dataset"), percentiles)


def expand_sweep(
    ref: str,
    *,
    dataset: str | None = None,
    model: str | None = None,
    only: list[str] | None = None,
    thresholds: str | None = None,
    probe_report: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[list[RunRequest], list[str]]:
    """The runs of a sweep and notes on its thresholds; ``dataset``/``model`` replace every
    setting's, ``only`` keeps these labels, ``overrides`` follow each setting's own."""
    requests: list[RunRequest] = []
    notes: list[str] = []
    wanted = {parse_objective(o).name.lower() for o in only or []}
    seen_labels: set[str] = set()
    for sweep in load_sweep(ref):
        labels = [parse_objective(o).name for o in sweep.objectives]
        seen_labels.update(label.lower() for label in labels)
        labels = [label for label in labels if not wanted or label.lower() in wanted]
        percentile_names = [label for label in labels if parse_objective(label).needs_percentile]
        pairs = ((dataset or s.dataset, model or s.model, s.overrides) for s in sweep.settings)
        settings = [Setting(*p) for p in dict.fromkeys(pairs)]
        resolved: dict[str, str] = {}
        if percentile_names and probe_report:  # canonical absolute names, from the probe
            from probsft_megatron.probe import resolve_threshold_names

            resolved = resolve_threshold_names(probe_report, percentile_names)
            notes.append(f"percentile thresholds from the probe report {probe_report}")
        elif percentile_names:
            table_ref = thresholds or sweep.thresholds
            if table_ref is None:
                raise ConfigError(
                    f"sweep {sweep.name} names percentile thresholds; pass "
                    "--probe-report REPORT or --thresholds TABLE"
                )
            table = load_threshold_table(table_ref)
            resolved = {name: table.resolve(name) for name in percentile_names}
            notes.append(
                f"percentile thresholds from {table.source} "
                f"(measured for {table.model} on {table.dataset})"
            )
            notes += [
                f"the thresholds were measured for {table.model} on {table.dataset}, not "
                f"{s.model} on {s.dataset}; measure them with `probsft probe` and pass "
                "--probe-report"
                for s in settings
                if (s.model, s.dataset) != (table.model, table.dataset)
            ]
        requests += [
            RunRequest(
                s.dataset, s.model, resolved.get(label, label), label, [*s.overrides, *overrides]
            )
            for s in settings
            for label in labels
        ]
    if unknown := sorted(wanted - seen_labels):
        raise ConfigError(f"--only {unknown[0]} is not an objective of sweep {ref}")
    if not requests:
        raise ConfigError(f"sweep {ref} has no runs left after --only")
    return requests, notes
