"""One optimizer step, read in one place: :func:`train_step`.

The path of one step through the code:
  1. the learning rate for this step (divprec.train.schedule), set on DeepSpeed's optimizer;
  2. megatron-core's schedule (1F1B with pipeline parallelism) runs the microbatches
     (divprec.train.microbatch); on the last stage the model computes the shaped loss and its
     stats over the vocab-parallel logits (divprec.model.shaped_gpt -> divprec.loss). With
     ``train.loss_averaging=token`` the step's microbatches are read first and their unmasked
     tokens counted over data parallel, so that the gradient is that of the global batch's token
     mean (divprec.train.loss_averaging);
  3. backward; tensor-parallel partial gradients are summed by hooks, and DeepSpeed reduces over
     data parallel (divprec.parallel.deepspeed_engine.GradientSync);
  4. the stats' token means over the whole world (one all-reduce; every rank gets the same);
  5. MoE with expert bias: the routers' bias moves towards balanced load (divprec.train.moe);
  6. the update: DeepSpeed clips and applies AdamW to its ZeRO partitions, or skips it when the
     gradient norm is not finite. A non-finite loss skips it too, and so does a loss spike when
     ``train.skip_loss_spikes`` (every rank agrees: they share the means of step 4).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from divprec.metrics.reduce import TokenStatSums, reduce_token_means
from divprec.parallel.deepspeed_engine import discard_gradients, set_learning_rate
from divprec.train.build import Run
from divprec.train.loss_averaging import token_loss_scale
from divprec.train.microbatch import empty_stat_sums, make_forward_step
from divprec.train.moe import update_router_expert_bias
from divprec.train.schedule import learning_rate


@dataclass
class StepResult:
    """What one step did. ``means`` are token means over the world (loss, lm_loss, entropy, ...);
    ``skipped`` says why the update was not applied (e.g. "loss not finite"), else None;
    ``extra``: MoE balance and loss-spike z-scores, when those are on."""

    step: int  # optimizer steps done, this one included
    lr: float
    means: dict[str, float]
    grad_norm: float
    skipped: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


def accumulate_gradients(run: Run, batches: Iterator[dict[str, torch.Tensor]]) -> TokenStatSums:
    """Steps 2 and 3: the schedule's forward and backward over this step's microbatches, then the
    data-parallel reduction. Returns this rank's stat sums (empty except on the last stage).

    Collectives: with ``train.loss_averaging=token``, one all-reduce SUM over the data-parallel
    group (the token count); the schedule's pipeline sends/receives; the TP and DP gradient
    reductions.
    """
    cfg, ctx = run.cfg, run.ctx
    step_batches = [next(batches) for _ in range(run.num_microbatches)]
    token_scale = None
    if cfg.train.loss_averaging == "token":
        token_scale = token_loss_scale(step_batches, ctx.data_group)
    stat_sums = TokenStatSums()
    run.engine.module.train()
    run.forward_backward(
        forward_step_func=make_forward_step(stat_sums, ctx.device, token_scale),
        data_iterator=iter(step_batches),
        model=[run.grad_sync.schedule_model()],
        num_microbatches=run.num_microbatches,
        seq_length=cfg.train.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=False,
    )
    run.grad_sync.after_backward()
    return stat_sums


def train_step(run: Run, batches: Iterator[dict[str, torch.Tensor]], step: int) -> StepResult:
    """Run step ``step`` (0-based) of ``run`` on every rank. Collectives: those of
    :func:`accumulate_gradients`, one all-reduce SUM of the stats, the MoE token counts, and
    DeepSpeed's gradient-norm reductions."""
    cfg, ctx, engine = run.cfg, run.ctx, run.engine
    lr = learning_rate(step, cfg.optim, cfg.train.steps)  # 1
    set_learning_rate(engine, lr)
    stat_sums = accumulate_gradients(run, batches)  # 2, 3
    # 4: only the last stage has stats; the others add zeros. TP ranks hold identical stats,
    # which scales every sum and the token count alike, so the means are exact.
    sums = stat_sums.totals() if ctx.is_last_stage else empty_stat_sums(ctx.device)
    means = reduce_token_means(sums, group=None)
    means.pop("num_tokens", None)
    moe = {}
    if cfg.model.is_moe and cfg.model.moe_router_expert_bias:  # 5
        moe = update_router_expert_bias(engine.module, cfg.model.moe_router_bias_update_rate)
    # 6: a non-finite loss, or a loss spike when so configured, skips the update here; DeepSpeed
    # skips one whose gradient norm is not finite.
    skipped = None
    if not (math.isfinite(means["loss"]) and math.isfinite(means["lm_loss"])):
        skipped = "loss not finite"
    elif run.spikes is not None:
        skipped = run.spikes.skip_reason(means["loss"])
    if skipped is None:
        engine.step()
        if not engine.was_step_applied():
            skipped = "grad_norm not finite"
    else:
        discard_gradients(engine)
    grad_norm = _grad_norm(engine) if skipped is None or skipped.startswith("grad") else math.nan
    spikes = run.spikes.record(means["loss"], grad_norm, skipped) if run.spikes else {}
    return StepResult(step + 1, lr, means, grad_norm, skipped, {**moe, **spikes})


def _grad_norm(engine) -> float:
    """DeepSpeed's global gradient norm of the last step (before clipping; inf when it was not
    finite and DeepSpeed skipped the update)."""
    norm = engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        norm = norm.item()
    return float(norm) if norm is not None else float("nan")
