"""Training with loss.fused_linear=true computes the same steps as megatron-core's output layer +
the shaped loss: at one process (untied and tied embeddings, MoE), and at TP2 x PP2 with sequence
parallelism."""

from __future__ import annotations

import math

import pytest
from toy_model import tiny_run

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

BASE = tiny_run("loss=tail_penalty", "loss.beta=-0.25", "train.steps=3")
# 100 tokens per chunk: a micro-batch of 2 x 64 tokens takes two chunks, the second partial.
FUSED = ["loss.fused_linear=true", "loss.fused_chunk_tokens=100"]
RUNS = {
    "unfused": [],
    "fused": FUSED,
    "tied_unfused": ["model.tie_embeddings=true"],
    "tied_fused": ["model.tie_embeddings=true", *FUSED],
    "moe_unfused": ["model=moe_tiny"],
    "moe_fused": ["model=moe_tiny", *FUSED],
}


def _train_all(rank: int, world: int, run_dir: str) -> dict:
    """Every run in this one process (one spawn), with the fused loss's calls counted."""
    import divprec.model.shaped_gpt as shaped_gpt
    from divprec.train.trainer import pretrain

    calls = []
    fused = shaped_gpt.fused_linear_shaped_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    shaped_gpt.fused_linear_shaped_loss = counted
    out = {}
    for name, overrides in RUNS.items():
        calls.clear()
        cfg = compose_config([*BASE, *overrides, f"run.dir={run_dir}/{name}"])
        validate(cfg, world)
        out[name] = (pretrain(cfg).history, len(calls))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    (out,) = run_in_processes(_train_all, 1, str(tmp_path_factory.mktemp("single")))
    return out


def test_fused_linear_training_equals_unfused(runs):
    for variant in ("", "tied_", "moe_"):
        reference, unfused_calls = runs[f"{variant}unfused"]
        history, fused_calls = runs[f"{variant}fused"]
        # 4 micro-batches a step, 3 steps: every loss went through the fused path, or none.
        assert (unfused_calls, fused_calls) == (0, 12), variant
        assert [m["step"] for m in history] == [1, 2, 3]
        for ours, ref in zip(history, reference, strict=True):
            for key in ("lm_loss", "loss", "entropy", "topk_mass", "grad_norm"):
                assert math.isclose(ours[key], ref[key], rel_tol=1e-5), (variant, ours["step"], key)
        assert history[-1]["lm_loss"] < history[0]["lm_loss"]


def _train(rank: int, world: int, overrides: list[str], run_dir: str) -> list[dict]:
    from divprec.train.trainer import pretrain

    cfg = compose_config([*BASE, *overrides, f"run.dir={run_dir}"])
    validate(cfg, world)
    return pretrain(cfg).history


@pytest.mark.slow
def test_fused_linear_at_tp2_pp2_sequence_parallel_equals_one_process(runs, tmp_path):
    overrides = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"]
    histories = run_in_processes(_train, 4, [*overrides, *FUSED], str(tmp_path))
    reference, _ = runs["unfused"]
    for ours, ref in zip(histories[0], reference, strict=True):
        for key in ("lm_loss", "loss", "entropy", "topk_mass", "grad_norm"):
            # as tests/integration/test_pretrain_layouts.py: another layout, other roundings
            assert math.isclose(ours[key], ref[key], rel_tol=1e-4), (ours["step"], key)
