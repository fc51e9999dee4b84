"""The warmup-stable-decay learning rate, and how a schedule longer than the run shrinks to fit."""

from __future__ import annotations

import logging

import pytest

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.config import OptimConfig
from divprec.train.schedule import learning_rate


def _lrs(cfg: OptimConfig, steps: int) -> list[float]:
    return [learning_rate(step, cfg, steps) for step in range(steps)]


def test_warmup_stable_decay_when_it_fits() -> None:
    cfg = OptimConfig(lr=1.0, final_lr=0.0, warmup_steps=2, decay_steps=4)
    assert cfg.phases(10) == (2, 4, 4)
    assert _lrs(cfg, 10) == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0])
    held = OptimConfig(lr=1.0, final_lr=0.5, warmup_steps=1, stable_steps=1, decay_steps=2)
    # After warmup + stable + decay, final_lr holds to the end.
    assert _lrs(held, 6) == pytest.approx([1, 1, 0.75, 0.5, 0.5, 0.5])


@pytest.mark.parametrize(
    ("cfg", "steps", "phases"),
    [
        (OptimConfig(warmup_steps=5, decay_fraction=0.2), 4, (3, 0, 1)),  # the default preset
        (OptimConfig(warmup_steps=2000), 1, (1, 0, 0)),
        (OptimConfig(warmup_steps=10, stable_steps=10, decay_steps=20), 8, (2, 2, 4)),
        (OptimConfig(warmup_steps=0, decay_steps=30), 3, (0, 0, 3)),
    ],
)
def test_schedule_longer_than_the_run_shrinks_to_fit(
    cfg: OptimConfig, steps: int, phases: tuple[int, int, int]
) -> None:
    assert cfg.phases(steps) == phases
    lrs = _lrs(cfg, steps)
    assert all(0 < lr <= cfg.lr for lr in lrs[:-1])
    if phases[2]:
        assert lrs[-1] == pytest.approx(cfg.final_lr)  # the decay still reaches final_lr


def test_a_four_step_run_validates_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """`divprec-pretrain train.steps=4`: the default warmup (5) + decay would not fit."""
    cfg = compose_config(["train.steps=4"])
    with caplog.at_level(logging.WARNING, logger="divprec.config"):
        validate(cfg, world_size=1, vocab_size=4096)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "optim: warmup 5 + stable 0 + decay 1 = 6 steps exceed train.steps=4; the schedule is "
        "shrunk to warmup 3 + stable 0 + decay 1 (set optim.warmup_steps and optim.decay_* to "
        "fit to silence this)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="divprec.config"):
        validate(compose_config(["train.steps=50"]), world_size=1, vocab_size=4096)
    assert caplog.records == []
