"""Orchestration: the study as a list of resumable stages under one progress bar.

Layout of a report directory::

    study.json                   the config and its fingerprint (a rerun must match it)
    data/                        the prepared blend (divprec.study.data), data/meta.json
                                 (a multi-seed study shares one, divprec.study.seeds)
    runs/<setting>/              a pre-training run (config.yaml, metrics.jsonl, checkpoints/,
                                 train.log); runs/<setting>/pretrain.json marks it done
    eval/<setting>.json          held-out measurements of the checkpoint
    rl/<setting>.json            the RL probe's history (rl/<setting>.progress.jsonl while running)
    logs/                        the evaluation and RL processes' output
    report.json, plots/*.png     rebuilt at the end of every invocation

A stage whose output exists is skipped, so an interrupted study continues where it stopped (an
interrupted pre-training resumes from its last checkpoint, if it saved one).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from divprec.study.config import StudyConfig
from divprec.study.data import prepare_data, prepared_from_meta
from divprec.study.isolate import run_command, run_function

logger = logging.getLogger(__name__)

STUDY_FILE = "study.json"
TIMINGS_FILE = "timings.json"  # per stage: wall and CPU seconds, load average before / after
# Hydra's compose API keeps global state: studies side by side (divprec.study.seeds) compose
# their pre-training configs one at a time.
_COMPOSE_LOCK = threading.Lock()


class StudyDirError(ValueError):
    """The report directory holds a study with a different configuration."""


@dataclass
class Stage:
    name: str
    output: Path
    run: Callable[[Callable[[dict], None]], None]  # gets a postfix callback for the bar

    def done(self) -> bool:
        return self.output.is_file()


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=list) + "\n")
    tmp.replace(path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _last_jsonl(path: Path) -> dict | None:
    """The last complete line of a JSON-lines file that is being appended to."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _children_cpu() -> float:
    """CPU seconds of this process and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class _StageClock:
    """Records a stage's wall time, the CPU time of its processes (user + system of this process
    and its finished children) and the load average around it, in timings.json: on a shared
    machine the wall time alone says little about the work."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def __enter__(self) -> None:
        self.wall, self.cpu, self.load = time.perf_counter(), _children_cpu(), _load()

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            return
        record = _read_json(self.path) if self.path.is_file() else {}
        record[self.name] = {
            "wall_s": round(time.perf_counter() - self.wall, 2),
            "cpu_s": round(_children_cpu() - self.cpu, 2),
            "load_before": self.load,
            "load_after": _load(),
        }
        _write_json(self.path, record)
        logger.info("stage %s: %s", self.name, record[self.name])


def check_study_dir(report_dir: Path, cfg: StudyConfig) -> None:
    """Record ``cfg`` in ``report_dir``, or check that the recorded one matches."""
    path = report_dir / STUDY_FILE
    if path.is_file():
        recorded = _read_json(path)
        if recorded.get("fingerprint") != cfg.fingerprint():
            raise StudyDirError(
                f"{report_dir} holds a study with another configuration "
                f"({recorded.get('config', {}).get('name')!r}, fingerprint "
                f"{recorded.get('fingerprint')} != {cfg.fingerprint()}): choose another report "
                "directory or delete it"
            )
        settings = list(dict.fromkeys([*recorded["config"]["settings"], *cfg.settings]))
    else:
        settings = list(cfg.settings)
    record = {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}
    record["config"]["settings"] = settings
    _write_json(path, record)


def pretrain_command(
    cfg: StudyConfig, setting: str, data_overrides: list[str], run_dir: Path
) -> list[str]:
    """The pre-training command line of one setting (every setting: same data, seed, budget)."""
    return [
        sys.executable,
        "-m",
        "divprec.pretrain",
        f"experiment={cfg.experiment}",
        f"loss={setting}",
        f"train.seed={cfg.seed}",
        *data_overrides,
        *cfg.train_overrides,
        f"run.dir={run_dir}",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
    ]


class Study:
    """The stages of one study in one report directory."""

    def __init__(
        self, cfg: StudyConfig, report_dir: str | Path, data_dir: str | Path | None = None
    ):
        self.cfg = cfg
        self.dir = Path(report_dir).expanduser().resolve()
        # The blend does not depend on the study's seed, so several seeds can share one.
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else self.dir / "data"

    # -- paths
    @property
    def data_meta_path(self) -> Path:
        return self.data_dir / "meta.json"

    def run_dir(self, setting: str) -> Path:
        return self.dir / "runs" / setting

    def pretrain_marker(self, setting: str) -> Path:
        return self.run_dir(setting) / "pretrain.json"

    def eval_path(self, setting: str) -> Path:
        return self.dir / "eval" / f"{setting}.json"

    def rl_path(self, setting: str) -> Path:
        return self.dir / "rl" / f"{setting}.json"

    def rl_progress_path(self, setting: str) -> Path:
        return self.dir / "rl" / f"{setting}.progress.jsonl"

    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    # -- stages
    def stages(self) -> list[Stage]:
        stages = [Stage("data", self.data_meta_path, self._data)]
        for s in self.cfg.settings:
            stages.append(Stage(f"pretrain/{s}", self.pretrain_marker(s), self._pretrain_fn(s)))
            stages.append(Stage(f"eval/{s}", self.eval_path(s), self._eval_fn(s)))
            if self.cfg.run_rl:
                stages.append(Stage(f"rl/{s}", self.rl_path(s), self._rl_fn(s)))
        return stages

    def _data(self, postfix: Callable[[dict], None]) -> None:
        prepare_data(self.data_dir, self.cfg.data)

    def _data_overrides(self) -> list[str]:
        return prepared_from_meta(_read_json(self.data_meta_path)).overrides()

    def _pretrain_fn(self, setting: str):
        def run(postfix: Callable[[dict], None]) -> None:
            from divprec.checkpoint.layout import resolve_latest
            from divprec.config.compose import compose_config
            from divprec.config.validate import validate

            run_dir = self.run_dir(setting)
            argv = pretrain_command(self.cfg, setting, self._data_overrides(), run_dir)
            with _COMPOSE_LOCK:  # fail here, with the config error, if invalid
                resolved = compose_config(argv[3:])
            validate(resolved, world_size=1)
            total = resolved.train.steps
            metrics = run_dir / "metrics.jsonl"

            def poll() -> None:
                last = _last_jsonl(metrics)
                if last:
                    postfix(
                        {
                            "step": f"{last.get('step')}/{total}",
                            "loss": f"{last.get('lm_loss', float('nan')):.3f}",
                        }
                    )

            start = time.perf_counter()
            env = {"PYTHONUNBUFFERED": "1"}
            if self.cfg.torch_threads:  # torch's intra-op threads of the pre-training process
                env["OMP_NUM_THREADS"] = str(self.cfg.torch_threads)
            run_command(argv, run_dir / "train.log", poll=poll, env=env)
            checkpoint = resolve_latest(run_dir / "checkpoints")
            _write_json(
                self.pretrain_marker(setting),
                {
                    "seconds": time.perf_counter() - start,
                    "steps": total,
                    "tokens": total * resolved.train.global_batch_size * resolved.train.seq_length,
                    "checkpoint": str(checkpoint),
                    "command": argv[1:],
                },
            )

        return run

    def _eval_fn(self, setting: str):
        def run(postfix: Callable[[dict], None]) -> None:
            args = (
                str(self.run_dir(setting)),
                asdict(self.cfg.eval),
                asdict(self.cfg.data),
                self.cfg.seed,
                self.cfg.torch_threads,
            )
            from divprec.study.evaluate import evaluate_checkpoint

            run_function(
                evaluate_checkpoint, args, self.eval_path(setting), self.log_path(f"eval_{setting}")
            )

        return run

    def _rl_fn(self, setting: str):
        def run(postfix: Callable[[dict], None]) -> None:
            from divprec.study.evaluate import rl_probe

            progress = self.rl_progress_path(setting)
            total = self.cfg.rl.steps

            def poll() -> None:
                last = _last_jsonl(progress)
                if last:
                    postfix(
                        {
                            "step": f"{last.get('step')}/{total}",
                            "reward": f"{last.get('reward_mean', float('nan')):.3f}",
                        }
                    )

            args = (
                str(self.run_dir(setting)),
                asdict(self.cfg.rl),
                asdict(self.cfg.data),
                self.cfg.seed,
                str(progress),
                self.cfg.torch_threads,
            )
            run_function(
                rl_probe, args, self.rl_path(setting), self.log_path(f"rl_{setting}"), poll=poll
            )

        return run


def run_study(
    cfg: StudyConfig,
    report_dir: str | Path,
    *,
    progress: bool = True,
    plots: bool = True,
    data_dir: str | Path | None = None,
    bar_position: int | None = None,
) -> dict:
    """Run (or continue) the study in ``report_dir``; returns the report (also report.json).

    Stages whose outputs exist are skipped; report.json and the plots are rebuilt every time from
    everything the directory holds for ``cfg.settings``. ``data_dir`` (default
    ``report_dir``/data) holds the prepared blend; ``bar_position`` places the progress bar
    when several studies run side by side.
    """
    from tqdm.auto import tqdm

    from divprec.study.report import build_report

    study = Study(cfg, report_dir, data_dir)
    study.dir.mkdir(parents=True, exist_ok=True)
    check_study_dir(study.dir, cfg)
    stages = study.stages()
    start = time.perf_counter()
    ran: list[str] = []
    label = "" if bar_position is None else f"seed {cfg.seed} "
    with tqdm(
        total=len(stages) + 1,
        desc=f"{label}study",
        unit="stage",
        disable=not progress,
        dynamic_ncols=True,
        position=bar_position,
    ) as bar:
        for stage in stages:
            if stage.done():
                bar.update(1)
                continue
            bar.set_description(label + stage.name)
            bar.set_postfix({})

            def postfix(values: dict, _bar=bar) -> None:
                _bar.set_postfix(values, refresh=True)

            with _StageClock(study.dir / TIMINGS_FILE, stage.name):
                stage.run(postfix)
            ran.append(stage.name)
            bar.update(1)
        bar.set_description(label + "report")
        report = build_report(
            study, ran_stages=ran, invocation_seconds=time.perf_counter() - start, plots=plots
        )
        bar.update(1)
    return report
