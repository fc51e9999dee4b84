"""Find a checkpoint from a path a person types, describe it, read its config.

Used by the applications of the checkpoint format (tools/checkpoint.py, tools/convert.py). Nothing
here imports megatron-core at module level, so path errors are reported instantly and cleanly;
the heavy imports happen where the tensor metadata is needed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from divprec.checkpoint.layout import (
    CONFIG_FILE,
    LATEST,
    METADATA,
    check_complete,
    complete_checkpoints,
    is_step_dir_name,
    read_metadata,
    resolve_latest,
)

MODEL = "model."  # divprec.checkpoint.sharded_state.MODEL_PREFIX + "." (that module imports mcore)
_OPTIMIZER = "optimizer."
EMBEDDING_KEY = f"{MODEL}embedding.word_embeddings.weight"
_HINT = "pass a step directory (.../step_0000100), a checkpoint directory or a run directory"


class CheckpointUnusable(ValueError):
    """No usable checkpoint at a path; the message is one line naming the file and the fix."""


# --- finding a checkpoint ----------------------------------------------------------------------


def _is_step_dir(path: Path) -> bool:
    return (
        is_step_dir_name(path.name) or (path / METADATA).is_file() or (path / ".metadata").is_file()
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
