"""Experiment presets: every preset composes and validates with every loss setting, in the
layout it was sized for, and carries the paper's (or the study's) hyperparameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from divprec.config.compose import CONF_DIR, compose_config
from divprec.config.validate import validate
from divprec.study.config import SETTINGS, full_config, quick_config

VOCAB = 4096  # the default corpus tokenizer's; the paper presets pad to 151936 rows anyway

# preset -> (model, world size it was sized for: one node of 8 GPUs, or this CPU).
PRESETS = {
    "paper_dense_1b": ("dense_1b", 8),
    "paper_dense_4b": ("dense_4b", 8),
    "paper_moe_5b_a0_3b": ("moe_5b_a0_3b", 8),
    "paper_moe_10b_a0_5b": ("moe_10b_a0_5b", 8),
    "study": ("study", 1),
}
LOSS_VALUES = {
    "ce": (0.0, 0.0, 0.0),
    "precision": (-0.25, 0.0, 0.0),
    "diversity": (0.5, 0.0, 0.0),
    "tail_penalty": (0.0, 0.0, -0.1),
    "head_bonus": (0.0, 0.1, 0.0),
}


def test_every_selectable_preset_is_covered() -> None:
    files = {p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")}
    selectable = {f for f in files if not f.startswith("_")}
    assert selectable == set(PRESETS)
    assert set(SETTINGS) == set(LOSS_VALUES)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_with_setting_composes_and_validates(preset: str, setting: str) -> None:
    model, world = PRESETS[preset]
    cfg = compose_config([f"experiment={preset}", f"loss={setting}"])
    validate(cfg, world_size=world, vocab_size=VOCAB)
    assert cfg.model.name == model
    beta, head, tail = LOSS_VALUES[setting]
    assert (cfg.loss.beta, cfg.loss.topk_negative_reward, cfg.loss.tail_negative_reward) == (
        beta,
        head,
        tail,
    )
    assert cfg.loss.topk == 100


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("paper_")])
def test_paper_presets_carry_the_paper_hyperparameters(preset: str) -> None:
    cfg = compose_config([f"experiment={preset}"])
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.final_lr, o.warmup_steps) == (3e-4, 3e-5, 2000)
    assert (o.weight_decay, o.clip_grad) == (0.1, 1.0)
    assert o.decay_fraction is None and o.decay_steps == 0  # the decay ran in mid-training
    assert t.seq_length == 4096 and t.global_batch_size == 4096  # 16M tokens per step
    assert t.global_batch_size * t.seq_length == 16 * 2**20
    assert t.steps * t.global_batch_size * t.seq_length == pytest.approx(500e9, rel=1e-3)
    assert t.precision == "bf16"
    assert cfg.model.rotary_base == 1e4
    assert cfg.model.vocab_size == 151936


def test_paper_preset_takes_command_line_overrides_after_it() -> None:
    cfg = compose_config(["experiment=paper_dense_1b", "loss=diversity", "train.steps=100"])
    assert (cfg.model.name, cfg.loss.beta, cfg.train.steps) == ("dense_1b", 0.5, 100)


@pytest.mark.parametrize("make", [full_config, quick_config])
def test_study_configs_compose_and_validate(make) -> None:
    study = make()
    cfg = compose_config([f"experiment={study.experiment}", "loss=ce", *study.train_overrides])
    validate(cfg, world_size=1, vocab_size=VOCAB)
    assert cfg.train.precision == "fp32"
