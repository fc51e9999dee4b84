"""Model FLOPs per token (for TFLOP/s and MFU) and parameter counts of a :class:`ModelConfig`.

Counted: matrix multiplications, 2 FLOPs per multiply-add. Ignored: norms, RoPE, softmax,
activations, residual adds, the embedding lookup (all O(hidden) per token, < 1% at useful sizes).

Per token and layer (h hidden, d head dim, n_q / n_kv query / KV heads, s sequence length):
- attention projections: QKV 2*h*(n_q + 2*n_kv)*d (GQA-aware), output 2*n_q*d*h;
- attention scores and context (QK^T and PV): 2 * 2*n_q*d * (s+1)/2. Causal: query i attends to i
  keys, (s+1)/2 on average, which is the work of causal kernels that skip masked blocks (flash /
  cuDNN SDPA); an implementation that computes the full s x s scores does about twice this;
- dense SwiGLU MLP: 3 matrices, 2*3*h*f;
- MoE: router 2*h*E plus the top-k active experts, k * 2*3*h*f_moe (inactive experts cost nothing).
Plus the output layer 2*h*V once per token. Training = forward + backward = 3 x forward (backward
computes gradients w.r.t. inputs and weights, 2 x forward); activation recomputation is not counted
(model FLOPs, as MFU is defined).
"""

from __future__ import annotations

from divprec.model.config import ModelConfig

__all__ = ["flops_per_token", "forward_flops_per_token", "parameter_count"]


def forward_flops_per_token(cfg: ModelConfig, seq_length: int, vocab_size: int) -> float:
    """Forward-pass FLOPs per token (see the module docstring for what is counted)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q_width, kv_width = cfg.num_attention_heads * d, cfg.num_query_groups * d
    attention = 2 * h * (q_width + 2 * kv_width) + 2 * q_width * h
    attention += 2 * 2 * q_width * (seq_length + 1) / 2  # causal QK^T and PV
    if cfg.is_moe:
        f_moe = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        mlp = 2 * h * cfg.num_experts + cfg.moe_router_topk * 2 * 3 * h * f_moe
    else:
        mlp = 2 * 3 * h * cfg.ffn_hidden_size
    return float(cfg.num_layers * (attention + mlp) + 2 * h * vocab_size)


def flops_per_token(cfg: ModelConfig, seq_length: int, vocab_size: int) -> float:
    """Training (forward + backward) FLOPs per token: 3 x :func:`forward_flops_per_token`.

    ``vocab_size``: the output layer's rows as computed (the padded vocabulary).
    """
    return 3.0 * forward_flops_per_token(cfg, seq_length, vocab_size)


def parameter_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of the full model built by :func:`divprec.model.builder.build_model` (all experts;
    a tied output layer counted once)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q_width, kv_width = cfg.num_attention_heads * d, cfg.num_query_groups * d
    attention = h * (q_width + 2 * kv_width) + q_width * h + (2 * d if cfg.qk_layernorm else 0)
    if cfg.is_moe:
        f_moe = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
        mlp = cfg.num_experts * h + cfg.num_experts * 3 * h * f_moe
    else:
        mlp = 3 * h * cfg.ffn_hidden_size
    layer = 2 * h + attention + mlp  # + input and pre-MLP norms
    embeddings = vocab_size * h * (1 if cfg.tie_embeddings else 2)
    return cfg.num_layers * layer + h + embeddings  # + final norm
