"""Model architecture configuration (the Hydra group ``model``): a Qwen3-style decoder, dense or MoE."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """A decoder with RMSNorm, SwiGLU, RoPE, grouped-query attention and QK-norm.

    ``num_experts`` set makes every layer's MLP a mixture of experts routed by megatron-core's
    router. ``moe_router_expert_bias`` turns on auxiliary-loss-free load balancing: a per-expert
    bias on the routing scores, updated from the observed load (DeepSeek-V3).
    """

    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: int = 2  # KV heads (GQA)
    kv_channels: int | None = None  # head dim; None: hidden_size / num_attention_heads
    vocab_size: int | None = None  # None: the tokenizer's vocabulary
    make_vocab_size_divisible_by: int = 128  # the padded vocabulary divides by this x tensor
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    qk_layernorm: bool = True
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Mixture of experts (None: dense).
    num_experts: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_router_topk: int = 2
    moe_router_score_function: str = "sigmoid"  # "sigmoid" | "softmax"
    moe_router_expert_bias: bool = True  # auxiliary-loss-free balancing
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None and self.num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tokenizer_vocab: int, tensor_parallel: int) -> int:
        """The embedding rows: the vocabulary rounded up so every tensor-parallel shard is equal."""
        vocab = self.vocab_size or tokenizer_vocab
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-vocab // multiple) * multiple
