"""The model side of the fused loss: a GPT model whose output layer hands back its input.

With ``loss.implementation: fused`` the last pipeline stage must return the final hidden
states, not logits, so that :func:`probsft_megatron.fused_loss.fused_objective_loss` can
form the logits one chunk at a time. megatron's ``GPTModel`` builds its output layer itself
(no layer spec names it), so the seam is the model class: :func:`probsft_megatron.model.
build_gpt_model` (``fused_head=True``) builds a :class:`FusedHeadGPTModel`, whose output layer
is a :class:`FusedOutputLayer`: megatron's ``ColumnParallelLinear`` with the same parameter
(the same tensor, its tensor-parallel attributes and checkpoint keys, tied or not) and a
forward that returns its input. The weight is still initialized, sharded, checkpointed,
tied and reduced by megatron exactly as for the unfused model; only the multiplication moves
into the loss.

Called without labels, the last stage of a fused-head model returns ``[b, s, h]``
(``[b, s/TP, h]`` under sequence parallelism); calling it with labels raises, because its
language-model loss would read hidden states as logits.
"""

from __future__ import annotations

from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import Tensor

from probsft_megatron.errors import ConfigError

__all__ = ["FusedHeadGPTModel", "FusedOutputLayer", "head_is_fused", "output_weight", "unwrap"]


class FusedOutputLayer(ColumnParallelLinear):
    """megatron's vocab-parallel output layer that returns its input (the hidden states).

    Built from the layer ``GPTModel`` created (:meth:`adopt`), so the weight parameter, its
    initialization and every attribute megatron reads (``sequence_parallel``, ``tp_group``,
    ``weight``) are that layer's.
    """

    @classmethod
    def adopt(cls, layer: ColumnParallelLinear) -> FusedOutputLayer:
        """A fused output layer holding ``layer``'s parameters and attributes (``layer`` is
        not used afterwards)."""
        fused = cls.__new__(cls)
        fused.__dict__.update(layer.__dict__)
        return fused

    def forward(
        self,
        input_: Tensor,
        weight: Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ):
        return input_, None


class FusedHeadGPTModel(GPTModel):
    """A ``GPTModel`` whose last stage returns hidden states for the fused loss.

    Same constructor as ``GPTModel``; stages without an output layer (PP > 1, not last) are
    plain ``GPTModel`` stages.
    """

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
        if self.post_process:
            self.output_layer = FusedOutputLayer.adopt(self.output_layer)

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
    """The ``[V/TP, h]`` weight the unfused output layer multiplies with on this stage.

    Tied embeddings: ``shared_embedding_or_output_weight()`` (the word embeddings when this
    stage also embeds, else the last stage's copy that megatron keeps in sync), exactly as
    ``GPTModel._postprocess`` chooses; untied: ``output_layer.weight``.
    """
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
