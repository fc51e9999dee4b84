"""Wall-clock time of the loss's named steps, on request: the loss's public way to be timed.

    from divprec.loss import step_times

    with step_times.recording() as seconds:
        loss, _ = vocab_parallel_shaped_loss(logits, target, cfg)
        loss.sum().backward()
    seconds  # {"0 target logit": ..., "1 local top-k": ..., ..., "backward": ...}

Every loss call inside the block adds each step's seconds to the dict. A step is timed between
device synchronisations, and a collective's time includes the wait for the slowest rank, so a
recorded call is no faster than an unrecorded one: record to see where the time goes, and time
whole calls without it (tools/bench_loss.py does both, ``--steps``). Outside ``recording`` a
step boundary costs one call of a function that does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_SECONDS: dict[str, float] | None = None


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Record the steps of every loss call in the block into the dict yielded (not nested)."""
    global _SECONDS
    if _SECONDS is not None:
        raise RuntimeError("step_times.recording() is already active")
    _SECONDS = {}
    try:
        yield _SECONDS
    finally:
        _SECONDS = None


def _ignore(name: str) -> None:
    pass


def laps(device: torch.device) -> Callable[[str], None]:
    """A step clock started now: lap(name) adds the time since the last lap to ``name``.

    The loss marks its steps with it; without :func:`recording` it is a function that does
    nothing.
    """
    seconds = _SECONDS
    if seconds is None:
        return _ignore

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        sync()
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - last[0]
        last[0] = now

    return lap
