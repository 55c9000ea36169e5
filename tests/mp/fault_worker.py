"""A training run with one fault injected, for the resilience tests.

Production code has no test hooks: this worker replaces, in its own process, the module
functions the :class:`~probsft_megatron.train.Trainer` calls, then runs ``probsft train``'s
worker entry point (:func:`probsft_megatron.train.main`)::

    python tests/mp/fault_worker.py FAULT [--nproc N] TRAIN_ARGS...

FAULT:

* ``loss@STEP:RANK``: rank RANK's forward pass of step STEP returns NaN (its loss and
  gradients follow);
* ``grad@STEP:RANK``: one of rank RANK's gradients of step STEP is NaN, its loss finite;
* ``crash@STEP``: rank 0 dies (exit 17) after writing checkpoint STEP, before its rename;
* ``none``: nothing (a plain run).

Steps count from the run's first step. With ``--nproc N`` (N > 1) it runs torchrun's agent
over itself, as ``probsft train --nproc N`` does (one ``error:`` line, exit 2, no traceback
from the agent).
"""

import os
import re
import sys
from pathlib import Path


def inject(fault: str) -> None:
    """Replace the functions the trainer calls so that ``fault`` happens."""
    import torch.distributed as dist

    from probsft_megatron import model_dir, runtime

    if fault == "none":
        return
    crash = re.fullmatch(r"crash@(\d+)", fault)
    if crash:
        commit = model_dir.commit_staging

        def commit_or_die(staging, final, *args, **kwargs):
            if Path(final).name == f"step_{int(crash.group(1)):07d}":
                os._exit(17)
            return commit(staging, final, *args, **kwargs)

        model_dir.commit_staging = commit_or_die
        return
    match = re.fullmatch(r"(loss|grad)@(\d+):(\d+)", fault)
    if not match:
        raise SystemExit(f"unknown fault {fault!r}")
    kind, at_step, at_rank = match.group(1), int(match.group(2)), int(match.group(3))
    train_step = runtime.train_step
    calls = [0]

    def faulty_step(model_chunks, *args, **kwargs):
        calls[0] += 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if calls[0] != at_step or rank != at_rank:
            return train_step(model_chunks, *args, **kwargs)
        nan = float("nan")
        module = getattr(model_chunks[0], "module", model_chunks[0])
        if kind == "loss":  # the forward output, so the loss and gradients follow
            handle = module.register_forward_hook(lambda mod, args, out: out * nan)
        else:  # one gradient, before DDP accumulates it; the loss stays finite
            param = next(p for p in module.parameters() if p.requires_grad)
            handle = param.register_hook(lambda grad: grad * nan)
        try:
            return train_step(model_chunks, *args, **kwargs)
        finally:
            handle.remove()

    runtime.train_step = faulty_step


def main(argv: list[str]) -> int:
    fault, rest = argv[0], argv[1:]
    nproc = 1
    if rest[:1] == ["--nproc"]:
        nproc, rest = int(rest[1]), rest[2:]
    if nproc > 1 and "RANK" not in os.environ:
        from probsft_megatron.launchers.agent import main as agent

        argv = ["--standalone", "--nproc-per-node", str(nproc), __file__, fault]
        return agent(argv + rest)
    inject(fault)
    from probsft_megatron import train

    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
