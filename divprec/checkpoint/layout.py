"""On-disk layout of checkpoints, their atomic commit, completeness checks and retention.

    <checkpoint.dir>/
      latest                   text: the name of the newest complete checkpoint (replaced last)
      step_0000100/            a complete checkpoint (renamed into place when fully written)
        divprec.json           metadata, written last inside the directory: step, layout, ...
        .metadata, *.distcp    megatron-core distributed checkpoint (torch_dist): model + optimizer
        rng/rank_00000.pt      per-rank RNG states
        config.yaml            the resolved config;  tokenizer.model: the tokenizer
      step_0000200.tmp/        being written: never named by latest, removed by the next save

A crash at any moment leaves ``latest`` naming a complete checkpoint (or absent before the first).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LATEST = "latest"
METADATA = "divprec.json"
CONFIG_FILE = "config.yaml"  # the resolved config, in the run directory and in each checkpoint
TOKENIZER_FILE = "tokenizer.model"  # the sentencepiece model the run trained with
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{7})$")
_STEP_OR_TEMP_DIR = re.compile(r"^step_\d{7}(\.tmp)?$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def is_step_dir_name(name: str) -> bool:
    """Whether ``name`` is a step directory's name, complete or being written (``.tmp``)."""
    return _STEP_OR_TEMP_DIR.match(name) is not None


def temp_dir(root: Path, step: int) -> Path:
    return root / f"{step_dir_name(step)}.tmp"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so readers see the old or the new content, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def commit(root: Path, step: int, metadata: dict) -> Path:
    """Seal a fully written temp directory: metadata, rename into place, then ``latest``."""
    tmp = temp_dir(root, step)
    write_atomic(
        tmp / METADATA, json.dumps({**metadata, "format_version": FORMAT_VERSION}, indent=1)
    )
    final = root / step_dir_name(step)
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_atomic(root / LATEST, final.name + "\n")
    return final


@dataclass
class CheckpointStatus:
    path: Path
    complete: bool
    reason: str = ""


def check_complete(path: Path) -> CheckpointStatus:
    """Whether ``path`` holds a complete checkpoint, and if not, why."""
    if not path.is_dir():
        return CheckpointStatus(path, False, "the directory does not exist")
    meta = path / METADATA
    if not meta.is_file():
        return CheckpointStatus(path, False, f"{METADATA} is missing (an interrupted save)")
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return CheckpointStatus(path, False, f"{METADATA} is unreadable ({err})")
    if not (path / ".metadata").is_file():
        return CheckpointStatus(path, False, "the distributed checkpoint's .metadata is missing")
    for name in info.get("files", []):
        if not (path / name).is_file():
            return CheckpointStatus(path, False, f"{name} is missing")
    return CheckpointStatus(path, True)


def read_metadata(path: Path) -> dict:
    return json.loads((path / METADATA).read_text())


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    return [p for p in steps if check_complete(p).complete]


def resolve_latest(root: Path) -> Path | None:
    """The checkpoint ``auto`` resumes from: ``latest`` if complete, else the newest complete one.

    A partial or corrupt checkpoint is reported (warning) and skipped.
    """
    latest_file = root / LATEST
    if latest_file.is_file():
        named = root / latest_file.read_text().strip()
        status = check_complete(named)
        if status.complete:
            return named
        logger.warning(
            "checkpoint %s named by %s is not usable: %s", named, latest_file, status.reason
        )
    candidates = complete_checkpoints(root)
    for path in reversed(candidates):
        if latest_file.is_file():
            logger.warning("falling back to the previous complete checkpoint %s", path)
        return path
    return None


def apply_retention(root: Path, keep_last: int | None) -> list[Path]:
    """Delete leftover temp directories and all but the newest ``keep_last`` complete checkpoints.

    Never deletes the checkpoint ``latest`` names. Returns what was removed.
    """
    removed = []
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    if keep_last is None:
        return removed
    latest_file = root / LATEST
    protected = latest_file.read_text().strip() if latest_file.is_file() else None
    complete = complete_checkpoints(root)
    for path in complete[: max(0, len(complete) - keep_last)]:
        if path.name != protected:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
