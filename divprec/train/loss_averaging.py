"""How a step's loss is averaged (``train.loss_averaging``): per token or per microbatch.

Two divisions act on a microbatch's loss L_m before the optimizer sees its gradient:
megatron-core's schedule divides it by the number of microbatches M, and DeepSpeed divides the
gradients summed over data parallel by the data-parallel size D. So the step's gradient is that of
``sum over ranks and microbatches of L_m / (M * D)``.

- ``microbatch``: L_m is the microbatch's token mean. A token of a microbatch with few unmasked
  tokens weighs more than one of a full microbatch (data.eod_mask_loss, padding).
- ``token``: L_m is the microbatch's summed loss times ``M * D / T``, with T the unmasked tokens of
  the whole global batch. The two divisions cancel ``M * D`` and the gradient is exactly that of
  the mean over all T tokens. T is known before the schedule runs: every rank holds its
  microbatches' loss masks.

Only the last pipeline stage calls loss_func; earlier stages' gradients flow back from it, so they
need no scale of their own. The MoE auxiliary loss (``model.moe_aux_loss_coeff``) is not scaled
here: megatron-core's MoEAuxLossAutoScaler still divides it by M, and DeepSpeed by D, so it stays
a mean over microbatches (megatron-core's intended scaling of it in either mode). The expert-bias
update counts routed tokens; it has no loss to scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from divprec.metrics.reduce import NUM_TOKENS, reduce_token_means


def token_loss_scale(
    batches: Sequence[dict[str, torch.Tensor]], data_group: dist.ProcessGroup | None
) -> float:
    """``M * D / T``: the factor of each microbatch's summed loss that makes the step's gradient
    that of the mean loss over every unmasked token of the global batch.

    ``batches``: this rank's M microbatches of the step (``loss_mask`` ``[b, s]`` each);
    ``data_group``: the data-parallel group DeepSpeed averages gradients over (D ranks). Every
    rank of a data-parallel replica (its TP ranks and pipeline stages) reads the same batches, so
    each gets the same T. A global batch without unmasked tokens gives 0 (no gradient).

    Collectives: one all-reduce SUM over ``data_group`` of a float64 scalar (the token count).
    """
    local = sum(b["loss_mask"].detach().sum(dtype=torch.float64) for b in batches)
    sums = {NUM_TOKENS: torch.as_tensor(local, dtype=torch.float64)}
    total = reduce_token_means(sums, group=data_group)[NUM_TOKENS]
    data_size = dist.get_world_size(data_group) if dist.is_initialized() else 1
    return len(batches) * data_size / total if total > 0 else 0.0
