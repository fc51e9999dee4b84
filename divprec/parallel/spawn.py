"""Run a function in N local processes joined by a torch.distributed process group.

Used by the tests (every parallel path is checked against a single-process reference) and by the
benchmarks (tensor parallel on CPU through gloo). Production runs use torchrun, not this.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # N processes share few cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle copies tensor data; the queue's default would share it through file
        # descriptors that vanish when this process exits.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_in_processes(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes.

    ``fn`` must be importable (a module-level function) and its return value picklable. The process
    group is initialised before ``fn`` runs and destroyed after. Returns the per-rank results in rank
    order; re-raises the first failure with the failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(rank, world_size, port, backend, fn, args, results), daemon=False
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(outputs) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if results.empty():
            if not any(p.is_alive() for p in procs) and results.empty():
                break
            time.sleep(0.02)
            continue
        rank, status, payload = results.get()
        if status == "ok":
            outputs[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
            break
    for p in procs:
        p.join(timeout=5 if errors else 30)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RuntimeError(errors[0])
    if len(outputs) < world_size:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(
            f"run_in_processes: {world_size - len(outputs)} of {world_size} ranks returned nothing "
            f"within {timeout_s:.0f}s (exit codes {codes})"
        )
    return [outputs[r] for r in range(world_size)]
