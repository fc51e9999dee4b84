"""The only entry point: Hydra compose -> typed config -> validate -> train.

    divprec-pretrain model=tiny loss=precision loss.beta=-0.5 parallel.tensor=2 train.steps=50
    torchrun --nproc_per_node 4 -m divprec.pretrain parallel.tensor=2 parallel.pipeline=2

Inconsistent values stop every rank with one line naming the key and the fix (exit code 2),
before any process group, model or dataset exists. Values Hydra itself rejects (a wrong type, an
unknown preset) are reported by Hydra, with the available options, and exit with code 1.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

from divprec.config.compose import CONF_DIR
from divprec.config.schema import register_schema, to_typed
from divprec.config.validate import validate
from divprec.parallel.distributed import launcher_world_size

EXIT_CONFIG_ERROR = 2
EXIT_STORAGE_ERROR = 74  # EX_IOERR

# megatron-core announces its fallbacks when Transformer Engine or Apex are absent (always on CPU);
# the layer specs divprec builds already choose the local implementations.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")  # megatron-core's own default

register_schema()


def _fail(message: str) -> None:
    print(f"divprec: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_ERROR)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
    try:
        cfg = to_typed(dict_cfg)
        validate(cfg, launcher_world_size())  # the data files and the tokenizer included
    except ValueError as err:
        _fail(str(err))
    # One rank speaks for the run (its checkpoints, its resume); the others log warnings only.
    rank = int(os.environ.get("RANK", "0"))
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # megatron-core logs its dataset index bookkeeping at INFO; divprec reports what matters.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from divprec.checkpoint.checkpointer import CheckpointSaveError
    from divprec.train.guards import Diverged
    from divprec.train.trainer import pretrain

    try:
        pretrain(cfg)
    except Diverged as err:
        print(err, file=sys.stderr, flush=True)
        raise
    except CheckpointSaveError as err:  # a full disk or failing storage: one line, not a trace
        print(f"divprec: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STORAGE_ERROR)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
