"""vocab_parallel_shaped_loss at tp in {1, 2, 4} against single-process and float64 references."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from compile_support import HAS_COMPILER, needs_c_compiler, needs_compiler
from loss_reference import reference, relative_error

from divprec.loss import STAT_NAMES, ShapedLossConfig, shaped_loss, vocab_parallel_shaped_loss
from divprec.parallel.spawn import run_in_processes

VOCAB = 96  # divisible by 1, 2, 4


def _straddling_case(rows: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose top-5 spans every shard boundary, targets in and out of the top-k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=g)
    # Large logits on both sides of each tp=2 and tp=4 boundary.
    for col in (23, 24, 47, 48, 71, 72):
        logits[:, col] += 4.0 + torch.rand(rows, generator=g)
    target = torch.randint(0, VOCAB, (rows,), generator=g)
    boundary = torch.tensor([24, 47, 71, 23, 72])  # both sides of the shard boundaries
    target[0::2] = boundary.repeat(rows)[: len(target[0::2])]
    return logits, target


def _cases() -> list[tuple[str, ShapedLossConfig, torch.Tensor, torch.Tensor]]:
    straddle_logits, straddle_target = _straddling_case()
    g = torch.Generator().manual_seed(7)
    ties = torch.randint(-2, 3, (8, VOCAB), generator=g).float()
    ties_target = torch.randint(0, VOCAB, (8,), generator=g)
    onehot = torch.randn(6, VOCAB, generator=g)
    onehot_target = torch.randint(0, VOCAB, (6,), generator=g)
    onehot[torch.arange(6), onehot_target] += 25.0
    big = torch.randn(2, 3, VOCAB, generator=g) * 2  # leading dims [s, b]
    big_target = torch.randint(0, VOCAB, (2, 3), generator=g)
    return [
        ("ce", ShapedLossConfig(topk=5), straddle_logits, straddle_target),
        (
            "precision_tail",
            ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1),
            straddle_logits,
            straddle_target,
        ),
        (
            "diversity_head_product",
            ShapedLossConfig(beta=0.5, topk=7, topk_negative_reward=0.1, positive_form="product"),
            straddle_logits,
            straddle_target,
        ),
        ("topk1", ShapedLossConfig(beta=-0.5, topk=1, tail_negative_reward=0.2), big, big_target),
        (
            "topkV",
            ShapedLossConfig(beta=0.5, topk=VOCAB, topk_negative_reward=-0.3),
            big,
            big_target,
        ),
        (
            "ties",
            ShapedLossConfig(
                beta=-0.25, topk=30, topk_negative_reward=0.2, tail_negative_reward=-0.1
            ),
            ties,
            ties_target,
        ),
        (
            "near_one_hot",
            ShapedLossConfig(beta=-0.5, topk=5, tail_negative_reward=-0.1),
            onehot,
            onehot_target,
        ),
        (
            "bf16",
            ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1),
            straddle_logits.bfloat16(),
            straddle_target,
        ),
    ]


def _shard(logits: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    width = logits.shape[-1] // world
    return logits[..., rank * width : (rank + 1) * width].contiguous()


def _parallel_worker(rank: int, world: int) -> dict:
    group = torch.distributed.group.WORLD
    out = {}
    for name, cfg, logits, target in _cases():
        z = _shard(logits, rank, world).requires_grad_(True)
        loss, stats = vocab_parallel_shaped_loss(z, target, cfg, tp_group=group)
        loss.sum().backward()
        out[name] = (loss.detach(), z.grad, {k: v.clone() for k, v in stats.items()})
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_vocab_parallel_equals_single_process(world):
    results = run_in_processes(_parallel_worker, world)
    for name, cfg, logits, target in _cases():
        z = logits.clone().requires_grad_(True)
        loss, stats = shaped_loss(z, target, cfg)
        loss.sum().backward()
        grad = torch.cat([results[r][name][1] for r in range(world)], dim=-1)
        for rank in range(world):
            rank_loss, _, rank_stats = results[rank][name]
            torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-6, atol=1e-6, msg=name)
            for stat in STAT_NAMES:
                torch.testing.assert_close(
                    rank_stats[stat], stats[stat], rtol=1e-6, atol=1e-6, msg=f"{name} {stat}"
                )
        torch.testing.assert_close(grad, z.grad, rtol=1e-5, atol=1e-7, msg=name)
        if logits.dtype == torch.float32:
            ref_loss, ref_grad, _ = reference(logits.reshape(-1, VOCAB), target.reshape(-1), cfg)
            flat_grad = grad.reshape(-1, VOCAB)
            assert relative_error(flat_grad, ref_grad) < 1e-5, name
            torch.testing.assert_close(
                flat_grad.double(), ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max(), msg=name
            )
            torch.testing.assert_close(
                loss.detach().reshape(-1).double(), ref_loss, rtol=1e-5, atol=1e-6, msg=name
            )


def _megatron_ce_worker(rank: int, world: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        logits, target = _straddling_case(rows=12, seed=3)
        logits = logits.reshape(3, 4, VOCAB)  # [s, b, v]
        target = target.reshape(3, 4)
        shard = _shard(logits, rank, world)
        ours = shard.clone().requires_grad_(True)
        # tp_group=None: megatron-core's tensor-parallel group.
        loss, _ = vocab_parallel_shaped_loss(ours, target, ShapedLossConfig(topk=5))
        loss.sum().backward()
        theirs = shard.clone().requires_grad_(True)
        ce = vocab_parallel_cross_entropy(theirs, target)
        ce.sum().backward()
        return {
            "loss": (loss.detach(), ce.detach()),
            "grad": (ours.grad, theirs.grad),
        }
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("world", [1, 2])
def test_defaults_equal_megatron_vocab_parallel_cross_entropy(world):
    for rank_out in run_in_processes(_megatron_ce_worker, world):
        ours, theirs = rank_out["loss"]
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        ours, theirs = rank_out["grad"]
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


# --- Wide shards: the block top-k path, K_t by indices and by the sign bit, inplace ---

WIDE = 4096  # shards of 2048 (tp=2) and 1024 (tp=4) take the block path at these topk


def _wide_cases() -> list[tuple[str, ShapedLossConfig, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(12, WIDE, generator=g) * 2
    for col in (1023, 1024, 2047, 2048, 3071, 3072):  # top logits on both sides of boundaries
        logits[:, col] += 6.0 + torch.rand(12, generator=g)
    target = torch.randint(0, WIDE, (12,), generator=g)
    target[0::3] = torch.tensor([1023, 2048, 3072, 5])
    logits[4] = torch.randint(-3, 4, (WIDE,), generator=g).float()  # ties over many blocks
    cfg = ShapedLossConfig(beta=-0.25, topk=5, topk_negative_reward=0.2, tail_negative_reward=-0.1)
    return [
        ("wide_k5", cfg, logits, target),
        ("wide_k1", ShapedLossConfig(beta=0.5, topk=1, tail_negative_reward=-0.1), logits, target),
        ("wide_k8_ce", ShapedLossConfig(topk=8), logits, target),
        ("wide_bf16", cfg, logits.bfloat16(), target),
    ]


def _wide_worker(rank: int, world: int) -> dict:
    from divprec.loss import block_topk

    group = torch.distributed.group.WORLD
    out = {}
    for name, cfg, logits, target in _wide_cases():
        assert block_topk.block_size(WIDE // world, cfg.topk) is not None, name
        for inplace, kernel in KERNEL_VARIANTS:
            z = _shard(logits, rank, world).requires_grad_(True)
            loss, stats = vocab_parallel_shaped_loss(
                z, target, replace(cfg, kernel=kernel), tp_group=group, inplace=inplace
            )
            loss.sum().backward()
            out[name, inplace, kernel] = (
                loss.detach(),
                z.grad,
                {k: v.clone() for k, v in stats.items()},
            )
    return out


# (inplace, loss.kernel): both kernels, the compiled one also writing into the logits.
KERNEL_VARIANTS = ((False, "eager"), (True, "eager")) + (
    ((True, "compiled"),) if HAS_COMPILER else ()
)


@pytest.mark.parametrize("world", [2, 4])
def test_block_path_vocab_parallel_equals_single_process(world):
    results = run_in_processes(_wide_worker, world)
    for name, cfg, logits, target in _wide_cases():
        z = logits.clone().requires_grad_(True)
        loss, stats = shaped_loss(z, target, cfg)
        loss.sum().backward()
        for variant in KERNEL_VARIANTS:
            grad = torch.cat([results[r][(name, *variant)][1] for r in range(world)], dim=-1)
            for rank in range(world):
                # Sums over 4096 fp32 terms in another order (shards, kernels): ~1e-6 relative.
                rank_loss, _, rank_stats = results[rank][(name, *variant)]
                torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-5, atol=1e-6)
                for stat in STAT_NAMES:
                    torch.testing.assert_close(
                        rank_stats[stat], stats[stat], rtol=1e-5, atol=1e-6, msg=f"{name} {stat}"
                    )
            # bf16 gradients: fp32 sums in another order may round to the neighbouring bf16.
            rtol = 1e-5 if logits.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(grad, z.grad, rtol=rtol, atol=1e-7, msg=name)
        if logits.dtype == torch.float32:
            ref_loss, ref_grad, _ = reference(logits, target, cfg)
            assert relative_error(grad, ref_grad) < 1e-5, name
            torch.testing.assert_close(
                loss.detach().double(), ref_loss, rtol=1e-5, atol=1e-6, msg=name
            )


# --- The ranks agree on step 1's kernel: one rank cannot build the C kernel ---


def _one_rank_cannot_build_worker(rank: int, world: int, cache_root: str, failing_cc: str) -> dict:
    from divprec.loss import local_top, native_select, row_kernels

    os.environ["DIVPREC_KERNEL_CACHE"] = os.path.join(cache_root, f"rank{rank}")
    if rank == 1:  # this rank's C compiler fails: a real build failure, on this rank only
        os.environ["CC"] = failing_cc
    row_kernels.AUTO_MIN_ELEMENTS = 0  # "auto" takes the kernels at this toy size
    group = torch.distributed.group.WORLD
    name, cfg, logits, target = _wide_cases()[0]
    out = {"built": native_select.available()}
    z = _shard(logits, rank, world).requires_grad_(True)
    out["strategy"] = local_top.select("auto", z.detach(), group).name
    loss, stats = vocab_parallel_shaped_loss(z, target, replace(cfg, kernel="auto"), tp_group=group)
    loss.sum().backward()
    out["auto"] = (loss.detach(), z.grad, {k: v.clone() for k, v in stats.items()})
    try:  # "compiled" requires the kernel: every rank raises, none waits in a collective
        vocab_parallel_shaped_loss(z.detach(), target, replace(cfg, kernel="compiled"), group)
        out["compiled"] = None
    except native_select.BuildError as error:
        out["compiled"] = str(error)
    return out


@pytest.mark.slow  # two processes compile the passes ("auto"): ~35 s on 2 shared cores
@needs_compiler
@needs_c_compiler
def test_ranks_agree_on_the_kernel_when_one_rank_cannot_build_it(tmp_path):
    failing_cc = tmp_path / "failing-cc"
    failing_cc.write_text("#!/bin/sh\necho 'failing-cc: error: cannot compile' >&2\nexit 1\n")
    failing_cc.chmod(0o755)
    results = run_in_processes(
        _one_rank_cannot_build_worker, 2, str(tmp_path), str(failing_cc), timeout_s=300
    )
    assert [r["built"] for r in results] == [True, False]  # the fault is real, on rank 1 only
    assert [r["strategy"] for r in results] == ["torch", "torch"]  # agreed: the torch ops
    name, cfg, logits, target = _wide_cases()[0]
    z = logits.clone().requires_grad_(True)
    loss, stats = shaped_loss(z, target, replace(cfg, kernel="eager"))
    loss.sum().backward()
    for r in results:
        torch.testing.assert_close(r["auto"][0], loss.detach(), rtol=1e-5, atol=1e-6)
        for stat in STAT_NAMES:
            torch.testing.assert_close(r["auto"][2][stat], stats[stat], rtol=1e-5, atol=1e-6)
    grad = torch.cat([r["auto"][1] for r in results], dim=-1)
    ref_loss, ref_grad, _ = reference(logits, target, cfg)
    assert relative_error(grad, ref_grad) < 1e-5
    torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert "cannot compile" in results[1]["compiled"]
    assert "could not be built on tensor-parallel rank(s) [1]" in results[0]["compiled"]
