"""divprec.model.builder on CPU: layout-invariant models, MoE, parameter counts.

All checks run in one spawn of two gloo processes (importing megatron costs ~5 s per process). Each
worker builds the single-process (TP = PP = 1) references itself, then re-initialises megatron's
parallel state for TP = 2 and PP = 2 and builds the same configurations from the same seed, with
no weights copied: equality with the reference is the layout invariance of the initialisation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from divprec.model.config import ModelConfig
from divprec.model.flops import parameter_count
from divprec.parallel.spawn import run_in_processes

VOCAB, SEQ, BATCH, SEED = 256, 32, 2, 1234
DENSE = ModelConfig()  # the `tiny` defaults: 4 layers, h=128, 4 heads, 2 KV groups, QK-norm
MOE = ModelConfig(num_experts=4, moe_ffn_hidden_size=64, moe_router_topk=2)
FC1 = "linear_fc1.weight"  # SwiGLU [gate; up]; rank r holds [gate_r; up_r]
TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32, different reduction order across layouts


# --- helpers that run inside the spawned processes ---------------------------------------------


def _setup(tp: int = 1, pp: int = 1) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    model_parallel_cuda_manual_seed(SEED)


def _build(cfg: ModelConfig, dtype: torch.dtype = torch.float32, sp: bool = False):
    from divprec.model.builder import build_stage

    return build_stage(
        cfg,
        vocab_size=VOCAB,
        seq_length=SEQ,
        params_dtype=dtype,
        seed=SEED,
        sequence_parallel=sp,
        use_transformer_engine=False,
    )


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return {
        "input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ),
    }


def _logits(model: torch.nn.Module) -> torch.Tensor:
    b = _batch()
    return model(b["input_ids"], b["position_ids"], None)  # [b, s, V/tp]


def _shaped_loss(logits: torch.Tensor) -> torch.Tensor:
    from divprec.loss import ShapedLossConfig, vocab_parallel_shaped_loss

    cfg = ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1)
    return vocab_parallel_shaped_loss(logits, _batch()["labels"], cfg)[0]  # megatron's TP group


def _gather_tp(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(out, t.contiguous(), group=group)
    return out


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights of a TP-sharded model, written without divprec.model.init's helpers."""
    full = {}
    for name, p in model.named_parameters():
        if not getattr(p, "tensor_model_parallel", False):
            full[name] = p.detach().clone()
            continue
        shards = _gather_tp(p.detach(), p.partition_dim)
        if name.endswith(FC1):  # [gate_0; up_0], [gate_1; up_1] -> [gate_0; gate_1; up_0; up_1]
            halves = [s.chunk(2, dim=0) for s in shards]
            full[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            full[name] = torch.cat(shards, dim=p.partition_dim)
    return full


def _global_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A pipeline stage's weights keyed by their names in the single-stage model."""
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        out[".".join(parts)] = p.detach().clone()
    return out


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _expert_run(cfg: ModelConfig, dtype: torch.dtype = torch.float32, sp: bool = False) -> dict:
    """One forward and backward of a MoE model: its loss, gradients and checkpoint layout."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    model = _build(cfg, dtype=dtype, sp=sp)
    model.train()
    loss = _shaped_loss(_logits(model)).mean()
    loss.backward()
    sharded = {
        sh.key: (sh.global_shape, sh.global_offset)
        for sh in nested_values(model.sharded_state_dict())
        if isinstance(sh, ShardedTensor)
    }
    return {
        "experts": type(model.decoder.layers[0].mlp.experts).__name__,
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "state_keys": sorted(model.state_dict()),
        "sharded": sharded,
    }


def _expert_implementations(sp: bool = False) -> dict:
    """The same MoE model with megatron-core's SequentialMLP and divprec's GroupedExperts."""
    out = {}
    for impl in ("sequential", "grouped"):
        cfg = dataclasses.replace(MOE, moe_experts=impl)
        out[impl] = _expert_run(cfg, sp=sp)
        if not sp:
            out[f"{impl}_bf16"] = _expert_run(cfg, dtype=torch.bfloat16)
    return out


def _reference_checks() -> dict:
    """TP = PP = 1: references, MoE, bf16, SDPA vs megatron's DotProductAttention, counts."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    _setup()
    out: dict = {}
    dense = _build(DENSE)
    logits = _logits(dense)
    out["dense"] = {
        "logits": logits.detach(),
        "loss": _shaped_loss(logits).detach(),
        "weights": {n: p.detach().clone() for n, p in dense.named_parameters()},
        "numel": _numel(dense),
    }
    # The same weights through megatron's local attention (materialised scores, repeated K/V).
    for layer in dense.decoder.layers:
        layer.self_attention.core_attention = DotProductAttention(
            dense.config, layer.layer_number, AttnMaskType.causal, "self"
        )
    out["dense"]["megatron_attention_logits"] = _logits(dense).detach()

    tied = _build(dataclasses.replace(DENSE, tie_embeddings=True))
    out["tied"] = {"weights": {n: p.detach().clone() for n, p in tied.named_parameters()}}
    out["tied"]["numel"] = _numel(tied)

    bf16 = _build(DENSE, dtype=torch.bfloat16)
    out["bf16"] = {"logits": _logits(bf16).detach(), "dtype": next(bf16.parameters()).dtype}

    moe = _build(MOE)
    moe.train()
    logits = _logits(moe)
    _shaped_loss(logits).mean().backward()
    routers = [layer.mlp.router for layer in moe.decoder.layers]
    out["moe"] = {
        "logits": logits.detach(),
        "numel": _numel(moe),
        "expert_bias": [r.expert_bias.clone() for r in routers],
        "expert_bias_is_buffer": all(
            "expert_bias" in dict(r.named_buffers())
            and "expert_bias" not in dict(r.named_parameters())
            for r in routers
        ),
        "tokens_per_expert": [r.local_tokens_per_expert.clone() for r in routers],
        "grads": {n: p.grad.clone() for n, p in moe.named_parameters()},
        "weights": {n: p.detach().clone() for n, p in moe.named_parameters()},
        "router_std": torch.stack([r.weight.detach().std() for r in routers]),
    }
    out["experts"] = _expert_implementations()
    out["fusions"] = {
        name: {mode: _fusion_run(dataclasses.replace(cfg, fusions=mode)) for mode in ("off", "on")}
        for name, cfg in (("dense", DENSE), ("moe", MOE))
    }
    return out


def _fusion_run(cfg: ModelConfig) -> dict:
    """One forward and backward: the loss, the gradients and whether megatron fused SwiGLU."""
    model = _build(cfg)
    model.train()
    loss = _shaped_loss(_logits(model)).mean()
    loss.backward()
    return {
        "fused": model.config.bias_activation_fusion and model.config.bias_dropout_fusion,
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


def _tensor_parallel_checks() -> dict:
    out = {}
    for key, cfg, sp in (("dense", DENSE, False), ("dense_sp", DENSE, True), ("moe", MOE, True)):
        _setup(tp=2)
        model = _build(cfg, sp=sp)
        local = _logits(model)
        out[key] = {
            "local_vocab": local.shape[-1],
            "logits": torch.cat(_gather_tp(local.detach(), -1), dim=-1),
            "loss": _shaped_loss(local).detach(),
            "weights": _full_weights(model),
        }
    _setup(tp=2)
    out["experts"] = _expert_implementations(sp=True)
    return out


def _pipeline_parallel_checks() -> dict:
    from megatron.core import parallel_state

    out = {}
    for key, cfg in (("dense", DENSE), ("tied", dataclasses.replace(DENSE, tie_embeddings=True))):
        _setup(pp=2)
        model = _build(cfg)
        out[key] = {
            "first": parallel_state.is_pipeline_first_stage(),
            "last": parallel_state.is_pipeline_last_stage(),
            "weights": _global_names(model),
            "numel": _numel(model),
        }
    return out


def _all_checks(rank: int, world_size: int) -> dict:
    # megatron's jit_fuser is torch.compile: ~20 s of CPU compilation per process for the MoE
    # router's helpers. Eager mode computes the same.
    import torch._dynamo

    from divprec.parallel.cpu import enable_cpu_execution

    torch._dynamo.config.disable = True
    enable_cpu_execution()
    return {
        "ref": _reference_checks(),
        "tp": _tensor_parallel_checks(),
        "pp": _pipeline_parallel_checks(),
    }


# --- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_in_processes(_all_checks, 2, timeout_s=300)


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(got[name], w), name


def test_tensor_parallel_2_is_the_same_function(results: list[dict]) -> None:
    ref = results[0]["ref"]
    for rank, out in enumerate(r["tp"] for r in results):
        for key in ("dense", "dense_sp", "moe"):
            want = ref["moe" if key == "moe" else "dense"]
            got = out[key]
            assert got["local_vocab"] == VOCAB // 2, (rank, key)
            _assert_same_weights(got["weights"], want["weights"])  # same seed, same full weights
            torch.testing.assert_close(got["logits"], want["logits"], **TOL, msg=f"{rank} {key}")
            if key != "moe":
                torch.testing.assert_close(got["loss"], want["loss"], **TOL, msg=f"{rank} {key}")


def test_pipeline_stages_concatenate_to_the_single_stage_model(results: list[dict]) -> None:
    ref = results[0]["ref"]
    for key in ("dense", "tied"):
        first, last = (r["pp"][key] for r in results)
        assert (first["first"], first["last"], last["first"], last["last"]) == (
            True,
            False,
            False,
            True,
        )
        want = ref[key]["weights"]
        stages = {**first["weights"], **last["weights"]}
        assert not first["weights"].keys() & (last["weights"].keys() - {"output_layer.weight"})
        assert {n for n in first["weights"] if n.startswith("decoder.layers.")} == {
            n
            for n in want
            if n.startswith("decoder.layers.0.") or n.startswith("decoder.layers.1.")
        }
        if key == "tied":  # the last stage's copy of the tied embedding starts equal to it
            assert torch.equal(
                stages.pop("output_layer.weight"), want["embedding.word_embeddings.weight"]
            )
        _assert_same_weights(stages, want)


def test_local_attention_is_sdpa_and_matches_megatron(results: list[dict]) -> None:
    dense = results[0]["ref"]["dense"]
    torch.testing.assert_close(dense["megatron_attention_logits"], dense["logits"], **TOL)


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_fusions_compute_the_unfused_function(results: list[dict], model: str) -> None:
    # Run eagerly here (dynamo off): megatron-core's fused SwiGLU with its own backward formula
    # and the fused bias-dropout-add against the plain ops. Compiled, on CUDA: the GPU check.
    runs = results[0]["ref"]["fusions"][model]
    assert (runs["off"]["fused"], runs["on"]["fused"]) == (False, True)
    torch.testing.assert_close(runs["on"]["loss"], runs["off"]["loss"], rtol=1e-6, atol=1e-7)
    assert runs["on"]["grads"].keys() == runs["off"]["grads"].keys()
    for name, grad in runs["off"]["grads"].items():
        torch.testing.assert_close(runs["on"]["grads"][name], grad, **TOL, msg=name)


def test_bf16_model(results: list[dict]) -> None:
    ref = results[0]["ref"]
    assert ref["bf16"]["dtype"] == torch.bfloat16
    assert ref["bf16"]["logits"].dtype == torch.bfloat16
    # Same seed: the float32 weights rounded to bf16, so close logits.
    torch.testing.assert_close(
        ref["bf16"]["logits"].float(), ref["dense"]["logits"], rtol=0.05, atol=0.05
    )


def test_moe_forward_backward_with_expert_bias(results: list[dict]) -> None:
    moe = results[0]["ref"]["moe"]
    assert moe["logits"].shape == (BATCH, SEQ, VOCAB) and moe["logits"].isfinite().all()
    assert moe["expert_bias_is_buffer"]
    for bias, counts in zip(moe["expert_bias"], moe["tokens_per_expert"], strict=True):
        assert bias.dtype == torch.float32 and torch.equal(bias, torch.zeros(4))
        # Every token counted once for each of its top-2 experts (the bias update's input).
        assert counts.sum() == BATCH * SEQ * MOE.moe_router_topk
    for name, grad in moe["grads"].items():
        assert grad.isfinite().all(), name
        assert grad.abs().sum() > 0, name  # router and every expert take part
    torch.testing.assert_close(
        moe["router_std"], torch.full((4,), MOE.init_method_std), rtol=0.1, atol=0
    )


def test_initial_values(results: list[dict]) -> None:
    w = results[0]["ref"]["dense"]["weights"]
    std = DENSE.init_method_std
    for name, p in w.items():
        if "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            scaled = std / (2 * DENSE.num_layers) ** 0.5
            assert abs(p.std().item() - scaled) < 0.1 * scaled, name
        else:
            assert abs(p.std().item() - std) < 0.1 * std, name
    # Distinct parameters get distinct draws.
    assert not torch.equal(
        w["decoder.layers.0.mlp.linear_fc1.weight"], w["decoder.layers.1.mlp.linear_fc1.weight"]
    )


def test_parameter_counts(results: list[dict]) -> None:
    ref = results[0]["ref"]
    # Hand formulas: tests/unit/test_model_flops.py::test_parameter_count_by_hand.
    assert ref["dense"]["numel"] == parameter_count(DENSE, VOCAB) == 853376
    assert ref["tied"]["numel"] == 853376 - VOCAB * 128
    assert ref["moe"]["numel"] == parameter_count(MOE, VOCAB) == 658816
    first, last = (r["pp"]["dense"] for r in results)
    assert first["numel"] + last["numel"] == 853376


@pytest.mark.parametrize("layout", ["ref", "tp"])
def test_grouped_experts_equal_sequential_experts(results: list[dict], layout: str) -> None:
    """Grouped GEMM experts: the same loss and gradients as megatron-core's per-expert loop, at
    one process and at TP2 with sequence parallel, and the same checkpoint layout."""
    for rank_result in results:
        runs = rank_result[layout]["experts"]
        seq, grouped = runs["sequential"], runs["grouped"]
        assert (seq["experts"], grouped["experts"]) == ("SequentialMLP", "GroupedExperts")
        torch.testing.assert_close(grouped["loss"], seq["loss"], rtol=1e-5, atol=1e-6)
        assert grouped["grads"].keys() == seq["grads"].keys()
        for name, grad in seq["grads"].items():
            torch.testing.assert_close(grouped["grads"][name], grad, **TOL, msg=name)
        # Checkpoints interchange: the same tensors under the same keys and shards.
        assert grouped["state_keys"] == seq["state_keys"]
        assert grouped["sharded"] == seq["sharded"]
        if layout == "ref":  # bf16: the same rounding of the GEMMs' inputs and outputs
            seq16, grouped16 = runs["sequential_bf16"], runs["grouped_bf16"]
            torch.testing.assert_close(grouped16["loss"], seq16["loss"], rtol=2e-2, atol=1e-2)
            for name, grad in seq16["grads"].items():
                want = grad.float()
                scale = want.abs().max().clamp(min=1e-12)
                error = (grouped16["grads"][name].float() - want).abs().max() / scale
                assert error < 2e-2, (name, error.item())
