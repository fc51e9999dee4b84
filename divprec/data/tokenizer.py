"""SentencePiece tokenizer: a small wrapper for encode/decode and a trainer for raw text.

Trained models are lossless on ordinary text: no normalisation, no dummy prefix, whitespace kept,
byte fallback for anything outside the vocabulary. The one exception is SentencePiece's own
space marker U+2581, which decodes to a plain space.

Special ids of trained models: pad=0, unk=1, bos=2, eos=3; eos is the end-of-document token.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from divprec.data.documents import TxtMode, iter_documents, total_input_bytes

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Training "sentences" are blocks of consecutive lines, so pieces can learn newlines and
# indentation; blocks stay well under SentencePiece's max_sentence_length, which drops longer ones.
_MAX_SENTENCE_BYTES = 4096
_LINES_PER_SENTENCE = 16


class Tokenizer:
    """A SentencePiece model with the ids the data pipeline needs."""

    def __init__(self, processor: spm.SentencePieceProcessor, model_path: Path | None = None):
        self._sp = processor
        self.model_path = model_path
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer {model_path}: has no eos piece to use as end-of-document")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a SentencePiece ``.model``; a file that is not one raises ValueError (one line)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            processor = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path}: not a readable SentencePiece model ({reason})") from None
        return cls(processor, path.resolve())

    def model_sha256(self) -> str:
        """SHA-256 of the model file: the tokenizer's identity in caches and dataset records."""
        assert self.model_path is not None, "a tokenizer built in memory has no file"
        return hashlib.sha256(self.model_path.read_bytes()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        """End-of-document token, appended after every document."""
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Padding token, or -1 when the model has none."""
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control tokens (eod, pad) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def _split_block(block: str) -> Iterator[str]:
    """Cut an over-long block at character boundaries so no sentence is dropped."""
    if len(block.encode("utf-8")) <= _MAX_SENTENCE_BYTES:
        yield block
        return
    step = _MAX_SENTENCE_BYTES // 4  # at most 4 UTF-8 bytes per character
    for i in range(0, len(block), step):
        yield block[i : i + step]


def _sentences(text: str) -> Iterator[str]:
    lines = text.split("\n")
    for i in range(0, len(lines), _LINES_PER_SENTENCE):
        block = "\n".join(lines[i : i + _LINES_PER_SENTENCE])
        if i + _LINES_PER_SENTENCE < len(lines):
            block += "\n"
        if block.strip():
            yield from _split_block(block)


def _sampled_sentences(
    input_files: Sequence[str | os.PathLike[str]],
    text_key: str,
    txt_mode: TxtMode,
    max_train_bytes: int | None,
    seed: int,
) -> Iterator[str]:
    # Streamed Bernoulli sample: memory stays bounded by the sample, whatever the input size.
    total = total_input_bytes(input_files)
    keep = 1.0 if not max_train_bytes else min(1.0, max_train_bytes / max(total, 1))
    rng = random.Random(seed)
    for doc in iter_documents(input_files, text_key=text_key, txt_mode=txt_mode):
        for sentence in _sentences(doc.text):
            if keep >= 1.0 or rng.random() < keep:
                yield sentence


def train_tokenizer(
    input_files: Sequence[str | os.PathLike[str]],
    model_prefix: str | os.PathLike[str],
    vocab_size: int,
    *,
    text_key: str = "text",
    txt_mode: TxtMode = "file",
    model_type: str = "bpe",
    max_train_bytes: int | None = 8_000_000,
    character_coverage: float = 0.9999,
    seed: int = 0,
    num_threads: int | None = None,
    verbose: bool = False,
) -> Path:
    """Train a byte-fallback SentencePiece model on .txt/.jsonl files; returns ``<prefix>.model``.

    ``max_train_bytes`` caps the text the trainer sees (a seeded random sample of line blocks);
    None trains on everything. The model file is written atomically.
    """
    model_path = Path(f"{model_prefix}.model").expanduser()
    sentences = _sampled_sentences(input_files, text_key, txt_mode, max_train_bytes, seed)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        # Lossless text: keep every character and all whitespace as is.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=_MAX_SENTENCE_BYTES * 2,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # Small corpora may not support the full vocabulary; take what they give.
        hard_vocab_limit=False,
        num_threads=num_threads or os.cpu_count() or 1,
        train_extremely_large_corpus=False,
        minloglevel=0 if verbose else 2,
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(f".{model_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(proto.getvalue())
    os.replace(tmp, model_path)
    return model_path
