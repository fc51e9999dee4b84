"""End-to-end CPU training: every parallel layout computes the same steps as one process."""

from __future__ import annotations

import math

import pytest
from tiers import slow_except
from toy_model import tiny_run

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

# A small, fast run of the tiny model with the shaped loss (precision + tail penalty).
BASE = tiny_run(
    "loss=tail_penalty",
    "loss.beta=-0.25",
    "train.steps=3",
)


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
    "tp2_sequence_parallel": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
}


@pytest.mark.parametrize("layout", slow_except(LAYOUTS, "tp2_pp2"))
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


def _train_moe(rank: int, world: int, overrides: list[str], run_dir: str) -> dict:
    from divprec.train.trainer import pretrain

    cfg = compose_config([*BASE, "model=moe_tiny", *overrides, f"run.dir={run_dir}"])
    validate(cfg, world)
    return pretrain(cfg).history


@pytest.mark.slow
def test_moe_trains_and_balances_with_expert_bias(tmp_path):
    (history,) = run_in_processes(_train_moe, 1, [], str(tmp_path / "single"))
    assert history[-1]["lm_loss"] < history[0]["lm_loss"]
    # Auxiliary-loss-free balancing moved the router biases away from their zero init.
    assert all(m["moe_expert_bias_abs_mean"] > 0 for m in history)
    assert all(m["moe_max_load_ratio"] >= 1.0 for m in history)
    # MoE under tensor parallel (with sequence parallel, as megatron-core requires): same steps.
    parallel = run_in_processes(
        _train_moe,
        2,
        ["parallel.tensor=2", "parallel.sequence_parallel=true"],
        str(tmp_path / "tp"),
    )
    for ours, ref in zip(parallel[0], history, strict=True):
        for key in ("lm_loss", "loss", "grad_norm"):
            assert math.isclose(ours[key], ref[key], rel_tol=1e-4), (ours["step"], key)


@pytest.mark.slow
def test_tied_embeddings_across_pipeline_stages(tmp_path):
    """The first stage's embedding and the last stage's output layer are one weight: both copies
    get its whole gradient (an embedding-group all-reduce), and the norm counts it once."""
    tied = ["model.tie_embeddings=true"]
    (reference,) = run_in_processes(_train, 1, tied, str(tmp_path / "single"))
    histories = run_in_processes(_train, 2, [*tied, "parallel.pipeline=2"], str(tmp_path / "pp"))
    for ours, ref in zip(histories[0], reference, strict=True):
        for key in ("lm_loss", "loss", "grad_norm"):
            assert math.isclose(ours[key], ref[key], rel_tol=1e-4), (ours["step"], key)
