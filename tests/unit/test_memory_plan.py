"""The memory plan's activation terms against what autograd actually saves, and its arithmetic.

Saved activations are measured with torch.autograd.graph.saved_tensors_hooks: the storages of every
tensor saved for the backward during one training-mode forward (with the loss), parameters
excluded, each storage once. This is also the measurement of what each recompute mode saves
(docs/performance.md).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from divprec.config.compose import compose_config
from divprec.config.memory import memory_plan, training_layout
from divprec.model.flops import parameter_count
from divprec.model.memory_plan import (
    logits_and_loss_bytes,
    microbatch_activation_bytes,
    microbatches_in_flight,
    stage_parameters,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 4096
TOKENS = (4, 128)  # micro batch, sequence


@functools.cache
def saved_activation_bytes(overrides: tuple[str, ...], dtype: torch.dtype) -> int:
    """Bytes autograd saves in one forward of the model of ``overrides`` (one process)."""
    from divprec.model.builder import build_model
    from divprec.model.shaped_gpt import ShapedGPTModel
    from divprec.parallel.distributed import single_process_world

    composed = compose_config(list(overrides))
    cfg = composed.model
    b, s = TOKENS
    with single_process_world(seed=1):
        model = build_model(
            cfg,
            vocab_size=VOCAB,
            seq_length=s,
            tensor_parallel=1,
            pipeline_parallel=1,
            sequence_parallel=False,
            params_dtype=dtype,
            seed=1,
            pre_process=True,
            post_process=True,
            model_class=functools.partial(ShapedGPTModel, loss_config=composed.loss),
        )
        model.train()
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (b, s), generator=generator)
        labels = torch.randint(0, VOCAB, (b, s), generator=generator)
        positions = torch.arange(s).expand(b, s)
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(tokens, positions, None, labels=labels)
    return sum(storages.values())


def planned_saved_bytes(overrides: tuple[str, ...], dtype: torch.dtype) -> float:
    b, s = TOKENS
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    cfg = compose_config(
        [
            *overrides,
            f"train.micro_batch_size={b}",
            f"train.seq_length={s}",
            f"train.global_batch_size={b}",
            f"train.precision={precision}",
        ]
    )
    layout = training_layout(cfg, 1, on_gpu=False, tokenizer_vocab=VOCAB)
    kept, _ = microbatch_activation_bytes(cfg.model, layout, stage=0)
    saved_logits, _, _ = logits_and_loss_bytes(layout)
    return kept + saved_logits


CASES = {
    "none": (),
    "selective_core_attn": ("model.recompute=selective",),
    "selective_mlp": ("model.recompute=selective", "model.recompute_modules=[core_attn,mlp]"),
    "full_uniform": ("model.recompute=full",),
    "full_uniform_2": ("model.recompute=full", "model.recompute_num_layers=2"),
    "full_block_3": ("model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=3"),
    "moe": ("model=moe_tiny",),
    "moe_selective": ("model=moe_tiny", "model.recompute=selective", "model.recompute_modules=[moe]"),
    # A paper model's layer shape (dense 1B: hidden 1536, 16 heads of 128, 4 KV heads, FFN 4608).
    "dense_1b_layer": ("model=dense_1b", "model.num_layers=1", "model.vocab_size=null"),
}  # fmt: skip
FP32, BF16 = torch.float32, torch.bfloat16
MEASURED = [(case, FP32) for case in CASES] + [
    (case, BF16) for case in ("none", "selective_mlp", "full_uniform", "moe", "dense_1b_layer")
]


@pytest.mark.parametrize(
    ("case", "dtype"), MEASURED, ids=[f"{c}-{str(d)[6:]}" for c, d in MEASURED]
)
def test_planned_activations_match_saved_tensors(case: str, dtype: torch.dtype) -> None:
    measured = saved_activation_bytes(CASES[case], dtype)
    planned = planned_saved_bytes(CASES[case], dtype)
    assert abs(planned - measured) <= 0.005 * measured, (case, planned, measured)


def test_recompute_keeps_less() -> None:
    """What each mode saves, relative to none (fp32): the measured ordering the plan relies on."""
    saved = {case: saved_activation_bytes(CASES[case], FP32) for case in CASES}
    assert saved["full_uniform_2"] < saved["full_uniform"] < saved["full_block_3"]
    assert saved["full_block_3"] < saved["selective_mlp"] < saved["selective_core_attn"]
    assert saved["selective_core_attn"] < saved["none"]
    assert saved["moe_selective"] < saved["moe"]


def test_parameters_per_stage_add_up() -> None:
    cfg = compose_config(["model=dense_1b", "parallel.pipeline=4"])
    layout = training_layout(cfg, 4, tokenizer_vocab=VOCAB)
    per_stage = [stage_parameters(cfg.model, layout, stage) for stage in range(4)]
    assert sum(per_stage) == parameter_count(cfg.model, layout.vocab_size)
    assert per_stage[0] > per_stage[1] == per_stage[2] < per_stage[3]  # embedding, output layer


def test_tensor_parallel_splits_the_matrices() -> None:
    one = compose_config(["model=dense_1b"])
    two = compose_config(["model=dense_1b", "parallel.tensor=2"])
    count_one = stage_parameters(one.model, training_layout(one, 1), 0)
    count_two = stage_parameters(two.model, training_layout(two, 2), 0)
    replicated = one.model.num_layers * (2 * 1536 + 2 * 128) + 1536  # norms, QK-norms
    assert count_two * 2 - replicated == pytest.approx(count_one, rel=1e-3)


def test_one_f_one_b_in_flight() -> None:
    cfg = compose_config(["parallel.pipeline=4", "train.global_batch_size=16"])
    layout = training_layout(cfg, 4)
    assert [microbatches_in_flight(layout, stage) for stage in range(4)] == [4, 3, 2, 1]


def test_zero_partitions_the_optimizer_state() -> None:
    base = ["experiment=paper_dense_1b"]
    one = memory_plan(compose_config([*base, "parallel.zero_stage=1"]), 8)
    two = memory_plan(compose_config([*base, "parallel.zero_stage=2"]), 8)
    assert one.master_weights == two.master_weights == -(-one.stage_parameters // 8) * 4
    assert one.adam_moments == 2 * one.master_weights
    # bf16 parameters, gradients accumulated in fp32: ZeRO-1 every gradient of the stage, reduced
    # in place (no bucket, no flat copy at the step); ZeRO-2 this rank's partition.
    assert one.parameters == one.stage_parameters * 2
    assert one.gradients == one.stage_parameters * 4
    assert one.reduce_bucket == one.optimizer_step == 0
    assert two.gradients == -(-two.stage_parameters // 8) * 4
    assert two.reduce_bucket > 0 and two.optimizer_step == two.gradients


def _plan_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_plan_tool_prints_the_plan_and_its_verdict() -> None:
    fits = _plan_tool("experiment=paper_dense_1b", "--gpus", "8")
    assert fits.returncode == 0, fits.stderr
    lines = fits.stdout.splitlines()
    for row in ("parameters", "gradients", "fp32 master weights", "Adam moments", "activations",
                "logits and loss buffers", "total at the peak"):  # fmt: skip
        assert any(line.strip().startswith(row) for line in lines), (row, fits.stdout)
    assert lines[-1].startswith("fits in 80 GiB: ")
    tight = _plan_tool("experiment=paper_dense_1b", "--gpus", "8", "--device-memory", "20")
    assert tight.returncode == 1
    assert tight.stdout.splitlines()[-1].startswith("does NOT fit in 20 GiB: ")
    bad = _plan_tool("experiment=paper_dense_4b", "--gpus", "3")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "plan: error: world size 3 is not a multiple of parallel.tensor x parallel.pipeline = 2: "
        "launch a multiple of 2 processes or change parallel.tensor/parallel.pipeline"
    ], bad.stderr


def test_expert_parallel_splits_the_experts_not_their_state() -> None:
    base = ["experiment=paper_moe_5b_a0_3b"]
    one = memory_plan(compose_config([*base, "parallel.expert=1"]), 8)
    eight = memory_plan(compose_config([*base, "parallel.expert=8"]), 8)
    m = compose_config(base).model
    experts = m.num_layers * m.num_experts * 3 * m.hidden_size * m.moe_ffn_hidden_size
    # Each rank holds 1/8 of the experts ...
    assert one.stage_parameters - eight.stage_parameters == experts - experts // 8
    # ... and ZeRO partitions their state over the 1 replica instead of 8 ranks: the same share.
    assert eight.master_weights == pytest.approx(one.master_weights, rel=1e-6)
    assert eight.total < one.total
