"""The CPU top-k kernel (divprec/loss/native/block_topk.c) against torch.topk, and its build."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from compile_support import KERNELS
from compile_support import needs_c_compiler as needs_cc
from loss_reference import reference, relative_error

from divprec.loss import ShapedLossConfig, local_top, native_select, row_kernels, shaped_loss


def _rows(cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(9, cols, generator=g) * 3
    z[1] = torch.randint(-3, 4, (cols,), generator=g).float()  # heavy ties
    z[2] = 0.5  # every logit equal
    z[3, : cols // 2] = float("-inf")
    z[4] = float("-inf")
    z[4, cols // 3] = 2.0  # a single finite logit
    z[5] = -z[5].abs()  # all negative (the key map's sign branch)
    z[6, -1] = 50.0  # the max in the ragged tail
    return z.to(dtype)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("cols", "k"),
    [(32768, 100), (32768, 1), (16384, 100), (5000, 37), (1000, 100), (333, 5), (64, 64), (7, 3)],
)
def test_block_topk_is_the_exact_top_k(cols, k, dtype):
    z = _rows(cols, dtype, seed=cols + k)
    above = z.float()[:, cols // 2].clone()  # a logit of each row: the target's rank
    above[0] = float("-inf")
    row_max, top, ties, counts = native_select.block_topk(z, k, above=above)
    expected = torch.topk(z.float(), k, dim=-1).values
    torch.testing.assert_close(top.sort(dim=-1, descending=True).values, expected, rtol=0, atol=0)
    torch.testing.assert_close(row_max, z.float().amax(dim=-1), rtol=0, atol=0)
    at_least = (z.float() >= expected[:, -1:]).sum(dim=-1)  # K_t: every logit >= the k-th
    torch.testing.assert_close(ties, (at_least - k).float(), rtol=0, atol=0)
    assert ties[2] == cols - k  # the row of equal logits: all of them tie
    torch.testing.assert_close(counts, (z.float() > above[:, None]).sum(dim=-1).float())
    assert native_select.block_topk(z, k)[3] is None  # no threshold, no count


@needs_cc
def test_block_topk_reads_strided_rows():
    wide = _rows(4096, torch.float32, seed=3)
    z = wide[:, 100:3100]  # rows 4096 elements apart
    row_max, top, _, counts = native_select.block_topk(z, 50, above=z[:, 0].contiguous())
    torch.testing.assert_close(counts, (z > z[:, :1]).sum(dim=-1).float())
    expected = torch.topk(z, 50, dim=-1).values
    torch.testing.assert_close(top.sort(dim=-1, descending=True).values, expected, rtol=0, atol=0)
    torch.testing.assert_close(row_max, z.amax(dim=-1), rtol=0, atol=0)


@needs_cc
def test_compiled_loss_runs_the_kernel_and_matches_the_reference(monkeypatch):
    calls = []
    real = native_select.block_topk
    monkeypatch.setattr(
        native_select,
        "block_topk",
        lambda z, k, above=None: calls.append(z.shape) or real(z, k, above),
    )
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(24, 4096, generator=g) * 2
    target = torch.randint(0, 4096, (24,), generator=g)
    for kernel, used in (("compiled", True), ("eager", False)):
        calls.clear()
        cfg = ShapedLossConfig(beta=-0.25, topk=100, tail_negative_reward=-0.1, kernel=kernel)
        z = logits.clone().requires_grad_(True)
        loss, _ = shaped_loss(z, target, cfg, inplace=True)
        loss.sum().backward()
        assert bool(calls) == used
        ref_loss, ref_grad, _ = reference(logits, target, cfg)
        assert relative_error(z.grad, ref_grad) < 1e-5
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """A fresh kernel state with an empty cache directory, nothing agreed yet."""
    monkeypatch.setenv("DIVPREC_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native_select, "_LIBRARY", None)
    monkeypatch.setattr(native_select, "_ERROR", None)
    monkeypatch.setattr(local_top, "_AGREED", {})
    monkeypatch.setattr(local_top, "_WARNED", False)
    return tmp_path


@needs_cc
def test_the_kernel_is_built_once_into_the_cache(unbuilt, monkeypatch):
    path = native_select._build()
    assert path.parent == unbuilt and path.suffix == ".so"
    assert [p.name for p in unbuilt.iterdir()] == [path.name]  # no partial file left behind

    commands = []
    real_run = native_select.subprocess.run

    def spy(command, **kwargs):
        commands.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(native_select.subprocess, "run", spy)
    assert native_select._build() == path
    assert commands and not any("-shared" in c for c in commands)  # only the version query


def test_a_failing_compiler_auto_warns_once_and_compiled_raises(unbuilt, monkeypatch, caplog):
    # A compiler that fails for real: the build runs it and gets a non-zero exit.
    failing = unbuilt / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'failing-cc: error: cannot compile' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setattr(row_kernels, "AUTO_MIN_ELEMENTS", 0)  # "auto" on a toy call
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 512, generator=g)
    target = torch.randint(0, 512, (6,), generator=g)
    cfg = ShapedLossConfig(beta=-0.25, topk=20, tail_negative_reward=-0.1, kernel="eager")
    assert local_top.select("eager", logits, None) is local_top.TORCH  # never builds
    assert native_select._ERROR is None and not list(unbuilt.glob("*.so"))
    assert not native_select.available()
    for _ in range(2):  # "auto": the exact loss from the torch ops, one warning
        with caplog.at_level(logging.WARNING, logger=local_top.__name__):
            assert local_top.select("auto", logits, None) is local_top.TORCH
        z = logits.clone().requires_grad_(True)
        loss, _ = shaped_loss(z, target, replace(cfg, kernel="auto"))
        loss.sum().backward()
        _, ref_grad, _ = reference(logits, target, cfg)
        assert relative_error(z.grad, ref_grad) < 1e-5
    assert caplog.text.count("could not be built") == 1 and "loss.kernel=eager" in caplog.text
    assert "failing-cc: error: cannot compile" in caplog.text
    with pytest.raises(native_select.BuildError, match="cannot compile"):
        shaped_loss(logits, target, replace(cfg, kernel="compiled"))


def _signed_zero_rows(cols: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose k-th largest value is +0.0, with -0.0 logits tied to it (IEEE: -0.0 == +0.0)."""
    g = torch.Generator().manual_seed(seed)
    z = -torch.rand(4, cols, generator=g) - 0.5  # negative
    z[:, : k // 2] = torch.rand(4, k // 2, generator=g) + 1.0  # fewer than k positive
    zeros = torch.randperm(cols - k, generator=g)[: 2 * k] + k  # +0.0 and -0.0 beyond them
    z[:, zeros[:k]] = 0.0
    z[:, zeros[k:]] = -0.0
    z[1] = z[1].flip(0)  # -0.0 before +0.0 in the row
    z[2, zeros[k:]] = 0.0  # no -0.0: only +0.0 ties
    return z


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("cols", "k"), [(4096, 20), (333, 10)])
def test_block_topk_ties_count_negative_zero_at_a_zero_threshold(cols, k, dtype):
    z = _signed_zero_rows(cols, k, seed=cols).to(dtype)
    assert bool((torch.signbit(z) & (z == 0)).any())
    _, top, ties, _ = native_select.block_topk(z, k)
    kth = torch.topk(z.float(), k, dim=-1).values[:, -1:]
    assert bool((kth == 0).all())
    # K_t is z >= tau, as the backward decides it: the -0.0 logits are in it.
    torch.testing.assert_close(ties, ((z.float() >= kth).sum(dim=-1) - k).float(), rtol=0, atol=0)
    torch.testing.assert_close(top.amin(dim=-1), kth[:, 0], rtol=0, atol=0)


@needs_cc
@pytest.mark.parametrize("kernel", KERNELS)  # compiled: step 1 in C; eager: torch ops
def test_loss_with_signed_zero_ties_matches_the_reference(kernel):
    # The forward's head sums and the backward's z >= tau must agree on the -0.0 logits.
    logits = _signed_zero_rows(4096, 20, seed=8)
    target = torch.tensor([5, 1000, 3000, 7])
    cfg = ShapedLossConfig(
        beta=-0.25, topk=20, topk_negative_reward=0.3, tail_negative_reward=-0.2, kernel=kernel
    )
    z = logits.clone().requires_grad_(True)
    loss, stats = shaped_loss(z, target, cfg)
    loss.sum().backward()
    ref_loss, ref_grad, ref_stats = reference(logits, target, cfg)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        stats["topk_mass"].double(), ref_stats["topk_mass"], rtol=1e-5, atol=1e-6
    )
    assert relative_error(z.grad, ref_grad) < 1e-5
