"""Paired statistics over the seeds of a multi-seed study, and the claims' verdicts.

Within one seed every setting shares the data, the initialisation and the evaluation problems, so
settings are compared by their paired difference seed by seed (``a - b``). Over n seeds the
difference is summarised by its mean and the 95% t-interval over seeds,
``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (sd with n - 1 in the denominator).

A claim names a difference and the paper's direction. Its verdict is ``holds`` when the interval
excludes zero in that direction, ``contradicted`` when it excludes zero the other way, and
``not decided`` otherwise (``not decided (one seed)`` without an interval). Perplexity is
claimed to come out about equal: that claim is on the relative difference ``a / b - 1`` and
holds when the whole interval lies within +-5%, is contradicted when it lies wholly outside.

Pure functions of per-seed report dicts (divprec.study.report); no torch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from divprec.eval.passk import pass_at_k

PAIRS = (
    ("precision", "ce"),
    ("precision", "diversity"),
    ("tail_penalty", "ce"),
    ("diversity", "ce"),
)
SOURCES = ("mixture", "code", "arith")
HELDOUT_STATS = ("entropy", "tail_mass", "perplexity")
PERPLEXITY_BAND = 0.05  # "about equal": within 5% of each other
INTERVAL = (
    "95% t-interval over seeds of the paired difference: mean +- t(0.975, n-1) * sd / sqrt(n)"
)
HOLDS, CONTRADICTED, UNDECIDED = "holds", "contradicted", "not decided"
ONE_SEED = "not decided (one seed)"


# -- the t quantile ------------------------------------------------------------------------------


def t_within(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` (integer >= 1) degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3 / 26.7.4, with theta = atan(t / sqrt(df)))."""
    if df < 1:
        raise ValueError(f"t_within: df must be >= 1, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for j in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ...
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return (2 / math.pi) * (theta + math.sin(theta) * total)
    total, term = 0.0, 1.0
    for j in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return math.sin(theta) * total


def t_quantile(prob: float, df: int) -> float:
    """The ``prob`` quantile (0.5 < prob < 1) of Student's t with ``df`` degrees of freedom, by
    bisection on :func:`t_within` (e.g. t_quantile(0.975, 4) = 2.776)."""
    if not 0.5 < prob < 1:
        raise ValueError(f"t_quantile: prob must lie in (0.5, 1), got {prob}")
    target = 2 * prob - 1  # P(|T| < t)
    low, high = 0.0, 1.0
    while t_within(high, df) < target:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_within(mid, df) < target:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return (low + high) / 2


# -- intervals and verdicts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its 95% t-interval (low / high None for one value)."""

    n: int
    mean: float
    low: float | None
    high: float | None

    def as_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "low": self.low, "high": self.high}


def t_interval(values: list[float], level: float = 0.95) -> Interval:
    """Mean and two-sided ``level`` t-interval of ``values`` (independent draws, e.g. seeds)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("t_interval: no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(1, mean, None, None)
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return Interval(len(values), mean, mean - half, mean + half)


def verdict(interval: Interval, direction: int) -> str:
    """``direction`` +1: the paper says the difference is positive, -1: negative."""
    if interval.low is None:
        return ONE_SEED
    if direction * interval.low > 0 and direction * interval.high > 0:
        return HOLDS
    if direction * interval.low < 0 and direction * interval.high < 0:
        return CONTRADICTED
    return UNDECIDED


def equivalence_verdict(interval: Interval, band: float = PERPLEXITY_BAND) -> str:
    """For a relative difference claimed to be about zero: holds inside +-band, contradicted
    wholly outside it."""
    if interval.low is None:
        return ONE_SEED
    if -band < interval.low and interval.high < band:
        return HOLDS
    if interval.low > band or interval.high < -band:
        return CONTRADICTED
    return UNDECIDED


# -- the metrics of one seed ---------------------------------------------------------------------


def _int_keys(mapping: dict | None) -> dict[int, float]:
    return {int(k): float(v) for k, v in (mapping or {}).items()}


def seed_metrics(report: dict) -> dict[str, dict[str, float]]:
    """Per setting of one seed's report: ``heldout/<source>/<stat>``, ``pretrain/pass@<k>`` (k a
    power of two),
    ``rl/pass@<k>`` (the last RL evaluation) and ``rl_gain/pass@<k>`` (last - first)."""
    out: dict[str, dict[str, float]] = {}
    for setting, entry in report["settings"].items():
        metrics: dict[str, float] = {}
        ev = entry.get("eval") or {}
        for src, stats in (ev.get("heldout") or {}).items():
            for stat in HELDOUT_STATS:
                if stat in stats:
                    metrics[f"heldout/{src}/{stat}"] = float(stats[stat])
        for k, v in _int_keys(ev.get("pass_at_k")).items():
            if k & (k - 1) == 0:  # k = 1, 2, 4, 8, 16: the curve's shape without 16 rows
                metrics[f"pretrain/pass@{k}"] = v
        rl = entry.get("rl") or {}
        if rl.get("last_eval"):
            first = _int_keys(rl["first_eval"]["pass_at_k"])
            for k, v in _int_keys(rl["last_eval"]["pass_at_k"]).items():
                metrics[f"rl/pass@{k}"] = v
                if k in first:
                    metrics[f"rl_gain/pass@{k}"] = v - first[k]
        out[setting] = metrics
    return out


def pass_at_k_standard_error(correct_counts: list[int], n: int, k: int) -> float:
    """Standard error of a Pass@k over problems: the sd of the per-problem unbiased estimates
    over sqrt(problems). It covers both which problems were drawn and which samples."""
    values = [pass_at_k(n, int(c), k) for c in correct_counts]
    if len(values) < 2:
        return math.nan
    return statistics.stdev(values) / math.sqrt(len(values))


def standard_errors(report: dict, k: int = 8) -> dict[str, dict[str, float]]:
    """Per setting of one seed: the SE of Pass@k after pre-training (``pretrain``) and at the
    last RL evaluation (``rl``), where the per-problem counts were recorded and n >= k."""
    out: dict[str, dict[str, float]] = {}
    for setting, entry in report["settings"].items():
        ses: dict[str, float] = {}
        ev = entry.get("eval") or {}
        if ev.get("correct_counts") and ev.get("n", 0) >= k:
            ses["pretrain"] = pass_at_k_standard_error(ev["correct_counts"], ev["n"], k)
        history = (entry.get("rl") or {}).get("history") or []
        last = next((r for r in reversed(history) if "eval_correct_counts" in r), None)
        if last and last.get("eval_samples", 0) >= k:
            ses["rl"] = pass_at_k_standard_error(
                last["eval_correct_counts"], last["eval_samples"], k
            )
        out[setting] = ses
    return out


# -- over seeds ----------------------------------------------------------------------------------


def _claims_spec(ks_rl: list[int]) -> list[tuple[str, str, str, str, int | None]]:
    """(name, a, b, metric, direction); direction None: the perplexity equivalence claim."""
    spec = []
    for src in SOURCES:
        entropy, tail, ppl = (f"heldout/{src}/{s}" for s in HELDOUT_STATS)
        spec += [
            (f"precision_lowers_entropy/{src}", "precision", "ce", entropy, -1),
            (f"diversity_raises_entropy/{src}", "diversity", "ce", entropy, +1),
            (f"entropy_precision_below_diversity/{src}", "precision", "diversity", entropy, -1),
            (f"precision_lowers_tail_mass/{src}", "precision", "ce", tail, -1),
            (f"tail_penalty_lowers_tail_mass/{src}", "tail_penalty", "ce", tail, -1),
        ]
        spec += [(f"perplexity_about_equal/{a}-{b}/{src}", a, b, ppl, None) for a, b in PAIRS]
    if ks_rl:
        k = max(ks_rl)
        # The paper's RL Pass@64: precision > tail penalty > diversity > cross-entropy.
        spec += [(f"rl_pass@{k}/{a}_above_{b}", a, b, f"rl/pass@{k}", +1) for a, b in PAIRS]
        spec.append(
            (f"rl_gain_pass@{k}/precision_above_ce", "precision", "ce", f"rl_gain/pass@{k}", +1)
        )
    return spec


def paired_differences(
    per_seed: dict[str, dict[str, dict[str, float]]],
    a: str,
    b: str,
    metric: str,
    relative: bool = False,
) -> dict[str, float]:
    """``a - b`` (or ``a / b - 1``) of ``metric`` for every seed that measured both."""
    out = {}
    for seed, table in per_seed.items():
        va, vb = table.get(a, {}).get(metric), table.get(b, {}).get(metric)
        if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
            continue
        out[seed] = va / vb - 1.0 if relative else va - vb
    return out


def aggregate(reports: dict[str, dict], se_k: int = 8) -> dict:
    """Everything the aggregated report holds, from ``{seed: per-seed report}``:

    - ``settings.<setting>.<metric>``: per-seed values, their mean and t-interval;
    - ``differences.<a>-<b>.<metric>``: per-seed paired differences, mean and t-interval;
    - ``claims.<name>``: pair, metric, direction, the difference's interval and the verdict;
    - ``standard_errors``: the per-problem SE of Pass@``se_k`` per seed and setting, and its
      largest value;
    - ``curves``: Pass@k after pre-training and before / after RL, and RL training curves, per
      setting: seed mean and t-interval at every point (for the plots).
    """
    per_seed = {seed: seed_metrics(r) for seed, r in reports.items()}
    settings = list(dict.fromkeys(s for t in per_seed.values() for s in t))  # reports' order
    setting_stats: dict[str, dict] = {}
    for s in settings:
        metrics = sorted({m for t in per_seed.values() for m in t.get(s, {})})
        setting_stats[s] = {}
        for m in metrics:
            values = {seed: t[s][m] for seed, t in per_seed.items() if m in t.get(s, {})}
            setting_stats[s][m] = {
                "per_seed": values,
                **t_interval(list(values.values())).as_dict(),
            }
    differences: dict[str, dict] = {}
    for a, b in PAIRS:
        if a not in setting_stats or b not in setting_stats:
            continue
        pair = differences.setdefault(f"{a}-{b}", {})
        for m in sorted(set(setting_stats[a]) & set(setting_stats[b])):
            diffs = paired_differences(per_seed, a, b, m)
            if diffs:
                pair[m] = {"per_seed": diffs, **t_interval(list(diffs.values())).as_dict()}
    ks_rl = sorted(
        {
            int(m.split("@")[1])
            for t in per_seed.values()
            for v in t.values()
            for m in v
            if m.startswith("rl/")
        }
    )
    claims: dict[str, dict] = {}
    for name, a, b, metric, direction in _claims_spec(ks_rl):
        diffs = paired_differences(per_seed, a, b, metric, relative=direction is None)
        if not diffs:
            continue  # a setting or a metric was not run
        interval = t_interval(list(diffs.values()))
        claims[name] = {
            "a": a,
            "b": b,
            "metric": metric,
            "difference": "a / b - 1" if direction is None else "a - b",
            "paper": f"within +-{PERPLEXITY_BAND:.0%}"
            if direction is None
            else ("a > b" if direction > 0 else "a < b"),
            "per_seed": diffs,
            **interval.as_dict(),
            "verdict": equivalence_verdict(interval)
            if direction is None
            else verdict(interval, direction),
        }
    ses = {seed: standard_errors(r, se_k) for seed, r in reports.items()}
    flat = [v for by_setting in ses.values() for row in by_setting.values() for v in row.values()]
    return {
        "seeds": list(reports),
        "interval": INTERVAL,
        "settings": setting_stats,
        "differences": differences,
        "claims": claims,
        "standard_errors": {
            "k": se_k,
            "per_seed": ses,
            "max_pretrain": max(
                (row["pretrain"] for s in ses.values() for row in s.values() if "pretrain" in row),
                default=None,
            ),
            "max_rl": max(
                (row["rl"] for s in ses.values() for row in s.values() if "rl" in row), default=None
            ),
            "max": max(flat) if flat else None,
        },
        "curves": curves(reports, settings),
    }


def _band(rows: dict[str, list[float | None]]) -> dict[str, list]:
    """Pointwise mean and t-interval over seeds of equally long per-seed lists."""
    length = min((len(v) for v in rows.values()), default=0)
    mean, low, high = [], [], []
    for i in range(length):
        values = [v[i] for v in rows.values() if v[i] is not None and math.isfinite(v[i])]
        if not values:
            mean.append(None), low.append(None), high.append(None)
            continue
        iv = t_interval(values)
        mean.append(iv.mean), low.append(iv.low), high.append(iv.high)
    return {
        "mean": mean,
        "low": low,
        "high": high,
        "per_seed": {s: v[:length] for s, v in rows.items()},
    }


def curves(reports: dict[str, dict], settings: list[str]) -> dict:
    """Per setting: ``pretrain_pass_at_k`` / ``rl_first_pass_at_k`` / ``rl_last_pass_at_k``
    (x: k) and ``rl/<key>`` for reward_mean, entropy and response_length (x: RL step), each with
    the seed mean, its t-interval and the per-seed lines."""
    out: dict[str, dict] = {}
    for s in settings:
        entries = {seed: r["settings"][s] for seed, r in reports.items() if s in r["settings"]}
        series: dict[str, dict] = {}

        def add(name: str, per_seed: dict[str, dict[int, float]], series: dict = series) -> None:
            per_seed = {seed: v for seed, v in per_seed.items() if v}
            if not per_seed:
                return
            xs = sorted(set.intersection(*(set(v) for v in per_seed.values())))
            series[name] = {
                "x": xs,
                **_band({seed: [v[x] for x in xs] for seed, v in per_seed.items()}),
            }

        add(
            "pretrain_pass_at_k",
            {
                seed: _int_keys((e.get("eval") or {}).get("pass_at_k"))
                for seed, e in entries.items()
            },
        )
        rls = {
            seed: e["rl"] for seed, e in entries.items() if e.get("rl") and e["rl"].get("last_eval")
        }
        add(
            "rl_first_pass_at_k",
            {seed: _int_keys(r["first_eval"]["pass_at_k"]) for seed, r in rls.items()},
        )
        add(
            "rl_last_pass_at_k",
            {seed: _int_keys(r["last_eval"]["pass_at_k"]) for seed, r in rls.items()},
        )
        for key in ("reward_mean", "entropy", "response_length"):
            add(
                f"rl/{key}",
                {
                    seed: {int(h["step"]): h[key] for h in r.get("history", []) if key in h}
                    for seed, r in rls.items()
                },
            )
        out[s] = series
    return out
