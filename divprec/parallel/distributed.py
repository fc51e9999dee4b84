"""Process groups: torch.distributed from the launcher's environment, then megatron-core's groups.

Works under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ... set) and as a plain single process
(a world of one over an in-memory store: no port, no environment variable changed). Without CUDA
the backend is gloo and megatron-core runs on CPU through divprec.parallel.cpu.
:func:`single_process_world` is the one way code outside the trainer (export, dataset builds,
benchmarks) forms a world of one and undoes exactly what it created.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from divprec.parallel.config import ParallelConfig
from divprec.parallel.cpu import enable_cpu_execution

logger = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    """This process's place in the (tensor x pipeline x data) layout."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tensor_rank: int
    tensor_size: int
    pipeline_rank: int
    pipeline_size: int
    data_rank: int
    data_size: int
    tensor_group: dist.ProcessGroup
    pipeline_group: dist.ProcessGroup
    data_group: dist.ProcessGroup

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.pipeline_size - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def launcher_world_size() -> int:
    """The world size the launcher asked for (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """The launcher's world (env:// rendezvous), or a world of one when no launcher set one."""
    if "MASTER_ADDR" not in os.environ:
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    ):
        # torchrun then keeps one store across restarts, and a restarted group reads the previous
        # group's addresses from it: it hangs or fails connecting ("Connection refused").
        logger.warning(
            "torchrun shares its rendezvous store across restarts: a restarted worker group may "
            "hang; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/local.sh and "
            "launch/pretrain.slurm do)"
        )
    dist.init_process_group(backend=backend, timeout=timeout)


def init_distributed(cfg: ParallelConfig, seed: int) -> ParallelContext:
    """Initialise torch.distributed, megatron-core's model-parallel groups and its RNG tracker.

    Collectives: the rendezvous and megatron-core's group creation (new_group over the world).
    """
    from megatron.core import parallel_state, tensor_parallel

    use_cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        enable_cpu_execution()
        device = torch.device("cpu")
    if not dist.is_initialized():
        _init_process_group(backend, datetime.timedelta(minutes=cfg.timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor,
            pipeline_model_parallel_size=cfg.pipeline,
            # Experts take the dense layers' tensor split (expert_tensor_parallel_size defaults to
            # tensor), so expert x expert-data parallel = data parallel.
            expert_model_parallel_size=cfg.expert,
            # megatron's groups (TP, PP, DP, ...) take their own timeout, not the world's
            distributed_timeout_minutes=cfg.timeout_minutes,
        )
    # Dropout in tensor-parallel regions draws from per-TP-rank streams; the rest from a
    # data-parallel-shared stream. Same seed -> same streams whatever the layout.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        tensor_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pipeline_size=parallel_state.get_pipeline_model_parallel_world_size(),
        data_rank=parallel_state.get_data_parallel_rank(),
        data_size=parallel_state.get_data_parallel_world_size(),
        tensor_group=parallel_state.get_tensor_model_parallel_group(),
        pipeline_group=parallel_state.get_pipeline_model_parallel_group(),
        data_group=parallel_state.get_data_parallel_group(),
    )


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def ensure_world(seed: int = 0) -> None:
    """torch.distributed and megatron-core's groups, at tensor = pipeline = 1 in a world of one
    unless a caller (or a launcher) already made them; kept until shutdown_distributed(). For
    code whose results outlive the call (an evaluation model); otherwise use
    :func:`single_process_world`, which undoes what it made."""
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        init_distributed(ParallelConfig(tensor=1, pipeline=1), seed)


@contextlib.contextmanager
def single_process_world(seed: int = 0, *, model_parallel: bool = True) -> Iterator[None]:
    """torch.distributed (and, with ``model_parallel``, megatron-core's groups at tensor =
    pipeline = 1 and its RNG tracker) in this process, for the duration of the block.

    Reuses what the caller already has (without ``model_parallel``, a launcher's world of any
    size) and tears down only what it created; torch's default RNG state is restored (seeding
    megatron's tracker reseeds it). Collectives: none beyond group creation.
    """
    from megatron.core import parallel_state

    if model_parallel and dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError("this runs in a single process (world size 1), not under torchrun")
    if (
        model_parallel
        and parallel_state.model_parallel_is_initialized()
        and (
            parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1
        )
    ):
        raise RuntimeError("this needs megatron-core at tensor = pipeline = 1")
    created_world = not dist.is_initialized()
    created_groups = model_parallel and not parallel_state.model_parallel_is_initialized()
    with torch.random.fork_rng(devices=[]):
        if model_parallel:
            init_distributed(ParallelConfig(tensor=1, pipeline=1), seed)
        elif created_world:
            _init_process_group("gloo", datetime.timedelta(minutes=30))
        try:
            yield
        finally:
            if created_groups:
                parallel_state.destroy_model_parallel()
            if created_world and dist.is_initialized():
                dist.destroy_process_group()
