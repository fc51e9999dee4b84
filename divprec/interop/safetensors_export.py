"""Export a checkpoint's whole model as one safetensors file in divprec's own (megatron) names.

The keys are the GPTModel's ``state_dict()`` names at tensor = pipeline = 1, whatever layout the
checkpoint was saved at (see :mod:`divprec.interop.full_model`). For a file other programs load,
see :mod:`divprec.interop.hf_export`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from divprec.checkpoint.layout import CONFIG_FILE, TOKENIZER_FILE
from divprec.checkpoint.locate import resolve_checkpoint

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


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
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    resolve_checkpoint(checkpoint)  # before the heavy imports: errors come at once

    import torch
    from safetensors.torch import save_file

    from divprec.config.schema import to_dict
    from divprec.interop.full_model import read_full_model

    full = read_full_model(checkpoint, getattr(torch, DTYPES[dtype]))
    step_dir, metadata = full.step_dir, full.metadata
    paths = export_paths(out)
    paths["weights"].parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": "pt",
        "step": str(metadata["step"]),
        "consumed_samples": str(metadata["consumed_samples"]),
        "saved_layout": json.dumps(metadata.get("layout", {})),
        "source": str(step_dir),
        "config": json.dumps(to_dict(full.config)),
    }
    # Written under a temporary name first: a crash never leaves a truncated file at OUT.
    tmp = paths["weights"].with_name(paths["weights"].name + ".tmp")
    save_file(full.tensors, str(tmp), metadata=header)
    os.replace(tmp, paths["weights"])
    shutil.copyfile(step_dir / TOKENIZER_FILE, paths["tokenizer"])
    shutil.copyfile(step_dir / CONFIG_FILE, paths["config"])
    return {
        "checkpoint": str(step_dir),
        "step": metadata["step"],
        "consumed_samples": metadata["consumed_samples"],
        "saved_layout": metadata.get("layout", {}),
        "dtype": DTYPES[dtype],
        "tensors": len(full.tensors),
        "parameters": full.parameters,
        "files": {name: str(p) for name, p in paths.items()},
        "bytes": paths["weights"].stat().st_size,
    }
