"""What this machine offers (a CUDA device, Transformer Engine), answered without megatron."""

from __future__ import annotations


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def te_available() -> bool:
    """Whether Transformer Engine imports."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or the CPU wheel's RuntimeError
        return False
    return True
