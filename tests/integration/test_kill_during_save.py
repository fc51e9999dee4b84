"""kill -9 in the middle of a checkpoint save never breaks ``checkpoint.resume=auto``."""

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

STEPS = 10
ARGS = tiny_run(
    f"train.steps={STEPS}",
    "checkpoint.interval=1",
    "checkpoint.keep_last=2",
)


def _start(run_dir: Path, capture: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "divprec.pretrain", *ARGS, f"run.dir={run_dir}"],
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )


def _kill_while_saving(run_dir: Path, min_complete: int, timeout_s: float = 300) -> None:
    proc = _start(run_dir, capture=False)
    root = run_dir / "checkpoints"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            complete = [p for p in root.glob("step_???????") if check_complete(p).complete]
            if len(complete) >= min_complete and any(root.glob("step_*.tmp")):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            if proc.poll() is not None:
                pytest.fail(
                    f"training ended (exit {proc.returncode}) before a save was interrupted"
                )
            time.sleep(0.002)
        pytest.fail("no checkpoint save was seen in progress")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_kill_during_save_then_auto_resume(tmp_path):
    root = tmp_path / "checkpoints"
    _kill_while_saving(tmp_path, min_complete=2)
    assert list(root.glob("step_*.tmp")), "the kill should have hit an unfinished save"
    resumed_from = resolve_latest(root)
    assert resumed_from is not None and check_complete(resumed_from).complete
    start_step = json.loads((resumed_from / "divprec.json").read_text())["step"]

    proc = _start(tmp_path, capture=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]
    assert f"resuming from checkpoint {resumed_from}" in out.decode()
    final = resolve_latest(root)
    assert final.name == f"step_{STEPS:07d}" and check_complete(final).complete
    assert not list(root.glob("step_*.tmp"))  # the interrupted save's leftovers were removed
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, STEPS + 1)), (start_step, steps)
