"""tools/gpu_check.sh --dry-run: every step of the GPU check, at tiny sizes on CPU, through the same
script a GPU machine runs (with --wheels: the offline install from a local folder)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    wheels = tmp_path / "wheels"  # everything is installed already: nothing to fetch
    wheels.mkdir()
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--wheels", str(wheels), "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    assert list(steps) == [
        "gpu_tests",
        "bench_loss",
        "bench_loss_fused",
        "bench_train",
        "bench_train_fused",
        "syncs",
        "fusions",
        "memory",
        "memory_async",
    ]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["gpu_tests"]["results"]["skipped"] > 0  # the GPU tier, skipped without CUDA
    assert {c["config"] for c in steps["bench_loss"]["results"]["cases"]} == {"paper", "ce"}
    assert steps["bench_loss_fused"]["results"]["cases"][0]["time_ratio"] > 0
    for name in ("bench_train", "bench_train_fused"):
        assert [r["loss"] for r in steps[name]["results"]["runs"]] == ["ce", "precision"]
    fusions = steps["fusions"]["results"]
    assert fusions["same_loss"] and sorted(fusions["fused_lm_loss"]) == ["1", "2", "3"]
    for name in ("memory", "memory_async"):
        memory = steps[name]["results"]
        assert memory["steps_resumed"] == [3, 4]
        assert memory["resumed_lm_loss"] == memory["uninterrupted_lm_loss"]
        assert memory["plan_gib"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| memory_async | ok |" in table and "(dry run)" in table


def test_gpu_check_refuses_a_missing_wheel_folder(tmp_path):
    done = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--wheels", str(tmp_path / "none"), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "is not a folder (make it with tools/gpu_wheels.sh)" in done.stderr
