"""Benchmark: the shaped loss against megatron-core's vocab_parallel_cross_entropy.

    python tools/bench_loss.py --json bench_loss.json                # the full grid (long)
    python tools/bench_loss.py --quick                               # one small case, 3 repeats
    python tools/bench_loss.py --cases 'v32768-t4096-k100-tp1-*' --threads 1 --repeats 5
    python tools/bench_loss.py --device cuda --dtype bf16 --tp 1     # on a GPU
    python tools/bench_loss.py --quick --steps                       # and each step's time
    python tools/bench_loss.py --fused --vocab 151936 --tokens 4096 --topk 100 --tp 1 \
        --configs paper --repeats 3                                  # the fused output layer

(Step 1's top-k threshold methods alone: tools/bench_threshold.py.)

Both functions get the same inputs in the same process: logits [tokens, vocab/tp] (standard
normal times 2, the same rows on every run) and uniform random targets. A call is timed from the
forward to the gradient (bench/loss_calls.py). Every call gets freshly filled logits (not timed),
because megatron-core's cross-entropy and ``inplace=True`` overwrite fp32 logits. Each repeat runs
every function once, in a rotating order, so load changes on a shared machine hit them alike; the
table reports medians and their ratios. tp = 1 runs in this process (a world of one); tp = 2 in
two processes joined by gloo (CPU) or NCCL (CUDA), one thread each on CPU; a repeat's time is the
slower rank's.

Peak memory (``--memory alloc``, the default; bench/memory.py): the bytes of tensors alive at the
high-water mark of one forward+backward, inputs included. CUDA: ``torch.cuda.max_memory_allocated``
after a reset. CPU: torch's CPU allocator keeps no peak, so the call runs once under
``torch.profiler`` with ``profile_memory=True`` and the allocation events (sizes, + on allocation,
- on free) are summed in order; the peak is their maximum plus the inputs. ``--memory rss``
instead measures the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) around one call in a fresh process per function: what the OS had to
provide, allocator slack included.
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
With ``--steps``, ``shaped_steps_ms``: the median ms of each step of the shaped loss
(divprec.loss.step_times: each step between device syncs, a collective with its wait), from
``repeats`` more calls after the timed ones; null without.

``--fused`` measures the output layer with the loss instead (bench/fused_calls.py): hidden
[tokens, h] (``--hidden``) and this rank's weight [vocab/tp, h] in, the gradients of both out.
divprec's ``fused_linear_shaped_loss`` (logits in chunks of ``--chunk-tokens`` tokens, 0: its
default from the memory budget) against megatron-core's output-layer matmul
(``linear_with_grad_accumulation_and_async_allreduce``) + ``vocab_parallel_cross_entropy``,
in the same run. Memory there is the peak above the inputs (``peak_bytes``), and that peak less
the two gradients both paths return (``loss_peak_bytes``: the logits, their gradient and the
loss's temporaries). JSON keys: fused_ms, linear_ce_ms, time_ratio, fused_peak_bytes,
linear_ce_peak_bytes, memory_ratio, fused_loss_peak_bytes, linear_ce_loss_peak_bytes,
loss_memory_ratio, hidden, chunk_tokens (as resolved), and the case's settings.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
for path in (REPO, TOOLS):  # divprec from this checkout; the bench package (spawned ranks too)
    if path not in sys.path:
        sys.path.insert(0, path)

from bench import common, fused_calls, loss_calls, memory  # noqa: E402
from bench.loss_calls import CONFIGS  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One shaped-loss setting of a group; megatron-core's CE is the group's baseline."""

    topk: int
    config: str
    inplace: bool

    @property
    def key(self) -> str:
        return loss_calls.variant_key(self.topk, self.config, self.inplace)


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


# ----------------------------------------------------------------------------- planning


def _bytes_needed(vocab, tokens, dtype, function: str) -> int:
    """Bytes one call keeps alive at its peak, all ranks together (inputs included)."""
    n = vocab * tokens
    if dtype == "bf16":  # bf16 logits, an fp32 buffer, and the bf16 gradient made from it
        return n * (2 + 4 + 2)
    if function == "megatron_ce" or function.endswith("-inplace"):
        return n * 4
    return n * 8  # the logits and the shaped loss's own fp32 buffer


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


def _run_group(g: Group, args) -> list[dict]:
    """Measure one group; return its case records (skipped ones included)."""
    functions = ["megatron_ce"] + [v.key for v in g.variants]
    budget = args.memory_fraction * memory.available_bytes(args.device)
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
        "steps": args.steps,
    }
    from divprec.parallel.spawn import run_in_processes

    load_before = common.load_avg()
    t0 = time.perf_counter()
    if g.tp == 1:
        from divprec.parallel.distributed import single_process_world

        with single_process_world():  # megatron-core's CE needs its TP group
            result = loss_calls.measure(0, 1, spec)
    else:
        backend = "nccl" if args.device == "cuda" else "gloo"
        result = run_in_processes(
            loss_calls.measure, g.tp, spec, backend=backend, timeout_s=args.timeout
        )[0]
    if args.memory == "rss":  # each function in a fresh process
        for name in spec["functions"]:
            rss_spec = {**spec, "function": name}
            result[name]["peak"] = run_in_processes(
                loss_calls.rss_worker, g.tp, rss_spec, timeout_s=args.timeout
            )[0]
    elapsed = time.perf_counter() - t0
    meta = {
        "load_avg_before": load_before,
        "load_avg_after": common.load_avg(),
        "group_seconds": elapsed,
    }
    for v in run_variants:
        records.append(_record(g, v, args, result[v.key], result["megatron_ce"], None, meta))
    return records


def _fused_bytes(g: Group, hidden: int) -> int:
    """Bytes the unfused baseline keeps alive at its peak, all ranks together: the inputs,
    the logits and the two gradients."""
    size = common.DTYPES[g.dtype].itemsize
    return (g.tokens * g.vocab + 2 * (g.vocab + g.tp * g.tokens) * hidden) * max(size, 4)


def _run_fused_group(g: Group, args) -> list[dict]:
    """Measure the fused output layer + loss of one group against megatron-core's."""
    from divprec.loss import ShapedLossConfig
    from divprec.loss.fused_linear import fused_chunk_tokens

    chunk = fused_chunk_tokens(
        ShapedLossConfig(fused_chunk_tokens=args.chunk_tokens), g.vocab // g.tp
    )
    budget = args.memory_fraction * memory.available_bytes(args.device)
    need = _fused_bytes(g, args.hidden) + 512 * 2**20 * g.tp
    variants = [v for v in g.variants if v.topk <= g.vocab]
    if g.vocab % g.tp or need > budget or not variants:
        reason = (
            f"vocab {g.vocab} not divisible by tp {g.tp}"
            if g.vocab % g.tp
            else f"needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB usable"
            if need > budget
            else "topk > vocab"
        )
        print(f"  skip fused v{g.vocab}-t{g.tokens}-tp{g.tp}: {reason}", flush=True)
        return [_fused_record(g, v, args, chunk, None, None, reason) for v in g.variants]
    keys = [fused_calls.fused_key(v.topk, v.config) for v in variants]
    spec = {
        "vocab": g.vocab,
        "tokens": g.tokens,
        "hidden": args.hidden,
        "dtype": g.dtype,
        "device": args.device,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "memory": "none" if args.memory == "none" else "alloc",
        "functions": ["linear_ce", *keys],
        "kernel": args.kernel,
        "chunk_tokens": args.chunk_tokens,
    }
    from divprec.parallel.spawn import run_in_processes

    load_before = common.load_avg()
    t0 = time.perf_counter()
    if g.tp == 1:
        from divprec.parallel.distributed import single_process_world

        with single_process_world():
            result = fused_calls.measure(0, 1, spec)
    else:
        backend = "nccl" if args.device == "cuda" else "gloo"
        result = run_in_processes(
            fused_calls.measure, g.tp, spec, backend=backend, timeout_s=args.timeout
        )[0]
    meta = {
        "load_avg_before": load_before,
        "load_avg_after": common.load_avg(),
        "group_seconds": time.perf_counter() - t0,
    }
    return [
        _fused_record(g, v, args, chunk, result[k], result["linear_ce"], None, meta)
        for v, k in zip(variants, keys, strict=True)
    ]


def _fused_record(g, v, args, chunk, fused, baseline, skipped, meta=None) -> dict:
    rec = {
        "case": f"fused-v{g.vocab}-t{g.tokens}-h{args.hidden}-k{v.topk}-tp{g.tp}-{g.dtype}-"
        f"{v.config}",
        "path": "fused",
        "vocab": g.vocab,
        "tokens": g.tokens,
        "hidden": args.hidden,
        "topk": v.topk,
        "tp": g.tp,
        "device": args.device,
        "dtype": g.dtype,
        "config": v.config,
        **CONFIGS[v.config],
        "chunk_tokens": chunk,
        "threads": (args.threads or torch.get_num_threads()) if g.tp == 1 else 1,
        "repeats": args.repeats,
        "kernel": args.kernel,
        "skipped": skipped,
    }
    keys = (
        "fused_ms",
        "linear_ce_ms",
        "time_ratio",
        "fused_peak_bytes",
        "linear_ce_peak_bytes",
        "memory_ratio",
        "fused_loss_peak_bytes",
        "linear_ce_loss_peak_bytes",
        "loss_memory_ratio",
    )
    rec.update(dict.fromkeys(keys))
    if fused is None:
        return rec
    f_ms, b_ms = statistics.median(fused["wall"]) * 1e3, statistics.median(baseline["wall"]) * 1e3

    def ratio(a, b):
        return a / b if a is not None and b else None

    rec.update(
        fused_ms=f_ms,
        linear_ce_ms=b_ms,
        time_ratio=f_ms / b_ms,
        fused_ms_all=[t * 1e3 for t in fused["wall"]],
        linear_ce_ms_all=[t * 1e3 for t in baseline["wall"]],
        fused_cpu_ms=statistics.median(fused["cpu"]) * 1e3,
        linear_ce_cpu_ms=statistics.median(baseline["cpu"]) * 1e3,
        fused_peak_bytes=fused["peak"],
        linear_ce_peak_bytes=baseline["peak"],
        memory_ratio=ratio(fused["peak"], baseline["peak"]),
        fused_loss_peak_bytes=fused["loss_peak"],
        linear_ce_loss_peak_bytes=baseline["loss_peak"],
        loss_memory_ratio=ratio(fused["loss_peak"], baseline["loss_peak"]),
        **(meta or {}),
    )
    return rec


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
    keys = (
        "shaped_ms",
        "megatron_ce_ms",
        "time_ratio",
        "shaped_cpu_ms",
        "megatron_ce_cpu_ms",
        "cpu_time_ratio",
        "shaped_peak_bytes",
        "megatron_ce_peak_bytes",
        "memory_ratio",
    )
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
        shaped_steps_ms=shaped.get("steps"),
        **(meta or {}),
    )
    return rec


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
    fused = [r for r in records if r.get("path") == "fused"]
    if fused:
        print_fused_table(fused)
    records = [r for r in records if r.get("path") != "fused"]
    if not records:
        return
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
    for r in records:
        if r.get("shaped_steps_ms"):
            steps = ", ".join(f"{name} {ms:.1f}" for name, ms in r["shaped_steps_ms"].items())
            print(f"steps of {r['case']} (ms): {steps}")


def print_fused_table(records: list[dict]) -> None:
    head = (
        f"{'case':48s} {'fused ms':>10s} {'lin+CE ms':>10s} {'time x':>7s} {'fused mem':>10s} "
        f"{'lin+CE mem':>10s} {'mem x':>6s} {'loss mem':>9s} {'lin+CE':>8s} {'loss x':>7s}"
    )
    print(head)
    print("-" * len(head))
    for r in records:
        if r["skipped"]:
            print(f"{r['case']:48s} skipped: {r['skipped']}")
            continue
        print(
            f"{r['case']:48s} {_fmt(r['fused_ms'], '10.1f')} {_fmt(r['linear_ce_ms'], '10.1f')} "
            f"{_fmt(r['time_ratio'], '7.3f')} {_fmt_bytes(r['fused_peak_bytes']):>10s} "
            f"{_fmt_bytes(r['linear_ce_peak_bytes']):>10s} {_fmt(r['memory_ratio'], '6.3f')} "
            f"{_fmt_bytes(r['fused_loss_peak_bytes']):>9s} "
            f"{_fmt_bytes(r['linear_ce_loss_peak_bytes']):>8s} "
            f"{_fmt(r['loss_memory_ratio'], '7.3f')}"
        )
    print(
        "(mem: peak above the inputs; loss mem: that peak less the gradients of hidden and weight)"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", nargs="+", choices=tuple(common.DTYPES), default=["fp32"])
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
        choices=("auto", "compiled", "eager", "triton"),
        default="auto",
        help="loss.kernel of the shaped loss: its passes compiled (torch.compile), eager, or the "
        "Triton kernels (CUDA; auto picks them there)",
    )
    p.add_argument(
        "--steps",
        action="store_true",
        help="also time each step of the shaped loss (divprec.loss.step_times), in extra calls",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="measure fused_linear_shaped_loss against megatron-core's output-layer matmul + "
        "vocab_parallel_cross_entropy instead (hidden [tokens, --hidden] and the weight as inputs)",
    )
    p.add_argument("--hidden", type=int, default=1536, help="hidden size h (--fused)")
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=0,
        help="loss.fused_chunk_tokens (--fused); 0: the default from the memory budget",
    )
    p.add_argument("--json", default=None, help="write the case records here")
    p.add_argument(
        "--impl",
        default=None,
        help="a .py file defining vocab_parallel_shaped_loss to measure instead of divprec's (its "
        "imports resolve against this checkout). To measure a whole other revision, run this "
        "tool with PYTHONPATH set to a copy of it: git archive REV | tar -x -C /tmp/rev",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.topk, args.tp = [32768], [1024], [100], [1]
        args.repeats = min(args.repeats, 3)
    if args.fused:
        args.inplace = "on"  # one variant per topk and config (the fused path has no choice)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    info = common.machine()
    print(common.banner("bench_loss", info), flush=True)
    records: list[dict] = []
    threads = torch.get_num_threads()
    try:
        for g in _plan(args):
            print(
                f"group vocab={g.vocab} tokens={g.tokens} tp={g.tp} {g.dtype}: "
                f"{len(g.variants)} {'fused' if args.fused else 'shaped'} variant(s) + megatron "
                + ("linear + CE" if args.fused else "CE"),
                flush=True,
            )
            records.extend(_run_fused_group(g, args) if args.fused else _run_group(g, args))
            if args.json:  # after every group: a long run keeps what it measured
                common.write_json(args.json, records, info)
    finally:
        torch.set_num_threads(threads)
    print()
    print_table(records)
    if args.json:
        common.write_json(args.json, records, info)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
