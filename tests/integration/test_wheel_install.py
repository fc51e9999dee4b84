"""The package installs anywhere: a wheel in a fresh venv runs divprec-pretrain from another
directory and finds its presets (conf/ travels inside the wheel as divprec/conf)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_installed_wheel_runs_from_any_directory(tmp_path):
    # Build from a copy: setuptools writes build/ next to the sources.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        symlinks=True,  # divprec/conf -> ../conf is what puts the presets into the wheel
        ignore=shutil.ignore_patterns(".git", "runs", "logs", "build", "*.egg-info", "__pycache__"),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = dist.glob("divprec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "divprec/conf/config.yaml" in names
    assert "divprec/conf/experiment/paper_dense_1b.yaml" in names
    assert "divprec/loss/native/block_topk.c" in names

    venv = tmp_path / "venv"
    # The venv sees the dependencies already installed here (torch, megatron-core, ...), but
    # divprec itself comes from the wheel: the venv's own site-packages come first.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import divprec; print(divprec.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(venv) in where.stdout, where.stdout
    job = subprocess.run(
        [str(venv / "bin" / "divprec-pretrain"), "experiment=paper_moe_5b_a0_3b", "--cfg", "job"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert "moe_5b_a0_3b" in job.stdout
    assert "num_experts: 384" in job.stdout
