"""Training with loss.fused_linear=true computes the same steps as megatron-core's output layer +
the shaped loss (one process; untied and tied embeddings)."""

from __future__ import annotations

import math

import pytest
from toy_model import tiny_run

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

pytestmark = pytest.mark.slow

BASE = tiny_run("loss=tail_penalty", "loss.beta=-0.25", "train.steps=3")
# 100 tokens per chunk: a micro-batch of 2 x 64 tokens takes two chunks, the second partial.
FUSED = ["loss.fused_linear=true", "loss.fused_chunk_tokens=100"]
RUNS = {
    "unfused": [],
    "fused": FUSED,
    "tied_unfused": ["model.tie_embeddings=true"],
    "tied_fused": ["model.tie_embeddings=true", *FUSED],
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


def test_fused_linear_training_equals_unfused(tmp_path):
    (runs,) = run_in_processes(_train_all, 1, str(tmp_path))
    for tied in ("", "tied_"):
        reference, unfused_calls = runs[f"{tied}unfused"]
        history, fused_calls = runs[f"{tied}fused"]
        # 4 micro-batches a step, 3 steps: every loss went through the fused path, or none.
        assert (unfused_calls, fused_calls) == (0, 12), tied
        assert [m["step"] for m in history] == [1, 2, 3]
        for ours, ref in zip(history, reference, strict=True):
            for key in ("lm_loss", "loss", "entropy", "topk_mass", "grad_norm"):
                assert math.isclose(ours[key], ref[key], rel_tol=1e-5), (tied, ours["step"], key)
        assert history[-1]["lm_loss"] < history[0]["lm_loss"]
