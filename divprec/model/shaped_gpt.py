"""megatron-core's GPTModel with the shaped objective as its language-model loss."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from divprec.loss import STAT_NAMES, ShapedLossConfig, vocab_parallel_shaped_loss

# Channels of the packed per-token output: the differentiable loss, then the detached stats.
OUTPUT_CHANNELS = ("loss", *STAT_NAMES)


class ShapedGPTModel(GPTModel):
    """GPTModel whose last stage returns ``[b, s, 6]``: the shaped loss and its stats per token.

    The loss is computed on the vocab-parallel logits ``[s, b, V/tp]`` as the output layer produced
    them: nothing vocabulary-sized is gathered or transposed. ``loss_config`` has no default: a
    model that forgot it must not silently train cross-entropy.
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
        packed = torch.stack([loss, *(stats[name] for name in STAT_NAMES)], dim=-1)  # [s, b, 6]
        return packed.transpose(0, 1)  # [b, s, 6]
