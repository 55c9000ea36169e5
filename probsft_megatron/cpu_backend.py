"""Run megatron-core on a machine without CUDA (CPU + gloo), and nowhere else.

:func:`activate` sends megatron's CUDA placements to the CPU (a TorchFunctionMode for device
arguments, ``.cuda()`` and ``Tensor.type()``; no-op ``torch.cuda`` helpers; an empty CUDA RNG
state for activation recomputation). Where CUDA exists nothing is patched."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from probsft_megatron.hardware import cuda_available

_STATE: dict[str, Any] = {"active": False, "mode": None, "saved": {}}
_LOCK = threading.Lock()

_FLOAT_TYPES = ("Float", "Half", "BFloat16")
_CUDA_TYPE_NAMES = {f"torch.{t}Tensor": f"torch.cuda.{t}Tensor" for t in _FLOAT_TYPES}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA ordinal in torch's factory functions
    return isinstance(device, str | torch.device) and str(device).startswith("cuda")


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
    """Install the CPU fallback if CUDA is unavailable (``cuda`` overrides the check);
    returns whether it is active. Idempotent."""
    has_cuda = cuda_available() if cuda is None else cuda
    if has_cuda:
        return is_active()
    with _LOCK:
        if _STATE["active"]:
            return True
        patches = {
            # A device argument, not an ordinal: autograd runs backward functions outside
            # the mode, and megatron's SP backward allocates with this as `device=`.
            (torch.cuda, "current_device"): lambda: torch.device("cpu"),
            (torch.cuda, "synchronize"): lambda *a, **k: None,
            (torch.cuda, "empty_cache"): lambda: None,
            (torch.cuda, "set_device"): lambda *a, **k: None,
        }
        with suppress(ImportError):  # recomputation saves "the CUDA RNG state": an empty one
            from megatron.core.tensor_parallel import random as mrandom

            empty = torch.empty(0, dtype=torch.uint8)
            patches[(mrandom, "_get_cuda_rng_state")] = lambda *a, **k: empty
            patches[(mrandom, "_set_cuda_rng_state")] = lambda *a, **k: None
        for (owner, attr), replacement in patches.items():
            _STATE["saved"][(owner, attr)] = getattr(owner, attr)
            setattr(owner, attr, replacement)
        # Tiny objective weights (p^a with small p) make subnormal gradients, which x86 CPUs
        # process orders of magnitude slower; GPUs flush them in their fast paths anyway.
        torch.set_flush_denormal(True)
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
        for (owner, attr), original in _STATE["saved"].items():
            setattr(owner, attr, original)
        _STATE["saved"].clear()
        _STATE.update(active=False, mode=None)


def device() -> torch.device:
    """The device model tensors live on: the current CUDA device, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend() -> str:
    """``nccl`` on GPU machines, ``gloo`` on the CPU."""
    return "nccl" if cuda_available() else "gloo"
