"""The memory plan against the measured peak of a real training step on CPU (gloo).

divprec.metrics.memory.PeakTensorMemory measures step 2 of a run: the live tensors at its start
plus the highest running total of torch's CPU allocations during it. The plan
(divprec.config.memory.memory_plan, the figures tools/plan.py prints) must be within 15% of that
peak on every rank, for the tiny and study models at one and two processes.
"""

from __future__ import annotations

import pytest

from divprec.config.compose import compose_config
from divprec.config.memory import memory_plan
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

pytestmark = pytest.mark.slow

TOLERANCE = 0.15
COMMON = [
    "train.steps=2",
    "optim.warmup_steps=1",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
    "checkpoint.interval=0",
    "checkpoint.resume=never",
]
# (world size, overrides): the tiny model's defaults run 4 microbatches of 4 x 256 tokens.
CASES = {
    "tiny_1": (1, []),
    "tiny_dp2_full_recompute": (2, ["model.recompute=full"]),  # also the recompute working set
    "study_1": (1, ["experiment=study"]),
    "study_tp2": (2, ["experiment=study", "parallel.tensor=2"]),
}


def _measure(rank: int, world: int, overrides: list[str], run_dir: str) -> int:
    from divprec.metrics.memory import PeakTensorMemory
    from divprec.train.trainer import pretrain

    cfg = compose_config([*COMMON, *overrides, f"run.dir={run_dir}"])
    validate(cfg, world)
    probe = PeakTensorMemory(step=2)
    pretrain(cfg, [probe])
    assert probe.result is not None
    return probe.result.peak_bytes


@pytest.mark.parametrize("case", list(CASES))
def test_plan_within_15_percent_of_measured_peak(case, tmp_path):
    world, overrides = CASES[case]
    planned = memory_plan(compose_config([*COMMON, *overrides]), world, on_gpu=False).total
    peaks = run_in_processes(_measure, world, overrides, str(tmp_path))
    for rank, peak in enumerate(peaks):
        assert abs(planned - peak) <= TOLERANCE * peak, (case, rank, planned, peak)
