"""A new user's own small corpus, and the ways data goes wrong (for the config and data tests).

20 documents (Python standard-library sources, about 100k tokens) written by
divprec.data.preprocess, its tokenizer, and a smaller tokenizer the data was not made with.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from divprec.data.preprocess import preprocess_files
from divprec.data.tokenizer import train_tokenizer

NUM_DOCUMENTS = 20


@dataclass(frozen=True)
class SmallCorpus:
    prefix: str
    tokenizer: str
    smaller_tokenizer: str
    """Trained on the same text with a smaller vocabulary: the data holds ids beyond it."""
    root: Path


def make_small_corpus(root: Path) -> SmallCorpus:
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:NUM_DOCUMENTS]
    docs = root / "docs.jsonl"
    with docs.open("w", encoding="utf-8") as f:
        for path in sources:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8")}) + "\n")
    tokenizer = train_tokenizer([docs], root / "tok", 1024)
    smaller = train_tokenizer([docs], root / "small_tok", 600)
    preprocess_files([docs], tokenizer, root / "corpus", show_progress=False)
    return SmallCorpus(str(root / "corpus"), str(tokenizer), str(smaller), root)


def copy_dataset(prefix: str, dest: Path, *, record: bool = True) -> str:
    """``prefix``'s .bin/.idx (and its .meta.json record unless ``record=False``) under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    suffixes = (".bin", ".idx", ".meta.json") if record else (".bin", ".idx")
    for suffix in suffixes:
        if Path(f"{prefix}{suffix}").exists():  # no record from code that writes none
            shutil.copy(f"{prefix}{suffix}", dest / f"corpus{suffix}")
    return str(dest / "corpus")


def truncate(path: str | Path, drop_bytes: int) -> None:
    """Cut the last ``drop_bytes`` bytes, as an interrupted copy would."""
    size = Path(path).stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - drop_bytes)
