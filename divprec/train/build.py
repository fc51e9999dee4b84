"""Everything a run builds before its first step, in dependency order (:func:`build_run`).

process groups -> run directory agreed -> datasets (tokenizer fixes the vocabulary) -> this rank's
pipeline stage of the model -> DeepSpeed engine (AdamW under ZeRO) -> gradient wiring -> the
resolved config on disk -> the checkpoint manager.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from divprec.checkpoint.layout import CONFIG_FILE, TOKENIZER_FILE
from divprec.checkpoint.manager import CheckpointManager
from divprec.config.schema import PretrainConfig
from divprec.data.dataset import GPTDatasets, build_gpt_datasets
from divprec.model.builder import build_stage
from divprec.model.flops import flops_per_token
from divprec.model.shaped_gpt import ShapedGPTModel
from divprec.parallel.deepspeed_engine import GradientSync, build_engine
from divprec.parallel.distributed import ParallelContext, init_distributed
from divprec.train.guards import LossSpikes


def resolve_precision(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class Run:
    """What one step needs; built once per process."""

    cfg: PretrainConfig
    ctx: ParallelContext
    engine: Any  # deepspeed.DeepSpeedEngine
    model: torch.nn.Module
    grad_sync: GradientSync
    checkpoints: CheckpointManager
    datasets: GPTDatasets
    num_microbatches: int
    flops_per_token: float
    dtype: torch.dtype
    forward_backward: Callable[..., Any]  # megatron-core's schedule for this layout
    spikes: LossSpikes | None = None  # with train.loss_spike_window > 0

    def release(self) -> None:
        """Let the model, its gradients and the optimizer state be freed once the run is over.

        DeepSpeed's gradient hooks sit on the parameters' autograd nodes, where the garbage
        collector cannot follow them: without this, they keep the engine and everything it holds
        alive, and a second run in the same process (benchmarks, the GPU check) starts with the
        first one's memory still allocated. The run cannot train afterwards.
        """
        self.engine.destroy()


def _agree_on_run_dir(cfg: PretrainConfig) -> None:
    """Every rank uses rank 0's run.dir (a timestamp resolved on each rank could differ)."""
    holder = [cfg.run.dir]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    cfg.run.dir = str(Path(holder[0]).expanduser().resolve())


def _save_resolved_config(cfg: PretrainConfig, ctx: ParallelContext) -> Path:
    path = Path(cfg.run.dir) / CONFIG_FILE
    if ctx.is_logging_rank:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        os.replace(tmp, path)
    return path


def build_run(cfg: PretrainConfig) -> Run:
    """Build this process's part of the run ``cfg`` (validated). Collectives: group creation,
    the run-dir broadcast, DeepSpeed's parameter broadcast and ZeRO partitioning."""
    ctx = init_distributed(cfg.parallel, cfg.train.seed)
    _agree_on_run_dir(cfg)
    train, par = cfg.train, cfg.parallel
    dtype = resolve_precision(train.precision)

    # The default corpus is built once (file-locked) and cached; every rank reads it.
    datasets = build_gpt_datasets(
        cfg.data,
        sequence_length=train.seq_length,
        seed=train.seed,
        train_samples=train.steps * train.global_batch_size,
        # Validation reads the same eval.iters global batches every time.
        valid_samples=max(train.global_batch_size, cfg.eval.samples(train.global_batch_size)),
        show_progress=ctx.is_logging_rank,
    )
    vocab_size = cfg.model.padded_vocab_size(datasets.tokenizer.vocab_size, par.tensor)
    model = build_stage(
        cfg.model,
        vocab_size=vocab_size,
        seq_length=train.seq_length,
        params_dtype=dtype,
        seed=train.seed,
        sequence_parallel=par.sequence_parallel,
        model_class=functools.partial(ShapedGPTModel, loss_config=cfg.loss),
    )
    engine = build_engine(
        model,
        cfg.optim,
        zero_stage=par.zero_stage,
        micro_batch_size=train.micro_batch_size,
        bf16=dtype == torch.bfloat16,
    )
    grad_sync = GradientSync.attach(engine, model, par.zero_stage, ctx.tensor_group)
    config_file = _save_resolved_config(cfg, ctx)
    layout = {
        "tensor": ctx.tensor_size,
        "pipeline": ctx.pipeline_size,
        "expert": par.expert,
        "data": ctx.data_size,
        "zero_stage": par.zero_stage,
    }
    checkpoints = CheckpointManager(
        cfg.checkpoint,
        cfg.run.dir,
        model,
        engine,
        layout,
        {CONFIG_FILE: config_file, TOKENIZER_FILE: Path(datasets.data.tokenizer_model)},
    )
    return Run(
        cfg=cfg,
        ctx=ctx,
        engine=engine,
        model=model,
        grad_sync=grad_sync,
        checkpoints=checkpoints,
        datasets=datasets,
        num_microbatches=train.global_batch_size // (train.micro_batch_size * ctx.data_size),
        flops_per_token=flops_per_token(cfg.model, train.seq_length, vocab_size),
        dtype=dtype,
        forward_backward=get_forward_backward_func(),
        spikes=LossSpikes(train.loss_spike_window, train.loss_spike_zscore, train.skip_loss_spikes)
        if train.loss_spike_window > 0
        else None,
    )
