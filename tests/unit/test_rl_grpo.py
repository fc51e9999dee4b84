"""GRPO: advantages, dynamic sampling, the clip-higher surrogate, and short runs on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from toy_model import TOY_MODEL

from divprec.config.compose import compose_config
from divprec.data.tokenizer import Tokenizer, train_tokenizer
from divprec.eval.synthetic import ArithmeticTask, write_training_jsonl
from divprec.rl.objective import clipped_policy_loss, group_advantages, informative_groups

# --- the objective -----------------------------------------------------------------------------


def test_group_advantages_normalise_within_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[0].tolist() == pytest.approx(
        [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5
    )
    mean, std = 0.75, math.sqrt(((3 * 0.25**2) + 0.75**2) / 3)
    assert adv[1].tolist() == pytest.approx([(r - mean) / std for r in (1, 1, 1, 0)], rel=1e-5)
    assert adv[2].tolist() == [0.0] * 4  # uniform group: zero advantage, no division by zero
    assert torch.allclose(adv.mean(dim=1), torch.zeros(3), atol=1e-6)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))


def test_dynamic_sampling_drops_uniform_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.2]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]


def test_clip_higher_surrogate_matches_a_hand_computation():
    ratios = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5], [0.5, 0.9, 1.0, 1.1, 1.5]])
    advantages = torch.tensor([[1.0] * 5, [-2.0] * 5])
    old = torch.zeros(2, 5)
    new = ratios.log().requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    out = clipped_policy_loss(new, old, advantages, mask, clip_low=0.2, clip_high=0.28)

    def token_loss(r: float, a: float) -> float:
        clipped = min(max(r, 0.8), 1.28)
        return max(-a * r, -a * clipped)

    expected = [
        token_loss(float(r), float(a))
        for rr, aa, mm in zip(ratios, advantages, mask, strict=True)
        for r, a, m in zip(rr, aa, mm, strict=True)
        if m
    ]
    assert float(out.loss) == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    # Positive advantage: the ratio is cut at 1.28 above (clip-higher), never below.
    assert token_loss(1.5, 1.0) == -1.28 and token_loss(0.5, 1.0) == -0.5
    # Negative advantage: cut at 0.8 below, never above.
    assert token_loss(0.5, -2.0) == pytest.approx(1.6) and token_loss(1.5, -2.0) == 3.0
    # Gradients vanish exactly where the clipped term is active: (A>0, r=1.5), (A<0, r=0.5).
    out.loss.backward()
    grad = new.grad
    assert grad[0, 4] == 0 and grad[1, 0] == 0 and grad[1, 4] == 0  # [1, 4] is masked
    assert (grad[0, :4] < 0).all() and (grad[1, 1:4] > 0).all()
    assert out.clip_fraction == pytest.approx(2 / 9)
    # A micro-batch of a larger batch: the token mean uses the whole batch's count.
    part = clipped_policy_loss(new, old, advantages, mask, 0.2, 0.28, num_tokens=18)
    assert float(part.loss) == pytest.approx(sum(expected) / 18, rel=1e-6)


def test_ratio_one_gives_the_policy_gradient():
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.randn(3, 1).expand(3, 4)
    out = clipped_policy_loss(logp, logp.detach(), adv, torch.ones(3, 4), 0.2, 0.28)
    out.loss.backward()
    assert torch.allclose(logp.grad, -adv / 12)  # d/dlogp of -A * exp(logp - old) at ratio 1
    assert out.ratio_mean == pytest.approx(1.0) and out.clip_fraction == 0.0


# --- runs on a tiny model ----------------------------------------------------------------------


class EvenLengthTask(ArithmeticTask):
    """Rewards completions of even length: random policies get mixed groups (updates happen)."""

    def check(self, problem, completion: str) -> bool:
        return len(completion) % 2 == 0


@pytest.fixture(scope="module")
def em(tmp_path_factory):
    from divprec.eval.model import build_eval_model
    from divprec.parallel.distributed import shutdown_distributed

    root = tmp_path_factory.mktemp("tok")
    path = train_tokenizer([write_training_jsonl(root / "a.jsonl", 400)], root / "tok", 320)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_eval_model(compose_config(TOY_MODEL), Tokenizer.from_file(path))
    shutdown_distributed()
    torch.set_num_threads(threads)


SMALL = dict(
    prompts_per_step=3,
    samples_per_prompt=4,
    max_new_tokens=12,
    eval_problems=4,
    eval_samples=4,
    pass_ks=(1, 2, 4),
    micro_batch_size=5,
)


def test_behaviour_logprobs_match_the_update_forward(em):
    from divprec.eval.sampling import sample
    from divprec.rl.grpo import _policy_batch, _token_logprobs

    prompts = [p.prompt for p in ArithmeticTask().generate(3)]
    samples = sample(em, prompts, 2, max_new_tokens=10, return_details=True)
    rollouts = [s for row in samples for s in row]
    batch = _policy_batch(rollouts, [0.5] * len(rollouts), em.tokenizer.eod_id)
    with torch.no_grad():
        logprobs = _token_logprobs(em, batch["tokens"], temperature=1.0)  # [B, S - 1]
    mask = batch["mask"].bool()
    assert int(mask.sum()) == sum(len(s.token_ids) for s in rollouts)
    assert torch.allclose(logprobs[mask], batch["old_logprobs"][mask], atol=1e-4)
    assert (batch["advantages"][mask] == 0.5).all() and (batch["advantages"][~mask] == 0).all()


def test_grpo_run_logs_and_updates(em):
    from divprec.rl.grpo import GRPOConfig, run_grpo

    before = {n: p.detach().clone() for n, p in em.model.named_parameters()}
    seen = []
    cfg = GRPOConfig(steps=2, eval_every=1, update_epochs=2, lr=1e-3, **SMALL)
    logs = run_grpo(em, EvenLengthTask(), cfg, on_step=seen.append)
    assert seen == logs and [e["step"] for e in logs] == [0, 1, 2]
    eval_keys = {"pass@1", "pass@2", "pass@4", "eval_accuracy", "eval_majority"}
    eval_keys |= {"eval_entropy", "eval_response_length", "eval_samples", "eval_correct_counts"}
    train_keys = {"reward_mean", "accuracy", "entropy", "response_length", "kept_groups"}
    train_keys |= {"loss", "clip_fraction", "ratio_mean", "grad_norm", "time_s"}
    assert set(logs[0]) == {"step"} | eval_keys
    for entry in logs[1:]:
        assert set(entry) == {"step"} | train_keys | eval_keys
        counts = entry.pop("eval_correct_counts")
        assert len(counts) == cfg.eval_problems and all(0 <= c <= cfg.eval_samples for c in counts)
        assert entry["pass@1"] == pytest.approx(sum(counts) / (len(counts) * cfg.eval_samples))
        assert all(math.isfinite(v) for v in entry.values())
        assert 0 <= entry["kept_groups"] <= 3
        assert entry["pass@1"] <= entry["pass@2"] <= entry["pass@4"]
    assert any(e["kept_groups"] > 0 for e in logs[1:])
    changed = any(not torch.equal(p, before[n]) for n, p in em.model.named_parameters())
    assert changed
    assert not em.model.training


def test_uniform_rewards_skip_the_update(em):
    from divprec.rl.grpo import GRPOConfig, run_grpo

    class NeverRight(ArithmeticTask):
        def check(self, problem, completion: str) -> bool:
            return False

    before = {n: p.detach().clone() for n, p in em.model.named_parameters()}
    logs = run_grpo(em, NeverRight(), GRPOConfig(steps=1, eval_every=0, **SMALL))
    assert len(logs) == 1 and logs[0]["kept_groups"] == 0 and logs[0]["loss"] == 0.0
    assert "pass@1" not in logs[0]
    assert all(torch.equal(p, before[n]) for n, p in em.model.named_parameters())
