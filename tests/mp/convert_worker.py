"""Multi-rank worker for the converter tests (run under torchrun, gloo on CPU).

``logits``: for each job in a JSON list ``[{"model_dir", "tokens", "out", "tp", "pp",
"overrides"}]``, build the model at that TP/PP layout the way training does
(``perform_initialization=True``), load the converted torch_dist weights (resharded on load),
run a forward-only pipeline schedule on ``tokens`` (a saved ``[b, s]`` LongTensor) and save the
full-vocabulary fp32 logits ``[b, s, vocab]`` from the last stage (TP rank 0) to ``out``.
``overrides`` are TransformerConfig fields (negative controls, e.g. rotary_interleaved).

``train``: load a Megatron model dir at ``--tp``/``--pp``, train ``--steps`` steps with the
NLL objective on counting sequences, and save the result as a new Megatron model dir
(``model_config.json`` + ``weights/`` + the source's ``hf/``) with the layout helpers'
multi-rank protocol.
"""

import argparse
import json
import sys

import torch


def setup_layout(parallel, model_cfg, current):
    """(Re)create megatron's groups when the layout changes; returns the new layout."""
    from probsft_megatron import compat, runtime

    layout = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    if current != layout:
        if current is not None:
            compat.destroy_model_parallel()
        runtime.init_distributed(parallel, seed=1234, model=model_cfg)
    return layout


def full_logits(model, tokens: torch.Tensor, seq: int):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere).

    Contract: every rank passes the same ``tokens`` ``[b, s]``; the model returns logits split
    over the vocabulary on each TP rank, gathered here along the last dim over the TP group.
    """
    from megatron.core import tensor_parallel

    from probsft_megatron import compat, runtime

    positions = torch.arange(seq)[None, :].expand(tokens.shape[0], -1).contiguous()
    collected = []

    def forward_step(data_iterator, chunk):
        output = chunk(next(data_iterator), positions, None)

        def loss_func(logits):
            collected.append(tensor_parallel.gather_from_tensor_model_parallel_region(logits))
            return logits.sum() * 0.0, {}

        return output, loss_func

    with torch.no_grad():
        compat.get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([tokens]),
            model=[model],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
    return collected[0] if runtime.is_last_stage() else None


def run_logits(jobs_file: str) -> None:
    from megatron.core import parallel_state

    from probsft_megatron import runtime
    from probsft_megatron.model import ParallelConfig, build_gpt_model, transformer_config
    from probsft_megatron.model_dir import read_model_dir

    current = None
    for job in json.loads(open(jobs_file).read()):
        md = read_model_dir(job["model_dir"])
        parallel = ParallelConfig(job["tp"], job["pp"])
        current = setup_layout(parallel, md.model, current)
        tconfig = transformer_config(
            md.model, parallel, calculate_per_token_loss=False, **job.get("overrides", {})
        )
        model = build_gpt_model(md.model, tconfig)
        runtime.load_model_weights(model, str(md.weights))
        model.eval()
        tokens = torch.load(job["tokens"])
        logits = full_logits(model, tokens, tokens.shape[1])
        if (
            logits is not None
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        ):
            torch.save(logits.float().contiguous(), job["out"])
        torch.distributed.barrier()


def counting_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """Learnable sequences: next token = token + 1 (mod a small range)."""
    g = torch.Generator().manual_seed(seed)
    span = min(vocab, 64)
    for _ in range(steps):
        start = torch.randint(0, span, (batch, 1), generator=g)
        tokens = (start + torch.arange(seq + 1)[None, :]) % span
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def run_train(args) -> None:
    from megatron.core import parallel_state

    from probsft_megatron import manifest, runtime
    from probsft_megatron import model_dir as layout
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import ParallelConfig, transformer_config

    src = layout.read_model_dir(args.model_dir)
    parallel = ParallelConfig(args.tp, args.pp)
    runtime.init_distributed(parallel, seed=1234, model=src.model)
    tconfig = transformer_config(src.model, parallel)
    chunks, optimizer = runtime.build_training_model(
        src.model, tconfig, lr=args.lr, load_dir=str(src.weights)
    )
    forward_step = runtime.loss_head(ObjectiveLoss(LossConfig("original")), "cpu")
    for step, (tokens, labels) in enumerate(
        counting_batches(args.steps, 4, args.seq, src.model.vocab_size)
    ):
        pos = torch.arange(args.seq)[None, :].expand(4, -1).contiguous()
        batch = runtime.Batch(tokens, labels, torch.ones(tokens.shape), pos)
        stats = runtime.train_step(
            chunks, optimizer, forward_step, [batch], seq_length=args.seq, micro_batch_size=4
        )
        if runtime.is_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            print(f"step {step + 1}: loss {stats.loss:.4f}", flush=True)
    rank0 = torch.distributed.get_rank() == 0
    staging = layout.staging_path(args.out)
    if rank0:
        layout.begin_staging(args.out, overwrite=True)
    torch.distributed.barrier()
    runtime.save_model_weights(chunks[0].module, str(staging / layout.WEIGHTS_DIR))
    torch.distributed.barrier()
    if rank0:
        layout.write_model_config(
            staging, src.model, dtype=src.dtype, source=dict(src.source, trained_steps=args.steps)
        )
        layout.copy_hf_files(src.hf, staging / layout.HF_DIR)
        manifest.write_manifest(staging, manifest.MODEL_DIR)  # the folder's last file
        layout.commit_staging(staging, args.out)
    torch.distributed.barrier()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("logits", "train"))
    ap.add_argument("--jobs", help="logits: JSON file with the jobs")
    ap.add_argument("--model-dir", help="train: the Megatron model dir to start from")
    ap.add_argument("--out", help="train: the Megatron model dir to write")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    from probsft_megatron import runtime

    torch.use_deterministic_algorithms(True)
    if args.mode == "logits":
        run_logits(args.jobs)
    else:
        run_train(args)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
