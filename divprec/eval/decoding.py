"""Next-token logits for a batch of growing sequences: KV-cached, or recomputed from scratch.

Both decoders serve equal-length rows (sampling groups prompts by length): ``prefill`` the
prompts, then ``step`` one token per row; ``keep`` drops finished rows. They return float32
logits ``[b, V]`` over the tokenizer's vocabulary, gathered over tensor parallelism.

:class:`CachedDecoder` uses megatron-core's own static KV cache (``StaticInferenceContext``): the
prompt runs once, then each step runs one token per row against the cached keys and values, so a
completion of T tokens costs T token-forwards instead of ~T^2/2. RoPE is applied to the cached
(unrotated) keys at their positions; only the last position's logits are materialised.
:class:`RecomputeDecoder` re-runs the whole sequence every step (the reference; any model with a
``logits(tokens, last_only=True)`` method).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class Decoder(Protocol):
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def step(self, ids: torch.Tensor) -> torch.Tensor: ...
    def keep(self, rows: torch.Tensor) -> None: ...


class RecomputeDecoder:
    """No cache: every step runs ``logits_fn`` over the full sequences ``[b, s]``."""

    def __init__(self, logits_fn: Callable[..., torch.Tensor]) -> None:
        self.logits_fn = logits_fn
        self.seqs: torch.Tensor | None = None

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seqs = tokens
        return self.logits_fn(tokens, last_only=True)  # [b, V]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.seqs is not None, "prefill first"
        self.seqs = torch.cat([self.seqs, ids[:, None]], dim=1)  # [b, s + 1]
        return self.logits_fn(self.seqs, last_only=True)

    def keep(self, rows: torch.Tensor) -> None:
        assert self.seqs is not None, "prefill first"
        self.seqs = self.seqs[rows]


class CachedDecoder:
    """megatron-core's static KV cache for up to ``batch_size`` rows of ``max_length`` tokens.

    The model must be in eval mode (megatron uses the inference context only then).
    """

    def __init__(
        self, model: torch.nn.Module, vocab_size: int, batch_size: int, max_length: int
    ) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        if model.training:
            raise ValueError("CachedDecoder needs the model in eval mode")
        self.model = model
        self.vocab_size = vocab_size
        self.context = StaticInferenceContext(batch_size, max_length)
        self.length = 0  # tokens cached per row

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        positions = torch.arange(self.length, self.length + s, device=tokens.device)
        logits = self.model(
            tokens,
            positions.expand(b, s),  # [b, s]
            None,
            inference_context=self.context,
            runtime_gather_output=True,
        )  # [b, 1, V_padded]: only the last position is materialised
        self.length += s
        self.context.increment_sequence_len_offset(s)
        return logits[:, -1, : self.vocab_size].float()

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.length:
            raise ValueError("CachedDecoder: prefill once per batch")
        return self._forward(tokens)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(ids[:, None])  # [b, 1]

    def keep(self, rows: torch.Tensor) -> None:
        # The cache is [max_length, batch, groups, head_dim] per layer: keep the rows' columns.
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in memory.items():
            memory[layer] = (keys[:, rows], values[:, rows])
