"""Training throughput over a logging interval: tokens/s, TFLOP/s per device, MFU."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, without 2:4 sparsity: half NVIDIA's datasheet
# figures, which are given with sparsity), matched case-insensitively against
# torch.cuda.get_device_name, most specific first: "H100 PCIe" before plain "H100". The NVL and
# PCIe boards run at lower clocks and power than SXM: H100 PCIe 1,513 / 2, H100 NVL and H200 NVL
# 1,671 / 2, SXM and GH200 1,979 / 2.
_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("h200 nvl", 835.0),
    ("h200", 989.0),  # H200 SXM ("NVIDIA H200") and GH200 ("NVIDIA GH200 480GB")
    ("a100", 312.0),  # SXM and PCIe
)
_PEAK_DTYPES = (torch.bfloat16, torch.float16)


def device_peak_tflops(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16
) -> float | None:
    """Dense peak TFLOP/s of one device for ``dtype``; None for the CPU, an unknown GPU, or a
    dtype other than bf16/fp16 (MFU is then not logged rather than logged wrong)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in _PEAK_DTYPES:
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, peak in _BF16_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the window since the last :meth:`compute`.

    ``flops_per_token``: model FLOPs per trained token, forward + backward (e.g. 6N plus
    attention), None to skip TFLOP/s. ``num_devices``: all devices of the job (the world size),
    which share each token's FLOPs. ``peak_tflops``: per-device peak, None to skip MFU.

    Wall clock only: call :meth:`compute` after the step's results reached the host (the metric
    reduction does that), so queued GPU work is counted in the window it belongs to.
    """

    def __init__(
        self,
        flops_per_token: float | None,
        num_devices: int,
        peak_tflops: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if num_devices < 1:
            raise ValueError(f"Throughput: num_devices must be >= 1, got {num_devices}")
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak_tflops = peak_tflops
        self._clock = clock
        self.start()

    def start(self) -> None:
        """Open a new window now: at train start, or after a pause that is not training."""
        self._open(self._clock())

    def _open(self, t0: float) -> None:
        self._t0 = t0
        self._tokens = 0
        self._steps = 0

    def step(self, tokens: int) -> None:
        """Count one optimizer step of ``tokens`` tokens, summed over all data-parallel ranks."""
        self._tokens += tokens
        self._steps += 1

    def compute(self) -> dict[str, float]:
        """``tokens_per_s``, ``step_time_s``, and ``tflops`` (per device) and ``mfu`` (fraction of
        the peak) when known, over the window; opens the next window. Empty if no step ran."""
        now = self._clock()
        elapsed = now - self._t0
        tokens, steps = self._tokens, self._steps
        self._open(now)  # the next window starts where this one ended
        if steps == 0 or elapsed <= 0:
            return {}
        out = {"tokens_per_s": tokens / elapsed, "step_time_s": elapsed / steps}
        if self.flops_per_token is not None:
            tflops = out["tokens_per_s"] * self.flops_per_token / self.num_devices / 1e12
            out["tflops"] = tflops
            if self.peak_tflops is not None:
                out["mfu"] = tflops / self.peak_tflops
        return out
