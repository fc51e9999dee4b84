"""Smoke test of tools/bench_loss.py, tools/bench_threshold.py and tools/bench_train.py at toy
sizes: their JSON output."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"

LOSS_KEYS = {
    "vocab",
    "tokens",
    "topk",
    "tp",
    "device",
    "dtype",
    "config",
    "inplace",
    "kernel",
    "shaped_ms",
    "megatron_ce_ms",
    "time_ratio",
    "shaped_peak_bytes",
    "megatron_ce_peak_bytes",
    "memory_ratio",
}
TRAIN_KEYS = {"loss", "tokens_per_s", "tflops", "mfu", "step_time_s", "ratio_to_baseline"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_loss_json(tmp_path):
    out = tmp_path / "loss.json"
    bench = _load("bench_loss")
    args = ["--vocab", "512", "--tokens", "64", "--topk", "1", "100", "--tp", "1", "--repeats", "1"]
    assert bench.main([*args, "--configs", "paper", "--steps", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    # topk {1, 100} x inplace {off, on} for fp32.
    assert len(records) == 4
    assert {(r["topk"], r["inplace"]) for r in records} == {
        (1, False),
        (1, True),
        (100, False),
        (100, True),
    }
    for r in records:
        assert r.keys() >= LOSS_KEYS and r["skipped"] is None
        assert (r["vocab"], r["tokens"], r["tp"], r["device"], r["dtype"]) == (
            512,
            64,
            1,
            "cpu",
            "fp32",
        )
        for key in ("shaped_ms", "megatron_ce_ms", "time_ratio", "memory_ratio"):
            assert _positive(r[key]), (key, r[key])
        steps = r["shaped_steps_ms"]  # --steps: each step of the loss (divprec.loss.step_times)
        assert list(steps)[:2] == ["0 target logit", "1 local top-k"] and "backward" in steps
        assert all(ms >= 0 for ms in steps.values()) and _positive(sum(steps.values()))
        inputs = 512 * 64 * 4
        # Peaks count the inputs; megatron-core's CE works in place on fp32 logits.
        assert r["megatron_ce_peak_bytes"] >= inputs and r["shaped_peak_bytes"] >= inputs
        if not r["inplace"]:  # the shaped loss's own fp32 buffer
            assert r["shaped_peak_bytes"] >= 2 * inputs


def test_bench_loss_fused_json(tmp_path):
    out = tmp_path / "fused.json"
    bench = _load("bench_loss")
    args = ["--fused", "--vocab", "512", "--tokens", "256", "--hidden", "32", "--topk", "100"]
    assert (
        bench.main(
            [*args, "--tp", "1", "--chunk-tokens", "8", "--repeats", "1", "--json", str(out)]
        )
        == 0
    )
    records = json.loads(out.read_text())
    assert {(r["config"], r["chunk_tokens"], r["path"]) for r in records} == {
        ("paper", 8, "fused"),
        ("ce", 8, "fused"),
    }
    for r in records:
        assert r["skipped"] is None
        for key in ("fused_ms", "linear_ce_ms", "time_ratio", "memory_ratio", "loss_memory_ratio"):
            assert _positive(r[key]), (key, r[key])
        # The baseline holds all 256 x 512 fp32 logits; the fused path one chunk of 8 tokens.
        assert r["linear_ce_loss_peak_bytes"] >= 256 * 512 * 4
        assert r["fused_loss_peak_bytes"] < r["linear_ce_loss_peak_bytes"] / 4, r


def test_bench_loss_skips_what_does_not_fit(tmp_path, capsys):
    out = tmp_path / "loss.json"
    bench = _load("bench_loss")
    huge = ["--vocab", "262144", "--tokens", "1048576", "--topk", "100", "--tp", "1"]
    assert bench.main([*huge, "--configs", "paper", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert records and all(r["skipped"] and r["shaped_ms"] is None for r in records)
    assert "needs ~" in capsys.readouterr().out


def test_bench_threshold_methods(tmp_path):
    out = tmp_path / "threshold.json"
    bench = _load("bench_threshold")
    args = ["--vocab", "2048", "--tokens", "32", "--topk", "1", "50"]
    assert bench.main([*args, "--repeats", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    from divprec.loss import native_select

    methods = {"row_max_only", "block_topk", "torch_topk", "kthvalue"}
    if native_select.available():  # the C kernel, where a C compiler is found
        methods.add("native_block_topk")
    assert {(r["topk"], r["method"]) for r in records} == {(k, m) for k in (1, 50) for m in methods}
    for r in records:
        assert _positive(r["ms"]) and _positive(r["ratio_to_row_max"])
    # every method computes the same threshold
    import torch

    z = torch.randn(32, 2048)
    fns = bench.methods(50)
    expected = torch.topk(z, 50, dim=-1).values[:, -1]
    for name in methods - {"row_max_only", "kthvalue"}:
        torch.testing.assert_close(fns[name](z), expected, rtol=0, atol=0)
    torch.testing.assert_close(fns["kthvalue"](z)[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(fns["row_max_only"](z), z.amax(dim=-1), rtol=0, atol=0)


def test_bench_train_json(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "train.json"
    bench = _load("bench_train")
    args = ["--steps", "3", "--warmup-steps", "1", "--seq-length", "32", "--micro-batch", "2"]
    assert bench.main([*args, "--global-batch", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [r["loss"] for r in runs] == ["ce", "precision"]
    for r in runs:
        assert r.keys() >= TRAIN_KEYS
        assert r["measured_steps"] == 2
        for key in ("tokens_per_s", "tflops", "step_time_s", "ratio_to_baseline"):
            assert _positive(r[key]), (key, r[key])
        if report["machine"]["device"] == "cpu":
            assert r["mfu"] is None  # no known peak for a CPU
    assert runs[0]["ratio_to_baseline"] == 1.0
