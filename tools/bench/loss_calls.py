"""The loss benchmark's calls: megatron-core's CE and shaped-loss variants, timed per process.

:func:`measure` and :func:`rss_worker` run in the benchmark's process (tp = 1, inside a world of
one) or in each rank's process (tp > 1, spawned by divprec.parallel.spawn), so they live in a
module the spawned processes can import.
"""

from __future__ import annotations

import gc
import sys
import time

import torch

from bench.common import fill, make_inputs, sync
from bench.memory import alloc_peak, reset_rss_peak, rss_kib

# The paper's settings (arXiv 2512.22955): precision prior with the tail penalty; and cross-entropy
# expressed as the shaped loss (beta = 0, no negative rewards).
CONFIGS = {
    "paper": {"beta": -0.25, "tail_negative_reward": -0.1, "topk_negative_reward": 0.0},
    "ce": {"beta": 0.0, "tail_negative_reward": 0.0, "topk_negative_reward": 0.0},
}


def variant_key(topk: int, config: str, inplace: bool) -> str:
    """The name of a shaped-loss variant: shaped-k{topk}-{config}[-inplace]."""
    return f"shaped-k{topk}-{config}{'-inplace' if inplace else ''}"


def _shaped_impl(path: str | None):
    """vocab_parallel_shaped_loss from divprec, or from the file ``path``."""
    if path is None:
        from divprec.loss import vocab_parallel_shaped_loss

        return vocab_parallel_shaped_loss
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_loss_impl", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.vocab_parallel_shaped_loss


def loss_fn(name: str, group, impl: str | None = None, kernel: str = "auto"):
    """(logits, target) -> the gradient of the summed loss, for "megatron_ce" or a variant key.

    ``torch.autograd.grad(loss.sum(), logits)`` hands the gradient over as the output layer's
    backward would receive it (a leaf's ``.backward()`` would add a copy for megatron-core, whose
    gradient is the logits tensor itself).
    """
    if name == "megatron_ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def run(x, t):
            return torch.autograd.grad(vocab_parallel_cross_entropy(x, t).sum(), x)[0]

        return run
    from divprec.loss import ShapedLossConfig

    shaped = _shaped_impl(impl)
    parts = name.split("-")  # shaped-k{topk}-{config}[-inplace]
    cfg = ShapedLossConfig(topk=int(parts[1][1:]), kernel=kernel, **CONFIGS[parts[2]])
    kwargs = {"inplace": True} if parts[-1] == "inplace" else {}

    def run(x, t):
        loss, _ = shaped(x, t, cfg, tp_group=group, **kwargs)
        return torch.autograd.grad(loss.sum(), x)[0]

    return run


def timed_call(fn, logits, block, target, device) -> tuple[float, float]:
    """Wall and CPU seconds of one forward+backward on freshly filled logits (filling untimed:
    megatron-core's CE and ``inplace=True`` overwrite fp32 logits)."""
    fill(logits, block)
    logits.grad = None
    x = logits.requires_grad_(True)
    gc.collect()
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    grad = fn(x, target)
    sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    del grad
    logits.grad = None
    logits.requires_grad_(False)
    return wall, cpu


def _init_megatron(tp: int) -> None:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def _slowest(values: list[float], world: int) -> list[float]:
    """The maximum over the ranks (a tp > 1 call takes as long as its slower rank)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure(rank: int, world: int, spec: dict) -> dict:
    """Time (and measure the memory of) every function of one group in this process.

    The process group exists already (a world of one, or the spawned ranks'). Each repeat runs
    every function once, in a rotating order, so load changes on a shared machine hit them alike.
    Returns {function: {"wall": [...], "cpu": [...], "peak": bytes or None}}.
    """
    device = spec["device"]
    if spec.get("threads") and device == "cpu" and world == 1:
        torch.set_num_threads(spec["threads"])
    if device == "cuda":
        torch.cuda.set_device(rank)
    _init_megatron(world)
    import torch.distributed as dist

    group = dist.group.WORLD if world > 1 else None
    logits, block, target = make_inputs(
        spec["vocab"], spec["tokens"], world, rank, spec["dtype"], device
    )
    names = spec["functions"]
    fns = {name: loss_fn(name, group, spec.get("impl"), spec["kernel"]) for name in names}
    out = {name: {"wall": [], "cpu": [], "peak": None} for name in names}
    for _ in range(spec["warmup"]):
        for name in names:
            timed_call(fns[name], logits, block, target, device)
    for r in range(spec["repeats"]):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wall, cpu = _slowest(list(timed_call(fns[name], logits, block, target, device)), world)
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
    if spec.get("steps"):
        for name in names[1:] if names[0] == "megatron_ce" else names:
            out[name]["steps"] = _step_ms(fns[name], logits, block, target, device, spec, world)
    if spec["memory"] == "alloc":
        for name in names:
            peak = alloc_peak(fns[name], logits, block, target, device)
            out[name]["peak"] = int(_slowest([peak], world)[0])
    return out


def _step_ms(fn, logits, block, target, device, spec, world) -> dict[str, float]:
    """Median ms of each of the loss's steps (divprec.loss.step_times) over ``repeats`` recorded
    calls; with tp > 1 the slower rank's."""
    import statistics

    from divprec.loss import step_times

    calls = []
    for _ in range(spec["repeats"]):
        with step_times.recording() as seconds:
            timed_call(fn, logits, block, target, device)
        calls.append(seconds)
    names = list(calls[0])
    medians = [statistics.median(c[n] for c in calls) * 1e3 for n in names]
    return dict(zip(names, _slowest(medians, world), strict=True))


def rss_worker(rank: int, world: int, spec: dict) -> int:
    """One function's resident-set high-water mark over one forward+backward, in a fresh process.

    Bytes: VmHWM after the call minus VmRSS before the inputs were made (so the inputs count, as
    with the alloc method). Lazy initialisation is done first by a call at a toy size.
    """
    device = spec["device"]
    _init_megatron(world)
    import torch.distributed as dist

    group = dist.group.WORLD if world > 1 else None
    small = make_inputs(128 * world, 8, world, rank, spec["dtype"], device)
    for warm in ("megatron_ce", variant_key(1, "ce", False)):
        timed_call(loss_fn(warm, group, kernel=spec["kernel"]), *small, device)
    del small
    gc.collect()
    before = rss_kib("VmRSS")
    logits, block, target = make_inputs(
        spec["vocab"], spec["tokens"], world, rank, spec["dtype"], device
    )
    fill(logits, block)
    del block
    fn = loss_fn(spec["function"], group, spec.get("impl"), spec["kernel"])
    x = logits.requires_grad_(True)
    gc.collect()
    reset_rss_peak()
    grad = fn(x, target)
    del grad
    peak = (rss_kib("VmHWM") - before) * 1024
    return int(_slowest([peak], world)[0])
