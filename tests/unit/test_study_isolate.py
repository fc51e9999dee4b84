"""A study stage runs as its own world of one, whatever rendezvous its parent joined."""

from __future__ import annotations

import sys

from divprec.study.isolate import run_command


def test_stage_does_not_inherit_the_parents_rendezvous(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29123")  # e.g. held by the parent's process group
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("DIVPREC_STAGE_PROBE", "kept")
    log = tmp_path / "stage.log"
    code = "import os; print(sorted(k for k in os.environ if k in ('MASTER_PORT', 'RANK', 'DIVPREC_STAGE_PROBE')), os.environ.get('EXTRA'))"
    run_command([sys.executable, "-c", code], log, env={"EXTRA": "x"}, interval_s=0.05)
    assert log.read_text().strip() == "['DIVPREC_STAGE_PROBE'] x"
