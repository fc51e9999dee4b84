"""The default run and the full one: tests marked ``slow`` run only with ``tools/test.sh --all``.

The default run (``bash tools/test.sh``, what CI runs) keeps one end-to-end test of every concern:
each parallel layout family, resharding, preemption, every fault, SLURM, bf16, EP, the fused
path, the GPU check's dry run, the study. The other cases of the same tests are ``slow``.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest


def slow_except(values: Iterable[str], *default: str) -> list:
    """Parametrize over ``values``: those in ``default`` run in the default run, the rest are
    marked slow."""
    values = list(values)
    missing = [v for v in default if v not in values]
    if missing:
        raise ValueError(f"slow_except: {missing} are not among {values}")
    return [v if v in default else pytest.param(v, marks=pytest.mark.slow) for v in values]
