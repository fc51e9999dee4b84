"""In-loop validation: forward-only passes over the first global batches of the validation split.

The loop (train/trainer.py) asks the :class:`Validator` after each step whether validation is due,
and merges what it returns into that step's metrics before the hooks run, so the sinks log it with
the step. It is an object the loop calls, not a hook: hooks only read metrics, and a hook that
wrote them would make the hooks' order part of the metrics' meaning.

The same batches every time: each evaluation reads global batches ``0 .. eval.iters - 1`` of the
validation split from a fresh iterator, cut across data-parallel ranks as training batches are
(data/batches.py), so the val metrics are the same at every layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from divprec.data.batches import build_batch_iterator
from divprec.metrics.reduce import TokenStatSums, reduce_token_means
from divprec.train.build import Run
from divprec.train.microbatch import empty_stat_sums, make_forward_step

logger = logging.getLogger(__name__)

# The token means an evaluation reports, under their metrics names (val_ppl is added).
VAL_METRICS = ("lm_loss", "entropy", "topk_mass", "target_rank")


class Validator:
    """Evaluates ``eval.iters`` global batches every ``eval.interval`` steps and after the last."""

    def __init__(self, run: Run, stop_requested: Callable[[], bool]) -> None:
        """``stop_requested``: the ranks' agreement on a preemption signal (a collective every
        rank calls between validation batches)."""
        self.run, self.cfg = run, run.cfg.eval
        self.stop_requested = stop_requested

    def due(self, step: int, total_steps: int) -> bool:
        """After step ``step`` (1-based count of steps done)."""
        interval = self.cfg.interval
        return interval > 0 and (step % interval == 0 or step == total_steps)

    def evaluate(self) -> dict[str, float]:
        """``val_lm_loss``, ``val_ppl``, ``val_entropy``, ``val_topk_mass``, ``val_target_rank``:
        token means over every rank. Empty when a preemption signal stopped it early (a partial
        evaluation would not be comparable); the preemption hook then saves.

        Collectives, per global batch: the watcher's all-reduce MAX, the schedule's pipeline
        sends/receives; then one all-reduce SUM of the stats.
        """
        run, ctx, train = self.run, self.run.ctx, self.run.cfg.train
        batches = build_batch_iterator(
            run.datasets.valid,
            0,
            train.micro_batch_size,
            ctx.data_rank,
            ctx.data_size,
            global_batch_size=train.global_batch_size,
            num_workers=run.cfg.data.num_workers,
        )
        stat_sums = TokenStatSums()
        forward_step = make_forward_step(stat_sums, ctx.device)
        module = run.engine.module
        module.eval()  # dropout off; back to train mode below whatever happens
        try:
            for _ in range(self.cfg.iters):
                if self.stop_requested():
                    logger.warning("validation stopped early by a preemption signal")
                    return {}
                # no_grad also keeps megatron-core's MoE routers from counting validation tokens
                # into the next expert-bias update (they count only with grad enabled).
                with torch.no_grad():
                    run.forward_backward(
                        forward_step_func=forward_step,
                        data_iterator=batches,
                        model=[run.grad_sync.schedule_model()],
                        num_microbatches=run.num_microbatches,
                        seq_length=train.seq_length,
                        micro_batch_size=train.micro_batch_size,
                        forward_only=True,
                    )
        finally:
            module.train()
        # As in train_step: only the last stage has stats; TP ranks repeat theirs, which scales
        # every sum and the token count alike.
        sums = stat_sums.totals() if ctx.is_last_stage else empty_stat_sums(ctx.device)
        means = reduce_token_means(sums, group=None)
        metrics = {f"val_{name}": means[name] for name in VAL_METRICS}
        metrics["val_ppl"] = _perplexity(means["lm_loss"])
        return metrics


def _perplexity(lm_loss: float) -> float:
    try:
        return math.exp(lm_loss)
    except OverflowError:  # a diverged model: report inf, not a crash
        return math.inf
