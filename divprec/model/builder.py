"""Build the megatron-core GPT model of a :class:`ModelConfig` for one pipeline stage.

The model is a Qwen3-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention with QK-norm,
no biases, dense or mixture-of-experts MLPs. It returns vocab-parallel logits ``[b, s, V/tp]``
(never gathered); :func:`divprec.loss.vocab_parallel_shaped_loss` consumes them.

Backends:
- Transformer Engine layers when TE is importable and CUDA is available (``use_transformer_engine``
  None), or when asked for explicitly.
- Otherwise megatron-core's local layers (``get_gpt_layer_local_spec``) with two substitutions:
  * core attention is :class:`SDPAttention` (PyTorch ``scaled_dot_product_attention``: flash /
    memory-efficient kernels on GPU, fused CPU kernel on CPU). megatron's local
    ``DotProductAttention`` materialises the ``[b, np, s, s]`` score matrix (baddbmm + softmax +
    bmm) and repeats K/V for GQA; it has no SDPA path.
  * norms are :class:`RMSNorm` (torch's RMSNorm that also supports sequence parallelism: megatron's
    ``WrappedTorchNorm`` asserts ``not sequence_parallel``).

Weights are initialised by :func:`divprec.model.init.initialize_parameters`, layout-invariantly;
megatron only allocates them (its init methods are no-ops).

The caller initialises megatron's parallel state (``parallel_state.initialize_model_parallel``)
and its RNG tracker (``model_parallel_cuda_manual_seed``; megatron forks it around weight
allocation on GPU); on CPU it calls :func:`divprec.parallel.cpu.enable_cpu_execution` first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from divprec.model.config import ModelConfig
from divprec.model.grouped_experts import GroupedExperts, grouped_mm_available
from divprec.model.init import initialize_parameters

__all__ = [
    "RMSNorm",
    "SDPAttention",
    "build_model",
    "build_stage",
    "layer_spec",
    "te_available",
    "transformer_config",
]


# --- local layers ----------------------------------------------------------------------------


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's norm constructor, usable under sequence parallelism.

    With sequence parallelism each tensor-parallel rank normalises a slice of the sequence, so the
    weight gradient is partial. The ``sequence_parallel`` attribute marks it, and
    divprec.parallel.tp_grads sums its gradient over the tensor-parallel group (megatron's own
    ``finalize_model_grads`` is not used: DeepSpeed reduces the gradients).
    """

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: Any
    ) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class SDPAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Drop-in for megatron's ``DotProductAttention`` (same constructor and forward signature, same
    mask convention: ``attention_mask`` True = masked out; None with a causal mask type = causal).
    GQA is native (``enable_gqa``) instead of repeating K/V heads.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context parallelism needs Transformer Engine")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("SDPAttention supports vanilla softmax without sliding windows")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not implement apply_query_key_layer_scaling")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention: packed sequences / attention bias need TE")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, np_, hn = query.shape
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        attn_mask = None
        is_causal = False
        if attention_mask is not None:
            attn_mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq != key.shape[0]:
                raise ValueError("SDPAttention: implicit causal mask needs sq == sk")
            is_causal = True
        dropout_p = self.dropout_p if self.training else 0.0

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != np_,
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Heads are split over TP ranks: draw masks from the tensor-parallel RNG, as megatron.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


# --- configuration ---------------------------------------------------------------------------


def _left_for_divprec_init(tensor: torch.Tensor) -> torch.Tensor:
    return tensor  # values come from divprec.model.init.initialize_parameters


def te_available() -> bool:
    """Transformer Engine importable and a GPU present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(
    cfg: ModelConfig,
    *,
    tensor_parallel: int,
    pipeline_parallel: int,
    sequence_parallel: bool,
    params_dtype: torch.dtype,
    expert_parallel: int = 1,
    use_transformer_engine: bool = False,
) -> TransformerConfig:
    """megatron's TransformerConfig for ``cfg`` (see the module docstring of the builder)."""
    on_gpu = torch.cuda.is_available()
    fused = cfg.fusions == "on" or (cfg.fusions == "auto" and on_gpu)
    moe: dict[str, Any] = {}
    if cfg.is_moe:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
            moe_router_topk=cfg.moe_router_topk,
            moe_router_score_function=cfg.moe_router_score_function,
            # topk=1 with a post-top-k softmax has zero router gradient: megatron insists.
            moe_router_pre_softmax=cfg.moe_router_topk == 1,
            moe_router_enable_expert_bias=cfg.moe_router_expert_bias,
            moe_router_bias_update_rate=cfg.moe_router_bias_update_rate,
            # "none": no auxiliary loss term at all (also skips megatron's aux-loss tracker, which
            # allocates on "cuda"); the expert bias balances the load instead.
            moe_router_load_balancing_type="aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            # Routing in fp32: bf16 scores tie and flip top-k choices.
            moe_router_dtype="fp32",
            # all-to-all builds a CUDA stream at construction; all-gather works everywhere and is
            # the better choice without expert parallelism.
            moe_token_dispatcher_type="alltoall" if on_gpu and expert_parallel > 1 else "allgather",
            # Grouped GEMM: TE's TEGroupedMLP. The local spec's legacy GroupedMLP needs the
            # grouped_gemm package (CUDA only); without TE, model.moe_experts picks divprec's
            # GroupedExperts (torch's grouped GEMM) or SequentialMLP (a loop over experts).
            moe_grouped_gemm=use_transformer_engine,
        )
    return TransformerConfig(
        # parallelism
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=params_dtype,  # dtype of the activations sent between stages
        # precision
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # shape
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        # layers
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        qk_layernorm=cfg.qk_layernorm,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up], silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        attention_softmax_in_fp32=True,
        # Fusions (model.fusions): the two megatron-core runs without TE. The others need TE (RoPE)
        # or CUDA extensions divprec does not build (masked softmax: SDPA replaces it here;
        # gradient accumulation: apex's fused weight-gradient kernel).
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Initialisation: divprec.model.init does it (layout-invariant). megatron's draws are
        # skipped with no-op init methods, not perform_initialization=False: that would also skip
        # setting the tensor_model_parallel / partition_dim attributes of the sharded weights,
        # which megatron needs (grad-norm de-duplication, checkpoints) and so does our init.
        init_method_std=cfg.init_method_std,
        init_method=_left_for_divprec_init,
        output_layer_init_method=_left_for_divprec_init,
        embedding_init_method=_left_for_divprec_init,
        perform_initialization=True,
        use_cpu_initialization=not on_gpu,  # allocate on CPU when there is no GPU
        transformer_impl="transformer_engine" if use_transformer_engine else "local",
        **_recompute_fields(cfg),
        **moe,
    )


def _recompute_fields(cfg: ModelConfig) -> dict[str, Any]:
    """megatron-core's recompute fields for ``cfg.recompute`` (validated: model.config)."""
    if cfg.recompute == "none":
        return {}
    if cfg.recompute == "selective":
        return dict(
            recompute_granularity="selective", recompute_modules=list(cfg.recompute_modules)
        )
    return dict(
        recompute_granularity="full",
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
    )


def grouped_experts(cfg: ModelConfig, params_dtype: torch.dtype) -> bool:
    """Whether the local spec runs the experts as grouped GEMMs (``model.moe_experts``).

    ``auto``: on CUDA in bf16, the dtype torch's CUDA grouped GEMM is built for.
    """
    if cfg.moe_experts == "auto":
        return (
            torch.cuda.is_available() and params_dtype == torch.bfloat16 and grouped_mm_available()
        )
    if cfg.moe_experts == "grouped" and not grouped_mm_available():
        raise ValueError(
            f"model.moe_experts=grouped needs torch._grouped_mm (torch >= 2.8; this is "
            f"{torch.__version__}): use model.moe_experts=sequential"
        )
    return cfg.moe_experts == "grouped"


def layer_spec(
    cfg: ModelConfig, config: TransformerConfig, *, use_transformer_engine: bool, vp_stage=None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder spec: TE layers, or local layers with SDPA attention and :class:`RMSNorm`."""
    num_experts = cfg.num_experts if cfg.is_moe else None
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=cfg.qk_layernorm,
        )
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=cfg.qk_layernorm,
        normalization="RMSNorm",
    )
    layer = spec.submodules
    if cfg.is_moe and grouped_experts(cfg, config.params_dtype):
        layer.mlp.submodules.experts.module = GroupedExperts
    layer.input_layernorm = RMSNorm
    layer.pre_mlp_layernorm = RMSNorm
    attention = layer.self_attention.submodules
    attention.core_attention = SDPAttention
    if cfg.qk_layernorm:
        attention.q_layernorm = RMSNorm
        attention.k_layernorm = RMSNorm
    # A block spec, so that the final norm is ours too (a layer spec gets megatron's default).
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage), layer_norm=RMSNorm
    )


# --- models ----------------------------------------------------------------------------------


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    seq_length: int,
    tensor_parallel: int,
    pipeline_parallel: int,
    sequence_parallel: bool,
    params_dtype: torch.dtype,
    seed: int,
    pre_process: bool,
    post_process: bool,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    model_class: Callable[..., GPTModel] = GPTModel,
) -> GPTModel:
    """One pipeline stage (or the whole model) of ``cfg``, initialised from ``seed``.

    Args:
        vocab_size: embedding rows, already padded (``cfg.padded_vocab_size``).
        seq_length: maximum sequence length (RoPE table).
        tensor_parallel, pipeline_parallel: must equal megatron's initialised parallel state.
        sequence_parallel: only meaningful with tensor_parallel > 1 (ignored otherwise).
        params_dtype: parameter dtype (bf16 sets megatron's bf16 flag).
        seed: initialisation seed; the same seed gives the same full weights in every layout.
        pre_process, post_process: this stage holds the embedding / final norm and output layer.
        use_transformer_engine: None = when importable with a GPU.
        vp_stage: virtual pipeline stage (interleaved schedules), else None.
        model_class: GPTModel or a constructor of a subclass (in training, ShapedGPTModel with its
            ``loss_config`` bound).

    Returns:
        A GPTModel whose forward ``(input_ids [b, s], position_ids [b, s], attention_mask=None)``
        returns vocab-parallel logits ``[b, s, vocab_size/tp]`` on the last stage.
    """
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    pp_world = parallel_state.get_pipeline_model_parallel_world_size()
    if (tensor_parallel, pipeline_parallel) != (tp_world, pp_world):
        raise ValueError(
            f"build_model(tensor_parallel={tensor_parallel}, pipeline_parallel="
            f"{pipeline_parallel}) disagrees with megatron's parallel state "
            f"({tp_world}, {pp_world})"
        )
    if vocab_size % tensor_parallel:
        raise ValueError(f"vocab_size {vocab_size} is not divisible by tensor_parallel")
    if use_transformer_engine is None:
        use_transformer_engine = te_available()
    if cfg.is_moe:
        _fix_router_gemm_without_te()
    config = transformer_config(
        cfg,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        params_dtype=params_dtype,
        expert_parallel=parallel_state.get_expert_model_parallel_world_size(),
        use_transformer_engine=use_transformer_engine,
    )
    model = model_class(
        config,
        layer_spec(cfg, config, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # vocab-parallel logits: the loss never gathers the vocabulary
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=_rotary_base(cfg.rotary_base),
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        # The MoE router weight is always allocated on CPU (megatron moves it at first forward).
        model.cuda(torch.cuda.current_device())
    initialize_parameters(model, cfg, seed)
    return model


def build_stage(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    seq_length: int,
    params_dtype: torch.dtype,
    seed: int,
    sequence_parallel: bool = False,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    model_class: Callable[..., GPTModel] = GPTModel,
) -> GPTModel:
    """:func:`build_model` for this rank's pipeline stage, layout read from megatron's state."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    first_last: dict[str, Any] = {}
    if vp_stage is not None:
        first_last = dict(ignore_virtual=False, vp_stage=vp_stage)
    return build_model(
        cfg,
        vocab_size=vocab_size,
        seq_length=seq_length,
        tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_parallel=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        seed=seed,
        pre_process=parallel_state.is_pipeline_first_stage(**first_last),
        post_process=parallel_state.is_pipeline_last_stage(**first_last),
        use_transformer_engine=use_transformer_engine,
        vp_stage=vp_stage,
        model_class=model_class,
    )


def _fix_router_gemm_without_te() -> None:
    # megatron-core 0.16.1 bug: moe_utils binds te_general_gemm only when TE imports, yet the
    # router's gating GEMM tests `te_general_gemm is not None` unconditionally (NameError without
    # TE). None is what the test expects for "no TE": it then uses torch.mm.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _rotary_base(base: float) -> int | float:
    # GPTModel's annotation says int; keep floats like 1e6 exact either way.
    return int(base) if float(base).is_integer() else base
