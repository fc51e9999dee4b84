"""Memory plan: the bytes one GPU holds at the peak of a training step, before anything runs.

Pure arithmetic over the model's shape and the layout (no torch, no process group). Terms, per
rank of the worst pipeline stage (the one with the largest total):

- parameters in the parameter dtype (bf16 on GPU), and the gradients. fp32 parameters: ZeRO-1
  keeps every gradient of the stage, ZeRO-2 only this rank's 1/data-parallel partition. bf16
  parameters: DeepSpeed accumulates in fp32 (divprec.parallel.deepspeed_engine.deepspeed_config):
  ZeRO-1 holds an fp32 buffer of every gradient of the stage from the engine's build on and
  reduces it in place (no bucket, no flattened copy at the step); ZeRO-2 an fp32 partition, and
  its bucket in fp32 (the communication dtype).
- ZeRO-partitioned fp32 master weights and AdamW's two moments: 3 x 4 bytes per parameter of the
  stage, / data parallel. DeepSpeed keeps the fp32 master copy even when the parameters are fp32.
  With expert parallelism (e) a rank holds num_experts / e of each MoE layer's experts, and their
  state is partitioned over the e-times smaller expert-data-parallel group.
- activations: what autograd saves for the backward, per token of a microbatch and layer (the
  sums below), times the microbatches in flight: 1 without pipeline parallelism; with 1F1B, stage
  r of p holds p - r (capped at the microbatch count). Recompute keeps less (see
  :func:`layer_activation_bytes`); the chunk it reruns in the backward is its working set, live
  after the loss's buffers are freed.
- logits and loss buffers (last stage): the saved logits [s, b, V/tp], then the larger of the
  loss forward's temporaries (divprec.loss.vocab_parallel.forward_temporaries_bytes) and the
  logits' gradient (written into the logits' storage when they are fp32).
- DeepSpeed's gradient-reduction bucket (divprec.parallel.config.reduce_bucket_elements),
  allocated when each backward starts and again for the reduction after the last.
- the optimizer step's temporaries: the gradient partition flattened, then cast to fp32.

The peak is the persistent state plus the largest of: the last microbatch's loss and backward start
(all activations in flight, loss buffers, bucket, the gradients of earlier microbatches), its
recompute (the same without the loss buffers, with the working set), and the optimizer step
(gradients, and the bucket or the step's temporaries).

The activation sums are those of divprec's local layers (torch RMSNorm, SDPA attention, megatron-
core's linear layers and MLPs), as saved-tensor hooks count them (tests/unit/test_memory_plan.py
compares both at several shapes and every recompute mode). Per token, with p the parameter bytes,
h hidden, q / g the query / KV heads and d the head dim on this tensor-parallel rank, f the FFN
width on this rank:
- each RMSNorm: fp32 input and normalised input, the fp32 inverse RMS, its output: 8h + 4 + p*h
  (divided by tp under sequence parallelism, as every h-sized activation outside the TP regions);
- QK-norm: fp32 query in and normalised 8*q*d + 4*q; key normalised 4*g*d + 4*g, and its fp32
  input 4*g*d when p != 4 (with fp32 parameters that input is a view of the QKV output);
- the fused QKV output (V is a view of it) p*(q + 2g)*d; RoPE's cos/sin tables 4*p*d per sequence;
- SDPA: rotated query and key p*(q + g)*d, its output p*q*d (the output projection's input is a
  view of it), the fp32 log-sum-exp 4*q;
- dense SwiGLU: the FC1 output 2f and three f-wide tensors, p*5f;
- MoE: router (fp32 logits and probabilities over E experts, indices of the k choices,
  9E + 20k + 4 bytes), the k permuted copies of the token p*k*h, each routed copy's expert MLP
  p*6f_e + 4 (megatron's SequentialMLP on the local layers). Expert parallelism leaves this per
  token: a rank's experts see e times the tokens (those of e data-parallel ranks) and 1/e of
  their routed copies.
Selective recompute drops what its modules recompute (core_attn: SDPA's log-sum-exp, its inputs
and output are kept by their neighbours; mlp: the MLP's inner tensors; moe: router, permutation
and experts). Full recompute keeps a chunk's input, p*h per layer chunk.

Not counted (each well under 1% at paper sizes, or outside the library): pipeline send/receive
buffers, the backward's per-layer gradient temporaries, CUDA context, allocator fragmentation,
NCCL buffers.
Transformer Engine layers (used on GPU when TE is installed) fuse the norms into the linear layers
and save less: there the activation figure is an upper bound.
Under bf16 each parameter's bf16 gradient exists only until DeepSpeed's hook has added it to the
fp32 buffer (one parameter's at a time): not counted. Measured on CPU (tiny model, bf16, data
parallel 2), the plan is 18% (ZeRO-1) and 11% (ZeRO-2) under the peak, against 2% in fp32: the
gradient accumulation's peak holds about one fp32 copy of the logits more than the plan counts,
not yet traced to its op.
"""

from __future__ import annotations

from dataclasses import dataclass

from divprec.loss.vocab_parallel import forward_temporaries_bytes
from divprec.model.config import ModelConfig

GIB = 1 << 30
FP32 = 4


@dataclass(frozen=True)
class TrainingLayout:
    """Where and how one rank trains: the layout, batch geometry and precision."""

    tensor: int
    pipeline: int
    data: int
    expert: int  # expert-parallel size (parallel.expert); divides data
    sequence_parallel: bool
    zero_stage: int
    micro_batch_size: int
    seq_length: int
    num_microbatches: int
    vocab_size: int  # embedding rows, padded (ModelConfig.padded_vocab_size)
    param_bytes: int  # 2 (bf16) or 4 (fp32)
    loss_kernel: str  # loss.kernel (its forward's temporaries depend on it on CPU)
    on_gpu: bool
    reduce_bucket_elements: int  # DeepSpeed's bucket before capping at a rank's parameters


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of ``stage`` (the worst pipeline stage), by what holds them."""

    stage: int
    parameters: int
    gradients: int
    master_weights: int
    adam_moments: int
    activations: int
    recompute_working_set: int
    logits_and_loss: int
    reduce_bucket: int
    optimizer_step: int
    total: int
    microbatches_in_flight: int
    stage_parameters: int  # parameter count of this rank

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) in print order; the optimizer step's temporaries replace the backward's
        activation terms at the step, so the total is not their plain sum."""
        return [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("fp32 master weights (ZeRO)", self.master_weights),
            ("Adam moments (ZeRO)", self.adam_moments),
            (
                f"activations ({self.microbatches_in_flight} microbatch(es) in flight)",
                self.activations,
            ),
            ("recompute working set (one chunk, in the backward)", self.recompute_working_set),
            ("logits and loss buffers", self.logits_and_loss),
            ("DeepSpeed reduce bucket", self.reduce_bucket),
            ("optimizer step temporaries", self.optimizer_step),
        ]


# --- parameters ------------------------------------------------------------------------------


def _layer_expert_parameters(cfg: ModelConfig, tensor: int, expert: int) -> int:
    """Expert weights of one MoE layer on one rank (its num_experts / expert experts, TP-split)."""
    if not cfg.is_moe:
        return 0
    f_moe = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    return cfg.num_experts // expert * 3 * cfg.hidden_size * f_moe // tensor


def _layer_parameters(cfg: ModelConfig, tensor: int, expert: int = 1) -> int:
    """Parameters of one decoder layer on one rank (experts included)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q_width, kv_width = cfg.num_attention_heads * d, cfg.num_query_groups * d
    attention = (h * (q_width + 2 * kv_width) + q_width * h) // tensor
    attention += 2 * d if cfg.qk_layernorm else 0  # replicated
    if cfg.is_moe:
        mlp = cfg.num_experts * h + _layer_expert_parameters(
            cfg, tensor, expert
        )  # router replicated
    else:
        mlp = 3 * h * cfg.ffn_hidden_size // tensor
    return 2 * h + attention + mlp


def stage_expert_parameters(cfg: ModelConfig, layout: TrainingLayout) -> int:
    """The expert weights among :func:`stage_parameters` (partitioned over expert-data parallel)."""
    layers = cfg.num_layers // layout.pipeline
    return layers * _layer_expert_parameters(cfg, layout.tensor, layout.expert)


def stage_parameters(cfg: ModelConfig, layout: TrainingLayout, stage: int) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (vocab-parallel embeddings)."""
    layers = cfg.num_layers // layout.pipeline
    count = layers * _layer_parameters(cfg, layout.tensor, layout.expert)
    embedding = layout.vocab_size * cfg.hidden_size // layout.tensor
    first, last = stage == 0, stage == layout.pipeline - 1
    if first:
        count += embedding
    if last:
        count += cfg.hidden_size  # final norm
        # The output layer: its own weight, or with tied embeddings a copy on the last stage when
        # that is not also the first.
        if not cfg.tie_embeddings or not first:
            count += embedding
    return count


# --- activations -----------------------------------------------------------------------------


def _sequence_share(layout: TrainingLayout) -> float:
    """The share of a microbatch's tokens one rank holds outside the tensor-parallel regions."""
    return 1 / layout.tensor if layout.sequence_parallel and layout.tensor > 1 else 1.0


def _norm_bytes(width: float, p: int, tokens_share: float) -> float:
    # fp32 input, fp32 normalised input, the fp32 inverse RMS per token, the output.
    return (8 * width + 4 + p * width) * tokens_share


def layer_activation_bytes(
    cfg: ModelConfig, layout: TrainingLayout, *, modules: tuple[str, ...] = ()
) -> float:
    """Bytes saved for the backward per token of a microbatch by one layer on one rank.

    ``modules``: megatron-core's selective recompute modules applied (see the module docstring).
    """
    t, p, b = layout.tensor, layout.param_bytes, layout.micro_batch_size
    sp_share = _sequence_share(layout)
    h, d = cfg.hidden_size, cfg.head_dim
    q, g = cfg.num_attention_heads / t, cfg.num_query_groups / t
    total = _norm_bytes(h, p, sp_share)  # input norm
    if cfg.qk_layernorm:
        total += 8 * q * d + 4 * q  # query: fp32 in, normalised, inverse RMS
        # key: normalised, inverse RMS, and its fp32 input when that is a copy (else a view of QKV)
        total += FP32 * g * d + 4 * g + (FP32 * g * d if p != FP32 else 0)
    total += p * (q + 2 * g) * d  # fused QKV output
    total += 4 * p * d / b  # RoPE cos/sin for q and k: [s, 1, 1, d] each
    total += p * (q + g) * d + p * q * d  # SDPA: rotated q, k; its output
    if "core_attn" not in modules:
        total += FP32 * q  # SDPA's log-sum-exp
    total += _norm_bytes(h, p, sp_share)  # pre-MLP norm
    if cfg.is_moe:
        if "moe" not in modules:
            total += _moe_bytes(cfg, layout, sp_share)
    elif "mlp" not in modules:
        total += p * 5 * cfg.ffn_hidden_size / t
    return total


def _moe_bytes(cfg: ModelConfig, layout: TrainingLayout, sp_share: float) -> float:
    """Router, permuted tokens and expert MLPs per token (allgather dispatcher, local experts)."""
    t, p = layout.tensor, layout.param_bytes
    experts, k = cfg.num_experts, cfg.moe_router_topk
    f_moe = (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size) / t
    router = (9 * experts + 20 * k + 4) * sp_share  # on this rank's sequence shard
    # Under tensor parallelism the dispatcher gathers the TP group's tokens: every routed copy of
    # the whole sequence is on every rank, each with its share of the experts' FFN.
    return router + p * k * cfg.hidden_size + k * (p * 6 * f_moe + 4)


def microbatch_activation_bytes(
    cfg: ModelConfig, layout: TrainingLayout, stage: int
) -> tuple[float, float]:
    """(bytes kept per microbatch in flight, extra working set while one chunk is recomputed)."""
    tokens = layout.micro_batch_size * layout.seq_length
    layers = cfg.num_layers // layout.pipeline
    full_layer = layer_activation_bytes(cfg, layout)
    rope_table = FP32 * cfg.head_dim / layout.micro_batch_size  # fp32 [s, 1, 1, d]
    if cfg.recompute == "full":
        n = cfg.recompute_num_layers
        chunk_input = layout.param_bytes * cfg.hidden_size * _sequence_share(layout)
        if cfg.recompute_method == "uniform":
            kept = (layers // n) * chunk_input
            working = n * full_layer
        else:  # block: the first n layers of the stage recomputed one by one, the rest kept
            kept = n * chunk_input + (layers - n) * full_layer
            working = full_layer
        kept += rope_table  # the rotary table is a checkpoint input
    else:
        modules = tuple(cfg.recompute_modules) if cfg.recompute == "selective" else ()
        kept = layers * layer_activation_bytes(cfg, layout, modules=modules)
        working = full_layer - layer_activation_bytes(cfg, layout, modules=modules)
    if stage == 0:
        kept += 8  # the int64 token ids (the embedding's backward)
    if stage == layout.pipeline - 1:
        kept += _norm_bytes(
            cfg.hidden_size, layout.param_bytes, _sequence_share(layout)
        )  # final norm
        kept += 32 + layout.param_bytes  # the loss's per-token targets, sums, coefficients
    return kept * tokens, working * tokens


def logits_and_loss_bytes(layout: TrainingLayout) -> tuple[int, int, int]:
    """(saved logits, their gradient, the loss forward's temporaries) on one last-stage rank.

    The gradient is written into the logits' storage when they are fp32, else a new tensor.
    """
    tokens = layout.micro_batch_size * layout.seq_length
    local_vocab = layout.vocab_size // layout.tensor
    saved = tokens * local_vocab * layout.param_bytes  # [s, b, V/tp]
    gradient = 0 if layout.param_bytes == FP32 else saved
    temporaries = forward_temporaries_bytes(tokens, local_vocab, layout.loss_kernel, layout.on_gpu)
    return saved, gradient, temporaries


def microbatches_in_flight(layout: TrainingLayout, stage: int) -> int:
    """1F1B: stage r of p runs p - r forwards before its first backward."""
    return min(layout.pipeline - stage, layout.num_microbatches)


# --- the plan --------------------------------------------------------------------------------


def plan_memory(cfg: ModelConfig, layout: TrainingLayout) -> MemoryPlan:
    """The plan of the pipeline stage that needs the most memory (see the module docstring)."""
    plans = [_stage_plan(cfg, layout, stage) for stage in range(layout.pipeline)]
    return max(plans, key=lambda plan: plan.total)


def _stage_plan(cfg: ModelConfig, layout: TrainingLayout, stage: int) -> MemoryPlan:
    p = layout.param_bytes
    count = stage_parameters(cfg, layout, stage)
    # ZeRO partitions each parameter group over its own group: the experts over data / expert.
    experts = stage_expert_parameters(cfg, layout)
    partition = -(-(count - experts) // layout.data) + -(-experts // (layout.data // layout.expert))
    parameters = count * p
    master = partition * FP32
    moments = 2 * partition * FP32
    fp32_accumulation = p != FP32  # bf16: DeepSpeed's gradients are fp32 (module docstring)
    gradients = (partition if layout.zero_stage >= 2 else count) * FP32
    bucket = min(layout.reduce_bucket_elements, count) * FP32
    if fp32_accumulation and layout.zero_stage < 2:
        bucket = 0  # BF16_Optimizer: the buffer is reduced in place
    in_flight = microbatches_in_flight(layout, stage)
    kept, working = microbatch_activation_bytes(cfg, layout, stage)
    activations = int(in_flight * kept)
    working = int(working)
    last = stage == layout.pipeline - 1
    saved, logits_grad, loss_temporaries = logits_and_loss_bytes(layout) if last else (0, 0, 0)
    # Optimizer step: the flat gradient partition (ZeRO-1 under bf16 steps on views of its buffer).
    step = 0 if fp32_accumulation and layout.zero_stage < 2 else partition * FP32
    persistent = parameters + master + moments
    # The last microbatch, with every activation in flight and the gradients of the earlier
    # microbatches (none when no backward ran yet): its loss forward (temporaries), then its
    # backward (the logits' gradient; DeepSpeed's bucket is allocated when the backward starts),
    # later its recompute (the loss's buffers are gone by then).
    # (bf16 ZeRO-1: the fp32 buffer exists from the build on.)
    built_early = fp32_accumulation and layout.zero_stage < 2
    earlier_grads = gradients if layout.num_microbatches > in_flight or built_early else 0
    at_loss = saved + max(loss_temporaries, logits_grad + bucket)
    backward = earlier_grads + activations + max(at_loss, bucket + working)
    at_step = gradients + max(step, bucket)
    logits = saved + max(loss_temporaries, logits_grad)
    return MemoryPlan(
        stage=stage,
        parameters=parameters,
        gradients=gradients,
        master_weights=master,
        adam_moments=moments,
        activations=activations,
        recompute_working_set=working,
        logits_and_loss=logits,
        reduce_bucket=bucket,
        optimizer_step=step,
        total=persistent + max(backward, at_step),
        microbatches_in_flight=in_flight,
        stage_parameters=count,
    )
