"""Rows in chunks: how many rows a chunk holds, and chunks run in threads on CPU.

Every step of the shaped loss works on chunks of rows so that its temporaries stay per chunk,
never vocabulary-sized for the whole batch. The sizes below are tuning values, not correctness:
any chunk size gives the same results (the tests shrink them to a few rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

# Logits per chunk. Eager on CPU: small enough (8 MiB of fp32) that a chunk's many small ops run
# from the cache; the value to measure is the last-level cache per core. Compiled on CPU: larger,
# because a fused loop's cost is per call, not per cache miss; the fastest of 2^19..2^27 in
# `tools/bench_loss.py --kernel compiled` (the value changed here) is the one to keep. On CUDA
# larger still (fewer kernel launches and host syncs); that value is a guess, not yet measured.
CHUNK_ELEMENTS = 1 << 21
COMPILED_CHUNK_ELEMENTS = 1 << 24
CUDA_CHUNK_ELEMENTS = 1 << 25
# An eager pass runs in sub-chunks of about this many logits on CPU, so that its several
# sub-chunk-sized fp32 temporaries (512 KiB each at 2^17) stay in one core's L2 cache: measure
# the L2 size, and `tools/bench_loss.py --kernel eager` around it. A compiled pass makes no
# temporaries and takes a whole chunk per call.
SUB_CHUNK_ELEMENTS = 1 << 17


def chunk_rows(vocab: int, device: torch.device, compiled: bool) -> int:
    """Rows per chunk for rows of ``vocab`` logits: the compiled passes' size or the eager one."""
    if device.type == "cuda":
        elements = CUDA_CHUNK_ELEMENTS
    else:
        elements = COMPILED_CHUNK_ELEMENTS if compiled else CHUNK_ELEMENTS
    return max(1, elements // max(vocab, 1))


def sub_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per call of an eager pass (on CUDA a whole eager chunk)."""
    if device.type == "cuda":
        return chunk_rows(vocab, device, compiled=False)
    return max(1, SUB_CHUNK_ELEMENTS // max(vocab, 1))


def row_chunks(rows: int, step: int) -> Iterator[slice]:
    """slice(0, step), slice(step, 2 * step), ... up to ``rows``."""
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def for_each_chunk(
    rows: int, step: int, device: torch.device, fn: Callable[[slice], None], threads: bool
) -> None:
    """Call fn(rows_i) for every chunk of ``step`` rows.

    With ``threads`` on CPU with several intra-op threads, chunks run concurrently in that many
    Python threads, each chunk single-threaded: the eager passes' ops (and a C kernel's calls) are
    each too small for an OpenMP fork/join per op to pay off. torch ops and the C kernel release
    the GIL, so the threads compute in parallel. The compiled passes instead parallelise inside
    their one loop (``threads=False``). The results do not depend on the schedule: chunks touch
    disjoint rows.
    """
    chunks = list(row_chunks(rows, step))
    workers = torch.get_num_threads() if device.type == "cpu" and threads else 1
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            fn(chunk)
        return

    def call(chunk: slice) -> None:
        with torch.no_grad():  # grad mode is per thread; the loss's forward runs without
            fn(chunk)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            for future in [pool.submit(call, chunk) for chunk in chunks]:
                future.result()  # re-raises a chunk's exception
    finally:
        torch.set_num_threads(workers)
