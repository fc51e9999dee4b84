"""divprec.interop.hf_mapping and the export's sharding, on tensors made here (no model, no I/O)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from divprec.interop.hf_export import shard
from divprec.interop.hf_mapping import (
    NotExpressible,
    check_expressible,
    from_hf_tensors,
    hf_config,
    model_config_from_hf,
    to_hf_tensors,
)
from divprec.model.config import ModelConfig

DENSE = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                    num_query_groups=2, kv_channels=8)  # fmt: skip


def _megatron_tensors(cfg: ModelConfig, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, hn = cfg.hidden_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * hn
    shapes = {"embedding.word_embeddings.weight": (rows, h), "decoder.final_layernorm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["output_layer.weight"] = (rows, h)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "pre_mlp_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv_rows, h),
            p + "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * hn),
            p + "self_attention.q_layernorm.weight": (hn,),
            p + "self_attention.k_layernorm.weight": (hn,),
            p + "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size, h),
            p + "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size),
        }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("tie", [False, True])
def test_dense_tensors_map_both_ways_bit_exactly(tie):
    cfg = dataclasses.replace(DENSE, tie_embeddings=tie)
    megatron = _megatron_tensors(cfg, rows=128)
    hf = to_hf_tensors(megatron, cfg, vocab_size=100)  # 28 padding rows dropped
    assert hf["model.embed_tokens.weight"].shape == (100, 32)
    assert ("lm_head.weight" in hf) == (not tie)
    # Query group 1's query heads are heads 2 and 3: rows [2 * 8, 4 * 8) of q_proj come from the
    # fused rows after group 0's [q0 q1 k0 v0] block.
    qkv = megatron["decoder.layers.0.self_attention.linear_qkv.weight"]
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q[16:32], qkv[32:48])
    assert torch.equal(hf["model.layers.0.self_attn.k_proj.weight"][8:], qkv[48:56])
    assert torch.equal(hf["model.layers.0.self_attn.v_proj.weight"][:8], qkv[24:32])
    fc1 = megatron["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(hf["model.layers.1.mlp.gate_proj.weight"], fc1[:48])
    assert torch.equal(hf["model.layers.1.mlp.up_proj.weight"], fc1[48:])

    back = from_hf_tensors(hf, cfg, vocab_rows=128)
    assert sorted(back) == sorted(megatron)
    for key, tensor in megatron.items():
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(back[key][:100], tensor[:100]) and not back[key][100:].any()
        else:
            assert torch.equal(back[key], tensor), key


def test_moe_config_routes_as_megatron_core():
    moe = dataclasses.replace(DENSE, num_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2)
    config = hf_config(moe, vocab_size=100, max_position_embeddings=64, special_ids={}, dtype=torch.float32)  # fmt: skip
    assert config["architectures"] == ["Dots1ForCausalLM"]
    assert (config["n_group"], config["topk_group"], config["n_shared_experts"]) == (1, 1, 0)
    assert config["norm_topk_prob"] and config["routed_scaling_factor"] == 1.0
    one = dataclasses.replace(moe, moe_router_topk=1)  # megatron-core: no normalisation for k = 1
    one_config = hf_config(one, vocab_size=100, max_position_embeddings=64, special_ids={}, dtype=torch.float32)  # fmt: skip
    assert not one_config["norm_topk_prob"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"qk_layernorm": False}, "model.qk_layernorm=false"),
        ({"num_experts": 4, "moe_router_score_function": "softmax"}, "model.moe_router_score_function"),
        ({"num_experts": 1}, "model.num_experts=1"),
    ],
)  # fmt: skip
def test_what_the_classes_cannot_express_is_named(change, field):
    with pytest.raises(NotExpressible, match=field.replace(".", r"\.")):
        check_expressible(dataclasses.replace(DENSE, **change))


def test_qwen3_config_imports_and_others_are_named():
    hf = hf_config(DENSE, vocab_size=100, max_position_embeddings=64, special_ids={}, dtype=torch.float32)  # fmt: skip
    model = model_config_from_hf(hf, "m")
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "head_dim", "rotary_base", "tie_embeddings"):  # fmt: skip
        assert getattr(model, field) == getattr(DENSE, field), field
    assert model.vocab_size == 100
    with pytest.raises(NotExpressible, match="attention_bias=true"):
        model_config_from_hf({**hf, "attention_bias": True}, "m")
    with pytest.raises(NotExpressible, match="only Qwen3ForCausalLM"):
        model_config_from_hf({**hf, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "m")  # fmt: skip


def test_shards_respect_the_size_and_keep_the_order():
    tensors = {f"t{i}": torch.zeros(10 * (i + 1)) for i in range(5)}  # 40, 80, ..., 200 bytes
    groups = shard(tensors, max_bytes=200)
    assert [list(g) for g in groups] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    big = shard({"a": torch.zeros(1), "big": torch.zeros(100), "b": torch.zeros(1)}, max_bytes=8)
    assert [list(g) for g in big] == [["a"], ["big"], ["b"]]  # a larger tensor goes alone
