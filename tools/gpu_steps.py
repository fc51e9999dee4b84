"""Steps of the GPU check that run the trainer in this process (tools/gpu_check.py calls them).

    python tools/gpu_steps.py syncs  --json out.json [--dry-run] [overrides ...]
    python tools/gpu_steps.py memory --json out.json [--dry-run] [--async-save] [overrides ...]
    python tools/gpu_steps.py fusions --json out.json [--dry-run] [overrides ...]

``syncs``: trains 3 steps and counts the host synchronisations of step 3 with
``torch.cuda.set_sync_debug_mode("warn")`` (one warning per synchronising call), grouped by the
line that made them. ``memory``: trains a few steps, saving a checkpoint, then resumes from it and
trains on; reports ``torch.cuda.max_memory_allocated`` against the memory plan of the same config
(divprec.config.memory) and whether the resumed steps repeat the uninterrupted ones.
``fusions``: trains 3 steps with ``model.fusions=off`` and again with ``on`` (megatron-core's
torch.compile'd SwiGLU and bias-dropout-add), from the same seed: the losses must agree to
FUSION_RTOL. ``--dry-run``: the tiny model on CPU (no sync count, no CUDA peak), so CI runs the same code.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SYNC_WARNING = "synchroniz"
# Fused and unfused bf16 runs round differently (compiled kernels keep fp32 in registers); the
# losses, averages over every token, agree far closer than one bf16 step (7.8e-3).
FUSION_RTOL = 2e-3  # "called a synchronizing CUDA operation"

DRY_RUN = [
    "model=tiny",
    "train.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.precision=bf16",
]
# One GPU, the paper's 1B model with the paper's shapes, few microbatches per step.
GPU_RUN = [
    "experiment=paper_dense_1b",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.precision=bf16",
]
COMMON = [
    "optim.warmup_steps=1",
    "logging.interval=1",
    "logging.progress=false",
    "logging.wandb.mode=disabled",
    "eval.interval=0",
]


def _config(overrides: list[str]):
    from divprec.config.compose import compose_config
    from divprec.config.validate import validate

    cfg = compose_config(overrides)
    validate(cfg, 1)
    return cfg


def _sync_counter():
    import torch

    from divprec.metrics.callback import Callback

    class SyncCounter(Callback):
        """Sync debug mode on for one step (the third: compiled kernels and buckets are warm)."""

        def __init__(self) -> None:
            self.on = False

        def on_step_end(self, state, metrics) -> None:
            if torch.cuda.is_available():
                self.on = state.step == 2
                torch.cuda.set_sync_debug_mode("warn" if self.on else 0)

    return SyncCounter()


def syncs(overrides: list[str], dry_run: bool) -> dict:
    from divprec.train.trainer import pretrain

    counter = _sync_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config([*overrides, "train.steps=3", "checkpoint.interval=0", f"run.dir={run_dir}"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pretrain(cfg, [counter])
    sync_warnings = [w for w in caught if SYNC_WARNING in str(w.message)]
    where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in sync_warnings)
    measured = not dry_run
    return {
        "syncs_in_step_3": len(sync_warnings) if measured else None,
        "by_line": dict(where.most_common(20)),
        "note": None if measured else "dry run on CPU: nothing measured",
    }


def _preempt_after(step: int):
    from divprec.metrics.callback import Callback

    class PreemptAfter(Callback):
        def on_step_end(self, state, metrics) -> None:
            if state.step == step:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    return PreemptAfter()


def memory(overrides: list[str], dry_run: bool, async_save: bool) -> dict:
    import torch

    from divprec.config.memory import memory_plan
    from divprec.train.preemption import Preempted
    from divprec.train.trainer import pretrain

    on_gpu = torch.cuda.is_available()
    extra = [f"checkpoint.async_save={str(async_save).lower()}", "checkpoint.interval=2"]
    with tempfile.TemporaryDirectory() as root:
        full_cfg = _config([*overrides, *extra, "train.steps=4", f"run.dir={root}/full"])
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        full = pretrain(full_cfg).history
        peak = torch.cuda.max_memory_allocated() if on_gpu else None
        plan = memory_plan(full_cfg, 1, on_gpu=on_gpu).total
        # Preempted after step 2 (its checkpoint), as SLURM would; then resumed to step 4.
        first_cfg = _config([*overrides, *extra, "train.steps=4", f"run.dir={root}/cut"])
        with contextlib.suppress(Preempted):  # the preempted run exits as SLURM's would
            pretrain(first_cfg, [_preempt_after(2)])
        second_cfg = _config([*overrides, *extra, "train.steps=4", f"run.dir={root}/cut"])
        resumed = pretrain(second_cfg).history
    want = {m["step"]: m["lm_loss"] for m in full}
    got = {m["step"]: m["lm_loss"] for m in resumed}
    return {
        "steps_resumed": sorted(got),
        "resumed_lm_loss": got,
        "uninterrupted_lm_loss": {s: want[s] for s in got},
        "max_memory_allocated_gib": peak / 2**30 if peak is not None else None,
        "plan_gib": plan / 2**30,
        "measured_over_plan": peak / plan if peak is not None else None,
        "note": None if not dry_run else "dry run on CPU: no CUDA peak",
    }


def fusions(overrides: list[str]) -> dict:
    from divprec.train.trainer import pretrain

    losses = {}
    for mode in ("off", "on"):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = _config(
                [*overrides, f"model.fusions={mode}", "train.steps=3", "checkpoint.interval=0",
                 f"run.dir={run_dir}"]
            )  # fmt: skip
            losses[mode] = {m["step"]: m["lm_loss"] for m in pretrain(cfg).history}
    worst = max(abs(losses["on"][s] - v) / abs(v) for s, v in losses["off"].items())
    return {
        "unfused_lm_loss": losses["off"],
        "fused_lm_loss": losses["on"],
        "max_relative_difference": worst,
        "same_loss": worst <= FUSION_RTOL,
        "rtol": FUSION_RTOL,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("step", choices=("syncs", "memory", "fusions"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides after the step's defaults")
    p.add_argument("--json", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--async-save", action="store_true")
    args = p.parse_args(argv)
    overrides = [*(DRY_RUN if args.dry_run else GPU_RUN), *COMMON, *args.overrides]
    if args.step == "syncs":
        result = syncs(overrides, args.dry_run)
    elif args.step == "fusions":
        result = fusions(overrides)
    else:
        result = memory(overrides, args.dry_run, args.async_save)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps(result, indent=1, default=str))
    if result.get("same_loss") is False:
        print(f"fused and unfused losses differ by more than rtol {FUSION_RTOL}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
