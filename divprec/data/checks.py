"""Start-up checks of the data a run will read, before any process group or dataset exists.

Each failure is one ``ValueError`` line naming the file or split, what is wrong, and the fix:

- ``data.tokenizer_model`` loads as a SentencePiece model;
- every blend entry's ``.idx`` is a megatron-core index of the size its header describes, and the
  ``.bin`` holds exactly the bytes the index points at (a truncated or mismatched pair otherwise
  fails deep in megatron-core with a traceback);
- every split with a positive share of ``data.split`` gets at least one sample
  (``seq_length + 1`` tokens) from every blend entry. megatron-core's GPTDataset repeats epochs
  until it has the samples it is asked for, and loops forever on a split without tokens;
- every token id fits the tokenizer: compared with the record preprocessing wrote
  (``<prefix>.meta.json``: tokenizer hash, vocabulary, largest id). Data without a record is
  checked on a bounded sample of its tokens, with a warning that the check was partial.

Cost, independent of the dataset's size: the ``.idx`` header, a few entries of its arrays (the
splits' token counts come from the sequence pointers), the record, the tokenizer file, and for
data without a record at most ``SAMPLE_TOKENS`` tokens of the ``.bin``.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from divprec.data.config import DataConfig, parse_blend, split_shares
from divprec.data.sidecar import SUFFIX, read_record
from divprec.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# megatron-core's index format (indexed_dataset.py): magic, version <Q, dtype code <B, sequence
# count <Q, document count <Q, then int32 lengths [S], int64 byte pointers [S], int64 document
# indices [D], and optionally int8 modes [S].
_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
SPLIT_NAMES = ("train", "valid", "test")
SAMPLE_TOKENS = 1 << 20  # tokens read from a .bin without a record (16 blocks spread over it)
_SAMPLE_BLOCKS = 16
_FIX = "preprocess the data again with tools/preprocess_data.py"


@dataclass(frozen=True)
class IndexedFiles:
    """The checked ``<prefix>.idx``/``.bin`` pair: token dtype, sequence count, byte pointers."""

    prefix: str
    dtype: np.dtype
    num_sequences: int
    lengths: np.ndarray  # [S] int32, memory-mapped
    pointers: np.ndarray  # [S] int64 byte offsets into the .bin, memory-mapped
    bin_bytes: int

    def num_tokens(self, begin: int, end: int) -> int:
        """Tokens of sequences [begin, end): from two pointers, not a sum over the lengths."""
        if end <= begin:
            return 0
        last = int(self.pointers[end - 1]) + int(self.lengths[end - 1]) * self.dtype.itemsize
        return (last - int(self.pointers[begin])) // self.dtype.itemsize


def read_indexed_files(prefix: str, key: str) -> IndexedFiles:
    """Check that ``<prefix>.idx`` and ``<prefix>.bin`` agree; ``key`` names the blend entry."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    idx_bytes, bin_bytes = idx.stat().st_size, bin_.stat().st_size
    with idx.open("rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[: len(_MAGIC)] != _MAGIC:
        raise ValueError(
            f"{key}: {idx} is not a megatron-core index (truncated header or another format, "
            f"{idx_bytes} bytes); {_FIX}"
        )
    _, version, code, num_seq, num_docs = _HEADER.unpack(head)
    if version != 1 or code not in _DTYPES:
        raise ValueError(
            f"{key}: {idx} has an unknown index version {version} or token type {code}; {_FIX}"
        )
    dtype = np.dtype(_DTYPES[code])
    arrays = _HEADER.size + num_seq * (4 + 8) + num_docs * 8
    if idx_bytes not in (arrays, arrays + num_seq):  # + the optional per-sequence modes
        raise ValueError(
            f"{key}: {idx} is {idx_bytes} bytes but its header describes {num_seq} sequences "
            f"and {num_docs} documents ({arrays} bytes): the .idx is truncated; {_FIX}"
        )
    lengths = np.memmap(idx, np.int32, "r", offset=_HEADER.size, shape=(num_seq,))
    pointers = np.memmap(idx, np.int64, "r", offset=_HEADER.size + 4 * num_seq, shape=(num_seq,))
    files = IndexedFiles(prefix, dtype, num_seq, lengths, pointers, bin_bytes)
    described = files.num_tokens(0, num_seq) * dtype.itemsize
    if (num_seq and int(pointers[0]) != 0) or described != bin_bytes:
        raise ValueError(
            f"{key}: {bin_} and {idx} disagree: the index describes {described} bytes of tokens, "
            f"the .bin has {bin_bytes} (truncated, or from another preprocessing run); {_FIX}"
        )
    return files


def split_ranges(split: str, num_sequences: int) -> list[tuple[int, int] | None]:
    """megatron-core's sequence ranges of the train/valid/test splits (None: share 0).

    The same arithmetic as its split matrix: cumulative normalised shares, ``round(bound x n)``.
    """
    shares = split_shares(split)
    bounds = [0.0]
    for share in shares:
        bounds.append(bounds[-1] + share)
    ranges: list[tuple[int, int] | None] = []
    for share, low, high in zip(shares, bounds[:-1], bounds[1:], strict=True):
        if share <= 0:
            ranges.append(None)
        else:
            ranges.append((int(round(low * num_sequences)), int(round(high * num_sequences))))
    return ranges


def check_splits(files: IndexedFiles, key: str, split: str, seq_length: int) -> None:
    """Every split with a positive share needs one sample: ``seq_length + 1`` tokens."""
    needed = seq_length + 1  # megatron's GPTDataset adds one token for the shifted labels
    shares = split_shares(split)
    for name, share, bounds in zip(
        SPLIT_NAMES, shares, split_ranges(split, files.num_sequences), strict=True
    ):
        if bounds is None:
            continue
        docs, tokens = bounds[1] - bounds[0], files.num_tokens(*bounds)
        if tokens < needed:
            zero = "" if name == "train" else ", set its share to 0"
            raise ValueError(
                f"data.split={split!r}: the {name} split of {key} ({files.prefix}) gets {docs} of "
                f"its {files.num_sequences} documents ({tokens} tokens), fewer than one sample of "
                f"train.seq_length + 1 = {needed} tokens; give the {name} split a larger share "
                f"(now {100 * share:.3g}%){zero} or use more data"
            )


def check_token_ids(files: IndexedFiles, key: str, tokenizer: Tokenizer) -> None:
    """Every token id of ``files`` must be below the tokenizer's vocabulary size."""
    vocab, path = tokenizer.vocab_size, tokenizer.model_path
    bin_ = f"{files.prefix}.bin"
    record = read_record(files.prefix)
    if record is not None:
        if record.bin_bytes != files.bin_bytes:
            raise ValueError(
                f"{key}: {files.prefix}{SUFFIX} describes a .bin of {record.bin_bytes} bytes, "
                f"{bin_} has {files.bin_bytes}: the data was rewritten without its record; {_FIX}"
            )
        made_with = (
            f"{record.tokenizer_file} (vocabulary {record.tokenizer_vocab_size}, sha256 "
            f"{record.tokenizer_sha256[:12]})"
        )
        if record.max_token_id >= vocab:
            raise ValueError(
                f"{key}: {bin_} holds token ids up to {record.max_token_id}, beyond the "
                f"vocabulary of data.tokenizer_model={path} ({vocab}): it was tokenized with "
                f"{made_with}; set data.tokenizer_model to that tokenizer, or {_FIX}"
            )
        if record.tokenizer_sha256 != tokenizer.model_sha256():
            raise ValueError(
                f"{key}: {bin_} was tokenized with {made_with}, not with data.tokenizer_model="
                f"{path} (vocabulary {vocab}); set data.tokenizer_model to that tokenizer, or "
                f"{_FIX}"
            )
        return
    if not np.issubdtype(files.dtype, np.integer):
        raise ValueError(f"{key}: {bin_} holds {files.dtype} values, not token ids; {_FIX}")
    info = np.iinfo(files.dtype)
    if info.min >= 0 and info.max < vocab:
        return  # the token type cannot hold an id beyond the vocabulary
    low, high, sampled = _sample_range(bin_, files)
    if low < 0 or high >= vocab:
        raise ValueError(
            f"{key}: {bin_} holds token id {high if high >= vocab else low}, outside the "
            f"vocabulary of data.tokenizer_model={path} (0..{vocab - 1}): it was tokenized with "
            f"another tokenizer; set data.tokenizer_model to that tokenizer, or {_FIX}"
        )
    total = files.bin_bytes // files.dtype.itemsize
    if sampled < total:
        logger.warning(
            "%s: %s has no %s record of its tokenizer, so its token ids were checked on %d of its "
            "%d tokens only; %s to record it",
            key,
            files.prefix,
            SUFFIX,
            sampled,
            total,
            _FIX,
        )


def _sample_range(bin_path: str, files: IndexedFiles) -> tuple[int, int, int]:
    """(min, max, count) of at most SAMPLE_TOKENS tokens in blocks spread over the .bin."""
    total = files.bin_bytes // files.dtype.itemsize
    if total == 0:
        return 0, 0, 0
    tokens = np.memmap(bin_path, files.dtype, "r", shape=(total,))
    if total <= SAMPLE_TOKENS:
        return int(tokens.min()), int(tokens.max()), total
    block = SAMPLE_TOKENS // _SAMPLE_BLOCKS
    low, high = None, None
    for start in np.linspace(0, total - block, num=_SAMPLE_BLOCKS, dtype=np.int64):
        part = tokens[int(start) : int(start) + block]
        low = int(part.min()) if low is None else min(low, int(part.min()))
        high = int(part.max()) if high is None else max(high, int(part.max()))
    return int(low), int(high), block * _SAMPLE_BLOCKS


def load_tokenizer(cfg: DataConfig | Any) -> Tokenizer:
    """``data.tokenizer_model`` loaded, or one ValueError line naming it and the fix."""
    try:
        return Tokenizer.from_file(cfg.tokenizer_model)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(
            f"data.tokenizer_model: {err}; point it at the SentencePiece .model the data was "
            "preprocessed with (tools/train_tokenizer.py writes one)"
        ) from None


def check_data(cfg: DataConfig | Any, seq_length: int) -> int:
    """Run every check above on ``cfg``'s blend; returns the tokenizer's vocabulary size.

    Call after ``validate_data_config`` (the files exist). The default corpus (no blend) is
    divprec's own: nothing to read yet, its vocabulary is ``data.default_vocab_size``.
    """
    if cfg.blend is None:
        return int(cfg.default_vocab_size)
    tokenizer = load_tokenizer(cfg)
    prefixes, weights = parse_blend(cfg.blend)
    step = 1 if weights is None else 2
    for n, prefix in enumerate(prefixes):
        key = f"data.blend[{n * step + step - 1}]"
        files = read_indexed_files(str(Path(prefix).expanduser()), key)
        check_splits(files, key, str(cfg.split), seq_length)
        check_token_ids(files, key, tokenizer)
    return tokenizer.vocab_size
