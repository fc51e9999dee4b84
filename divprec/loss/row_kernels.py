"""The two elementwise passes of the shaped loss over a chunk of rows, eager or compiled.

Each function is one pass: it reads the chunk once and writes it once. Run eagerly it is a dozen
torch ops; compiled (``torch.compile``: a C++/OpenMP loop on CPU, a Triton kernel on CUDA) it is
one fused loop with every reduction in registers. Both are the same function, so the compiled
kernel is the eager one by construction; the tests check both against the float64 reference.

K_t membership travels in the sign bit of the buffer (``-e`` for tokens in K_t), so the backward
needs no mask and no index list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from divprec.loss.config import KERNELS

log = logging.getLogger(__name__)

# Rows of the packed per-token sums written by exp_and_row_sums.
SUM_ROWS = ("others", "head_others", "xlogx_others", "xlogx_head", "target_rank")


def exp_and_row_sums(
    z: torch.Tensor,
    out: torch.Tensor,
    row_max: torch.Tensor,
    tau: torch.Tensor,
    target_logit: torch.Tensor,
    target_col: torch.Tensor,
) -> torch.Tensor:
    """out = +-exp(z - max) (negative on K_t: z >= tau), the target's entry 0; returns sums [5, c].

    z [c, v] (fp32 or bf16), out [c, v] fp32 (must not alias z), row_max / tau / target_logit [c]
    (tau and target_logit in z's dtype, exact), target_col [c] int64 (-1: not on this shard).
    Sums exclude the target: sum e, sum_{K_t} e, sum e*d, sum_{K_t} e*d with d = z - max, and
    #{a: z_a > z_x} (as float).
    """
    d = z.float() - row_max[:, None]  # [c, v] fp32
    cols = torch.arange(z.shape[1], device=z.device)
    is_target = cols[None, :] == target_col[:, None]
    e = torch.where(is_target, 0.0, torch.exp(d))
    # e * d with e = 0 is 0, also for d = -inf (a -inf logit), never NaN.
    xlogx = torch.where(e > 0.0, e * d, 0.0)
    head = z >= tau[:, None]
    sums = torch.stack(
        [
            e.sum(dim=-1),
            torch.where(head, e, 0.0).sum(dim=-1),
            xlogx.sum(dim=-1),
            torch.where(head, xlogx, 0.0).sum(dim=-1),
            (z > target_logit[:, None]).float().sum(dim=-1),
        ]
    )  # [5, c]
    out.copy_(torch.where(head, -e, e))
    return sums


def scale_by_membership(
    b: torch.Tensor, out: torch.Tensor, head_scale: torch.Tensor, tail_scale: torch.Tensor
) -> None:
    """out = |b| * (head_scale if b's sign bit is set else tail_scale), per row.

    b [c, v] fp32 as written by exp_and_row_sums; out [c, v] fp32 (must not alias b);
    head_scale / tail_scale [c].
    """
    member = torch.signbit(b)
    out.copy_(torch.where(member, -b * head_scale[:, None], b * tail_scale[:, None]))


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


def use_compiled(kernel: str) -> bool:
    """Whether ``kernel`` (loss.kernel) asks for the compiled passes."""
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
