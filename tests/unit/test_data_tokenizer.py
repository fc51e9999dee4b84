"""SentencePiece wrapper and trainer: lossless text -> ids -> text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from divprec.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, train_tokenizer

WORDS = ["def", "class", "return", "self", "None", "über", "naïve", "日本語", "данные", "😀", "x_1"]
WORDS += ["==", "(", ")", ":", "import", "value", "True"]


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Code-like documents: indentation, blank lines, unicode, digits."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(1, 15)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 10)))
            lines.append("    " * rng.randint(0, 3) + words + str(rng.randint(0, 999)))
        docs.append("\n".join(lines) + "\n" * rng.randint(0, 2))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("tok")
    docs = synthetic_documents(300)
    txt = root / "a.txt"
    txt.write_text(docs[0], encoding="utf-8")
    jsonl = root / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[1:]), encoding="utf-8")
    return txt, jsonl, docs


@pytest.fixture(scope="module")
def tokenizer(corpus: tuple[Path, Path, list[str]]) -> Tokenizer:
    txt, jsonl, _ = corpus
    path = train_tokenizer([txt, jsonl], txt.parent / "tok", 600, text_key="body")
    return Tokenizer.from_file(path)


ROUND_TRIP = [
    "",
    "plain words",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nCRLF\n\n\nblank lines",
    "def f(x):\n    return x ** 2  # comment\n",
    "unseen: ∑ x² — ñ ß 中文 한국어 \U0001f680 \u200b zero-width",
    "ascii control \x01\x7f and NUL \x00 bytes",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_training_documents(tokenizer: Tokenizer, corpus) -> None:
    docs = corpus[2]
    assert all(
        tokenizer.decode(ids) == d
        for ids, d in zip(tokenizer.encode_batch(docs), docs, strict=True)
    )


def test_special_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.eod_id == EOS_ID and tokenizer.pad_id == PAD_ID
    assert tokenizer.eod_id != tokenizer.pad_id
    assert 300 < tokenizer.vocab_size <= 600
    # Control tokens never come out of encode and vanish in decode.
    ids = tokenizer.encode("abc")
    assert tokenizer.eod_id not in ids
    assert tokenizer.decode([tokenizer.pad_id, *ids, tokenizer.eod_id]) == "abc"


def test_learns_code_pieces(tokenizer: Tokenizer) -> None:
    # Multi-line training sentences let pieces span indentation.
    assert len(tokenizer.encode("    return")) <= 3


def test_training_is_deterministic(corpus, tmp_path: Path) -> None:
    txt, jsonl, _ = corpus
    a = train_tokenizer([txt, jsonl], tmp_path / "a", 500, text_key="body", max_train_bytes=20_000)
    b = train_tokenizer([txt, jsonl], tmp_path / "b", 500, text_key="body", max_train_bytes=20_000)
    assert a.read_bytes() == b.read_bytes()


def test_line_mode_and_missing_inputs(tmp_path: Path) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(synthetic_documents(50)), encoding="utf-8")
    path = train_tokenizer([lines], tmp_path / "m", 400, txt_mode="line")
    assert Tokenizer.from_file(path).vocab_size <= 400
    with pytest.raises(FileNotFoundError, match="input file not found: .*nope.txt"):
        train_tokenizer([lines, tmp_path / "nope.txt"], tmp_path / "m2", 400)
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer.from_file(tmp_path / "nope.model")


def test_jsonl_without_key(corpus, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"b.jsonl:1: no 'text' field"):
        train_tokenizer([corpus[1]], tmp_path / "m", 400)
