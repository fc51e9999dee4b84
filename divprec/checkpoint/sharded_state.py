"""Sharded state dicts of the model and of DeepSpeed's optimizer state, sharded like the weights.

Every tensor is saved with its global shape and this rank's offset (megatron-core's ShardedTensor),
so a checkpoint written at one (tensor, pipeline, data, ZeRO) layout loads at any other. The
optimizer's fp32 master weight and Adam moments of a parameter are saved under
``optimizer.<state>.<weight key>`` with the weight's global shape, so they reshard exactly like
the weights.

Each rank saves and loads only its own ZeRO partition, in place: DeepSpeed gives every rank one
contiguous fragment of the flattened (local) parameter (``param._hp_mapping``), over whatever
group that parameter's group is partitioned on. A contiguous range of a row-major tensor is a few
boxes (a partial row, full rows, a partial row, recursively per axis), and each box is saved as an
irregular chunk of the global tensor (``axis_fragmentations=None``; torch's DCP reads any chunk
from any chunks), as a view of DeepSpeed's fp32 partition. Nothing is gathered or copied.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

OPTIMIZER_STATES = ("fp32_param", "exp_avg", "exp_avg_sq")
MODEL_PREFIX = "model"

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape) in a tensor's coordinates


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


def optimizer_sharded_state_dict(model: torch.nn.Module, model_sd: dict) -> dict:
    """Whole-parameter optimizer tensors (fp32, uninitialized) to fill and save, for a model
    outside DeepSpeed in a world of one (tools/convert.py's import)."""
    out: dict[str, dict] = {state: {} for state in OPTIMIZER_STATES}
    for name, param, sharded in _sharded_params(model_sd, model):
        for state in OPTIMIZER_STATES:
            value = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            out[state][name] = make_sharded_optimizer_tensor(
                sharded, value, prefix=f"optimizer.{state}"
            )
    return out


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The boxes that tile elements [start, stop) of a row-major tensor of ``shape``, in order;
    each is contiguous in the flat order (at most 2 * ndim - 1 of them)."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    first, first_rest = divmod(start, inner)
    last, last_rest = divmod(stop, inner)

    def within(row: int, lo: int, hi: int) -> list[Box]:
        return [((row, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], lo, hi)]

    if first == last:
        return within(first, first_rest, last_rest)
    boxes = within(first, first_rest, inner) if first_rest else []
    full_from = first + 1 if first_rest else first
    if last > full_from:
        boxes.append(((full_from, *(0,) * (len(shape) - 1)), (last - full_from, *shape[1:])))
    if last_rest:
        boxes += within(last, 0, last_rest)
    return boxes


def _weight_pieces(
    name: str, param: torch.nn.Parameter, sharded: ShardedTensor | ShardedTensorFactory
) -> list[tuple[ShardedTensor, int]]:
    """The plain sharded tensors the weight is saved as, each with the flat offset in ``param``
    where its data starts (a factory, e.g. SwiGLU's fc1 halves, is built on a meta tensor to read
    where its pieces lie)."""
    if isinstance(sharded, ShardedTensor):
        return [(sharded, 0)]
    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
    built = sharded.build_fn(sharded.key, meta, sharded.replica_id, None)
    built = [built] if isinstance(built, ShardedTensor) else nested_values(built)
    pieces = [p for p in built if isinstance(p, ShardedTensor)]
    ranges = sorted((p.data.storage_offset(), p.data.numel()) for p in pieces if p.data is not None)
    views = all(
        p.data is not None and (p.data is meta or p.data._base is meta) and p.data.is_contiguous()
        for p in pieces
    )
    tiled = [start for start, _ in ranges] == list(
        itertools.accumulate((n for _, n in ranges[:-1]), initial=0)
    ) and sum(n for _, n in ranges) == meta.numel()
    if not (views and tiled):
        raise ValueError(
            f"parameter {name}: its sharded-state factory does not save contiguous views that "
            "tile the parameter, which the per-rank optimizer checkpoint needs; build the model "
            "with divprec's layers (model.moe_experts=sequential or grouped)"
        )
    return [(p, p.data.storage_offset()) for p in pieces]


def _main_over_data_parallel(replica_id) -> tuple[int, ...] | int:
    """The weight's replica id with the data-parallel coordinate (the last) set to 0: every rank's
    ZeRO fragment is its own, the main (only) copy within its partition group."""
    return (*replica_id[:-1], 0) if isinstance(replica_id, tuple) else 0


def _fragment_tensors(
    piece: ShardedTensor, piece_start: int, fragment_start: int, fragment: torch.Tensor, key: str
) -> list[ShardedTensor]:
    """Sharded tensors of the part of ``piece`` (flat offset ``piece_start`` in the parameter)
    that ``fragment`` (this rank's 1-D partition of the parameter, from ``fragment_start``)
    holds: views of ``fragment``, one per box."""
    lo = max(piece_start, fragment_start)
    hi = min(piece_start + math.prod(piece.local_shape), fragment_start + fragment.numel())
    prepend = piece.prepend_axis_num
    out, position = [], lo - fragment_start
    for offset, shape in flat_range_boxes(piece.local_shape, lo - piece_start, hi - piece_start):
        numel = math.prod(shape)
        local_shape = (1,) * prepend + shape  # prepended axes (e.g. experts) made explicit
        global_offset = (
            *piece.global_offset[:prepend],
            *(g + o for g, o in zip(piece.global_offset[prepend:], offset, strict=True)),
        )
        out.append(
            ShardedTensor(
                key=key,
                data=fragment[position : position + numel].view(local_shape),
                dtype=torch.float32,
                local_shape=local_shape,
                global_shape=piece.global_shape,
                global_offset=global_offset,
                axis_fragmentations=None,  # irregular chunks
                replica_id=_main_over_data_parallel(piece.replica_id),
            )
        )
        position += numel
    return out


def partition_sharded_state_dict(model: torch.nn.Module, model_sd: dict) -> dict:
    """This rank's ZeRO partition of the optimizer state as sharded tensors that are views of
    DeepSpeed's fp32 master weights and Adam moments: saving reads them in place, loading writes
    them in place. A parameter this rank holds no fragment of contributes nothing. No collective.
    """
    out: dict[str, dict[str, list[ShardedTensor]]] = {state: {} for state in OPTIMIZER_STATES}
    for name, param, sharded in _sharded_params(model_sd, model):
        if not hasattr(param, "_hp_mapping"):
            raise RuntimeError(f"parameter {name} is not in a DeepSpeed ZeRO optimizer")
        mapping = param._hp_mapping
        if mapping is None:  # all of it is in other ranks' partitions
            continue
        fragment_start = mapping.lp_fragment_address.start
        for state in OPTIMIZER_STATES:
            if state != "fp32_param" and state not in (mapping.optim_fragment or {}):
                raise RuntimeError(f"DeepSpeed holds no {state} for parameter {name}")
            # detached: the fp32 partition is a leaf that requires grad; same storage
            fragment = mapping.get_hp_fragment(None if state == "fp32_param" else state).detach()
            if fragment.dtype != torch.float32 or fragment.dim() != 1:
                raise RuntimeError(f"DeepSpeed's {state} of parameter {name} is not flat fp32")
            out[state][name] = [
                tensor
                for piece, piece_start in _weight_pieces(name, param, sharded)
                for tensor in _fragment_tensors(
                    piece, piece_start, fragment_start, fragment, f"optimizer.{state}.{piece.key}"
                )
            ]
    return out


def copy_loaded_partition(targets: dict, loaded: dict) -> int:
    """Copy the loaded partition tensors into DeepSpeed's where the load did not write in place.

    ``targets``: {state: {name: [tensor]}}, the data of :func:`partition_sharded_state_dict`'s
    tensors; ``loaded``: the load's result for them. Returns how many were copied."""
    copied = 0
    for state, by_name in targets.items():
        for name, tensors in by_name.items():
            for target, value in zip(tensors, loaded[state][name], strict=True):
                if value.data_ptr() != target.data_ptr():
                    target.copy_(value)
                    copied += 1
    return copied


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
