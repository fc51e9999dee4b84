"""Benchmark: training throughput with cross-entropy and with the shaped loss, in the same run.

    python tools/bench_train.py                                       # tiny model on this machine
    python tools/bench_train.py --model dense_1b --device cuda --steps 30 --seq-length 4096 \
        --micro-batch 1 --global-batch 8
    python tools/bench_train.py --json bench_train.json --rounds 2

Calls the trainer (``divprec.train.trainer.pretrain``) in this process, a world of one, once per
loss and round: ``loss=ce`` (the baseline; the shaped loss with beta = 0 and no negative rewards,
which is exactly cross-entropy) and ``loss=precision`` by default (``--losses`` and
``--loss-overrides`` change that, e.g. ``--loss-overrides loss.tail_negative_reward=-0.1`` for the
paper's precision + tail penalty). Rounds alternate the losses (ce, precision, ce, ...) so that a
change of load on a shared machine hits both.

Each step's wall time comes from the trainer's own per-step metrics (``logging.interval=1``:
``step_time_s``, ``tokens_per_s``, ``tflops``, ``mfu``); the first ``--warmup-steps`` steps of
every run are dropped. Reported per loss: the median step time over the remaining steps of all
rounds, tokens/s and TFLOP/s (per device) from it, MFU when the device's peak is known (none on
CPU), the ratio of tokens/s to the first loss's (the target for the shaped loss: >= 0.97), and
the peak memory (the largest over rounds): on CUDA ``torch.cuda.max_memory_allocated`` over the
whole run, on CPU the tensor peak of the last warmup step (step 2 at least; measured with the
profiler, which slows that step, so it should be a warmup step).
Runs write into a temporary directory (deleted unless ``--keep``); the trainer's final checkpoint
is saved after the last step, outside the measured steps.

JSON (``--json PATH``): {"machine": ..., "settings": ..., "runs": [per loss: loss, tokens_per_s,
tflops, mfu, step_time_s, step_times_s (every measured step), ratio_to_baseline,
peak_memory_gib, ...]}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="a conf/model preset")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if any")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps of a run not measured")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--losses", nargs="+", default=["ce", "precision"], help="conf/loss presets")
    p.add_argument(
        "--loss-overrides",
        nargs="*",
        default=[],
        help="extra overrides for every loss but the first, e.g. loss.tail_negative_reward=-0.1",
    )
    p.add_argument("--rounds", type=int, default=1, help="runs per loss, alternating the losses")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for all runs")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps})")
    return args


def _overrides(args, loss: str, first: bool, run_dir: str) -> list[str]:
    out = [
        f"model={args.model}",
        f"loss={loss}",
        f"train.steps={args.steps}",
        f"train.seq_length={args.seq_length}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.global_batch}",
        f"train.precision={args.precision}",
        "optim.warmup_steps=1",
        "logging.interval=1",
        "logging.progress=false",
        "logging.jsonl=false",
        "logging.wandb.mode=disabled",
        "checkpoint.interval=0",
        "checkpoint.resume=never",
        f"run.dir={run_dir}",
        *args.override,
    ]
    if not first:
        out += args.loss_overrides
    return out


def _peak_memory_probe(measured_step: int, on_gpu: bool):
    """A trainer callback: on CUDA, torch.cuda.max_memory_allocated from the run's start to the
    end of its last step; on CPU, the tensor peak of one step (divprec.metrics.memory), the last
    warmup step (>= 2), so the profiler that measures it leaves the timed steps alone."""
    import torch

    from divprec.metrics.callback import Callback
    from divprec.metrics.memory import PeakTensorMemory

    if not on_gpu:
        return PeakTensorMemory(step=measured_step)

    class CudaPeak(Callback):
        def __init__(self) -> None:
            self.peak_bytes: int | None = None
            torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, state, metrics) -> None:
            self.peak_bytes = torch.cuda.max_memory_allocated()  # the last step's is kept

    return CudaPeak()


def _peak_bytes(probe) -> int | None:
    if hasattr(probe, "result"):  # PeakTensorMemory
        return probe.result.peak_bytes if probe.result is not None else None
    return probe.peak_bytes


def _train(overrides: list[str], probe) -> list[dict]:
    from divprec.config.compose import compose_config
    from divprec.config.validate import validate
    from divprec.train.trainer import pretrain

    cfg = compose_config(overrides)
    validate(cfg, 1)
    return pretrain(cfg, [probe]).history


def _summary(
    loss: str,
    histories: list[list[dict]],
    warmup: int,
    tokens_per_step: int,
    peaks: list[int | None],
) -> dict:
    measured = [m for h in histories for m in h if m["step"] > warmup]
    step_times = [m["step_time_s"] for m in measured]
    step = statistics.median(step_times)
    tokens_per_s = tokens_per_step / step
    # FLOPs per token are constant within a run: recover them from any logged step.
    flops_per_token = None
    if measured and "tflops" in measured[0]:
        flops_per_token = measured[0]["tflops"] * 1e12 / measured[0]["tokens_per_s"]
    tflops = flops_per_token * tokens_per_s / 1e12 if flops_per_token else None
    mfu = None
    if measured and measured[0].get("mfu"):  # the trainer knew the device's peak
        peak_tflops = measured[0]["tflops"] / measured[0]["mfu"]
        mfu = tflops / peak_tflops
    return {
        "loss": loss,
        "step_time_s": step,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": mfu,
        "flops_per_token": flops_per_token,
        "measured_steps": len(step_times),
        "step_times_s": step_times,
        "final_lm_loss": histories[-1][-1].get("lm_loss") if histories[-1] else None,
        "peak_memory_gib": max(known) / 2**30 if (known := [p for p in peaks if p]) else None,
    }


def machine(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if device == "cpu" and torch.cuda.is_available():  # the trainer uses CUDA whenever it can
        raise SystemExit("--device cpu on a CUDA machine: run with CUDA_VISIBLE_DEVICES=''")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    info_before = machine(device)
    print(
        f"bench_train: model={args.model} on {device} ({info_before.get('gpu') or info_before.get('cpu')}), "
        f"threads {torch.get_num_threads()}, load {info_before.get('load_avg')}",
        flush=True,
    )
    tokens_per_step = args.global_batch * args.seq_length
    histories: dict[str, list[list[dict]]] = {loss: [] for loss in args.losses}
    peaks: dict[str, list[int | None]] = {loss: [] for loss in args.losses}
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    t0 = time.perf_counter()
    try:
        for r in range(args.rounds):
            for i, loss in enumerate(args.losses):
                run_dir = os.path.join(tmp, f"{loss}-{r}")
                probe = _peak_memory_probe(max(2, args.warmup_steps), device == "cuda")
                history = _train(_overrides(args, loss, i == 0, run_dir), probe)
                histories[loss].append(history)
                peaks[loss].append(_peak_bytes(probe))
                times = [m["step_time_s"] for m in history if m["step"] > args.warmup_steps]
                print(
                    f"  round {r} loss={loss}: median step {statistics.median(times) * 1e3:.1f} ms "
                    f"over {len(times)} steps, lm_loss {history[-1].get('lm_loss', float('nan')):.3f}",
                    flush=True,
                )
    finally:
        from divprec.parallel.distributed import shutdown_distributed

        shutdown_distributed()  # the runs shared the trainer's world of one
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    runs = [
        _summary(loss, histories[loss], args.warmup_steps, tokens_per_step, peaks[loss])
        for loss in args.losses
    ]
    base = runs[0]["tokens_per_s"]
    for run in runs:
        run["ratio_to_baseline"] = run["tokens_per_s"] / base
    info = machine(device)
    info["load_avg_before"] = info_before.get("load_avg")
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "steps",
            "warmup_steps",
            "seq_length",
            "micro_batch",
            "global_batch",
            "precision",
            "losses",
            "loss_overrides",
            "rounds",
            "override",
        )
    }
    settings["tokens_per_step"] = tokens_per_step
    settings["seconds"] = time.perf_counter() - t0
    print()
    print(
        f"{'loss':12s} {'step ms':>9s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} "
        f"{'vs ' + runs[0]['loss']:>8s} {'peak GiB':>9s}"
    )
    for run in runs:
        tflops = "-" if run["tflops"] is None else f"{run['tflops']:.4f}"
        mfu = "-" if run["mfu"] is None else f"{run['mfu']:.3f}"
        print(
            f"{run['loss']:12s} {run['step_time_s'] * 1e3:9.1f} {run['tokens_per_s']:10.1f} "
            f"{tflops:>8s} {mfu:>6s} {run['ratio_to_baseline']:8.3f} "
            + ("        -" if run["peak_memory_gib"] is None else f"{run['peak_memory_gib']:9.3f}")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "settings": settings, "runs": runs}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
