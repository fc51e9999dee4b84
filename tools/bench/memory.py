"""Peak memory of one forward + backward: live tensors (alloc) or the resident set (rss)."""

from __future__ import annotations

import gc

import torch

from bench.common import fill


def alloc_peak(fn, logits: torch.Tensor, block, target: torch.Tensor, device: str) -> int:
    """Peak bytes of live tensors during fn(logits, target), the inputs included.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: torch's allocator keeps no
    peak, so the call runs under ``torch.profiler`` with ``profile_memory=True`` and the
    allocation events (+ on allocation, - on free) are summed in order; the peak is their maximum.
    """
    fill(logits, block)
    logits.grad = None
    x = logits.requires_grad_(True)
    inputs = logits.numel() * logits.element_size() + target.numel() * target.element_size()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grad = fn(x, target)
        torch.cuda.synchronize()
        del grad
        peak = torch.cuda.max_memory_allocated() - base + inputs
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            grad = fn(x, target)
            del grad  # after the peak: the gradient is alive until the call's end
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        ]
        events.sort(key=lambda e: e[0])  # stable: same-time events keep their recorded order
        live = high = 0
        for _, nbytes in events:
            live += nbytes
            high = max(high, live)
        peak = high + inputs
    logits.grad = None
    logits.requires_grad_(False)
    return int(peak)


def rss_kib(field_name: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (now) or VmHWM (the high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def reset_rss_peak() -> None:
    """VmHWM := VmRSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def available_bytes(device: str) -> int:
    """Free device memory (CUDA) or MemAvailable (CPU)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0
