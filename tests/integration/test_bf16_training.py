"""bf16 training on CPU (``train.precision=bf16``): the gradients of a step are summed over the
microbatches and reduced over data parallel in fp32, and a bf16 run follows the fp32 run's loss.

The accumulation check runs the trainer's own step (divprec.train.step.train_step: megatron-core's
schedule, GradientSync, the DeepSpeed engine of divprec.train.build) over 64 microbatches per
rank. A hook on every parameter sees each microbatch's bf16 gradient as autograd produces it (after
the tensor-parallel hooks, before any accumulation); the reference is their float64 sum, averaged
over data parallel. The gradient DeepSpeed steps with (deepspeed.utils.safe_get_full_grad) must
equal it element by element to fp32 rounding. With bf16 accumulation and reduction (DeepSpeed's
default under bf16) the error was 1.7-2.4% of each tensor's largest entry; in fp32 it is <= 1.1e-7.

One pair of spawned processes runs every case (the accumulation layouts, then the fp32 and bf16
runs), to keep the suite's process start-ups few.
"""

from __future__ import annotations

import pytest
import torch
from toy_model import TOY_MODEL, tiny_run

from divprec.parallel.spawn import run_in_processes

WORLD = 2
MICROBATCHES = 64  # per data-parallel rank, of 1 sample of 32 tokens
# (case, overrides): ZeRO-1 and ZeRO-2 over data parallel 2; ZeRO-1 with pipeline parallelism.
LAYOUTS = {
    "zero1_dp2": ["parallel.zero_stage=1"],
    "zero2_dp2": ["parallel.zero_stage=2"],
    "zero1_pp2": ["parallel.zero_stage=1", "parallel.pipeline=2"],
}
# fp32 sums of 128 terms, in another order than the float64 reference: relative to the tensor's
# largest entry (measured <= 1.1e-7). bf16 sums were off by 1.7e-2 to 2.4e-2 (a bf16 step: 7.8e-3).
FP32_LEVEL = 1e-5
TRACK_STEPS = 20
# bf16 rounds the weights and activations (8 bits of mantissa); the loss itself stays within a
# few bf16 steps of the fp32 run's (measured: 0.09%).
LOSS_RTOL = 1e-2


def _accumulation_errors(run_dir: str, overrides: list[str]) -> dict[str, tuple[float, float]]:
    """{parameter: (max abs error, max abs error / max |reference|)} of one bf16 step."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from megatron.core import parallel_state

    from divprec.config.compose import compose_config
    from divprec.config.validate import validate
    from divprec.data.batches import build_batch_iterator
    from divprec.train.build import build_run
    from divprec.train.step import train_step

    if parallel_state.model_parallel_is_initialized():  # the previous case's layout
        parallel_state.destroy_model_parallel()
    cfg = compose_config([*overrides, f"run.dir={run_dir}"])
    validate(cfg, WORLD)
    run = build_run(cfg)
    params = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    reference = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}

    def add_to_reference(name: str):
        def hook(grad: torch.Tensor) -> None:
            reference[name].add_(grad.double())

        return hook

    for name, param in params.items():
        assert param.dtype == torch.bfloat16, name
        param.register_hook(add_to_reference(name))
    stepped = {}
    engine_step = run.engine.step

    def capture_then_step() -> None:  # what the optimizer is about to apply
        stepped.update({n: safe_get_full_grad(p).double() for n, p in params.items()})
        engine_step()

    run.engine.step = capture_then_step
    batches = build_batch_iterator(
        run.datasets.train,
        0,
        cfg.train.micro_batch_size,
        run.ctx.data_rank,
        run.ctx.data_size,
        global_batch_size=cfg.train.global_batch_size,
    )
    assert run.num_microbatches == MICROBATCHES
    result = train_step(run, batches, 0)
    assert result.skipped is None
    data_group = parallel_state.get_data_parallel_group()
    errors = {}
    for name, ref in reference.items():
        dist.all_reduce(ref, group=data_group)
        ref /= dist.get_world_size(data_group)  # DeepSpeed averages over data parallel
        abs_err = (stepped[name] - ref).abs().max().item()
        errors[name] = (abs_err, abs_err / ref.abs().max().item())
    return errors


def _losses(run_dir: str, overrides: list[str]) -> list[float]:
    from divprec.config.compose import compose_config
    from divprec.config.validate import validate
    from divprec.train.trainer import pretrain

    cfg = compose_config([*overrides, f"run.dir={run_dir}"])
    validate(cfg, WORLD)
    return [m["loss"] for m in pretrain(cfg).history]


def _all_cases(rank: int, world: int, tmp: str) -> dict:
    out = {}
    for case, layout in LAYOUTS.items():
        overrides = tiny_run(
            *TOY_MODEL,
            "train.seq_length=32",
            "train.precision=bf16",
            "train.micro_batch_size=1",
            f"train.global_batch_size={MICROBATCHES * world // (2 if 'pp2' in case else 1)}",
            *layout,
        )
        out[case] = _accumulation_errors(f"{tmp}/{case}", overrides)
    for precision in ("fp32", "bf16"):
        overrides = tiny_run(
            *TOY_MODEL,
            "train.seq_length=32",
            f"train.precision={precision}",
            f"train.steps={TRACK_STEPS}",
            "logging.interval=1",
            "checkpoint.interval=0",
            "checkpoint.resume=never",
        )
        out[precision] = _losses(f"{tmp}/{precision}", overrides)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_in_processes(_all_cases, WORLD, str(tmp_path_factory.mktemp("bf16")))


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_bf16_gradients_accumulate_and_reduce_in_fp32(results, case):
    for rank, result in enumerate(results):
        errors = result[case]
        assert len(errors) >= 9  # a pipeline stage: the embedding or output layer, one layer
        worst = max(errors, key=lambda n: errors[n][1])
        assert errors[worst][1] <= FP32_LEVEL, (case, rank, worst, errors[worst])


def test_bf16_run_tracks_the_fp32_run(results):
    fp32, bf16 = results[0]["fp32"], results[0]["bf16"]
    assert len(fp32) == len(bf16) == TRACK_STEPS
    assert fp32[-1] < fp32[0] - 0.5  # it trains
    for step, (a, b) in enumerate(zip(fp32, bf16, strict=True), start=1):
        assert abs(a - b) <= LOSS_RTOL * abs(a), (step, a, b)
