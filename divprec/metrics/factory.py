"""The logging callbacks a run gets, from its ``logging`` config."""

from __future__ import annotations

from divprec.metrics.callback import Callback
from divprec.metrics.config import LoggingConfig, validate_logging_config
from divprec.metrics.console import ConsoleLogger
from divprec.metrics.jsonl import JsonlLogger
from divprec.metrics.progress import ProgressBar
from divprec.metrics.wandb_logger import WandbLogger


def build_callbacks(cfg: LoggingConfig) -> list[Callback]:
    """Sinks in a fixed order: jsonl (if on), wandb (unless disabled), console line, progress bar
    (if on). Build them on every rank: each acts on the logging rank only."""
    validate_logging_config(cfg)
    callbacks: list[Callback] = []
    if cfg.jsonl:
        callbacks.append(JsonlLogger())
    if cfg.wandb.mode != "disabled":
        callbacks.append(WandbLogger(cfg.wandb))
    callbacks.append(ConsoleLogger())
    if cfg.progress:
        callbacks.append(ProgressBar())
    return callbacks
