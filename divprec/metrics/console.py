"""One compact line per logged step through ``logging``: the record that reads well in SLURM logs."""

from __future__ import annotations

import logging

from tqdm import tqdm

from divprec.metrics.callback import Callback, TrainState

logger = logging.getLogger(__name__)

# (metric, label, format) in display order; metrics absent from a step are left out.
_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("lm_loss", "lm_loss", "{:.3f}"),
    ("loss", "loss", "{:.3f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("grad_norm", "grad_norm", "{:.3f}"),
    ("lr", "lr", "{:.1e}"),
    ("val_lm_loss", "val_lm_loss", "{:.3f}"),  # steps that validated
)


def format_step_line(step: int, total_steps: int, metrics: dict[str, float]) -> str:
    """``step 10/50 | lm_loss 5.123 | loss 5.001 | ... | lr 3.0e-04 | 12.3k tok/s | mfu 41.2%``."""
    parts = [f"step {step}/{total_steps}"]
    parts += [
        f"{label} {fmt.format(float(metrics[k]))}" for k, label, fmt in _FIELDS if k in metrics
    ]
    if "tokens_per_s" in metrics:
        parts.append(f"{tqdm.format_sizeof(float(metrics['tokens_per_s']))} tok/s")
    if "mfu" in metrics:
        parts.append(f"mfu {100 * float(metrics['mfu']):.1f}%")
    return " | ".join(parts)


class ConsoleLogger(Callback):
    """Logs :func:`format_step_line` at INFO on the logging rank. The entry point configures the
    handlers (``logging.basicConfig(level=logging.INFO)``); the library adds none."""

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if state.is_logging_rank and metrics is not None:
            logger.info("%s", format_step_line(state.step, state.total_steps, metrics))
