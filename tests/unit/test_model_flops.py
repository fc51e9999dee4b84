"""flops_per_token and parameter_count against hand computations."""

from __future__ import annotations

import pytest

from divprec.model.config import ModelConfig
from divprec.model.flops import flops_per_token, forward_flops_per_token, parameter_count

# h=64, 4 query heads of d=16 (q width 64), 2 KV heads (kv width 32), f=128, 2 layers.
SMALL = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2
)
SEQ, VOCAB = 8, 100


def test_dense_flops_by_hand() -> None:
    cfg = ModelConfig(**SMALL)
    qkv = 2 * 64 * (64 + 2 * 32)  # 16384
    proj = 2 * 64 * 64  # 8192
    core = 2 * 2 * 64 * (8 + 1) / 2  # QK^T + PV, causal: 4.5 keys per query on average -> 1152
    mlp = 2 * 3 * 64 * 128  # 49152
    logits = 2 * 64 * 100  # 12800
    forward = 2 * (qkv + proj + core + mlp) + logits
    assert forward == 162560
    assert forward_flops_per_token(cfg, SEQ, VOCAB) == forward
    assert flops_per_token(cfg, SEQ, VOCAB) == 3 * 162560


def test_moe_flops_count_active_experts_and_router() -> None:
    cfg = ModelConfig(**SMALL, num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2)
    attention = 16384 + 8192 + 1152
    router = 2 * 64 * 4  # 512
    experts = 2 * (2 * 3 * 64 * 32)  # top-2 of 4: 24576
    forward = 2 * (attention + router + experts) + 12800
    assert forward == 114432
    assert flops_per_token(cfg, SEQ, VOCAB) == 3 * forward
    # Inactive experts cost nothing: more experts only grow the router.
    more = ModelConfig(**SMALL, num_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2)
    assert (
        flops_per_token(more, SEQ, VOCAB) - flops_per_token(cfg, SEQ, VOCAB) == 3 * 2 * 2 * 64 * 4
    )


def test_flops_are_six_per_matmul_parameter_plus_attention() -> None:
    # The familiar 6N: without the score/context matmuls, each weight of a matmul costs 6 FLOPs.
    cfg = ModelConfig(**SMALL)
    norms = 2 * 2 * 64 + 2 * 2 * 16 + 64
    matmul_params = parameter_count(cfg, VOCAB) - VOCAB * 64 - norms  # no embedding lookup, norms
    attention_core = 3 * 2 * 1152
    assert flops_per_token(cfg, SEQ, VOCAB) == pytest.approx(6 * matmul_params + attention_core)


def test_parameter_count_by_hand() -> None:
    # The `tiny` defaults: V=256, h=128, 4 layers, 4 heads of 32, 2 KV heads, f=384.
    layer = 128 + 128 * (128 + 2 * 64) + 2 * 32 + 128 * 128 + 128 + 128 * 2 * 384 + 384 * 128
    assert layer == 196928
    assert parameter_count(ModelConfig(), 256) == 4 * layer + 128 + 2 * 256 * 128 == 853376
    assert parameter_count(ModelConfig(tie_embeddings=True), 256) == 853376 - 256 * 128
    moe_layer = 128 + 32768 + 64 + 16384 + 128 + 4 * 128 + 4 * (128 * 2 * 64 + 64 * 128)
    assert moe_layer == 148288
    moe = ModelConfig(num_experts=4, moe_ffn_hidden_size=64)
    assert parameter_count(moe, 256) == 4 * moe_layer + 128 + 2 * 256 * 128 == 658816
