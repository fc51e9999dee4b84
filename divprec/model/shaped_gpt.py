"""megatron-core's GPTModel with the shaped objective as its language-model loss."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from divprec.loss import (
    STAT_NAMES,
    ShapedLossConfig,
    fused_linear_shaped_loss,
    vocab_parallel_shaped_loss,
)

# Channels of the packed per-token output: the differentiable loss, then the detached stats.
OUTPUT_CHANNELS = ("loss", *STAT_NAMES)


def _pack(loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    packed = torch.stack([loss, *(stats[name] for name in STAT_NAMES)], dim=-1)  # [s, b, 6]
    return packed.transpose(0, 1)  # [b, s, 6]


class ShapedGPTModel(GPTModel):
    """GPTModel whose last stage returns ``[b, s, 6]``: the shaped loss and its stats per token.

    The loss is computed on the vocab-parallel logits ``[s, b, V/tp]`` as the output layer produced
    them: nothing vocabulary-sized is gathered or transposed. With ``loss.fused_linear`` and labels
    (training, validation), the output layer's matmul and the loss run together in chunks of tokens
    (divprec.loss.fused_linear) with the output layer's weight (the embedding's when tied), so the
    logits never exist whole; without labels (evaluation, sampling) the model returns plain
    logits either way. ``loss_config`` has no default: a model that forgot it must not silently
    train cross-entropy.
    """

    def __init__(self, *args: Any, loss_config: ShapedLossConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config

    def compute_language_model_loss(
        self, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        target = labels.transpose(0, 1)  # [b, s] -> [s, b]
        # inplace: fp32 logits become the loss's buffer (as megatron-core's cross-entropy does);
        # nothing else reads them, and autograd's version check would catch it if it did.
        loss, stats = vocab_parallel_shaped_loss(
            logits, target, self.loss_config, inplace=True
        )  # [s, b]
        return _pack(loss, stats)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """megatron-core's output layer + loss, or with ``loss.fused_linear`` the fused loss."""
        fused = (
            self.loss_config.fused_linear
            and self.post_process
            and labels is not None
            and not kwargs.get("mtp_in_postprocess")
            and self.config.mtp_num_layers is None
            and kwargs.get("inference_context") is None
        )
        if not fused:
            return super()._postprocess(
                hidden_states, input_ids, position_ids, labels, *args, **kwargs
            )
        layer = self.output_layer
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else layer.weight
        )  # [v/tp, h]
        loss_mask = kwargs.get("loss_mask")
        loss, stats = fused_linear_shaped_loss(
            hidden_states,  # [s(/tp with SP), b, h]
            weight,
            labels.transpose(0, 1),  # [b, s] -> [s, b]
            self.loss_config,
            tp_group=layer.tp_group,
            loss_mask=None if loss_mask is None else loss_mask.transpose(0, 1),
            sequence_parallel=layer.sequence_parallel,
        )
        return _pack(loss, stats)
