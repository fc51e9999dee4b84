"""The pre-training loop: build the run, then steps and end-of-step hooks.

One code path on CPU (gloo, megatron-core bridged by divprec.parallel.cpu) and GPU (NCCL). A
step, numbered as in divprec.train.step:
  1. learning rate (train/schedule.py)
  2. megatron-core's schedule runs the microbatches (train/microbatch.py, averaged per
     train/loss_averaging.py); the last stage computes the shaped loss over the vocab-parallel
     logits (model/shaped_gpt.py -> loss/)
  3. gradients: TP hooks and DeepSpeed's data-parallel reduction (parallel/deepspeed_engine.py
     GradientSync, parallel/tp_grads.py)
  4. stat token means over the world (metrics/reduce.py)
  5. MoE expert bias (train/moe.py)
  6. DeepSpeed's clipped AdamW update on the ZeRO partitions, skipped when not finite
Every ``eval.interval`` steps and after the last, validation (train/validation.py) adds the
val_ metrics to the step's. Then the hooks, in order: metrics sinks (metrics/), the divergence
guard (train/guards.py), checkpointing (train/checkpointing.py -> checkpoint/manager.py),
preemption (train/preemption.py). The run is built by train/build.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from divprec.checkpoint.checkpointer import Progress
from divprec.config.schema import PretrainConfig, to_dict
from divprec.data.batches import build_batch_iterator
from divprec.metrics.callback import Callback, TrainState
from divprec.metrics.factory import build_callbacks
from divprec.metrics.throughput import Throughput, device_peak_tflops
from divprec.train.build import Run, build_run
from divprec.train.checkpointing import CheckpointHook
from divprec.train.guards import DivergenceGuard
from divprec.train.preemption import PreemptionHook, PreemptionWatcher
from divprec.train.step import StepResult, train_step
from divprec.train.validation import Validator


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports back; ``history`` holds the logged metrics."""

    step: int
    consumed_samples: int
    run_dir: str
    history: list[dict[str, float]] = field(default_factory=list)


def pretrain(cfg: PretrainConfig, extra_callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``cfg`` (already validated) in this process's place of the launched world.

    ``extra_callbacks`` run after the logging sinks. Resumes per ``checkpoint.*``; saves every
    ``checkpoint.interval`` steps and at the end. On SIGTERM or the preemption signal: saves
    after the current step and raises :class:`~divprec.train.preemption.Preempted` (exit 75).
    After ``train.max_skipped_steps`` non-finite steps in a row: raises
    :class:`~divprec.train.guards.Diverged` (exit 3).
    """
    # Before any child process exists: they inherit the blocked signals (train/preemption.py).
    watcher = PreemptionWatcher(cfg.train.preemption_signal)
    watcher.install()
    try:
        run = build_run(cfg)
        try:
            return _train(run, watcher, extra_callbacks)
        finally:
            run.release()
    finally:
        watcher.uninstall()


def _train(
    run: Run, watcher: PreemptionWatcher, extra_callbacks: Sequence[Callback]
) -> TrainResult:
    cfg, ctx, train = run.cfg, run.ctx, run.cfg.train
    progress = run.checkpoints.resume() or Progress(step=0, consumed_samples=0)
    batches = build_batch_iterator(
        run.datasets.train,
        progress.consumed_samples,
        train.micro_batch_size,
        ctx.data_rank,
        ctx.data_size,
        global_batch_size=train.global_batch_size,
        num_workers=cfg.data.num_workers,
    )
    hooks = [
        *build_callbacks(cfg.logging),
        *extra_callbacks,
        DivergenceGuard(train.max_skipped_steps),
        CheckpointHook(run.checkpoints),
        PreemptionHook(watcher, run.checkpoints, ctx.device),
    ]
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
    # Called by the loop, before the hooks: its metrics join the step's (train/validation.py).
    validator = Validator(run, lambda: watcher.should_stop(ctx.device))
    history: list[dict[str, float]] = []
    try:
        for hook in hooks:
            hook.on_train_start(state)
        throughput.start()
        for step in range(progress.step, train.steps):
            result = train_step(run, batches, step)
            state.step, state.skipped = result.step, result.skipped
            state.consumed_samples += train.global_batch_size
            throughput.step(train.global_batch_size * train.seq_length)
            metrics = None
            validate_now = validator.due(state.step, train.steps)
            if validate_now or cfg.logging.should_log(state.step, train.steps):
                metrics = {**_step_metrics(result, state), **throughput.compute()}
                if validate_now:
                    metrics.update(validator.evaluate())
                    throughput.start()  # validation time is not training throughput
                history.append(metrics)
            for hook in hooks:
                hook.on_step_end(state, metrics)
    finally:
        for hook in hooks:
            hook.on_train_end(state)
    return TrainResult(state.step, state.consumed_samples, cfg.run.dir, history)


def _step_metrics(result: StepResult, state: TrainState) -> dict[str, float]:
    return {
        "step": result.step,
        **result.means,
        "grad_norm": result.grad_norm,
        "lr": result.lr,
        "consumed_samples": state.consumed_samples,
        **result.extra,  # MoE: this stage's layers (rank 0: the first stage)
    }
