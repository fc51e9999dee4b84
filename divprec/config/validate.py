"""Cross-field validation, before any process group, model or dataset exists.

Each check raises :class:`ConfigError` with one line that names the key and says how to fix it.
"""

from __future__ import annotations

import logging
import signal

import torch

from divprec.checkpoint.config import validate_checkpoint_load
from divprec.config.schema import PretrainConfig
from divprec.data.checks import check_data
from divprec.data.config import split_shares, validate_data_config
from divprec.metrics.config import validate_logging_config
from divprec.model.config import validate_fusions, validate_moe_experts, validate_recompute

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An inconsistent or impossible configuration value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_model(cfg: PretrainConfig) -> None:
    m, p = cfg.model, cfg.parallel
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        _require(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    _require(
        m.num_attention_heads % p.tensor == 0,
        f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
        f"parallel.tensor={p.tensor}: choose a tensor-parallel size that divides the heads",
    )
    _require(
        m.num_query_groups >= 1 and m.num_attention_heads % m.num_query_groups == 0,
        f"model.num_query_groups={m.num_query_groups} must divide model.num_attention_heads="
        f"{m.num_attention_heads}",
    )
    _require(
        m.num_query_groups % p.tensor == 0,
        f"model.num_query_groups={m.num_query_groups} (KV heads) is not divisible by "
        f"parallel.tensor={p.tensor}: choose a tensor-parallel size that divides the KV heads",
    )
    _require(
        m.kv_channels is not None or m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
        f"{m.num_attention_heads}: set model.kv_channels (the head dim) explicitly",
    )
    _require(
        m.num_layers % p.pipeline == 0,
        f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline}: "
        "choose a pipeline size that divides the layers",
    )
    if m.is_moe:
        _require(
            m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size >= 1,
            "model.moe_ffn_hidden_size must be set when model.num_experts is set",
        )
        _require(
            1 <= m.moe_router_topk <= m.num_experts,
            f"model.moe_router_topk={m.moe_router_topk} must be in [1, model.num_experts="
            f"{m.num_experts}]",
        )
        _require(
            m.moe_router_score_function in ("sigmoid", "softmax"),
            f"model.moe_router_score_function={m.moe_router_score_function!r}: use sigmoid or softmax",
        )
        _require(
            not m.moe_router_expert_bias or m.moe_router_score_function == "sigmoid",
            "model.moe_router_expert_bias=true needs model.moe_router_score_function=sigmoid: "
            "set it, or model.moe_router_expert_bias=false",
        )
        # megatron-core's MoE layer refuses tensor parallelism without sequence parallelism.
        _require(
            p.tensor == 1 or p.sequence_parallel,
            f"model.num_experts={m.num_experts} (MoE) with parallel.tensor={p.tensor} needs "
            "parallel.sequence_parallel=true: set it, or parallel.tensor=1",
        )


def validate_parallel(cfg: PretrainConfig, world_size: int) -> None:
    p = cfg.parallel
    _require(
        world_size % (p.tensor * p.pipeline) == 0,
        f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline = "
        f"{p.tensor * p.pipeline}: launch a multiple of {p.tensor * p.pipeline} processes or "
        "change parallel.tensor/parallel.pipeline",
    )
    _require(
        p.zero_stage in (1, 2),
        f"parallel.zero_stage={p.zero_stage} is not supported: use 1 (optimizer state partitioned) "
        "or 2 (also gradients); stage 3 would partition the parameters megatron-core shards itself",
    )
    _require(
        not (p.zero_stage == 2 and p.pipeline > 1),
        "parallel.zero_stage=2 cannot be combined with parallel.pipeline > 1 (DeepSpeed's rule): "
        "use parallel.zero_stage=1",
    )
    _require(
        not (p.sequence_parallel and p.tensor == 1),
        "parallel.sequence_parallel=true needs parallel.tensor > 1",
    )
    validate_expert_parallel(cfg, world_size)
    _require(
        p.backend in ("auto", "nccl", "gloo"),
        f"parallel.backend={p.backend!r}: use auto, nccl or gloo",
    )
    _require(
        not (p.backend == "nccl" and not torch.cuda.is_available()),
        "parallel.backend=nccl needs CUDA devices: use parallel.backend=gloo (or auto) on CPU",
    )


def validate_expert_parallel(cfg: PretrainConfig, world_size: int) -> None:
    """megatron-core's expert-parallel rules, with the key to change."""
    m, p = cfg.model, cfg.parallel
    _require(p.expert >= 1, f"parallel.expert must be >= 1, got {p.expert}")
    if p.expert == 1:
        return
    _require(
        m.is_moe,
        f"parallel.expert={p.expert} needs a MoE model (model.num_experts), but model={m.name} is "
        "dense: set parallel.expert=1",
    )
    _require(
        m.num_experts % p.expert == 0,
        f"model.num_experts={m.num_experts} is not divisible by parallel.expert={p.expert}: "
        "choose an expert-parallel size that divides the experts",
    )
    # Experts take the tensor split of the dense layers, so megatron-core needs
    # expert x tensor to divide data x tensor (world / pipeline).
    data = p.data_parallel(world_size)
    _require(
        data % p.expert == 0,
        f"parallel.expert={p.expert} x parallel.tensor={p.tensor} does not divide data parallel "
        f"{data} x parallel.tensor={p.tensor} (world size {world_size} / parallel.pipeline="
        f"{p.pipeline}): choose parallel.expert dividing {data}, or launch more processes",
    )


def validate_train(cfg: PretrainConfig, world_size: int) -> None:
    t, o = cfg.train, cfg.optim
    dp = cfg.parallel.data_parallel(world_size)
    _require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _require(
        t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}"
    )
    _require(t.seq_length >= 2, f"train.seq_length must be >= 2, got {t.seq_length}")
    _require(
        t.global_batch_size >= 1,
        f"train.global_batch_size must be >= 1, got {t.global_batch_size}",
    )
    _require(
        t.global_batch_size % (t.micro_batch_size * dp) == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size"
        f" x data parallel = {t.micro_batch_size} x {dp}: make it a multiple of "
        f"{t.micro_batch_size * dp}",
    )
    _require(
        t.precision in ("auto", "bf16", "fp32"),
        f"train.precision={t.precision!r}: use auto, bf16 or fp32",
    )
    _require(
        t.loss_averaging in ("token", "microbatch"),
        f"train.loss_averaging={t.loss_averaging!r}: use token or microbatch",
    )
    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _require(0 <= o.final_lr <= o.lr, f"optim.final_lr={o.final_lr} must be in [0, optim.lr]")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(o.decay_steps >= 0, f"optim.decay_steps must be >= 0, got {o.decay_steps}")
    _require(
        o.stable_steps is None or o.stable_steps >= 0,
        f"optim.stable_steps must be >= 0 or null (the rest of train.steps), got {o.stable_steps}",
    )
    _require(
        o.decay_style in ("linear", "cosine", "sqrt"),
        f"optim.decay_style={o.decay_style!r}: use linear, cosine or sqrt",
    )
    _require(o.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0 disables), got {o.clip_grad}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(
        o.decay_fraction is None or (0.0 <= o.decay_fraction <= 1.0 and o.decay_steps == 0),
        f"optim.decay_fraction={o.decay_fraction} must be in [0, 1] and not combined with "
        "optim.decay_steps: set one of them",
    )
    configured, fitted = o.configured_phases(t.steps), o.phases(t.steps)
    if fitted != configured:
        logger.warning(
            "optim: warmup %d + stable %d + decay %d = %d steps exceed train.steps=%d; the "
            "schedule is shrunk to warmup %d + stable %d + decay %d (set optim.warmup_steps and "
            "optim.decay_* to fit to silence this)",
            *configured,
            sum(configured),
            t.steps,
            *fitted,
        )


def validate_loss(cfg: PretrainConfig, vocab_size: int) -> None:
    if cfg.loss.kernel == "triton":
        from divprec.loss import triton_kernels

        why = triton_kernels.available()
        _require(
            why is None,
            f"loss.kernel=triton needs triton ({why}): pip install 'triton>=3.5', "
            "or set loss.kernel=auto",
        )
        _require(
            torch.cuda.is_available() or triton_kernels.interpreting(),
            "loss.kernel=triton needs CUDA devices (on CPU it runs only in Triton's interpreter, "
            "TRITON_INTERPRET=1, for tests): set loss.kernel=auto",
        )
    _require(
        cfg.loss.topk <= vocab_size,
        f"loss.topk={cfg.loss.topk} is larger than the vocabulary ({vocab_size}): lower loss.topk",
    )
    _require(
        cfg.model.vocab_size is None or cfg.model.vocab_size >= vocab_size,
        f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
        f"({vocab_size}): set model.vocab_size=null to use the tokenizer's",
    )


def validate_checkpoint(cfg: PretrainConfig) -> None:
    c = cfg.checkpoint
    _require(c.resume in ("auto", "never"), f"checkpoint.resume={c.resume!r}: use auto or never")
    _require(
        c.interval >= 0, f"checkpoint.interval must be >= 0 (0: only at the end), got {c.interval}"
    )
    _require(
        c.keep_last is None or c.keep_last >= 1,
        f"checkpoint.keep_last must be >= 1 or null (keep all), got {c.keep_last}",
    )
    validate_checkpoint_load(c.load)


def validate_fault_handling(cfg: PretrainConfig) -> None:
    t = cfg.train
    _require(
        t.max_skipped_steps >= 1,
        f"train.max_skipped_steps must be >= 1 (non-finite steps in a row before stopping), got "
        f"{t.max_skipped_steps}",
    )
    _require(
        t.loss_spike_window == 0 or t.loss_spike_window >= 2,
        f"train.loss_spike_window must be 0 (off) or >= 2 steps, got {t.loss_spike_window}",
    )
    _require(
        t.loss_spike_zscore > 0,
        f"train.loss_spike_zscore must be > 0, got {t.loss_spike_zscore}",
    )
    _require(
        not t.skip_loss_spikes or t.loss_spike_window > 0,
        "train.skip_loss_spikes=true needs train.loss_spike_window > 0 (e.g. 100)",
    )
    catchable = set(signal.Signals.__members__) - {"SIGKILL", "SIGSTOP"}
    _require(
        "SIG" + t.preemption_signal.upper().removeprefix("SIG") in catchable,
        f"train.preemption_signal={t.preemption_signal!r} is not a signal that can be caught: use "
        "USR1 (the default), USR2 or another name SLURM's --signal accepts",
    )
    _require(
        cfg.parallel.timeout_minutes > 0,
        f"parallel.timeout_minutes must be > 0, got {cfg.parallel.timeout_minutes}",
    )


def validate_eval(cfg: PretrainConfig) -> None:
    e = cfg.eval
    _require(
        e.interval >= 0,
        f"eval.interval must be >= 0 (steps between validations; 0: never), got {e.interval}",
    )
    _require(
        e.iters >= 1, f"eval.iters must be >= 1 (global batches per validation), got {e.iters}"
    )
    _require(
        e.interval == 0 or split_shares(cfg.data.split)[1] > 0,
        f"eval.interval={e.interval} needs a validation split: give data.split a non-zero second "
        f"share (e.g. '98,2,0', got {cfg.data.split!r}), or set eval.interval=0",
    )


def validate(cfg: PretrainConfig, world_size: int, vocab_size: int | None = None) -> None:
    """All checks that need no process group, the data files and the tokenizer included.

    ``vocab_size``: the tokenizer's, to check the loss against (None: read from the data config).
    """
    _require(world_size >= 1, f"world size must be >= 1, got {world_size}")
    p = cfg.parallel
    _require(p.tensor >= 1, f"parallel.tensor must be >= 1, got {p.tensor}")
    _require(p.pipeline >= 1, f"parallel.pipeline must be >= 1, got {p.pipeline}")
    # Model vs layout before the world size: a layout the model cannot be split into is the root
    # cause, and the world-size message would suggest launching that many processes.
    validate_model(cfg)
    validate_parallel(cfg, world_size)
    validate_train(cfg, world_size)
    validate_fault_handling(cfg)
    try:
        validate_eval(cfg)
        validate_checkpoint(cfg)
        validate_recompute(cfg.model, p.pipeline)
        validate_moe_experts(cfg.model)
        validate_fusions(cfg.model)
        validate_data_config(cfg.data)
        validate_logging_config(cfg.logging)
        data_vocab_size = check_data(cfg.data, cfg.train.seq_length)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    validate_loss(cfg, data_vocab_size if vocab_size is None else vocab_size)
