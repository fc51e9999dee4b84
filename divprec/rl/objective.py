"""The GRPO objective as DAPO runs it: group-normalised advantages, dynamic sampling, clip-higher.

- Advantages: each prompt's G rewards are normalised within the group, (r - mean) / (std + eps)
  (std unbiased, as torch.std and verl's GRPO estimator). No value function, no KL term.
- Dynamic sampling: a group whose rewards are all equal has zero advantage everywhere and only
  dilutes the token mean; it is dropped from the batch.
- Clipped surrogate with asymmetric bounds: ratio r = pi / pi_behaviour per token, loss per token
  max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); clip_high > clip_low (clip-higher) leaves
  more room to raise unlikely tokens, which keeps entropy from collapsing.
- Token-level averaging: the loss is the mean over all response tokens of the batch, so long
  responses weigh in proportion to their length (DAPO), not the mean of per-sequence means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-6


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """rewards ``[P, G]`` (G samples of each of P prompts) -> advantages ``[P, G]``."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, samples >= 2], got {tuple(rewards.shape)}")
    rewards = rewards.double()
    mean = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    std = rewards.std(dim=1, keepdim=True)  # [P, 1], unbiased
    return ((rewards - mean) / (std + eps)).float()


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Dynamic sampling: ``[P]`` bool, True for groups whose rewards are not all equal."""
    return (rewards != rewards[:, :1]).any(dim=1)


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, differentiable: sum of token losses / num_tokens
    clip_fraction: float  # share of tokens where the clipped term is the active one
    ratio_mean: float


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    num_tokens: int | float | None = None,
) -> PolicyLoss:
    """Clip-higher PPO surrogate averaged over tokens.

    logprobs (current policy, differentiable), old_logprobs (behaviour policy), advantages (the
    sequence's advantage broadcast over its tokens) and mask (1 for response tokens): all
    ``[B, T]``. ``num_tokens``: the denominator, when the batch is one micro-batch of a larger
    one (token mean over the whole batch); default ``mask.sum()``.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    denominator = float(num_tokens) if num_tokens is not None else float(mask.sum())
    denominator = max(denominator, 1.0)
    loss = (per_token * mask).sum() / denominator
    with torch.no_grad():
        count = max(float(mask.sum()), 1.0)
        clip_fraction = float(((clipped > unclipped).to(mask.dtype) * mask).sum()) / count
        ratio_mean = float((ratio * mask).sum()) / count
    return PolicyLoss(loss, clip_fraction, ratio_mean)
