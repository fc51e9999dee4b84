"""What preprocessing records next to a dataset: ``<prefix>.meta.json``, beside ``.bin``/``.idx``.

The record names the tokenizer the tokens came from (its file's SHA-256 and vocabulary size), the
largest token id written, and the size of the ``.bin`` it describes. Start-up compares it with
``data.tokenizer_model`` (divprec.data.checks) without reading any token, whatever the data size.
Data written by other tools (megatron's preprocess_data.py) has no record.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SUFFIX = ".meta.json"
FORMAT = "divprec-indexed-dataset/1"


@dataclass(frozen=True)
class DatasetRecord:
    tokenizer_file: str
    """The tokenizer's file name when the data was written (for messages)."""
    tokenizer_sha256: str
    tokenizer_vocab_size: int
    max_token_id: int
    num_documents: int
    num_tokens: int
    bin_bytes: int
    """Size of the ``.bin`` this record describes: a rewritten ``.bin`` no longer matches."""


def sidecar_path(prefix: str | os.PathLike[str]) -> Path:
    return Path(f"{Path(prefix).expanduser()}{SUFFIX}")


def write_record(prefix: str | os.PathLike[str], record: DatasetRecord) -> Path:
    """Write ``<prefix>.meta.json`` atomically (temporary name, then rename)."""
    path = sidecar_path(prefix)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, **asdict(record)}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_record(prefix: str | os.PathLike[str]) -> DatasetRecord | None:
    """The record of ``prefix``, or None when there is none; ValueError (one line) if unreadable."""
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.pop("format", None) != FORMAT:
            raise ValueError(f"not a {FORMAT} record")
        return DatasetRecord(**raw)
    except (OSError, ValueError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path}: unreadable dataset record ({reason}); delete it and preprocess the data "
            "again with tools/preprocess_data.py"
        ) from None
