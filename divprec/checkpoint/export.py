"""Use a checkpoint outside training: find it, describe it, export the full model as safetensors.

The export holds the model of a single process (tensor = pipeline = 1, megatron-core's local
layers), whatever layout the checkpoint was saved at: the model is rebuilt at that layout from the
checkpoint's config.yaml and megatron-core's distributed load reshards into it (tensor-parallel
shards, pipeline stages, SwiGLU's [gate; up] and QKV factories). Its keys are the GPTModel's
``state_dict()`` names (``decoder.layers.0.mlp.linear_fc1.weight``, ...).

Nothing here imports megatron-core at module level, so path errors are reported instantly and
cleanly; the heavy imports happen where a model or the tensor metadata is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from divprec.checkpoint.layout import (
    LATEST,
    METADATA,
    check_complete,
    complete_checkpoints,
    read_metadata,
    resolve_latest,
)

TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "config.yaml"
_MODEL = "model."  # divprec.checkpoint.sharded_state.MODEL_PREFIX + "." (that module imports mcore)
_OPTIMIZER = "optimizer."
_EMBEDDING_KEY = f"{_MODEL}embedding.word_embeddings.weight"
_STEP_DIR = re.compile(r"^step_\d{7}(\.tmp)?$")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
_HINT = "pass a step directory (.../step_0000100), a checkpoint directory or a run directory"


class CheckpointUnusable(ValueError):
    """No usable checkpoint at a path; the message is one line naming the file and the fix."""


# --- finding a checkpoint ----------------------------------------------------------------------


def _is_step_dir(path: Path) -> bool:
    return (
        _STEP_DIR.match(path.name) is not None
        or (path / METADATA).is_file()
        or (path / ".metadata").is_file()
    )


def _checkpoint_roots(path: Path) -> list[Path]:
    """Where checkpoints of ``path`` may live: itself, a run dir's checkpoints/, its checkpoint.dir."""
    roots = [path, path / "checkpoints"]
    config = path / CONFIG_FILE
    if config.is_file():  # a run directory whose checkpoint.dir points elsewhere
        from omegaconf import OmegaConf

        with contextlib.suppress(Exception):  # an unreadable config only loses this candidate
            custom = OmegaConf.load(config).get("checkpoint", {}).get("dir")
            if custom:
                roots.append(Path(custom).expanduser())
    return roots


def resolve_checkpoint(path: Path, require_complete: bool = True) -> Path:
    """The step directory ``path`` designates: itself, or the latest complete one under it.

    Raises :class:`CheckpointUnusable` when there is none (or, with ``require_complete``, when the
    named step directory is incomplete).
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointUnusable(f"{path} does not exist: {_HINT}")
    if not path.is_dir():
        raise CheckpointUnusable(f"{path} is not a directory: {_HINT}")
    if _is_step_dir(path):
        status = check_complete(path)
        if require_complete and not status.complete:
            raise CheckpointUnusable(
                f"checkpoint {path} is incomplete: {status.reason}; pass a complete step "
                f"directory, or {path.parent} for its latest complete checkpoint"
            )
        return path
    for root in _checkpoint_roots(path):
        steps = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
        if not steps and not (root / LATEST).is_file():
            continue
        if complete_checkpoints(root):  # resolve_latest warns only when it must fall back
            return resolve_latest(root)
        reasons = "; ".join(f"{p.name}: {check_complete(p).reason}" for p in steps) or "none saved"
        raise CheckpointUnusable(
            f"no complete checkpoint in {root} ({reasons}): pass a complete step directory"
        )
    raise CheckpointUnusable(f"no checkpoint found in {path}: {_HINT}")


# --- describing one ----------------------------------------------------------------------------


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
    model = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    optimizer = {k[len(_OPTIMIZER) :]: v for k, v in tensors.items() if k.startswith(_OPTIMIZER)}
    other = {k: v for k, v in tensors.items() if not k.startswith((_MODEL, _OPTIMIZER))}

    def listing(group: dict) -> dict:
        return {k: {"shape": list(shape), "dtype": dtype} for k, (shape, dtype) in group.items()}

    info["tensors"] = {"model": listing(model), "optimizer": listing(optimizer)}
    if other:
        info["tensors"]["other"] = listing(other)
    # Parameters are the model tensors with optimizer state; the rest are buffers (MoE expert bias).
    trained = [k for k in model if f"fp32_param.{_MODEL}{k}" in optimizer] or list(model)
    info["parameters"] = sum(_numel(model[k][0]) for k in trained)
    return info


# --- loading the model in one process ----------------------------------------------------------


def load_run_config(step_dir: Path):
    """The checkpoint's config.yaml as a :class:`~divprec.config.schema.PretrainConfig`."""
    from omegaconf import OmegaConf

    from divprec.config.schema import PretrainConfig

    path = step_dir / CONFIG_FILE
    try:
        saved = OmegaConf.load(path)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), saved))
    except Exception as err:  # OmegaConf raises many types; all mean "does not fit the schema"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointUnusable(
            f"{path} does not fit this version's config schema ({first_line}): export with the "
            "divprec version that wrote the checkpoint"
        ) from err


def build_full_model(cfg, vocab_size: int, params_dtype):
    """The whole model of ``cfg`` at tensor = pipeline = 1 with local layers (inside a world).

    Local layers on every machine: Transformer Engine would name some weights differently
    (fused norms, grouped experts) and the export's keys must not depend on the machine.
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


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def load_model_weights(model, step_dir: Path) -> None:
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
    weights = {k[len(_MODEL) :]: v for k, v in loaded["model"].items()}
    model.load_state_dict(weights, strict=False)
    expected = {k for k in model.state_dict() if not _is_extra_state(k)}
    missing = sorted(expected - weights.keys())
    if missing:
        raise CheckpointUnusable(
            f"checkpoint {step_dir} has no weights for {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}: its config.yaml does not match the saved model"
        )


def full_state_dict(model, dtype=None) -> dict:
    """CPU tensors of ``model.state_dict()`` without extra states; parameters cast to ``dtype``.

    Buffers keep their dtype: megatron keeps e.g. the MoE router's expert bias in fp32 on purpose.
    """
    import torch

    params = {name for name, _ in model.named_parameters()}
    out = {}
    for key, value in model.state_dict().items():
        if _is_extra_state(key) or not isinstance(value, torch.Tensor):
            continue
        tensor = value.detach().cpu()
        if dtype is not None and key in params and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    return out


# --- export ------------------------------------------------------------------------------------


def export_paths(out: Path) -> dict[str, Path]:
    """The files an export to ``out`` writes: the weights, the tokenizer and the config."""
    out = Path(out)
    return {
        "weights": out,
        "tokenizer": out.with_suffix(".tokenizer.model"),
        "config": out.with_suffix(".config.yaml"),
    }


def export_model(checkpoint: Path, out: Path, dtype: str = "fp32") -> dict[str, Any]:
    """Write the full model of ``checkpoint`` to the safetensors file ``out``; returns a summary.

    ``checkpoint``: a step directory, a checkpoint directory or a run directory (the latest
    complete checkpoint). ``dtype``: "fp32" or "bf16" for the parameters. Next to ``out`` go the
    tokenizer (``<out>.tokenizer.model``) and the run's config (``<out>.config.yaml``).
    safetensors metadata: step, consumed_samples, the saved layout and the config (JSON).
    Runs in a single process (it creates a gloo world of one when there is none).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    step_dir = resolve_checkpoint(checkpoint)  # before the heavy imports: errors come at once

    import torch
    from safetensors.torch import save_file

    from divprec.config.schema import to_dict
    from divprec.parallel.distributed import single_process_world

    metadata = read_metadata(step_dir)
    cfg = load_run_config(step_dir)
    saved = tensors_metadata(step_dir)
    if _EMBEDDING_KEY not in saved:
        raise CheckpointUnusable(f"checkpoint {step_dir} has no {_EMBEDDING_KEY}: not a GPT model")
    # The saved embedding fixes the padded vocabulary (padding depends on the saved tensor size)
    # and the dtype the weights were trained in.
    shape, saved_dtype = saved[_EMBEDDING_KEY]
    with single_process_world(cfg.train.seed):
        model = build_full_model(cfg, vocab_size=shape[0], params_dtype=getattr(torch, saved_dtype))
        load_model_weights(model, step_dir)
        tensors = full_state_dict(model, getattr(torch, _DTYPES[dtype]))
        parameters = sum(p.numel() for p in model.parameters())
    del model

    paths = export_paths(out)
    paths["weights"].parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": "pt",
        "step": str(metadata["step"]),
        "consumed_samples": str(metadata["consumed_samples"]),
        "saved_layout": json.dumps(metadata.get("layout", {})),
        "source": str(step_dir),
        "config": json.dumps(to_dict(cfg)),
    }
    # Written under a temporary name first: a crash never leaves a truncated file at OUT.
    tmp = paths["weights"].with_name(paths["weights"].name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, paths["weights"])
    shutil.copyfile(step_dir / TOKENIZER_FILE, paths["tokenizer"])
    shutil.copyfile(step_dir / CONFIG_FILE, paths["config"])
    return {
        "checkpoint": str(step_dir),
        "step": metadata["step"],
        "consumed_samples": metadata["consumed_samples"],
        "saved_layout": metadata.get("layout", {}),
        "dtype": _DTYPES[dtype],
        "tensors": len(tensors),
        "parameters": parameters,
        "files": {name: str(p) for name, p in paths.items()},
        "bytes": paths["weights"].stat().st_size,
    }
