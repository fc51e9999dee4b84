"""Layout-invariant weight initialisation: one seed, the same full weights in every layout.

megatron's ``use_cpu_initialization`` builds each full master weight from the default generator and
keeps this rank's tensor-parallel shard, which is TP-invariant only while every stage consumes the
generator in the same order: pipeline stages build different layers from a fresh generator, and GPU
initialisation seeds a per-TP-rank generator. Instead, every parameter here is drawn from its own
generator, seeded by ``(seed, canonical name)``:

- the canonical name is the parameter's name in the single-stage, single-rank model: pipeline-local
  layer indices made global (``layer.layer_number``), expert-parallel local expert indices made
  global, Transformer Engine's fused-norm and grouped-expert names mapped to the local spec's, and
  a tied last-stage ``output_layer.weight`` mapped to ``embedding.word_embeddings.weight``;
- the full (unsharded) tensor is generated in megatron's single-rank layout and this rank's
  tensor-parallel shard is copied out of it, following the parameter's ``partition_dim`` and
  ``partition_stride`` exactly as megatron splits master weights: the full tensor is cut into
  ``world * stride`` equal chunks along ``partition_dim`` and rank r keeps chunks r, r + world, ...
  That covers the fused QKV (group-interleaved ``[q_g k_g v_g]`` rows; contiguous shards, also under
  GQA) and the SwiGLU fc1 (full ``[gate; up]``, stride 2, so rank r holds ``[gate_r; up_r]``).
- vocabulary-sized parameters (embedding, output layer) are drawn in blocks of
  :data:`VOCAB_BLOCK_ROWS` rows, each from its own generator: row i does not depend on how far the
  vocabulary is padded (the padding depends on the tensor-parallel size), and a rank only draws the
  blocks that overlap its shard.

Values: norm weights 1, biases 0, MoE expert-bias buffers 0; every other matrix N(0, std^2) with
std = ``init_method_std``, except the projections that write into the residual stream
(``linear_proj``, ``linear_fc2``, experts included) with std / sqrt(2 * num_layers) (megatron's
scaled init). Numbers are drawn in float32 on the parameter's device, then cast: the same seed gives
the same weights on the same kind of device (CPU and CUDA generators differ).
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from megatron.core import parallel_state

from divprec.model.config import ModelConfig

__all__ = ["VOCAB_BLOCK_ROWS", "canonical_names", "initialize_parameters", "shard"]

VOCAB_BLOCK_ROWS = 128

_LAYER = re.compile(r"(^|\.)decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_TE_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
_TE_FUSED_NORMS = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_RESIDUAL_PROJECTIONS = re.compile(r"\.(linear_proj|linear_fc2)\.weight$")
_FC1 = re.compile(r"\.linear_fc1\.weight$")


def canonical_names(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, str]:
    """This stage's parameter names -> names in the single-stage, single-rank model."""
    layer_index = {}  # module path of a decoder layer -> its global 0-based index
    for path, module in model.named_modules():
        m = _LAYER.search(path + ".")
        if m and m.end() == len(path) + 1 and hasattr(module, "layer_number"):
            layer_index[path] = module.layer_number - 1

    expert_offset = 0
    if cfg.is_moe:
        ep_world = parallel_state.get_expert_model_parallel_world_size()
        expert_offset = parallel_state.get_expert_model_parallel_rank() * (
            cfg.num_experts // ep_world
        )

    names = {}
    for name, _ in model.named_parameters():
        full = name
        m = _LAYER.search(full)
        if m:
            path = full[: m.end() - 1]
            prefix = path[: -len(m.group(2))]
            full = f"{prefix}{layer_index[path]}{full[m.end() - 1 :]}"
        m = _TE_GROUPED_EXPERT.search(full)
        if m:  # TE GroupedLinear: experts.linear_fc1.weight3 -> experts.local_experts.3...
            linear, kind, idx = m.groups()
            full = f"{full[: m.start()]}.mlp.experts.local_experts.{idx}.{linear}.{kind}"
        m = _LOCAL_EXPERT.search(full)
        if m:
            idx = int(m.group(1)) + expert_offset
            full = f"{full[: m.start()]}.mlp.experts.local_experts.{idx}.{full[m.end() :]}"
        for te_suffix, local_suffix in _TE_FUSED_NORMS.items():
            if full.endswith(te_suffix):
                full = full[: -len(te_suffix)] + local_suffix
        if cfg.tie_embeddings and full.endswith("output_layer.weight"):
            # Last stage's copy of the tied embedding (pipeline parallel): the same tensor.
            full = full[: -len("output_layer.weight")] + "embedding.word_embeddings.weight"
        names[name] = full
    return names


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full``: chunks rank, rank + world, ... of ``world * stride``."""
    if world == 1:
        return full
    if full.shape[dim] % (world * stride):
        raise ValueError(f"dim {dim} of {tuple(full.shape)} does not split into {world}x{stride}")
    chunks = full.chunk(world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def _generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    # Stable across processes and runs (unlike hash()).
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def _normal(shape: tuple[int, ...], std: float, seed: int, key: str, device) -> torch.Tensor:
    gen = _generator(seed, key, device)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std)


def _vocab_rows(
    rows: range, width: int, std: float, seed: int, key: str, device: torch.device
) -> torch.Tensor:
    """Rows ``rows`` of a vocabulary-sized matrix drawn in independent blocks of rows."""
    b = VOCAB_BLOCK_ROWS
    first, last = rows.start // b, (rows.stop - 1) // b
    blocks = [_normal((b, width), std, seed, f"{key}#{i}", device) for i in range(first, last + 1)]
    return torch.cat(blocks)[rows.start - first * b : rows.stop - first * b]


def _tp_rank_world(is_expert: bool) -> tuple[int, int]:
    if is_expert:
        return (
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise every parameter of ``model`` (one stage, one TP rank) layout-invariantly.

    Call on the bare model, before wrapping it (DDP / DeepSpeed), with megatron's parallel state
    initialised. Raises on a parameter it does not know how to initialise.
    """
    names = canonical_names(model, cfg)
    std = cfg.init_method_std
    scaled_std = std / math.sqrt(2.0 * cfg.num_layers)
    for name, param in model.named_parameters():
        key = names[name]
        if key.endswith("layernorm.weight"):
            param.fill_(1.0)
            continue
        if key.endswith("bias"):
            param.zero_()
            continue
        if param.dim() != 2:
            raise ValueError(f"initialize_parameters: no rule for {name} {tuple(param.shape)}")

        is_tp = bool(getattr(param, "tensor_model_parallel", False))
        rank, world = _tp_rank_world(".mlp.experts." in key) if is_tp else (0, 1)
        dim = getattr(param, "partition_dim", 0) if is_tp else 0
        # SwiGLU fc1: rank r holds [gate_r; up_r] (megatron passes stride 2; TE may not record it)
        stride = 2 if _FC1.search(key) else getattr(param, "partition_stride", 1)
        full_shape = list(param.shape)
        full_shape[dim] *= world

        if key.endswith(_VOCAB_PARAMS):
            if is_tp and (dim != 0 or stride != 1):
                raise ValueError(f"{name}: expected a vocabulary split on dim 0")
            local_rows = param.shape[0]
            rows = range(rank * local_rows, (rank + 1) * local_rows)
            param.copy_(_vocab_rows(rows, param.shape[1], std, seed, key, param.device))
            continue

        sigma = scaled_std if _RESIDUAL_PROJECTIONS.search(key) else std
        full = _normal(tuple(full_shape), sigma, seed, key, param.device)
        param.copy_(shard(full, dim, stride, rank, world))

    for name, buffer in model.named_buffers():
        # Aux-loss-free balancing starts unbiased, with no tokens counted.
        if name.endswith(("expert_bias", "local_tokens_per_expert")):
            buffer.zero_()
