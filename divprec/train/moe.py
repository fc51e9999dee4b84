"""Auxiliary-loss-free MoE load balancing: the per-step update of the routers' expert bias."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias


def update_router_expert_bias(model: torch.nn.Module, update_rate: float) -> dict[str, float]:
    """Move each router's expert bias towards balanced load, from this global batch's counts.

    expert_bias += rate * sign(mean load - load of the expert); then the counts restart, so each
    update sees one global batch. Returns this stage's balance metrics: ``moe_max_load_ratio``
    (busiest expert's tokens / mean, averaged over layers) and ``moe_expert_bias_abs_mean``.
    Collectives: one all-reduce SUM of the stacked token counts over the tensor x data-parallel
    group (inside megatron-core's get_updated_expert_bias).
    """
    routers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]
    if not routers:
        return {}
    counts = torch.stack([r.local_tokens_per_expert for r in routers])  # [routers, experts]
    biases = torch.stack([r.expert_bias for r in routers])  # [routers, experts]
    updated = get_updated_expert_bias(counts, biases, update_rate)  # counts now global, in place
    load = counts.float()
    max_load_ratio = (load.max(dim=-1).values / load.mean(dim=-1).clamp(min=1e-9)).mean()
    with torch.no_grad():
        for router, bias in zip(routers, updated, strict=True):
            router.expert_bias.copy_(bias)
            router.local_tokens_per_expert.zero_()
    return {
        "moe_max_load_ratio": max_load_ratio.item(),
        "moe_expert_bias_abs_mean": updated.abs().mean().item(),
    }
