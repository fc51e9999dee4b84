"""The CPU study of the paper's five loss settings (docs/study.md).

    python tools/study.py --quick                       # minutes: a smoke run of every stage
    python tools/study.py --full                        # the documented study (< 1 h, 2 cores)
    python tools/study.py --full --settings ce,precision --seed 7 --report-dir runs/study-s7
    python tools/study.py --full --seeds 1234,2,3,4,5    # every seed, then paired statistics

Pre-trains the study model (experiment=study) once per loss setting on the same data and seed,
measures held-out token statistics and Pass@k, runs the GRPO probe from every checkpoint, and
writes <report-dir>/report.json and <report-dir>/plots/*.png. Rerunning with the same arguments
continues an interrupted study: finished stages are skipped.

With --seeds the study runs once per seed in <report-dir>/seed-<n>/ and <report-dir>/report.json,
results.md and plots/ hold the paired differences between settings over the seeds, their 95%
t-intervals and each claim's verdict (holds / contradicted / not decided).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from divprec.study.config import SETTINGS, full_config, quick_config
from divprec.study.isolate import StageError
from divprec.study.runner import StudyDirError, run_study
from divprec.study.seeds import run_seeds, verdicts


def _settings(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown setting(s) {unknown}: choose from {', '.join(SETTINGS)}"
        )
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"--seeds {text!r}: give distinct integers separated by commas, e.g. 1234,2,3"
        )
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes; numbers mean nothing")
    mode.add_argument("--full", action="store_true", help="the documented study (default)")
    p.add_argument("--report-dir", default=None, help="default: runs/study-<quick|full>")
    p.add_argument(
        "--settings",
        type=_settings,
        default=SETTINGS,
        help=f"comma-separated subset of {','.join(SETTINGS)} (default: all)",
    )
    seeding = p.add_mutually_exclusive_group()
    seeding.add_argument(
        "--seed", type=int, default=1234, help="model init, data order and sampling"
    )
    seeding.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        help="comma-separated seeds: the study once per seed, then paired statistics over them",
    )
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="with --seeds: one stage at a time with torch's default threads (default: two seeds "
        "side by side, one thread each)",
    )
    p.add_argument("--no-rl", action="store_true", help="skip the RL probe")
    p.add_argument("--threads", type=int, default=None, help="torch threads of eval / RL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    make = quick_config if args.quick else full_config
    cfg = make(
        settings=args.settings, seed=args.seed, run_rl=not args.no_rl, torch_threads=args.threads
    )
    suffix = "-seeds" if args.seeds else ""
    report_dir = args.report_dir or f"runs/study-{cfg.name}{suffix}"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.seeds:
            report = run_seeds(
                cfg,
                args.seeds,
                report_dir,
                progress=not args.no_progress,
                side_by_side=not args.one_at_a_time,
            )
        else:
            report = run_study(cfg, report_dir, progress=not args.no_progress)
    except (StudyDirError, StageError) as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 1
    if args.seeds:
        summary = {
            "report": f"{report_dir}/report.json",
            "results": f"{report_dir}/results.md",
            "plots": report["plots"],
            "total_wall_s": round(report["timings"]["total_wall_s"], 1),
            f"pass_at_{report['standard_errors']['k']}_standard_error_max": report[
                "standard_errors"
            ]["max"],
            "claims": verdicts(report),
        }
        print(json.dumps(summary, indent=1))
        return 0
    claims = {k: v.get("holds") for k, v in report["claims"].items() if "holds" in v}
    print(
        json.dumps(
            {
                "report": f"{report_dir}/report.json",
                "plots": report["plots"],
                "total_seconds": round(report["timings"]["total_seconds"], 1),
                "claims": claims,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
