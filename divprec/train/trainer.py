"""The pre-training loop: process groups -> data -> model -> DeepSpeed engine -> steps -> callbacks.

One code path on CPU (gloo, megatron-core bridged by divprec.parallel.cpu) and GPU (NCCL).
Each step: megatron-core's forward_backward function runs the microbatches (and pipeline
communication) through the DeepSpeed engine; the engine reduces gradients over data parallel in the
last microbatch's backward; engine.step() clips and applies AdamW on the ZeRO partitions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from divprec.config.schema import PretrainConfig, to_dict
from divprec.config.validate import validate_loss
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


def pretrain(cfg: PretrainConfig, callbacks: list[Callback] | None = None) -> TrainResult:
    """Train ``cfg`` (already validated) in this process's place of the launched world."""
    ctx = init_distributed(cfg.parallel, cfg.train.seed)
    _agree_on_run_dir(cfg)
    train, model_cfg, par = cfg.train, cfg.model, cfg.parallel
    dtype = resolve_precision(train.precision)
    num_microbatches = train.global_batch_size // (train.micro_batch_size * ctx.data_size)

    # Data: the default corpus is built once (file-locked) and cached; every rank reads it.
    datasets = build_gpt_datasets(
        cfg.data,
        sequence_length=train.seq_length,
        seed=train.seed,
        train_samples=train.steps * train.global_batch_size,
        valid_samples=train.global_batch_size,
        show_progress=ctx.is_logging_rank,
    )
    tokenizer_vocab = datasets.tokenizer.vocab_size
    validate_loss(cfg, tokenizer_vocab)
    vocab_size = model_cfg.padded_vocab_size(tokenizer_vocab, par.tensor)

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

    start_step, consumed = 0, 0
    batches = build_batch_iterator(
        datasets.train,
        consumed,
        train.micro_batch_size,
        ctx.data_rank,
        ctx.data_size,
        global_batch_size=train.global_batch_size,
        num_workers=cfg.data.num_workers,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    forward_backward = get_forward_backward_func()
    callbacks = callbacks if callbacks is not None else build_callbacks(cfg.logging)
    state = TrainState(
        step=start_step,
        total_steps=train.steps,
        consumed_samples=consumed,
        run_dir=cfg.run.dir,
        is_logging_rank=ctx.is_logging_rank,
        config=to_dict(cfg),
    )
    peak = cfg.logging.peak_tflops or device_peak_tflops(ctx.device, dtype)
    throughput = Throughput(
        flops_per_token(model_cfg, train.seq_length, vocab_size), ctx.world_size, peak
    )
    history: list[dict[str, float]] = []
    for callback in callbacks:
        callback.on_train_start(state)
    throughput.start()
    tokens_per_step = train.global_batch_size * train.seq_length
    for step in range(start_step, train.steps):
        lr = learning_rate(step, cfg.optim, train.steps)
        set_learning_rate(engine, lr)
        stat_sums = TokenStatSums()
        engine.module.train()
        forward_backward(
            forward_step_func=make_forward_step(stat_sums, ctx.device),
            data_iterator=batches,
            model=[grad_sync.schedule_model()],
            num_microbatches=num_microbatches,
            seq_length=train.seq_length,
            micro_batch_size=train.micro_batch_size,
            forward_only=False,
        )
        grad_sync.after_backward()
        if model_cfg.is_moe and model_cfg.moe_router_expert_bias:
            update_router_expert_bias(engine.module, model_cfg.moe_router_bias_update_rate)
        engine.step()
        consumed += train.global_batch_size
        state.step, state.consumed_samples = step + 1, consumed
        throughput.step(tokens_per_step)

        metrics = None
        if (step + 1) % cfg.logging.interval == 0 or step + 1 == train.steps:
            metrics = _step_metrics(stat_sums, ctx, engine, lr, consumed, step + 1)
            metrics.update(throughput.compute())
            history.append(metrics)
        for callback in callbacks:
            callback.on_step_end(state, metrics)
    for callback in callbacks:
        callback.on_train_end(state)
    return TrainResult(state.step, consumed, cfg.run.dir, history)


def _step_metrics(
    stat_sums: TokenStatSums,
    ctx: ParallelContext,
    engine,
    lr: float,
    consumed: int,
    step: int,
) -> dict[str, float]:
    """Token means of the loss stats over the whole world, the same on every rank.

    Only the last pipeline stage has stats; the others add zeros. Tensor-parallel ranks hold
    identical stats, which scales every sum and the token count alike, so the means are exact.
    Collectives: one all-reduce SUM over the world; DeepSpeed's grad norm is already global.
    """
    sums = stat_sums._sums if ctx.is_last_stage else empty_stat_sums(ctx.device)
    means = reduce_token_means(sums, group=None)
    means.pop("num_tokens", None)
    grad_norm = engine.get_global_grad_norm()
    if isinstance(grad_norm, torch.Tensor):
        grad_norm = grad_norm.item()
    return {
        "step": step,
        **means,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": lr,
        "consumed_samples": consumed,
    }
