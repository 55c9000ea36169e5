"""The CPU fallback: active only without CUDA, and a no-op when CUDA is present."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from probsft_megatron import cpu_backend


def test_nothing_changes_when_cuda_is_present():
    before = {
        n: getattr(torch.cuda, n)
        for n in ("current_device", "synchronize", "empty_cache", "set_device")
    }
    assert cpu_backend.activate(cuda=True) is False
    assert not cpu_backend.is_active()
    assert {n: getattr(torch.cuda, n) for n in before} == before
    # no torch-function mode was pushed: a cuda placement still refers to cuda
    t = torch.empty(2, device="meta")
    assert t.device.type == "meta"
    assert torch.overrides._get_current_function_mode_stack() == []


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_cuda_placements_land_on_cpu_when_active():
    out = _run("""
        import torch
        from probsft_megatron import cpu_backend
        original = torch.cuda.current_device
        assert cpu_backend.activate(cuda=False)
        a = torch.empty(3, device="cuda")
        b = torch.zeros(2, device=torch.cuda.current_device())
        c = torch.ones(2).cuda()
        d = torch.ones(2).to("cuda:0")
        e = torch.ones(2, dtype=torch.float32).type()
        torch.cuda.synchronize()
        print(a.device, b.device, c.device, d.device, e)
        cpu_backend.deactivate()
        print(torch.overrides._get_current_function_mode_stack() == [],
              torch.cuda.current_device is original)
    """)
    first, second = out.splitlines()
    assert first == "cpu cpu cpu cpu torch.cuda.FloatTensor"
    assert second == "True True"


def test_without_the_fallback_cuda_calls_fail_here():
    """Negative control: on this CPU machine the same calls fail when the fallback is off."""
    if torch.cuda.is_available():
        return
    out = _run("""
        import torch
        try:
            torch.empty(3, device="cuda")
            print("no error")
        except (RuntimeError, AssertionError, AttributeError):
            print("error")
    """)
    assert out == "error"
