"""Dead and hung workers under launch/local.sh (torchrun): a worker killed with SIGKILL is
restarted with its group, which resumes from the latest checkpoint and finishes; a stopped
(SIGSTOP) worker fails the job within parallel.timeout_minutes, naming the operation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from toy_model import tiny_run

LOCAL = Path(__file__).resolve().parents[2] / "launch" / "local.sh"
STEPS = 12
RUN = tiny_run(f"train.steps={STEPS}", "checkpoint.interval=2")


def _launch(run_dir: Path, *overrides: str, restarts: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": str(restarts),
        "DIVPREC_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        ["bash", str(LOCAL), *RUN, *overrides, f"run.dir={run_dir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while max((r["step"] for r in _records(run_dir)), default=0) < step:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.05)


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes: the launcher's descendants that run divprec.pretrain itself."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    return [
        p
        for p in tree
        if "divprec.pretrain" in " ".join(p.cmdline())
        and "torch.distributed.run" not in " ".join(p.cmdline())
    ]


def _kill_launcher(proc: subprocess.Popen) -> None:
    """After a failed assertion: end the whole tree (torchrun starts its workers in sessions of
    their own) and show its output."""
    tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    for child in tree:
        child.kill()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    print(proc.communicate()[0][-4000:])


def test_killed_worker_is_restarted_and_the_run_resumes(tmp_path):
    proc = _launch(tmp_path, restarts=2)
    try:
        _wait_for_step(proc, tmp_path, 5, timeout_s=300)
        workers = _workers(proc)
        assert len(workers) == 2, workers
        killed_at = time.monotonic()
        workers[1].send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    except BaseException:
        _kill_launcher(proc)
        raise
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from checkpoint" in out, out[-4000:]
    steps = [r["step"] for r in _records(tmp_path)]
    assert steps == list(range(1, STEPS + 1)), steps  # a restarted step replaced the earlier line
    print(f"restart to finish: {time.monotonic() - killed_at:.1f} s")


@pytest.mark.slow
def test_stopped_worker_fails_the_job_within_the_collective_timeout(tmp_path):
    timeout_s = 15
    proc = _launch(tmp_path, f"parallel.timeout_minutes={timeout_s / 60}", restarts=0)
    try:
        _wait_for_step(proc, tmp_path, 3, timeout_s=300)
        stopped = _workers(proc)[1]
        stopped.send_signal(signal.SIGSTOP)  # a real hang: the rank stops answering
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=timeout_s + 120)
        elapsed = time.monotonic() - t0
    except BaseException:
        _kill_launcher(proc)
        raise
    assert proc.returncode != 0
    assert "Timed out" in out or "timed out" in out, out[-4000:]
    assert any(op in out for op in ("recv", "send", "allreduce", "all_reduce", "barrier")), out
    assert elapsed < timeout_s + 90, elapsed
    print(f"stopped rank to failed job: {elapsed:.1f} s")
