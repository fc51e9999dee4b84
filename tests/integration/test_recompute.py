"""Activation recompute changes memory, not results: selective and full train exactly as none.

Each case trains the same 3 steps as tests/integration/test_pretrain_layouts.py (tiny model, shaped
loss), once per recompute setting inside one set of processes, and compares with recompute=none in
the same layout. That the settings do recompute (keep fewer activations) is shown by
tests/unit/test_memory_plan.py, which measures the saved activations of each.
"""

from __future__ import annotations

import math

import pytest
from test_pretrain_layouts import BASE
from tiers import slow_except

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

KEYS = ("loss", "lm_loss", "grad_norm")
MOE_KEYS = ("moe_max_load_ratio", "moe_expert_bias_abs_mean")
TOLERANCE = 1e-6


def _train_each(rank: int, world: int, runs: list[list[str]], run_dir: str) -> list[list[dict]]:
    """Train every override list in turn in this process group (fresh model, engine, run dir)."""
    histories, _ = _train_each_counting_leftovers(rank, world, runs, run_dir)
    return histories


def _train_each_counting_leftovers(
    rank: int, world: int, runs: list[list[str]], run_dir: str
) -> tuple[list[list[dict]], list[int]]:
    """_train_each, and the bytes of tensors still alive after each run (a run must free them)."""
    import gc

    from divprec.metrics.memory import live_tensor_bytes
    from divprec.train.trainer import pretrain

    histories, leftovers = [], []
    for i, overrides in enumerate(runs):
        cfg = compose_config([*BASE, *overrides, f"run.dir={run_dir}/{i}"])
        validate(cfg, world)
        histories.append(pretrain(cfg).history)
        gc.collect()
        leftovers.append(live_tensor_bytes())
    return histories, leftovers


def _assert_same(history: list[dict], reference: list[dict], keys: tuple[str, ...], case) -> None:
    assert [m["step"] for m in history] == [1, 2, 3], case
    for ours, ref in zip(history, reference, strict=True):
        for key in keys:
            assert math.isclose(ours[key], ref[key], rel_tol=TOLERANCE), (case, ours["step"], key)


SINGLE = {
    "dense": (
        [],
        [
            ["model.recompute=selective"],  # megatron-core's default module: core_attn
            ["model.recompute=selective", "model.recompute_modules=[core_attn,mlp]"],
            ["model.recompute=full", "model.recompute_num_layers=2"],  # uniform: chunks of 2
            [
                "model.recompute=full",
                "model.recompute_method=block",
                "model.recompute_num_layers=3",
            ],
        ],
    ),
    "moe": (
        ["model=moe_tiny"],
        [
            [
                "model=moe_tiny",
                "model.recompute=selective",
                "model.recompute_modules=[core_attn,moe]",
            ],
            ["model=moe_tiny", "model.recompute=full"],
        ],
    ),
}


@pytest.mark.parametrize("model", slow_except(SINGLE, "dense"))
def test_recompute_matches_none_single_process(model, tmp_path):
    none, cases = SINGLE[model]
    ((histories, leftovers),) = run_in_processes(
        _train_each_counting_leftovers, 1, [none, *cases], str(tmp_path)
    )
    # Each run frees its model and optimizer state (7-13 MiB of parameters alone, more than
    # four times that with gradients and Adam's state): what stays is small and does not grow.
    assert max(leftovers) < 1 << 20, leftovers
    reference, *others = histories
    keys = KEYS + (MOE_KEYS if model == "moe" else ())
    for case, history in zip(cases, others, strict=True):
        _assert_same(history, reference, keys, case)
    assert reference[-1]["lm_loss"] < reference[0]["lm_loss"]


@pytest.mark.slow
def test_recompute_matches_none_tp2_pp2_sequence_parallel(tmp_path):
    layout = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"]
    cases = [
        ["model.recompute=selective", "model.recompute_modules=[core_attn,mlp]"],
        ["model.recompute=full"],  # uniform, 1 layer per chunk: both layers of each stage
        ["model.recompute=full", "model.recompute_method=block"],  # the first layer of each stage
    ]
    runs = [layout, *([*layout, *case] for case in cases)]
    histories = run_in_processes(_train_each, 4, runs, str(tmp_path))
    for rank_histories in histories:  # every rank reports the same reduced metrics
        reference, *others = rank_histories
        for case, history in zip(cases, others, strict=True):
            _assert_same(history, reference, KEYS, case)
