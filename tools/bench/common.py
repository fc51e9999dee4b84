"""Inputs, device sync, machine facts and JSON output, shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FILL_ROWS = 64  # the logits repeat a block of this many random rows (cheap refills)


def make_inputs(vocab: int, tokens: int, tp: int, rank: int, dtype: str, device: str, seed=0):
    """Rank ``rank``'s shard of the logits [tokens, vocab/tp] (empty, see :func:`fill`), the block
    of rows it is filled from (standard normal times 2) and the targets [tokens]."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(min(FILL_ROWS, tokens), vocab, generator=g) * 2.0
    width = vocab // tp
    block = block[:, rank * width : (rank + 1) * width].to(device=device, dtype=DTYPES[dtype])
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    logits = torch.empty(tokens, width, dtype=DTYPES[dtype], device=device)
    return logits, block, target


def fill(logits: torch.Tensor, block: torch.Tensor) -> None:
    """logits[i] = block[i % rows]: the same values on every call, cheaply."""
    with torch.no_grad():
        for start in range(0, logits.shape[0], block.shape[0]):
            rows = min(block.shape[0], logits.shape[0] - start)
            logits[start : start + rows].copy_(block[:rows])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def banner(name: str, info: dict) -> str:
    return (
        f"{name}: {info.get('cpu', '?')}, {info['cpu_count']} cores, torch {info['torch']}, "
        f"threads {torch.get_num_threads()}, load {load_avg()}"
    )


def write_json(path: str, records: list[dict], info: dict) -> None:
    """The records, each with the machine, written atomically (a long run keeps what it has)."""
    for r in records:
        r["machine"] = info
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
