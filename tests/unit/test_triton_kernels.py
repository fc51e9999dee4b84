"""loss.kernel=triton against the float64 reference: the kernels alone, the loss, tp 2, fused.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 for the
CPU tier before anything imports triton); in the GPU tier (``pytest -m gpu``) the ``cuda``
parameters run the same checks compiled. Sizes are small: the interpreter runs each program's
block steps in numpy, one row after another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from loss_reference import reference, relative_error

from divprec.loss import (
    STAT_NAMES,
    ShapedLossConfig,
    fused_linear_shaped_loss,
    row_kernels,
    shaped_loss,
    triton_kernels,
    vocab_parallel_shaped_loss,
)
from divprec.parallel.spawn import run_in_processes

pytestmark = pytest.mark.skipif(
    triton_kernels.available() is not None,
    reason=f"triton is not importable ({triton_kernels.available()}): pip install 'triton>=3.5'",
)

VOCAB = 1000  # not a power of 2: the last block of each row is partial
# Blocks of this many logits where a test covers a row read in several blocks (4 here);
# elsewhere a row of VOCAB is one block of 1024.
SMALL_BLOCK = 256
TOPKS = [1, 7, 100, VOCAB]
DTYPES = [torch.float32, torch.bfloat16]
# The CPU tier interprets; the GPU tier compiles the same kernels on CUDA.
NOT_INTERPRETED = (
    triton_kernels.interpreter_problem()
    if triton_kernels.interpreting()
    else "on CPU only in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)"
)
interpreted = pytest.mark.skipif(NOT_INTERPRETED is not None, reason=str(NOT_INTERPRETED))
DEVICES = [
    pytest.param("cpu", marks=interpreted),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Rows read in several blocks: what carries from block to block (histograms, the max, the
    compacted values' count, the sums) is exercised."""
    monkeypatch.setattr(triton_kernels, "_BLOCK_MAX", SMALL_BLOCK)


def make_case(rows: int = 8, vocab: int = VOCAB, seed: int = 0):
    """Random rows with targets at the argmax, the argmin and random places; a row of integers
    (ties at every k-th value), a near-one-hot row, a row with -inf columns, signed zeros."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[0::4] = logits[0::4].argmax(-1)
    target[1::4] = logits[1::4].argmin(-1)
    logits[2] = torch.randint(-3, 4, (vocab,), generator=g).float()
    logits[3, target[3]] += 25.0  # pi_x rounds to 1 in fp32
    logits[5, 100 : vocab // 2] = float("-inf")
    target[5] = vocab - 3
    logits[6] = -logits[6].abs() - 1.0
    logits[6, ::2] = 0.0
    logits[6, ::4] = -0.0  # the top 500 tie at zero, across its signs
    return logits, target


def cfg_for(form: str, topk: int) -> ShapedLossConfig:
    return ShapedLossConfig(
        beta=-0.25 if form == "power" else 0.5,
        topk=topk,
        topk_negative_reward=0.2,
        tail_negative_reward=-0.1,
        positive_form=form,
        kernel="triton",
    )


def assert_matches_reference(loss, grad, stats, logits, target, cfg, grad_rtol=1e-5):
    # The reference's 0 * log(0) is NaN: a finite stand-in for -inf (exp underflows to 0).
    ref_loss, ref_grad, ref_stats = reference(logits.float().clamp(min=-1e4), target, cfg)
    assert torch.isfinite(grad.float()).all() and torch.isfinite(loss).all()
    if grad_rtol == 1e-5:
        assert relative_error(grad, ref_grad) < 1e-5
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=grad_rtol, atol=grad_rtol * 0.1 * ref_grad.abs().max()
    )
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for name in STAT_NAMES:
        torch.testing.assert_close(
            stats[name].double(), ref_stats[name], rtol=1e-5, atol=1e-5, msg=name
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_one_is_the_exact_top_k_with_its_ties_and_the_rank(dtype, device, small_blocks):
    logits, target = make_case()
    z = logits.to(device=device, dtype=dtype)
    zf = z.float()
    above = zf.gather(1, target.to(device)[:, None])[:, 0]
    for k in TOPKS:
        row_max, values_and_ties, rank = triton_kernels.local_top(z, k, above)
        expected = torch.topk(zf, k, dim=-1).values  # [n, k]
        tau = expected[:, -1]
        assert torch.equal(row_max, zf.amax(dim=-1))
        assert torch.equal(values_and_ties[:, :k].sort(dim=-1).values, expected.sort(dim=-1).values)
        ties = (zf >= tau[:, None]).sum(dim=-1) - k  # every tie at the k-th value is counted
        assert torch.equal(values_and_ties[:, k], ties.float())
        assert torch.equal(rank, (zf > above[:, None]).sum(dim=-1).float())
        assert torch.equal(triton_kernels.kth_largest(zf, k), tau)
        if k == 7:
            assert values_and_ties[2, k] > 0 and values_and_ties[6, k] > 0  # ties exist


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sums_and_gradient_kernels_against_float64(dtype, device, small_blocks):
    logits, target = make_case()
    z = logits.to(device=device, dtype=dtype)
    z64 = z.double()
    skip = target.to(device).clone()
    skip[::3] = -1  # rows whose target another rank holds: nothing left out
    row_max = z.float().amax(dim=-1)
    above = z.float()[:, 0]
    sums = triton_kernels.row_sums(z, row_max, skip, above)
    d = z64 - row_max.double()[:, None]
    e = torch.exp(d)
    keep = torch.ones_like(e, dtype=torch.bool).scatter_(1, skip.clamp(min=0)[:, None], False)
    keep[::3] = True
    e = torch.where(keep, e, 0.0)
    expected = torch.stack([e.sum(-1), torch.where(e > 0, e * d, 0.0).sum(-1)])
    assert torch.isfinite(sums).all()  # -inf logits add 0, never NaN
    torch.testing.assert_close(sums[:2].double(), expected, rtol=2e-6, atol=0.0)
    assert torch.equal(sums[2], ((z64 > above.double()[:, None]) & keep).sum(-1).float())
    assert triton_kernels.row_sums(z, row_max, skip).shape == (2, z.shape[0])

    tau = torch.topk(z.float(), 7, dim=-1).values[:, -1].to(dtype)
    head = torch.linspace(-1.0, 2.0, z.shape[0], device=device)
    tail = torch.linspace(0.5, -0.3, z.shape[0], device=device)
    grad = torch.empty_like(z)
    triton_kernels.shaped_grad(z, grad, row_max, tau, head, tail)
    in_head = z64 >= tau.double()[:, None]
    expected = torch.exp(d) * torch.where(in_head, head.double()[:, None], tail.double()[:, None])
    # fp32: the exp of a rounded d; bf16: then one rounding to nearest (half a bf16 ulp)
    tolerance = 5e-6 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(grad.double(), expected, rtol=tolerance, atol=1e-30)
    inplace = z.clone()
    triton_kernels.shaped_grad(inplace, inplace, row_max, tau, head, tail)
    assert torch.equal(inplace, grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["power", "product"])
def test_loss_matches_float64_policy_gradient(form, dtype, device):
    logits, target = make_case(seed=3)
    logits = logits.to(dtype)  # the reference takes the same values, exactly in fp32
    for topk in TOPKS:
        cfg = cfg_for(form, topk)
        z = logits.to(device).clone().requires_grad_(True)
        loss, stats = shaped_loss(z, target.to(device), cfg)
        loss.sum().backward()
        stats = {name: value.cpu() for name, value in stats.items()}
        grad_rtol = 1e-5 if dtype == torch.float32 else 4e-3  # a bf16 gradient, rounded once
        assert_matches_reference(
            loss.detach().cpu(), z.grad.cpu(), stats, logits, target, cfg, grad_rtol
        )
        assert z.grad.dtype == dtype


# Both forms, both dtypes, every k (VOCAB: each rank's k_local is its whole shard), in one spawn.
TP2_CASES = [
    ("power", torch.float32, 7),
    ("product", torch.bfloat16, 100),
    ("power", torch.bfloat16, VOCAB),
    ("product", torch.float32, 1),
]


def _tp2_worker(rank: int, world: int) -> list:
    group = torch.distributed.group.WORLD
    out = []
    logits, target = make_case(seed=4)
    width = VOCAB // world
    for form, dtype, topk in TP2_CASES:
        shard = logits[:, rank * width : (rank + 1) * width].to(dtype).clone()  # [n, V/tp]
        z = shard.requires_grad_(True)
        loss, stats = vocab_parallel_shaped_loss(z, target, cfg_for(form, topk), group)
        loss.sum().backward()
        out.append((loss.detach(), z.grad, stats))
    return out


@interpreted  # gloo: CPU only
def test_tensor_parallel_2_matches_float64_policy_gradient():
    results = run_in_processes(_tp2_worker, 2)
    logits, target = make_case(seed=4)
    for i, (form, dtype, topk) in enumerate(TP2_CASES):
        grad = torch.cat([results[r][i][1] for r in range(2)], dim=-1)  # [n, V]
        for rank in range(2):
            loss, _, stats = results[rank][i]
            grad_rtol = 1e-5 if dtype == torch.float32 else 4e-3
            cfg = cfg_for(form, topk)
            assert_matches_reference(loss, grad, stats, logits.to(dtype), target, cfg, grad_rtol)


@interpreted
def test_fused_output_layer_runs_the_triton_kernels():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 32, generator=g)
    weight = torch.randn(300, 32, generator=g) * 0.5
    target = torch.randint(0, 300, (6,), generator=g)
    cfg = replace(cfg_for("power", 7), fused_chunk_tokens=4)  # 2 chunks, one of them partial
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, stats = fused_linear_shaped_loss(h, w, target, cfg)
    loss.sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    w_ref = weight.clone().requires_grad_(True)
    ref_loss, ref_stats = shaped_loss(h_ref @ w_ref.t(), target, replace(cfg, kernel="eager"))
    ref_loss.sum().backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name], ref_stats[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_triton_on_cpu_outside_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="loss.kernel=triton runs on CUDA .* set loss.kernel=auto"):
        row_kernels.resolve("triton", 10, torch.device("cpu"))
    monkeypatch.setattr(triton_kernels, "_IMPORT_ERROR", "ImportError: No module named 'triton'")
    with pytest.raises(ValueError, match="loss.kernel=triton needs triton .*pip install"):
        row_kernels.resolve("triton", 10, torch.device("cpu"))
    # "auto" never picks the kernels on CPU.
    assert row_kernels.resolve("auto", 1 << 30, torch.device("cpu")) == "auto"


def test_triton_without_cuda_is_a_config_error_before_any_work(monkeypatch):
    from divprec.config.compose import compose_config
    from divprec.config.validate import ConfigError, validate

    cfg = compose_config(["loss.kernel=triton"])
    validate(cfg, world_size=1, vocab_size=4096)  # the interpreter (this tier) may run it
    monkeypatch.setattr(triton_kernels, "_INTERPRETED", False)
    with pytest.raises(ConfigError, match=r"^loss\.kernel=triton needs CUDA devices .*auto$"):
        validate(cfg, world_size=1, vocab_size=4096)


@interpreted
def test_the_self_check_that_gates_auto_passes_and_a_failing_kernel_keeps_the_torch_path(
    monkeypatch, caplog
):
    assert triton_kernels._self_check_error(torch.device("cpu")) is None  # the real kernels

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_kernels, "local_top", broken)
    monkeypatch.setattr(triton_kernels, "_SELF_CHECKED", {})
    with caplog.at_level("WARNING", logger=triton_kernels.__name__):
        assert not triton_kernels.usable(torch.device("cpu"))
    assert "failed their self-check on cpu (RuntimeError: PTX assembly failed)" in caplog.text
    # "auto" on CUDA: the Triton kernels once their self-check passed, else the previous choice.
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_kernels, "_SELF_CHECKED", {"cuda:0": "RuntimeError: failed"})
    assert row_kernels.resolve("auto", 1 << 30, cuda) == "auto"  # torch.compile's passes
    assert row_kernels.resolve("auto", 1, cuda) == "eager"
    monkeypatch.setattr(triton_kernels, "_SELF_CHECKED", {"cuda:0": None})
    assert row_kernels.resolve("auto", 1, cuda) == "triton"


# Compiles the kernels as the loss launches them on an H100/H200 (sm_90), to the cubin (Triton's
# bundled ptxas), with no GPU: what the interpreter cannot check (the compiler accepts them).
_COMPILE_FOR_SM90 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from divprec.loss import triton_kernels as tk

    def build(fn, signature, constexprs):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        assert "cubin" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm

    top = dict(z_ptr="*fp32", stride_z="i32", n_cols="i32", k="i32", above_ptr="*fp32",
               max_ptr="*fp32", top_ptr="*fp32", stride_top="i32", tau_ptr="*fp32",
               rank_ptr="*fp32")
    build(tk._top_k_kernel, top,
          dict(PASSES=4, COUNT_RANK=True, WRITE_TOP=True, BLOCK=2048, BINS=256))
    build(tk._top_k_kernel, {**top, "z_ptr": "*bf16"},
          dict(PASSES=2, COUNT_RANK=True, WRITE_TOP=True, BLOCK=2048, BINS=256))
    build(tk._row_sums_kernel,
          dict(z_ptr="*bf16", stride_z="i32", n_cols="i32", max_ptr="*fp32", skip_ptr="*i32",
               above_ptr="*fp32", out_ptr="*fp32", n_rows="i32"),
          dict(COUNT_RANK=False, BLOCK=2048))
    build(tk._grad_kernel,
          dict(z_ptr="*bf16", stride_z="i32", out_ptr="*bf16", stride_out="i32", n_cols="i32",
               max_ptr="*fp32", tau_ptr="*bf16", head_ptr="*fp32", tail_ptr="*fp32"),
          dict(BLOCK=2048))
    print("compiled")
    """
)


def test_the_kernels_compile_for_an_sm90_gpu_without_one(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).parents[2]))
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
