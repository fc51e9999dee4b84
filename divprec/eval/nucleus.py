"""Choosing the next token from logits: temperature, nucleus (top-p) filtering, inverse-CDF draws.

Draws take their uniforms from the caller (one per row), so a row's tokens depend on its own
random stream only, not on which other rows share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NextTokens:
    """One decoding step for ``b`` rows."""

    ids: torch.Tensor  # [b] int64, the chosen tokens
    logprobs: torch.Tensor  # [b] log-probability of ids under the temperature-scaled model
    entropies: torch.Tensor  # [b] entropy of the temperature-scaled model distribution


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero everything outside the nucleus and renormalise; probs ``[b, V]`` -> ``[b, V]``.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p`` (ties at
    the boundary broken towards lower token ids); it always holds the most likely token.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [b, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [b, V]
    keep_sorted = mass_before < top_p  # the first token always (mass_before = 0)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to vocab order
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: probs ``[b, V]`` (rows sum to 1), uniforms ``[b]`` in [0, 1)."""
    cdf = probs.double().cumsum(dim=-1)  # [b, V]
    target = uniforms.double().unsqueeze(-1) * cdf[:, -1:]  # [b, 1]
    ids = (cdf <= target).sum(dim=-1)  # first index whose cdf exceeds the target
    # Float rounding can put the target past the last non-zero entry: take the last one kept.
    last_nonzero = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(ids, last_nonzero)


def next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor | None
) -> NextTokens:
    """Choose one token per row of ``logits`` ``[b, V]``.

    ``temperature`` 0 is greedy (argmax; logprobs and entropies then refer to temperature 1).
    Otherwise tokens come from softmax(logits / temperature) restricted to the top-p nucleus.
    Logprobs and entropies are those of the temperature-scaled distribution before the nucleus
    cut: the behaviour policy as the RL update recomputes it.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    logp = torch.log_softmax(scaled, dim=-1)  # [b, V]
    probs = logp.exp()
    entropies = -(probs * logp).nan_to_num().sum(dim=-1)  # 0 * -inf terms count as 0
    if temperature == 0:
        ids = logits.argmax(dim=-1)
    else:
        if uniforms is None:
            raise ValueError("sampling with temperature > 0 needs uniforms")
        ids = draw(top_p_filter(probs, top_p), uniforms)
    return NextTokens(ids, logp.gather(-1, ids[:, None]).squeeze(-1), entropies)
