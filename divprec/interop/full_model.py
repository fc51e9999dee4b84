"""The whole model of a checkpoint in this process, whatever layout it was saved at.

One reconstruction for every export (safetensors, Hugging Face): the model is rebuilt at tensor =
pipeline = 1 with megatron-core's local layers from the checkpoint's config.yaml, and megatron-core's
distributed load reshards into it (tensor-parallel shards, pipeline stages, expert-parallel experts,
SwiGLU's [gate; up] and QKV factories). Only the ``model.*`` tensors are read: the optimizer state
(DeepSpeed's ZeRO partitions, saved sharded like the weights) is never requested. The result is
keyed by the GPTModel's ``state_dict()`` names (``decoder.layers.0.mlp.linear_fc1.weight``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from divprec.checkpoint.layout import read_metadata
from divprec.checkpoint.locate import CheckpointUnusable, load_run_config, resolve_checkpoint
from divprec.interop.locate import EMBEDDING_KEY, MODEL, tensors_metadata


@dataclass
class FullModel:
    """The tensors of a checkpoint's whole model, with what they were trained as."""

    step_dir: Path
    config: Any  # divprec.config.schema.PretrainConfig
    metadata: dict  # divprec.json: step, consumed_samples, layout, ...
    tensors: dict[str, torch.Tensor]  # GPTModel state_dict names at tensor = pipeline = 1
    parameters: int  # trainable parameters (buffers such as the MoE expert bias not counted)

    @property
    def vocab_rows(self) -> int:
        """Embedding rows: the tokenizer's vocabulary padded for the tensor-parallel split."""
        return self.tensors["embedding.word_embeddings.weight"].shape[0]


def build_full_model(cfg, vocab_size: int, params_dtype: torch.dtype) -> torch.nn.Module:
    """The whole model of ``cfg`` at tensor = pipeline = 1 with local layers (inside a world).

    Local layers on every machine: Transformer Engine would name some weights differently
    (fused norms, grouped experts) and the exports' keys must not depend on the machine.
    """
    from megatron.core.models.gpt import GPTModel

    from divprec.model.builder import build_model

    return build_model(
        cfg.model,
        vocab_size=vocab_size,
        seq_length=cfg.train.seq_length,
        tensor_parallel=1,
        pipeline_parallel=1,
        sequence_parallel=False,
        params_dtype=params_dtype,
        seed=cfg.train.seed,
        pre_process=True,
        post_process=True,
        use_transformer_engine=False,
        model_class=GPTModel,
    )


def is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def load_model_weights(model: torch.nn.Module, step_dir: Path) -> None:
    """Load only the model weights of ``step_dir`` into ``model``, resharding to its layout."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from divprec.checkpoint.sharded_state import model_sharded_state_dict

    # The model's own sharded state dict carries the resharding rules (tensor-parallel axes,
    # layer stacking, the SwiGLU/QKV factories); the optimizer's tensors are simply not requested.
    try:
        loaded = dist_checkpointing.load({"model": model_sharded_state_dict(model)}, str(step_dir))
    except CheckpointingException as err:
        raise CheckpointUnusable(
            f"cannot load the model of {step_dir} ({str(err).splitlines()[0]}): its config.yaml "
            "does not describe the saved weights"
        ) from err
    weights = {k[len(MODEL) :]: v for k, v in loaded["model"].items()}
    model.load_state_dict(weights, strict=False)
    expected = {k for k in model.state_dict() if not is_extra_state(k)}
    missing = sorted(expected - weights.keys())
    if missing:
        raise CheckpointUnusable(
            f"checkpoint {step_dir} has no weights for {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}: its config.yaml does not match the saved model"
        )


def full_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """CPU tensors of ``model.state_dict()`` without extra states; parameters cast to ``dtype``.

    Buffers keep their dtype: megatron keeps e.g. the MoE router's expert bias in fp32 on purpose.
    """
    params = {name for name, _ in model.named_parameters()}
    out = {}
    for key, value in model.state_dict().items():
        if is_extra_state(key) or not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu()
        if dtype is not None and key in params and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    return out


def read_full_model(checkpoint: Path, dtype: torch.dtype | None = None) -> FullModel:
    """The whole model of ``checkpoint`` (a step, checkpoint or run directory: see
    :func:`~divprec.interop.locate.resolve_checkpoint`); parameters cast to ``dtype`` (None: as
    saved). Runs in a single process: it forms a world of one when there is none.
    """
    from divprec.parallel.distributed import single_process_world

    step_dir = resolve_checkpoint(checkpoint)  # before the heavy work: errors come at once
    metadata = read_metadata(step_dir)
    cfg = load_run_config(step_dir)
    saved = tensors_metadata(step_dir)
    if EMBEDDING_KEY not in saved:
        raise CheckpointUnusable(f"checkpoint {step_dir} has no {EMBEDDING_KEY}: not a GPT model")
    # The saved embedding fixes the padded vocabulary (padding depends on the saved tensor size)
    # and the dtype the weights were trained in.
    shape, saved_dtype = saved[EMBEDDING_KEY]
    with single_process_world(cfg.train.seed):
        model = build_full_model(cfg, vocab_size=shape[0], params_dtype=getattr(torch, saved_dtype))
        load_model_weights(model, step_dir)
        tensors = full_state_dict(model, dtype)
        parameters = sum(p.numel() for p in model.parameters())
    return FullModel(step_dir, cfg, metadata, tensors, parameters)
