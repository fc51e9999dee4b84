"""launch/pretrain.slurm on a real two-node SLURM cluster (emulated on this machine).

(a) A 2-node job, one process per node, tensor parallel 2 across the nodes, trains exactly like a
    single local process.
(b) Preemption: ``scancel --signal=USR1`` mid-training -> every rank saves and exits 75, rank 0
    writes preempted.json, the batch script requeues the job, the next attempt (same job id and
    run.dir) resumes from the checkpoint and ends with the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from slurm_cluster import REPO, SlurmCluster, free_ports, slurm_cluster  # noqa: F401 (fixture)
from toy_model import tiny_run

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "launch" / "pretrain.slurm"
LOCAL = REPO / "launch" / "local.sh"
# The tiny model, a few fast steps (seq 64, batch 8), shaped loss.
TINY = tiny_run(
    "loss=tail_penalty",
    "loss.beta=-0.25",
)
COMPARED = ("lm_loss", "loss")
JOB_ENV = {"NPROC_PER_NODE": "1", "DIVPREC_PYTHON": sys.executable}


def _job_env() -> dict[str, str]:
    # A free rendezvous port: another test session's cluster on this machine numbers its jobs
    # from 1 too, so the script's default (derived from the job id) could collide.
    return {**JOB_ENV, "DIVPREC_RDZV_PORT": str(free_ports(1)[0])}


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return records


def _local_run(overrides: list[str], run_dir: Path, nproc: int = 1) -> list[dict]:
    """The same config on this machine, uninterrupted (launch/local.sh; torchrun when nproc > 1)."""
    proc = subprocess.run(
        ["bash", str(LOCAL), *overrides, f"run.dir={run_dir}"],
        cwd=REPO,
        env={**os.environ, "DIVPREC_PYTHON": sys.executable, "NPROC_PER_NODE": str(nproc)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"local reference run failed:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
    )
    return _read_metrics(run_dir)


def _submit(cluster: SlurmCluster, overrides: list[str], run_dir: Path, log_dir: Path) -> int:
    return cluster.sbatch(
        SCRIPT,
        *overrides,
        f"run.dir={run_dir}",
        options=("--nodes", "2", "--output", f"{log_dir}/%x-%j.out", "--time", "20"),
        env=_job_env(),
        cwd=REPO,
    )


def _job_log(log_dir: Path, job_id: int) -> str:
    path = log_dir / f"divprec-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job log)"


def _assert_close(ours: list[dict], ref: list[dict], rel: float) -> None:
    assert [m["step"] for m in ours] == [m["step"] for m in ref]
    for a, b in zip(ours, ref, strict=True):
        for key in COMPARED:
            assert math.isclose(a[key], b[key], rel_tol=rel), (a["step"], key, a[key], b[key])


def _release_requeued(cluster: SlurmCluster, job: int, timeout: float = 60) -> None:
    """Skip most of SLURM's hold of a requeued job (BeginTime about 2 min ahead).

    Not at once: slurmd refuses to launch a job whose credential was revoked (by the requeue) in
    the same second ("Job credential revoked"; the job then FAILS). A few seconds suffice.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info["JobState"] == "PENDING":
            time.sleep(5)
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return
        if info["JobState"] not in ("COMPLETING", "REQUEUED"):
            return  # already running again (or finished)
        time.sleep(0.5)


def _wait_for_steps(cluster: SlurmCluster, job: int, run_dir: Path, logs: Path, n: int) -> None:
    deadline = time.monotonic() + 240
    while len(_read_metrics(run_dir)) < n:
        info = cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (
            info,
            _job_log(logs, job)[-6000:],
        )
        assert time.monotonic() < deadline, f"no training steps after 240 s\n{_job_log(logs, job)}"
        time.sleep(0.5)


def _wait_for_requeue(cluster: SlurmCluster, job: int, logs: Path) -> None:
    deadline = time.monotonic() + 300
    while int(cluster.job(job).get("Restarts", "0")) < 1:
        info = cluster.job(job)
        assert info["JobState"] in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"), (
            "the job was not requeued after the signal (did the trainer save, write "
            f"preempted.json and exit?): {info}\n" + _job_log(logs, job)[-8000:]
        )
        assert time.monotonic() < deadline, "no requeue after 300 s\n" + _job_log(logs, job)
        time.sleep(0.5)


def _assert_resumed_to_the_end(
    cluster: SlurmCluster, job: int, run_dir: Path, logs: Path, steps: int, started: float
) -> dict:
    """After the requeue: the second attempt resumes and finishes; returns the first marker."""
    markers = sorted(run_dir.glob(f"preempted.{job}.0.json"))
    assert markers, f"pretrain.slurm did not move preempted.json aside: {list(run_dir.iterdir())}"
    marker = json.loads(markers[0].read_text())
    assert marker["step"] < steps, marker
    _release_requeued(cluster, job)
    info = cluster.wait_finished(job, timeout=400)
    log = _job_log(logs, job)
    print(
        f"[test_slurm] preempted job {job}: {info['JobState']} after step {marker['step']} "
        f"({marker['signal']}), {time.monotonic() - started:.0f} s in all"
    )
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-8000:]
    assert info["Restarts"] == "1", info
    # One log, both attempts (--open-mode=append), and the second one resumed.
    assert "attempt 1 (SLURM_RESTART_COUNT=0)" in log and "attempt 2 (SLURM_RESTART_COUNT=1)" in log
    assert "requeueing job" in log, log[-8000:]
    assert "Broken pipe" not in log and "killed by signal" not in log, log[-8000:]
    assert re.search(r"resum", log.split("attempt 2 (")[1], re.IGNORECASE), (
        "the second attempt does not mention resuming\n" + log[-8000:]
    )
    # metrics.jsonl: every step once, continuing after the preemption step.
    ours = _read_metrics(run_dir)
    assert [m["step"] for m in ours] == list(range(1, steps + 1)), [m["step"] for m in ours]
    assert not list((run_dir / "checkpoints").glob("step_*.tmp")), "a half-written save was left"
    return marker


def test_preemption_after_interval_saves_requeues_and_resumes(slurm_cluster, tmp_path):  # noqa: F811
    """Interval saves (the writer's processes exist), DataLoader workers, then USR1 to every
    process of the job -> checkpoint + preempted.json + exit 75 -> requeue -> resume -> the same
    losses as an uninterrupted run."""
    steps = 24
    overrides = [
        *TINY,
        f"train.steps={steps}",
        "parallel.tensor=2",
        "checkpoint.interval=3",
        "data.num_workers=2",
    ]
    run_dir, logs = tmp_path / "slurm_run", tmp_path / "logs"
    logs.mkdir()
    started = time.monotonic()
    job = _submit(slurm_cluster, overrides, run_dir, logs)
    # After two interval saves, the early-warning signal the way SLURM sends it before a time
    # limit (--signal=USR1@N): to every process of the job steps, not the batch shell.
    _wait_for_steps(slurm_cluster, job, run_dir, logs, 7)
    slurm_cluster.run("scancel", "--signal=USR1", str(job))
    signalled_after = len(_read_metrics(run_dir))
    _wait_for_requeue(slurm_cluster, job, logs)
    marker = _assert_resumed_to_the_end(slurm_cluster, job, run_dir, logs, steps, started)
    assert marker["signal"] == "SIGUSR1", marker
    assert signalled_after <= marker["step"], (signalled_after, marker)
    # The uninterrupted reference: the same layout (TP=2, two processes) on this machine.
    ref = _local_run(overrides, tmp_path / "local_run", nproc=2)
    _assert_close(_read_metrics(run_dir), ref, rel=1e-5)


@pytest.mark.slow
def test_time_limit_signal_from_slurm_requeues_and_resumes(slurm_cluster, tmp_path):  # noqa: F811
    """SLURM itself signals ahead of a short time limit (--time 2 --signal=USR2@60; the signal is
    configurable): the job saves and is requeued, and the next attempt resumes from that save.
    The run is longer than any attempt (its steps take 0.1-1 s here, depending on the load), so
    the test cancels it once the second attempt has trained a few steps."""
    overrides = [*TINY, "train.steps=1000000", "checkpoint.interval=500"]
    run_dir, logs = tmp_path / "slurm_run", tmp_path / "logs"
    logs.mkdir()
    job = slurm_cluster.sbatch(
        SCRIPT,
        *overrides,
        f"run.dir={run_dir}",
        options=(
            "--nodes",
            "1",
            "--output",
            f"{logs}/%x-%j.out",
            "--time",
            "2",
            "--signal",
            "USR2@60",
        ),
        env={**_job_env(), "DIVPREC_PREEMPT_SIGNAL": "USR2"},
        cwd=REPO,
    )
    _wait_for_requeue(slurm_cluster, job, logs)
    markers = sorted(run_dir.glob(f"preempted.{job}.0.json"))
    assert markers, f"pretrain.slurm did not move preempted.json aside: {list(run_dir.iterdir())}"
    marker = json.loads(markers[0].read_text())
    # The early warning, or, if it came before the processes were up (SLURM's signal time has a
    # 60 s resolution), the time limit's SIGTERM: either way the run saved and was requeued.
    assert marker["signal"] in ("SIGUSR2", "SIGTERM"), marker
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=20", check=False)
    _release_requeued(slurm_cluster, job)
    deadline = time.monotonic() + 300
    while max((m["step"] for m in _read_metrics(run_dir)), default=0) < marker["step"] + 3:
        assert time.monotonic() < deadline, "the second attempt did not train\n" + _job_log(
            logs, job
        )
        time.sleep(0.5)
    slurm_cluster.run("scancel", str(job))
    slurm_cluster.wait_finished(job, timeout=120)
    log = _job_log(logs, job)
    print(f"[test_slurm] time-limit job {job}: {marker['signal']} after step {marker['step']}")
    assert "requeueing job" in log and "attempt 2 (SLURM_RESTART_COUNT=1)" in log, log[-8000:]
    assert f"resuming from checkpoint {marker['checkpoint']}" in log.split("attempt 2 (")[1], log[
        -8000:
    ]
    steps = [m["step"] for m in _read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)), steps  # each step once, in order


@pytest.mark.slow
def test_submit_without_a_logs_folder_writes_the_job_log(slurm_cluster, tmp_path):  # noqa: F811
    """A plain `sbatch launch/pretrain.slurm` from a directory with nothing in it: the job runs and
    its log is <submit dir>/divprec-<job id>.out (SLURM cannot create folders for --output; with
    logs/%x-%j.out and no logs/ the job died before the script ran and left no log)."""
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    run_dir = tmp_path / "slurm_run"
    job = slurm_cluster.sbatch(
        SCRIPT,
        *TINY,
        "train.steps=2",
        f"run.dir={run_dir}",
        options=("--nodes", "1", "--time", "10"),  # the script's own --output
        env={**_job_env(), "PYTHONPATH": str(REPO)},  # the job runs outside the checkout
        cwd=submit_dir,
    )
    info = slurm_cluster.wait_finished(job, timeout=300)
    log = _job_log(submit_dir, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, log[-6000:])
    assert "step 2/2" in log, log[-6000:]
    assert [m["step"] for m in _read_metrics(run_dir)] == [1, 2]


def _is_worker(process: psutil.Process, run_dir: Path) -> bool:
    """A training process of the job: ``python -m divprec.pretrain ... run.dir=<run_dir>`` whose
    parent is torchrun (not srun's shell, not a forked writer of a training process)."""
    try:
        argv, parent = process.info["cmdline"] or [], process.parent()
        return (
            f"run.dir={run_dir}" in argv
            and argv[1:3] == ["-u", "-m"]
            and "divprec.pretrain" in argv
            and parent is not None
            and "torch.distributed.run" in parent.cmdline()
        )
    except psutil.Error:  # it ended meanwhile
        return False


@pytest.mark.slow
def test_killed_worker_restarts_inside_the_allocation(slurm_cluster, tmp_path):  # noqa: F811
    """A 2-node tensor-parallel job, one torchrun per node; kill -9 of one training process:
    torchrun restarts the worker groups on both nodes (DIVPREC_MAX_RESTARTS), they resume from the
    latest checkpoint, and the job completes without a requeue, every step in metrics.jsonl once
    and its losses those of one process."""
    steps = 16
    overrides = [*TINY, f"train.steps={steps}", "parallel.tensor=2", "checkpoint.interval=3"]
    run_dir, logs = tmp_path / "slurm_run", tmp_path / "logs"
    logs.mkdir()
    job = _submit(slurm_cluster, overrides, run_dir, logs)
    _wait_for_steps(slurm_cluster, job, run_dir, logs, 5)
    # The training processes: torchrun's children that run this job (their own children, forked
    # checkpoint writers, share the command line).
    workers = [p for p in psutil.process_iter(["cmdline"]) if _is_worker(p, run_dir)]
    assert len(workers) == 2, workers
    workers[-1].kill()
    info = slurm_cluster.wait_finished(job, timeout=400)
    log = _job_log(logs, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-8000:]
    assert info["Restarts"] == "0", info  # torchrun restarted the workers, not SLURM the job
    assert info["NodeList"] == "n[1-2]", info
    assert "node 0 (" in log and "node 1 (" in log, log[-6000:]  # one torchrun per node
    assert "resuming from checkpoint" in log, log[-8000:]
    ours = _read_metrics(run_dir)
    assert [m["step"] for m in ours] == list(range(1, steps + 1))
    # Tensor parallel across the two nodes, restarted once, is still the same function as one
    # process (the restart resumed bit-identically at the same layout).
    one_process = [o for o in overrides if o != "parallel.tensor=2"]
    _assert_close(ours, _local_run(one_process, tmp_path / "local_run"), rel=1e-4)
