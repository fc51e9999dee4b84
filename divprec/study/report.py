"""report.json: every number of a study, its configs and timings, and the paper's claims checked.

The report is rebuilt from the report directory's files alone (see divprec.study.runner), so it
can be regenerated at any time (``build_report``) without rerunning anything.
"""

from __future__ import annotations

import json
import math
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

from divprec.checkpoint.layout import CONFIG_FILE

REPORT = "report.json"
RESULTS = "results.md"  # the tables of docs/study.md, generated from report.json
# Keys of report.json (docs/study.md documents them; tests check them).
REPORT_KEYS = ("study", "data", "settings", "claims", "timings", "plots", "environment")
SETTING_KEYS = ("loss", "pretrain", "eval", "rl")
_PASSK_KEY = re.compile(r"pass@(\d+)")
CURVE_KEYS = ("lm_loss", "loss", "entropy", "topk_mass", "target_rank", "grad_norm")


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as a list ordered by step; a step logged twice (a resumed run) keeps the last."""
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption
            if "step" in record:
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


def summarize_pretrain(metrics: list[dict], marker: dict | None) -> dict:
    """Final training metrics (mean over the last 10% of logged steps) and the curves."""
    tail = metrics[-max(1, len(metrics) // 10) :]
    return {
        **(marker or {}),
        "final": {k: _mean([m.get(k) for m in tail]) for k in CURVE_KEYS},
        "tokens_per_s": _mean([m.get("tokens_per_s") for m in metrics]),
        "curves": {
            "step": [m["step"] for m in metrics],
            **{k: [m.get(k) for m in metrics] for k in CURVE_KEYS},
        },
    }


def pass_at_k_of(record: dict) -> dict[int, float] | None:
    """The pass@k values of an RL history record (``pass@<k>`` keys; None at steps without an
    evaluation)."""
    out = {}
    for key, value in record.items():
        m = _PASSK_KEY.fullmatch(str(key))
        if m and isinstance(value, (int, float)):
            out[int(m.group(1))] = float(value)
    return dict(sorted(out.items())) or None


def summarize_rl(result: dict | None) -> dict | None:
    """Start / end of the RL curves and the first and last Pass@k evaluations."""
    if result is None:
        return None
    history = result.get("history", [])
    evals = [(r.get("step"), pass_at_k_of(r)) for r in history if pass_at_k_of(r)]
    steps = [r for r in history if "reward_mean" in r]  # not the step-0 evaluation
    window = max(1, min(5, len(steps) // 4))

    def ends(key: str) -> dict[str, float]:
        values = [r.get(key) for r in steps]
        return {"start": _mean(values[:window]), "end": _mean(values[-window:])}

    def ends_of_evals(key: str) -> dict[str, float] | None:
        values = [r[key] for r in history if key in r]
        return {"start": values[0], "end": values[-1]} if values else None

    return {
        "seconds": result.get("seconds"),
        "steps": len(steps),
        "reward_mean": ends("reward_mean"),
        "accuracy": ends("accuracy"),
        "entropy": ends("entropy"),
        "response_length": ends("response_length"),
        "eval_entropy": ends_of_evals("eval_entropy"),
        "eval_response_length": ends_of_evals("eval_response_length"),
        "first_eval": {"step": evals[0][0], "pass_at_k": evals[0][1]} if evals else None,
        "last_eval": {"step": evals[-1][0], "pass_at_k": evals[-1][1]} if evals else None,
        "history": history,
    }


def _loss_of(run_dir: Path) -> dict | None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path).loss)


def _order(values: dict[str, float], names: list[str]) -> bool | None:
    """Whether values[names[0]] > values[names[1]] > ... (None when one is missing)."""
    if any(n not in values or not math.isfinite(values[n]) for n in names):
        return None
    return all(values[a] > values[b] for a, b in zip(names, names[1:], strict=False))


def check_claims(settings: dict[str, dict]) -> dict:
    """The paper's claims, measured: entropy order, tail mass, perplexity spread, RL effect.

    Each entry holds the per-setting values it compares and ``holds`` (True / False, None when a
    needed setting was not run).
    """
    claims: dict[str, Any] = {}
    evals = {s: v["eval"] for s, v in settings.items() if v.get("eval")}
    sources = sorted({src for e in evals.values() for src in e.get("heldout", {})})
    for src in sources:
        stat = {
            s: {k: e["heldout"][src][k] for k in ("entropy", "tail_mass", "perplexity")}
            for s, e in evals.items()
            if src in e.get("heldout", {})
        }
        entropy = {s: v["entropy"] for s, v in stat.items()}
        tail = {s: v["tail_mass"] for s, v in stat.items()}
        ppl = {s: v["perplexity"] for s, v in stat.items()}
        claims[f"entropy_diversity_gt_ce_gt_precision/{src}"] = {
            "entropy": entropy,
            "holds": _order(entropy, ["diversity", "ce", "precision"]),
        }
        claims[f"tail_penalty_less_tail_mass_than_ce/{src}"] = {
            "tail_mass": tail,
            "holds": _order(tail, ["ce", "tail_penalty"]),
        }
        if len(ppl) >= 2:
            low, high = min(ppl.values()), max(ppl.values())
            claims[f"perplexity_about_equal/{src}"] = {
                "perplexity": ppl,
                "relative_spread": high / low - 1.0,
                "holds": high / low - 1.0 < 0.05,  # within 5% of each other
            }
    passk = {s: e["pass_at_k"] for s, e in evals.items() if e.get("pass_at_k")}
    if passk:
        kmax = max(int(k) for p in passk.values() for k in p)
        claims["pretrain_pass_at_k"] = {
            "k": kmax,
            "pass_at_1": {s: float(p.get(1, p.get("1", float("nan")))) for s, p in passk.items()},
            f"pass_at_{kmax}": {s: float(p.get(kmax, p.get(str(kmax)))) for s, p in passk.items()},
        }
    rl = {s: v["rl"] for s, v in settings.items() if v.get("rl") and v["rl"].get("last_eval")}
    if rl:
        last = {s: r["last_eval"]["pass_at_k"] for s, r in rl.items()}
        kmax = max(k for p in last.values() for k in p)
        final = {s: p[kmax] for s, p in last.items() if kmax in p}
        first = {s: r["first_eval"]["pass_at_k"] for s, r in rl.items()}
        reward = {s: r["reward_mean"]["end"] for s, r in rl.items()}
        claims["rl_precision_prior_helps"] = {
            "k": kmax,
            f"pass_at_{kmax}_after_rl": final,
            f"pass_at_{kmax}_gain": {s: final[s] - first[s].get(kmax, math.nan) for s in final},
            "pass_at_1_after_rl": {s: p.get(1) for s, p in last.items()},
            "reward_end": reward,
            "holds": _order(final, ["precision", "ce"]),
        }
        # The paper: a diverse prior (high beta) collapses entropy early in RL, shorter answers.
        claims["rl_entropy_and_length"] = {
            "entropy": {s: r["entropy"] for s, r in rl.items()},
            "response_length": {s: r["response_length"] for s, r in rl.items()},
        }
    return claims


def _environment() -> dict:
    import os

    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "load_average_at_report": load,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def build_report(study, *, ran_stages=(), invocation_seconds=None, plots: bool = True) -> dict:
    """Collect everything under ``study.dir`` for ``study.cfg.settings`` into report.json and
    draw the plots (unless ``plots`` is false or matplotlib is missing)."""
    cfg = study.cfg
    data = _read(study.data_meta_path)
    settings: dict[str, dict] = {}
    timings: dict[str, Any] = {"data": data.get("build_seconds") if data else None}
    for s in cfg.settings:
        marker = _read(study.pretrain_marker(s))
        ev = _read(study.eval_path(s))
        if ev is not None:
            ev["pass_at_k"] = {int(k): v for k, v in ev.get("pass_at_k", {}).items()}
        rl = summarize_rl(_read(study.rl_path(s)))
        settings[s] = {
            "loss": _loss_of(study.run_dir(s)),
            "pretrain": summarize_pretrain(
                read_metrics(study.run_dir(s) / "metrics.jsonl"), marker
            ),
            "eval": ev,
            "rl": rl,
        }
        timings[f"pretrain/{s}"] = marker.get("seconds") if marker else None
        timings[f"eval/{s}"] = ev.get("seconds") if ev else None
        timings[f"rl/{s}"] = rl.get("seconds") if rl else None
    timings["total_seconds"] = sum(v for v in timings.values() if isinstance(v, (int, float)))
    clocks = _read(study.dir / "timings.json") or {}
    timings["stages"] = clocks  # wall_s, cpu_s (the stage's processes), load averages
    timings["total_wall_s"] = sum(c["wall_s"] for c in clocks.values())
    timings["total_cpu_s"] = sum(c["cpu_s"] for c in clocks.values())
    timings["this_invocation_seconds"] = invocation_seconds
    timings["stages_run_this_invocation"] = list(ran_stages)
    report = {
        "study": {**cfg.to_dict(), "fingerprint": cfg.fingerprint(), "report_dir": str(study.dir)},
        "data": data,
        "settings": settings,
        "claims": check_claims(settings),
        "timings": timings,
        "plots": [],
        "environment": _environment(),
    }
    if plots:
        try:
            from divprec.study.plots import draw_all
        except ImportError as err:  # matplotlib is the optional `study` extra
            report["plots_error"] = f"{err}: pip install 'divprec[study]' for the plots"
        else:
            report["plots"] = [
                str(p.relative_to(study.dir)) for p in draw_all(report, study.dir / "plots")
            ]
    tmp = study.dir / (REPORT + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=list) + "\n")
    tmp.replace(study.dir / REPORT)
    (study.dir / RESULTS).write_text(results_markdown(report))
    return report


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(report: dict) -> str:
    """Markdown tables of a report: held-out statistics, Pass@k, the RL probe, the claims."""
    settings = report["settings"]
    out = []
    for src in ("mixture", "code", "arith"):
        rows = []
        for s, entry in settings.items():
            stats = ((entry.get("eval") or {}).get("heldout") or {}).get(src)
            if stats:
                rows.append(
                    [
                        s,
                        _fmt(stats.get("perplexity")),
                        _fmt(stats.get("entropy")),
                        _fmt(stats.get("topk_mass"), 4),
                        _fmt(stats.get("tail_mass"), 4),
                        _fmt(stats.get("target_rank"), 2),
                        _fmt(stats.get("top1_accuracy")),
                    ]
                )
        if rows:
            out.append(f"Held-out tokens, {src}:\n")
            out.append(
                _table(
                    [
                        "setting",
                        "perplexity",
                        "entropy",
                        "top-100 mass",
                        "tail mass",
                        "target rank",
                        "top-1 acc",
                    ],
                    rows,
                )
                + "\n"
            )
    rows = []
    for s, entry in settings.items():
        ev, rl = entry.get("eval") or {}, entry.get("rl") or {}
        if not ev and not rl:
            continue
        passk = ev.get("pass_at_k") or {}
        n = max(passk) if passk else None
        first = (rl.get("first_eval") or {}).get("pass_at_k") or {}
        last = (rl.get("last_eval") or {}).get("pass_at_k") or {}
        kmax = max(last) if last else None
        rows.append(
            [
                s,
                _fmt(passk.get(1)),
                _fmt(passk.get(4)),
                _fmt(passk.get(n)),
                _fmt(ev.get("greedy_accuracy")),
                f"{_fmt(first.get(1))} -> {_fmt(last.get(1))}",
                f"{_fmt(first.get(kmax))} -> {_fmt(last.get(kmax))}",
                f"{_fmt((rl.get('reward_mean') or {}).get('start'))} -> {_fmt((rl.get('reward_mean') or {}).get('end'))}",
                f"{_fmt((rl.get('entropy') or {}).get('start'))} -> {_fmt((rl.get('entropy') or {}).get('end'))}",
                f"{_fmt((rl.get('response_length') or {}).get('start'), 1)} -> {_fmt((rl.get('response_length') or {}).get('end'), 1)}",
            ]
        )
    n_label = max(
        (
            max(e["eval"]["pass_at_k"])
            for e in settings.values()
            if (e.get("eval") or {}).get("pass_at_k")
        ),
        default="n",
    )
    out.append("Pass@k after pre-training, and the RL probe (start -> end):\n")
    out.append(
        _table(
            [
                "setting",
                "pass@1",
                "pass@4",
                f"pass@{n_label}",
                "greedy",
                "RL pass@1",
                "RL pass@8",
                "RL reward",
                "RL entropy",
                "RL length",
            ],
            rows,
        )
        + "\n"
    )
    claims = [[name, _fmt(c.get("holds"))] for name, c in report["claims"].items() if "holds" in c]
    out.append("Claims:\n")
    out.append(_table(["claim", "holds"], claims) + "\n")
    t = report["timings"]
    out.append(
        f"Time: {_fmt(t.get('total_wall_s'), 0)} s wall, {_fmt(t.get('total_cpu_s'), 0)} s CPU "
        "over the recorded stages.\n"
    )
    return "\n".join(out)
