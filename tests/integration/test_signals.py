"""The preemption signal reaches every process of the run, as SLURM delivers it (to the whole
process tree): the children a run started (megatron-core's checkpoint writer and its Manager,
DataLoader workers) survive it, and the run saves, writes its marker and exits 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from toy_model import tiny_run

from divprec.checkpoint.layout import check_complete, resolve_latest

STEPS = 40
ARGS = tiny_run(
    f"train.steps={STEPS}",
    "train.global_batch_size=4",
    "checkpoint.interval=2",  # saves before the signal: the writer's Manager exists by then
)


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("num_workers", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_signal_to_the_process_group_after_interval_saves(tmp_path, num_workers):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "divprec.pretrain",
            *ARGS,
            f"data.num_workers={num_workers}",
            f"run.dir={tmp_path}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    try:
        deadline = time.monotonic() + 300
        while max(_logged_steps(tmp_path), default=0) < 5:  # two interval saves done
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training did not reach step 5"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGUSR1)  # every process of the tree, as SLURM does
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = out.decode()
    assert proc.returncode == 75, log[-3000:]
    marker = json.loads((tmp_path / "preempted.json").read_text())
    assert marker["signal"] == "SIGUSR1"
    stopped = marker["step"]
    assert 5 <= stopped < STEPS
    root = tmp_path / "checkpoints"
    assert resolve_latest(root).name == f"step_{stopped:07d}"
    assert check_complete(root / f"step_{stopped:07d}").complete
    assert not list(root.glob("step_*.tmp")), "a save was left half-written"
    assert _logged_steps(tmp_path) == list(range(1, stopped + 1))
