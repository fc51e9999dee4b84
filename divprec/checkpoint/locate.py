"""Find a checkpoint from a path a person types and read its config: the one owner of checkpoint
lookup, for evaluation (divprec.eval.model) and the applications of the format (divprec.interop,
tools/checkpoint.py, tools/convert.py).

Nothing here imports megatron-core, so path errors are reported instantly and cleanly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from divprec.checkpoint.layout import (
    CONFIG_FILE,
    LATEST,
    METADATA,
    check_complete,
    complete_checkpoints,
    is_step_dir_name,
    resolve_latest,
)

_HINT = "pass a step directory (.../step_0000100), a checkpoint directory or a run directory"


class CheckpointUnusable(FileNotFoundError, ValueError):
    """No usable checkpoint at a path; the message is one line naming the file and the fix.

    A FileNotFoundError (nothing usable is there) and a ValueError (the path given is wrong)."""


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


def resolve_checkpoint(path: str | Path, require_complete: bool = True) -> Path:
    """The step directory ``path`` designates: itself, or the latest complete one under it (a
    checkpoint root, or a run directory: its checkpoints/ or its config's checkpoint.dir).

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


def load_run_config(step_dir: Path):
    """The checkpoint's config.yaml as a :class:`~divprec.config.schema.PretrainConfig` (checked
    against the current schema)."""
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
