"""A study over several seeds: one per-seed study directory each, and one aggregated report.

Layout of a multi-seed report directory::

    seeds.json                   the config (without its seed) and its fingerprint
    data/                        the prepared blend, shared by every seed (it has no seed)
    seed-<n>/                    a one-seed study (divprec.study.runner), resumable
    report.json                  the paired statistics over seeds (divprec.study.aggregate)
    results.md, plots/*.png      its tables and figures

Every seed's study runs with the same config except ``seed``; its stages are skipped when done,
so rerunning the same command continues where it stopped. The aggregated files are rebuilt at
the end of every invocation from the per-seed report.json files.

Both cores: with ``side_by_side`` (the default) the seeds run two at a time, each study in its
own thread with one torch thread per process, so two independent stages (one of each seed)
always run at once; an odd seed left over runs alone with torch's default threads. Measured
faster than one stage at a time with two threads (docs/study.md, both cores).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from divprec.study.aggregate import INTERVAL, aggregate
from divprec.study.config import StudyConfig
from divprec.study.data import prepare_data
from divprec.study.report import REPORT, RESULTS, _environment, _fmt, _table
from divprec.study.runner import STUDY_FILE, StudyDirError, _children_cpu, run_study

# Keys of the aggregated report.json (docs/study.md documents them; tests check them).
SEEDS_REPORT_KEYS = (
    "study",
    "seeds",
    "interval",
    "claims",
    "differences",
    "settings",
    "standard_errors",
    "curves",
    "timings",
    "plots",
    "environment",
)


SEEDS_FILE = "seeds.json"
INVOCATIONS_FILE = "invocations.json"  # elapsed wall and CPU seconds of every invocation


def seed_dir(report_dir: Path, seed: int) -> Path:
    return report_dir / f"seed-{seed}"


def check_seeds_dir(report_dir: Path, cfg: StudyConfig) -> None:
    """Record ``cfg`` (its seed aside) in ``report_dir``/seeds.json, or check that the recorded
    one matches: the seeds share the data, so they must share everything but the seed."""
    path = report_dir / SEEDS_FILE
    fingerprint = replace(cfg, seed=0).fingerprint()
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("fingerprint") != fingerprint:
            raise StudyDirError(
                f"{report_dir} holds a multi-seed study with another configuration "
                f"(fingerprint {recorded.get('fingerprint')} != {fingerprint}): choose another "
                "report directory or delete it"
            )
        return
    report_dir.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in cfg.to_dict().items() if k != "seed"}
    path.write_text(json.dumps({"fingerprint": fingerprint, "config": record}, default=list))


def run_seeds(
    cfg: StudyConfig,
    seeds: list[int],
    report_dir: str | Path,
    *,
    progress: bool = True,
    plots: bool = True,
    side_by_side: bool = True,
) -> dict:
    """Run (or continue) the study ``cfg`` once per seed under ``report_dir``/seed-<n>/, then
    write the aggregated report.json, results.md and plots; returns the aggregated report.
    ``side_by_side``: two seeds at a time, one torch thread per stage process."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    top = Path(report_dir).expanduser().resolve()
    if (top / STUDY_FILE).is_file():
        raise StudyDirError(
            f"{top} holds a one-seed study ({STUDY_FILE}): give --seeds another report directory"
        )
    check_seeds_dir(top, cfg)
    start, cpu = time.perf_counter(), _children_cpu()
    prepare_data(top / "data", cfg.data)  # once, before the seeds that share it (kept if done)

    def one(seed: int, threads: int | None, position: int | None) -> dict:
        return run_study(
            replace(cfg, seed=seed, torch_threads=threads),
            seed_dir(top, seed),
            progress=progress,
            plots=plots,
            data_dir=top / "data",
            bar_position=position,
        )

    reports: dict[str, dict] = {}
    group = 2 if side_by_side else 1
    for i in range(0, len(seeds), group):
        batch = seeds[i : i + group]
        if len(batch) == 1:
            reports[str(batch[0])] = one(batch[0], cfg.torch_threads, None)
            continue
        with ThreadPoolExecutor(len(batch)) as pool:
            futures = [pool.submit(one, s, 1, j) for j, s in enumerate(batch)]
            for s, future in zip(batch, futures, strict=True):
                reports[str(s)] = future.result()
    reports = {str(s): reports[str(s)] for s in seeds}
    elapsed = time.perf_counter() - start
    ran = any(r["timings"]["stages_run_this_invocation"] for r in reports.values())
    _record_invocation(top, elapsed, _children_cpu() - cpu, ran)
    return build_seeds_report(cfg, reports, top, invocation_seconds=elapsed, plots=plots)


def _record_invocation(report_dir: Path, wall_s: float, cpu_s: float, ran: bool) -> None:
    """Append this invocation's elapsed wall and CPU seconds (if it ran any stage): with seeds
    side by side the per-stage times overlap, these do not."""
    path = report_dir / INVOCATIONS_FILE
    record = json.loads(path.read_text()) if path.is_file() else []
    if ran:
        record.append({"wall_s": round(wall_s, 2), "cpu_s": round(cpu_s, 2), "time": time.time()})
        path.write_text(json.dumps(record, indent=1) + "\n")


def _invocations(report_dir: Path) -> list[dict]:
    path = report_dir / INVOCATIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def build_seeds_report(
    cfg: StudyConfig,
    reports: dict[str, dict],
    report_dir: Path,
    *,
    invocation_seconds: float | None = None,
    plots: bool = True,
) -> dict:
    """The aggregated report of the per-seed ``reports`` (``{seed: report}``), written to
    ``report_dir``/report.json with results.md and the plots."""
    # Pass@8's standard error, or at the largest k both evaluations measure (smoke runs).
    agg = aggregate(reports, se_k=min(8, cfg.eval.samples, cfg.rl.eval_samples))
    study = {k: v for k, v in cfg.to_dict().items() if k != "seed"}
    seeds = {
        seed: {
            "report": str(seed_dir(report_dir, int(seed)) / REPORT),
            "wall_s": r["timings"]["total_wall_s"],
            "cpu_s": r["timings"]["total_cpu_s"],
            "stages_run_this_invocation": r["timings"]["stages_run_this_invocation"],
        }
        for seed, r in reports.items()
    }
    report = {
        "study": {**study, "seeds": [int(s) for s in reports], "report_dir": str(report_dir)},
        "seeds": seeds,
        **{k: agg[k] for k in ("interval", "claims", "differences", "settings")},
        "standard_errors": agg["standard_errors"],
        "curves": agg["curves"],
        "timings": {
            # Elapsed over the invocations that ran stages (seeds side by side overlap).
            "total_wall_s": sum(i["wall_s"] for i in _invocations(report_dir)),
            "total_cpu_s": sum(i["cpu_s"] for i in _invocations(report_dir)),
            "stage_wall_s": sum(s["wall_s"] for s in seeds.values()),
            "this_invocation_seconds": invocation_seconds,
        },
        "plots": [],
        "environment": _environment(),
    }
    if plots:
        try:
            from divprec.study.plots import draw_seeds
        except ImportError as err:  # matplotlib is the optional `study` extra
            report["plots_error"] = f"{err}: pip install 'divprec[study]' for the plots"
        else:
            report["plots"] = [
                str(p.relative_to(report_dir)) for p in draw_seeds(report, report_dir / "plots")
            ]
    tmp = report_dir / (REPORT + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=list) + "\n")
    tmp.replace(report_dir / REPORT)
    (report_dir / RESULTS).write_text(seeds_markdown(report))
    return report


def _interval(entry: dict, digits: int = 3) -> str:
    if entry.get("low") is None:
        return "-"
    return f"[{_fmt(entry['low'], digits)}, {_fmt(entry['high'], digits)}]"


def _digits(metric: str) -> int:
    return 4 if "tail_mass" in metric else 3


def seeds_markdown(report: dict) -> str:
    """Markdown of an aggregated report: claims with verdicts, every paired difference, the
    per-setting means, the standard errors of Pass@8 and the time."""
    seeds = report["study"]["seeds"]
    out = [
        f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)}). Intervals: {INTERVAL}.\n",
        "Claims (holds: the interval excludes zero in the paper's direction; contradicted: it "
        "excludes zero the other way; not decided: it contains zero; perplexity: the relative "
        "difference a / b - 1 within +-5%):\n",
    ]
    rows = [
        [
            name,
            f"{c['a']} vs {c['b']}",
            c["paper"],
            _fmt(c["mean"], _digits(c["metric"])),
            _interval(c, _digits(c["metric"])),
            c["verdict"],
        ]
        for name, c in report["claims"].items()
    ]
    out.append(
        _table(["claim", "difference", "paper", "mean", "95% interval", "verdict"], rows) + "\n"
    )
    for pair, metrics in report["differences"].items():
        rows = [
            [m, _fmt(d["mean"], _digits(m)), _interval(d, _digits(m)), str(d["n"])]
            for m, d in metrics.items()
        ]
        out.append(f"Paired differences {pair.replace('-', ' - ')}:\n")
        out.append(_table(["metric", "mean", "95% interval", "seeds"], rows) + "\n")
    metrics = sorted({m for s in report["settings"].values() for m in s})
    rows = [
        [m]
        + [
            f"{_fmt(s[m]['mean'], _digits(m))} {_interval(s[m], _digits(m))}" if m in s else "-"
            for s in report["settings"].values()
        ]
        for m in metrics
    ]
    out.append("Per setting, seed mean [95% interval]:\n")
    out.append(_table(["metric", *report["settings"]], rows) + "\n")
    se = report["standard_errors"]
    rows = []
    for seed, by_setting in se["per_seed"].items():
        for setting, row in by_setting.items():
            rows.append([seed, setting, _fmt(row.get("pretrain")), _fmt(row.get("rl"))])
    out.append(
        f"Standard error of one setting's Pass@{se['k']} over problems (per-problem sd / "
        f"sqrt(problems)); largest: {_fmt(se['max'])}:\n"
    )
    out.append(_table(["seed", "setting", "after pre-training", "after RL"], rows) + "\n")
    t = report["timings"]
    per_seed = ", ".join(f"{s}: {_fmt(v['wall_s'], 0)} s" for s, v in report["seeds"].items())
    out.append(
        f"Time: {_fmt(t['total_wall_s'], 0)} s elapsed, {_fmt(t['total_cpu_s'], 0)} s CPU "
        f"over the invocations that ran stages; the stages' own wall time per seed: {per_seed} "
        "(seeds side by side overlap).\n"
    )
    return "\n".join(out)


def verdicts(report: dict) -> dict[str, str]:
    """Claim name -> verdict of an aggregated report."""
    return {name: c["verdict"] for name, c in report["claims"].items()}
