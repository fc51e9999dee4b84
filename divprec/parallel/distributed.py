"""Process groups: torch.distributed from the launcher's environment, then megatron-core's groups.

Works under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ... set) and as a plain single process
(a world of one on a free loopback port). Without CUDA the backend is gloo and megatron-core runs on
CPU through divprec.parallel.cpu.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from divprec.parallel.config import ParallelConfig
from divprec.parallel.cpu import enable_cpu_execution


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


def _ensure_rendezvous_env() -> None:
    """A single process started without torchrun still needs an address to form its world of one."""
    if "MASTER_ADDR" in os.environ:
        return
    from divprec.parallel.spawn import free_port

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1"
    )
    os.environ.setdefault("LOCAL_RANK", "0")


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
        _ensure_rendezvous_env()
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=cfg.timeout_minutes)
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor,
            pipeline_model_parallel_size=cfg.pipeline,
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
