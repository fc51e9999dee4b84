"""The memory plan of a composed pre-training config (divprec.model.memory_plan owns the math)."""

from __future__ import annotations

from divprec.config.schema import PretrainConfig
from divprec.data.checks import load_tokenizer
from divprec.model.memory_plan import MemoryPlan, TrainingLayout, plan_memory
from divprec.parallel.config import DEFAULT_REDUCE_BUCKET


def training_layout(
    cfg: PretrainConfig, world_size: int, *, on_gpu: bool = True, tokenizer_vocab: int | None = None
) -> TrainingLayout:
    """What one rank of ``world_size`` processes trains with (``cfg`` validated for that size).

    ``on_gpu`` resolves ``train.precision=auto`` (bf16 on GPU, fp32 on CPU). ``tokenizer_vocab``:
    None reads it as the run would (the default corpus's size, or the tokenizer file).
    """
    train, par = cfg.train, cfg.parallel
    data = par.data_parallel(world_size)
    vocab = tokenizer_vocab if tokenizer_vocab is not None else _tokenizer_vocab(cfg)
    precision = train.precision if train.precision != "auto" else ("bf16" if on_gpu else "fp32")
    return TrainingLayout(
        tensor=par.tensor,
        pipeline=par.pipeline,
        data=data,
        expert=par.expert,
        sequence_parallel=par.sequence_parallel and par.tensor > 1,
        zero_stage=par.zero_stage,
        micro_batch_size=train.micro_batch_size,
        seq_length=train.seq_length,
        num_microbatches=train.global_batch_size // (train.micro_batch_size * data),
        vocab_size=cfg.model.padded_vocab_size(vocab, par.tensor),
        param_bytes=2 if precision == "bf16" else 4,
        loss_kernel=cfg.loss.kernel,
        on_gpu=on_gpu,
        reduce_bucket_elements=DEFAULT_REDUCE_BUCKET,  # the plan caps it at a rank's parameters
    )


def _tokenizer_vocab(cfg: PretrainConfig) -> int:
    # The default corpus trains its tokenizer at exactly data.default_vocab_size.
    if cfg.data.blend is None:
        return int(cfg.data.default_vocab_size)
    return load_tokenizer(cfg.data).vocab_size


def memory_plan(
    cfg: PretrainConfig, world_size: int, *, on_gpu: bool = True, tokenizer_vocab: int | None = None
) -> MemoryPlan:
    """The per-GPU plan of ``cfg`` on ``world_size`` processes (see divprec.model.memory_plan)."""
    return plan_memory(
        cfg.model, training_layout(cfg, world_size, on_gpu=on_gpu, tokenizer_vocab=tokenizer_vocab)
    )
