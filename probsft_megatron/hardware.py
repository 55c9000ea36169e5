"""What this machine offers: a CUDA device, Transformer Engine.

The two questions the configuration asks before anything starts (``train.precision: auto``,
``train.attention: auto|te``), answered without importing megatron, so resolving a config
stays cheap. :mod:`probsft_megatron.cpu_backend` (the CPU fallback) and
:mod:`probsft_megatron.compat` re-export them.
"""

from __future__ import annotations


def cuda_available() -> bool:
    """Whether a usable CUDA device exists."""
    import torch

    return torch.cuda.is_available()


def te_available() -> bool:
    """Whether Transformer Engine imports (never installed on CPU machines: its CPU wheel
    raises RuntimeError on import, which is caught here too)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or the CPU wheel's RuntimeError
        return False
    return True
