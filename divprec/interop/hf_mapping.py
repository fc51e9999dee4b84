"""divprec's model <-> Hugging Face transformers classes: the config fields and every tensor.

Dense models are ``Qwen3ForCausalLM``. Mixtures of experts are ``Dots1ForCausalLM``: its attention
is Qwen3's (per-head q/k RMSNorm, full rotary, GQA) and its router is DeepSeek-V3's, which is
megatron-core's sigmoid routing with the aux-loss-free expert bias: sigmoid scores in fp32, the
bias (``e_score_correction_bias``) added for the top-k choice only, the chosen scores divided by
their sum (+1e-20) when top-k > 1, times a scaling factor (1). With one expert group
(``n_group = topk_group = 1``) its group-limited top-k is plain top-k, and with
``n_shared_experts = 0`` its shared expert has width 0 and adds exactly zero. Qwen3-MoE cannot
be used: it routes by softmax and has no router bias.

The tensors are pure renames and splits (bit-exact both ways):
- megatron's fused ``linear_qkv`` rows are, per query group, [the group's query heads; its key
  head; its value head]; they split into ``q_proj`` / ``k_proj`` / ``v_proj``;
- ``linear_fc1`` rows are [gate; up] (SwiGLU): ``gate_proj`` / ``up_proj``;
- the embedding and output layer lose the rows that pad the vocabulary for tensor parallelism
  (never a token; divprec's evaluation drops their logits too);
- experts are written one module per expert (``mlp.experts.{e}.gate_proj.weight``, the layout
  of published MoE checkpoints, which transformers fuses when it loads them).
"""

from __future__ import annotations

from typing import Any

import torch

from divprec.model.config import ModelConfig

DENSE_ARCHITECTURE = "Qwen3ForCausalLM"
MOE_ARCHITECTURE = "Dots1ForCausalLM"
_MODEL_TYPES = {DENSE_ARCHITECTURE: "qwen3", MOE_ARCHITECTURE: "dots1"}


class NotExpressible(ValueError):
    """A model the target class cannot express; the message names the field."""


# --- config ------------------------------------------------------------------------------------


def check_expressible(cfg: ModelConfig) -> None:
    """Raise :class:`NotExpressible` naming the first ``model.*`` field the HF class lacks."""
    target = MOE_ARCHITECTURE if cfg.is_moe else DENSE_ARCHITECTURE
    if not cfg.qk_layernorm:
        raise NotExpressible(
            f"model.qk_layernorm=false: {target} always normalises queries and keys per head"
        )
    if cfg.is_moe:
        if cfg.moe_router_score_function != "sigmoid":
            raise NotExpressible(
                f"model.moe_router_score_function={cfg.moe_router_score_function!r}: "
                f"{MOE_ARCHITECTURE} routes by sigmoid scores (train with sigmoid to export)"
            )
        if cfg.num_experts < 2:
            raise NotExpressible(
                f"model.num_experts={cfg.num_experts}: {MOE_ARCHITECTURE}'s router needs at least 2"
            )


def hf_config(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    max_position_embeddings: int,
    special_ids: dict[str, int],
    dtype: torch.dtype,
) -> dict[str, Any]:
    """config.json for ``cfg`` (``vocab_size``: the tokenizer's, without padding rows)."""
    check_expressible(cfg)
    architecture = MOE_ARCHITECTURE if cfg.is_moe else DENSE_ARCHITECTURE
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": _MODEL_TYPES[architecture],
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        "rope_theta": float(cfg.rotary_base),  # the key transformers 4.x reads
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "initializer_range": cfg.init_method_std,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        **special_ids,
    }
    if cfg.is_moe:
        config.update(
            n_routed_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_router_topk,
            moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
            n_shared_experts=0,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            # megatron-core normalises the chosen sigmoid scores only when it chooses several.
            norm_topk_prob=cfg.moe_router_topk > 1,
            routed_scaling_factor=1.0,
            max_window_layers=cfg.num_layers,
        )
    return config


def model_config_from_hf(hf: dict[str, Any], name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a Qwen3 config.json (``hf``: its parsed JSON)."""
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "qwen3" or architectures[:1] != [DENSE_ARCHITECTURE]:
        raise NotExpressible(
            f"config.json model_type={hf.get('model_type')!r}, architectures={architectures}: "
            f"only {DENSE_ARCHITECTURE} (model_type qwen3) is imported"
        )
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta")}
    if rope.get("rope_type", "default") != "default":
        raise NotExpressible(
            f"config.json rope_parameters.rope_type={rope['rope_type']!r}: divprec has plain RoPE"
        )
    for key in ("attention_bias", "use_sliding_window"):
        if hf.get(key):
            raise NotExpressible(f"config.json {key}=true: divprec's decoder has no such option")
    if hf.get("hidden_act", "silu") != "silu":
        raise NotExpressible(f"config.json hidden_act={hf['hidden_act']!r}: divprec uses SwiGLU")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        name=name,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        rotary_base=float(rope.get("rope_theta") or 10000.0),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qk_layernorm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
    )


# --- tensors -----------------------------------------------------------------------------------

# Per-layer tensors that are renamed only: megatron (under decoder.layers.{i}.) -> HF (under
# model.layers.{i}.).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}


def _qkv_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    """(query groups, query rows per group, head dim) of the fused QKV weight."""
    groups, hn = cfg.num_query_groups, cfg.head_dim
    return groups, cfg.num_attention_heads // groups * hn, hn


def _split_qkv(weight: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    groups, q_rows, hn = _qkv_sizes(cfg)
    per_group = weight.reshape(groups, q_rows + 2 * hn, -1)  # [ng, (np/ng + 2) hn, h]
    q, k, v = per_group.split([q_rows, hn, hn], dim=1)
    return tuple(t.reshape(-1, weight.shape[-1]).contiguous() for t in (q, k, v))  # [rows, h]


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    groups, q_rows, hn = _qkv_sizes(cfg)
    h = q.shape[-1]
    per_group = torch.cat(
        [q.reshape(groups, q_rows, h), k.reshape(groups, hn, h), v.reshape(groups, hn, h)], dim=1
    )  # [ng, (np/ng + 2) hn, h]
    return per_group.reshape(-1, h)


def to_hf_tensors(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int
) -> dict[str, torch.Tensor]:
    """HF names -> tensors for the megatron ``tensors`` (GPTModel state dict, tensor = pipeline
    = 1) of ``cfg``; ``vocab_size`` rows are kept of the embedding and output layer."""
    check_expressible(cfg)
    out = {"model.embed_tokens.weight": tensors["embedding.word_embeddings.weight"][:vocab_size]}
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for name, hf_name in _LAYER_RENAMES.items():
            out[dst + hf_name] = tensors[src + name]
        q, k, v = _split_qkv(tensors[src + "self_attention.linear_qkv.weight"], cfg)
        out |= {dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k}
        out[dst + "self_attn.v_proj.weight"] = v
        if not cfg.is_moe:
            gate, up = tensors[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)  # [gate; up]
            out[dst + "mlp.gate_proj.weight"] = gate.contiguous()
            out[dst + "mlp.up_proj.weight"] = up.contiguous()
            out[dst + "mlp.down_proj.weight"] = tensors[src + "mlp.linear_fc2.weight"]
            continue
        out[dst + "mlp.gate.weight"] = tensors[src + "mlp.router.weight"]
        bias = tensors.get(src + "mlp.router.expert_bias")
        if bias is None:  # trained without the expert bias: routing on the plain scores
            bias = torch.zeros(cfg.num_experts, dtype=torch.float32)
        out[dst + "mlp.gate.e_score_correction_bias"] = bias.float()
        for e in range(cfg.num_experts):
            expert = f"{src}mlp.experts.local_experts.{e}."
            gate, up = tensors[expert + "linear_fc1.weight"].chunk(2, dim=0)
            out[f"{dst}mlp.experts.{e}.gate_proj.weight"] = gate.contiguous()
            out[f"{dst}mlp.experts.{e}.up_proj.weight"] = up.contiguous()
            out[f"{dst}mlp.experts.{e}.down_proj.weight"] = tensors[expert + "linear_fc2.weight"]
        # The width-0 shared expert (n_shared_experts = 0): present, so that the load is complete.
        h, dtype = cfg.hidden_size, out[dst + "mlp.gate.weight"].dtype
        for name, shape in (("gate_proj", (0, h)), ("up_proj", (0, h)), ("down_proj", (h, 0))):
            out[f"{dst}mlp.shared_experts.{name}.weight"] = torch.empty(shape, dtype=dtype)
    out["model.norm.weight"] = tensors["decoder.final_layernorm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = tensors["output_layer.weight"][:vocab_size]
    return {k: v.contiguous() for k, v in out.items()}


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with zero rows appended up to ``rows`` (the padded vocabulary)."""
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def from_hf_tensors(
    hf: dict[str, torch.Tensor], cfg: ModelConfig, vocab_rows: int
) -> dict[str, torch.Tensor]:
    """The megatron GPTModel state dict (tensor = pipeline = 1) of a Qwen3 model's tensors
    ``hf``; the embedding (and output layer) padded with zero rows to ``vocab_rows``."""
    out = {
        "embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"], vocab_rows)
    }
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for name, hf_name in _LAYER_RENAMES.items():
            out[dst + name] = hf[src + hf_name]
        attn = src + "self_attn."
        out[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], cfg
        )
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )  # [gate; up]
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], vocab_rows)
    return {k: v.contiguous() for k, v in out.items()}
