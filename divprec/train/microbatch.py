"""megatron-core's forward_step / loss_func contract, for the shaped objective.

The schedule calls ``forward_step(data_iterator, model)`` once per microbatch; on the last
pipeline stage the model returns the per-token loss and stats, and the schedule calls the returned
``loss_func(output)`` to get the scalar it back-propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch

from divprec.metrics.reduce import TokenStatSums, masked_sums
from divprec.model.shaped_gpt import OUTPUT_CHANNELS

# Names of the per-token channels in metrics: nll is reported as lm_loss (the perplexity loss).
METRIC_NAMES = {
    "loss": "loss",
    "nll": "lm_loss",
    "entropy": "entropy",
    "topk_mass": "topk_mass",
    "target_prob": "target_prob",
    "target_rank": "target_rank",
}


def loss_func(
    loss_mask: torch.Tensor,
    stat_sums: TokenStatSums,
    token_scale: float | None,
    output: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This microbatch's shaped loss to back-propagate; the stats go to ``stat_sums``.

    ``output``: ``[b, s, 6]`` from ShapedGPTModel (loss, then detached stats). The schedule divides
    the returned loss by the number of microbatches. ``token_scale`` None: the mean over this
    microbatch's unmasked tokens (``train.loss_averaging=microbatch``, and validation, which
    back-propagates nothing); else the summed loss times ``token_scale``
    (divprec.train.loss_averaging.token_loss_scale). The reported ``loss`` is the token mean.
    """
    mask = loss_mask.to(output.device, torch.float32)  # [b, s]
    channels = dict(zip(OUTPUT_CHANNELS, output.float().unbind(-1), strict=True))  # each [b, s]
    summed = (channels["loss"] * mask).sum()
    mean = summed / mask.sum().clamp(min=1.0)
    stat_sums.add(masked_sums({METRIC_NAMES[k]: v for k, v in channels.items()}, mask))
    loss = mean if token_scale is None else summed * token_scale
    # The schedule divides the returned loss in place: report a copy.
    return loss, {"loss": mean.detach().clone()}


def make_forward_step(
    stat_sums: TokenStatSums, device: torch.device, token_scale: float | None = None
) -> Callable[[Iterator[dict[str, torch.Tensor]], torch.nn.Module], tuple]:
    """forward_step(data_iterator, model) for megatron-core's forward_backward functions;
    ``token_scale``: see :func:`loss_func`."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)  # [b, s]
        labels = batch["labels"].to(device, non_blocking=True)  # [b, s]
        position_ids = batch["position_ids"].to(device, non_blocking=True)  # [b, s]
        # loss_mask: the fused output layer computes its gradients for it (loss.fused_linear)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)  # [b, s]
        output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)  # [b, s, 6]
        return output, partial(loss_func, batch["loss_mask"], stat_sums, token_scale)

    return forward_step


def empty_stat_sums(device: torch.device) -> dict[str, torch.Tensor]:
    """Zero sums with every key: what a rank without the loss (not the last stage) contributes."""
    ones = torch.ones(1, 1, device=device)
    return masked_sums({name: ones for name in METRIC_NAMES.values()}, torch.zeros_like(ones))
