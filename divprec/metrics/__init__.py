"""Metrics: reductions across ranks, throughput/MFU, and the logging callbacks (jsonl, wandb,
console line, progress bar).

Public API: :class:`LoggingConfig`, :class:`WandbConfig`, :func:`validate_logging_config`,
:class:`TrainState`, :class:`Callback`, :func:`build_callbacks`, :func:`masked_sums`,
:class:`TokenStatSums`, :func:`reduce_token_means`, :class:`Throughput`,
:func:`device_peak_tflops`.
"""

from divprec.metrics.callback import Callback, TrainState
from divprec.metrics.config import LoggingConfig, WandbConfig, validate_logging_config
from divprec.metrics.console import ConsoleLogger
from divprec.metrics.factory import build_callbacks
from divprec.metrics.jsonl import JsonlLogger
from divprec.metrics.progress import ProgressBar
from divprec.metrics.reduce import NUM_TOKENS, TokenStatSums, masked_sums, reduce_token_means
from divprec.metrics.throughput import Throughput, device_peak_tflops
from divprec.metrics.wandb_logger import WandbLogger

__all__ = [
    "NUM_TOKENS",
    "Callback",
    "ConsoleLogger",
    "JsonlLogger",
    "LoggingConfig",
    "ProgressBar",
    "Throughput",
    "TokenStatSums",
    "TrainState",
    "WandbConfig",
    "WandbLogger",
    "build_callbacks",
    "device_peak_tflops",
    "masked_sums",
    "reduce_token_means",
    "validate_logging_config",
]
