"""A micro study end to end from scratch: data, two pre-trainings (subprocesses), evaluations and
RL probes (spawned processes), report.json with its documented keys, the PNG plots; a rerun
skips every finished stage."""

from __future__ import annotations

import json

import pytest

from divprec.study.config import EvalSpec, quick_config, study_rl
from divprec.study.data import DataSpec
from divprec.study.report import REPORT_KEYS, SETTING_KEYS
from divprec.study.runner import run_study

pytestmark = pytest.mark.slow

PLOTS = ("pretrain_entropy", "pass_at_k", "rl_curves", "rl_pass_at_k")


def micro_config():
    """Smaller than --quick: a few steps of a few short sequences, a handful of samples."""
    return quick_config(
        name="micro",
        settings=("ce", "precision"),
        train_overrides=(
            "train.steps=4",
            "optim.warmup_steps=1",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.seq_length=64",
        ),
        data=DataSpec(arith_problems=300, stdlib_max_files=30),
        eval=EvalSpec(heldout_samples=4, problems=3, samples=2, max_new_tokens=8, batch_size=8),
        rl=study_rl(
            steps=1,
            prompts_per_step=2,
            samples_per_prompt=2,
            max_new_tokens=8,
            eval_every=1,
            eval_problems=2,
            eval_samples=2,
            pass_ks=(1, 2),
        ),
    )


def test_micro_study_end_to_end(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    cfg = micro_config()
    report_dir = tmp_path / "study"
    report = run_study(cfg, report_dir, progress=False)

    on_disk = json.loads((report_dir / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(on_disk)
    for setting in cfg.settings:
        entry = on_disk["settings"][setting]
        assert set(SETTING_KEYS) <= set(entry)
        assert entry["pretrain"]["steps"] == 4 and len(entry["pretrain"]["curves"]["step"]) == 4
        heldout = entry["eval"]["heldout"]
        assert set(heldout) == {"mixture", "code", "arith"}
        for stats in heldout.values():
            assert stats["perplexity"] > 1 and 0 <= stats["tail_mass"] <= 1
        assert sorted(int(k) for k in entry["eval"]["pass_at_k"]) == [1, 2]
        assert entry["rl"]["steps"] == 1 and entry["rl"]["last_eval"] is not None
        assert on_disk["timings"][f"pretrain/{setting}"] > 0
    assert on_disk["settings"]["precision"]["loss"]["beta"] == -0.25
    assert "perplexity_about_equal/mixture" in on_disk["claims"]
    for name in PLOTS:
        assert (report_dir / "plots" / f"{name}.png").stat().st_size > 1000
    assert len(report["timings"]["stages_run_this_invocation"]) == 1 + 3 * len(cfg.settings)

    # Resumable: everything is there, so a rerun only rebuilds the report.
    again = run_study(cfg, report_dir, progress=False)
    assert again["timings"]["stages_run_this_invocation"] == []
    assert again["settings"]["ce"]["eval"] == report["settings"]["ce"]["eval"]
