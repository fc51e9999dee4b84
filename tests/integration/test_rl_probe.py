"""The RL probe end to end: pre-train a tiny model for 2 steps, load its checkpoint, measure
held-out token statistics, run 3 GRPO steps."""

from __future__ import annotations

import math

import pytest
from toy_model import tiny_run

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

pytestmark = pytest.mark.slow

PRETRAIN = tiny_run(
    "train.steps=2",
    "train.global_batch_size=4",
    "loss=precision",
)


def _pretrain(rank: int, world: int, run_dir: str) -> int:
    from divprec.train.trainer import pretrain

    cfg = compose_config([*PRETRAIN, f"run.dir={run_dir}"])
    validate(cfg, world)
    return pretrain(cfg).step


def _probe(rank: int, world: int, run_dir: str) -> dict:
    from divprec.eval.model import load_eval_model
    from divprec.eval.perplexity import heldout_batches, token_statistics
    from divprec.eval.synthetic import ArithmeticTask
    from divprec.rl.grpo import GRPOConfig, run_grpo

    em = load_eval_model(run_dir)
    batches = heldout_batches(em, 8, seq_length=64, seed=0, batch_size=4)
    stats = token_statistics(em, batches, topk=10)
    cfg = GRPOConfig(
        steps=3,
        prompts_per_step=4,
        samples_per_prompt=4,
        max_new_tokens=16,
        eval_every=2,
        eval_problems=8,
        eval_samples=4,
        pass_ks=(1, 4),
        dynamic_sampling=False,  # a 2-step model solves nothing: keep the update path running
    )
    return {"step": em.step, "stats": stats, "logs": run_grpo(em, ArithmeticTask(), cfg)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rl_probe")
    assert run_in_processes(_pretrain, 1, str(path)) == [2]
    return str(path)


def test_probe_on_a_pretrained_checkpoint(run_dir):
    result = run_in_processes(_probe, 1, run_dir)[0]
    assert result["step"] == 2
    stats = result["stats"]
    assert stats["num_tokens"] == 8 * 64
    assert 1.0 < stats["perplexity"] < 1e5 and 0.0 < stats["topk_mass"] <= 1.0
    assert stats["tail_mass"] == pytest.approx(1.0 - stats["topk_mass"])
    logs = result["logs"]
    assert [e["step"] for e in logs] == [0, 1, 2, 3]
    keys = {"reward_mean", "accuracy", "entropy", "response_length", "kept_groups", "loss"}
    for entry in logs[1:]:
        assert keys <= set(entry)
        assert entry["kept_groups"] == 4  # dynamic sampling off
        assert 0 < entry["response_length"] <= 16
    for entry in (logs[0], logs[2], logs[3]):  # before training, every 2 steps, the last
        assert {"pass@1", "pass@4", "eval_accuracy"} <= set(entry)
    assert "pass@1" not in logs[1]
    for entry in logs:
        counts = entry.pop("eval_correct_counts", None)  # per problem, for standard errors
        assert all(math.isfinite(v) for v in entry.values()), entry
        if counts is not None:
            samples = entry["eval_samples"]
            assert all(isinstance(c, int) and 0 <= c <= samples for c in counts), counts
            assert sum(counts) / (len(counts) * samples) == pytest.approx(entry["eval_accuracy"])
