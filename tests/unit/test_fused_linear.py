"""fused_linear_shaped_loss at one process against the unfused output layer + loss, and float64."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from loss_reference import reference

from divprec.loss import STAT_NAMES, ShapedLossConfig, fused_linear_shaped_loss, shaped_loss
from divprec.loss.fused_linear import FUSED_CHUNK_LOGIT_BYTES, fused_chunk_tokens

VOCAB, HIDDEN = 96, 16
PAPER = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1)


def fused_case(tokens=(5, 2), seed: int = 0):
    """hidden [s, b, h], weight [V, h] (logits of spread ~3), targets [s, b], a 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.75
    target = torch.randint(0, VOCAB, tokens, generator=g)
    mask = (torch.rand(tokens, generator=g) > 0.3).float()
    return hidden, weight, target, mask


def unfused(hidden, weight, target, cfg, token_weights):
    """The output layer's matmul, then the loss; gradients of sum(token_weights * loss)."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, stats = shaped_loss(h @ w.t(), target, cfg)
    (loss * token_weights).sum().backward()
    return loss.detach(), stats, h.grad, w.grad


def fused(hidden, weight, target, cfg, token_weights, loss_mask):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, stats = fused_linear_shaped_loss(h, w, target, cfg, loss_mask=loss_mask)
    (loss * token_weights).sum().backward()
    return loss.detach(), stats, h.grad, w.grad


def assert_same(actual, expected, msg: str = "") -> None:
    loss, stats, grad_h, grad_w = actual
    ref_loss, ref_stats, ref_h, ref_w = expected
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=msg)
    for name in STAT_NAMES:
        torch.testing.assert_close(
            stats[name], ref_stats[name], rtol=1e-5, atol=1e-6, msg=f"{msg} {name}"
        )
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-5, atol=1e-6, msg=f"{msg} grad hidden")
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-6, msg=f"{msg} grad weight")


# chunks of 3 and 4 tokens do not divide 10; 0 is the budget's default (one chunk here)
@pytest.mark.parametrize("chunk", [1, 3, 4, 0])
def test_fused_equals_unfused_with_loss_mask(chunk):
    hidden, weight, target, mask = fused_case()
    cfg = replace(PAPER, fused_chunk_tokens=chunk)
    scale = 1.0 / mask.sum()  # a masked mean: the backward reuses the forward's gradients
    expected = unfused(hidden, weight, target, cfg, mask * scale)
    assert_same(fused(hidden, weight, target, cfg, mask * scale, mask), expected, f"chunk {chunk}")
    # Without a mask the forward's gradients are for all ones; a sum of the loss reuses them.
    ones = torch.ones_like(mask)
    assert_same(
        fused(hidden, weight, target, cfg, ones, None),
        unfused(hidden, weight, target, cfg, ones),
        f"chunk {chunk}, no mask",
    )


def test_other_reductions_run_a_second_pass_with_the_same_result():
    """A gradient that is not a multiple of the mask (per-row weights) takes the second pass."""
    hidden, weight, target, mask = fused_case(seed=1)
    cfg = ShapedLossConfig(beta=0.5, topk=7, topk_negative_reward=0.1, fused_chunk_tokens=3)
    row_weights = torch.linspace(0.1, 1.0, target.numel()).reshape(target.shape)
    assert_same(
        fused(hidden, weight, target, cfg, row_weights, mask),
        unfused(hidden, weight, target, cfg, row_weights),
        "second pass",
    )


def test_fused_matches_the_float64_policy_gradient():
    hidden, weight, target, mask = fused_case(tokens=(7,), seed=2)
    cfg = ShapedLossConfig(
        beta=-0.5, topk=5, topk_negative_reward=0.2, tail_negative_reward=-0.1, fused_chunk_tokens=2
    )
    loss, stats, grad_h, grad_w = fused(hidden, weight, target, cfg, mask, mask)
    ref_loss, ref_grad_logits, ref_stats = reference(hidden @ weight.t(), target, cfg)
    g = ref_grad_logits * mask.double()[:, None]  # d sum(mask * loss) / d logits, float64
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name].double(), ref_stats[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h.double(), g @ weight.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w.double(), g.t() @ hidden.double(), rtol=1e-5, atol=1e-6)


def test_gradients_only_where_asked_and_none_without_grad():
    hidden, weight, target, _ = fused_case()
    w = weight.clone().requires_grad_(True)
    loss, _ = fused_linear_shaped_loss(hidden, w, target, PAPER)  # a frozen input: no grad
    loss.sum().backward()
    expected = unfused(hidden, weight, target, PAPER, torch.ones(target.shape))
    torch.testing.assert_close(w.grad, expected[3], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss, stats = fused_linear_shaped_loss(hidden, w, target, PAPER)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)


def test_chunk_tokens_default_fits_the_budget_and_bad_input_is_named():
    assert fused_chunk_tokens(ShapedLossConfig(), 151936) == FUSED_CHUNK_LOGIT_BYTES // (4 * 151936)
    assert fused_chunk_tokens(ShapedLossConfig(fused_chunk_tokens=7), 151936) == 7
    with pytest.raises(ValueError, match="loss.fused_chunk_tokens"):
        ShapedLossConfig(fused_chunk_tokens=-1)
    hidden, weight, target, mask = fused_case()
    with pytest.raises(ValueError, match="weight"):
        fused_linear_shaped_loss(hidden, weight[:, :-1], target, PAPER)
    with pytest.raises(ValueError, match="loss_mask"):
        fused_linear_shaped_loss(hidden, weight, target, PAPER, loss_mask=mask[:-1])
    with pytest.raises(ValueError, match="disagree on tokens"):
        fused_linear_shaped_loss(hidden[:-1], weight, target, PAPER)
