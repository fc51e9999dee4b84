"""The `data` config group and its validation.

Every check raises ``ValueError`` with a single line that names the offending ``data.<key>`` and
says how to fix it, so a bad override fails before any process group or dataset is built.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# SentencePiece with byte fallback reserves 256 byte pieces plus the special tokens; below this a
# tokenizer has almost no room for learned merges.
MIN_VOCAB_SIZE = 512


@dataclass
class DataConfig:
    """Where the training tokens come from (Hydra group ``data``; override as ``data.<field>``)."""

    blend: list[str] | None = None
    """Megatron-style blend: ["weight", "path_prefix", "weight", "path_prefix", ...] or just
    ["path_prefix", ...] (weights then follow the dataset sizes). Each prefix names a
    ``<prefix>.bin`` / ``<prefix>.idx`` pair written by tools/preprocess_data.py.
    None = the embedded default corpus (the Python standard library's sources)."""

    tokenizer_model: str | None = None
    """SentencePiece ``.model`` the blend was tokenised with; required when ``blend`` is set."""

    split: str = "98,2,0"
    """Train/valid/test proportions of the documents of every blend entry."""

    cache_dir: str | None = None
    """Default corpus and megatron dataset-index caches; None = $DIVPREC_CACHE or
    ~/.cache/divprec. Must be on a file system every rank sees (multi-node: a shared one)."""

    default_vocab_size: int = 4096
    """Vocabulary of the tokenizer trained for the default corpus."""

    eod_mask_loss: bool = False
    """Exclude the end-of-document token from the loss."""

    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token."""

    num_workers: int = 0
    """DataLoader worker processes per rank for reading samples (0 = in the training process)."""

    mid_level_dataset_surplus: float = 0.005
    """Extra fraction of samples built per blend entry so the weighted blend never runs short."""


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache directory: the argument, else $DIVPREC_CACHE, else ~/.cache/divprec."""
    chosen = cache_dir or os.environ.get("DIVPREC_CACHE") or "~/.cache/divprec"
    return Path(chosen).expanduser().resolve()


def _as_weight(entry: Any) -> float | None:
    try:
        return float(entry)
    except (TypeError, ValueError):
        return None


def parse_blend(blend: list[str] | Any) -> tuple[list[str], list[float] | None]:
    """Split a blend list into (path prefixes, weights or None); raises ValueError on odd lists.

    The list is weighted when its first entry is a number; then it must alternate weight, prefix.
    """
    entries = [str(e).strip() for e in blend]
    if not entries:
        raise ValueError(
            "data.blend: empty list; give path prefixes or weight/prefix pairs, "
            "or data.blend=null for the default corpus"
        )
    if _as_weight(entries[0]) is None:
        return entries, None
    if len(entries) % 2:
        raise ValueError(
            f"data.blend: {len(entries)} entries, but a weighted blend alternates "
            "weight, path_prefix; add the missing weight or prefix"
        )
    weights: list[float] = []
    for i in range(0, len(entries), 2):
        w = _as_weight(entries[i])
        if w is None or not math.isfinite(w) or w <= 0:
            raise ValueError(
                f"data.blend[{i}]: weight must be a positive number, got {entries[i]!r} "
                f"(before prefix {entries[i + 1]!r})"
            )
        if _as_weight(entries[i + 1]) is not None:
            raise ValueError(
                f"data.blend[{i + 1}]: expected a path prefix after weight {entries[i]!r}, "
                f"got the number {entries[i + 1]!r}"
            )
        weights.append(w)
    return entries[1::2], weights


_SPLIT_RE = re.compile(r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*$")


def split_shares(split: str) -> tuple[float, float, float]:
    """``"98,2,0"`` -> (0.98, 0.02, 0.0); raises ValueError on a malformed split string."""
    if not _SPLIT_RE.match(str(split)):
        shares = []
    else:
        shares = [float(x) for x in str(split).split(",")] + [0.0, 0.0]
    if not shares or sum(shares) <= 0:
        raise ValueError(
            f"data.split: expected up to three comma-separated non-negative numbers with a "
            f"positive sum, like '98,2,0', got {split!r}"
        )
    total = sum(shares)
    return shares[0] / total, shares[1] / total, shares[2] / total


def validate_data_config(cfg: DataConfig | Any) -> None:
    """Raise ValueError (one line: key and fix) if ``cfg`` cannot produce a dataset."""
    split_shares(cfg.split)
    if int(cfg.default_vocab_size) < MIN_VOCAB_SIZE:
        raise ValueError(
            f"data.default_vocab_size: {cfg.default_vocab_size} is too small for a byte-fallback "
            f"tokenizer; use at least {MIN_VOCAB_SIZE}"
        )
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers: must be >= 0, got {cfg.num_workers}")

    if cfg.tokenizer_model is not None and not Path(cfg.tokenizer_model).expanduser().is_file():
        raise ValueError(
            f"data.tokenizer_model: file not found: {cfg.tokenizer_model}; "
            "point it at a SentencePiece .model (tools/train_tokenizer.py writes one)"
        )
    if cfg.blend is None:
        if cfg.tokenizer_model is not None:
            raise ValueError(
                "data.tokenizer_model: set without data.blend, but the default corpus brings its "
                "own tokenizer; set data.blend too, or data.tokenizer_model=null"
            )
        return
    prefixes, _ = parse_blend(cfg.blend)
    if cfg.tokenizer_model is None:
        raise ValueError(
            "data.tokenizer_model: required when data.blend is set; set it to the SentencePiece "
            ".model the blend was preprocessed with"
        )
    step = 1 if _as_weight(str(cfg.blend[0]).strip()) is None else 2
    for n, prefix in enumerate(prefixes):
        index = n * step + (step - 1)
        for suffix in (".bin", ".idx"):
            path = Path(prefix + suffix).expanduser()
            if not path.is_file():
                raise ValueError(
                    f"data.blend[{index}]: missing {path} for prefix {prefix!r}; create it with "
                    "tools/preprocess_data.py or fix the prefix (no .bin/.idx suffix)"
                )
