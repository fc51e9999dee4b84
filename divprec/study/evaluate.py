"""The measurements of one pre-trained checkpoint; each function runs in its own process
(divprec.study.isolate.run_function) and returns plain JSON-able data.

- :func:`evaluate_checkpoint`: held-out token statistics per data source (perplexity, entropy,
  top-k / tail mass, target rank) and Pass@k on eval-split arithmetic problems.
- :func:`rl_probe`: the GRPO probe (divprec.rl.grpo) from the checkpoint.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from divprec.study.config import EvalSpec
from divprec.study.data import DataSpec, make_task


def _setup(threads: int | None) -> None:
    import logging

    import torch

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def heldout_sources(blend: list[str]) -> dict[str, list[str]]:
    """The held-out sets measured: the training mixture and each of its sources alone
    (``code``: the stdlib corpus, ``arith``: the arithmetic text; by order in the blend)."""
    from divprec.data.config import parse_blend

    prefixes, _ = parse_blend(blend)
    names = ["code", "arith", *(f"source{i}" for i in range(2, len(prefixes)))]
    sources = {"mixture": list(blend)}
    sources.update({name: [prefix] for name, prefix in zip(names, prefixes, strict=False)})
    return sources


def token_stats_by_source(em, spec: EvalSpec, seed: int) -> dict[str, dict[str, float]]:
    """Held-out token statistics of every source of the checkpoint's own data config: the
    validation split's documents, which training never sees."""
    from divprec.eval.perplexity import heldout_batches, token_statistics

    base = em.config.data
    out = {}
    try:
        for name, blend in heldout_sources(list(base.blend)).items():
            em.config.data = replace(base, blend=blend)
            batches = heldout_batches(em, spec.heldout_samples, seed=seed)
            out[name] = token_statistics(em, batches, topk=spec.topk)
    finally:
        em.config.data = base
    return out


def pass_at_k_eval(em, task, spec: EvalSpec, seed: int) -> dict:
    """Pass@k (k = 1..samples) on ``spec.problems`` eval-split problems, plus greedy accuracy,
    the share of completions that state an answer, and accuracy by number of operations."""
    from divprec.eval.passk import pass_at_k_curve
    from divprec.eval.sampling import sample
    from divprec.eval.synthetic import parse_answer

    problems = task.generate(spec.problems, "eval")
    prompts = [p.prompt for p in problems]
    start = time.perf_counter()
    samples = sample(
        em,
        prompts,
        spec.samples,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        seed=seed,
        return_details=True,
    )
    sampling_seconds = time.perf_counter() - start
    correct = [
        sum(task.check(p, s.text) for s in row) for p, row in zip(problems, samples, strict=True)
    ]
    flat = [s for row in samples for s in row]
    by_steps: dict[int, list[float]] = {}
    for p, c in zip(problems, correct, strict=True):
        by_steps.setdefault(p.steps, []).append(c / spec.samples)
    result = {
        "n": spec.samples,
        "problems": len(problems),
        "pass_at_k": pass_at_k_curve(correct, spec.samples, range(1, spec.samples + 1)),
        "correct_counts": correct,
        "answered": sum(parse_answer(s.text) is not None for s in flat) / len(flat),
        "mean_completion_tokens": statistics.fmean(len(s.token_ids) for s in flat),
        "mean_sample_entropy": statistics.fmean(
            statistics.fmean(s.entropies) for s in flat if s.entropies
        ),
        "accuracy_by_steps": {k: statistics.fmean(v) for k, v in sorted(by_steps.items())},
        "sampling_seconds": sampling_seconds,
        "examples": [
            {
                "prompt": problems[i].prompt,
                "answer": problems[i].answer,
                "completions": [s.text for s in samples[i][:2]],
            }
            for i in range(min(3, len(problems)))
        ],
    }
    if spec.greedy:
        greedy = sample(
            em,
            prompts,
            1,
            temperature=0.0,
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
            seed=seed,
        )
        result["greedy_accuracy"] = statistics.fmean(
            task.check(p, row[0]) for p, row in zip(problems, greedy, strict=True)
        )
    return result


def evaluate_checkpoint(
    run_dir: str, eval_spec: dict, data_spec: dict, seed: int, threads: int | None = None
) -> dict:
    """Held-out token statistics and Pass@k of the latest checkpoint under ``run_dir``."""
    _setup(threads)
    from divprec.eval.model import load_eval_model

    start = time.perf_counter()
    spec = EvalSpec(**eval_spec)
    em = load_eval_model(run_dir)
    heldout = token_stats_by_source(em, spec, seed)
    passk = pass_at_k_eval(em, make_task(DataSpec(**data_spec)), spec, seed)
    return {
        "checkpoint_step": em.step,
        "heldout": heldout,
        **passk,
        "seconds": time.perf_counter() - start,
    }


def rl_probe(
    run_dir: str,
    rl_spec: dict,
    data_spec: dict,
    seed: int,
    progress_path: str,
    threads: int | None = None,
) -> dict:
    """Run the GRPO probe from the latest checkpoint under ``run_dir``; each step's record is
    also appended to ``progress_path`` (JSON lines) as it finishes."""
    _setup(threads)
    from divprec.eval.model import load_eval_model
    from divprec.rl.grpo import GRPOConfig, run_grpo

    start = time.perf_counter()
    probe = GRPOConfig(**{**rl_spec, "pass_ks": tuple(rl_spec["pass_ks"]), "seed": seed})
    em = load_eval_model(run_dir)
    progress = Path(progress_path)
    progress.unlink(missing_ok=True)

    def on_step(record, *_):
        with open(progress, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    history = run_grpo(em, make_task(DataSpec(**data_spec)), probe, on_step=on_step)
    return {
        "checkpoint_step": em.step,
        "history": history,
        "seconds": time.perf_counter() - start,
    }
