"""The study's orchestration without training: config fingerprints, the report directory guard,
pre-training command lines, and report.json / plots built from a synthetic report directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from divprec.study.config import SETTINGS, StudyConfig, full_config, quick_config
from divprec.study.evaluate import heldout_sources
from divprec.study.report import (
    REPORT_KEYS,
    SETTING_KEYS,
    build_report,
    check_claims,
    pass_at_k_of,
    read_metrics,
)
from divprec.study.runner import Study, StudyDirError, check_study_dir, pretrain_command

# Made-up measurements: (entropy, tail mass, perplexity, pass@1..4, RL pass@4 at the end).
FAKE = {
    "ce": (2.0, 0.10, 10.0, [0.2, 0.3, 0.35, 0.4], 0.5),
    "precision": (1.5, 0.08, 10.2, [0.25, 0.32, 0.36, 0.38], 0.6),
    "diversity": (2.5, 0.12, 10.1, [0.15, 0.28, 0.36, 0.42], 0.45),
}


def test_settings_are_the_loss_presets() -> None:
    conf = Path(__file__).resolve().parents[2] / "conf" / "loss"
    assert set(SETTINGS) == {p.stem for p in conf.glob("*.yaml")}


def test_config_rejects_unknown_or_repeated_settings() -> None:
    with pytest.raises(ValueError, match="choose from"):
        StudyConfig(settings=("ce", "nope"))
    with pytest.raises(ValueError, match="repeat"):
        StudyConfig(settings=("ce", "ce"))


def test_fingerprint_ignores_settings_but_not_the_budget() -> None:
    a = full_config(settings=("ce",))
    assert a.fingerprint() == full_config(settings=("ce", "precision")).fingerprint()
    assert a.fingerprint() != full_config(seed=7).fingerprint()
    assert a.fingerprint() != quick_config().fingerprint()


def test_study_dir_keeps_one_configuration(tmp_path: Path) -> None:
    check_study_dir(tmp_path, full_config(settings=("ce",)))
    check_study_dir(tmp_path, full_config(settings=("precision",)))  # same study, more settings
    recorded = json.loads((tmp_path / "study.json").read_text())
    assert recorded["config"]["settings"] == ["ce", "precision"]
    with pytest.raises(StudyDirError, match="another configuration"):
        check_study_dir(tmp_path, quick_config())


def test_pretrain_command_is_the_same_for_every_setting_but_the_loss(tmp_path: Path) -> None:
    cfg = quick_config(seed=5)
    data = ["data.blend=[0.5,a,0.5,b]", "data.tokenizer_model=t.model"]
    ce = pretrain_command(cfg, "ce", data, tmp_path / "ce")
    prec = pretrain_command(cfg, "precision", data, tmp_path / "ce")
    assert ce[1:3] == ["-m", "divprec.pretrain"]
    assert [a for a in ce if not a.startswith("loss=")] == [
        a for a in prec if not a.startswith("loss=")
    ]
    assert "loss=ce" in ce and "train.seed=5" in ce and "experiment=study" in ce
    assert "logging.wandb.mode=disabled" in ce and "logging.progress=false" in ce
    assert ce.index("train.steps=12") > ce.index("experiment=study")  # overrides after the preset


def test_heldout_sources_split_the_blend() -> None:
    sources = heldout_sources(["0.5", "/d/stdlib", "0.5", "/d/arith"])
    assert sources == {
        "mixture": ["0.5", "/d/stdlib", "0.5", "/d/arith"],
        "code": ["/d/stdlib"],
        "arith": ["/d/arith"],
    }


def test_pass_at_k_of_reads_rl_records() -> None:
    assert pass_at_k_of({"step": 3, "pass@1": 0.1, "pass@16": 0.5, "loss": 1.0}) == {
        1: 0.1,
        16: 0.5,
    }
    assert pass_at_k_of({"step": 3, "reward_mean": 0.1}) is None


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "entropy": 3}\n{"step": 2, "entropy": 2}\n'
        '{"step": 2, "entropy": 1}\n{"step": 3, "ent'
    )
    assert read_metrics(path) == [{"step": 1, "entropy": 3}, {"step": 2, "entropy": 1}]


def _fake_study(root: Path) -> Study:
    cfg = full_config(settings=tuple(FAKE))
    study = Study(cfg, root)
    study.data_meta_path.parent.mkdir(parents=True)
    study.data_meta_path.write_text(json.dumps({"build_seconds": 3.0, "spec": {}}))
    for s, (entropy, tail, ppl, passk, rl_end) in FAKE.items():
        run = study.run_dir(s)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"loss:\n  beta: {entropy}\n  topk: 100\n")
        with open(run / "metrics.jsonl", "w") as f:
            for step in range(1, 21):
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "lm_loss": 5 - step / 10,
                            "loss": 5.0,
                            "entropy": entropy + 1 / step,
                            "topk_mass": 1 - tail,
                            "target_rank": 3.0,
                            "grad_norm": 1.0,
                            "tokens_per_s": 100.0,
                        }
                    )
                    + "\n"
                )
        study.pretrain_marker(s).write_text(json.dumps({"seconds": 10.0, "steps": 20}))
        stats = {"entropy": entropy, "tail_mass": tail, "perplexity": ppl}
        study.eval_path(s).parent.mkdir(exist_ok=True)
        study.eval_path(s).write_text(
            json.dumps(
                {
                    "heldout": {"mixture": stats, "code": stats},
                    "pass_at_k": {str(k + 1): v for k, v in enumerate(passk)},
                    "seconds": 5.0,
                }
            )
        )
        history = [{"step": 0, "pass@1": passk[0], "pass@4": passk[3], "eval_entropy": 1.0}]
        history += [
            {
                "step": i,
                "reward_mean": i / 10,
                "accuracy": i / 10,
                "entropy": 1 - i / 20,
                "response_length": 30 - i,
                "loss": 0.1,
            }
            for i in range(1, 6)
        ]
        history[-1].update({"pass@1": rl_end / 2, "pass@4": rl_end, "eval_entropy": 0.5})
        study.rl_path(s).parent.mkdir(exist_ok=True)
        study.rl_path(s).write_text(json.dumps({"history": history, "seconds": 7.0}))
    return study


def test_report_from_a_study_directory(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    study = _fake_study(tmp_path)
    report = build_report(study, ran_stages=["rl/ce"], invocation_seconds=1.0)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(on_disk)
    for s in FAKE:
        assert set(SETTING_KEYS) <= set(on_disk["settings"][s])
    ce = report["settings"]["ce"]
    assert ce["pretrain"]["steps"] == 20 and len(ce["pretrain"]["curves"]["entropy"]) == 20
    assert ce["rl"]["steps"] == 5
    assert ce["rl"]["first_eval"] == {"step": 0, "pass_at_k": {1: 0.2, 4: 0.4}}
    assert ce["rl"]["last_eval"]["pass_at_k"][4] == 0.5
    assert report["timings"]["total_seconds"] == pytest.approx(3 + 3 * (10 + 5 + 7))
    results = (tmp_path / "results.md").read_text()
    assert "| precision | 0.250 |" in results and "| rl_precision_prior_helps | True |" in results
    for name in ("pretrain_entropy", "pass_at_k", "rl_curves", "rl_pass_at_k"):
        png = tmp_path / "plots" / f"{name}.png"
        assert f"plots/{name}.png" in report["plots"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


def test_claims_are_measured_not_assumed(tmp_path: Path) -> None:
    report = build_report(_fake_study(tmp_path), plots=False)
    claims = report["claims"]
    assert claims["entropy_diversity_gt_ce_gt_precision/mixture"]["holds"] is True
    assert claims["tail_penalty_less_tail_mass_than_ce/mixture"]["holds"] is None  # not run
    spread = claims["perplexity_about_equal/code"]
    assert spread["relative_spread"] == pytest.approx(0.02) and spread["holds"] is True
    assert claims["rl_precision_prior_helps"]["holds"] is True
    assert claims["pretrain_pass_at_k"]["pass_at_4"]["diversity"] == 0.42
    flipped = {
        s: {"eval": {"heldout": {"x": {"entropy": -e, "tail_mass": 0.1, "perplexity": p}}}}
        for s, (e, _, p, _, _) in FAKE.items()
    }
    assert check_claims(flipped)["entropy_diversity_gt_ce_gt_precision/x"]["holds"] is False
    assert not math.isnan(claims["perplexity_about_equal/mixture"]["relative_spread"])
