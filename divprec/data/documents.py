"""Reading documents out of raw input files (.jsonl or plain text), in a fixed order.

JSONL (``.jsonl``/``.json``): one document per non-empty line, the text under ``text_key``.
Anything else is UTF-8 text: the whole file is one document (``txt_mode="file"``), or every
non-empty line is one (``txt_mode="line"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

JSONL_SUFFIXES = (".jsonl", ".json")
TxtMode = Literal["file", "line"]


@dataclass(frozen=True)
class Document:
    text: str
    nbytes: int
    """Raw input bytes this document was read from (progress accounting)."""


def check_input_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The inputs as Paths; raises FileNotFoundError (one line) for the first one missing."""
    if not paths:
        raise FileNotFoundError("no input files given")
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        out.append(path)
    return out


def _iter_jsonl(path: Path, text_key: str) -> Iterator[Document]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_key not in record:
                raise ValueError(
                    f"{path}:{lineno}: no {text_key!r} field; "
                    "choose the text field (text_key, --json-key)"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_key!r} is not a string")
            yield Document(text, len(raw))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def iter_documents(
    paths: Sequence[str | os.PathLike[str]],
    *,
    text_key: str = "text",
    txt_mode: TxtMode = "file",
) -> Iterator[Document]:
    """Yield the documents of ``paths`` in order (file order, then position in the file)."""
    for path in check_input_files(paths):
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _iter_jsonl(path, text_key)
        elif txt_mode == "file":
            text = _read_text(path)
            if text:
                yield Document(text, path.stat().st_size)
        elif txt_mode == "line":
            # Split on "\n" only: str.splitlines would also cut at form feeds and U+2028.
            for line in _read_text(path).split("\n"):
                if line.strip():
                    yield Document(line.removesuffix("\r"), len(line.encode("utf-8")) + 1)
        else:
            raise ValueError(f"txt_mode must be 'file' or 'line', got {txt_mode!r}")


def total_input_bytes(paths: Sequence[str | os.PathLike[str]]) -> int:
    """Sum of the input sizes, the total of the progress bar."""
    return sum(p.stat().st_size for p in check_input_files(paths))
