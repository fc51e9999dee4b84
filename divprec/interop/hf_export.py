"""Export a checkpoint as a Hugging Face model directory that transformers loads without custom code.

    <out>/
      config.json                    Qwen3ForCausalLM (dense) or Dots1ForCausalLM (MoE)
      generation_config.json         bos / eos (= divprec's end-of-document) / pad ids
      model-0000i-of-0000n.safetensors, model.safetensors.index.json
      tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model
      divprec_export.json            where it came from: checkpoint, step, layout, objective

The tensors come from :func:`divprec.interop.full_model.read_full_model` (any saved layout, model
tensors only) and :mod:`divprec.interop.hf_mapping` (the names and splits).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from divprec.checkpoint.layout import TOKENIZER_FILE
from divprec.checkpoint.locate import CheckpointUnusable, load_run_config, resolve_checkpoint

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
INDEX_FILE = "model.safetensors.index.json"
PROVENANCE_FILE = "divprec_export.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def _check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointUnusable(
            f"{out} exists and is not an empty directory: pass a new directory"
        )


def shard(tensors: dict, max_bytes: int) -> list[dict]:
    """``tensors`` in order, cut into groups of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_safetensors_shards(tensors: dict, out: Path, max_shard_bytes: int) -> dict[str, Any]:
    """The shards and their index (transformers' file names); returns the index."""
    from safetensors.torch import save_file

    groups = shard(tensors, max_shard_bytes)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(out / name), metadata={"format": "pt"})
        for key, tensor in group.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def export_hf(
    checkpoint: Path,
    out: Path,
    dtype: str = "fp32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Write the Hugging Face model of ``checkpoint`` (step, checkpoint or run directory) to the
    new directory ``out``; returns a summary. ``dtype``: "fp32" or "bf16" for the weights (the MoE
    expert bias stays fp32, as in training). Written under a temporary name and renamed into place.
    Raises :class:`CheckpointUnusable` (no usable checkpoint, ``out`` not new) or
    :class:`~divprec.interop.hf_mapping.NotExpressible` before any heavy work.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    step_dir = resolve_checkpoint(checkpoint)
    out = Path(out).expanduser().absolute()
    _check_output_dir(out)

    import torch

    from divprec.config.schema import to_dict
    from divprec.data.tokenizer import Tokenizer
    from divprec.interop.full_model import read_full_model
    from divprec.interop.hf_mapping import check_expressible, hf_config, to_hf_tensors
    from divprec.interop.hf_tokenizer import check_convertible, write_hf_tokenizer

    cfg = load_run_config(step_dir)
    check_expressible(cfg.model)  # before the weights are read
    tokenizer_file = step_dir / TOKENIZER_FILE
    check_convertible(tokenizer_file)
    # The model's vocabulary: the tokenizer's, or model.vocab_size when set (an import keeps the
    # HF model's); the rows beyond it only pad for tensor parallelism.
    vocab = cfg.model.vocab_size or Tokenizer.from_file(tokenizer_file).vocab_size
    torch_dtype = getattr(torch, DTYPES[dtype])
    full = read_full_model(step_dir, torch_dtype)
    tensors = to_hf_tensors(full.tensors, cfg.model, vocab)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        special_ids = write_hf_tokenizer(tokenizer_file, tmp, cfg.train.seq_length)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
        config = hf_config(
            cfg.model,
            vocab_size=vocab,
            max_position_embeddings=cfg.train.seq_length,
            special_ids=special_ids,
            dtype=torch_dtype,
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {**special_ids, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        index = write_safetensors_shards(tensors, tmp, max_shard_bytes)
        provenance = {
            "checkpoint": str(step_dir),
            "step": full.metadata["step"],
            "consumed_samples": full.metadata["consumed_samples"],
            "saved_layout": full.metadata.get("layout", {}),
            "padded_vocab_rows": full.vocab_rows,
            "vocab_size": vocab,
            "loss": to_dict(cfg).get("loss", {}),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "checkpoint": str(step_dir),
        "step": full.metadata["step"],
        "architecture": config["architectures"][0],
        "dtype": DTYPES[dtype],
        "tensors": len(tensors),
        "shards": len(set(index["weight_map"].values())),
        "bytes": index["metadata"]["total_size"],
        "dropped_vocab_rows": full.vocab_rows - vocab,
        "out": str(out),
    }
