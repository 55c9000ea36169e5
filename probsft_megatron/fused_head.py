"""The model side of the fused loss: a GPT model whose output layer hands back its input.

megatron's ``GPTModel`` builds its output layer itself, so the seam is the model class; the
weight stays megatron's (initialized, sharded, tied, checkpointed as before)."""

from __future__ import annotations

from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import Tensor

from probsft_megatron.errors import ConfigError


class FusedOutputLayer(ColumnParallelLinear):
    """megatron's vocab-parallel output layer that returns its input (the hidden states)."""

    def forward(
        self,
        input_: Tensor,
        weight: Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ):
        return input_, None


class FusedHeadGPTModel(GPTModel):
    """A ``GPTModel`` whose last stage returns hidden states ``[b, s(/TP), h]``; called with
    labels it raises (its loss would read hidden states as logits)."""

    def __init__(self, config, *args, **kwargs) -> None:
        if getattr(config, "mtp_num_layers", None):
            raise ConfigError(
                "loss.implementation='fused' does not support multi-token "
                "prediction (mtp_num_layers); use loss.implementation='unfused'"
            )
        if getattr(config, "defer_embedding_wgrad_compute", False):
            raise ConfigError(
                "loss.implementation='fused' computes the output weight's "
                "gradient itself; turn off defer_embedding_wgrad_compute"
            )
        super().__init__(config, *args, **kwargs)
        if self.post_process:  # the very layer megatron built, with the forward above
            self.output_layer.__class__ = FusedOutputLayer

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        raise RuntimeError(
            "this model's output layer returns hidden states (fused loss head); call it "
            "without labels and compute the loss with probsft_megatron.fused_loss"
        )


def unwrap(model) -> LanguageModule:
    """The ``GPTModel`` inside megatron's wrappers (DDP, Float16Module)."""
    while not isinstance(model, LanguageModule) and hasattr(model, "module"):
        model = model.module
    return model


def head_is_fused(model) -> bool:
    """Whether this stage's output layer is a :class:`FusedOutputLayer`."""
    return isinstance(getattr(unwrap(model), "output_layer", None), FusedOutputLayer)


def output_weight(model) -> Tensor:
    """The ``[V/TP, h]`` weight the unfused output layer multiplies with (tied or not), as
    ``GPTModel._postprocess`` chooses it."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
