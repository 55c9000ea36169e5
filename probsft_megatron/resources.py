"""Where shipped configuration is found: ``$PROBSFT_CONFIG_PATH``'s folders (laid out like
``configs/``), then the package's own configs."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PROBSFT_CONFIG_PATH"
KINDS = ("recipes", "models", "clusters", "sweeps", "sweeps/thresholds")


def packaged_configs() -> Path:
    """The configs shipped with this installation (a wheel's, or a checkout's beside the
    package); without any, ``probsft_megatron/configs``, where every lookup finds nothing."""
    package = Path(__file__).resolve().parent
    candidates = (package / "configs", package.parent / "configs")
    return next((c for c in candidates if (c / "recipes").is_dir()), package / "configs")


def search_dirs(kind: str) -> list[Path]:
    """The existing folders of ``kind``, highest precedence first (``$PROBSFT_CONFIG_PATH``'s
    entries in order, blank ones skipped, then the shipped configs)."""
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; one of {', '.join(KINDS)}")
    user = os.environ.get(ENV_VAR, "").split(os.pathsep)
    roots = [*(Path(p).expanduser() for p in user if p.strip()), packaged_configs()]
    folders = ((root / kind).resolve() for root in roots)
    return list(dict.fromkeys(f for f in folders if f.is_dir()))


def find(kind: str, name: str) -> Path | None:
    """``<name>.yaml`` of ``kind`` from the first folder that has it, else None."""
    paths = (folder / f"{name}.yaml" for folder in search_dirs(kind))
    return next((p for p in paths if p.is_file()), None)


def names(kind: str) -> list[str]:
    """Every name of ``kind`` but the ``_``-prefixed bases."""
    found = {p.stem for folder in search_dirs(kind) for p in folder.glob("*.yaml")}
    return sorted(n for n in found if not n.startswith("_"))


def describe_search(kind: str) -> str:
    """Where ``kind`` was looked for, for error messages."""
    return ", ".join(str(d) for d in search_dirs(kind) or [packaged_configs() / kind])
