"""Import a Hugging Face Qwen3 model as a divprec checkpoint to continue pre-training from.

The checkpoint is one step directory (megatron-core torch_dist, divprec.json, config.yaml,
tokenizer.model) that ``checkpoint.load=<dir>`` loads at any layout: step 0, no consumed samples,
and a fresh optimizer state (fp32 master weights equal to the weights, zero Adam moments, which is
exactly a new Adam). Its config.yaml holds the model; the run that loads it must build the same
model, so :func:`pretrain_overrides` spells out every ``model.*`` value for the command line.

The vocabulary is kept as the HF model has it: ``model.vocab_size`` is the embedding's rows and
``model.make_vocab_size_divisible_by`` is 1, so no padding rows are added and the checkpoint loads
at every tensor-parallel size that divides the vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from divprec.checkpoint.layout import (
    CONFIG_FILE,
    FORMAT_VERSION,
    METADATA,
    TOKENIZER_FILE,
    write_atomic,
)
from divprec.interop.hf_mapping import NotExpressible

HF_CONFIG = "config.json"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class ImportUnusable(ValueError):
    """An HF directory or an output path that cannot be used; one line naming the file and fix."""


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    if not hf_dir.is_dir():
        raise ImportUnusable(f"{hf_dir} is not a directory: pass a Hugging Face model directory")
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise ImportUnusable(f"{path} is missing: pass a directory written by save_pretrained")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ImportUnusable(f"{path} is not JSON ({err})") from err


def read_hf_tensors(hf_dir: Path) -> dict:
    """Every tensor of the HF model's safetensors (one file, or the shards of an index)."""
    from safetensors.torch import load_file

    single, index = (hf_dir / name for name in _WEIGHTS)
    if single.is_file():
        return load_file(str(single))
    if not index.is_file():
        raise ImportUnusable(
            f"{hf_dir} has neither {_WEIGHTS[0]} nor {_WEIGHTS[1]}: save the model with "
            "save_pretrained (safetensors)"
        )
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors: dict = {}
    for name in shards:
        if not (hf_dir / name).is_file():
            raise ImportUnusable(f"{hf_dir / name} (listed in {index.name}) is missing")
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


def _model_config(hf: dict[str, Any], name: str):
    from divprec.interop.hf_mapping import model_config_from_hf

    model = model_config_from_hf(hf, name)
    return dataclasses.replace(model, make_vocab_size_divisible_by=1)


def pretrain_overrides(model) -> list[str]:
    """``model.<field>=<value>`` for every field of ``model``: with them, divprec-pretrain builds
    this model whatever ``model=`` preset it starts from."""
    out = []
    for field in dataclasses.fields(model):
        value = getattr(model, field.name)
        out.append(f"model.{field.name}={'null' if value is None else json.dumps(value)}")
    return [o.replace('"', "") for o in out]


def import_hf(hf_dir: Path, out: Path, tokenizer: Path | None = None) -> dict[str, Any]:
    """Write the divprec checkpoint (a step directory) of the HF Qwen3 model in ``hf_dir`` to the
    new directory ``out``; returns a summary with the overrides to train it.

    ``tokenizer``: the SentencePiece model the HF model's ids are of (None: ``hf_dir``'s
    tokenizer.model, which divprec's export writes). Raises :class:`ImportUnusable` or
    :class:`NotExpressible` before any weight is read.
    """
    hf_dir = Path(hf_dir).expanduser().absolute()
    out = Path(out).expanduser().absolute()
    hf = _read_hf_config(hf_dir)
    if out.exists():
        raise ImportUnusable(f"{out} exists: pass a new directory for the checkpoint")
    tokenizer = Path(tokenizer).expanduser() if tokenizer else hf_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise ImportUnusable(
            f"{tokenizer} is missing: pass --tokenizer <SentencePiece .model> (divprec's data "
            "pipeline tokenises with SentencePiece)"
        )
    model = _model_config(hf, name="hf_" + re.sub(r"[^A-Za-z0-9_]", "_", hf_dir.name))

    from divprec.config.compose import compose_config
    from divprec.data.tokenizer import Tokenizer

    vocab = Tokenizer.from_file(tokenizer).vocab_size
    if vocab > model.vocab_size:
        raise ImportUnusable(
            f"{tokenizer} has {vocab} pieces, more than the model's vocab_size {model.vocab_size} "
            f"in {hf_dir / HF_CONFIG}: pass the tokenizer the model was trained with"
        )
    hf_tensors = read_hf_tensors(hf_dir)
    cfg = compose_config([f"run.dir={out.parent}"])
    cfg.model = model
    return _write_checkpoint(cfg, hf_tensors, hf_dir, out, tokenizer)


def _write_checkpoint(cfg, hf_tensors: dict, hf_dir: Path, out: Path, tokenizer: Path) -> dict:
    """Build the model at tensor = pipeline = 1 from the HF tensors and save it as ``out``."""
    from divprec.interop.full_model import build_full_model, is_extra_state
    from divprec.interop.hf_mapping import from_hf_tensors
    from divprec.parallel.distributed import single_process_world

    rows = cfg.model.padded_vocab_size(cfg.model.vocab_size, 1)
    dtype = hf_tensors["model.embed_tokens.weight"].dtype
    tensors = from_hf_tensors(hf_tensors, cfg.model, rows)
    with single_process_world(cfg.train.seed):
        model = build_full_model(cfg, vocab_size=rows, params_dtype=dtype)
        extra = {k: v for k, v in model.state_dict().items() if is_extra_state(k)}
        try:
            model.load_state_dict({**tensors, **extra}, strict=True)
        except RuntimeError as err:  # a shape or a name the config does not describe
            raise ImportUnusable(
                f"{hf_dir}: the weights do not fit its {HF_CONFIG} "
                f"({str(err).splitlines()[-1].strip()})"
            ) from err
        save_fresh_checkpoint(cfg, model, out, tokenizer, imported_from=str(hf_dir))
        parameters = sum(p.numel() for p in model.parameters())
    return {
        "checkpoint": str(out),
        "source": str(hf_dir),
        "parameters": parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "overrides": [f"checkpoint.load={out}", *pretrain_overrides(cfg.model)],
    }


def save_fresh_checkpoint(cfg, model, out: Path, tokenizer: Path, imported_from: str) -> None:
    """Save ``model`` (the whole model of ``cfg``, in a world of one) as the step-0 checkpoint
    ``out`` with a fresh optimizer state: fp32 master weights = the weights, Adam moments zero.
    Written under a temporary name and renamed into place."""
    import torch
    from megatron.core import dist_checkpointing
    from omegaconf import OmegaConf

    from divprec.checkpoint.sharded_state import (
        model_sharded_state_dict,
        optimizer_sharded_state_dict,
    )

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model_sd = model_sharded_state_dict(model)
        optimizer_sd = optimizer_sharded_state_dict(model, model_sd)
        params = dict(model.named_parameters())
        for state, by_name in optimizer_sd.items():
            for name, sharded in by_name.items():
                fresh = params[name].detach().float() if state == "fp32_param" else 0.0
                sharded.data.copy_(torch.as_tensor(fresh).expand_as(sharded.data))
        dist_checkpointing.save({"model": model_sd, "optimizer": optimizer_sd}, str(tmp))
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        metadata = {
            "step": 0,
            "consumed_samples": 0,
            "layout": {},  # no rank's RNG state is saved: no run restores one
            "world_size": 1,
            "files": [CONFIG_FILE, TOKENIZER_FILE],
            "imported_from": imported_from,
            "format_version": FORMAT_VERSION,
        }
        write_atomic(tmp / METADATA, json.dumps(metadata, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "ImportUnusable",
    "NotExpressible",
    "import_hf",
    "pretrain_overrides",
    "read_hf_tensors",
    "save_fresh_checkpoint",
]
