"""The pre-training loop: process groups -> data -> model -> DeepSpeed engine -> steps -> callbacks.

One code path on CPU (gloo, megatron-core bridged by divprec.parallel.cpu) and GPU (NCCL).
Each step: megatron-core's forward_backward function runs the microbatches (and the pipeline
communication); DeepSpeed reduces the gradients over data parallel (divprec.parallel.
deepspeed_engine.GradientSync), and engine.step() clips and applies AdamW on the ZeRO partitions.
Then metrics (logging steps), callbacks, checkpointing and the preemption check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from divprec.checkpoint.checkpointer import Progress
from divprec.checkpoint.manager import CheckpointManager
from divprec.config.schema import PretrainConfig, to_dict
from divprec.data.batches import build_batch_iterator
from divprec.data.dataset import build_gpt_datasets
from divprec.metrics.callback import Callback, TrainState
from divprec.metrics.factory import build_callbacks
from divprec.metrics.reduce import TokenStatSums, reduce_token_means
from divprec.metrics.throughput import Throughput, device_peak_tflops
from divprec.model.builder import build_stage
from divprec.model.flops import flops_per_token
from divprec.model.shaped_gpt import ShapedGPTModel
from divprec.parallel.deepspeed_engine import GradientSync, build_engine, set_learning_rate
from divprec.parallel.distributed import ParallelContext, init_distributed
from divprec.parallel.tp_grads import install_tensor_parallel_grad_hooks
from divprec.train.moe import update_router_expert_bias
from divprec.train.preemption import MARKER, Preempted, PreemptionWatcher
from divprec.train.schedule import learning_rate
from divprec.train.step import empty_stat_sums, make_forward_step

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports back; ``history`` holds the logged metrics."""

    step: int
    consumed_samples: int
    run_dir: str
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_precision(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _agree_on_run_dir(cfg: PretrainConfig) -> None:
    """Every rank uses rank 0's run.dir (a timestamp resolved on each rank could differ)."""
    holder = [cfg.run.dir]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    cfg.run.dir = str(Path(holder[0]).expanduser().resolve())


def _save_resolved_config(cfg: PretrainConfig, ctx: ParallelContext) -> None:
    if ctx.is_logging_rank:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        tmp = Path(cfg.run.dir) / "config.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, Path(cfg.run.dir) / "config.yaml")


@dataclass
class _Run:
    """Everything a run builds before its first step."""

    ctx: ParallelContext
    engine: object
    model: torch.nn.Module
    grad_sync: GradientSync
    checkpoints: CheckpointManager
    datasets: object
    num_microbatches: int
    flops_per_token: float
    dtype: torch.dtype


def _build(cfg: PretrainConfig) -> _Run:
    ctx = init_distributed(cfg.parallel, cfg.train.seed)
    _agree_on_run_dir(cfg)
    train, model_cfg, par = cfg.train, cfg.model, cfg.parallel
    dtype = resolve_precision(train.precision)

    # Data: the default corpus is built once (file-locked) and cached; every rank reads it.
    datasets = build_gpt_datasets(
        cfg.data,
        sequence_length=train.seq_length,
        seed=train.seed,
        train_samples=train.steps * train.global_batch_size,
        valid_samples=train.global_batch_size,
        show_progress=ctx.is_logging_rank,
    )
    vocab_size = model_cfg.padded_vocab_size(datasets.tokenizer.vocab_size, par.tensor)

    model = build_stage(
        model_cfg,
        vocab_size=vocab_size,
        seq_length=train.seq_length,
        params_dtype=dtype,
        seed=train.seed,
        sequence_parallel=par.sequence_parallel,
        model_class=ShapedGPTModel,
    )
    model.loss_config = cfg.loss
    install_tensor_parallel_grad_hooks(model, ctx.tensor_group, model.config.sequence_parallel)
    engine = build_engine(
        model,
        cfg.optim,
        zero_stage=par.zero_stage,
        micro_batch_size=train.micro_batch_size,
        bf16=dtype == torch.bfloat16,
    )
    grad_sync = GradientSync(engine, par.zero_stage)
    model.config.no_sync_func = grad_sync.no_sync
    model.config.finalize_model_grads_func = None
    model.config.grad_scale_func = None
    _save_resolved_config(cfg, ctx)
    layout = {
        "tensor": ctx.tensor_size,
        "pipeline": ctx.pipeline_size,
        "data": ctx.data_size,
        "zero_stage": par.zero_stage,
    }
    checkpoints = CheckpointManager(
        cfg.checkpoint,
        cfg.run.dir,
        model,
        engine,
        layout,
        {
            "config.yaml": Path(cfg.run.dir) / "config.yaml",
            "tokenizer.model": Path(datasets.data.tokenizer_model),
        },
    )
    return _Run(
        ctx=ctx,
        engine=engine,
        model=model,
        grad_sync=grad_sync,
        checkpoints=checkpoints,
        datasets=datasets,
        num_microbatches=train.global_batch_size // (train.micro_batch_size * ctx.data_size),
        flops_per_token=flops_per_token(model_cfg, train.seq_length, vocab_size),
        dtype=dtype,
    )


def pretrain(cfg: PretrainConfig, extra_callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``cfg`` (already validated) in this process's place of the launched world.

    ``extra_callbacks`` run after the ones ``cfg.logging`` configures. Resumes per
    ``checkpoint.*``; saves every ``checkpoint.interval`` steps and at the end. On
    SIGTERM/SIGUSR1 saves after the current step and raises :class:`Preempted` (exit code 75).
    """
    run = _build(cfg)
    ctx, engine, train = run.ctx, run.engine, cfg.train
    progress = run.checkpoints.resume() or Progress(step=0, consumed_samples=0)
    if ctx.is_logging_rank:
        (Path(cfg.run.dir) / MARKER).unlink(missing_ok=True)  # a marker of an earlier attempt
    batches = build_batch_iterator(
        run.datasets.train,
        progress.consumed_samples,
        train.micro_batch_size,
        ctx.data_rank,
        ctx.data_size,
        global_batch_size=train.global_batch_size,
        num_workers=cfg.data.num_workers,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    callbacks = [*build_callbacks(cfg.logging), *extra_callbacks]
    state = TrainState(
        step=progress.step,
        total_steps=train.steps,
        consumed_samples=progress.consumed_samples,
        run_dir=cfg.run.dir,
        is_logging_rank=ctx.is_logging_rank,
        config=to_dict(cfg),
    )
    peak = cfg.logging.peak_tflops or device_peak_tflops(ctx.device, run.dtype)
    throughput = Throughput(run.flops_per_token, ctx.world_size, peak)
    watcher = PreemptionWatcher(ctx.device)
    watcher.install()
    history: list[dict[str, float]] = []
    try:
        for callback in callbacks:
            callback.on_train_start(state)
        throughput.start()
        tokens_per_step = train.global_batch_size * train.seq_length
        for step in range(progress.step, train.steps):
            lr = learning_rate(step, cfg.optim, train.steps)
            set_learning_rate(engine, lr)
            stat_sums = TokenStatSums()
            engine.module.train()
            forward_backward(
                forward_step_func=make_forward_step(stat_sums, ctx.device),
                data_iterator=batches,
                model=[run.grad_sync.schedule_model()],
                num_microbatches=run.num_microbatches,
                seq_length=train.seq_length,
                micro_batch_size=train.micro_batch_size,
                forward_only=False,
            )
            run.grad_sync.after_backward()
            moe_metrics = {}
            if cfg.model.is_moe and cfg.model.moe_router_expert_bias:
                moe_metrics = update_router_expert_bias(
                    engine.module, cfg.model.moe_router_bias_update_rate
                )
            engine.step()
            progress = Progress(step + 1, progress.consumed_samples + train.global_batch_size)
            state.step, state.consumed_samples = progress.step, progress.consumed_samples
            throughput.step(tokens_per_step)

            metrics = None
            if cfg.logging.should_log(progress.step, train.steps):
                metrics = _step_metrics(stat_sums, ctx, engine, lr, progress)
                metrics.update(moe_metrics)  # this stage's layers (rank 0: the first stage)
                metrics.update(throughput.compute())
                history.append(metrics)
            for callback in callbacks:
                callback.on_step_end(state, metrics)
            run.checkpoints.maybe_save(progress, train.steps)
            if progress.step < train.steps and watcher.should_stop():
                path = run.checkpoints.save(progress)
                if ctx.is_logging_rank:
                    watcher.write_marker(cfg.run.dir, progress.step, path)
                logger.warning(
                    "stopped by %s after step %d; saved %s", watcher.received, progress.step, path
                )
                raise Preempted()
    finally:
        watcher.uninstall()
        for callback in callbacks:
            callback.on_train_end(state)
    return TrainResult(state.step, state.consumed_samples, cfg.run.dir, history)


def _step_metrics(
    stat_sums: TokenStatSums, ctx: ParallelContext, engine, lr: float, progress: Progress
) -> dict[str, float]:
    """Token means of the loss stats over the whole world, the same on every rank.

    Only the last pipeline stage has stats; the others add zeros. Tensor-parallel ranks hold
    identical stats, which scales every sum and the token count alike, so the means are exact.
    Collectives: one all-reduce SUM over the world; DeepSpeed's grad norm is already global.
    """
    sums = stat_sums.totals() if ctx.is_last_stage else empty_stat_sums(ctx.device)
    means = reduce_token_means(sums, group=None)
    means.pop("num_tokens", None)
    grad_norm = engine.get_global_grad_norm()
    if isinstance(grad_norm, torch.Tensor):
        grad_norm = grad_norm.item()
    return {
        "step": progress.step,
        **means,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "consumed_samples": progress.consumed_samples,
    }
