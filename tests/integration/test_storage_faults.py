"""A checkpoint save on a full disk (a real tmpfs that fills up) fails cleanly on every rank:
``latest`` stays on the previous complete checkpoint, no partial directory is left, and the
error is one line naming the path and the errno."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_model import tiny_run

from divprec.checkpoint.layout import check_complete, resolve_latest
from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

# One tiny-model checkpoint is ~29 MB (weights + fp32 master + Adam moments): two fit, the
# third (step 6) runs out of space while its shards are written.
TMPFS_SIZE = "72m"
RUN = tiny_run("train.steps=8", "checkpoint.interval=2", "checkpoint.keep_last=5")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _train(rank: int, world: int, run_dir: str, ckpt_dir: str) -> str:
    from divprec.checkpoint.checkpointer import CheckpointSaveError
    from divprec.train.trainer import pretrain

    cfg = compose_config([*RUN, f"run.dir={run_dir}", f"checkpoint.dir={ckpt_dir}"])
    validate(cfg, world)
    try:
        pretrain(cfg)
    except CheckpointSaveError as err:
        return str(err)
    return "no error"


def _assert_clean_failure(root: Path, message: str) -> None:
    assert "\n" not in message
    assert "[Errno 28] No space left on device" in message, message
    assert str(root / "step_0000006.tmp") in message, message
    assert "latest still names step_0000004" in message, message
    assert resolve_latest(root).name == "step_0000004"
    assert check_complete(root / "step_0000004").complete
    assert not list(root.glob("step_*.tmp")), list(root.iterdir())
    assert not (root / "step_0000006").exists()


def test_full_disk_on_two_ranks(small_disk, tmp_path):
    messages = run_in_processes(_train, 2, str(tmp_path / "run"), str(small_disk))
    for message in messages:
        _assert_clean_failure(small_disk, message)


@pytest.mark.slow
def test_full_disk_from_the_command_line(small_disk, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "divprec.pretrain",
            *RUN,
            f"run.dir={tmp_path / 'run'}",
            f"checkpoint.dir={small_disk}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 74, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("divprec: error: saving checkpoint"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    _assert_clean_failure(small_disk, last)
