"""A micro study end to end from scratch, over two seeds: data (built once, shared), per seed two
pre-trainings (subprocesses), evaluations and RL probes (spawned processes), each seed's
report.json with its documented keys and PNG plots, the aggregated report over the seeds (paired
differences, verdicts, standard errors, plots); a rerun skips every finished stage."""

from __future__ import annotations

import json

import pytest

from divprec.study.config import EvalSpec, quick_config, study_rl
from divprec.study.data import DataSpec
from divprec.study.report import REPORT_KEYS, SETTING_KEYS
from divprec.study.seeds import SEEDS_REPORT_KEYS, run_seeds

PLOTS = ("pretrain_entropy", "pass_at_k", "rl_curves", "rl_pass_at_k")
SEEDS = [1234, 2]
VERDICTS = {"holds", "contradicted", "not decided"}


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
    top = tmp_path / "study"
    aggregated = run_seeds(cfg, SEEDS, top, progress=False)

    report_dir = top / "seed-1234"
    report = json.loads((report_dir / "report.json").read_text())
    on_disk = report
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
    ran = {s: v["stages_run_this_invocation"] for s, v in aggregated["seeds"].items()}
    # The data is shared, built once before the seeds, which ran side by side.
    assert ran == {s: ran["1234"] for s in ("1234", "2")} and len(ran["2"]) == 3 * len(cfg.settings)
    assert (top / "data" / "meta.json").is_file() and not (report_dir / "data").exists()
    other = json.loads((top / "seed-2" / "report.json").read_text())
    assert other["study"]["seed"] == 2
    assert other["settings"]["ce"]["eval"] != report["settings"]["ce"]["eval"]

    # The aggregated report: paired precision - ce differences over both seeds, verdicts in
    # the three words, the RL evaluation's per-problem standard errors, the band plots.
    agg = json.loads((top / "report.json").read_text())
    assert set(SEEDS_REPORT_KEYS) <= set(agg)
    diff = agg["differences"]["precision-ce"]["heldout/mixture/entropy"]
    by_seed = {
        str(s): json.loads((top / f"seed-{s}" / "report.json").read_text())["settings"]
        for s in SEEDS
    }
    expected = {
        s: v["precision"]["eval"]["heldout"]["mixture"]["entropy"]
        - v["ce"]["eval"]["heldout"]["mixture"]["entropy"]
        for s, v in by_seed.items()
    }
    assert diff["per_seed"] == pytest.approx(expected) and diff["n"] == 2
    assert diff["low"] <= diff["mean"] <= diff["high"]
    assert "rl/pass@2" in agg["differences"]["precision-ce"]
    assert {c["verdict"] for c in agg["claims"].values()} <= VERDICTS
    assert "rl_pass@2/precision_above_ce" in agg["claims"]
    assert agg["standard_errors"]["per_seed"]["2"]["ce"]["rl"] >= 0
    for name in ("pass_at_k", "rl_curves", "rl_pass_at_k"):
        assert (top / "plots" / f"{name}.png").stat().st_size > 1000
    assert agg["standard_errors"]["k"] == 2
    assert "precision_lowers_entropy/mixture" in (top / "results.md").read_text()

    # Resumable: everything is there, so a rerun only rebuilds the reports.
    again = run_seeds(cfg, SEEDS, top, progress=False)
    assert all(v["stages_run_this_invocation"] == [] for v in again["seeds"].values())
    assert again["claims"] == aggregated["claims"]
