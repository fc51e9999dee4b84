"""Convert between divprec checkpoints and Hugging Face model directories.

    python tools/convert.py to-hf runs/exp1 hf/exp1                 # the latest complete checkpoint
    python tools/convert.py to-hf runs/exp1/checkpoints/step_0000100 hf/exp1-bf16 --dtype bf16
    python tools/convert.py from-hf hf/qwen3-small ckpt/qwen3-small [--tokenizer spm.model]

to-hf: PATH is a step, checkpoint or run directory saved at any layout; OUT (a new directory)
loads with transformers' AutoModelForCausalLM / AutoTokenizer: Qwen3ForCausalLM for dense models,
Dots1ForCausalLM for mixtures of experts (README, "Hugging Face").
from-hf: a Qwen3ForCausalLM directory (save_pretrained) becomes a divprec checkpoint directory;
continue pre-training with the printed divprec-pretrain overrides (checkpoint.load=OUT ...), at
any layout, from step 0 with a fresh optimizer state.
Exit code 2: a path that cannot be used, or a model the target cannot express (the message names
the file or the field). Both run in one process, on CPU.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from divprec.checkpoint.locate import CheckpointUnusable
from divprec.interop.hf_import import ImportUnusable
from divprec.interop.hf_mapping import NotExpressible

EXIT_UNUSABLE = 2

# megatron-core announces its fallbacks on import; they say nothing about the checkpoint.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings(
    "ignore",
    category=FutureWarning,
    module=r"(megatron\.core\.dist_checkpointing|torch\.distributed\.checkpoint)",
)


def _to_hf(args: argparse.Namespace) -> None:
    from divprec.interop.hf_export import export_hf

    summary = export_hf(args.path, args.out, args.dtype, int(args.max_shard_gb * 1024**3))
    print(
        f"exported step {summary['step']} of {summary['checkpoint']} as {summary['architecture']} "
        f"({summary['tensors']} tensors in {summary['shards']} shard(s), {summary['dtype']}, "
        f"{summary['dropped_vocab_rows']} padding rows of the vocabulary dropped) to {summary['out']}"
    )


def _from_hf(args: argparse.Namespace) -> None:
    from divprec.interop.hf_import import import_hf

    summary = import_hf(args.hf_dir, args.out, args.tokenizer)
    print(
        f"imported {summary['source']} ({summary['parameters']:,} parameters, {summary['dtype']}) "
        f"as {summary['checkpoint']}: step 0, fresh optimizer state. Continue pre-training with\n"
        f"  divprec-pretrain {' '.join(summary['overrides'])}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="a checkpoint as a Hugging Face model directory")
    to.add_argument("path", type=Path, help="step, checkpoint or run directory")
    to.add_argument("out", type=Path, help="the new directory to write")
    to.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype")
    to.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard")
    fr = sub.add_parser("from-hf", help="a Hugging Face Qwen3 model as a divprec checkpoint")
    fr.add_argument("hf_dir", type=Path, help="directory written by save_pretrained")
    fr.add_argument("out", type=Path, help="the new checkpoint directory to write")
    fr.add_argument("--tokenizer", type=Path, help="SentencePiece .model (default: HF_DIR's)")
    args = p.parse_args(argv)
    try:
        _to_hf(args) if args.command == "to-hf" else _from_hf(args)
    except (CheckpointUnusable, NotExpressible, ImportUnusable) as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    except ModuleNotFoundError as err:
        if err.name not in ("tokenizers", "transformers"):
            raise
        print(
            f"{p.prog}: error: {err.name} is not installed: pip install 'divprec[hf]'",
            file=sys.stderr,
        )
        return EXIT_UNUSABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
