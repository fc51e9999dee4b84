"""megatron-core GPT datasets built from a DataConfig, read through the batch iterator."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch

from divprec.data import dataset as dataset_module
from divprec.data.batches import build_batch_iterator
from divprec.data.config import DataConfig
from divprec.data.dataset import build_gpt_datasets
from divprec.data.default_corpus import ensure_default_corpus
from divprec.data.preprocess import preprocess_files
from divprec.data.tokenizer import train_tokenizer
from divprec.parallel.spawn import run_in_processes

SEQ = 16


def _write_jsonl(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "π", "x = 1", "\n", "    "]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
            f.write(json.dumps({"text": text}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ds")
    for name, seed in (("a", 0), ("b", 1)):
        _write_jsonl(root / f"{name}.jsonl", 200, seed)
    model = train_tokenizer([root / "a.jsonl", root / "b.jsonl"], root / "tok", 400)
    for name in ("a", "b"):
        preprocess_files([root / f"{name}.jsonl"], model, root / name, show_progress=False)
    return {"a": str(root / "a"), "b": str(root / "b"), "model": str(model), "root": str(root)}


def _cfg(corpus: dict[str, str], blend: list[str], cache: Path, **kw) -> DataConfig:
    return DataConfig(blend=blend, tokenizer_model=corpus["model"], cache_dir=str(cache), **kw)


def test_single_prefix_samples(corpus, tmp_path: Path) -> None:
    ds = build_gpt_datasets(
        _cfg(corpus, [corpus["a"]], tmp_path), sequence_length=SEQ, seed=3, train_samples=40
    )
    assert len(ds.train) >= 40 and ds.valid is not None and ds.test is None
    assert not ds.data.is_default_corpus
    for i in range(10):
        s = ds.train[i]
        assert s["tokens"].shape == s["labels"].shape == (SEQ,)
        torch.testing.assert_close(s["tokens"][1:], s["labels"][:-1])  # labels = tokens shifted
        torch.testing.assert_close(s["position_ids"], torch.arange(SEQ))
        assert bool((s["loss_mask"] == 1).all())
        assert int(s["tokens"].max()) < ds.tokenizer.vocab_size
    assert list((tmp_path / "megatron_index").glob("*GPTDataset-train-shuffle_index.npy"))


def test_samples_depend_only_on_the_seed(corpus, tmp_path: Path) -> None:
    cfg = _cfg(corpus, [corpus["a"]], tmp_path)

    def first(seed: int, cache: Path = tmp_path) -> list[list[int]]:
        cfg.cache_dir = str(cache)
        train = build_gpt_datasets(cfg, sequence_length=SEQ, seed=seed, train_samples=30).train
        return [train[i]["tokens"].tolist() for i in range(20)]

    base = first(5)
    assert first(5) == base  # index cache hit
    assert first(5, tmp_path / "other_cache") == base  # rebuilt from scratch
    assert first(6) != base


def test_iterator_over_real_dataset(corpus, tmp_path: Path) -> None:
    train = build_gpt_datasets(
        _cfg(corpus, [corpus["a"]], tmp_path), sequence_length=SEQ, seed=0, train_samples=32
    ).train
    whole = list(build_batch_iterator(train, 0, 4, 0, 1))
    resumed = list(build_batch_iterator(train, 8, 4, 0, 1))
    halves = [list(build_batch_iterator(train, 0, 2, r, 2)) for r in range(2)]
    assert len(resumed) == len(whole) - 2
    for a, b in zip(whole[2:], resumed, strict=True):
        torch.testing.assert_close(a, b)
    for batch, r0, r1 in zip(whole, *halves, strict=True):
        for key in batch:
            torch.testing.assert_close(torch.cat([r0[key], r1[key]]), batch[key])


def test_weighted_blend(corpus, tmp_path: Path) -> None:
    cfg = _cfg(corpus, ["0.3", corpus["a"], "0.7", corpus["b"]], tmp_path)
    ds = build_gpt_datasets(
        cfg, sequence_length=SEQ, seed=0, train_samples=100, valid_samples=10, test_samples=0
    )
    assert len(ds.train) == 100 and len(ds.valid) == 10
    counts = torch.bincount(torch.tensor([ds.train[i]["dataset_id"] for i in range(100)]))
    assert counts.tolist() == [30, 70]
    # Without a size a weighted split has no natural length: it is skipped.
    cfg.split = "90,5,5"
    ds = build_gpt_datasets(cfg, sequence_length=SEQ, seed=0, train_samples=100, valid_samples=8)
    assert len(ds.train) == 100 and len(ds.valid) >= 8 and ds.test is None


def test_unweighted_blend_and_eod_mask(corpus, tmp_path: Path) -> None:
    # Unweighted blends mix by token counts and, like single datasets, repeat over epochs.
    cfg = _cfg(corpus, [corpus["a"], corpus["b"]], tmp_path, eod_mask_loss=True, split="1")
    ds = build_gpt_datasets(cfg, sequence_length=SEQ, seed=0, train_samples=5000)
    assert ds.valid is None and len(ds.train) >= 5000
    eod = ds.tokenizer.eod_id
    seen_eod = False
    for i in range(50):
        s = ds.train[i]
        assert bool((s["loss_mask"][s["tokens"] == eod] == 0).all())
        assert bool((s["loss_mask"][s["tokens"] != eod] == 1).all())
        seen_eod |= bool((s["tokens"] == eod).any())
    assert seen_eod


def test_config_errors_surface(corpus, tmp_path: Path) -> None:
    cfg = DataConfig(blend=[corpus["a"]], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^data.tokenizer_model: required"):
        build_gpt_datasets(cfg, sequence_length=SEQ, seed=0, train_samples=1)


def test_default_corpus_when_no_blend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    small = functools.partial(ensure_default_corpus, max_files=30, num_workers=1)
    monkeypatch.setattr(dataset_module, "ensure_default_corpus", small)
    cfg = DataConfig(cache_dir=str(tmp_path), default_vocab_size=512)
    ds = build_gpt_datasets(cfg, sequence_length=SEQ, seed=0, train_samples=20, show_progress=False)
    assert ds.data.is_default_corpus and len(ds.train) >= 20
    assert ds.data.tokenizer_model.startswith(str(tmp_path / "default_corpus"))
    assert ds.tokenizer.decode(ds.train[0]["tokens"].tolist())


def _build_on_rank(rank: int, world_size: int, corpus: dict[str, str], cache: str) -> list:
    cfg = _cfg(corpus, ["1", corpus["a"], "2", corpus["b"]], Path(cache))
    train = build_gpt_datasets(
        cfg, sequence_length=SEQ, seed=7, train_samples=24, valid_samples=4, test_samples=0
    ).train
    batches = build_batch_iterator(train, 0, 4 // world_size, rank, world_size)
    return [b["tokens"].tolist() for b in batches]


def test_two_ranks_share_the_index_cache(corpus, tmp_path: Path) -> None:
    # Rank 0 builds the indices, rank 1 loads them; together they read the single-rank stream.
    per_rank = run_in_processes(_build_on_rank, 2, corpus, str(tmp_path / "cache"))
    single = _build_on_rank(0, 1, corpus, str(tmp_path / "cache"))
    assert [r0 + r1 for r0, r1 in zip(*per_rank, strict=True)] == single
