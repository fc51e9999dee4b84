"""Bad data never hangs and never reaches the model as a wrong token: one line naming the file.

Each case is the real fault (a tiny corpus, a truncated file, another tokenizer) fed to
``build_gpt_datasets``, the library's way in; the entry point runs the same checks in config
validation (tests/unit/test_config.py).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
from bad_data import NUM_DOCUMENTS, SmallCorpus, copy_dataset, make_small_corpus, truncate

from divprec.data.config import DataConfig
from divprec.data.dataset import build_gpt_datasets
from divprec.data.tokenizer import Tokenizer, train_tokenizer

# divprec.data.checks and .sidecar are imported in the tests that use them, so that the cases
# going through build_gpt_datasets alone also run (and fail) on code without them.

SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SmallCorpus:
    return make_small_corpus(tmp_path_factory.mktemp("small_corpus"))


def _cfg(prefix: str, tokenizer: str, cache: Path, split: str = "98,2,0") -> DataConfig:
    return DataConfig(
        blend=["1.0", prefix], tokenizer_model=tokenizer, split=split, cache_dir=str(cache)
    )


def _build(cfg: DataConfig) -> None:
    build_gpt_datasets(
        cfg, sequence_length=SEQ, seed=0, train_samples=64, valid_samples=8, show_progress=False
    )


def _build_error(cfg: DataConfig) -> str:
    with pytest.raises(ValueError) as info:
        _build(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_preprocessing_records_the_tokenizer(corpus: SmallCorpus) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from divprec.data.sidecar import read_record

    record = read_record(corpus.prefix)
    tokenizer = Tokenizer.from_file(corpus.tokenizer)
    dataset = IndexedDataset(corpus.prefix)
    tokens = np.concatenate([dataset[i] for i in range(len(dataset))])
    assert record is not None
    assert record.tokenizer_sha256 == tokenizer.model_sha256()
    assert record.tokenizer_vocab_size == tokenizer.vocab_size == 1024
    assert record.max_token_id == int(tokens.max())
    assert (record.num_documents, record.num_tokens) == (NUM_DOCUMENTS, tokens.size)
    assert record.bin_bytes == Path(f"{corpus.prefix}.bin").stat().st_size


@pytest.mark.timeout(60)  # today's megatron-core loops forever here: fail, don't hang
def test_tiny_corpus_with_the_default_split_fails_instead_of_hanging(
    corpus: SmallCorpus, tmp_path: Path
) -> None:
    message = _build_error(_cfg(corpus.prefix, corpus.tokenizer, tmp_path))
    assert re.match(
        rf"^data\.split='98,2,0': the valid split of data\.blend\[1\] \({re.escape(corpus.prefix)}"
        rf"\) gets 0 of its {NUM_DOCUMENTS} documents \(0 tokens\), fewer than one sample of "
        rf"train\.seq_length \+ 1 = {SEQ + 1} tokens; give the valid split a larger share "
        r"\(now 2%\), set its share to 0 or use more data$",
        message,
    ), message
    _build(_cfg(corpus.prefix, corpus.tokenizer, tmp_path, split="90,10,0"))  # the same data trains


def test_a_split_with_documents_but_too_few_tokens(corpus: SmallCorpus) -> None:
    from divprec.data import checks

    cfg = _cfg(corpus.prefix, corpus.tokenizer, corpus.root, split="95,5,0")  # 1 document
    last_document = checks.read_indexed_files(corpus.prefix, "data.blend[1]").num_tokens(19, 20)
    with pytest.raises(
        ValueError,
        match=rf"the valid split .* gets 1 of its 20 documents \({last_document} tokens\), fewer "
        rf"than one sample of train\.seq_length \+ 1 = {last_document + 1} tokens",
    ):
        checks.check_data(cfg, seq_length=last_document)
    assert checks.check_data(cfg, seq_length=last_document - 1) == 1024


@pytest.mark.parametrize(
    ("split", "n", "ranges"),
    [
        ("98,2,0", 20, [(0, 20), (20, 20), None]),
        ("90,10,0", 20, [(0, 18), (18, 20), None]),
        ("1,1,1", 10, [(0, 3), (3, 7), (7, 10)]),
        ("969,30,1", 1000, [(0, 969), (969, 999), (999, 1000)]),
    ],
)
def test_split_ranges_match_megatron(split: str, n: int, ranges: list) -> None:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from divprec.data.checks import split_ranges

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    megatron = [None if m is None else (round(m[0] * n), round(m[1] * n)) for m in matrix]
    assert split_ranges(split, n) == megatron == ranges


@pytest.mark.parametrize(
    ("suffix", "drop", "match"),
    [
        (".bin", 100, r"corpus\.bin and .*corpus\.idx disagree: the index describes \d+ bytes"),
        (".idx", 16, r"corpus\.idx is \d+ bytes but its header describes 20 sequences"),
        (".idx", 10**6, r"corpus\.idx is not a megatron-core index \(truncated header"),
    ],
    ids=["bin", "idx", "idx_header"],
)
def test_truncated_files_are_named(
    corpus: SmallCorpus, tmp_path: Path, suffix: str, drop: int, match: str
) -> None:
    prefix = copy_dataset(corpus.prefix, tmp_path / "data")
    truncate(f"{prefix}{suffix}", min(drop, Path(f"{prefix}{suffix}").stat().st_size))
    message = _build_error(_cfg(prefix, corpus.tokenizer, tmp_path, split="90,10,0"))
    assert message.startswith("data.blend[1]: "), message
    assert re.search(match, message), message
    assert message.endswith("preprocess the data again with tools/preprocess_data.py"), message


def test_data_from_a_larger_tokenizer_is_refused(corpus: SmallCorpus, tmp_path: Path) -> None:
    message = _build_error(_cfg(corpus.prefix, corpus.smaller_tokenizer, tmp_path, "90,10,0"))
    assert re.match(
        r"^data\.blend\[1\]: .*corpus\.bin holds token ids up to 1023, beyond the vocabulary of "
        r"data\.tokenizer_model=.*small_tok\.model \(600\): it was tokenized with tok\.model "
        r"\(vocabulary 1024, sha256 [0-9a-f]{12}\); set data\.tokenizer_model to that tokenizer",
        message,
    ), message


def test_data_from_another_tokenizer_of_the_same_size_is_refused(
    corpus: SmallCorpus, tmp_path: Path
) -> None:
    other = train_tokenizer(
        [corpus.root / "docs.jsonl"], tmp_path / "other", 1024, seed=1, max_train_bytes=200_000
    )
    message = _build_error(_cfg(corpus.prefix, str(other), tmp_path, "90,10,0"))
    assert re.match(
        r"^data\.blend\[1\]: .*corpus\.bin was tokenized with tok\.model \(vocabulary 1024, "
        r"sha256 [0-9a-f]{12}\), not with data\.tokenizer_model=.*other\.model",
        message,
    ), message


def test_data_without_a_record(
    corpus: SmallCorpus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Data from another tool: ids checked on a bounded sample, with a warning when partial."""
    from divprec.data import checks
    from divprec.data.checks import check_data
    from divprec.data.sidecar import sidecar_path

    prefix = copy_dataset(corpus.prefix, tmp_path / "data", record=False)
    assert not sidecar_path(prefix).exists()
    with pytest.raises(ValueError, match=r"holds token id 10\d\d, outside the vocabulary"):
        check_data(_cfg(prefix, corpus.smaller_tokenizer, tmp_path, "90,10,0"), SEQ)
    cfg = _cfg(prefix, corpus.tokenizer, tmp_path, "90,10,0")
    with caplog.at_level(logging.WARNING, logger="divprec.data"):
        assert check_data(cfg, SEQ) == 1024  # the whole file fits the sample: nothing to warn
        assert caplog.records == []
        monkeypatch.setattr(checks, "SAMPLE_TOKENS", 4096)
        assert check_data(cfg, SEQ) == 1024
    (warning,) = [r.getMessage() for r in caplog.records]
    assert re.match(
        r"^data\.blend\[1\]: .*corpus has no \.meta\.json record of its tokenizer, so its token "
        r"ids were checked on 4096 of its \d+ tokens only",
        warning,
    ), warning


def test_unreadable_tokenizer_is_named(corpus: SmallCorpus, tmp_path: Path) -> None:
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    message = _build_error(_cfg(corpus.prefix, str(bad), tmp_path, "90,10,0"))
    assert re.match(
        rf"^data\.tokenizer_model: {re.escape(str(bad))}: not a readable SentencePiece model "
        r"\(.*\); point it at the SentencePiece \.model the data was preprocessed with",
        message,
    ), message


def test_checks_of_a_terabyte_dataset_read_almost_nothing(
    corpus: SmallCorpus, tmp_path: Path
) -> None:
    """1000 documents of 5e8 uint16 tokens: a sparse 1 TB .bin, checked without reading it."""
    from divprec.data import checks

    lengths = np.full(1000, 500_000_000, dtype=np.int32)
    pointers = np.arange(1000, dtype=np.int64) * 1_000_000_000
    prefix = tmp_path / "huge"
    with open(f"{prefix}.idx", "wb") as f:
        f.write(checks._HEADER.pack(checks._MAGIC, 1, 8, 1000, 1001))  # 8: uint16
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(1001, dtype=np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(10**12)
    cfg = _cfg(str(prefix), corpus.tokenizer, tmp_path, "98,2,0")
    started = time.monotonic()
    assert checks.check_data(cfg, seq_length=4096) == 1024
    elapsed = time.monotonic() - started
    # A full read of 1 TB takes minutes at the fastest; the checks read a few MB.
    assert elapsed < 30, elapsed
    print(f"checks of a 1 TB dataset: {elapsed:.2f} s")
