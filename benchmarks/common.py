"""Helpers shared by the benchmark scripts: naming the device and writing results atomically."""

from __future__ import annotations

import os
import platform as py_platform
from pathlib import Path
from typing import Any

import torch

from probsft_megatron.fileio import atomic_write_json, atomic_write_text


def cpu_name() -> str:
    """The CPU model and core count."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{py_platform.processor() or 'unknown CPU'} ({os.cpu_count()} cores)"


def device_name() -> str:
    """The GPU's name, or ``CPU: <model> (<n> cores)``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU: {cpu_name()}"


def device_tag() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def write_results(out_dir: str | Path, stem: str, result: dict[str, Any], markdown: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` under ``out_dir``, each via a temporary name."""
    atomic_write_json(Path(out_dir) / f"{stem}.json", result)
    atomic_write_text(Path(out_dir) / f"{stem}.md", markdown + "\n")
