"""Configuration of the reward-shaped next-token objective (the math: docs/loss.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

POSITIVE_FORMS = ("power", "product")
KERNELS = ("auto", "compiled", "eager", "triton")


@dataclass
class ShapedLossConfig:
    """Rewards of the one-step policy gradient that generalises cross-entropy.

    - ``beta``: shapes the ground-truth reward. < 0 favours precision (lower entropy), > 0 diversity.
    - ``topk``: size of the set K_t of highest-probability tokens (over the whole vocabulary).
    - ``topk_negative_reward``: reward of negatives inside K_t (the paper's lambda-tilde); > 0 keeps
      plausible alternatives alive.
    - ``tail_negative_reward``: reward of negatives outside K_t (the paper's lambda-hat); < 0
      suppresses the long tail.
    - ``positive_form``: "power", r = (1/pi)^((1-pi)^beta), or "product", r = (1-pi)^beta / pi.
    - ``kernel``: how the loss's two passes over the logits run, not what they compute: "compiled"
      (torch.compile: one fused loop each, C++ on CPU, Triton on CUDA), "eager" (plain torch ops),
      "triton" (CUDA: the three Triton kernels of divprec.loss.triton_kernels: step 1's exact
      top-k by a radix select, 5 reads of each fp32 row or 3 of a bf16 one, then the forward's
      pass and the backward, one read each; GPU timings not yet measured; on CPU only in Triton's
      interpreter, TRITON_INTERPRET=1, for tests), or
      "auto" (CUDA: triton when it imports and passes a first-use self-check, else as below;
      otherwise compiled for calls of at least 2^22 logits per shard, where fusion pays for the
      seconds of compilation, else eager; compiled falls back to eager with a warning when
      compilation fails).
    - ``fused_linear``: the model computes its output layer's matmul and this loss together
      (divprec.loss.fused_linear): in training the vocab-parallel logits never exist whole.
      Evaluation and sampling still get plain logits.
    - ``fused_chunk_tokens``: tokens per chunk of the fused output layer + loss
      (divprec.loss.fused_linear): the logits exist one chunk at a time. 0 (the default): as many
      tokens as fit a budget of 192 MiB of fp32 logits per rank (331 at a shard of 151936).

    beta = 0 with both negative rewards 0 is exactly cross-entropy.
    """

    beta: float = 0.0
    topk: int = 100
    topk_negative_reward: float = 0.0
    tail_negative_reward: float = 0.0
    positive_form: str = "power"
    kernel: str = "auto"
    fused_linear: bool = False
    fused_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("beta", "topk_negative_reward", "tail_negative_reward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"loss.{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"loss.{name} must be finite, got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"loss.topk must be an integer >= 1, got {self.topk!r}")
        if self.positive_form not in POSITIVE_FORMS:
            raise ValueError(
                f"loss.positive_form must be one of {', '.join(POSITIVE_FORMS)}, "
                f"got {self.positive_form!r}"
            )
        if not isinstance(self.fused_linear, bool):
            raise ValueError(f"loss.fused_linear must be true or false, got {self.fused_linear!r}")
        if (
            isinstance(self.fused_chunk_tokens, bool)
            or not isinstance(self.fused_chunk_tokens, int)
            or self.fused_chunk_tokens < 0
        ):
            raise ValueError(
                "loss.fused_chunk_tokens must be an integer >= 0 (0: from the memory budget), "
                f"got {self.fused_chunk_tokens!r}"
            )
        if self.kernel not in KERNELS:
            raise ValueError(
                f"loss.kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}"
            )

    @property
    def is_cross_entropy(self) -> bool:
        """True when the objective reduces exactly to cross-entropy."""
        return (
            self.beta == 0.0
            and self.topk_negative_reward == 0.0
            and self.tail_negative_reward == 0.0
        )
