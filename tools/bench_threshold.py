"""Benchmark of the shaped loss's step 1: the ways to get the row max and the top-k threshold.

    python tools/bench_threshold.py --tokens 4096 --json threshold_cpu.json
    python tools/bench_threshold.py --vocab 32768 --tokens 1024 --topk 100 --repeats 3

Each method gets the row max and the k-th largest logit of every row of logits [tokens, vocab]
(standard normal times 2, fp32 or bf16), on the loss's own row chunks (the compiled passes' chunk
size, divprec.loss.chunks.chunk_rows); the table reports each method's median and its ratio to
the max pass alone (what cross-entropy needs anyway):

- ``row_max_only``: the max pass alone (the baseline);
- ``native_block_topk``: divprec's on CPU (loss.kernel compiled/auto), the C kernel, chunks of
  rows in threads: divprec.loss.local_top.NATIVE.run, as the loss calls it (without the rank);
- ``block_topk``: the same algorithm in torch ops (the CUDA path, loss.kernel=eager):
  divprec.loss.block_topk.local_top on a chunk;
- ``torch_topk``: ``torch.topk`` over the whole row;
- ``kthvalue``: ``torch.kthvalue`` (a selection), plus a separate max pass.

JSON (``--json PATH``): one record per (vocab, tokens, topk, method) with ms, ratio_to_row_max,
the threads and the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
for path in (REPO, TOOLS):  # divprec from this checkout; the bench package
    if path not in sys.path:
        sys.path.insert(0, path)

from bench import common  # noqa: E402


def methods(topk: int, device: str = "cpu") -> dict:
    """name -> fn(z [c, v]) giving the k-th largest of each row (kthvalue: and the max)."""
    from divprec.loss import block_topk, local_top, native_select

    def native(z):
        return local_top.NATIVE.run(z, topk).values_and_ties[:, :topk].amin(dim=-1)

    def blocks(z):  # block maxima give the max; the top-k over the best blocks' logits
        return block_topk.local_top(z, topk, block_topk.block_size(z.shape[1], topk))[1].amin(-1)

    def full_topk(z):  # the max is the largest of the top-k
        return torch.topk(z, topk, dim=-1, sorted=False).values.amin(dim=-1)

    def kthvalue(z):
        return torch.kthvalue(z, z.shape[1] - topk + 1, dim=-1).values, z.amax(dim=-1)

    def max_only(z):
        return z.amax(dim=-1)

    found = {
        "row_max_only": max_only,
        "block_topk": blocks,
        "torch_topk": full_topk,
        "kthvalue": kthvalue,
    }
    if device == "cpu" and native_select.available():
        found["native_block_topk"] = native
    return found


def run(args) -> list[dict]:
    """Median ms of each method over the chunks of each (vocab, tokens, topk)."""
    from divprec.loss import chunks

    records = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            logits, block, _ = common.make_inputs(vocab, tokens, 1, 0, args.dtype, args.device)
            common.fill(logits, block)
            step = chunks.chunk_rows(vocab, logits.device, compiled=True)
            for topk in args.topk:
                times = {}
                for name, fn in methods(topk, args.device).items():
                    wall = []
                    for _ in range(args.warmup + args.repeats):
                        common.sync(args.device)
                        t0 = time.perf_counter()
                        for start in range(0, tokens, step):
                            fn(logits[start : start + step])
                        common.sync(args.device)
                        wall.append(time.perf_counter() - t0)
                    times[name] = statistics.median(wall[args.warmup :]) * 1e3
                for name, ms in times.items():
                    ratio = ms / times["row_max_only"]
                    records.append(
                        {
                            "vocab": vocab,
                            "tokens": tokens,
                            "topk": topk,
                            "device": args.device,
                            "dtype": args.dtype,
                            "method": name,
                            "ms": ms,
                            "ratio_to_row_max": ratio,
                            "threads": torch.get_num_threads(),
                        }
                    )
                    print(
                        f"v{vocab}-t{tokens}-k{topk} {name:17s} {ms:9.1f} ms "
                        f"{ratio:6.2f}x the max pass",
                        flush=True,
                    )
            del logits, block
    return records


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(common.DTYPES), default="fp32")
    p.add_argument("--vocab", nargs="+", type=int, default=[32768, 151936])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096])
    p.add_argument("--topk", nargs="+", type=int, default=[1, 100])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--json", default=None, help="write the records here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    info = common.machine()
    print(common.banner("bench_threshold", info), flush=True)
    records = run(args)
    if args.json:
        common.write_json(args.json, records, info)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
