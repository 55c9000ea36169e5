"""Run megatron-core on a machine without CUDA (CPU + gloo), and nowhere else.

megatron-core assumes a CUDA device in a few dozen places that our training path reaches:
``torch.cuda.current_device()`` as a device argument, ``device="cuda"`` / ``.cuda()`` /
``.to("cuda")`` on tensors, ``torch.cuda.synchronize()``, and ``Tensor.type()`` compared with
``'torch.cuda.FloatTensor'`` (optimizer and grad clipping). :func:`activate` makes those calls
resolve to the CPU:

* a :class:`~torch.overrides.TorchFunctionMode` rewrites any CUDA device (``"cuda"``,
  ``"cuda:0"``, ``torch.device("cuda")``, or a bare device index) in tensor factories and
  ``Tensor.to`` to ``"cpu"``, turns ``Tensor.cuda()`` into a no-op, and spells the CPU float
  tensor types the CUDA way for argument-less ``Tensor.type()``;
* ``torch.cuda.current_device`` returns the CPU device (it must work without the mode too:
  autograd runs megatron's backward functions where the mode is not active), and
  ``synchronize`` / ``empty_cache`` / ``set_device`` become no-ops.

It is a no-op when CUDA is available: on a GPU machine nothing is patched and megatron runs
unmodified. This module is the only place that bends torch/megatron behaviour this way;
megatron *API* differences between versions live in :mod:`probsft_megatron.compat`.

RNG: without CUDA, call ``model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)``
(see :func:`probsft_megatron.compat.seed_model_parallel`); dropout is then not TP-aware, so
multi-rank parity tests use dropout 0. Activation recomputation
(``parallel.recompute_granularity``) saves and restores "the CUDA RNG state" around each
recomputed block; without CUDA there is none, so megatron's two helpers that read and write
it are replaced by ones that hand back an empty state and ignore it (the CPU generator, which
is what the recomputed forward uses, is saved and restored by megatron as usual).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from probsft_megatron.hardware import cuda_available, te_available  # noqa: F401  (re-exported)

_STATE: dict[str, Any] = {"active": False, "mode": None, "saved": {}}
_LOCK = threading.Lock()

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA ordinal in torch's factory functions
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_device(device: Any) -> Any:
    return "cpu" if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placements to the CPU; every other call passes through untouched."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def is_active() -> bool:
    """Whether the CPU fallback is installed in this process."""
    return bool(_STATE["active"])


def activate(cuda: bool | None = None) -> bool:
    """Install the CPU fallback if (and only if) CUDA is unavailable.

    Args:
        cuda: override for the CUDA check (tests simulate a GPU machine with ``True``).

    Returns:
        True when the fallback is active after the call. Idempotent.
    """
    has_cuda = cuda_available() if cuda is None else cuda
    if has_cuda:
        return is_active()
    with _LOCK:
        if _STATE["active"]:
            return True
        saved = _STATE["saved"]
        for name, replacement in {
            # A device argument, not an ordinal: autograd runs backward functions outside
            # the mode, and megatron's SP backward allocates with this as `device=`.
            "current_device": lambda: torch.device("cpu"),
            "synchronize": lambda *a, **k: None,
            "empty_cache": lambda: None,
            "set_device": lambda *a, **k: None,
        }.items():
            saved[name] = getattr(torch.cuda, name)
            setattr(torch.cuda, name, replacement)
        # Tiny objective weights (p^a with small p) make subnormal gradients, which x86 CPUs
        # process orders of magnitude slower; GPUs flush them in their fast paths anyway.
        torch.set_flush_denormal(True)
        _patch_recompute_rng(saved)
        mode = _CudaToCpuMode()
        mode.__enter__()
        _STATE.update(active=True, mode=mode)
    return True


def deactivate() -> None:
    """Remove the fallback (tests use this to leave the process as they found it)."""
    with _LOCK:
        if not _STATE["active"]:
            return
        _STATE["mode"].__exit__(None, None, None)
        torch.set_flush_denormal(False)
        for name, original in _STATE["saved"].items():
            owner, attr = name if isinstance(name, tuple) else (torch.cuda, name)
            setattr(owner, attr, original)
        _STATE["saved"].clear()
        _STATE.update(active=False, mode=None)


def _patch_recompute_rng(saved: dict) -> None:
    """Let megatron's activation checkpointing run without a CUDA RNG (see the module
    docstring); a no-op where megatron is not installed."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return
    empty = torch.empty(0, dtype=torch.uint8)
    for attr, replacement in (
        ("_get_cuda_rng_state", lambda *a, **k: empty),
        ("_set_cuda_rng_state", lambda *a, **k: None),
    ):
        saved[(mrandom, attr)] = getattr(mrandom, attr)
        setattr(mrandom, attr, replacement)


def device() -> torch.device:
    """The device model tensors live on: the current CUDA device, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend() -> str:
    """``nccl`` on GPU machines, ``gloo`` on the CPU."""
    return "nccl" if cuda_available() else "gloo"
