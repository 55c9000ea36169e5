"""A LoRA checkpoint out to Hugging Face: a PEFT adapter folder, or merged full weights. The base
(``init.checkpoint`` or ``--base``, fingerprint-checked) and the adapters load into one TP=1
model; ``linear_qkv``'s ``B`` splits into q/k/v and ``linear_fc1``'s into gate/up, sharing ``A``
(exact: ``B_q A x`` is the q rows of ``B A x``). ``--merge`` writes ``W + (alpha/r) B A``
through :func:`~.api.megatron_to_hf` from a merged model dir in a temporary folder by ``--out``."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from probsft_megatron import lora, manifest, model_dir
from probsft_megatron.config import PeftConfig
from probsft_megatron.converters import api, mapping, megatron_io
from probsft_megatron.errors import CheckpointError, ConfigError
from probsft_megatron.fileio import atomic_write_json
from probsft_megatron.input_checks import check_model_dir

log = logging.getLogger(__name__)

HF_MODULES = {  # Megatron linear -> (HF parent module, the HF linears it holds, B's split)
    "linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj"), mapping.qkv_views),
    "linear_proj": ("self_attn", ("o_proj",), None),
    "linear_fc1": ("mlp", ("gate_proj", "up_proj"), mapping.fc1_views),
    "linear_fc2": ("mlp", ("down_proj",), None),
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_record(ckpt_dir: str | os.PathLike) -> dict | None:
    """A LoRA checkpoint's ``peft.json`` (settings, base fingerprint); None for full weights."""
    path = Path(ckpt_dir) / lora.FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def base_model_dir(ckpt_dir: str | os.PathLike, base: str | os.PathLike | None) -> Path:
    """The model dir a LoRA checkpoint adapts (``base``, else the run's ``init.checkpoint``),
    refused in one line when its fingerprint is not the one recorded."""
    ckpt_dir = Path(ckpt_dir)
    record = peft_record(ckpt_dir) or {}
    state = ckpt_dir / "train_state.json"
    if not state.is_file():
        raise CheckpointError(f"{ckpt_dir} has no train_state.json; point --ckpt to a step_NNNNNNN")
    cfg = json.loads(state.read_text())["config"]
    chosen = base if base is not None else cfg["init"]["checkpoint"]
    if chosen is None:
        raise CheckpointError(
            f"{ckpt_dir} adapts a randomly initialized base, which no file holds; "
            "train the adapters on a converted base model (init.checkpoint) to export them"
        )
    check_model_dir(chosen, "--base", training_checkpoint_ok=False)
    random_init = (
        cfg["train"]["seed"],
        cfg["parallel"]["tensor_model_parallel_size"],
        cfg["parallel"]["pipeline_model_parallel_size"],
    )
    got = lora.base_fingerprint(chosen, cfg["model"], random_init=random_init)
    if got != record.get("base_fingerprint"):
        raise CheckpointError(
            f"{chosen} is not the base model the adapters of {ckpt_dir} were trained on "
            "(fingerprints differ); pass that run's init.checkpoint as --base"
        )
    return Path(chosen)


def load_lora_model(ckpt_dir: str | os.PathLike, base_dir: str | os.PathLike, peft: PeftConfig):
    """The TP=1/PP=1 float32 model with the base's weights and the checkpoint's adapters
    (inside :func:`megatron_io.single_process_group`)."""
    from probsft_megatron import compat

    md = model_dir.read_model_dir(base_dir)
    gpt = megatron_io.build_model(md.model, torch.float32, peft)
    lora.load_base_weights(gpt, str(md.weights))
    adapters = lora.adapter_sharded_state_dict(gpt.sharded_state_dict())
    weights = str(Path(ckpt_dir) / model_dir.WEIGHTS_DIR)
    lora.load_adapter_state(gpt, compat.dist_load(adapters, weights))
    return gpt, md


def adapter_tensors(gpt, model) -> dict[str, torch.Tensor]:
    """The model's adapters under Hugging Face PEFT's names (q/k/v and gate/up split)."""
    out = {}
    for number, target, module in lora.adapter_modules(gpt):
        parent, names, split = HF_MODULES[target]
        a, b = module.lora_A.detach(), module.lora_B.detach()
        r = a.shape[0]
        parts = split(b, model) if split else (b,)
        prefix = f"base_model.model.model.layers.{number - 1}.{parent}."
        for name, part in zip(names, parts):
            out[f"{prefix}{name}.lora_A.weight"] = a.clone().contiguous()
            out[f"{prefix}{name}.lora_B.weight"] = part.reshape(-1, r).clone().contiguous()
    return out


def adapter_config(record: dict, base: Path) -> dict:
    """``adapter_config.json`` for PEFT (plain LoRA: ``alpha / r`` scaling, no bias)."""
    targets = [n for t in record["target_modules"] for n in HF_MODULES[t][1]]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base / model_dir.HF_DIR),
        "r": int(record["rank"]),
        "lora_alpha": float(record["alpha"]),
        "lora_dropout": float(record["dropout"]),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def export(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    merge: bool = False,
    base: str | os.PathLike | None = None,
    hf_template: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = api.DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Export a LoRA checkpoint as a PEFT adapter folder, or with ``merge`` as full HF weights;
    returns ``out_dir``. A checkpoint of full weights is refused (nothing to merge)."""
    check_model_dir(ckpt_dir, "--ckpt")
    record = peft_record(ckpt_dir)
    if record is None:
        raise ConfigError(
            f"{'--merge' if merge else '--base'} needs a LoRA checkpoint, but {ckpt_dir} holds "
            f"full weights (no {lora.FINGERPRINT_FILE}); export it without --merge and --base"
        )
    base_dir = base_model_dir(ckpt_dir, base)
    replace = manifest.check_output(
        out_dir,
        flag="--out",
        inputs=[("--ckpt", ckpt_dir), ("--base", base_dir), ("--hf-template", hf_template)],
        kind=manifest.HF_EXPORT,
        overwrite=overwrite,
    )
    settings = ("rank", "alpha", "dropout", "target_modules")
    peft = PeftConfig(method="lora", **{k: record[k] for k in settings})
    start = time.perf_counter()
    if not merge:
        out_dtype = api._dtype(dtype) or torch.float32
        with model_dir.staged(out_dir, overwrite=replace) as staging:
            with megatron_io.single_process_group():
                gpt, md = load_lora_model(ckpt_dir, base_dir, peft)
                tensors = {k: v.to(out_dtype) for k, v in adapter_tensors(gpt, md.model).items()}
                del gpt
            from safetensors.torch import save_file

            save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            atomic_write_json(staging / ADAPTER_CONFIG, adapter_config(record, base_dir))
            manifest.write_manifest(staging, manifest.HF_EXPORT, source=str(Path(ckpt_dir)))
        log.info("exported the LoRA adapter of %s in %.1f s", ckpt_dir, time.perf_counter() - start)
        return Path(out_dir)

    parent = Path(out_dir).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".probsft-merge-", dir=parent) as tmp:
        merged = Path(tmp) / "merged"
        merged.mkdir()
        with megatron_io.single_process_group():
            gpt, md = load_lora_model(ckpt_dir, base_dir, peft)
            with torch.no_grad():
                for _, _, module in lora.adapter_modules(gpt):
                    module.weight += module.lora_scaling * module.lora_B @ module.lora_A
                    module.lora_B.zero_()
            megatron_io.save_weights(gpt, merged / model_dir.WEIGHTS_DIR)
            del gpt
        model_dir.write_model_config(
            merged, md.model, dtype="float32", source={"kind": "LoRA merged", "ckpt": str(ckpt_dir)}
        )
        if md.hf is not None:
            model_dir.copy_hf_files(md.hf, merged / model_dir.HF_DIR)
        manifest.write_manifest(merged, manifest.MODEL_DIR)
        options = dict(hf_template=hf_template, dtype=dtype, max_shard_size=max_shard_size)
        api.megatron_to_hf(merged, out_dir, overwrite=overwrite, **options)
    log.info("exported %s merged in %.1f s", ckpt_dir, time.perf_counter() - start)
    return Path(out_dir)
