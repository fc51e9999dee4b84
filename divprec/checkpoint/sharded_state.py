"""Sharded state dicts of the model and of DeepSpeed's optimizer state, sharded like the weights.

Every tensor is saved with its global shape and this rank's offset (megatron-core's ShardedTensor),
so a checkpoint written at one (tensor, pipeline, data, ZeRO) layout loads at any other. The
optimizer's fp32 master weight and Adam moments of a parameter are gathered from DeepSpeed's ZeRO
partitions (deepspeed.utils.safe_get_full_*) and saved under ``optimizer.<state>.<weight key>``
with the weight's sharding, so they reshard exactly like the weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

OPTIMIZER_STATES = ("fp32_param", "exp_avg", "exp_avg_sq")
MODEL_PREFIX = "model"


def model_sharded_state_dict(model: torch.nn.Module) -> dict:
    """megatron-core's sharded state dict of this rank's model stage."""
    return model.sharded_state_dict(prefix=f"{MODEL_PREFIX}.")


def _sharded_params(
    model_sd: dict, model: torch.nn.Module
) -> Iterator[tuple[str, torch.nn.Parameter, ShardedTensor | ShardedTensorFactory]]:
    """(name, parameter, its sharded tensor) for every trainable parameter."""
    by_data = {
        id(sh.data): sh
        for sh in nested_values(model_sd)
        if isinstance(sh, (ShardedTensor, ShardedTensorFactory))
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        sharded = by_data.get(id(param))
        if sharded is None:
            raise RuntimeError(f"parameter {name} has no entry in the model's sharded state dict")
        yield name, param, sharded


def optimizer_sharded_state_dict(model: torch.nn.Module, model_sd: dict, gather: bool) -> dict:
    """The optimizer's per-parameter state as sharded tensors.

    ``gather``: fill them from DeepSpeed's ZeRO partitions (for saving; a collective over the
    data-parallel group per parameter and state, in parameter order on every rank); otherwise
    allocate empty tensors to load into.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, dict] = {state: {} for state in OPTIMIZER_STATES}
    for name, param, sharded in _sharded_params(model_sd, model):
        for state in OPTIMIZER_STATES:
            if not gather:
                value = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            elif state == "fp32_param":
                value = safe_get_full_fp32_param(param)
            else:
                value = safe_get_full_optimizer_state(param, state)
            if value is None:
                raise RuntimeError(f"DeepSpeed holds no {state} for parameter {name}")
            out[state][name] = make_sharded_optimizer_tensor(
                sharded, value.detach().float().reshape(param.shape), prefix=f"optimizer.{state}"
            )
    return out


def load_optimizer_state(model: torch.nn.Module, model_sd: dict, loaded: dict) -> None:
    """Scatter loaded full (local-shard) optimizer tensors into DeepSpeed's ZeRO partitions."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for name, param, _ in _sharded_params(model_sd, model):
        safe_set_full_fp32_param(param, loaded["fp32_param"][name].to(param.device))
        for state in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, loaded[state][name].to(param.device), state)


def set_adam_step(optimizer, step: int) -> None:
    """Adam's bias-correction step count, which equals the training step (one update per step)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state.get(param)
            if state is not None and "step" in state:
                current = state["step"]
                state["step"] = (
                    torch.full_like(current, float(step))
                    if isinstance(current, torch.Tensor)
                    else step
                )
