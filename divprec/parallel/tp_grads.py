"""Gradients of parameters that are replicated over tensor-parallel ranks but see partial inputs.

Under tensor parallelism most replicated parameters (e.g. the input norm) see the same activations
on every TP rank and get identical gradients. Some do not:
- with sequence parallelism, norm weights see only this rank's slice of the sequence;
- QK-norm weights (shared by all heads) see only this rank's heads;
- parameters megatron-core marks ``average_gradients_across_tp_domain``.
Their true gradient is the sum (or mean) over the TP group. A hook on each such parameter reduces
the incoming gradient of every microbatch before it is accumulated, so DeepSpeed's data-parallel
reduction and its gradient norm see the full gradient whatever the ZeRO stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tensor_parallel_partial_params(
    model: torch.nn.Module, sequence_parallel: bool
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(parameters whose TP gradients are summed, parameters whose TP gradients are averaged)."""
    summed, averaged = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if getattr(param, "average_gradients_across_tp_domain", False):
            averaged.append(param)
        elif (sequence_parallel and getattr(param, "sequence_parallel", False)) or (
            "q_layernorm" in name or "k_layernorm" in name
        ):
            summed.append(param)
    return summed, averaged


def install_tensor_parallel_grad_hooks(
    model: torch.nn.Module, tp_group: dist.ProcessGroup, sequence_parallel: bool
) -> int:
    """Register the reducing hooks; returns how many parameters got one (0 when tp = 1).

    Collectives: per microbatch backward, one all-reduce SUM over ``tp_group`` per hooked
    parameter (small: norm weights), issued in the same autograd order on every TP rank.
    """
    tp = dist.get_world_size(tp_group)
    if tp == 1:
        return 0
    summed, averaged = tensor_parallel_partial_params(model, sequence_parallel)

    def reducer(scale: float):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()  # the incoming gradient may be shared with other consumers
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=tp_group)
            return grad.mul_(scale) if scale != 1.0 else grad

        return hook

    for param in summed:
        param.register_hook(reducer(1.0))
    for param in averaged:
        param.register_hook(reducer(1.0 / tp))
    return len(summed) + len(averaged)
