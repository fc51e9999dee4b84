"""Train/valid/test datasets from megatron-core's GPT datasets.

``build_gpt_datasets`` turns a ``DataConfig`` into megatron ``GPTDataset``s (one blend entry)
or ``BlendedDataset``s (several), whose samples are dicts of [s] tensors with
``labels = tokens`` shifted by one. Megatron caches its shuffled document/sample/blend indices
under ``<cache_dir>/megatron_index`` keyed by a hash of everything that defines them; with
torch.distributed initialised, global rank 0 builds missing indices first and the others load
them after a barrier, so ``cache_dir`` must be on a file system all ranks share.

Read batches with ``build_batch_iterator`` (see divprec.data.batches for the order convention).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset

from divprec.data.batches import build_batch_iterator
from divprec.data.checks import check_data
from divprec.data.config import (
    DataConfig,
    parse_blend,
    resolve_cache_dir,
    validate_data_config,
)
from divprec.data.default_corpus import ensure_default_corpus
from divprec.data.filelock import exclusive_lock
from divprec.data.megatron_helpers import require_megatron_helpers
from divprec.data.tokenizer import Tokenizer
from divprec.parallel.distributed import single_process_world

__all__ = ["GPTDatasets", "ResolvedData", "build_batch_iterator", "build_gpt_datasets"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedData:
    """A config made concrete: absolute prefixes, their weights, the tokenizer file."""

    prefixes: list[str]
    weights: list[float] | None
    tokenizer_model: str
    cache_dir: Path
    is_default_corpus: bool


@dataclass
class GPTDatasets:
    train: Dataset
    valid: Dataset | None
    test: Dataset | None
    tokenizer: Tokenizer
    data: ResolvedData


class _MegatronTokenizerInfo:
    """What megatron's GPTDataset reads from a tokenizer: ids, and an identity for its cache key
    (serialised through ``unique_identifiers``)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        assert tokenizer.model_path is not None
        self.eod = tokenizer.eod_id
        self.pad = tokenizer.pad_id
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = {
            "class": "SentencePieceTokenizer",
            "model_sha256": tokenizer.model_sha256(),
            "vocab_size": self.vocab_size,
        }


def resolve_data(cfg: DataConfig | Any, *, show_progress: bool = True) -> ResolvedData:
    """Validate ``cfg`` and resolve it; builds (or waits for) the default corpus if no blend."""
    validate_data_config(cfg)
    cache_dir = resolve_cache_dir(cfg.cache_dir)
    if cfg.blend is None:
        model, prefix = ensure_default_corpus(
            cache_dir, int(cfg.default_vocab_size), show_progress=show_progress
        )
        return ResolvedData([prefix], None, model, cache_dir, True)
    prefixes, weights = parse_blend(cfg.blend)
    prefixes = [str(Path(p).expanduser().resolve()) for p in prefixes]
    model = str(Path(cfg.tokenizer_model).expanduser().resolve())
    return ResolvedData(prefixes, weights, model, cache_dir, False)


def _num_tokens(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # Keep the dataset referenced while summing: dropping it unmaps the array under us.
    dataset = IndexedDataset(prefix)
    return int(dataset.sequence_lengths.sum())


@contextlib.contextmanager
def _index_cache_lock(cache_dir: Path) -> Iterator[None]:
    """Several jobs with the same data settings (a sweep of losses) share megatron's index cache,
    and megatron writes its index files in place: a job finding another's half-written files would
    load them. So each job's global rank 0, the rank that writes them, builds under a file lock;
    its other ranks load only after rank 0 (megatron's barrier), so they take no lock."""
    if dist.get_rank() != 0:
        yield
        return
    with exclusive_lock(cache_dir / "megatron_index.lock", "megatron's dataset indices"):
        yield


def build_gpt_datasets(
    cfg: DataConfig | Any,
    *,
    sequence_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int | None = None,
    test_samples: int | None = None,
    show_progress: bool = True,
) -> GPTDatasets:
    """Build the splits of ``cfg`` with megatron-core; call on every rank.

    ``*_samples`` is how many samples each split must provide (epochs are repeated, reshuffled,
    as needed). None = one pass over the split for a single dataset; a blend of several has no
    natural pass, so there None skips the split. Skipped splits, and splits with share 0 in
    ``cfg.split``, come back as None. Blends without weights are weighted by token counts.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes on optional GPU libraries and deprecations
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    data = resolve_data(cfg, show_progress=show_progress)
    # Bad files or an empty split fail here in one line, not as a megatron traceback or hang.
    check_data(cfg, sequence_length)
    tokenizer = Tokenizer.from_file(data.tokenizer_model)
    require_megatron_helpers()
    weights = data.weights
    if len(data.prefixes) == 1:
        weights = None  # a lone dataset needs no blending, whatever its weight
    elif weights is None:
        # Megatron caps an unweighted blend at one epoch; token-count weights keep the same mix
        # and let it repeat over epochs like a single dataset does.
        weights = [float(_num_tokens(p)) for p in data.prefixes]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=sequence_length,
        blend=(data.prefixes, weights),
        split=str(cfg.split),
        path_to_cache=str(data.cache_dir / "megatron_index"),
        tokenizer=_MegatronTokenizerInfo(tokenizer),
        reset_position_ids=bool(cfg.reset_position_ids),
        reset_attention_mask=False,
        eod_mask_loss=bool(cfg.eod_mask_loss),
        create_attention_mask=False,  # causal masking happens in the attention kernel
        mid_level_dataset_surplus=float(cfg.mid_level_dataset_surplus),
    )
    sizes = [train_samples, valid_samples, test_samples]
    skipped = [False] * 3
    if weights is not None:
        # Megatron needs sizes for weighted blends; 0 builds an empty split we then drop.
        skipped = [n is None for n in sizes]
        sizes = [0 if n is None else n for n in sizes]
    # Megatron's BlendedDataset asks torch.distributed for the rank on an index-cache miss even
    # in a single process: the build runs inside a world (of one, unless a launcher made one).
    with single_process_world(model_parallel=False), _index_cache_lock(data.cache_dir):
        splits = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    train, valid, test = (None if skip else ds for ds, skip in zip(splits, skipped, strict=True))
    if train is None or len(train) == 0:
        raise ValueError(
            f"data.split: {cfg.split!r} leaves no training samples of length {sequence_length}; "
            "give the train split more weight or use more data"
        )
    return GPTDatasets(train, valid, test, tokenizer, data)
