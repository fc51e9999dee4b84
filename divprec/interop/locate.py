"""Describe a checkpoint: its metadata, config summary and tensors (tools/checkpoint.py inspect).

Finding it from a typed path is divprec.checkpoint.locate's. Nothing here imports megatron-core at
module level, so path errors are reported instantly and cleanly; the heavy imports happen where
the tensor metadata is needed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from divprec.checkpoint.layout import CONFIG_FILE, METADATA, check_complete, read_metadata
from divprec.checkpoint.locate import resolve_checkpoint

MODEL = "model."  # divprec.checkpoint.sharded_state.MODEL_PREFIX + "." (that module imports mcore)
_OPTIMIZER = "optimizer."
EMBEDDING_KEY = f"{MODEL}embedding.word_embeddings.weight"


def _config_summary(step_dir: Path) -> dict[str, Any]:
    """The run's settings that identify the model and the objective (raw YAML: schema-tolerant)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(step_dir / CONFIG_FILE), resolve=False)
    model = raw.get("model", {})
    model_keys = [
        "name", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "tie_embeddings",
    ]  # fmt: skip
    if model.get("num_experts"):
        model_keys += ["num_experts", "moe_ffn_hidden_size", "moe_router_topk"]
    train_keys = ["seq_length", "precision", "seed", "steps", "global_batch_size"]
    return {
        "model": {k: model[k] for k in model_keys if k in model},
        "loss": raw.get("loss", {}),
        "train": {k: raw.get("train", {})[k] for k in train_keys if k in raw.get("train", {})},
    }


def tensors_metadata(step_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the checkpoint: key -> (global shape, dtype name), in saved order."""
    from megatron.core import dist_checkpointing

    # Reads only .metadata (and metadata.json): no process group and no tensor data are needed.
    saved = dist_checkpointing.load_tensors_metadata(str(step_dir))
    return {
        key: (tuple(int(d) for d in sh.global_shape), str(sh.dtype).removeprefix("torch."))
        for key, sh in saved.items()
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """A description of the checkpoint ``path`` designates (see :func:`resolve_checkpoint`).

    An incomplete step directory named explicitly is described as far as it can be read, with
    ``complete`` False and the ``reason``.
    """
    step_dir = resolve_checkpoint(path, require_complete=False)
    status = check_complete(step_dir)
    info: dict[str, Any] = {
        "path": str(step_dir),
        "complete": status.complete,
        "reason": status.reason,
    }
    if (step_dir / METADATA).is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):  # status.reason says why
            info.update(read_metadata(step_dir))
    info.pop("files", None)
    if (step_dir / CONFIG_FILE).is_file():
        info["config"] = _config_summary(step_dir)
    tensors = tensors_metadata(step_dir) if (step_dir / ".metadata").is_file() else {}
    model = {k[len(MODEL) :]: v for k, v in tensors.items() if k.startswith(MODEL)}
    optimizer = {k[len(_OPTIMIZER) :]: v for k, v in tensors.items() if k.startswith(_OPTIMIZER)}
    other = {k: v for k, v in tensors.items() if not k.startswith((MODEL, _OPTIMIZER))}

    def listing(group: dict) -> dict:
        return {k: {"shape": list(shape), "dtype": dtype} for k, (shape, dtype) in group.items()}

    info["tensors"] = {"model": listing(model), "optimizer": listing(optimizer)}
    if other:
        info["tensors"]["other"] = listing(other)
    # Parameters are the model tensors with optimizer state; the rest are buffers (MoE expert bias).
    trained = [k for k in model if f"fp32_param.{MODEL}{k}" in optimizer] or list(model)
    info["parameters"] = sum(_numel(model[k][0]) for k in trained)
    return info
