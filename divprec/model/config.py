"""Model architecture configuration (the Hydra group ``model``): a Qwen3-style decoder, dense or MoE."""

from __future__ import annotations

from dataclasses import dataclass, field

RECOMPUTE_MODES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core's selective recompute modules that exist in these layers (no MLA, no shared experts;
# moe_act needs grouped GEMM, which only Transformer Engine provides here; megatron-core 0.16.1's
# output-discarding checkpoint behind "layernorm" calls Transformer Engine's FP8 state even without
# FP8, so it cannot run on the local layers).
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe")


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
    # How the local experts run without Transformer Engine: "grouped" (two grouped GEMMs,
    # divprec.model.grouped_experts), "sequential" (megatron-core's loop over experts) or "auto"
    # (grouped on CUDA in bf16, else sequential). Same parameters and checkpoints either way.
    moe_experts: str = "auto"
    # megatron-core's fusions that need no Transformer Engine: SwiGLU (bias_activation_fusion:
    # saves the MLP's input only, recomputes the activation in its backward) and bias-dropout-add,
    # both torch.compile'd. "auto": on with CUDA, off on CPU (seconds of compilation for little
    # gain); "on" / "off" force it. The same function either way.
    fusions: str = "auto"
    # Activation recompute (see the class docstring).
    recompute: str = "none"  # "none" | "selective" | "full"
    recompute_method: str = "uniform"  # full only: "uniform" | "block"
    recompute_num_layers: int = 1  # full only: chunk size (uniform) / layers per stage (block)
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])  # selective only

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


def validate_recompute(cfg: ModelConfig, pipeline: int) -> None:
    """Raise ValueError (one line: key and fix) for a recompute setting megatron-core cannot run.

    ``pipeline``: the pipeline-parallel size (``full`` counts layers per stage).
    """
    if cfg.recompute not in RECOMPUTE_MODES:
        raise ValueError(f"model.recompute={cfg.recompute!r}: use none, selective or full")
    if cfg.recompute == "full":
        if cfg.recompute_method not in RECOMPUTE_METHODS:
            raise ValueError(
                f"model.recompute_method={cfg.recompute_method!r}: use uniform or block"
            )
        per_stage = cfg.num_layers // pipeline
        if not 1 <= cfg.recompute_num_layers <= per_stage:
            raise ValueError(
                f"model.recompute_num_layers={cfg.recompute_num_layers} must be in [1, "
                f"{per_stage}] (layers per pipeline stage)"
            )
        if cfg.recompute_method == "uniform" and per_stage % cfg.recompute_num_layers:
            raise ValueError(
                f"model.recompute_num_layers={cfg.recompute_num_layers} does not divide the "
                f"{per_stage} layers per pipeline stage: with recompute_method=uniform choose a "
                "divisor (or use recompute_method=block)"
            )
    if cfg.recompute == "selective":
        unknown = [m for m in cfg.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown or not cfg.recompute_modules:
            raise ValueError(
                f"model.recompute_modules={list(cfg.recompute_modules)}: choose from "
                f"{list(RECOMPUTE_MODULES)} (at least one)"
            )
        if "moe" in cfg.recompute_modules and not cfg.is_moe:
            raise ValueError("model.recompute_modules: moe needs a MoE model (model.num_experts)")
        if "mlp" in cfg.recompute_modules and cfg.is_moe:
            raise ValueError(
                "model.recompute_modules: mlp recomputes dense MLPs only; use moe for a MoE model"
            )


MOE_EXPERT_IMPLEMENTATIONS = ("auto", "grouped", "sequential")
FUSION_MODES = ("auto", "on", "off")


def validate_fusions(cfg: ModelConfig) -> None:
    if cfg.fusions not in FUSION_MODES:
        raise ValueError(f"model.fusions={cfg.fusions!r}: use one of {', '.join(FUSION_MODES)}")


def validate_moe_experts(cfg: ModelConfig) -> None:
    if cfg.moe_experts not in MOE_EXPERT_IMPLEMENTATIONS:
        raise ValueError(
            f"model.moe_experts={cfg.moe_experts!r}: use one of "
            f"{', '.join(MOE_EXPERT_IMPLEMENTATIONS)}"
        )
