"""The GPU tier (``pytest -m gpu``, run by tools/test.sh on a CUDA host): the model build, a bf16
training step and a checkpoint round trip on one GPU. The CPU tier runs the same paths on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from toy_model import SignalAt, tiny_run

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BASE = tiny_run("loss=tail_penalty", "loss.beta=-0.25", "train.steps=4", "train.precision=bf16")


def _train(rank: int, world: int, overrides: list[str], run_dir: str, stop_at: int | None):
    from divprec.train.preemption import Preempted
    from divprec.train.trainer import pretrain

    cfg = compose_config([*BASE, *overrides, f"run.dir={run_dir}"])
    validate(cfg, world)
    try:
        history = pretrain(cfg, [SignalAt(stop_at)] if stop_at else []).history
        return {"history": history, "exit": 0, "device": torch.cuda.get_device_name()}
    except Preempted as stop:
        return {"history": [], "exit": stop.code}


def _run(overrides: list[str], run_dir, stop_at: int | None = None) -> dict:
    # One process over NCCL, as divprec-pretrain runs on a GPU.
    return run_in_processes(_train, 1, overrides, str(run_dir), stop_at, backend="nccl")[0]


@pytest.mark.parametrize("model", ["tiny", "moe_tiny"])
def test_bf16_training_and_checkpoint_round_trip_on_the_gpu(model, tmp_path):
    overrides = [f"model={model}"]
    full = _run(overrides, tmp_path / "full")
    history = full["history"]
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in history)
    assert history[-1]["lm_loss"] < history[0]["lm_loss"]
    first = _run(overrides, tmp_path / "resumed", stop_at=2)
    assert first["exit"] == 75
    second = _run(overrides, tmp_path / "resumed")
    assert [m["step"] for m in second["history"]] == [3, 4]
    for ours, ref in zip(second["history"], history[2:], strict=True):
        # The same layout: the same kernels in the same order.
        assert (ours["lm_loss"], ours["loss"]) == (ref["lm_loss"], ref["loss"]), ours["step"]


def _build_moe(experts: str):
    from divprec.model.builder import build_model
    from divprec.model.config import ModelConfig

    cfg = ModelConfig(num_experts=8, moe_ffn_hidden_size=64, moe_router_topk=2, moe_experts=experts)
    return build_model(
        cfg,
        vocab_size=256,
        seq_length=32,
        tensor_parallel=1,
        pipeline_parallel=1,
        sequence_parallel=False,
        params_dtype=torch.bfloat16,
        seed=1234,
        pre_process=True,
        post_process=True,
        use_transformer_engine=False,
    )


def _grouped_against_sequential(rank: int, world: int) -> dict:
    from divprec.loss import ShapedLossConfig, vocab_parallel_shaped_loss
    from divprec.parallel.config import ParallelConfig
    from divprec.parallel.distributed import init_distributed

    init_distributed(ParallelConfig(), seed=1234)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 33), generator=gen).cuda()
    out = {}
    for experts in ("sequential", "grouped", "auto"):
        model = _build_moe(experts)
        logits = model(tokens[:, :-1], torch.arange(32, device="cuda").expand(2, 32), None)
        cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1)
        loss = vocab_parallel_shaped_loss(logits, tokens[:, 1:], cfg)[0].mean()
        loss.backward()
        out[experts] = {
            "module": type(model.decoder.layers[0].mlp.experts).__name__,
            "loss": loss.item(),
            "grads": {n: p.grad.float().cpu() for n, p in model.named_parameters()},
        }
    return out


def test_grouped_experts_on_the_gpu():
    (runs,) = run_in_processes(_grouped_against_sequential, 1, backend="nccl")
    assert runs["auto"]["module"] == "GroupedExperts"  # the CUDA default in bf16
    assert runs["sequential"]["module"] == "SequentialMLP"
    assert math.isclose(runs["grouped"]["loss"], runs["sequential"]["loss"], rel_tol=2e-2)
    for name, want in runs["sequential"]["grads"].items():
        got = runs["grouped"]["grads"][name]
        assert got.isfinite().all(), name
        scale = want.abs().max().clamp(min=1e-12)
        assert (got - want).abs().max() / scale < 5e-2, name
