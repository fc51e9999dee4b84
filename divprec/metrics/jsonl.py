"""``<run_dir>/metrics.jsonl``: one JSON object per logged step, the run's durable metric record."""

from __future__ import annotations

import json
import math
import os
import time
from typing import IO, Any

from divprec.metrics.callback import Callback, TrainState

FILENAME = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    # Tensors and numpy scalars become floats; NaN/inf become null so the file stays strict JSON
    # (readable by jq and pandas).
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _drop_records_after(path: str, step: int) -> None:
    """Keep only whole records with ``step <= step``: a job resumed from an earlier checkpoint
    logs those steps again, and a job killed mid-write leaves a partial last line."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        if not line.endswith("\n"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and record["step"] <= step
        ):
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one


class JsonlLogger(Callback):
    """Appends ``{"step", <metrics>, "consumed_samples", "time"}`` per logged step on the logging
    rank; each line is flushed, and a resumed run continues the same file."""

    def __init__(self, filename: str = FILENAME) -> None:
        self.filename = filename
        self._file: IO[str] | None = None

    def on_train_start(self, state: TrainState) -> None:
        if not state.is_logging_rank:
            return
        os.makedirs(state.run_dir, exist_ok=True)
        path = os.path.join(state.run_dir, self.filename)
        if os.path.exists(path):
            _drop_records_after(path, state.step)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in on_train_end

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if self._file is None or metrics is None:
            return
        record: dict[str, Any] = {"step": state.step, **metrics}
        # The state's counters win over same-named metrics; "step" keeps its place first.
        record.update(step=state.step, consumed_samples=state.consumed_samples, time=time.time())
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def on_train_end(self, state: TrainState) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
