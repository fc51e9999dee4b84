"""The shaped loss's three passes over the logits as Triton kernels (``loss.kernel=triton``).

- :func:`local_top`: step 1 (the row max, the exact k largest values and the ties at the k-th,
  the target's rank), by a radix select on the logits' order-preserving integer keys;
  :func:`kth_largest` is the same kernel on the gathered top-k lists.
- :func:`row_sums`: the forward's read-only pass (sum e and sum e*d, e = exp(z - max),
  d = z - max, the target left out by its column; the target's rank when step 1 did not count it).
- :func:`shaped_grad`: the backward's pass, grad = e * (head scale on K_t, else tail scale), in
  place or not.

One program per row, each looping over its row in blocks of ``BLOCK`` logits; the kernels make
no temporaries in memory, so the loss calls each once for all its rows (no chunks). They compute
in fp32 from fp32 or bf16 logits. No collectives: those stay in divprec.loss.vocab_parallel.

Triton is imported here and only here, guarded: without it the package still imports and
:func:`available` says why the kernels cannot run. With ``TRITON_INTERPRET=1`` in the environment
when this module is imported (triton reads it as ``@triton.jit`` runs), the kernels run in
Triton's interpreter on CPU tensors: the tests' way of checking them without a GPU.
"""

from __future__ import annotations

import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # the package imports without triton; available() says why
    triton = None
    _IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = None

log = logging.getLogger(__name__)

# Digits of the radix select: 8 bits, so a histogram has 256 bins.
_RADIX_BITS = 8
_BINS = 1 << _RADIX_BITS
# Logits a program reads per step (a power of 2). On the GPU: enough loads in flight per row;
# in the interpreter larger blocks mean fewer (numpy) steps.
_BLOCK_MAX = 2048


# Read once: triton reads it as each @triton.jit below runs, i.e. at this module's import.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at this module's
    import): they take CPU tensors then."""
    return _INTERPRETED


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here, or None: before triton 3.7 it
    converts 1-element arrays to Python ints, which numpy >= 2.4 refuses (3.5.1, 3.6.0 here)."""
    if triton is None:
        return _IMPORT_ERROR
    import numpy

    def major_minor(version: str) -> tuple[int, int]:
        return tuple(int(part) for part in version.split(".")[:2])  # type: ignore[return-value]

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (
            f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__}: "
            "pip install 'triton>=3.7' (on CPU), or numpy<2.4"
        )
    return None


def available() -> str | None:
    """None when the kernels can run, else why not (triton is not importable)."""
    return _IMPORT_ERROR


def _block(columns: int) -> int:
    return max(16, min(_BLOCK_MAX, triton.next_power_of_2(max(columns, 1))))


if triton is not None:

    @triton.jit
    def _ordered_key(x):
        """fp32 -> int32 key with key(a) < key(b) iff a < b (IEEE), -0.0 taken as +0.0."""
        x = tl.where(x == 0.0, 0.0, x)
        bits = x.to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _round_to_bf16(x):
        """fp32 -> bf16, rounded to nearest even as torch rounds (Triton's interpreter would
        truncate): the same bits compiled and interpreted."""
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _choose_digit(hist, remaining, bins):
        """The digit of the remaining-th largest key among those counted in hist [BINS]: the
        digit, how many of it are still to take (>= 1), and how many keys have that digit."""
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # #{digit >= b}, non-increasing
        digit = tl.max(tl.where(at_least >= remaining, bins, -1), 0)
        above = tl.sum(tl.where(bins > digit, hist, 0), 0)
        equal = tl.sum(tl.where(bins == digit, hist, 0), 0)
        return digit, remaining - above, equal

    @triton.jit
    def _top_k_kernel(
        z_ptr,
        stride_z,
        n_cols,
        k,
        above_ptr,
        max_ptr,
        top_ptr,
        stride_top,
        tau_ptr,
        rank_ptr,
        PASSES: tl.constexpr,
        COUNT_RANK: tl.constexpr,
        WRITE_TOP: tl.constexpr,
        BLOCK: tl.constexpr,
        BINS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_z
        cols = tl.arange(0, BLOCK)
        bins = tl.arange(0, BINS)
        # Read 1: the row max, the target's rank, the histogram of the keys' top digit.
        if COUNT_RANK:
            target = tl.load(above_ptr + row)
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        rank = tl.zeros([BLOCK], tl.int32)
        hist = tl.zeros([BINS], tl.int32)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            inside = offs < n_cols
            x = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32)
            running_max = tl.maximum(running_max, x)
            if COUNT_RANK:
                rank += (x > target).to(tl.int32)  # the padding, -inf, is never above
            hist += tl.histogram((_ordered_key(x) >> 24) + 128, BINS, mask=inside)
        digit, remaining, equal = _choose_digit(hist, k, bins)
        prefix = digit - 128  # the k-th largest key >> 24
        # Reads 2..PASSES: the next digit among the keys that share the prefix so far.
        for p in tl.static_range(1, PASSES):
            hist = tl.zeros([BINS], tl.int32)
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                inside = offs < n_cols
                key = _ordered_key(tl.load(base + offs, mask=inside, other=0.0).to(tl.float32))
                same = inside & ((key >> (32 - 8 * p)) == prefix)
                hist += tl.histogram((key >> (24 - 8 * p)) & 255, BINS, mask=same)
            digit, remaining, equal = _choose_digit(hist, remaining, bins)
            prefix = (prefix << 8) | digit
        tau_key = prefix << (32 - 8 * PASSES)  # bf16 logits: their low 16 bits are 0
        tau = (tau_key ^ ((tau_key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        tl.store(max_ptr + row, tl.max(running_max, 0))
        tl.store(tau_ptr + row, tau)
        if COUNT_RANK:
            tl.store(rank_ptr + row, tl.sum(rank, 0).to(tl.float32))
        if WRITE_TOP:
            # Last read: the values > tau, compacted; then copies of tau up to k; then the ties.
            out = top_ptr + row * stride_top
            written = tl.zeros([], tl.int32)
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                inside = offs < n_cols
                x = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32)
                take = inside & (_ordered_key(x) > tau_key)
                slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
                tl.store(out + slot, x, mask=take)
                written += tl.sum(take.to(tl.int32), 0)
            for start in range(0, k, BLOCK):
                slot = start + cols
                tl.store(
                    out + slot,
                    tl.full([BLOCK], 0.0, tl.float32) + tau,
                    mask=(slot >= written) & (slot < k),
                )
            tl.store(out + k, (equal - remaining).to(tl.float32))  # #{z >= tau} - k

    @triton.jit
    def _row_sums_kernel(
        z_ptr,
        stride_z,
        n_cols,
        max_ptr,
        skip_ptr,
        above_ptr,
        out_ptr,
        n_rows,
        COUNT_RANK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_z
        cols = tl.arange(0, BLOCK)
        row_max = tl.load(max_ptr + row)
        skip = tl.load(skip_ptr + row)  # the target's column, -1 where another rank has it
        if COUNT_RANK:
            target = tl.load(above_ptr + row)
        sum_e = tl.zeros([BLOCK], tl.float32)
        sum_ed = tl.zeros([BLOCK], tl.float32)
        rank = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            keep = (offs < n_cols) & (offs != skip)
            x = tl.load(base + offs, mask=keep, other=float("-inf")).to(tl.float32)
            d = x - row_max
            e = tl.where(keep, tl.exp(d), 0.0)
            sum_e += e
            sum_ed += tl.where(e > 0.0, e * d, 0.0)  # 0 at a -inf logit, never NaN
            if COUNT_RANK:
                rank += tl.where(keep & (x > target), 1.0, 0.0)
        tl.store(out_ptr + row, tl.sum(sum_e, 0))
        tl.store(out_ptr + n_rows + row, tl.sum(sum_ed, 0))
        if COUNT_RANK:
            tl.store(out_ptr + 2 * n_rows + row, tl.sum(rank, 0))

    @triton.jit
    def _grad_kernel(
        z_ptr,
        stride_z,
        out_ptr,
        stride_out,
        n_cols,
        max_ptr,
        tau_ptr,
        head_ptr,
        tail_ptr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        row_max = tl.load(max_ptr + row)
        tau = tl.load(tau_ptr + row).to(tl.float32)
        head = tl.load(head_ptr + row)
        tail = tl.load(tail_ptr + row)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            inside = offs < n_cols
            x = tl.load(z_ptr + row * stride_z + offs, mask=inside, other=float("-inf"))
            xf = x.to(tl.float32)
            grad = tl.exp(xf - row_max) * tl.where(xf >= tau, head, tail)
            if x.dtype == tl.bfloat16:
                grad = _round_to_bf16(grad)
            # Each element is read before it is written: out may be z itself.
            tl.store(out_ptr + row * stride_out + offs, grad.to(x.dtype), mask=inside)


def _check(z: torch.Tensor) -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"loss.kernel=triton needs triton ({_IMPORT_ERROR})")
    if z.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"loss.kernel=triton takes fp32 or bf16 logits, got {z.dtype}")
    if z.stride(-1) != 1:
        raise ValueError("loss.kernel=triton needs rows of contiguous logits")


def _radix_passes(dtype: torch.dtype) -> int:
    """Reads of the row that find the k-th key: 8 bits each (bf16: 16-bit keys, fp32: 32)."""
    return 2 if dtype == torch.bfloat16 else 4


def local_top(
    z: torch.Tensor, k: int, above: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step 1 over the rows of z [n, v] (fp32 or bf16): row max [n], the k largest values then
    the ties [n, k + 1] fp32, and #{z > above} [n] (float) when ``above`` [n] fp32 is given.

    The values are those > tau (in the row's order), then copies of tau, with tau the k-th
    largest, exact; the ties are #{z >= tau} - k. Reads of each row: 1 + 1 per further radix
    digit (fp32: 4 + 1 = 5, bf16: 2 + 1 = 3); the first also gives the max and the rank.
    """
    _check(z)
    n, v = z.shape
    if not 1 <= k <= v:
        raise ValueError(f"local_top needs 1 <= k <= {v}, got k={k}")
    row_max = torch.empty(n, dtype=torch.float32, device=z.device)
    top = torch.empty((n, k + 1), dtype=torch.float32, device=z.device)
    tau = torch.empty(n, dtype=torch.float32, device=z.device)
    rank = torch.empty(n, dtype=torch.float32, device=z.device) if above is not None else None
    if n:
        _top_k_kernel[(n,)](
            z,
            z.stride(0),
            v,
            k,
            above.contiguous() if above is not None else row_max,
            row_max,
            top,
            top.stride(0),
            tau,
            rank if rank is not None else tau,
            PASSES=_radix_passes(z.dtype),
            COUNT_RANK=above is not None,
            WRITE_TOP=True,
            BLOCK=_block(v),
            BINS=_BINS,
        )
    return row_max, top, rank


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of each row of values [r, m] fp32 (m >= k), exact: [r]. 4 reads."""
    _check(values)
    r, m = values.shape
    tau = torch.empty(r, dtype=torch.float32, device=values.device)
    if r:
        _top_k_kernel[(r,)](
            values,
            values.stride(0),
            m,
            k,
            tau,
            tau,
            tau,
            0,
            tau,
            tau,
            PASSES=_radix_passes(values.dtype),
            COUNT_RANK=False,
            WRITE_TOP=False,
            BLOCK=_block(m),
            BINS=_BINS,
        )
    return tau


def row_sums(
    z: torch.Tensor,
    row_max: torch.Tensor,
    skip_cols: torch.Tensor,
    above: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward's pass, one read of each row: [2, n] (sum e, sum e*d), or [3, n] with
    #{z > above} when ``above`` [n] fp32 is given.

    z [n, v] fp32 or bf16; row_max [n] fp32; skip_cols [n] int: the column left out of every
    sum and count (the target's), -1 for none. z is not modified. A -inf logit adds 0.
    """
    _check(z)
    n, v = z.shape
    out = torch.empty((3 if above is not None else 2, n), dtype=torch.float32, device=z.device)
    if n:
        _row_sums_kernel[(n,)](
            z,
            z.stride(0),
            v,
            row_max.contiguous(),
            skip_cols.to(torch.int32).contiguous(),
            above.contiguous() if above is not None else row_max,
            out,
            n,
            COUNT_RANK=above is not None,
            BLOCK=_block(v),
        )
    return out


def shaped_grad(
    z: torch.Tensor,
    out: torch.Tensor,
    row_max: torch.Tensor,
    tau: torch.Tensor,
    head_scale: torch.Tensor,
    tail_scale: torch.Tensor,
) -> None:
    """The backward's pass, one read and one write of each row: out = exp(z - max) * (head_scale
    where z >= tau, else tail_scale), in z's dtype; out may be z itself (in place).

    z, out [n, v] fp32 or bf16; row_max, head_scale, tail_scale [n] fp32; tau [n] (any float
    dtype holding z's values exactly). The target's entries are the caller's.
    """
    _check(z)
    if out.dtype != z.dtype or out.shape != z.shape or out.stride(-1) != 1:
        raise ValueError("shaped_grad's out must be z's shape and dtype, rows contiguous")
    n, v = z.shape
    if n:
        _grad_kernel[(n,)](
            z,
            z.stride(0),
            out,
            out.stride(0),
            v,
            row_max.contiguous(),
            tau.contiguous(),
            head_scale.contiguous(),
            tail_scale.contiguous(),
            BLOCK=_block(v),
        )


_SELF_CHECKED: dict[str, str | None] = {}


def _self_check_error(device: torch.device) -> str | None:
    """Why the kernels cannot serve ``device`` (they fail or disagree with torch ops), or None.

    Runs the three kernels once on a small fp32 and bf16 case (2048-wide blocks, as the loss's
    shards use) against torch.topk and plain torch ops: a Triton build whose compilation fails
    on this GPU is caught here instead of at the first training step.
    """
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    try:
        generator = torch.Generator().manual_seed(0)
        base = torch.randn(8, 3000, generator=generator).mul_(3.0).round_()  # ties at every k
        for dtype in (torch.float32, torch.bfloat16):
            z = base.to(device=device, dtype=dtype)
            zf = z.float()
            k = 100
            row_max, top, rank = local_top(z, k, zf[:, 0])
            tau = torch.topk(zf, k, dim=-1).values[:, -1]
            exact = (
                torch.equal(row_max, zf.amax(dim=-1))
                and torch.equal(
                    top[:, :k].sort(dim=-1).values, torch.topk(zf, k).values.sort(dim=-1).values
                )
                and torch.equal(top[:, k], ((zf >= tau[:, None]).sum(dim=-1) - k).float())
                and torch.equal(rank, (zf > zf[:, :1]).sum(dim=-1).float())
                and torch.equal(kth_largest(zf, k), tau)
            )
            if not exact:
                return "step 1's kernel disagrees with torch.topk"
            skip = torch.zeros(8, dtype=torch.int64, device=device)
            e = torch.exp(zf - row_max[:, None])
            e[:, 0] = 0.0
            expected = torch.stack([e.sum(dim=-1), (e * (zf - row_max[:, None])).sum(dim=-1)])
            if not torch.allclose(row_sums(z, row_max, skip), expected, rtol=1e-4, atol=0.0):
                return "the row sums' kernel disagrees with torch ops"
            grad = torch.empty_like(z)
            head = torch.full((8,), 2.0, device=device)
            tail = torch.full((8,), -1.0, device=device)
            shaped_grad(z, grad, row_max, tau, head, tail)
            expected = torch.exp(zf - row_max[:, None]) * torch.where(zf >= tau[:, None], 2.0, -1.0)
            if not torch.allclose(grad.float(), expected.to(dtype).float(), rtol=1e-2, atol=1e-6):
                return "the gradient's kernel disagrees with torch ops"
    except Exception as error:  # a compiler or driver failure: the torch path serves instead
        first = str(error).splitlines()[0] if str(error) else ""
        return f"{type(error).__name__}: {first}"
    return None


def usable(device: torch.device) -> bool:
    """Whether ``loss.kernel=auto`` may use the kernels on ``device`` (CUDA): triton imports and
    :func:`_self_check_error` passes, checked once per device and process (a warning if not)."""
    key = str(device)
    if key not in _SELF_CHECKED:
        _SELF_CHECKED[key] = _self_check_error(device)
        if _SELF_CHECKED[key] is not None and _IMPORT_ERROR is None:
            log.warning(
                "the shaped loss's Triton kernels failed their self-check on %s (%s); "
                "loss.kernel=auto uses the torch path (same results). Set loss.kernel=compiled "
                "to skip the attempt.",
                key,
                _SELF_CHECKED[key],
            )
    return _SELF_CHECKED[key] is None
