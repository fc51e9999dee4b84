"""shaped_loss against an independent float64 policy-gradient computation (single process)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from compile_support import KERNELS
from loss_reference import reference, relative_error

from divprec.loss import STAT_NAMES, ShapedLossConfig, shaped_loss

VOCAB = 64


def make_case(rows: int = 12, vocab: int = VOCAB, scale: float = 3.0, seed: int = 0):
    """Logits with targets at the argmax, the argmin and random positions (in and out of top-k)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[0::3] = logits[0::3].argmax(-1)
    target[1::3] = logits[1::3].argmin(-1)
    return logits, target


def run(logits: torch.Tensor, target: torch.Tensor, cfg: ShapedLossConfig):
    z = logits.clone().requires_grad_(True)
    loss, stats = shaped_loss(z, target, cfg)
    loss.sum().backward()
    return loss, z.grad, stats


GRID = list(
    itertools.product(
        ["power", "product"],
        [-0.5, -0.25, 0.0, 0.5],
        [1, 5, VOCAB],
        [(0.1, -0.1), (-0.2, 0.3), (0.0, 0.0)],
    )
)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("form", "beta", "topk", "rewards"), GRID)
def test_matches_float64_policy_gradient(form, beta, topk, rewards, kernel):
    cfg = ShapedLossConfig(
        beta=beta,
        topk=topk,
        topk_negative_reward=rewards[0],
        tail_negative_reward=rewards[1],
        positive_form=form,
        kernel=kernel,
    )
    logits, target = make_case(seed=hash((form, beta, topk, rewards)) % 1000)
    loss, grad, stats = run(logits, target, cfg)
    ref_loss, ref_grad, ref_stats = reference(logits, target, cfg)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert relative_error(grad, ref_grad) < 1e-5
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name].double(), ref_stats[name], rtol=1e-5, atol=1e-5)
        assert stats[name].dtype == torch.float32 and not stats[name].requires_grad


def test_targets_inside_and_outside_k_t_are_told_apart_and_both_right():
    # The fixture puts targets in K_t and out of it; divprec must see which (its target_rank:
    # the target is in K_t iff fewer than k logits are larger) and get both kinds right.
    logits, target = make_case()
    cfg = ShapedLossConfig(beta=-0.25, topk=5, topk_negative_reward=0.2, tail_negative_reward=-0.1)
    loss, grad, stats = run(logits, target, cfg)
    kth = torch.topk(logits, cfg.topk, dim=-1).values[:, -1]
    inside = logits.gather(-1, target[:, None])[:, 0] >= kth
    assert inside.any() and (~inside).any()
    assert torch.equal(stats["target_rank"] < cfg.topk, inside)
    ref_loss, ref_grad, ref_stats = reference(logits, target, cfg)
    torch.testing.assert_close(stats["target_rank"].double(), ref_stats["target_rank"])
    for rows in (inside, ~inside):
        torch.testing.assert_close(loss[rows].double(), ref_loss[rows], rtol=1e-5, atol=1e-6)
        for name in STAT_NAMES:  # topk_mass counts the target's mass only when it is in K_t
            torch.testing.assert_close(
                stats[name][rows].double(), ref_stats[name][rows], rtol=1e-5, atol=1e-6
            )
        assert relative_error(grad[rows], ref_grad[rows]) < 1e-5
        # The target's own gradient: -(1 - pi_x) w plus the negatives' pull, K_t or not.
        x = target[rows]
        got = grad[rows].gather(-1, x[:, None])
        torch.testing.assert_close(
            got.double(), ref_grad[rows].gather(-1, x[:, None]), rtol=1e-5, atol=1e-7
        )


def test_defaults_equal_cross_entropy():
    logits, target = make_case(rows=16)
    cfg = ShapedLossConfig(topk=10)
    loss, grad, stats = run(logits, target, cfg)
    z = logits.clone().requires_grad_(True)
    ce = F.cross_entropy(z, target, reduction="none")
    ce.sum().backward()
    torch.testing.assert_close(loss, ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, z.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["nll"], ce.detach(), rtol=1e-6, atol=1e-6)


def test_leading_dims_and_bf16_input():
    logits, target = make_case(rows=12)
    logits3 = logits.reshape(3, 4, VOCAB).bfloat16()
    target3 = target.reshape(3, 4)
    cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1)
    z = logits3.clone().requires_grad_(True)
    loss, stats = shaped_loss(z, target3, cfg)
    loss.sum().backward()
    assert loss.shape == (3, 4) and loss.dtype == torch.float32
    assert z.grad.dtype == torch.bfloat16
    # bf16 values are exact in fp32: the fp32 computation on the same values is the reference.
    ref_loss, ref_grad, ref_stats = reference(logits3.float().reshape(12, VOCAB), target, cfg)
    torch.testing.assert_close(loss.reshape(-1).double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        z.grad.reshape(12, VOCAB).double(), ref_grad, rtol=1e-2, atol=1e-3 * ref_grad.abs().max()
    )
    torch.testing.assert_close(stats["entropy"].reshape(-1).double(), ref_stats["entropy"])


def near_one_hot(margin: float, rows: int = 6, vocab: int = VOCAB, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    target = torch.randint(0, vocab, (rows,), generator=g)
    logits[torch.arange(rows), target] += margin
    return logits, target


@pytest.mark.parametrize("form", ["power", "product"])
@pytest.mark.parametrize("beta", [-0.5, -0.25, 0.5])
def test_near_one_hot_is_accurate(form, beta):
    # pi_x rounds to 1 in fp32 at this margin: 1 - pi_x must come from the other tokens' mass.
    logits, target = near_one_hot(margin=25.0)
    cfg = ShapedLossConfig(
        beta=beta, topk=5, tail_negative_reward=-0.1, topk_negative_reward=0.05, positive_form=form
    )
    assert torch.softmax(logits, -1).gather(-1, target[:, None]).eq(1.0).all()
    loss, grad, stats = run(logits, target, cfg)
    ref_loss, ref_grad, ref_stats = reference(logits, target, cfg)
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(stats["entropy"].double(), ref_stats["entropy"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("form", ["power", "product"])
@pytest.mark.parametrize("beta", [-0.5, -0.25])
def test_one_hot_beyond_fp32_has_no_nan(form, beta):
    # Every other token underflows to exactly 0: gradients must be finite and tiny, not NaN.
    logits, target = near_one_hot(margin=500.0)
    for dtype in (torch.float32, torch.bfloat16):
        cfg = ShapedLossConfig(beta=beta, topk=5, tail_negative_reward=-0.1, positive_form=form)
        z = logits.to(dtype).detach().requires_grad_(True)
        loss, stats = shaped_loss(z, target, cfg)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(z.grad.float()).all()
        assert z.grad.float().abs().max() < 1e-6
        for name in STAT_NAMES:
            assert torch.isfinite(stats[name]).all(), name
        assert (stats["target_prob"] == 1.0).all()


def test_ties_at_kth_value_are_all_in_topk():
    # Integer logits: many ties at the k-th value.
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 4, (10, VOCAB), generator=g).float()
    target = torch.randint(0, VOCAB, (10,), generator=g)
    cfg = ShapedLossConfig(topk=3, topk_negative_reward=0.2, tail_negative_reward=-0.3, beta=-0.25)
    loss, grad, stats = run(logits, target, cfg)
    ref_loss, ref_grad, ref_stats = reference(logits, target, cfg)
    assert relative_error(grad, ref_grad) < 1e-5
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        stats["topk_mass"].double(), ref_stats["topk_mass"], rtol=1e-5, atol=1e-6
    )


def test_rows_span_several_chunks(monkeypatch):
    from divprec.loss import chunks

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", VOCAB * 5)  # 5 rows per chunk, 12 rows
    logits, target = make_case(rows=12)
    cfg = ShapedLossConfig(beta=0.5, topk=5, topk_negative_reward=0.1, tail_negative_reward=-0.05)
    loss, grad, _ = run(logits, target, cfg)
    ref_loss, ref_grad, _ = reference(logits, target, cfg)
    assert relative_error(grad, ref_grad) < 1e-5
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_the_logits_themselves_and_leaves_them_untouched(dtype):
    logits, target = make_case(rows=8)
    z = logits.clone().to(dtype).requires_grad_(True)
    before = z.detach().clone()
    loss, _ = shaped_loss(z, target, ShapedLossConfig(beta=-0.25, topk=5))
    # Nothing vocabulary-sized is allocated for the backward: the logits are saved, not a copy.
    vocab_sized = [t for t in loss.grad_fn.saved_tensors if t.numel() >= z.numel()]
    assert len(vocab_sized) == 1
    assert vocab_sized[0].untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    loss.sum().backward()
    assert torch.equal(z.detach(), before) and z.grad.dtype == dtype


def test_target_out_of_range_is_an_error():
    logits, target = make_case(rows=4)
    target[2] = VOCAB
    with pytest.raises(ValueError, match=r"target id 64 is outside the vocabulary \[0, 64\)"):
        shaped_loss(logits, target, ShapedLossConfig(topk=5))
    target[2] = -1
    with pytest.raises(ValueError, match="target id -1"):
        shaped_loss(logits, target, ShapedLossConfig(topk=5))


def test_topk_larger_than_vocab_is_an_error():
    logits, target = make_case(rows=4)
    with pytest.raises(ValueError, match="loss.topk=100 exceeds the vocabulary size 64"):
        shaped_loss(logits, target, ShapedLossConfig(topk=100))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk": 0}, "loss.topk must be an integer >= 1"),
        ({"topk": 2.5}, "loss.topk must be an integer >= 1"),
        ({"beta": float("nan")}, "loss.beta must be finite"),
        ({"tail_negative_reward": float("inf")}, "loss.tail_negative_reward must be finite"),
        ({"topk_negative_reward": "0.1"}, "loss.topk_negative_reward must be a number"),
        ({"positive_form": "focal"}, "loss.positive_form must be one of power, product"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapedLossConfig(**kwargs)


def test_cross_entropy_flag():
    assert ShapedLossConfig().is_cross_entropy
    assert not ShapedLossConfig(beta=-0.25).is_cross_entropy


# --- The block top-k path (wide vocabularies), K_t by indices, dense fallback, inplace, threads ---

WIDE = 4096  # wide enough for the block path at topk <= 32 (4096 / 32 = 128 blocks)


def make_wide_case(rows: int = 16, seed: int = 5):
    """Random rows (targets in and out of the top-k), tied rows, and a row with -inf logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, WIDE, generator=g) * 3
    target = torch.randint(0, WIDE, (rows,), generator=g)
    target[0::4] = logits[0::4].argmax(-1)
    # Ties at the k-th value spread over many blocks: integer logits.
    logits[2] = torch.randint(-3, 4, (WIDE,), generator=g).float()
    logits[3] = 0.0  # every token ties: K_t is the whole row (dense fallback)
    logits[3, 7] = 1.0
    logits[5, 100:3000] = float("-inf")  # masked tokens: e = 0, e * d = 0
    target[5] = 4000
    return logits, target


def assert_matches_reference(loss, grad, stats, logits, target, cfg):
    # The reference's 0 * log(0) is NaN: give it a finite stand-in for -inf (exp underflows to 0).
    ref_loss, ref_grad, ref_stats = reference(logits.clamp(min=-1e4), target, cfg)
    assert relative_error(grad, ref_grad) < 1e-5
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name].double(), ref_stats[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [1, 5, 32])
@pytest.mark.parametrize("rewards", [(0.0, -0.1), (0.2, -0.3), (0.1, 0.1)])
def test_block_path_matches_float64_policy_gradient(topk, rewards):
    from divprec.loss import block_topk

    assert block_topk.block_size(WIDE, topk) is not None  # the block path, not the whole-row top-k
    cfg = ShapedLossConfig(
        beta=-0.25, topk=topk, topk_negative_reward=rewards[0], tail_negative_reward=rewards[1]
    )
    logits, target = make_wide_case()
    loss, grad, stats = run(logits, target, cfg)
    assert_matches_reference(loss, grad, stats, logits, target, cfg)
    assert_head_gradient_marks_k_t(logits, target, cfg)


def assert_head_gradient_marks_k_t(logits, target, cfg):
    """K_t (z >= the k-th largest logit, ties included) is exactly where the head scale applies:
    with the head's negative reward set apart from the tail's, a probe of the gradient shows it."""
    kth = torch.topk(logits.float(), cfg.topk, dim=-1).values[:, -1:]
    expected = logits.float() >= kth
    probe = replace(cfg, topk_negative_reward=cfg.tail_negative_reward + 1.0)
    z = logits.clone().requires_grad_(True)
    loss, _ = shaped_loss(z, target, probe)
    loss.sum().backward()
    # grad_j = pi_j (C - r_j): the two scales differ by exactly 1 * pi_j between head and tail.
    _, ref_grad, _ = reference(logits.clamp(min=-1e4), target, probe)
    assert relative_error(z.grad, ref_grad) < 1e-5
    return expected


@pytest.mark.parametrize("without_sync", [False, True], ids=["cpu_recount", "cuda_recount"])
@pytest.mark.parametrize("topk", [1, 3, 20, 100])
def test_local_top_by_blocks_is_the_exact_top_k(topk, without_sync, monkeypatch):
    from divprec.loss import block_topk

    # The CUDA path's recount of spilled rows (no host synchronisation), run here on CPU.
    recount = block_topk.recount_spilled

    def forced(*args: torch.Tensor, without_sync: bool) -> torch.Tensor:
        return recount(*args, without_sync=forced_mode)

    forced_mode = without_sync
    monkeypatch.setattr(block_topk, "recount_spilled", forced)
    g = torch.Generator().manual_seed(topk)
    rows = [torch.randn(8, 32768, generator=g), torch.randint(-5, 6, (8, 32768), generator=g)]
    for z in (*rows, rows[0].bfloat16(), rows[1].bfloat16()):
        block = block_topk.block_size(z.shape[1], topk)
        assert block is not None
        row_max, values, ties = block_topk.local_top(z, topk, block)
        expected = torch.topk(z.float(), topk, dim=-1).values
        torch.testing.assert_close(
            values.sort(dim=-1, descending=True).values, expected, rtol=0, atol=0
        )
        torch.testing.assert_close(row_max, expected[:, 0], rtol=0, atol=0)
        at_least = (z.float() >= expected[:, -1:]).sum(dim=-1)  # K_t, ties included
        torch.testing.assert_close(ties, (at_least - topk).float(), rtol=0, atol=0)
        if z is rows[1]:  # integers tie at the k-th value
            assert bool((ties > 0).all())


def test_bf16_ties_at_the_threshold_on_the_block_path():
    # bf16 logits tie at the k-th value in almost every row; K_t must contain every tied token.
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(12, WIDE, generator=g) * 2).bfloat16()
    target = torch.randint(0, WIDE, (12,), generator=g)
    cfg = ShapedLossConfig(beta=-0.25, topk=20, topk_negative_reward=0.3, tail_negative_reward=-0.1)
    z = logits.clone().requires_grad_(True)
    loss, stats = shaped_loss(z, target, cfg)
    loss.sum().backward()
    # K_t has more than k members in some rows: every tie is in it.
    assert assert_head_gradient_marks_k_t(logits.float(), target, cfg).sum() > 12 * 20
    ref_loss, ref_grad, ref_stats = reference(logits.float(), target, cfg)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        stats["topk_mass"].double(), ref_stats["topk_mass"], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        z.grad.double(), ref_grad, rtol=1e-2, atol=1e-3 * ref_grad.abs().max()
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sub_chunk_rows", [1, 2, 32])
def test_chunks_in_threads_match_reference(monkeypatch, threads, sub_chunk_rows, kernel):
    from divprec.loss import chunks

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", WIDE * 5)  # 5 rows per chunk, 16 rows: 4 chunks
    monkeypatch.setattr(chunks, "COMPILED_CHUNK_ELEMENTS", WIDE * 5)
    monkeypatch.setattr(chunks, "SUB_CHUNK_ELEMENTS", WIDE * sub_chunk_rows)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits, target = make_wide_case()
        cfg = ShapedLossConfig(
            beta=0.5, topk=5, topk_negative_reward=0.1, tail_negative_reward=-0.05, kernel=kernel
        )
        loss, grad, stats = run(logits, target, cfg)
        assert torch.get_num_threads() == threads  # restored after the chunk threads
    finally:
        torch.set_num_threads(before)
    assert_matches_reference(loss, grad, stats, logits, target, cfg)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("vocab", [VOCAB, WIDE])
def test_inplace_gives_identical_results_and_the_gradient_takes_the_logits_storage(vocab, kernel):
    logits, target = make_case(rows=12, vocab=vocab) if vocab == VOCAB else make_wide_case()
    cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1, kernel=kernel)
    loss, grad, stats = run(logits, target, cfg)
    z = logits.clone().requires_grad_(True)
    loss_i, stats_i = shaped_loss(z, target, cfg, inplace=True)
    assert torch.equal(z.detach(), logits)  # the forward reads them only
    loss_i.sum().backward()
    assert z.grad.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()  # its storage
    assert torch.equal(z.detach(), grad)  # the logits now hold the gradient
    torch.testing.assert_close(loss_i, loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(z.grad, grad, rtol=0, atol=0)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats_i[name], stats[name], rtol=0, atol=0)
    # nothing vocabulary-sized besides the logits is saved.
    z2 = logits.clone().requires_grad_(True)
    loss2, _ = shaped_loss(z2, target, cfg, inplace=True)
    saved = [t for t in loss2.grad_fn.saved_tensors if t.numel() >= z2.numel()]
    assert (
        len(saved) == 1 and saved[0].untyped_storage().data_ptr() == z2.untyped_storage().data_ptr()
    )


def test_inplace_on_bf16_leaves_the_logits_untouched():
    logits, target = make_wide_case()
    z = logits.bfloat16().requires_grad_(True)
    before = z.detach().clone()
    cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1)
    loss, _ = shaped_loss(z, target, cfg, inplace=True)
    loss.sum().backward()
    assert torch.equal(z.detach(), before)
    z_ref = before.clone().requires_grad_(True)
    loss_ref, _ = shaped_loss(z_ref, target, cfg)
    loss_ref.sum().backward()
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=0, atol=0)


def test_the_forward_leaves_logits_saved_by_another_op_usable():
    # The forward masks the target's logit for its pass and restores it, without bumping the
    # version counter: exp's backward, which reads its output, still works and is exact.
    logits, target = make_case(rows=6, scale=0.5)
    cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1)
    x = logits.clone().requires_grad_(True)
    z = torch.exp(x)
    loss, _ = shaped_loss(z, target, cfg)
    loss.sum().backward()
    _, ref_grad, _ = reference(torch.exp(logits), target, cfg)
    assert relative_error(x.grad, ref_grad * torch.exp(logits.double())) < 1e-5


def test_a_failing_pass_leaves_the_logits_as_they_were(monkeypatch):
    from divprec.loss import row_kernels

    def broken(*args):
        raise RuntimeError("pass failed")

    monkeypatch.setattr(row_kernels, "row_sums", broken)
    monkeypatch.setattr(row_kernels, "row_sums_with_rank", broken)
    logits, target = make_case(rows=6)
    z = logits.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="pass failed"):
        shaped_loss(z, target, ShapedLossConfig(topk=5, kernel="eager"))
    assert torch.equal(z.detach(), logits)  # the masked target logits are restored


def test_inplace_fails_loudly_when_the_logits_are_needed_elsewhere():
    logits, target = make_case(rows=6)
    x = logits.clone().requires_grad_(True)
    z = torch.exp(x)  # exp saves its output for the backward
    loss, _ = shaped_loss(z, target, ShapedLossConfig(topk=5), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_gradient_is_the_fp32_gradient_rounded(monkeypatch, chunk_rows, kernel):
    from divprec.loss import chunks

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", WIDE * chunk_rows)
    monkeypatch.setattr(chunks, "COMPILED_CHUNK_ELEMENTS", WIDE * chunk_rows)
    logits, target = make_wide_case()
    logits16 = logits.bfloat16()
    cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1, kernel=kernel)
    z16 = logits16.clone().requires_grad_(True)
    shaped_loss(z16, target, cfg)[0].sum().backward()
    z32 = logits16.float().requires_grad_(True)  # the same values in fp32
    shaped_loss(z32, target, cfg)[0].sum().backward()
    assert z16.grad.dtype == torch.bfloat16
    # Computed in fp32 and rounded once: the fp32 path's gradient, rounded (up to one bf16 ulp
    # where the two kernels' fp32 results straddle a rounding boundary).
    torch.testing.assert_close(z16.grad, z32.grad.bfloat16(), rtol=8e-3, atol=0)
    # A bf16 gradient tensor, nothing wider.
    assert z16.grad.untyped_storage().nbytes() == 2 * z16.numel()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kernel", ["compiled", "eager"])
def test_cuda_matches_the_same_float64_reference(inplace, kernel):
    # The CUDA path (Triton kernels when compiled, larger chunks, no chunk threads) against the
    # reference the CPU tests use.
    cfg = ShapedLossConfig(
        beta=-0.25, topk=5, topk_negative_reward=0.2, tail_negative_reward=-0.1, kernel=kernel
    )
    for logits, target in (make_case(rows=12), make_wide_case()):
        z = logits.cuda().requires_grad_(True)
        loss, stats = shaped_loss(z, target.cuda(), cfg, inplace=inplace)
        loss.sum().backward()
        stats = {k: v.cpu() for k, v in stats.items()}
        assert_matches_reference(loss.detach().cpu(), z.grad.cpu(), stats, logits, target, cfg)


def test_auto_kernel_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    import divprec.loss.row_kernels as rk

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found")

        return compiled

    monkeypatch.setattr(rk, "_COMPILED", {})
    monkeypatch.setattr(rk, "_FAILED", set())
    monkeypatch.setattr(rk, "AUTO_MIN_ELEMENTS", 0)  # "auto" compiles even this toy call
    monkeypatch.setattr(torch, "compile", broken_compile)
    logits, target = make_case(rows=12)
    cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1)
    with caplog.at_level("WARNING", logger=rk.__name__):
        loss, grad, stats = run(logits, target, cfg)
    assert "running it eagerly" in caplog.text and "loss.kernel=eager" in caplog.text
    assert {"row_sums", "shaped_grad"} == rk._FAILED
    assert_matches_reference(loss, grad, stats, logits, target, cfg)
    with pytest.raises(RuntimeError, match="no C.. compiler"):  # "compiled" does not fall back
        monkeypatch.setattr(rk, "_FAILED", set())
        run(logits, target, ShapedLossConfig(topk=5, kernel="compiled"))


def test_auto_kernel_compiles_large_calls_only():
    import divprec.loss.row_kernels as rk

    cpu = torch.device("cpu")
    assert rk.resolve("auto", rk.AUTO_MIN_ELEMENTS - 1, cpu) == "eager"
    assert rk.resolve("auto", rk.AUTO_MIN_ELEMENTS, cpu) == "auto"  # compiled, with the fallback
    assert rk.resolve("compiled", 1, cpu) == "compiled"
    assert rk.resolve("eager", 1 << 40, cpu) == "eager"


def test_kernel_must_be_known():
    assert ShapedLossConfig(kernel="triton").kernel == "triton"
    with pytest.raises(
        ValueError, match="loss.kernel must be one of auto, compiled, eager, triton"
    ):
        ShapedLossConfig(kernel="cuda")


def test_step_times_records_every_step_and_changes_nothing():
    from divprec.loss import step_times

    logits, target = make_wide_case()
    cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1)
    loss, grad, _ = run(logits, target, cfg)
    with step_times.recording() as seconds:
        loss_r, grad_r, _ = run(logits, target, cfg)
        with pytest.raises(RuntimeError, match="already active"), step_times.recording():
            pass
    steps = ["0 target logit", "1 local top-k", "1 all-reduce max", "2 all-gather"]
    steps += ["2 threshold and head", "3 pass", "3 all-reduce sum", "4 per token", "backward"]
    assert list(seconds) == steps and all(s >= 0 for s in seconds.values())
    assert torch.equal(loss_r, loss) and torch.equal(grad_r, grad)
    before = dict(seconds)
    run(logits, target, cfg)  # outside the block: nothing recorded
    assert seconds == before
