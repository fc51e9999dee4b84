"""The two elementwise passes of the shaped loss over a chunk of rows, eager or compiled.

The forward's pass reads the chunk once and reduces it to a few sums per row; the backward's
reads it once and writes the gradient (into another tensor, or into the logits themselves). Run
eagerly each is a few torch ops; compiled (``torch.compile``: a C++/OpenMP loop on CPU, a Triton
kernel on CUDA) each is one fused loop. Both are the same function, so the compiled kernel is the
eager one by construction; the tests check both against the float64 reference.

K_t membership is z >= tau, decided again where needed: no mask and no index list is kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import torch

from divprec.loss import chunks, triton_kernels
from divprec.loss.config import KERNELS

log = logging.getLogger(__name__)

# Rows of the packed per-token sums: row_sums returns the first two, row_sums_with_rank all three.
SUM_ROWS = ("others", "xlogx_others", "target_rank")


def row_sums(z: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """The forward's pass: per-row sums [2, c] over a chunk of rows; reads z, writes nothing else.

    z [c, v] (fp32 or bf16) with the target's own logit set to -inf by the caller, which leaves
    it out of every sum at no per-element cost; row_max [c] fp32. With e = exp(z - max) and
    d = z - max: sum e and sum e*d. The sums over K_t come from the top-k lists instead
    (divprec.loss.threshold): a few values per row, not a mask over the vocabulary.
    """
    d = z.float() - row_max[:, None]  # [c, v] fp32
    e = torch.exp(d)
    # e * d with e = 0 is 0, also for d = -inf (a -inf logit, the masked target), never NaN.
    return torch.stack([e.sum(dim=-1), torch.where(e > 0.0, e * d, 0.0).sum(dim=-1)])  # [2, c]


def row_sums_with_rank(
    z: torch.Tensor, row_max: torch.Tensor, target_logit: torch.Tensor
) -> torch.Tensor:
    """row_sums, then #{a: z_a > z_x} (as float) [3, c]; target_logit [c] in z's dtype (exact).

    The rank's count is here when step 1's strategy does not count it (the torch ops); the CPU
    kernel of step 1 counts it instead, while each row is in cache (divprec.loss.local_top). Compiled, the
    sums and the count are one loop.
    """
    rank = (z > target_logit[:, None]).float().sum(dim=-1)
    return torch.cat([row_sums(z, row_max), rank[None]])  # [3, c]


def _scaled_exp(
    z: torch.Tensor,
    row_max: torch.Tensor,
    tau: torch.Tensor,
    head_scale: torch.Tensor,
    tail_scale: torch.Tensor,
) -> torch.Tensor:
    e = torch.exp(z.float() - row_max[:, None])  # [c, v] fp32
    scale = torch.where(z >= tau[:, None], head_scale[:, None], tail_scale[:, None])
    return (e * scale).to(z.dtype)


def shaped_grad(
    z: torch.Tensor,
    out: torch.Tensor,
    row_max: torch.Tensor,
    tau: torch.Tensor,
    head_scale: torch.Tensor,
    tail_scale: torch.Tensor,
) -> None:
    """The backward's pass: out = exp(z - max) * (head_scale on K_t, else tail_scale), per row.

    z [c, v] fp32 or bf16; out [c, v] in z's dtype, must not alias z (shaped_grad_ writes z
    itself); row_max, head_scale, tail_scale [c] fp32; tau [c] in z's dtype. e is recomputed
    from z instead of being kept from the forward: one read instead of a vocabulary-sized buffer
    written and read back. The target's entries are set by the caller.
    """
    out.copy_(_scaled_exp(z, row_max, tau, head_scale, tail_scale))


def shaped_grad_(
    z: torch.Tensor,
    row_max: torch.Tensor,
    tau: torch.Tensor,
    head_scale: torch.Tensor,
    tail_scale: torch.Tensor,
) -> None:
    """shaped_grad written into z itself: each element is read, then overwritten by its gradient.

    Compiled, this is one loop reading and writing z in place (no workspace); eagerly, the chunk's
    gradient is a temporary copied back.
    """
    z.copy_(_scaled_exp(z, row_max, tau, head_scale, tail_scale))


_COMPILED: dict[str, Callable] = {}
_FAILED: set[str] = set()
_LOCK = threading.Lock()


def _compiled(fn: Callable) -> Callable | None:
    name = fn.__name__
    with _LOCK:
        if name in _FAILED:
            return None
        if name not in _COMPILED:
            # dynamic: the last chunk of rows and other batch shapes reuse one kernel.
            _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
            log.info(
                "the shaped loss's %s is compiled at its first call (seconds, once per process; "
                "loss.kernel=eager skips it)",
                name,
            )
        return _COMPILED[name]


def _mark_failed(fn: Callable, error: Exception) -> None:
    with _LOCK:
        _FAILED.add(fn.__name__)
    log.warning(
        "torch.compile of the shaped loss's %s failed (%s: %s); running it eagerly (same results, "
        "slower). Set loss.kernel=eager to skip the attempt.",
        fn.__name__,
        type(error).__name__,
        str(error).splitlines()[0] if str(error) else "",
    )


# "auto" compiles a call's passes only from this many logits on the shard up (16 MiB of fp32):
# below it the eager ops cost less than the one-off compilation (seconds per process) is worth,
# which keeps short runs and the test suite's toy models free of it.
AUTO_MIN_ELEMENTS = 1 << 22


def resolve(kernel: str, elements: int, device: torch.device) -> str:
    """The kernel a call on ``device`` runs: ``kernel`` (loss.kernel), with "auto" -> "triton"
    on CUDA where the Triton kernels are usable, else "auto" on a small call -> "eager".

    "triton" on CPU runs only in Triton's interpreter (TRITON_INTERPRET=1, for tests); without
    it, or without triton, a ValueError says so.
    """
    if kernel == "triton":
        why = triton_kernels.available()
        if why is not None:
            raise ValueError(
                f"loss.kernel=triton needs triton ({why}): pip install 'triton>=3.5', "
                "or set loss.kernel=auto"
            )
        if device.type != "cuda" and not triton_kernels.interpreting():
            raise ValueError(
                f"loss.kernel=triton runs on CUDA logits, these are on {device.type} (on CPU only "
                "in Triton's interpreter, TRITON_INTERPRET=1, for tests): set loss.kernel=auto"
            )
        return kernel
    if kernel == "auto" and device.type == "cuda" and triton_kernels.usable(device):
        return "triton"
    if kernel == "auto" and elements < AUTO_MIN_ELEMENTS:
        return "eager"
    return kernel


def use_compiled(kernel: str) -> bool:
    """Whether ``kernel`` (loss.kernel, resolved) asks for the compiled passes (torch.compile
    or, with "triton", the Triton kernels: either way no temporaries per element)."""
    if kernel not in KERNELS:
        raise ValueError(f"loss.kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return kernel != "eager"


def run(fn: Callable, kernel: str, *args: torch.Tensor) -> torch.Tensor | None:
    """fn(*args), compiled unless ``kernel`` is "eager" or compiling failed before.

    "auto" falls back to eager (once, with a warning) when compilation fails, e.g. without a C++
    compiler; "compiled" raises instead.
    """
    if use_compiled(kernel):
        compiled = _compiled(fn)
        if compiled is not None:
            try:
                return compiled(*args)
            except Exception as error:  # a backend failure: no compiler, no Triton, ...
                if kernel == "compiled":
                    raise
                _mark_failed(fn, error)
    return fn(*args)


class ChunkPasses:
    """Runs the two passes over a chunk of rows: compiled in one call, eager by sub-chunks.

    The forward's pass writes the packed sums (SUM_ROWS), the backward's the gradient.
    """

    def __init__(self, vocab: int, device: torch.device, kernel: str) -> None:
        self.kernel = kernel
        self.compiled = use_compiled(kernel)
        self.sub_rows = chunks.sub_chunk_rows(vocab, device)

    def calls(self, rows: slice) -> Iterator[slice]:
        """A compiled pass makes no temporaries: the chunk is one call. Eager: sub-chunks."""
        if self.compiled:
            yield rows
            return
        yield from (
            slice(start, min(start + self.sub_rows, rows.stop))
            for start in range(rows.start, rows.stop, self.sub_rows)
        )

    def forward(
        self,
        z: torch.Tensor,
        sums: torch.Tensor,
        row_max: torch.Tensor,
        target_logit: torch.Tensor,
        rows: slice,
        with_rank: bool,
    ) -> None:
        """sums[:2, rows] by row_sums, or sums[:3, rows] by row_sums_with_rank (z's dtype
        target_logit); the caller has set the target's logit to -inf in z."""
        for r in self.calls(rows):
            if with_rank:
                sums[: len(SUM_ROWS), r] = run(
                    row_sums_with_rank, self.kernel, z[r], row_max[r], target_logit[r]
                )
            else:
                sums[: len(SUM_ROWS) - 1, r] = run(row_sums, self.kernel, z[r], row_max[r])

    def backward(
        self,
        z: torch.Tensor,
        grad: torch.Tensor,
        row_max: torch.Tensor,
        tau: torch.Tensor,
        head_scale: torch.Tensor,
        tail_scale: torch.Tensor,
        rows: slice,
    ) -> None:
        """grad[rows] by shaped_grad; grad may be z itself (then shaped_grad_, in place)."""
        inplace = grad.data_ptr() == z.data_ptr()
        for r in self.calls(rows):
            scales = (row_max[r], tau[r], head_scale[r], tail_scale[r])
            if inplace:
                run(shaped_grad_, self.kernel, z[r], *scales)
            else:
                run(shaped_grad, self.kernel, z[r], grad[r], *scales)
