"""Benchmark: the shaped loss against megatron-core's vocab_parallel_cross_entropy.

    python tools/bench_loss.py --json bench_loss.json                # the full grid (long)
    python tools/bench_loss.py --quick                               # one small case, 3 repeats
    python tools/bench_loss.py --cases 'v32768-t4096-k100-tp1-*' --threads 1 --repeats 5
    python tools/bench_loss.py --device cuda --dtype bf16 --tp 1     # on a GPU
    python tools/bench_loss.py --threshold --json threshold.json     # top-k threshold methods

Both functions get the same inputs in the same process: logits [tokens, vocab/tp] (standard
normal times 2, the same rows on every run) and uniform random targets. A call is timed from the
forward to the gradient, ``torch.autograd.grad(loss.sum(), logits)``, which hands the gradient over
as the output layer's backward would receive it (a leaf's ``.backward()`` would add a copy for
megatron-core, whose gradient is the logits tensor itself). Every call gets freshly filled logits
(not timed), because megatron-core's cross-entropy and ``inplace=True`` overwrite fp32 logits. Each
repeat runs every function once, in a rotating order, so load changes on a shared machine hit them
alike; the table reports medians and their ratios. tp = 2 runs in two processes joined by gloo
(CPU) or NCCL (CUDA), one thread each on CPU; a repeat's time is the slower rank's.

Peak memory (``--memory alloc``, the default): the bytes of tensors alive at the high-water mark
of one forward+backward, inputs included. CUDA: ``torch.cuda.max_memory_allocated`` after a reset.
CPU: torch's CPU allocator keeps no peak, so the call runs once under ``torch.profiler`` with
``profile_memory=True`` and the allocation events (sizes, + on allocation, - on free) are summed
in order; the peak is their maximum plus the inputs. ``--memory rss`` instead measures the
process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) around
one call in a fresh process per function: what the OS had to provide, allocator slack included.
With tp = 2 the numbers are per rank (the larger rank). megatron-core turns fp32 logits into the
softmax in place, so it allocates nothing vocabulary-sized for them; that is counted as it is.

A case whose tensors would not fit in the free memory is skipped with the reason printed (or,
for fp32, run only with ``inplace=True``); ``--memory-fraction`` sets the share of free memory
a case may plan to use.

JSON (``--json PATH``): a list of cases, each with vocab, tokens, topk, tp, device, dtype,
config, inplace, kernel (loss.kernel), shaped_ms, megatron_ce_ms, time_ratio, shaped_peak_bytes,
megatron_ce_peak_bytes, memory_ratio, and also the CPU time (ms of user+sys time of the process;
robust to other load for single-threaded runs), every repeat's wall time, the threads, the load
average and the memory method. Skipped cases carry ``skipped`` (the reason) and null numbers.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the spawned tp workers import this file as a module
    sys.path.insert(0, REPO)

# The paper's settings (arXiv 2512.22955): precision prior with the tail penalty; and cross-entropy
# expressed as the shaped loss (beta = 0, no negative rewards).
CONFIGS = {
    "paper": {"beta": -0.25, "tail_negative_reward": -0.1, "topk_negative_reward": 0.0},
    "ce": {"beta": 0.0, "tail_negative_reward": 0.0, "topk_negative_reward": 0.0},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_FILL_ROWS = 64  # the logits repeat a block of this many random rows (cheap refills)


@dataclass(frozen=True)
class Variant:
    """One shaped-loss setting of a group; megatron-core's CE is the group's baseline."""

    topk: int
    config: str
    inplace: bool

    @property
    def key(self) -> str:
        return f"shaped-k{self.topk}-{self.config}{'-inplace' if self.inplace else ''}"


@dataclass
class Group:
    """One input (vocab, tokens, tp, dtype) and the variants measured on it."""

    vocab: int
    tokens: int
    tp: int
    dtype: str
    variants: list[Variant] = field(default_factory=list)

    def case_name(self, v: Variant) -> str:
        name = f"v{self.vocab}-t{self.tokens}-k{v.topk}-tp{self.tp}-{self.dtype}-{v.config}"
        return name + ("-inplace" if v.inplace else "")


# ----------------------------------------------------------------------------- inputs and calls


def _make_inputs(vocab, tokens, tp, rank, dtype, device, seed=0):
    """Rank ``rank``'s shard of the logits [tokens, vocab/tp] and the targets [tokens]."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(min(_FILL_ROWS, tokens), vocab, generator=g) * 2.0
    width = vocab // tp
    block = block[:, rank * width : (rank + 1) * width].to(device=device, dtype=DTYPES[dtype])
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    logits = torch.empty(tokens, width, dtype=DTYPES[dtype], device=device)
    return logits, block, target


def _fill(logits: torch.Tensor, block: torch.Tensor) -> None:
    with torch.no_grad():
        for start in range(0, logits.shape[0], block.shape[0]):
            rows = min(block.shape[0], logits.shape[0] - start)
            logits[start : start + rows].copy_(block[:rows])


def _shaped_impl(path: str | None):
    """vocab_parallel_shaped_loss from divprec, or from the file ``path`` (e.g. an older revision
    of divprec/loss/vocab_parallel.py, for before/after numbers)."""
    if path is None:
        from divprec.loss import vocab_parallel_shaped_loss

        return vocab_parallel_shaped_loss
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_loss_impl", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.vocab_parallel_shaped_loss


def _loss_fn(name: str, group, impl: str | None = None, kernel: str = "auto"):
    """(logits, target) -> fwd + bwd, for megatron-core's CE or a shaped variant key."""
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_call(fn, logits, block, target, device) -> tuple[float, float]:
    """Wall and CPU seconds of one forward+backward on freshly filled logits."""
    _fill(logits, block)
    logits.grad = None
    x = logits.requires_grad_(True)
    gc.collect()
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    grad = fn(x, target)
    _sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    del grad
    logits.grad = None
    logits.requires_grad_(False)
    return wall, cpu


def _alloc_peak(fn, logits, block, target, device) -> int:
    """Peak bytes of live tensors during one forward+backward, the inputs included."""
    _fill(logits, block)
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


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _init_megatron(tp: int) -> None:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def _measure(rank, world, spec: dict) -> dict:
    """Time (and measure the memory of) every function of one group in this process.

    Runs in the main process for tp = 1 and in each rank's process for tp > 1 (the process group
    is already initialised by the caller). Returns {function: {"wall": [...], "cpu": [...],
    "peak": bytes or None}}.
    """
    device = spec["device"]
    if spec.get("threads") and device == "cpu" and world == 1:
        torch.set_num_threads(spec["threads"])
    if device == "cuda":
        torch.cuda.set_device(rank)
    _init_megatron(world)
    import torch.distributed as dist

    group = dist.group.WORLD if world > 1 else None
    logits, block, target = _make_inputs(
        spec["vocab"], spec["tokens"], world, rank, spec["dtype"], device
    )
    names = spec["functions"]
    fns = {name: _loss_fn(name, group, spec.get("impl"), spec["kernel"]) for name in names}
    out = {name: {"wall": [], "cpu": [], "peak": None} for name in names}
    for _ in range(spec["warmup"]):
        for name in names:
            _timed_call(fns[name], logits, block, target, device)
    for r in range(spec["repeats"]):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wall, cpu = _timed_call(fns[name], logits, block, target, device)
            if world > 1:  # the group's time is the slower rank's
                t = torch.tensor([wall, cpu], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                wall, cpu = t.tolist()
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
    if spec["memory"] == "alloc":
        for name in names:
            peak = _alloc_peak(fns[name], logits, block, target, device)
            if world > 1:
                t = torch.tensor([peak], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                peak = int(t.item())
            out[name]["peak"] = peak
    return out


def _rss_worker(rank, world, spec: dict) -> int:
    """One function's resident-set high-water mark over one forward+backward, in a fresh process.

    Bytes: VmHWM after the call minus VmRSS before the inputs were made (so the inputs count, as
    with the alloc method). Lazy initialisation is done first by a call at a toy size.
    """
    device = spec["device"]
    _init_megatron(world)
    import torch.distributed as dist

    group = dist.group.WORLD if world > 1 else None
    small = _make_inputs(128 * world, 8, world, rank, spec["dtype"], device)
    for warm in ("megatron_ce", "shaped-k1-ce"):
        _timed_call(_loss_fn(warm, group, kernel=spec["kernel"]), *small, device)
    del small
    gc.collect()
    before = _rss_kib("VmRSS")
    logits, block, target = _make_inputs(
        spec["vocab"], spec["tokens"], world, rank, spec["dtype"], device
    )
    _fill(logits, block)
    del block
    fn = _loss_fn(spec["function"], group, spec.get("impl"), spec["kernel"])
    x = logits.requires_grad_(True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    grad = fn(x, target)
    del grad
    peak = (_rss_kib("VmHWM") - before) * 1024
    if world > 1:
        t = torch.tensor([peak], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = int(t.item())
    return peak


# ----------------------------------------------------------------------------- planning


def _bytes_needed(vocab, tokens, dtype, function: str) -> int:
    """Bytes one call keeps alive at its peak, all ranks together (inputs included)."""
    n = vocab * tokens
    if dtype == "bf16":  # bf16 logits, an fp32 buffer, and the bf16 gradient made from it
        return n * (2 + 4 + 2)
    if function == "megatron_ce" or function.endswith("-inplace"):
        return n * 4
    return n * 8  # the logits and the shaped loss's own fp32 buffer


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _plan(args) -> list[Group]:
    groups = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            for tp in args.tp:
                for dtype in args.dtype:
                    g = Group(vocab, tokens, tp, dtype)
                    for topk in args.topk:
                        for config in args.configs:
                            for inplace in _inplace_choices(args.inplace, dtype):
                                v = Variant(topk, config, inplace)
                                if _selected(g.case_name(v), args.cases):
                                    g.variants.append(v)
                    if g.variants:
                        groups.append(g)
    return groups


def _inplace_choices(choice: str, dtype: str) -> list[bool]:
    if dtype != "fp32":
        return [False]  # inplace has no effect on bf16 logits
    return {"both": [False, True], "on": [True], "off": [False]}[choice]


def _selected(name: str, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    return any(
        fnmatch.fnmatch(name, p) if any(ch in p for ch in "*?[") else p in name for p in patterns
    )


# ----------------------------------------------------------------------------- running


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _run_group(g: Group, args) -> list[dict]:
    """Measure one group; return its case records (skipped ones included)."""
    functions = ["megatron_ce"] + [v.key for v in g.variants]
    budget = args.memory_fraction * _available_bytes(args.device)
    margin = 512 * 2**20 * g.tp  # interpreter, libraries, small tensors per process
    fits = {f: _bytes_needed(g.vocab, g.tokens, g.dtype, f) + margin <= budget for f in functions}
    records = []

    def skipped(v: Variant, reason: str) -> dict:
        print(f"  skip {g.case_name(v)}: {reason}", flush=True)
        return _record(g, v, args, None, None, reason)

    if not fits["megatron_ce"] or g.vocab % g.tp or g.tokens < 1:
        need = _bytes_needed(g.vocab, g.tokens, g.dtype, "megatron_ce") + margin
        reason = (
            f"vocab {g.vocab} not divisible by tp {g.tp}"
            if g.vocab % g.tp
            else f"needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB usable "
            f"({args.memory_fraction:.0%} of free {args.device} memory)"
        )
        return [skipped(v, reason) for v in g.variants]
    run_variants = []
    for v in g.variants:
        if v.topk > g.vocab:
            records.append(skipped(v, f"topk {v.topk} > vocab {g.vocab}"))
        elif not fits[v.key]:
            need = _bytes_needed(g.vocab, g.tokens, g.dtype, v.key) + margin
            records.append(
                skipped(
                    v,
                    f"needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB usable"
                    + (" (inplace=True fits)" if g.dtype == "fp32" and not v.inplace else ""),
                )
            )
        else:
            run_variants.append(v)
    if not run_variants:
        return records
    spec = {
        "vocab": g.vocab,
        "tokens": g.tokens,
        "dtype": g.dtype,
        "device": args.device,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "memory": args.memory,
        "functions": ["megatron_ce"] + [v.key for v in run_variants],
        "impl": args.impl,
        "kernel": args.kernel,
    }
    load_before = _load()
    t0 = time.perf_counter()
    if g.tp == 1:
        _ensure_single_process_group(args.device)
        result = _measure(0, 1, spec)
        _free_megatron()
    else:
        from divprec.parallel.spawn import run_in_processes

        backend = "nccl" if args.device == "cuda" else "gloo"
        result = run_in_processes(_measure, g.tp, spec, backend=backend, timeout_s=args.timeout)[0]
    if args.memory == "rss":
        from divprec.parallel.spawn import run_in_processes

        for name in spec["functions"]:
            rss_spec = {**spec, "function": name}
            result[name]["peak"] = run_in_processes(
                _rss_worker, g.tp, rss_spec, timeout_s=args.timeout
            )[0]
    elapsed = time.perf_counter() - t0
    meta = {"load_avg_before": load_before, "load_avg_after": _load(), "group_seconds": elapsed}
    for v in run_variants:
        records.append(_record(g, v, args, result[v.key], result["megatron_ce"], None, meta))
    return records


def _record(g, v, args, shaped, megatron, skipped, meta=None) -> dict:
    rec = {
        "case": g.case_name(v),
        "vocab": g.vocab,
        "tokens": g.tokens,
        "topk": v.topk,
        "tp": g.tp,
        "device": args.device,
        "dtype": g.dtype,
        "config": v.config,
        **CONFIGS[v.config],
        "inplace": v.inplace,
        "threads": (args.threads or torch.get_num_threads()) if g.tp == 1 else 1,
        "repeats": args.repeats,
        "memory_method": args.memory,
        "impl": args.impl or "divprec",
        "kernel": args.kernel,
        "skipped": skipped,
    }
    keys = ("shaped_ms", "megatron_ce_ms", "time_ratio", "shaped_cpu_ms", "megatron_ce_cpu_ms",
            "cpu_time_ratio", "shaped_peak_bytes", "megatron_ce_peak_bytes", "memory_ratio")  # fmt: skip
    rec.update(dict.fromkeys(keys))
    if shaped is None:
        return rec
    s_ms, m_ms = statistics.median(shaped["wall"]) * 1e3, statistics.median(megatron["wall"]) * 1e3
    s_cpu, m_cpu = statistics.median(shaped["cpu"]) * 1e3, statistics.median(megatron["cpu"]) * 1e3
    rec.update(
        shaped_ms=s_ms,
        megatron_ce_ms=m_ms,
        time_ratio=s_ms / m_ms,
        shaped_cpu_ms=s_cpu,
        megatron_ce_cpu_ms=m_cpu,
        cpu_time_ratio=s_cpu / m_cpu if m_cpu > 0 else None,
        shaped_ms_all=[t * 1e3 for t in shaped["wall"]],
        megatron_ce_ms_all=[t * 1e3 for t in megatron["wall"]],
        shaped_peak_bytes=shaped["peak"],
        megatron_ce_peak_bytes=megatron["peak"],
        memory_ratio=(
            shaped["peak"] / megatron["peak"] if shaped["peak"] and megatron["peak"] else None
        ),
        **(meta or {}),
    )
    return rec


_CREATED_PROCESS_GROUP = False


def _ensure_single_process_group(device: str) -> None:
    """A world of one for megatron-core's parallel state (its CE needs the TP group)."""
    global _CREATED_PROCESS_GROUP
    import torch.distributed as dist

    if not dist.is_initialized():
        from divprec.parallel.spawn import free_port

        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
        )
        _CREATED_PROCESS_GROUP = True


def _destroy_process_group() -> None:
    global _CREATED_PROCESS_GROUP
    import torch.distributed as dist

    _free_megatron()
    if _CREATED_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _CREATED_PROCESS_GROUP = False


def _free_megatron() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    gc.collect()


# ----------------------------------------------------------------------------- threshold


def _threshold_methods(topk: int, device: str = "cpu") -> dict:
    """Ways to get the row max and the k-th largest logit of a chunk [c, v], the loss's step 1."""
    from divprec.loss import block_topk, local_top, native_select

    def native(z):  # divprec's on CPU (loss.kernel compiled/auto): the C kernel, chunks in threads
        return local_top.NATIVE.run(z, topk).values_and_ties[:, :topk].amin(dim=-1)

    def blocks(z):  # divprec's: block maxima give the max; top-k over the best blocks' logits
        return block_topk.local_top(z, topk, block_topk.block_size(z.shape[1], topk))[1].amin(-1)

    def full_topk(z):  # torch.topk over the whole row, then the max from it
        return torch.topk(z, topk, dim=-1, sorted=False).values.amin(dim=-1)

    def kthvalue(z):  # selection of the (v-k+1)-th smallest, plus a separate max pass
        return torch.kthvalue(z, z.shape[1] - topk + 1, dim=-1).values, z.amax(dim=-1)

    def max_only(z):  # what cross-entropy needs: the max pass alone (the baseline)
        return z.amax(dim=-1)

    methods = {"row_max_only": max_only, "block_topk": blocks, "torch_topk": full_topk,
               "kthvalue": kthvalue}  # fmt: skip
    if device == "cpu" and native_select.available():
        methods["native_block_topk"] = native
    return methods


def run_threshold(args) -> list[dict]:
    """Time of step 1 (row max and top-k threshold) by each method, on the loss's row chunks."""
    from divprec.loss import chunks

    records = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            logits, block, _ = _make_inputs(vocab, tokens, 1, 0, args.dtype[0], args.device)
            _fill(logits, block)
            step = chunks.chunk_rows(vocab, logits.device, compiled=True)
            for topk in args.topk:
                times = {}
                for name, fn in _threshold_methods(topk, args.device).items():
                    wall = []
                    for _ in range(args.warmup + args.repeats):
                        _sync(args.device)
                        t0 = time.perf_counter()
                        for start in range(0, tokens, step):
                            fn(logits[start : start + step])
                        _sync(args.device)
                        wall.append(time.perf_counter() - t0)
                    times[name] = statistics.median(wall[args.warmup :]) * 1e3
                for name, ms in times.items():
                    records.append({
                        "vocab": vocab, "tokens": tokens, "topk": topk, "device": args.device,
                        "dtype": args.dtype[0], "method": name, "ms": ms,
                        "ratio_to_row_max": ms / times["row_max_only"],
                        "threads": torch.get_num_threads(),
                    })  # fmt: skip
                    print(f"v{vocab}-t{tokens}-k{topk} {name:14s} {ms:9.1f} ms "
                          f"{ms / times['row_max_only']:6.2f}x the max pass", flush=True)  # fmt: skip
            del logits, block
    return records


# ----------------------------------------------------------------------------- output


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f}{unit}"
    return f"{b}B"


def _fmt(x, spec) -> str:
    return "-" if x is None else format(x, spec)


def print_table(records: list[dict]) -> None:
    head = (
        f"{'case':48s} {'shaped ms':>10s} {'CE ms':>10s} {'time x':>7s} {'cpu x':>6s} "
        f"{'shaped mem':>11s} {'CE mem':>10s} {'mem x':>6s}"
    )
    print(head)
    print("-" * len(head))
    for r in records:
        if r["skipped"]:
            print(f"{r['case']:48s} skipped: {r['skipped']}")
            continue
        print(
            f"{r['case']:48s} {_fmt(r['shaped_ms'], '10.1f')} {_fmt(r['megatron_ce_ms'], '10.1f')} "
            f"{_fmt(r['time_ratio'], '7.3f')} {_fmt(r['cpu_time_ratio'], '6.3f')} "
            f"{_fmt_bytes(r['shaped_peak_bytes']):>11s} {_fmt_bytes(r['megatron_ce_peak_bytes']):>10s} "
            f"{_fmt(r['memory_ratio'], '6.3f')}"
        )


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32"])
    p.add_argument("--vocab", nargs="+", type=int, default=[32768, 151936])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--topk", nargs="+", type=int, default=[1, 100])
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=["paper", "ce"])
    p.add_argument(
        "--inplace",
        choices=("both", "on", "off"),
        default="both",
        help="shaped loss with inplace=False and/or True (fp32 only; bf16 runs inplace=False)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed calls per function (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per function first")
    p.add_argument("--threads", type=int, default=None, help="torch threads for tp=1 (CPU)")
    p.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="run only cases whose name (e.g. v32768-t4096-k100-tp1-fp32-paper-inplace) "
        "contains one of these strings or matches one of these globs",
    )
    p.add_argument("--memory", choices=("alloc", "rss", "none"), default="alloc")
    p.add_argument("--memory-fraction", type=float, default=0.8)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per tp>1 group")
    p.add_argument(
        "--quick", action="store_true", help="vocab 32768, 1024 tokens, topk 100, tp 1, 3 repeats"
    )
    p.add_argument(
        "--kernel",
        choices=("auto", "compiled", "eager"),
        default="auto",
        help="loss.kernel of the shaped loss: its passes compiled (torch.compile) or eager",
    )
    p.add_argument(
        "--threshold",
        action="store_true",
        help="instead: time the ways to get the top-k threshold (tp 1, first dtype)",
    )
    p.add_argument("--json", default=None, help="write the case records here")
    p.add_argument(
        "--impl",
        default=None,
        help="a .py file defining vocab_parallel_shaped_loss to measure instead of divprec's, "
        "e.g. an earlier revision: git show REV:divprec/loss/vocab_parallel.py > /tmp/vp.py",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.topk, args.tp = [32768], [1024], [100], [1]
        args.repeats = min(args.repeats, 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    info = machine()
    print(
        f"bench_loss: {info.get('cpu', '?')}, {info['cpu_count']} cores, torch {info['torch']}, "
        f"threads {torch.get_num_threads()}, load {_load()}",
        flush=True,
    )
    if args.threshold:
        records = run_threshold(args)
        if args.json:
            _write_json(args.json, records, info)
            print(f"\nwrote {args.json}")
        return 0
    records: list[dict] = []
    threads = torch.get_num_threads()
    try:
        for g in _plan(args):
            print(f"group vocab={g.vocab} tokens={g.tokens} tp={g.tp} {g.dtype}: "
                  f"{len(g.variants)} shaped variant(s) + megatron CE", flush=True)  # fmt: skip
            records.extend(_run_group(g, args))
            if args.json:  # after every group: a long run keeps what it measured
                _write_json(args.json, records, info)
    finally:
        _destroy_process_group()
        torch.set_num_threads(threads)
    print()
    print_table(records)
    if args.json:
        _write_json(args.json, records, info)
        print(f"\nwrote {args.json}")
    return 0


def _write_json(path: str, records: list[dict], info: dict) -> None:
    for r in records:
        r["machine"] = info
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
