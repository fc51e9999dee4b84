"""The reward-shaped next-token objective of "Diversity or Precision?" (arXiv 2512.22955).

Public API: :class:`ShapedLossConfig`, :func:`shaped_loss`, :func:`vocab_parallel_shaped_loss`;
for benchmarks, :mod:`divprec.loss.step_times` (the time of each step) and the step-1 strategies
of :mod:`divprec.loss.local_top`. The files, one idea each, are listed in docs/loss.md.
"""

from divprec.loss.config import ShapedLossConfig
from divprec.loss.vocab_parallel import STAT_NAMES, shaped_loss, vocab_parallel_shaped_loss

__all__ = ["STAT_NAMES", "ShapedLossConfig", "shaped_loss", "vocab_parallel_shaped_loss"]
