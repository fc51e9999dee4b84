"""The multi-seed statistics (divprec.study.aggregate) against hand computations on a small
fixed table of three seeds: the t quantile, paired differences, t-intervals, the three verdicts,
the perplexity equivalence claim, the one-seed case and the Pass@k standard error."""

from __future__ import annotations

import math

import pytest

from divprec.study.aggregate import (
    ONE_SEED,
    aggregate,
    pass_at_k_standard_error,
    t_interval,
    t_quantile,
)


@pytest.mark.parametrize(
    "df, value",  # two-sided 95% critical values of Student's t (standard tables)
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042)],
)
def test_t_quantile_matches_the_table(df, value) -> None:
    assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)


def test_t_quantile_other_levels() -> None:
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4)
    assert t_quantile(0.995, 9) == pytest.approx(3.250, abs=5e-4)


# Three seeds x four settings. Held-out mixture entropy / tail mass / perplexity, Pass@k after
# pre-training and before / after RL.
TABLE = {
    "ce": {
        "entropy": [2.00, 2.10, 2.20],
        "tail": [0.100, 0.110, 0.120],
        "ppl": [6.0, 6.2, 6.4],
        "rl_first": [0.30, 0.40, 0.35],
        "rl_last": [0.40, 0.50, 0.45],
    },
    "precision": {  # entropy - ce: -0.10, -0.20, -0.15 (holds)
        "entropy": [1.90, 1.90, 2.05],
        "tail": [0.098, 0.111, 0.119],
        "ppl": [6.06, 6.2, 6.336],  # / ce - 1: +1%, 0%, -1%  (within 5%: holds)
        "rl_first": [0.30, 0.40, 0.35],
        "rl_last": [0.50, 0.70, 0.60],  # - ce: 0.10, 0.20, 0.15 (holds); gain - ce the same
    },
    "diversity": {  # entropy - ce: -0.05, -0.25, +0.10 (not decided)
        "entropy": [1.95, 1.85, 2.30],
        "tail": [0.101, 0.112, 0.121],
        "ppl": [7.2, 7.44, 7.68],  # / ce - 1: +20% every seed (contradicted)
        "rl_first": [0.30, 0.40, 0.35],
        "rl_last": [0.45, 0.45, 0.50],
    },
    "tail_penalty": {  # tail mass - ce: +0.010, +0.020, +0.015 (contradicted)
        "entropy": [2.0, 2.1, 2.2],
        "tail": [0.110, 0.130, 0.135],
        "ppl": [6.0, 6.2, 6.4],
        "rl_first": [0.30, 0.40, 0.35],
        "rl_last": [0.40, 0.50, 0.45],
    },
}
SEEDS = ("1", "2", "3")


def _report(i: int) -> dict:
    settings = {}
    for s, v in TABLE.items():
        settings[s] = {
            "eval": {
                "heldout": {
                    "mixture": {
                        "entropy": v["entropy"][i],
                        "tail_mass": v["tail"][i],
                        "perplexity": v["ppl"][i],
                    }
                },
                "pass_at_k": {"1": v["rl_first"][i] / 2, "2": v["rl_first"][i]},
                "n": 2,
                "correct_counts": [0, 2, 1],
            },
            "rl": {
                "first_eval": {"step": 0, "pass_at_k": {1: 0.1, 8: v["rl_first"][i]}},
                "last_eval": {"step": 4, "pass_at_k": {1: 0.2, 8: v["rl_last"][i]}},
                "history": [
                    {"step": 0, "pass@8": v["rl_first"][i]},
                    {"step": 1, "reward_mean": 0.1 * (i + 1), "entropy": 0.3, "response_length": 9},
                    {
                        "step": 4,
                        "reward_mean": 0.2 * (i + 1),
                        "entropy": 0.2,
                        "response_length": 8,
                        "pass@8": v["rl_last"][i],
                        "eval_samples": 8,
                        "eval_correct_counts": [0, 8, 4, 1],
                    },
                ],
            },
        }
    return {"settings": settings}


T2 = 4.302653  # t(0.975, 2)


def test_intervals_and_the_three_verdicts() -> None:
    agg = aggregate({seed: _report(i) for i, seed in enumerate(SEEDS)})
    claims = agg["claims"]

    # precision - ce, entropy: -0.10, -0.20, -0.15; mean -0.15, sd 0.05,
    # half-width 4.302653 * 0.05 / sqrt(3) = 0.124207.
    c = claims["precision_lowers_entropy/mixture"]
    assert c["per_seed"] == pytest.approx({"1": -0.10, "2": -0.20, "3": -0.15})
    assert c["mean"] == pytest.approx(-0.15)
    assert (c["low"], c["high"]) == pytest.approx((-0.274207, -0.025793), abs=1e-6)
    assert c["verdict"] == "holds"

    # tail_penalty - ce, tail mass: +0.010, +0.020, +0.015; the paper says lower.
    c = claims["tail_penalty_lowers_tail_mass/mixture"]
    assert c["mean"] == pytest.approx(0.015)
    assert (c["low"], c["high"]) == pytest.approx((0.015 - 0.0124207, 0.015 + 0.0124207), abs=1e-6)
    assert c["verdict"] == "contradicted"

    # diversity - ce, entropy: -0.05, -0.25, +0.10; mean -0.066667, sd 0.175594,
    # half-width 4.302653 * 0.175594 / sqrt(3) = 0.436198: the interval holds zero.
    c = claims["diversity_raises_entropy/mixture"]
    assert c["mean"] == pytest.approx(-0.2 / 3)
    assert (c["low"], c["high"]) == pytest.approx((-0.502865, 0.369532), abs=1e-5)
    assert c["verdict"] == "not decided"

    # Perplexity, relative: precision / ce - 1 = +1%, 0, -1% -> [-2.48%, +2.48%] within 5%;
    # diversity / ce - 1 = +20% in every seed (sd 0) -> wholly outside the band.
    c = claims["perplexity_about_equal/precision-ce/mixture"]
    assert c["mean"] == pytest.approx(0.0, abs=1e-12)
    assert c["high"] == pytest.approx(T2 * 0.01 / math.sqrt(3), abs=1e-6)
    assert c["verdict"] == "holds"
    assert claims["perplexity_about_equal/diversity-ce/mixture"]["verdict"] == "contradicted"
    # tail_penalty equals ce: relative difference 0 with sd 0, inside the band.
    assert claims["perplexity_about_equal/tail_penalty-ce/mixture"]["verdict"] == "holds"

    # RL: precision - ce after RL 0.10, 0.20, 0.15 (holds); so is the gain (same first eval).
    assert claims["rl_pass@8/precision_above_ce"]["verdict"] == "holds"
    assert claims["rl_gain_pass@8/precision_above_ce"]["mean"] == pytest.approx(0.15)
    assert claims["rl_gain_pass@8/precision_above_ce"]["verdict"] == "holds"
    # diversity - ce after RL: 0.05, -0.05, 0.05 -> not decided.
    assert claims["rl_pass@8/diversity_above_ce"]["mean"] == pytest.approx(0.05 / 3)
    assert claims["rl_pass@8/diversity_above_ce"]["verdict"] == "not decided"

    # The differences table holds every metric of every pair, e.g. pre-training pass@2.
    d = agg["differences"]["precision-diversity"]["heldout/mixture/entropy"]
    assert d["per_seed"] == pytest.approx({"1": -0.05, "2": 0.05, "3": -0.25})
    assert "pretrain/pass@2" in agg["differences"]["precision-ce"]

    # Per setting: the seed mean of ce's entropy, 2.1 +- 4.302653 * 0.1 / sqrt(3).
    e = agg["settings"]["ce"]["heldout/mixture/entropy"]
    assert (e["mean"], e["low"]) == pytest.approx((2.1, 2.1 - 0.248414), abs=1e-6)

    # Curves for the plots: RL reward at steps 1 and 4, mean over seeds (0.1, 0.2, 0.3) = 0.2.
    reward = agg["curves"]["ce"]["rl/reward_mean"]
    assert reward["x"] == [1, 4] and reward["mean"] == pytest.approx([0.2, 0.4])
    assert len(reward["per_seed"]) == 3

    # Standard errors: pre-training pass@8 needs n >= 8 (n = 2 here): only the RL one.
    se = agg["standard_errors"]["per_seed"]["1"]["ce"]
    assert "pretrain" not in se
    # RL counts 0, 8, 4, 1 of 8 -> pass@8 per problem 0, 1, 1, 1: sd 0.5, SE 0.5 / 2 = 0.25.
    assert se["rl"] == pytest.approx(0.25)
    assert agg["standard_errors"]["max"] == pytest.approx(0.25)


def test_one_seed_decides_nothing() -> None:
    agg = aggregate({"7": _report(0)})
    assert agg["claims"] and {c["verdict"] for c in agg["claims"].values()} == {ONE_SEED}
    assert agg["claims"]["precision_lowers_entropy/mixture"]["low"] is None


def test_pass_at_k_standard_error_by_hand() -> None:
    # n = 4 samples, pass@2 per problem: c=0 -> 0, c=4 -> 1, c=2 -> 1 - C(2,2)/C(4,2) = 5/6.
    # mean 11/18; sd = sqrt(((11/18)^2 + (7/18)^2 + (4/18)^2) / 2) = sqrt(93 / 324) = 0.535758;
    # SE = sd / sqrt(3) = 0.309320.
    assert pass_at_k_standard_error([0, 4, 2], 4, 2) == pytest.approx(0.309320, abs=1e-6)
    assert math.isnan(pass_at_k_standard_error([3], 4, 2))


def test_t_interval_of_one_value_has_no_bounds() -> None:
    iv = t_interval([0.3])
    assert (iv.n, iv.mean, iv.low, iv.high) == (1, 0.3, None, None)
