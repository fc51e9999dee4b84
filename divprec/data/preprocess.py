"""Tokenise raw documents into a megatron-core indexed dataset (``<prefix>.bin`` / ``.idx``).

Every document becomes one sequence: its tokens followed by the end-of-document token. Output is
byte-identical for any number of workers: documents are encoded in chunks by a process pool
whose ``imap`` returns the chunks in input order. ``<prefix>.meta.json`` records the tokenizer
and the largest token id (divprec.data.sidecar), so start-up can check them without reading the
tokens.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from divprec.data.documents import Document, TxtMode, iter_documents, total_input_bytes
from divprec.data.sidecar import DatasetRecord, sidecar_path, write_record
from divprec.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessStats:
    num_documents: int
    num_tokens: int
    input_bytes: int
    seconds: float


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 while every id fits (megatron's own threshold), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _chunks(docs: Iterator[Document], chunk_bytes: int) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    nbytes = 0
    for doc in docs:
        nbytes += doc.nbytes
        if not doc.text:
            continue
        texts.append(doc.text)
        if nbytes >= chunk_bytes:
            yield texts, nbytes
            texts, nbytes = [], 0
    if texts or nbytes:
        yield texts, nbytes


# Per-process state of the pool workers (and of the main process when it encodes itself).
_worker_tokenizer: Tokenizer | None = None
_worker_dtype: type[np.number] = np.int32


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = Tokenizer.from_file(model_path)
    _worker_dtype = token_dtype(_worker_tokenizer.vocab_size)


def _encode_chunk(chunk: tuple[list[str], int]) -> tuple[list[np.ndarray], int]:
    texts, nbytes = chunk
    assert _worker_tokenizer is not None
    eod = _worker_tokenizer.eod_id
    out = [
        np.asarray([*ids, eod], dtype=_worker_dtype)
        for ids in _worker_tokenizer.encode_batch(texts)
    ]
    return out, nbytes


def preprocess_files(
    input_files: Sequence[str | os.PathLike[str]],
    tokenizer_model: str | os.PathLike[str],
    output_prefix: str | os.PathLike[str],
    *,
    text_key: str = "text",
    txt_mode: TxtMode = "file",
    workers: int = 1,
    chunk_bytes: int = 1 << 20,
    show_progress: bool = True,
) -> PreprocessStats:
    """Tokenise ``input_files`` into ``<output_prefix>.bin`` and ``<output_prefix>.idx``.

    Empty documents are skipped. Both files appear atomically (written under temporary names,
    then renamed), so a reader never sees a half-written dataset; ``<prefix>.meta.json``
    (the tokenizer's identity and the largest token id) follows them.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tokenizer = Tokenizer.from_file(tokenizer_model)
    total_bytes = total_input_bytes(input_files)  # also checks that every input exists
    # megatron-core is heavy to import: kept out of the module so pool workers skip it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes on optional GPU libraries and deprecations
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = Path(output_prefix).expanduser()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}")
    bin_tmp, idx_tmp = Path(f"{tmp}.bin"), Path(f"{tmp}.idx")

    start = time.perf_counter()
    chunks = _chunks(iter_documents(input_files, text_key=text_key, txt_mode=txt_mode), chunk_bytes)
    num_docs = num_tokens = max_token_id = 0
    pool = None
    try:
        if workers == 1:
            _init_worker(str(tokenizer.model_path))
            encoded: Iterator[tuple[list[np.ndarray], int]] = map(_encode_chunk, chunks)
        else:
            # spawn: safe even when the caller has CUDA or many threads running.
            pool = mp.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(str(tokenizer.model_path),)
            )
            encoded = pool.imap(_encode_chunk, chunks)
        builder = IndexedDatasetBuilder(str(bin_tmp), dtype=token_dtype(tokenizer.vocab_size))
        with tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc=f"tokenising {prefix.name}",
            disable=not show_progress,
        ) as bar:
            for docs, nbytes in encoded:
                for arr in docs:
                    # Shape: arr is [doc_len + 1] (tokens then eod): one sequence per document.
                    builder.add_document(arr, [arr.size])
                    num_tokens += arr.size
                    max_token_id = max(max_token_id, int(arr.max()))
                num_docs += len(docs)
                bar.update(nbytes)
                bar.set_postfix(docs=num_docs, tokens=num_tokens, refresh=False)
        builder.finalize(str(idx_tmp))
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        for p in (bin_tmp, idx_tmp):
            p.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    if num_docs == 0:
        for p in (bin_tmp, idx_tmp):
            p.unlink(missing_ok=True)
        raise ValueError(f"no non-empty documents in {len(input_files)} input file(s)")
    # An earlier record goes first, so it never describes the new files; .bin before .idx: a
    # present .idx then implies a complete .bin; the new record last.
    sidecar_path(prefix).unlink(missing_ok=True)
    os.replace(bin_tmp, f"{prefix}.bin")
    os.replace(idx_tmp, f"{prefix}.idx")
    record = DatasetRecord(
        tokenizer_file=tokenizer.model_path.name,
        tokenizer_sha256=tokenizer.model_sha256(),
        tokenizer_vocab_size=tokenizer.vocab_size,
        max_token_id=max_token_id,
        num_documents=num_docs,
        num_tokens=num_tokens,
        bin_bytes=Path(f"{prefix}.bin").stat().st_size,
    )
    write_record(prefix, record)
    stats = PreprocessStats(num_docs, num_tokens, total_bytes, time.perf_counter() - start)
    logger.info("wrote %s.{bin,idx}: %s", prefix, stats)
    return stats
