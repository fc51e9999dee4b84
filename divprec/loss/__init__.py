"""The reward-shaped next-token objective of "Diversity or Precision?" (arXiv 2512.22955).

Public API: :class:`ShapedLossConfig`, :func:`shaped_loss`, :func:`vocab_parallel_shaped_loss`,
:func:`fused_linear_shaped_loss` (the output layer's matmul and the loss, in chunks of tokens);
for benchmarks, :mod:`divprec.loss.step_times` (the time of each step) and the step-1 strategies
of :mod:`divprec.loss.local_top`. The files, one idea each, are listed in docs/loss.md.
"""

from divprec.loss.config import ShapedLossConfig
from divprec.loss.fused_linear import fused_linear_shaped_loss
from divprec.loss.vocab_parallel import STAT_NAMES, shaped_loss, vocab_parallel_shaped_loss

__all__ = [
    "STAT_NAMES",
    "ShapedLossConfig",
    "fused_linear_shaped_loss",
    "shaped_loss",
    "vocab_parallel_shaped_loss",
]
