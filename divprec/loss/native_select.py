"""The CPU kernel of the shaped loss's top-k threshold (native/block_topk.c): build, load, call.

torch has no exact batched selection cheaper than ``torch.topk``, which on CPU costs several times
a max pass at topk = 100; the C kernel runs the same block algorithm as the torch ops in
``divprec.loss.block_topk`` with one read of each row and a quickselect on the few logits that
can be in the top k, while the row is still in cache. It is built at first use with the system C
compiler (``cc -O3 -march=native``, about a second) into a per-user cache keyed by the source,
the compiler and the CPU, and loaded with ctypes; calls release the GIL, so chunks of rows run in
threads. ``loss.kernel=eager`` never builds it; divprec.loss.local_top decides, the same on every
rank, what runs when it cannot be built.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "block_topk.c"
DTYPES = (torch.float32, torch.bfloat16)


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded."""


_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_ERROR: BuildError | None = None


def _cpu_signature() -> str:
    """The CPU model and feature flags: a library built with -march=native runs only there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [
        line
        for line in text.splitlines()
        if line.startswith(("model name", "flags", "Features", "CPU part"))
    ]
    return "\n".join(sorted(set(keep))) or platform.machine()


def cache_dir() -> Path:
    """Where built kernels are kept: $DIVPREC_KERNEL_CACHE, else ~/.cache/divprec/kernels."""
    configured = os.environ.get("DIVPREC_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "divprec" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C compiler found (set CC, or install gcc)")


def _build() -> Path:
    compiler = _compiler()
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    directory = cache_dir()
    target = directory / f"block_topk-{key}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir()) / "divprec-kernels"
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / target.name
    # Built under a unique name, then renamed: ranks building at once never load a partial file.
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = [
        compiler,
        "-O3",
        "-march=native",
        "-shared",
        "-fPIC",
        str(SOURCE),
        "-o",
        str(partial),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        # -march=native is not known to every compiler; the portable build is still exact.
        command.remove("-march=native")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"{' '.join(command)} failed: {detail}")
    os.replace(partial, target)
    log.info("built the shaped loss's CPU top-k kernel: %s", target)
    return target


def library() -> ctypes.CDLL:
    """The loaded kernel, built at the first call; raises BuildError (every call) if it cannot be."""
    global _LIBRARY, _ERROR
    with _LOCK:
        if _LIBRARY is not None:
            return _LIBRARY
        if _ERROR is not None:
            raise _ERROR
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError, BuildError) as error:
            _ERROR = error if isinstance(error, BuildError) else BuildError(str(error))
            raise _ERROR from None
        fn = lib.divprec_block_topk
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 5
        _LIBRARY = lib
        return lib


def build_error() -> BuildError | None:
    """None when the kernel is built (or builds now) on this process, else why it cannot be."""
    try:
        library()
    except BuildError as error:
        return error
    return None


def available() -> bool:
    """Whether the kernel builds and loads here (this process only; the loss's ranks agree on it
    in divprec.loss.local_top.select)."""
    return build_error() is None


def supports(z: torch.Tensor) -> bool:
    """Whether the kernel takes these logits: CPU, fp32 or bf16, rows contiguous."""
    return z.device.type == "cpu" and z.dtype in DTYPES and z.dim() == 2 and z.stride(1) == 1


def block_topk(
    z: torch.Tensor, k: int, above: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row max [c], the k largest values [c, k] (any order), the ties beyond them [c], counts [c].

    For each row of z [c, v] (1 <= k <= v), exactly, fp32: the ties are #{z >= the k-th
    largest} - k; with ``above`` ([c] fp32, a threshold per row) the counts are #{z > above},
    else None (floats holding integers). The kernel picks its own blocks (native/block_topk.c).
    """
    if not supports(z):
        raise ValueError(f"block_topk takes CPU fp32/bf16 rows, got {z.dtype} {tuple(z.shape)}")
    rows, cols = z.shape
    row_max = torch.empty(rows, dtype=torch.float32)
    top = torch.empty((rows, k), dtype=torch.float32)
    ties = torch.empty(rows, dtype=torch.float32)
    counts = None
    if above is not None:
        above = above.to(torch.float32).contiguous()
        if above.shape != (rows,):
            raise ValueError(f"block_topk: above must be [{rows}], got {tuple(above.shape)}")
        counts = torch.empty(rows, dtype=torch.float32)
    status = library().divprec_block_topk(
        z.data_ptr(),
        int(z.dtype == torch.bfloat16),
        rows,
        cols,
        z.stride(0),
        k,
        row_max.data_ptr(),
        top.data_ptr(),
        ties.data_ptr(),
        None if above is None else above.data_ptr(),
        None if counts is None else counts.data_ptr(),
    )
    if status == 1:
        raise ValueError(f"block_topk: bad arguments (k={k}, shape {(rows, cols)})")
    if status != 0:
        raise MemoryError("block_topk: the per-row scratch could not be allocated")
    return row_max, top, ties, counts
