"""Atomic commit, completeness, fallback and retention of checkpoint directories (no training)."""

from __future__ import annotations

import logging
from pathlib import Path

from divprec.checkpoint.layout import (
    LATEST,
    METADATA,
    apply_retention,
    check_complete,
    commit,
    resolve_latest,
    temp_dir,
)


def fake_save(root: Path, step: int, commit_it: bool = True) -> Path:
    """A checkpoint's files as the checkpointer writes them, optionally committed."""
    tmp = temp_dir(root, step)
    tmp.mkdir(parents=True)
    (tmp / ".metadata").write_text("dcp")
    (tmp / "config.yaml").write_text("x: 1")
    if commit_it:
        return commit(root, step, {"step": step, "files": ["config.yaml"]})
    return tmp


def test_commit_renames_and_points_latest(tmp_path):
    path = fake_save(tmp_path, 10)
    assert path.name == "step_0000010" and check_complete(path).complete
    assert (tmp_path / LATEST).read_text().strip() == "step_0000010"
    assert not temp_dir(tmp_path, 10).exists()
    assert resolve_latest(tmp_path) == path


def test_interrupted_save_leaves_latest_on_the_previous(tmp_path):
    previous = fake_save(tmp_path, 10)
    fake_save(tmp_path, 20, commit_it=False)  # killed before the commit
    assert resolve_latest(tmp_path) == previous
    assert apply_retention(tmp_path, keep_last=5) == [temp_dir(tmp_path, 20)]


def test_unusable_latest_falls_back_with_a_warning(tmp_path, caplog):
    previous = fake_save(tmp_path, 10)
    newest = fake_save(tmp_path, 20)
    (newest / METADATA).unlink()
    with caplog.at_level(logging.WARNING):
        assert resolve_latest(tmp_path) == previous
    assert "step_0000020" in caplog.text and "divprec.json is missing" in caplog.text
    assert "falling back" in caplog.text


def test_missing_listed_file_is_incomplete(tmp_path):
    path = fake_save(tmp_path, 10)
    (path / "config.yaml").unlink()
    status = check_complete(path)
    assert not status.complete and "config.yaml is missing" in status.reason


def test_latest_missing_uses_newest_complete(tmp_path):
    fake_save(tmp_path, 10)
    newest = fake_save(tmp_path, 20)
    (tmp_path / LATEST).unlink()  # e.g. killed between the rename and the pointer update
    assert resolve_latest(tmp_path) == newest


def test_retention_keeps_newest_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        fake_save(tmp_path, step)
    removed = apply_retention(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_0000010", "step_0000020"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000030", "step_0000040"]
    assert apply_retention(tmp_path, keep_last=None) == []


def test_empty_root(tmp_path):
    assert resolve_latest(tmp_path / "none") is None
