"""Test tiers: the CPU tier runs on CPU deliberately, even on a GPU host; the GPU tier
(``pytest -m gpu``, or DIVPREC_TEST_TIER=gpu) sees the GPUs.

On a GPU host the CPU tier hides CUDA before anything imports torch: the trainer uses CUDA when it
sees one, and the gloo tests spawned here would otherwise put every rank's tensors on cuda:0.
tools/test.sh runs both tiers there, the CPU tier first.
"""

import os
import sys

import pytest

# Tests import helpers (e.g. loss_reference) from this folder.
sys.path.insert(0, os.path.dirname(__file__))


def gpu_tier(markexpr: str) -> bool:
    """Whether a run selects the GPU tier (its marker expression is ``gpu``, or the tier is set)."""
    return os.environ.get("DIVPREC_TEST_TIER") == "gpu" or markexpr.strip() == "gpu"


def pytest_configure(config) -> None:
    # Runs before any test module (and so torch) is imported.
    if gpu_tier(config.getoption("markexpr") or ""):
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
        # The loss's Triton kernels run in Triton's interpreter on CPU tensors (triton reads this
        # as divprec.loss.triton_kernels is imported): tests/unit/test_triton_kernels.py.
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tiny_tp2_pp2_run(tmp_path_factory):
    """The tiny model trained 1 step at tensor 2 x pipeline 2, once per session (see
    tests/shared_runs.py): ``.start()`` it early, ``.result()`` is its run directory."""
    from shared_runs import TP2_PP2, BackgroundRun

    return BackgroundRun(tmp_path_factory.mktemp("tiny_tp2_pp2"), 4, [*TP2_PP2, "model=tiny"])
