import os
import sys

import pytest

# Tests import helpers (e.g. loss_reference) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_tp2_pp2_run(tmp_path_factory):
    """The tiny model trained 1 step at tensor 2 x pipeline 2, once per session (see
    tests/shared_runs.py): ``.start()`` it early, ``.result()`` is its run directory."""
    from shared_runs import TP2_PP2, BackgroundRun

    return BackgroundRun(tmp_path_factory.mktemp("tiny_tp2_pp2"), 4, [*TP2_PP2, "model=tiny"])
