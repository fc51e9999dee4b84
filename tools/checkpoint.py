"""Inspect a divprec checkpoint, or export its full model as one safetensors file.

    python tools/checkpoint.py inspect runs/exp1                  # the latest complete checkpoint
    python tools/checkpoint.py inspect runs/exp1/checkpoints/step_0000100 --json
    python tools/checkpoint.py export runs/exp1 model.safetensors --dtype bf16

PATH: a step directory, a checkpoint directory (its `latest`) or a run directory.
export writes OUT (keys: megatron-core GPTModel names at tensor = pipeline = 1, whatever layout the
checkpoint was saved at), OUT's stem + .tokenizer.model and + .config.yaml. It runs in one process.
Exit code 2: no usable checkpoint at PATH (the message says why and what to pass instead).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from divprec.checkpoint.locate import CheckpointUnusable
from divprec.interop.locate import inspect_checkpoint
from divprec.interop.safetensors_export import export_model

EXIT_UNUSABLE = 2

# megatron-core announces its fallbacks on import; they say nothing about the checkpoint.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")
# torch.distributed.checkpoint's deprecation notices about the API megatron-core calls.
warnings.filterwarnings(
    "ignore",
    category=FutureWarning,
    module=r"(megatron\.core\.dist_checkpointing|torch\.distributed\.checkpoint)",
)


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _settings(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items() if v is not None)


def _print_tensors(title: str, tensors: dict) -> None:
    print(f"{title} ({len(tensors)} tensors)")
    width = max((len(k) for k in tensors), default=0)
    for key, t in tensors.items():
        print(f"  {key:<{width}}  {_shape(t['shape']):<18} {t['dtype']}")


def print_inspection(info: dict) -> None:
    print(f"checkpoint {info['path']}")
    print(f"  complete: {'yes' if info['complete'] else 'no, ' + info['reason']}")
    if "step" in info:
        print(f"  step {info['step']}, consumed samples {info['consumed_samples']}")
        print(f"  saved layout: {_settings(info['layout'])} (world size {info['world_size']})")
    config = info.get("config")
    if config:
        print(f"  model: {_settings(config['model'])}")
        print(f"  loss: {_settings(config['loss'])}")
        print(f"  train: {_settings(config['train'])}")
    tensors = info["tensors"]
    print(f"  parameters: {info['parameters']:,}")
    print("global shapes; decoder.layers.* stack the layers on dim 0 (megatron-core's layout)")
    _print_tensors("model", tensors["model"])
    _print_tensors("optimizer", tensors["optimizer"])
    if "other" in tensors:
        _print_tensors("other", tensors["other"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="step, layout, config and every tensor of a checkpoint")
    ins.add_argument("path", type=Path, help="step, checkpoint or run directory")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    exp = sub.add_parser("export", help="the full model as one safetensors file")
    exp.add_argument("path", type=Path, help="step, checkpoint or run directory")
    exp.add_argument("out", type=Path, help="the .safetensors file to write")
    exp.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype")
    args = p.parse_args(argv)

    try:
        if args.command == "inspect":
            info = inspect_checkpoint(args.path)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                print_inspection(info)
            if not info["complete"]:
                raise CheckpointUnusable(
                    f"checkpoint {info['path']} is incomplete: {info['reason']}"
                )
        else:
            summary = export_model(args.path, args.out, args.dtype)
            files = summary["files"]
            print(
                f"exported step {summary['step']} of {summary['checkpoint']} "
                f"({summary['tensors']} tensors, {summary['parameters']:,} parameters, "
                f"{summary['dtype']}) to {files['weights']}; tokenizer {files['tokenizer']}, "
                f"config {files['config']}"
            )
    except CheckpointUnusable as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
