"""PeakTensorMemory: live tensors at the window's start plus the allocator's high-water mark."""

from __future__ import annotations

import pytest
import torch

from divprec.metrics.callback import TrainState
from divprec.metrics.memory import PeakTensorMemory, live_tensor_bytes

MIB = 1 << 20


def _state(step: int) -> TrainState:
    return TrainState(
        step=step, total_steps=3, consumed_samples=0, run_dir=".", is_logging_rank=True
    )


def test_counts_each_storage_once() -> None:
    before = live_tensor_bytes()
    base = torch.zeros(2 * MIB, dtype=torch.uint8)
    views = [base[:MIB], base.view(2, MIB), base[MIB:]]  # noqa: F841 - kept alive on purpose
    assert live_tensor_bytes() - before == pytest.approx(2 * MIB, abs=64 * 1024)


def test_peak_of_a_step_includes_freed_temporaries() -> None:
    probe = PeakTensorMemory(step=2)
    kept = torch.ones(3 * MIB, dtype=torch.uint8)  # live at the start of the window
    probe.on_step_end(_state(1), None)
    temporary = torch.ones(5 * MIB, dtype=torch.uint8)
    del temporary
    grown = torch.ones(MIB, dtype=torch.uint8)  # still live at the end
    probe.on_step_end(_state(2), None)
    result = probe.result
    assert result is not None
    assert result.start_bytes >= kept.numel()
    # The 5 MiB temporary was the high-water mark, although freed before the window closed.
    assert result.peak_increase_bytes == pytest.approx(5 * MIB, abs=256 * 1024)
    assert result.end_bytes - result.start_bytes == pytest.approx(grown.numel(), abs=256 * 1024)


def test_first_step_cannot_be_measured() -> None:
    with pytest.raises(ValueError, match="step >= 2"):
        PeakTensorMemory(step=1)
