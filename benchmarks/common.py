"""Helpers shared by the benchmark scripts: naming the device and writing results atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def device_name() -> str:
    """The GPU's name, or the CPU model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def device_tag() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def write_results(out_dir: str | Path, stem: str, result: dict[str, Any], markdown: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` under ``out_dir``, each via a temporary name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", markdown + "\n")):
        path = out / f"{stem}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
