"""MoE experts as two grouped GEMMs, without Transformer Engine (``model.moe_experts=grouped``).

megatron-core's local spec runs its experts with SequentialMLP: a Python loop over the local
experts, three kernels or more each, after ``tokens_per_expert.tolist()`` (a host sync). For the
paper's 384-expert presets that is ~10^5 launches per microbatch. :class:`GroupedExperts` is that
same module with the same parameters (``local_experts.<i>.linear_fc1.weight``, ...), the same
state dict and sharded state dict, hence the same initialisation and interchangeable checkpoints;
only its forward differs: every expert's FC1, then every expert's FC2, as one
``torch._grouped_mm`` each over the tokens sorted by expert (the dispatcher's order). The offsets
of the groups stay on the device: no host sync.

The weights are stacked per call into ``[experts, in, out]`` (a copy, freed after the GEMM; the
backward stacks again instead of saving it), and the weight gradients come from the grouped GEMM
over the token dimension, written back per expert.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


def grouped_mm_available() -> bool:
    """Whether this torch has the grouped GEMM (CPU and CUDA kernels in torch >= 2.8)."""
    return hasattr(torch, "_grouped_mm")


class _GroupedLinear(torch.autograd.Function):
    """``y[tokens of e] = x[tokens of e] @ weight_e.T`` for every expert e, in one grouped GEMM.

    ``offsets``: int32 ``[experts]``, the cumulative token counts (end of each expert's rows).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, offsets: torch.Tensor, *weights: torch.Tensor):
        ctx.save_for_backward(x, offsets, *weights)  # the parameters themselves: no copy kept
        stacked = torch.stack(weights)  # [experts, out, in]
        return torch._grouped_mm(x, stacked.transpose(1, 2), offs=offsets)  # [tokens, out]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, offsets, *weights = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = torch._grouped_mm(grad_y, torch.stack(weights), offs=offsets)  # [tokens, in]
        # Grouped over the token dimension: one [out, in] product per expert.
        grad_w = torch._grouped_mm(grad_y.t(), x, offs=offsets)  # [experts, out, in]
        return (grad_x, None, *grad_w.unbind(0))


class GroupedExperts(SequentialMLP):
    """SequentialMLP's parameters and checkpoints, run as grouped GEMMs (see the module doc).

    Supports what divprec's models use: SwiGLU (or a plain activation), no biases, the router's
    probabilities applied after the activation, as megatron-core's MLP does for experts.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None) -> None:
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if self.config.add_bias_linear:
            raise ValueError(
                "GroupedExperts has no expert biases: use model.moe_experts=sequential"
            )
        unsupported = (
            self.config.moe_apply_probs_on_input
            or self.config.fp8
            or self.config.fp4
            or self.config.activation_func_clamp_value is not None
            or self.config.glu_linear_offset != 0.0
        )
        if unsupported:
            raise ValueError(
                "GroupedExperts: probabilities on the input, fp8/fp4 and clamped or offset GLUs "
                "need model.moe_experts=sequential"
            )

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        x = permuted_local_hidden_states  # [tokens, h], sorted by local expert
        offsets = tokens_per_expert.to(device=x.device).cumsum(0).to(torch.int32)
        fc1 = _GroupedLinear.apply(
            x, offsets, *(expert.linear_fc1.weight for expert in self.local_experts)
        )  # [tokens, 2f/tp] with SwiGLU
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(fc1, 2, dim=-1)
            intermediate = self.config.activation_func(gate) * up
        else:
            intermediate = self.config.activation_func(fc1)
        # Like megatron-core's MLP: the fp32 probabilities scale the activation, cast back.
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(fc1.dtype)
        output = _GroupedLinear.apply(
            intermediate, offsets, *(expert.linear_fc2.weight for expert in self.local_experts)
        )  # [tokens, h]; the dispatcher sums over the tensor-parallel ranks
        return output, None
