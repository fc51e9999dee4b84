"""The embedded default corpus: built once, atomically, by one of many concurrent callers."""

from __future__ import annotations

import errno
import fcntl
import sys
import threading
from pathlib import Path

import pytest

from divprec.data import default_corpus as dc
from divprec.data.tokenizer import Tokenizer

SOURCES = [
    'def add(a, b):\n    """Sum."""\n    return a + b\n',
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "",  # empty files (like most __init__.py) are no documents
    "import os\n\nPATH = os.path.join('a', 'b')  # ünïcode\n",
    "for i in range(10):\n\tprint(i ** 2)\n",
]


@pytest.fixture
def source_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for i, text in enumerate(SOURCES * 8):
        path = src / f"pkg{i % 3}" / f"m{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (src / "pkg0" / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped
    (src / "site-packages").mkdir()
    (src / "site-packages" / "third_party.py").write_text("x = 1\n")
    (src / "notes.txt").write_text("not python\n")
    return src


def _ensure(cache: Path, src: Path, **kw) -> tuple[str, str]:
    return dc.ensure_default_corpus(cache, 512, source_dir=src, show_progress=False, **kw)


def test_build_and_read_back(source_dir: Path, tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    files = dc.stdlib_source_files(source_dir)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    assert len(files) == len(SOURCES) * 8 and files == sorted(files)

    model, prefix = _ensure(tmp_path / "cache", source_dir, num_workers=2)
    tok = Tokenizer.from_file(model)
    data = IndexedDataset(prefix)
    texts = [t for t in (p.read_text(encoding="utf-8") for p in files) if t]
    assert len(data) == len(texts)
    for i, text in enumerate(texts):
        assert data[i][-1] == tok.eod_id and tok.decode(data[i][:-1]) == text
    assert Path(prefix).parent.name.startswith(
        f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v512-f{dc.FORMAT_VERSION}-"
    )


def test_cached_after_first_build(
    source_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _ensure(tmp_path, source_dir, num_workers=1)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached corpus")

    monkeypatch.setattr(dc, "_build", no_rebuild)
    assert _ensure(tmp_path, source_dir) == first


def test_cache_key_covers_vocab_and_selection() -> None:
    base = dc._cache_key(4096, None, None)
    assert base == f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v4096-f1"
    assert len({base, dc._cache_key(512, None, None), dc._cache_key(4096, None, 10)}) == 3


def test_concurrent_callers_build_once(
    source_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # flock locks belong to open file descriptions, so threads contend like separate ranks.
    calls = []
    real_build = dc._build

    def counting_build(*args, **kwargs):
        calls.append(threading.get_ident())
        return real_build(*args, **kwargs)

    monkeypatch.setattr(dc, "_build", counting_build)
    results: list[tuple[str, str]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(_ensure(tmp_path, source_dir, num_workers=1))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "default_corpus").iterdir() if p.is_dir()] == [
        Path(results[0][1]).parent.name
    ]


def test_failed_build_leaves_no_trace_and_stale_temps_are_removed(
    source_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_build(out_dir: Path, *args, **kwargs):
        (out_dir / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(dc, "_build", failing_build)
    with pytest.raises(RuntimeError, match="disk full"):
        _ensure(tmp_path, source_dir)
    root = tmp_path / "default_corpus"
    assert [p for p in root.iterdir() if p.is_dir()] == []

    monkeypatch.undo()
    key = dc._cache_key(512, str(source_dir), None)
    stale = root / f".{key}.tmpdead"  # left by a builder that was killed
    stale.mkdir()
    model, prefix = _ensure(tmp_path, source_dir, num_workers=1)
    assert not stale.exists() and Path(model).is_file() and Path(prefix + ".idx").is_file()


def test_stdlib_selection() -> None:
    files = dc.stdlib_source_files()
    assert {"os.py", "typing.py", "decoder.py"} <= {p.name for p in files}
    assert not any("site-packages" in p.parts for p in files)


def test_file_system_without_locks(
    source_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Racing builders without a lock: each builds privately, the first rename wins, all agree.
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    results: list[tuple[str, str]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(_ensure(tmp_path, source_dir, num_workers=1))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    root = tmp_path / "default_corpus"
    assert [p.name for p in root.iterdir() if p.is_dir()] == [Path(results[0][1]).parent.name]
