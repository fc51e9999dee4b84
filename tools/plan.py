"""Print the per-GPU memory plan of a pre-training config, before a job waits for nodes.

    python tools/plan.py experiment=paper_dense_1b --gpus 8 --nodes 1 --device-memory 80
    python tools/plan.py model=dense_4b parallel.tensor=2 model.recompute=full --gpus 8

The overrides are divprec-pretrain's. No process group, model or GPU is created: the figures come
from divprec.model.memory_plan (what each term counts is in its docstring). ``--cpu`` plans a CPU
run instead (fp32 under train.precision=auto, the CPU loss kernels).
Exit code 0: the plan fits in --device-memory; 1: it does not; 2: the config is invalid for this
world size (one line says which key and how to fix it).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from divprec.config.compose import compose_config
from divprec.config.memory import memory_plan, training_layout
from divprec.config.validate import validate
from divprec.model.memory_plan import GIB

EXIT_DOES_NOT_FIT = 1
EXIT_CONFIG_ERROR = 2

warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:9.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="divprec-pretrain overrides, e.g. model=dense_1b")
    p.add_argument("--gpus", type=int, default=8, help="GPUs (processes) per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument(
        "--device-memory", type=float, default=80.0, help="GiB per GPU to fit in (default 80)"
    )
    p.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32 on auto precision)")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # nothing here touches a device
    world = args.gpus * args.nodes
    try:
        if args.gpus < 1 or args.nodes < 1:
            raise ValueError(f"--gpus {args.gpus} and --nodes {args.nodes} must both be >= 1")
        cfg = compose_config(args.overrides)
        validate(cfg, world)  # the data files, the tokenizer and the loss against it included
    except ValueError as err:
        print(f"plan: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    on_gpu = not args.cpu
    layout = training_layout(cfg, world, on_gpu=on_gpu)
    plan = memory_plan(cfg, world, on_gpu=on_gpu)
    m = cfg.model
    recompute = m.recompute
    if m.recompute == "full":
        recompute += f" ({m.recompute_method}, {m.recompute_num_layers} layer(s))"
    elif m.recompute == "selective":
        recompute += f" ({', '.join(m.recompute_modules)})"
    print(
        f"model {m.name}: {args.nodes} node(s) x {args.gpus} GPU(s) = tensor {layout.tensor} x "
        f"pipeline {layout.pipeline} x data {layout.data}"
        f"{' (sequence parallel)' if layout.sequence_parallel else ''}, ZeRO-{layout.zero_stage}, "
        f"micro batch {layout.micro_batch_size} x {layout.seq_length} tokens, "
        f"{layout.num_microbatches} microbatch(es) per step, "
        f"{'bf16' if layout.param_bytes == 2 else 'fp32'}, recompute {recompute}"
    )
    print(
        f"per GPU of pipeline stage {plan.stage} (the largest of {layout.pipeline}), "
        f"{plan.stage_parameters / 1e9:.3f}B parameters on it:"
    )
    for label, nbytes in plan.rows():
        print(f"  {label:<48}{_gib(nbytes)}")
    print(f"  {'total at the peak':<48}{_gib(plan.total)}")
    budget = args.device_memory * GIB
    if plan.total <= budget:
        print(
            f"fits in {args.device_memory:g} GiB: {100 * plan.total / budget:.0f}% used, "
            f"{(budget - plan.total) / GIB:.1f} GiB left"
        )
        return 0
    print(
        f"does NOT fit in {args.device_memory:g} GiB: {(plan.total - budget) / GIB:.1f} GiB over; "
        "try model.recompute=full, a smaller train.micro_batch_size, parallel.tensor or "
        "parallel.pipeline > 1, or parallel.zero_stage=2"
    )
    return EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
