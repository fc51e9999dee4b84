"""The two elementwise passes of the shaped loss over a chunk of rows, eager or compiled.

The forward's pass reads the chunk once and reduces it to a few sums per row; the backward's
reads it once and writes the gradient. Run eagerly each is a dozen torch ops; compiled
(``torch.compile``: a C++/OpenMP loop on CPU, a Triton kernel on CUDA) each is one fused loop
with every reduction in registers. Both are the same function, so the compiled kernel is the
eager one by construction; the tests check both against the float64 reference.

K_t membership is z >= tau, decided again where needed: no mask and no index list is kept.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from divprec.loss.config import KERNELS

log = logging.getLogger(__name__)

# Rows of the packed per-token sums returned by row_sums.
SUM_ROWS = ("others", "head_others", "xlogx_others", "xlogx_head", "target_rank")


def row_sums(
    z: torch.Tensor,
    row_max: torch.Tensor,
    tau: torch.Tensor,
    target_logit: torch.Tensor,
    target_col: torch.Tensor,
) -> torch.Tensor:
    """The forward's pass: per-row sums [5, c] over a chunk of rows; reads z, writes nothing else.

    z [c, v] (fp32 or bf16), row_max [c] fp32, tau / target_logit [c] in z's dtype (exact),
    target_col [c] int32 (-1: the target is not on this shard). With e = exp(z - max) and
    d = z - max, the sums leave the target out: sum e, sum_{K_t} e, sum e*d, sum_{K_t} e*d (K_t:
    z >= tau), and #{a: z_a > z_x} (as float).
    """
    d = z.float() - row_max[:, None]  # [c, v] fp32
    cols = torch.arange(z.shape[1], device=z.device, dtype=torch.int32)
    e = torch.where(cols[None, :] == target_col[:, None], 0.0, torch.exp(d))
    # e * d with e = 0 is 0, also for d = -inf (a -inf logit), never NaN.
    xlogx = torch.where(e > 0.0, e * d, 0.0)
    head = z >= tau[:, None]
    return torch.stack(
        [
            e.sum(dim=-1),
            torch.where(head, e, 0.0).sum(dim=-1),
            xlogx.sum(dim=-1),
            torch.where(head, xlogx, 0.0).sum(dim=-1),
            (z > target_logit[:, None]).float().sum(dim=-1),
        ]
    )  # [5, c]


def shaped_grad(
    z: torch.Tensor,
    out: torch.Tensor,
    row_max: torch.Tensor,
    tau: torch.Tensor,
    head_scale: torch.Tensor,
    tail_scale: torch.Tensor,
) -> None:
    """The backward's pass: out = exp(z - max) * (head_scale on K_t, else tail_scale), per row.

    z [c, v] fp32 or bf16; out [c, v] in z's dtype, must not alias z; row_max, head_scale,
    tail_scale [c] fp32; tau [c] in z's dtype. e is recomputed from z instead of being kept from
    the forward: one read instead of a vocabulary-sized buffer written and read back. The
    target's entries are set by the caller.
    """
    e = torch.exp(z.float() - row_max[:, None])  # [c, v] fp32
    scale = torch.where(z >= tau[:, None], head_scale[:, None], tail_scale[:, None])
    out.copy_((e * scale).to(out.dtype))


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


def resolve(kernel: str, elements: int) -> str:
    """The kernel a call runs: ``kernel`` (loss.kernel), with "auto" on a small call -> "eager"."""
    if kernel == "auto" and elements < AUTO_MIN_ELEMENTS:
        return "eager"
    return kernel


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
