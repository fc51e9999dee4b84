"""megatron-core on CPU (divprec.parallel.cpu): parallel runs equal a single-process reference.

Every check runs in spawned gloo processes (``run_in_processes``) so that the process-wide patches
of ``enable_cpu_execution`` never reach the pytest process. Each worker first builds and runs the
tensor/pipeline-parallel-1 reference itself (no communication: it is a single-process run), then
re-initialises megatron's parallel state for the parallel run and loads the reference weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from divprec.parallel.spawn import run_in_processes

VOCAB, SEQ, HIDDEN, HEADS, FFN, LAYERS = 128, 16, 64, 4, 128, 2
MICRO_BATCH, NUM_MICROBATCHES = 2, 4
SEED = 1234
FC1 = "mlp.linear_fc1.weight"  # SwiGLU: [gate; up] stacked on dim 0, each half split over TP
# float32, and the parallel runs reduce in a different order than the reference: errors are
# relative to the tensor's largest entry (measured: <= 5e-7).
RTOL = 1e-5


# --- helpers that run inside the spawned processes ---------------------------------------------


def _setup(tp: int = 1, pp: int = 1) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from divprec.parallel.cpu import enable_cpu_execution

    assert enable_cpu_execution() is True
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    torch.manual_seed(SEED)
    model_parallel_cuda_manual_seed(SEED)


def _model(tied: bool, pre_process: bool = True, post_process: bool = True) -> torch.nn.Module:
    """Tiny Llama-style GPT: RMSNorm, SwiGLU, RoPE, no biases, no dropout."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,  # CPU: otherwise weights are initialised through CUDA
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
        pre_process=pre_process,
        post_process=post_process,
    )


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, VOCAB, (n, MICRO_BATCH, SEQ + 1), generator=gen)
    position_ids = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    return [
        {"input_ids": t[:, :-1], "labels": t[:, 1:], "position_ids": position_ids} for t in tokens
    ]


def _run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token loss [b, s] on the last stage, hidden states elsewhere."""
    return model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])


def _reference(tied: bool, num_batches: int) -> tuple[dict, list[torch.Tensor], dict]:
    """Single-process run (TP = PP = 1): weights, per-token losses, gradients of the mean loss."""
    _setup()
    model = _model(tied)
    losses = [_run(model, b) for b in _batches(num_batches)]
    (sum(loss.mean() for loss in losses) / num_batches).backward()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return weights, [loss.detach() for loss in losses], grads


def _tp_shard(name: str, full: torch.Tensor, param: torch.nn.Parameter, rank: int, tp: int):
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith(FC1):
        return torch.cat([half.chunk(tp, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


def _tp_gather(name: str, shard: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return shard
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(shards, shard.contiguous(), group=group)
    dim = param.partition_dim
    if name.endswith(FC1):
        halves = [s.chunk(2, dim) for s in shards]
        return torch.cat([torch.cat([h[i] for h in halves], dim) for i in range(2)], dim)
    return torch.cat(shards, dim)


def _tensor_parallel_worker(rank: int, world_size: int) -> dict:
    from megatron.core.tensor_parallel import broadcast_data

    ref_weights, ref_losses, ref_grads = _reference(tied=False, num_batches=1)

    _setup(tp=world_size)
    model = _model(tied=False)
    params = dict(model.named_parameters())
    assert params.keys() == ref_weights.keys()
    # use_cpu_initialization builds the full master weight from the same seed and splits it
    # (fc1 with stride 2, so each rank holds [gate_r; up_r]): the shards should already match the
    # reference. Record that, then load the reference anyway so the comparison below is exact.
    same_init = {
        n: torch.equal(p, _tp_shard(n, ref_weights[n], p, rank, world_size))
        for n, p in params.items()
    }
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(_tp_shard(n, ref_weights[n], p, rank, world_size))

    # As megatron's get_batch: only TP rank 0 reads data, broadcast_data hands it to the others.
    local_batch = _batches(1)[0]
    batch = broadcast_data(list(local_batch), local_batch if rank == 0 else None, torch.int64)
    loss = _run(model, batch)
    loss.mean().backward()
    grads = {n: _tp_gather(n, p.grad, p) for n, p in params.items()}
    return {
        "ref_loss": ref_losses[0],
        "ref_grads": ref_grads,
        "loss": loss.detach(),
        "grads": grads,
        "same_init": same_init,
    }


def _global_layer_names(model: torch.nn.Module) -> dict[str, str]:
    """Stage-local parameter name -> name in the full (single-stage) model."""
    names = {}
    for local_index, layer in enumerate(model.decoder.layers):
        local, full = f"decoder.layers.{local_index}.", f"decoder.layers.{layer.layer_number - 1}."
        for n, _ in layer.named_parameters():
            names[local + n] = full + n
    for n, _ in model.named_parameters():
        names.setdefault(n, n)
    return names


def _pipeline_parallel_worker(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ref_weights, ref_losses, ref_grads = _reference(tied=True, num_batches=NUM_MICROBATCHES)

    _setup(pp=world_size)
    module = _model(
        tied=True,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    # Tied embeddings across stages: megatron zeroes the last stage's copy and all-reduces it from
    # the first stage at construction (this is where it calls tensor.cuda()).
    tied_weight = module.shared_embedding_or_output_weight().detach().clone()

    names = _global_layer_names(module)
    source = {**names, "output_layer.weight": "embedding.word_embeddings.weight"}  # tied
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(ref_weights[source[n]])

    # The training-loop wiring: megatron DDP grad buffers, grads finalised by the schedule (which
    # all-reduces the tied embedding gradient between the first and last stage).
    config = module.config
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), module)
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    model.zero_grad_buffer()

    def loss_func(per_token_loss: torch.Tensor):
        loss = per_token_loss.mean()
        # clone: the schedule divides the returned loss by num_microbatches in place
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator: Iterator, model: torch.nn.Module):
        return _run(model, next(data_iterator)), loss_func

    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(_batches(NUM_MICROBATCHES)),
        model=[model],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    return {
        "schedule": forward_backward.__name__,
        "tied_weight": tied_weight,
        "ref_losses": torch.stack([loss.mean() for loss in ref_losses]),
        "ref_grads": ref_grads,
        "losses": torch.stack([out["lm loss"] for out in losses]) if losses else None,
        "grads": {names[n]: p.main_grad.clone() for n, p in module.named_parameters()},
    }


def _rng_worker(rank: int, world_size: int) -> dict:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mp_random

    from divprec.parallel import cpu

    _setup(tp=world_size)
    patched = (torch.cuda.current_device, torch.Tensor.cuda, mp_random.CudaRNGStatesTracker.fork)
    assert cpu.enable_cpu_execution() is True and cpu.is_cpu_execution_enabled()
    idempotent = patched == (
        torch.cuda.current_device,
        torch.Tensor.cuda,
        mp_random.CudaRNGStatesTracker.fork,
    )

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger(mp_random.__name__).addHandler(handler)

    x = torch.ones(4096)
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def dropout_in_fork(t: torch.Tensor) -> torch.Tensor:
        with tracker.fork():
            return F.dropout(t, 0.5)

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    outside_before = torch.get_rng_state()
    fork_1 = dropout_in_fork(x)
    outside_unchanged = torch.equal(torch.get_rng_state(), outside_before)
    fork_2 = dropout_in_fork(x)  # the tracked state advanced
    default = F.dropout(x, 0.5)

    tensor_parallel.model_parallel_cuda_manual_seed(7)  # same seed: same masks again
    fork_1_again = dropout_in_fork(x)
    default_again = F.dropout(x, 0.5)

    # The tracked state is megatron's tensor-model-parallel seed; the default one the DP seed.
    torch.manual_seed(7 + 2718 + rank)
    fork_expected = F.dropout(x, 0.5)
    torch.manual_seed(7)
    default_expected = F.dropout(x, 0.5)

    # Activation checkpointing replays the fork in backward with the recorded RNG states: the
    # recomputed mask (seen in the gradient) must be the forward one.
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    w = torch.ones(4096, requires_grad=True)
    y = tensor_parallel.checkpoint(dropout_in_fork, False, w)
    y.sum().backward()

    return {
        "idempotent": idempotent,
        "outside_unchanged": outside_unchanged,
        "fork_1": fork_1,
        "fork_2": fork_2,
        "fork_1_again": fork_1_again,
        "fork_expected": fork_expected,
        "default": default,
        "default_again": default_again,
        "default_expected": default_expected,
        "checkpoint_out": y.detach(),
        "checkpoint_grad": w.grad,
        "warnings": warnings,
    }


# --- tests ------------------------------------------------------------------------------------


def _all_checks(rank: int, world_size: int) -> dict:
    # One spawn for all checks: importing megatron costs ~5 s per process on 2 cores, the checks
    # themselves well under a second. A failure on any rank aborts the whole run (no hang).
    return {
        "rng": _rng_worker(rank, world_size),
        "tp": _tensor_parallel_worker(rank, world_size),
        "pp": _pipeline_parallel_worker(rank, world_size),
    }


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_in_processes(_all_checks, 2, timeout_s=300)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= RTOL, f"{what}: max |difference| / max |expected| = {error:.2e} > {RTOL:.0e}"


def _assert_grads_close(grads: dict, ref_grads: dict) -> None:
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        _assert_close(grads[name], ref, f"grad {name}")


def test_tensor_parallel_2_equals_single_process(results: list[dict]) -> None:
    for out in (r["tp"] for r in results):
        assert out["loss"].isfinite().all() and out["loss"].mean() > 0
        _assert_close(out["loss"], out["ref_loss"], "per-token loss")
        _assert_grads_close(out["grads"], out["ref_grads"])
        # Same seed, same weights (use_cpu_initialization): nothing had to be loaded.
        assert all(out["same_init"].values()), out["same_init"]


def test_pipeline_parallel_2_1f1b_equals_single_process(results: list[dict]) -> None:
    first, last = (r["pp"] for r in results)
    assert first["schedule"] == "forward_backward_pipelining_without_interleaving"
    assert torch.equal(first["tied_weight"], last["tied_weight"])
    assert first["losses"] is None  # losses live on the last stage only
    _assert_close(last["losses"], last["ref_losses"], "microbatch losses")
    ref_grads = first["ref_grads"]
    grads = {**first["grads"], **last["grads"]}
    # The last stage's output_layer is the tied embedding: its gradient was all-reduced with the
    # first stage's, so both hold the reference's full gradient of the shared weight.
    _assert_close(
        grads.pop("output_layer.weight"),
        ref_grads["embedding.word_embeddings.weight"],
        "grad output_layer.weight (tied)",
    )
    _assert_grads_close(grads, ref_grads)


def _enable_with_cuda_present(rank: int, world: int) -> dict:
    from divprec.parallel import cpu

    current_device = torch.cuda.current_device
    torch.cuda.is_available = lambda: True  # this fresh process only
    return {
        "returned": cpu.enable_cpu_execution(),
        "enabled": cpu.is_cpu_execution_enabled(),
        "untouched": torch.cuda.current_device is current_device,
    }


def test_enable_does_nothing_when_cuda_is_available() -> None:
    # A fresh process: other tests may have enabled the bridge in this one.
    (out,) = run_in_processes(_enable_with_cuda_present, 1)
    assert out == {"returned": False, "enabled": False, "untouched": True}


def test_enable_is_idempotent_and_rng_tracker_fork_restores_state(results: list[dict]) -> None:
    for rank, out in enumerate(r["rng"] for r in results):
        assert out["idempotent"], rank
        assert out["outside_unchanged"], rank
        assert out["warnings"] == [], rank
        assert not torch.equal(out["fork_1"], out["fork_2"]), rank
        for a, b in [
            ("fork_1", "fork_1_again"),
            ("fork_1", "fork_expected"),
            ("default", "default_again"),
            ("default", "default_expected"),
            ("checkpoint_grad", "checkpoint_out"),
        ]:
            assert torch.equal(out[a], out[b]), (rank, a, b)
    # Tensor-parallel ranks draw different masks inside the fork, the same ones outside it.
    assert not torch.equal(results[0]["rng"]["fork_1"], results[1]["rng"]["fork_1"])
    assert torch.equal(results[0]["rng"]["default"], results[1]["rng"]["default"])
