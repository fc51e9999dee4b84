"""A diverging run stops instead of training on NaN: ``optim.lr=1e30`` on the tiny model makes
every gradient after the first step non-finite; each such update is skipped on every rank, a
warning names the step, and after ``train.max_skipped_steps`` in a row the run stops (exit 3).
A checkpoint never holds non-finite weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tiers import slow_except
from toy_model import tiny_run

from divprec.checkpoint.layout import resolve_latest
from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

DIVERGING = tiny_run(
    "optim.lr=1e30", "optim.warmup_steps=0", "train.steps=20", "train.max_skipped_steps=3"
)


class _Record:
    """Collects every step's state and metrics (a callback, as the loop's hooks are)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, str | None, float]] = []

    def on_train_start(self, state) -> None: ...

    def on_train_end(self, state) -> None: ...

    def on_step_end(self, state, metrics) -> None:
        self.steps.append((state.step, state.skipped, metrics["lm_loss"]))


def _diverge(rank: int, world: int, run_dir: str, overrides: list[str] = DIVERGING) -> dict:
    from divprec.train.guards import Diverged
    from divprec.train.trainer import pretrain

    cfg = compose_config([*overrides, f"run.dir={run_dir}", "checkpoint.interval=1"])
    validate(cfg, world)
    record = _Record()
    try:
        pretrain(cfg, [record])
    except Diverged as err:
        return {"code": err.code, "message": str(err), "steps": record.steps}
    return {"code": 0, "message": "", "steps": record.steps}


@pytest.mark.parametrize("precision", slow_except(["fp32", "bf16"], "fp32"))
def test_non_finite_updates_are_skipped_on_every_rank_then_the_run_stops(tmp_path, precision):
    # bf16: DeepSpeed's own skip (its overflow check) is what was_step_applied() reports.
    overrides = [*DIVERGING, f"train.precision={precision}"]
    results = run_in_processes(_diverge, 2, str(tmp_path), overrides)
    assert results[0]["steps"] == results[1]["steps"]  # the ranks agree on every skip
    steps = results[0]["steps"]
    skipped = [s for s, why, _ in steps if why]
    assert steps[0][1] is None, steps  # the first update is finite (and huge)
    assert skipped == [2, 3, 4], steps  # then 3 in a row: the limit
    for result in results:
        assert result["code"] == 3
        assert (
            "3 consecutive updates up to step 4 were skipped (the last: grad_norm not finite)"
            in result["message"]
        ), result["message"]
    # The run stopped before saving step 4; the checkpoints of the skipped steps 2 and 3 hold
    # exactly the weights and Adam moments of step 1 (the last applied update), all finite.
    root = tmp_path / "checkpoints"
    assert resolve_latest(root).name == "step_0000003"
    saved = {s: _checkpoint_tensors(root / f"step_{s:07d}", tmp_path) for s in (1, 2, 3)}
    assert saved[1].keys() == saved[3].keys() and len(saved[1]) > 10
    for key, value in saved[1].items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, saved[2][key]) and torch.equal(value, saved[3][key]), key


def _checkpoint_tensors(step_dir, tmp_path) -> dict:
    """Every tensor of a torch_dist checkpoint, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def test_the_command_line_reports_divergence_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "divprec.pretrain", *DIVERGING, f"run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("divprec: error: training diverged: 3 consecutive updates up to step 4")
    ), proc.stderr[-3000:]
    assert "step 2: grad_norm not finite; update skipped (1 in a row" in out, out[-3000:]
    assert "Traceback" not in out


def _save_with_nan(rank: int, world: int, run_dir: str, where: str) -> str:
    import torch

    from divprec.checkpoint.checkpointer import CheckpointError, Progress
    from divprec.train.build import build_run

    precision = "bf16" if where == "bf16_master_weights" else "fp32"
    cfg = compose_config(
        [*tiny_run("train.steps=2"), f"train.precision={precision}", f"run.dir={run_dir}"]
    )
    validate(cfg, world)
    run = build_run(cfg)
    run.checkpoints.save(Progress(1, 8))
    if rank == world - 1:  # one rank's state only: every rank must still refuse
        with torch.no_grad():
            if where == "weights":
                next(run.model.parameters()).view(-1)[0] = float("nan")
            elif where == "bf16_master_weights":  # ZeRO-1 under bf16: DeepSpeed's BF16_Optimizer
                run.engine.optimizer.fp32_groups_flat_partition[0][0] = float("nan")
            else:
                state = next(iter(run.engine.optimizer.optimizer.state.values()))
                state["exp_avg_sq"].view(-1)[0] = float("inf")
    try:
        run.checkpoints.save(Progress(2, 16))
    except CheckpointError as err:
        return str(err)
    return "saved"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["weights", "optimizer", "bf16_master_weights"])
def test_a_checkpoint_is_never_written_with_non_finite_state(tmp_path, where):
    messages = run_in_processes(_save_with_nan, 2, str(tmp_path), where)
    for message in messages:
        assert message.startswith("refusing to save step 2:"), message
        assert "is not finite; the last complete checkpoint is kept" in message
    assert "on rank 1" in messages[1]
    assert resolve_latest(tmp_path / "checkpoints").name == "step_0000001"
    assert not (tmp_path / "checkpoints" / "step_0000002").exists()


@pytest.mark.slow
def test_loss_spikes_are_skipped_on_every_rank(tmp_path):
    """With a window of 2 and a low threshold, every rise of the loss counts as a spike."""
    spiky = tiny_run(
        "train.steps=10",
        "checkpoint.keep_last=null",
        "train.loss_spike_window=2",
        "train.loss_spike_zscore=0.5",
        "train.skip_loss_spikes=true",
        "train.max_skipped_steps=10",
    )
    results = run_in_processes(_diverge, 2, str(tmp_path), spiky)
    assert results[0]["steps"] == results[1]["steps"] and results[0]["code"] == 0
    skipped = [s for s, why, _ in results[0]["steps"] if why]
    assert skipped, results[0]["steps"]
    assert all(why.startswith("loss spike (z-score") for _, why, _ in results[0]["steps"] if why)
    root = tmp_path / "checkpoints"
    for step in skipped:  # the update was not applied: the same weights and moments as before
        before = _checkpoint_tensors(root / f"step_{step - 1:07d}", tmp_path)
        after = _checkpoint_tensors(root / f"step_{step:07d}", tmp_path)
        assert all(torch.equal(before[k], after[k]) for k in before), step
