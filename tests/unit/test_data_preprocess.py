"""Raw text -> megatron indexed dataset: round trip, worker invariance, error messages."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from divprec.data.preprocess import preprocess_files
from divprec.data.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "δέλτα", "😀", "def", "return\tself", "x=1"]
    return [
        "\n".join(
            "  " * rng.randint(0, 2)
            + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            for _ in range(rng.randint(1, 10))
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str], Path]:
    root = tmp_path_factory.mktemp("pre")
    docs = synthetic_documents(240)
    jsonl = root / "docs.jsonl"
    # One empty document and one blank line: both are skipped.
    records = [json.dumps({"text": d}) for d in docs[:200]] + [json.dumps({"text": ""}), ""]
    jsonl.write_text("\n".join(records) + "\n", encoding="utf-8")
    txts = []
    for i, d in enumerate(docs[200:]):
        txt = root / f"doc{i}.txt"
        txt.write_text(d, encoding="utf-8")
        txts.append(txt)
    model = train_tokenizer([jsonl, *txts], root / "tok", 500)
    return [jsonl, *txts], docs, model


def _read(prefix: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def test_round_trip_through_indexed_dataset(inputs, tmp_path: Path) -> None:
    files, docs, model = inputs
    stats = preprocess_files(files, model, tmp_path / "out", show_progress=False)
    tok = Tokenizer.from_file(model)
    ds = _read(tmp_path / "out")
    assert len(ds) == stats.num_documents == len(docs)
    assert int(ds.sequence_lengths.sum()) == stats.num_tokens
    assert ds.index.dtype == np.uint16
    for i, doc in enumerate(docs):
        ids = ds[i]
        assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == doc
    assert not list(tmp_path.glob(".*tmp*"))  # temporary files were renamed into place


def test_workers_give_identical_output(inputs, tmp_path: Path) -> None:
    files, _, model = inputs
    kw = dict(show_progress=False, chunk_bytes=2000)  # many chunks, so order matters
    preprocess_files(files, model, tmp_path / "one", workers=1, **kw)
    preprocess_files(files, model, tmp_path / "two", workers=2, **kw)
    for suffix in (".bin", ".idx"):
        one = Path(f"{tmp_path / 'one'}{suffix}").read_bytes()
        assert one == Path(f"{tmp_path / 'two'}{suffix}").read_bytes()


def test_missing_input_leaves_nothing(inputs, tmp_path: Path) -> None:
    files, _, model = inputs
    with pytest.raises(FileNotFoundError, match=r"^input file not found: .*missing.jsonl$"):
        preprocess_files([*files, tmp_path / "missing.jsonl"], model, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match=r"^tokenizer model not found"):
        preprocess_files(files, tmp_path / "nope.model", tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_json_names_the_line(inputs, tmp_path: Path, workers: int) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        preprocess_files([bad], inputs[2], tmp_path / "o", workers=workers, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_tools(inputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files, _, _ = inputs
    train = _tool("train_tokenizer")
    args = ["--input", *map(str, files), "--model-prefix", str(tmp_path / "t")]
    assert train.main([*args, "--vocab-size", "400"]) == 0
    pre = _tool("preprocess_data")
    args = ["--tokenizer-model", str(tmp_path / "t.model"), "--output-prefix", str(tmp_path / "d")]
    assert pre.main(["--input", *map(str, files), "--workers", "1", "--no-progress", *args]) == 0
    assert len(_read(tmp_path / "d")) == 240
    capsys.readouterr()
    assert pre.main(["--input", str(tmp_path / "nope.jsonl"), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: input file not found:" in err
