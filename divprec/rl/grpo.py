"""A small on-policy GRPO probe: how far RL moves a pre-trained model on a verifiable task.

The paper's RL recipe, scaled down: on-policy GRPO without a KL term, clip-higher, dynamic
sampling, token-level loss, samples at temperature 1.0; here on the synthetic arithmetic task with
a 0/1 reward, AdamW and gradient clipping 1.0, in this single process (tensor = pipeline = 1).

Each step: sample ``samples_per_prompt`` completions of ``prompts_per_step`` training problems
with the current policy (recording the behaviour log-probabilities), reward them, drop groups with
uniform rewards, normalise advantages within groups, then take ``update_epochs`` optimizer steps
on the clipped surrogate (at one epoch the ratio is 1 up to float noise, but the clipping code is
the general one). The model in ``em`` is trained in place.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from divprec.eval.model import EvalModel
from divprec.eval.passk import pass_at_k_curve
from divprec.eval.sampling import Sample, sample
from divprec.eval.synthetic import ArithmeticTask, Problem
from divprec.rl.objective import clipped_policy_loss, group_advantages, informative_groups

logger = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    """Scaled-down paper settings (paper: batch 128 prompts, 16 samples, lr 1e-6, 1000 steps)."""

    steps: int = 50
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    lr: float = 1e-5
    clip_low: float = 0.2
    clip_high: float = 0.28
    dynamic_sampling: bool = True
    eval_every: int = 10  # also evaluated before the first step and after the last
    eval_problems: int = 64
    eval_samples: int = 16
    pass_ks: tuple[int, ...] = (1, 4, 16)
    seed: int = 0
    # Beyond the brief's fields:
    update_epochs: int = 1  # optimizer steps per rollout batch (PPO epochs)
    micro_batch_size: int = 32  # sequences per forward/backward (gradients accumulate)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_temperature: float = 1.0
    eval_top_p: float = 1.0
    eval_at_start: bool = True  # a step-0 log entry with the initial policy's eval metrics
    sample_batch_size: int = 64  # sequences decoded at once

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError("GRPO needs samples_per_prompt >= 2 (advantages are within groups)")
        if any(not 1 <= k <= self.eval_samples for k in self.pass_ks):
            raise ValueError(f"pass_ks {self.pass_ks} must lie in [1, eval_samples]")
        if self.clip_low < 0 or self.clip_high < 0 or self.update_epochs < 1:
            raise ValueError("clip bounds must be >= 0 and update_epochs >= 1")


def evaluate(
    em: EvalModel, task: ArithmeticTask, problems: list[Problem], cfg: GRPOConfig
) -> dict[str, float | list[int]]:
    """pass@k (unbiased, ``eval_samples`` per problem), mean accuracy, majority-vote accuracy,
    mean token entropy and response length of the policy on ``problems``, and the correct
    count of every problem (``eval_correct_counts``, of ``eval_samples``)."""
    samples = sample(
        em,
        [p.prompt for p in problems],
        cfg.eval_samples,
        temperature=cfg.eval_temperature,
        top_p=cfg.eval_top_p,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.sample_batch_size,
        seed=cfg.seed + 7919,  # the same draws at every eval: differences come from the policy
        return_details=True,
    )
    counts, majority = [], 0
    for problem, group in zip(problems, samples, strict=True):
        counts.append(sum(task.check(problem, s.text) for s in group))
        answers = Counter(a for a in (task.extract_answer(s.text) for s in group) if a is not None)
        if answers and answers.most_common(1)[0][0] == int(problem.answer):
            majority += 1
    flat = [s for group in samples for s in group]
    out = {
        f"pass@{k}": v for k, v in pass_at_k_curve(counts, cfg.eval_samples, cfg.pass_ks).items()
    }
    out["eval_accuracy"] = sum(counts) / (len(problems) * cfg.eval_samples)
    # Per-problem counts: the standard error of a pass@k needs them (divprec.study.aggregate).
    out["eval_samples"] = cfg.eval_samples
    out["eval_correct_counts"] = counts
    out["eval_majority"] = majority / len(problems)
    out.update(_rollout_shape(flat, prefix="eval_"))
    return out


def _rollout_shape(samples: list[Sample], prefix: str = "") -> dict[str, float]:
    tokens = sum(len(s.token_ids) for s in samples)
    entropy = sum(sum(s.entropies) for s in samples) / max(tokens, 1)
    return {f"{prefix}entropy": entropy, f"{prefix}response_length": tokens / len(samples)}


def _policy_batch(
    samples: list[Sample], advantages: list[float], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``[B, S]`` inputs and ``[B, S - 1]`` per-position targets of the responses.

    Position t predicts token t + 1, so a response starting at index L is scored at positions
    L - 1 ... L + R - 2. Right padding is safe for a causal model: pads come after every token
    that is scored.
    """
    seqs = [s.prompt_ids + s.token_ids for s in samples]
    width = max(len(x) for x in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros(len(seqs), width - 1)  # [B, S - 1]
    old = torch.zeros(len(seqs), width - 1)
    adv = torch.zeros(len(seqs), width - 1)
    for i, (s, seq) in enumerate(zip(samples, seqs, strict=True)):
        tokens[i, : len(seq)] = torch.tensor(seq)
        start, end = len(s.prompt_ids) - 1, len(seq) - 1
        mask[i, start:end] = 1.0
        old[i, start:end] = torch.tensor(s.logprobs)
        adv[i, start:end] = advantages[i]
    return {"tokens": tokens, "mask": mask, "old_logprobs": old, "advantages": adv}


def _token_logprobs(em: EvalModel, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token t + 1 | tokens <= t) under the temperature-scaled policy: ``[B, S - 1]``."""
    logits = em.logits(tokens[:, :-1])  # [B, S - 1, V]
    if temperature > 0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B, S - 1]


def _update(
    em: EvalModel,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cfg: GRPOConfig,
) -> dict[str, float]:
    """``update_epochs`` optimizer steps on the clipped surrogate of one rollout batch."""
    device = em.device
    batch = {k: v.to(device) for k, v in batch.items()}
    num_tokens = float(batch["mask"].sum())
    params = [p for p in em.model.parameters() if p.requires_grad]
    # Eval mode on purpose: the policy being differentiated is the one that sampled (no
    # dropout), so at the first epoch the ratio is 1 up to float noise.
    em.model.eval()
    stats = {"loss": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.update_epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = clip_sum = ratio_sum = 0.0
        for start in range(0, batch["tokens"].shape[0], cfg.micro_batch_size):
            rows = slice(start, start + cfg.micro_batch_size)
            mask = batch["mask"][rows]
            logprobs = _token_logprobs(em, batch["tokens"][rows], cfg.temperature)
            out = clipped_policy_loss(
                logprobs,
                batch["old_logprobs"][rows],
                batch["advantages"][rows],
                mask,
                cfg.clip_low,
                cfg.clip_high,
                num_tokens=num_tokens,  # token mean over the whole batch
            )
            out.loss.backward()
            share = float(mask.sum()) / num_tokens
            loss_sum += out.loss.item()
            clip_sum += out.clip_fraction * share
            ratio_sum += out.ratio_mean * share
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        stats = {
            "loss": loss_sum,
            "clip_fraction": clip_sum,
            "ratio_mean": ratio_sum,
            "grad_norm": float(grad_norm),
        }
    return stats


def run_grpo(
    em: EvalModel,
    task: ArithmeticTask,
    cfg: GRPOConfig,
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``em.model`` in place with GRPO on ``task``; returns one log dict per step.

    Every step's entry: step, reward_mean, accuracy (share of correct rollouts; equals
    reward_mean under the 0/1 reward), entropy (mean token entropy of the rollouts),
    response_length (mean generated tokens), kept_groups (after dynamic sampling), loss,
    clip_fraction, ratio_mean, grad_norm, time_s. At eval steps (every ``eval_every`` steps and
    the last) also pass@k for k in ``pass_ks``, eval_accuracy, eval_majority, eval_entropy,
    eval_response_length on ``eval_problems`` held-out problems, after that step's update. With
    ``eval_at_start`` the list starts with a step-0 entry holding only step and the eval keys of
    the initial policy. ``on_step`` is called with each entry as it is made.
    """
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError(
            "run_grpo trains a single-process model: load the checkpoint at tensor parallel 1"
        )
    torch.manual_seed(cfg.seed)
    eval_problems = task.generate(cfg.eval_problems, "eval")
    train_problems = task.generate(cfg.steps * cfg.prompts_per_step, "train")
    random.Random(cfg.seed).shuffle(train_problems)
    params = [p for p in em.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad_id = em.tokenizer.eod_id
    logs: list[dict] = []

    def emit(entry: dict) -> None:
        logs.append(entry)
        if on_step is not None:
            on_step(entry)

    em.model.eval()
    if cfg.eval_at_start and cfg.eval_every > 0:
        emit({"step": 0, **evaluate(em, task, eval_problems, cfg)})

    for step in range(1, cfg.steps + 1):
        started = time.perf_counter()
        problems = train_problems[(step - 1) * cfg.prompts_per_step : step * cfg.prompts_per_step]
        rollouts = sample(
            em,
            [p.prompt for p in problems],
            cfg.samples_per_prompt,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.sample_batch_size,
            seed=cfg.seed * 1_000_003 + step,
            return_details=True,
        )
        rewards = torch.tensor(
            [
                [float(task.check(p, s.text)) for s in group]
                for p, group in zip(problems, rollouts, strict=True)
            ]
        )  # [P, G]
        advantages = group_advantages(rewards)  # [P, G]
        keep = torch.ones(len(problems), dtype=torch.bool)
        if cfg.dynamic_sampling:
            keep = informative_groups(rewards)  # [P]
        kept = [
            (s, float(advantages[i, j]))
            for i in keep.nonzero().flatten().tolist()
            for j, s in enumerate(rollouts[i])
        ]
        update = {"loss": 0.0, "clip_fraction": 0.0, "ratio_mean": 1.0, "grad_norm": 0.0}
        if kept:
            batch = _policy_batch([s for s, _ in kept], [a for _, a in kept], pad_id)
            update = _update(em, optimizer, batch, cfg)
        flat = [s for group in rollouts for s in group]
        entry = {
            "step": step,
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards > 0.5).float().mean()),
            **_rollout_shape(flat),
            "kept_groups": int(keep.sum()),
            **update,
        }
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            entry.update(evaluate(em, task, eval_problems, cfg))
        entry["time_s"] = time.perf_counter() - started
        if not all(math.isfinite(v) for v in entry.values() if isinstance(v, float)):
            logger.warning("non-finite GRPO metrics at step %d: %s", step, entry)
        emit(entry)
    return logs
