"""Peak memory of live tensors during one training step, measured on CPU (where no allocator keeps
statistics): what the memory plan (divprec.model.memory_plan) is checked against.

Method: at the end of the step before the measured one, sum the storages of every live tensor
(one count per storage, views share theirs); then record every allocation and free of torch's CPU
allocator during the measured step with torch.profiler (``profile_memory=True``). The peak is that
starting sum plus the highest running total of the recorded allocations minus frees. Python-level
objects and gloo's own buffers are not tensors and are not counted.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from divprec.metrics.callback import Callback, TrainState


def live_tensor_bytes() -> int:
    """Bytes of the storages of all live CPU tensors reachable from Python, each storage once."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
            continue
        try:
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # meta / fake / functional tensors
            continue
        if pointer:
            storages[pointer] = max(storages.get(pointer, 0), storage.nbytes())
    return sum(storages.values())


class AllocationPeak:
    """The high-water mark of torch's CPU allocations minus frees within a window (bytes): how
    much more tensor memory the window needed at its worst than at its start. Use
    :func:`allocation_peak`."""

    def __init__(self) -> None:
        self.peak_increase_bytes = 0
        self.end_increase_bytes = 0
        self._profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )

    def start(self) -> None:
        self._profiler.__enter__()

    def stop(self) -> None:
        self._profiler.__exit__(None, None, None)
        changes = sorted(
            (event.start_ns(), event.nbytes())
            for event in self._profiler.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        )
        total = peak = 0
        for _, nbytes in changes:
            total += nbytes
            peak = max(peak, total)
        self.peak_increase_bytes, self.end_increase_bytes = peak, total


@contextmanager
def allocation_peak() -> Iterator[AllocationPeak]:
    """``with allocation_peak() as peak: ...``; then ``peak.peak_increase_bytes``."""
    probe = AllocationPeak()
    probe.start()
    try:
        yield probe
    finally:
        probe.stop()


@dataclass
class StepMemory:
    """``peak_bytes`` = ``start_bytes`` (live at the step's start) + ``peak_increase_bytes``."""

    start_bytes: int
    peak_increase_bytes: int
    end_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.start_bytes + self.peak_increase_bytes


class PeakTensorMemory(Callback):
    """Measures optimizer step ``step`` (>= 2: step 1 creates state lazily) on CPU; see the module.

    The result is in :attr:`result` on every rank, for that rank.
    """

    def __init__(self, step: int = 2) -> None:
        if step < 2:
            raise ValueError("PeakTensorMemory measures a step after the first (step >= 2)")
        self.step = step
        self.result: StepMemory | None = None
        self._probe: AllocationPeak | None = None
        self._start = 0

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if state.step == self.step - 1:
            self._start = live_tensor_bytes()
            self._probe = AllocationPeak()
            self._probe.start()
        elif state.step == self.step and self._probe is not None:
            self._probe.stop()
            peak, self._probe = self._probe.peak_increase_bytes, None
            self.result = StepMemory(self._start, peak, live_tensor_bytes())

    def on_train_end(self, state: TrainState) -> None:
        if self._probe is not None:  # training stopped inside the window
            self._probe.stop()
            self._probe = None
