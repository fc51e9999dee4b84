"""Save and load the full training state as a megatron-core distributed checkpoint (torch_dist).

Saved: model weights; the optimizer's fp32 master weights and Adam moments (from DeepSpeed's ZeRO
partitions, sharded like the weights); step and consumed samples (the LR schedule is a function of
the step); per-rank RNG states; the resolved config; the tokenizer. Every collective below runs on
all ranks in the same order.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing
import os
import random
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from torch.distributed.checkpoint.api import CheckpointException

from divprec.checkpoint.layout import (
    LATEST,
    apply_retention,
    check_complete,
    commit,
    read_metadata,
    resolve_latest,
    step_dir_name,
    temp_dir,
)
from divprec.checkpoint.sharded_state import (
    MODEL_PREFIX,
    copy_loaded_partition,
    model_sharded_state_dict,
    partition_sharded_state_dict,
    set_adam_step,
)

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message names the file or key."""


@dataclass
class Progress:
    step: int
    consumed_samples: int


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(rank: int) -> str:
    return f"rng/rank_{rank:05d}.pt"


def refuse_non_finite(model: torch.nn.Module, engine, step: int) -> None:
    """Raise CheckpointError on every rank when any rank's weights or optimizer state hold a NaN
    or inf. Collective: one all-reduce MAX [1] over the world."""
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is None:
        for state in engine.optimizer.optimizer.state.values():  # AdamW over ZeRO's partitions
            if any(torch.is_tensor(v) and not torch.isfinite(v).all() for v in state.values()):
                bad = "the optimizer state (Adam moments)"
                break
    # ZeRO-1/2's fp32 partitions; under bf16 at ZeRO-1, DeepSpeed's BF16_Optimizer holds them.
    masters = [
        *getattr(engine.optimizer, "single_partition_of_fp32_groups", []),
        *getattr(engine.optimizer, "fp32_groups_flat_partition", []),
    ]
    for partition in masters:
        if bad is None and not torch.isfinite(partition).all():
            bad = "the fp32 master weights"
    flag = torch.tensor([0.0 if bad is None else 1.0], device=next(model.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = f"{bad} on rank {dist.get_rank()}" if bad else "another rank's state"
        raise CheckpointError(
            f"refusing to save step {step}: {where} is not finite; the last complete checkpoint "
            "is kept"
        )


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_results_manager = None  # the server of megatron-core's results queue, kept for the process


def _die_with_the_parent() -> None:
    """In a child process: the kernel kills it when its parent dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _results_queue_that_dies_with_its_rank() -> None:
    """megatron-core collects its file writers' results in a multiprocessing Manager queue. The
    Manager's server process (spawned at a rank's first save with data to write) would outlive a
    worker killed with SIGKILL, keeping the launcher's output open and its memory forever. The same
    queue, from a server the kernel kills with its rank."""
    global _results_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _results_manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _results_manager.start(_die_with_the_parent)
        filesystem_async._results_queue = _results_manager.Queue()


def _spread_over_data_parallel():
    """megatron-core's torch_dist save with the weights (replicated over data parallel) written by
    the data-parallel ranks in turn, not all by the first: its writer stages a host copy of what a
    rank writes, so each rank stages its partition and 1/dp of the weights. Collective: one
    all-gather of the shards' metadata over the data-parallel group."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )


def save_checkpoint(
    root: Path,
    progress: Progress,
    model: torch.nn.Module,
    layout: dict,
    extra_files: dict[str, Path],
    keep_last: int | None,
    async_queue=None,
) -> Path:
    """Write ``root/step_<step>`` atomically; returns its path (on every rank).

    ``layout``: the parallel layout (recorded; resharding on load needs no match).
    ``extra_files``: name in the checkpoint -> source file (config, tokenizer), copied by rank 0.
    ``async_queue``: a megatron-core AsyncCallsQueue: the files are written by a background process
    and the checkpoint is committed when the queue finalizes it (``latest`` moves only then);
    None: written and committed before returning.
    Each rank writes its own ZeRO partition of the optimizer state, in place (no gather).
    Collectives: barriers; megatron-core's distributed save (its planning, synchronously, in both modes).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = temp_dir(root, progress.step)
    final = root / step_dir_name(progress.step)
    with _phase(tmp, "create the directory"):
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted save of this step
            tmp.mkdir(parents=True)
    _results_queue_that_dies_with_its_rank()
    model_sd = model_sharded_state_dict(model)
    optimizer_sd = partition_sharded_state_dict(model, model_sd)
    with _phase(tmp, "write the model and optimizer shards"):
        request = dist_checkpointing.save(
            {"model": model_sd, "optimizer": optimizer_sd},
            str(tmp),
            sharded_strategy=_spread_over_data_parallel(),
            async_sharded_save=async_queue is not None,
        )
        if rank == 0:  # after megatron-core's save (planning), which wants an empty directory
            (tmp / "rng").mkdir()
    with _phase(tmp, "write the RNG states"):
        torch.save(_rng_state(), tmp / _rng_file(rank))
    metadata = {
        "step": progress.step,
        "consumed_samples": progress.consumed_samples,
        "layout": layout,
        "world_size": world,
        "files": [*extra_files, *(_rng_file(r) for r in range(world))],
    }

    def finish() -> None:
        if rank == 0:
            for name, source in extra_files.items():
                shutil.copyfile(source, tmp / name)
            commit(root, progress.step, metadata)
            for removed in apply_retention(root, keep_last):
                logger.info("checkpoint retention removed %s", removed)

    if async_queue is None:
        with _phase(tmp, "commit"):
            finish()
    else:
        # Runs on every rank after all ranks' writers are done and megatron-core's own metadata
        # is written (its finalize function comes first).
        request.add_finalize_fn(finish)
        async_queue.schedule_async_request(request)
    return final


class CheckpointSaveError(CheckpointError):
    """A save failed on some rank (a full disk, failing storage). The partial directory is
    removed and ``latest`` still names the previous complete checkpoint."""


def _errno_of(err: BaseException, directory: Path) -> int:
    """The errno behind a failed write: an OSError in ``err``'s chain or in megatron-core's
    per-rank failures; else ENOSPC when the filesystem is full (torch's stream writer reports a
    full disk as "unexpected pos", without the errno); else 0."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current.errno
        if isinstance(current, CheckpointException):
            for wrapped in current.failures.values():  # (exception, traceback) per rank
                pending.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        pending += [current.__cause__, current.__context__]
    with contextlib.suppress(OSError):
        fs = os.statvfs(directory)
        if fs.f_bavail * fs.f_frsize < 1 << 20:
            return errno.ENOSPC
    return 0


@contextlib.contextmanager
def _phase(tmp: Path, what: str) -> Iterator[None]:
    """Run one phase of a save on every rank, then agree on whether it failed anywhere.

    A failure on any rank raises :class:`CheckpointSaveError` on every rank, after rank 0 removed
    the partial directory; it never reaches the commit, so ``latest`` is unchanged.
    Collective: one all-reduce MAX [2] (doubles as the phase's barrier).
    """
    failure: BaseException | None = None
    try:
        yield
    # An OSError, or megatron-core's report of one (torch's CheckpointException, a BaseException).
    except (Exception, CheckpointException) as err:
        failure = err
    rank, world = dist.get_rank(), dist.get_world_size()
    code = _errno_of(failure, tmp.parent) if failure is not None else 0
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    )
    # [world - the lowest failing rank, the largest errno]: every rank learns both.
    flags = torch.tensor([world - rank if failure else 0, code], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if not flags[0]:
        return
    failed_rank, code = world - int(flags[0]), int(flags[1])
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = resolve_latest(tmp.parent)
    cause = f"[Errno {code}] {os.strerror(code)}" if code else f"see rank {failed_rank}'s log"
    raise CheckpointSaveError(
        f"saving checkpoint {tmp} failed on rank {failed_rank} ({what}): {cause}; the partial "
        f"directory was removed and {LATEST} still names {latest.name if latest else 'nothing'}"
    ) from failure


def _check_shapes(path: Path, model_sd: dict) -> None:
    """Fail with the first mismatched key before loading anything."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for sharded in nested_values(model_sd):
        if not isinstance(sharded, ShardedTensor):
            continue
        if sharded.key not in saved:
            raise CheckpointError(
                f"checkpoint {path} has no tensor {sharded.key}: it was written for a different "
                "model (check model.* against its config.yaml, or start fresh with "
                "checkpoint.resume=never)"
            )
        saved_shape = tuple(saved[sharded.key].global_shape)
        if saved_shape != tuple(sharded.global_shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {sharded.key} has shape {saved_shape} "
                f"in the checkpoint and {tuple(sharded.global_shape)} in the model (check model.* "
                "and the tokenizer against its config.yaml, or start fresh with "
                "checkpoint.resume=never)"
            )


def load_checkpoint(path: Path, model: torch.nn.Module, engine, layout: dict) -> Progress:
    """Load ``path`` into the model and DeepSpeed's optimizer, resharding to this layout.

    RNG states are restored only when the layout is the one saved (they are per rank).
    Each rank reads its own ZeRO partition of the optimizer state, in place.
    Collectives: megatron-core's distributed load.
    """
    status = check_complete(path)
    if not status.complete:
        raise CheckpointError(f"checkpoint {path} is not usable: {status.reason}")
    metadata = read_metadata(path)
    model_sd = model_sharded_state_dict(model)
    _check_shapes(path, model_sd)
    optimizer_sd = partition_sharded_state_dict(model, model_sd)
    targets = {
        state: {name: [sharded.data for sharded in tensors] for name, tensors in by_name.items()}
        for state, by_name in optimizer_sd.items()
    }
    loaded = dist_checkpointing.load({"model": model_sd, "optimizer": optimizer_sd}, str(path))
    prefix = f"{MODEL_PREFIX}."
    weights = {k[len(prefix) :]: v for k, v in loaded["model"].items()}
    model.load_state_dict(weights, strict=False)
    copy_loaded_partition(targets, loaded["optimizer"])
    set_adam_step(engine.optimizer, metadata["step"])
    same_layout = (
        metadata.get("layout") == layout and metadata.get("world_size") == dist.get_world_size()
    )
    if "imported_from" in metadata:  # written by tools/convert.py from-hf
        logger.info(
            "checkpoint %s is an import of %s: training starts at step %d with a fresh "
            "optimizer state",
            path,
            metadata["imported_from"],
            metadata["step"],
        )
    elif same_layout:
        _set_rng_state(torch.load(path / _rng_file(dist.get_rank()), weights_only=False))
    else:
        logger.info(
            "resharding checkpoint %s from %s to %s; RNG states are not restored",
            path,
            metadata.get("layout"),
            layout,
        )
    return Progress(metadata["step"], metadata["consumed_samples"])
