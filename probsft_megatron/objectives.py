"""Probability-based SFT objectives of "Beyond Log Likelihood" (Li et al., 2025).

An objective is a per-token loss ``f(p)``, ``p = exp(-ce)``, with gradient weight ``w(p) =
-f'(p) * p`` on the NLL gradient: an elementwise map of the CE, exact under any CE backend.
Spellings, thresholds (absolute or ``K<k>`` percentiles) and formulas: docs/objectives.md."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from probsft_megatron.errors import ConfigError

# floor on 1 - p for log(1 - p): below it the loss continues linearly in ce (finite gradient)
UNLIKELIHOOD_EPS = 1e-6
# ce at which 1 - p == eps, and the capped weight p / (1 - p) there.
_UNLIKELIHOOD_CE0 = -math.log1p(-UNLIKELIHOOD_EPS)
_UNLIKELIHOOD_WMAX = (1.0 - UNLIKELIHOOD_EPS) / UNLIKELIHOOD_EPS

_VALID_FORMS = (
    "original (aliases nll, logp), p (alias dft), GeneralFamily-<a> with finite a >= 0 "
    "(alias convexity-<a>), OnlyTopP-<q>, OnlyTopLogP-<q>, UnlikehoodTop-<q> with 0 <= q < 1, "
    "OnlyBottomP-<q>, OnlyBottomLogP-<q>, UnlikehoodBottom-<q> with 0 < q <= 1; "
    "any threshold may be K<k>, the k-th percentile (0..100) of the batch's token p, "
    "e.g. OnlyTopP-K20; dict form {name: GeneralFamily, a: 8}, {name: OnlyTopP, q: 0.5} "
    "or {name: OnlyTopP, percentile: 20}"
)

# lower-cased spelling -> family, for names without a parameter
_PLAIN = {"original": "nll", "nll": "nll", "logp": "nll", "p": "p", "dft": "p"}
# canonical prefix of a name with a parameter -> (family, side)
_PARAMETRIC_FORMS = {
    "GeneralFamily": ("general", None),
    "OnlyTopP": ("p_thr", "top"),
    "OnlyBottomP": ("p_thr", "bottom"),
    "OnlyTopLogP": ("logp_thr", "top"),
    "OnlyBottomLogP": ("logp_thr", "bottom"),
    "UnlikehoodTop": ("unlikelihood_thr", "top"),
    "UnlikehoodBottom": ("unlikelihood_thr", "bottom"),
}
# lower-cased spelling -> canonical prefix
_PARAMETRIC = {prefix.lower(): prefix for prefix in _PARAMETRIC_FORMS} | {
    "convexity": "GeneralFamily",
    "unlikelihoodtop": "UnlikehoodTop",
    "unlikelihoodbottom": "UnlikehoodBottom",
}
_NAME_ARG = re.compile(r"^([A-Za-z_]+)-(.+)$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


class ObjectiveError(ConfigError):
    """An objective spec that cannot be parsed or is out of range; lists the valid forms."""

    def __init__(self, what: str):
        super().__init__(f"{what}; valid objectives: {_VALID_FORMS}")


def _fmt(x: float) -> str:
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


# family -> (a of f(p) = (1 - p^a) / a, a = 0 meaning -log p, None the unlikelihood; f, w as text)
_FAMILIES = {
    "nll": (0.0, "-log p", "1"),
    "logp_thr": (0.0, "-log p", "1"),
    "p": (1.0, "1 - p", "p"),
    "p_thr": (1.0, "1 - p", "p"),
    "unlikelihood_thr": (
        None,
        f"log(1 - p), continued linearly in ce once 1 - p < {_fmt(UNLIKELIHOOD_EPS)}",
        f"p / (1 - p), capped at {_fmt(_UNLIKELIHOOD_WMAX)}",
    ),
}


def working_ce(ce: Tensor) -> Tensor:
    """``ce`` in at least float32 (half-precision ``ce`` loses p near 1)."""
    return ce.float() if ce.dtype in (torch.float16, torch.bfloat16) else ce


class _WeightedLoss(torch.autograd.Function):
    """``f(p)`` of an objective whose backward is ``grad * w(p)``."""

    @staticmethod
    def forward(ctx, ce: Tensor, objective: Objective) -> Tensor:
        work = working_ce(ce)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(objective.weight_from_ce(work))
        ctx.ce_dtype = ce.dtype
        return objective._loss_values(work)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (weight,) = ctx.saved_tensors
        return (grad * weight).to(ctx.ce_dtype), None


@dataclass(frozen=True)
class Threshold:
    """Which tokens a thresholded objective keeps: an absolute ``q`` or a percentile ``K``
    (resolved per batch); ``side`` "top" keeps ``p >= q``, "bottom" ``p <= q``."""

    value: float
    percentile: bool
    side: str


@dataclass(frozen=True)
class Objective:
    """A per-token SFT objective ``f(p)`` (:func:`parse_objective`); ``name`` is canonical."""

    name: str
    family: str
    a: float | None = None
    threshold: Threshold | None = None

    @property
    def thresholded(self) -> bool:
        return self.threshold is not None

    @property
    def needs_percentile(self) -> bool:
        return self.threshold is not None and self.threshold.percentile

    @property
    def _power(self) -> float | None:
        """``a`` of ``f(p) = (1 - p^a) / a`` (0: ``-log p``); None for the unlikelihood."""
        return self.a if self.family == "general" else _FAMILIES[self.family][0]

    def loss_from_ce(self, ce: Tensor) -> Tensor:
        """Elementwise ``f(p)`` (no threshold), whose backward is exactly ``w(p)`` (autograd
        through ``expm1`` would round it for tiny p); half precision is computed in float32."""
        return working_ce(ce).clone() if self._power == 0 else _WeightedLoss.apply(ce, self)

    def _loss_values(self, ce: Tensor) -> Tensor:
        """``f(p)`` without autograd, for ``ce`` already in the working dtype."""
        if self._power is not None:
            return -torch.expm1(-self._power * ce) / self._power
        # log(1 - p) while 1 - p >= eps; below, the tangent line in ce at 1 - p = eps
        log_part = torch.log(-torch.expm1(-ce.clamp(min=_UNLIKELIHOOD_CE0)))
        return log_part + _UNLIKELIHOOD_WMAX * (ce - _UNLIKELIHOOD_CE0).clamp(max=0.0)

    def weight_from_ce(self, ce: Tensor) -> Tensor:
        """Elementwise ``w(p) = -f'(p) * p`` (the factor on the NLL gradient), without grad."""
        with torch.no_grad():
            ce, a = working_ce(ce), self._power
            if a is None:  # p / (1 - p) = 1 / expm1(ce), capped where 1 - p = eps
                return 1.0 / torch.expm1(ce.clamp(min=_UNLIKELIHOOD_CE0))
            return torch.ones_like(ce) if a == 0 else torch.exp(-a * ce)

    def keep_mask(self, ce: Tensor, q: float | None = None) -> Tensor:
        """Bool mask of the tokens trained on, comparing ``p`` with ``q`` like the seed;
        ``q`` defaults to the absolute threshold (a percentile needs it; NaN keeps nothing)."""
        if self.threshold is None:
            return torch.ones_like(ce, dtype=torch.bool)
        if q is None:
            if self.threshold.percentile:
                raise ValueError(
                    f"objective {self.name} has a percentile threshold: pass q, the resolved "
                    "probability from resolve_percentile(), to keep_mask()"
                )
            q = self.threshold.value
        p = torch.exp(-working_ce(ce))
        return p >= q if self.threshold.side == "top" else p <= q

    def describe(self) -> dict:
        if self.family == "general" and self.a:
            s = _fmt(self.a)
            f, w = f"(1 - p^{s}) / {s}", f"p^{s}"
        else:
            f, w = _FAMILIES["nll" if self.family == "general" else self.family][1:]
        info = {"name": self.name, "f": f, "w": w, "mask": "all response tokens"}
        t = self.threshold
        if t is None:
            return info | {
                "normalization": "sum of f(p) over response tokens / number of response tokens "
                "(counted over the whole global batch)"
            }
        q = _fmt(t.value)
        if t.percentile:
            q = f"percentile {q} of p over the batch's response tokens (all data-parallel ranks)"
        return info | {
            "mask": f"response tokens with p {'>=' if t.side == 'top' else '<='} q, q = {q}",
            "normalization": "sum of f(p) over kept tokens / number of kept tokens over the "
            "whole global batch (the seed's default; the count is clamped at 1, so an empty "
            "keep set gives loss 0)",
        }


def _number(text: str, spec: str) -> float:
    if not _NUMBER.match(text):
        raise ObjectiveError(f"objective {spec!r}: {text!r} is not a number")
    return float(text)


def _parse_string(spec: str) -> Objective:
    text = spec.strip()
    family = _PLAIN.get(text.lower())
    if family is not None:
        return Objective(name="original" if family == "nll" else "p", family=family)
    m = _NAME_ARG.match(text)
    if m is None or m.group(1).lower() not in _PARAMETRIC:
        if text.lower() in _PARAMETRIC:
            raise ObjectiveError(f"objective {spec!r} needs a parameter, e.g. {text}-0.5")
        raise ObjectiveError(f"unknown objective {spec!r}")
    prefix = _PARAMETRIC[m.group(1).lower()]
    family, side = _PARAMETRIC_FORMS[prefix]
    arg = m.group(2).strip()
    if family == "general":
        a = _number(arg, spec)
        if not math.isfinite(a) or a < 0:
            raise ObjectiveError(
                f"objective {spec!r}: a must be finite and >= 0 (got {arg}); for a < 0 the "
                "weight p^a grows without bound as p -> 0, outside the paper's family, "
                "which starts at NLL (a = 0)"
            )
        return Objective(name=f"GeneralFamily-{_fmt(a)}", family="general", a=a)
    percentile = arg[:1] in ("K", "k")
    value = _number(arg[1:] if percentile else arg, spec)
    if percentile and not 0.0 <= value <= 100.0:
        raise ObjectiveError(
            f"objective {spec!r}: percentile K must be in [0, 100] (got {value:g})"
        )
    top = side == "top"
    if not percentile and not (0.0 <= value < 1.0 if top else 0.0 < value <= 1.0):
        bounds = "0 <= q < 1" if top else "0 < q <= 1"
        raise ObjectiveError(f"objective {spec!r}: {prefix} needs {bounds} (got {value:g})")
    tag = f"K{_fmt(value)}" if percentile else _fmt(value)
    return Objective(
        name=f"{prefix}-{tag}",
        family=family,
        threshold=Threshold(value=value, percentile=percentile, side=side),
    )


def _parse_dict(spec: dict) -> Objective:
    unknown = sorted(set(spec) - {"name", "a", "q", "percentile"})
    if unknown:
        raise ObjectiveError(f"objective {spec!r}: unknown key(s) {', '.join(map(str, unknown))}")
    name = spec.get("name")
    if not isinstance(name, str):
        raise ObjectiveError(f"objective {spec!r}: 'name' (a string) is required")
    params = [k for k in ("a", "q", "percentile") if k in spec]
    if not params:
        return _parse_string(name)
    base = name.strip().lower()
    if len(params) > 1 or base not in _PARAMETRIC:
        raise ObjectiveError(
            f"objective {spec!r}: give the name without a parameter and exactly "
            "one of a (GeneralFamily), q or percentile (thresholds)"
        )
    key = params[0]
    if (key == "a") != (_PARAMETRIC[base] == "GeneralFamily"):
        raise ObjectiveError(f"objective {spec!r}: {name} does not take {key}")
    value = spec[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, str))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise ObjectiveError(f"objective {spec!r}: {key} must be a finite number")
    text = value.strip() if isinstance(value, str) else _fmt(value)
    return _parse_string(f"{name.strip()}-{'K' if key == 'percentile' else ''}{text}")


def parse_objective(spec: str | dict | Objective) -> Objective:
    """Parse a seed name (``"OnlyTopP-K20"``), alias or dict spec; else :class:`ObjectiveError`."""
    if isinstance(spec, Objective):
        if _parse_string(spec.name) != spec:
            raise ObjectiveError(f"objective {spec!r} is inconsistent with its name {spec.name!r}")
        return spec
    if isinstance(spec, str):
        return _parse_string(spec)
    if isinstance(spec, dict):
        return _parse_dict(spec)
    raise ObjectiveError(f"objective must be a name or a mapping, got {type(spec).__name__}")


def resolve_percentile(p: Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of 1-D ``p`` (linear interpolation, float64; NaN if empty).

    A full sort: ``torch.quantile`` has a size limit, ``kthvalue`` is slow on sorted CPU input."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if p.dim() != 1:
        raise ValueError(f"resolve_percentile expects a 1-D tensor, got shape {tuple(p.shape)}")
    n = p.numel()
    if n == 0:
        return float("nan")
    pos = percentile / 100.0 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    ordered = torch.sort(p.detach().double()).values
    v_lo, v_hi = ordered[lo].item(), ordered[hi].item()
    return v_lo + (v_hi - v_lo) * (pos - lo)


def list_objectives() -> list[dict]:
    """One entry per spelling form: ``form``, ``f``, ``w``, ``mask``, ``example``, ``aliases``."""
    general = ("GeneralFamily-<a>", "(1 - p^a) / a  (a = 0: -log p)", "p^a")
    rows = [
        ("original", *_FAMILIES["nll"][1:], "all", "original", ["nll", "logp"]),
        ("p", *_FAMILIES["p"][1:], "all", "p", ["dft"]),
        (*general, "all", "GeneralFamily-8", ["convexity-<a>"]),
    ]
    for prefix, (family, side) in list(_PARAMETRIC_FORMS.items())[1:]:
        aliases = [f"{prefix}-K<k>"]
        if family == "unlikelihood_thr":
            aliases.append(prefix.replace("Unlikehood", "Unlikelihood") + "-<q>")
        mask, q = ("p >= q", "0.5") if side == "top" else ("p <= q", "0.9")
        form = (f"{prefix}-<q>", *_FAMILIES[family][1:])
        rows.append((*form, mask, f"{prefix}-{q}", aliases))
    keys = ("form", "f", "w", "mask", "example", "aliases")
    return [dict(zip(keys, row, strict=True)) for row in rows]
