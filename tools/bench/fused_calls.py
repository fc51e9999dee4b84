"""The fused benchmark's calls: megatron-core's output-layer matmul + vocab_parallel_cross_entropy
against divprec's fused_linear_shaped_loss, on the same hidden states and weights.

Like :mod:`bench.loss_calls`, :func:`measure` runs in the benchmark's process (tp = 1) or in each
rank's (tp > 1), so it lives in a module the spawned processes can import.
"""

from __future__ import annotations

import gc
import time

import torch

from bench.common import DTYPES, sync
from bench.loss_calls import CONFIGS, _init_megatron, _slowest


def fused_key(topk: int, config: str) -> str:
    """The name of a fused variant: fused-k{topk}-{config}."""
    return f"fused-k{topk}-{config}"


def make_inputs(vocab, tokens, hidden, tp, rank, dtype, device, seed=0):
    """hidden [tokens, h] (standard normal, the same on every rank), this rank's weight
    [vocab/tp, h] (normal, std 2/sqrt(h): logits of std about 2, as the loss benchmark's) and the
    targets [tokens]."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    width = vocab // tp
    w = torch.empty(width, hidden)
    for r in range(tp):  # every rank draws the whole weight's stream, keeps its slice
        block = torch.randn(width, hidden, generator=g) * (2.0 / hidden**0.5)
        if r == rank:
            w.copy_(block)
        del block
    target = torch.randint(0, vocab, (tokens,), generator=g)
    return (
        h.to(device=device, dtype=DTYPES[dtype]),
        w.to(device=device, dtype=DTYPES[dtype]),
        target.to(device),
    )


def loss_fn(name: str, group, kernel: str = "auto", chunk_tokens: int = 0):
    """(hidden, weight, target) -> the gradients of the summed loss w.r.t. hidden and weight,
    for "linear_ce" (megatron-core) or a fused variant key."""
    if name == "linear_ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        from megatron.core.tensor_parallel.layers import (
            linear_with_grad_accumulation_and_async_allreduce,
        )

        tp = torch.distributed.get_world_size(group) if group is not None else 1

        def run(h, w, t):
            logits = linear_with_grad_accumulation_and_async_allreduce(
                h,
                w,
                None,
                gradient_accumulation_fusion=False,
                allreduce_dgrad=tp > 1,  # the output layer's all-reduce of grad hidden
                sequence_parallel=False,
                tp_group=group,
            )  # [n, v/tp]
            return torch.autograd.grad(vocab_parallel_cross_entropy(logits, t).sum(), (h, w))

        return run
    from divprec.loss import ShapedLossConfig, fused_linear_shaped_loss

    parts = name.split("-")  # fused-k{topk}-{config}
    cfg = ShapedLossConfig(
        topk=int(parts[1][1:]), kernel=kernel, fused_chunk_tokens=chunk_tokens, **CONFIGS[parts[2]]
    )

    def run(h, w, t):
        loss, _ = fused_linear_shaped_loss(h, w, t, cfg, tp_group=group)
        return torch.autograd.grad(loss.sum(), (h, w))

    return run


def _timed_call(fn, h, w, target, device) -> tuple[float, float]:
    x, y = h.requires_grad_(True), w.requires_grad_(True)
    gc.collect()
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    grads = fn(x, y, target)
    sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    del grads
    return wall, cpu


def _peaks(fn, h, w, target, device) -> tuple[int, int]:
    """(peak bytes above the inputs, that peak less the returned gradients) of one call.

    The gradients of hidden and weight are what both paths must hand back (the parameter's
    gradient exists in training anyway), so "the loss's memory" is the peak without them:
    the logits, their gradient and the loss's temporaries.
    """
    x, y = h.requires_grad_(True), w.requires_grad_(True)
    outputs = h.numel() * h.element_size() + w.numel() * 4  # fused keeps grad weight in fp32
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = fn(x, y, target)
        torch.cuda.synchronize()
        outputs = sum(g.numel() * g.element_size() for g in grads)
        del grads
        peak = torch.cuda.max_memory_allocated() - base
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            grads = fn(x, y, target)
            outputs = sum(g.numel() * g.element_size() for g in grads)
            del grads
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
    return int(peak), int(peak - outputs)


def measure(rank: int, world: int, spec: dict) -> dict:
    """Time and peak memory of every function of one fused group in this process.

    Returns {function: {"wall": [...], "cpu": [...], "peak": bytes, "loss_peak": bytes}}.
    """
    device = spec["device"]
    if spec.get("threads") and device == "cpu" and world == 1:
        torch.set_num_threads(spec["threads"])
    if device == "cuda":
        torch.cuda.set_device(rank)
    _init_megatron(world)
    import torch.distributed as dist

    group = dist.group.WORLD if world > 1 else None
    h, w, target = make_inputs(
        spec["vocab"], spec["tokens"], spec["hidden"], world, rank, spec["dtype"], device
    )
    names = spec["functions"]
    fns = {n: loss_fn(n, group, spec["kernel"], spec["chunk_tokens"]) for n in names}
    out = {n: {"wall": [], "cpu": [], "peak": None, "loss_peak": None} for n in names}
    for _ in range(spec["warmup"]):
        for n in names:
            _timed_call(fns[n], h, w, target, device)
    for r in range(spec["repeats"]):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = _slowest(list(_timed_call(fns[n], h, w, target, device)), world)
            out[n]["wall"].append(wall)
            out[n]["cpu"].append(cpu)
    if spec["memory"] == "alloc":
        for n in names:
            peak, loss_peak = _slowest(list(_peaks(fns[n], h, w, target, device)), world)
            out[n]["peak"], out[n]["loss_peak"] = int(peak), int(loss_peak)
    return out
