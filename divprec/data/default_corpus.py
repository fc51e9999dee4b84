"""The embedded default corpus: the running interpreter's standard library sources.

Every machine with Python has it, so a run with no data configured still trains on real text.
It is built once per (Python version, vocabulary size, format version) under the cache dir:

    <cache_dir>/default_corpus/<key>/tokenizer.model
    <cache_dir>/default_corpus/<key>/stdlib.{bin,idx}
    <cache_dir>/default_corpus/<key>/meta.json      (written last; its presence marks "done")

One process builds, in a temporary directory renamed into place, while holding a file lock;
concurrent callers (the other ranks) wait on the lock and then read the finished result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from divprec.data.filelock import exclusive_lock
from divprec.data.preprocess import preprocess_files
from divprec.data.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

# Bump when the file selection, tokenizer settings or layout change: old caches are then ignored.
FORMAT_VERSION = 1
DATA_NAME = "stdlib"
TOKENIZER_NAME = "tokenizer"
# Tokenizer training sees a seeded sample of this much text (~1/4 of the corpus).
TOKENIZER_TRAIN_BYTES = 8_000_000
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_source_files(source_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The UTF-8 ``*.py`` files under ``source_dir`` (default: the stdlib), sorted.

    Third-party packages are left out; test suites stay in (a third of the code, real Python).
    Files that are not UTF-8 (a few deliberate encoding tests) are skipped.
    """
    root = Path(source_dir or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath, name)
            try:
                path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            files.append(path)
    return files


def _cache_key(vocab_size: int, source_dir: str | None, max_files: int | None) -> str:
    key = f"{DATA_NAME}-py{sys.version_info.major}.{sys.version_info.minor}-v{vocab_size}"
    key += f"-f{FORMAT_VERSION}"
    if source_dir is not None or max_files is not None:
        custom = f"{Path(source_dir).resolve() if source_dir else ''}|{max_files}"
        key += "-" + hashlib.sha256(custom.encode()).hexdigest()[:12]
    return key


def _build(
    out_dir: Path, files: list[Path], vocab_size: int, num_workers: int, show_progress: bool
) -> dict:
    start = time.perf_counter()
    model = train_tokenizer(
        files, out_dir / TOKENIZER_NAME, vocab_size, max_train_bytes=TOKENIZER_TRAIN_BYTES
    )
    tokenizer_seconds = time.perf_counter() - start
    stats = preprocess_files(
        files, model, out_dir / DATA_NAME, workers=num_workers, show_progress=show_progress
    )
    return {
        "python": sys.version,
        "vocab_size": vocab_size,
        "format_version": FORMAT_VERSION,
        "num_files": len(files),
        "num_documents": stats.num_documents,
        "num_tokens": stats.num_tokens,
        "input_bytes": stats.input_bytes,
        "tokenizer_seconds": round(tokenizer_seconds, 2),
        "build_seconds": round(time.perf_counter() - start, 2),
    }


def ensure_default_corpus(
    cache_dir: str | os.PathLike[str],
    vocab_size: int,
    *,
    source_dir: str | os.PathLike[str] | None = None,
    max_files: int | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> tuple[str, str]:
    """Build (once) and return ``(tokenizer_model_path, data_path_prefix)`` of the default corpus.

    Safe to call from every rank at once. ``source_dir``/``max_files`` restrict the source files
    (tests use them); they are part of the cache key.
    """
    source = str(source_dir) if source_dir is not None else None
    root = Path(cache_dir).expanduser().resolve() / "default_corpus"
    key = _cache_key(vocab_size, source, max_files)
    final = root / key
    result = (str(final / f"{TOKENIZER_NAME}.model"), str(final / DATA_NAME))
    if (final / "meta.json").is_file():
        return result

    with exclusive_lock(
        root / f"{key}.lock", what=f"building the default corpus {final}"
    ) as locked:
        if (final / "meta.json").is_file():  # another process built it while we waited
            return result
        if locked:
            # Leftovers of a builder that died; we hold the lock, so nobody else uses them.
            for stale in [*root.glob(f".{key}.tmp*"), final]:
                shutil.rmtree(stale, ignore_errors=True)

        files = stdlib_source_files(source)[:max_files]
        if not files:
            raise FileNotFoundError(f"no UTF-8 .py files under {source or 'the stdlib'}")
        workers = num_workers or min(os.cpu_count() or 1, 8)
        logger.info("building the default corpus (%d files) into %s", len(files), final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp", dir=root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            meta = _build(tmp, files, vocab_size, workers, show_progress)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                # Without a lock another builder may have won the race: use its result.
                if not (final / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("default corpus ready: %s", meta)
    return result


def default_corpus_meta(cache_dir: str | os.PathLike[str], vocab_size: int) -> dict | None:
    """The build record (sizes, timings) of the default stdlib corpus, or None if not built."""
    root = Path(cache_dir).expanduser().resolve() / "default_corpus"
    meta = root / _cache_key(vocab_size, None, None) / "meta.json"
    return json.loads(meta.read_text()) if meta.is_file() else None
