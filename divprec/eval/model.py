"""A trained model ready for evaluation in this process: built from a checkpoint's config, loaded.

``load_eval_model`` builds megatron-core's GPTModel (plain logits, not the training wrapper that
returns the loss) in megatron's current layout (tensor = pipeline = 1 when it initialises the
process group itself: a gloo world of one on CPU) and loads the weights from the checkpoint's
``model.*`` tensors with megatron-core's dist_checkpointing, which reshards from whatever layout
the checkpoint was saved in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state

from divprec.checkpoint.layout import TOKENIZER_FILE, read_metadata
from divprec.checkpoint.locate import load_run_config, resolve_checkpoint
from divprec.config.schema import PretrainConfig
from divprec.data.tokenizer import Tokenizer
from divprec.parallel.distributed import ensure_world

logger = logging.getLogger(__name__)

_PREFIX = "model."
_EMBEDDING_KEY = f"{_PREFIX}embedding.word_embeddings.weight"


@dataclass
class EvalModel:
    """A model with its tokenizer and the config it was trained with.

    ``model`` is megatron-core's GPTModel: ``model(input_ids [b, s], position_ids [b, s], None)``
    returns vocab-parallel logits ``[b, s, V_padded / tp]``. ``step``: the checkpoint's step
    (0 for a freshly initialised model).
    """

    model: torch.nn.Module
    tokenizer: Tokenizer
    config: PretrainConfig
    step: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary: logits beyond it are embedding padding, never data."""
        return self.tokenizer.vocab_size

    def logits(self, tokens: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """Float32 logits over the tokenizer's vocabulary, gathered over tensor parallelism.

        tokens ``[b, s]`` (one sequence per row from position 0; causal, so right padding does not
        change earlier positions) -> ``[b, s, vocab_size]`` (or ``[b, vocab_size]`` with
        ``last_only``). Differentiable (the gather's backward splits the gradient again).
        """
        b, s = tokens.shape
        position_ids = torch.arange(s, device=tokens.device).expand(b, s)  # [b, s]
        logits = self.model(tokens, position_ids, None, runtime_gather_output=True)  # [b, s, Vp]
        if last_only:
            logits = logits[:, -1]  # [b, Vp]
        return logits[..., : self.vocab_size].float()


def build_eval_model(
    config: PretrainConfig,
    tokenizer: Tokenizer,
    *,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    step: int = 0,
) -> EvalModel:
    """A GPTModel of ``config.model`` in megatron's current layout, initialised from
    ``config.train.seed`` (layout-invariant: every layout gets the same full weights).

    ``vocab_size``: embedding rows; None pads the tokenizer's vocabulary as training does.
    """
    from divprec.model.builder import build_stage

    ensure_world(config.train.seed)
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("evaluation runs the whole model on each rank: pipeline size must be 1")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = vocab_size or config.model.padded_vocab_size(tokenizer.vocab_size, tp)
    if padded % tp or padded < tokenizer.vocab_size:
        raise ValueError(
            f"vocab_size {padded} does not fit tokenizer vocab {tokenizer.vocab_size}"
            f" split over tensor parallel {tp}"
        )
    model = build_stage(
        config.model,
        vocab_size=padded,
        seq_length=config.train.seq_length,
        params_dtype=dtype,
        seed=config.train.seed,
    )
    model.eval()
    return EvalModel(model=model, tokenizer=tokenizer, config=config, step=step)


def _saved_vocab_rows(step_dir: Path) -> int:
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_tensors_metadata(str(step_dir))
    if _EMBEDDING_KEY not in saved:
        raise KeyError(f"checkpoint {step_dir} has no {_EMBEDDING_KEY}")
    return int(saved[_EMBEDDING_KEY].global_shape[0])


def load_weights(model: torch.nn.Module, step_dir: Path) -> None:
    """Load ``model.*`` of a megatron-core distributed checkpoint into ``model`` (any layout)."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict(prefix=_PREFIX)
    loaded = dist_checkpointing.load(sharded, str(step_dir))
    weights = {k[len(_PREFIX) :]: v for k, v in loaded.items()}
    missing, _ = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"checkpoint {step_dir} did not provide {missing[:5]}")


def load_eval_model(
    checkpoint: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> EvalModel:
    """Build the checkpoint's model in this process and load its weights.

    ``checkpoint``: a ``step_XXXXXXX`` directory, a checkpoint root or a run directory (-> the
    latest complete checkpoint). Initialises torch.distributed and megatron-core (tensor =
    pipeline = 1) when nothing has; otherwise uses megatron's layout (pipeline must be 1).
    ``device``: None is where megatron-core builds (the current CUDA device when there is one,
    else the CPU); megatron allocates activations there, so another device is refused.
    ``dtype``: parameters; None is float32 (evaluation of small models: exact, and bf16 matmuls
    on CPU are slow).
    """
    step_dir = resolve_checkpoint(checkpoint)
    config = load_run_config(step_dir)
    tokenizer = Tokenizer.from_file(step_dir / TOKENIZER_FILE)
    ensure_world(config.train.seed)
    em = build_eval_model(
        config,
        tokenizer,
        vocab_size=_saved_vocab_rows(step_dir),  # the saved padding, whatever tp it was for
        dtype=dtype or torch.float32,
        step=int(read_metadata(step_dir)["step"]),
    )
    if device is not None and torch.device(device).type != em.device.type:
        raise ValueError(
            f"load_eval_model: megatron-core builds on {em.device}; device={device!r} is not "
            "supported (leave it None)"
        )
    load_weights(em.model, step_dir)
    em.model.eval()
    logger.info("loaded %s (step %d)", step_dir, em.step)
    return em
