"""End-to-end CPU training: every parallel layout computes the same steps as one process."""

from __future__ import annotations

import math

import pytest

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

pytestmark = pytest.mark.slow

# A small, fast run of the tiny model with the shaped loss (precision + tail penalty).
BASE = [
    "loss=tail_penalty",
    "loss.beta=-0.25",
    "train.steps=3",
    "train.seq_length=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
]


def _train(rank: int, world: int, overrides: list[str], run_dir: str) -> list[dict]:
    from divprec.train.trainer import pretrain

    cfg = compose_config([*BASE, *overrides, f"run.dir={run_dir}"])
    validate(cfg, world)
    return pretrain(cfg).history


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("single")
    (history,) = run_in_processes(_train, 1, [], str(run_dir))
    assert len(history) == 3
    return history


LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2": (2, []),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    world, overrides = LAYOUTS[layout]
    histories = run_in_processes(_train, world, overrides, str(tmp_path))
    for rank_history in histories:  # every rank reports the same reduced metrics
        assert [m["step"] for m in rank_history] == [1, 2, 3]
    for ours, ref in zip(histories[0], reference, strict=True):
        for key in ("lm_loss", "loss", "entropy", "topk_mass", "grad_norm"):
            assert math.isclose(ours[key], ref[key], rel_tol=1e-4), (layout, ours["step"], key)
    # The loss falls: the three steps trained something.
    assert histories[0][-1]["lm_loss"] < histories[0][0]["lm_loss"]
