"""An independent float64 policy-gradient computation of the shaped objective.

J = sum_a sg(r_a) pi_a, differentiated by autograd; the loss value is -sum_a sg(pi_a r_a) log pi_a.
Written directly from the paper's rewards, sharing no code with divprec.loss.
"""

from __future__ import annotations

import torch

from divprec.loss import ShapedLossConfig


def reference(
    logits: torch.Tensor, target: torch.Tensor, cfg: ShapedLossConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, grad of the summed loss w.r.t. logits, stats), all float64. logits: [n, V]."""
    z = logits.detach().double().requires_grad_(True)
    pi = torch.softmax(z, dim=-1)
    pi_x = pi.gather(-1, target[:, None])[:, 0]
    if cfg.positive_form == "power":
        r_pos = (1.0 / pi_x) ** ((1.0 - pi_x) ** cfg.beta)
    else:
        r_pos = (1.0 - pi_x) ** cfg.beta / pi_x
    kth = torch.topk(z.detach(), cfg.topk, dim=-1).values[:, -1:]
    in_topk = z.detach() >= kth  # ties at the k-th value are in K_t
    reward = torch.where(in_topk, cfg.topk_negative_reward, cfg.tail_negative_reward).double()
    reward = reward.scatter(-1, target[:, None], r_pos[:, None]).detach()
    objective = (reward * pi).sum(-1)  # J
    (-objective).sum().backward()
    log_pi = torch.log_softmax(z.detach(), dim=-1)
    p = pi.detach()
    loss = -((reward * p) * log_pi).sum(-1)
    stats = {
        "nll": -log_pi.gather(-1, target[:, None])[:, 0],
        "entropy": -(p * log_pi).sum(-1),
        "topk_mass": (p * in_topk).sum(-1),
        "target_prob": p.gather(-1, target[:, None])[:, 0],
        "target_rank": (z.detach() > z.detach().gather(-1, target[:, None])).sum(-1).double(),
    }
    return loss, z.grad, stats


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are 0)."""
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / scale if scale > 0 else diff
