"""The test tiers of tests/conftest.py: this (CPU-tier) run sees no GPU, even on a GPU host."""

import os

from conftest import gpu_tier


def test_cpu_tier_hides_cuda() -> None:
    import torch

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert not torch.cuda.is_available()


def test_tier_selection(monkeypatch) -> None:
    monkeypatch.delenv("DIVPREC_TEST_TIER", raising=False)
    assert gpu_tier("gpu") and gpu_tier(" gpu ")
    assert not gpu_tier("") and not gpu_tier("not gpu") and not gpu_tier("slow")
    monkeypatch.setenv("DIVPREC_TEST_TIER", "gpu")
    assert gpu_tier("")
