"""Where the shipped configuration is found (recipes, model presets, cluster profiles,
sweeps): first the folders of ``$PROBSFT_CONFIG_PATH``, each laid out like ``configs/``, then
the configs shipped with the package (``probsft_megatron/configs`` in a wheel)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PROBSFT_CONFIG_PATH"
KINDS = ("recipes", "models", "clusters", "sweeps", "sweeps/thresholds")


def packaged_configs() -> Path:
    """The configs shipped with this installation (a wheel's, or a checkout's beside the
    package)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "recipes").is_dir():
            return candidate
    return package / "configs"  # nothing shipped: every lookup reports "not found"


def user_config_dirs() -> list[Path]:
    """The folders of ``$PROBSFT_CONFIG_PATH``, in order (missing entries are skipped)."""
    raw = os.environ.get(ENV_VAR, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def search_dirs(kind: str) -> list[Path]:
    """Folders holding items of ``kind``, highest precedence first (existing ones only)."""
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; one of {', '.join(KINDS)}")
    roots = [*user_config_dirs(), packaged_configs()]
    seen, out = set(), []
    for root in roots:
        folder = (root / kind).resolve()
        if folder.is_dir() and folder not in seen:
            seen.add(folder)
            out.append(folder)
    return out


def find(kind: str, name: str) -> Path | None:
    """``<name>.yaml`` of ``kind`` from the first folder that has it, else None."""
    for folder in search_dirs(kind):
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def names(kind: str, include_private: bool = False) -> list[str]:
    """Every name of ``kind`` (``_``-prefixed bases only with ``include_private``)."""
    found = {p.stem for folder in search_dirs(kind) for p in folder.glob("*.yaml")}
    return sorted(n for n in found if include_private or not n.startswith("_"))


def describe_search(kind: str) -> str:
    """Where ``kind`` was looked for, for error messages."""
    where = [str(d) for d in search_dirs(kind)] or [str(packaged_configs() / kind)]
    return ", ".join(where)
