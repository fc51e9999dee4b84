"""The CPU study of the paper's loss settings (docs/study.md): pre-train, evaluate, RL-probe, report.

    from divprec.study import full_config, run_study
    report = run_study(full_config(settings=("ce", "precision")), "runs/study")

tools/study.py is the command line over it.
"""

from divprec.study.config import SETTINGS, StudyConfig, full_config, quick_config
from divprec.study.runner import run_study

__all__ = ["SETTINGS", "StudyConfig", "full_config", "quick_config", "run_study"]
