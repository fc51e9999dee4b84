"""DataConfig validation: every error is one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from divprec.data.config import (
    DataConfig,
    parse_blend,
    resolve_cache_dir,
    split_shares,
    validate_data_config,
)


@pytest.fixture
def dataset_prefix(tmp_path: Path) -> str:
    prefix = tmp_path / "corpus"
    Path(f"{prefix}.bin").write_bytes(b"")
    Path(f"{prefix}.idx").write_bytes(b"")
    return str(prefix)


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> str:
    path = tmp_path / "tok.model"
    path.write_bytes(b"not checked here")
    return str(path)


def _error(cfg: DataConfig) -> str:
    with pytest.raises(ValueError) as info:
        validate_data_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_valid() -> None:
    validate_data_config(DataConfig())


def test_valid_blends(dataset_prefix: str, tokenizer_file: str) -> None:
    validate_data_config(DataConfig(blend=[dataset_prefix], tokenizer_model=tokenizer_file))
    validate_data_config(
        DataConfig(
            blend=["0.3", dataset_prefix, "7", dataset_prefix], tokenizer_model=tokenizer_file
        )
    )


def test_blend_without_tokenizer(dataset_prefix: str) -> None:
    msg = _error(DataConfig(blend=[dataset_prefix]))
    assert msg.startswith("data.tokenizer_model: required when data.blend is set")


def test_missing_tokenizer_file(dataset_prefix: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    msg = _error(DataConfig(blend=[dataset_prefix], tokenizer_model=str(missing)))
    assert msg.startswith("data.tokenizer_model: file not found:") and str(missing) in msg


def test_tokenizer_without_blend(tokenizer_file: str) -> None:
    msg = _error(DataConfig(tokenizer_model=tokenizer_file))
    assert msg.startswith("data.tokenizer_model: set without data.blend")


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_missing_dataset_file(dataset_prefix: str, tokenizer_file: str, suffix: str) -> None:
    Path(dataset_prefix + suffix).unlink()
    cfg = DataConfig(blend=["1", dataset_prefix], tokenizer_model=tokenizer_file)
    msg = _error(cfg)
    assert msg.startswith("data.blend[1]: missing ") and f"{dataset_prefix}{suffix}" in msg
    assert "tools/preprocess_data.py" in msg


def test_missing_dataset_of_unweighted_blend(dataset_prefix: str, tokenizer_file: str) -> None:
    cfg = DataConfig(blend=[dataset_prefix, dataset_prefix + "x"], tokenizer_model=tokenizer_file)
    assert _error(cfg).startswith(f"data.blend[1]: missing {dataset_prefix}x.bin")


def test_odd_weighted_blend(dataset_prefix: str, tokenizer_file: str) -> None:
    cfg = DataConfig(blend=["1", dataset_prefix, "2"], tokenizer_model=tokenizer_file)
    assert _error(cfg).startswith("data.blend: 3 entries, but a weighted blend alternates")


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", "heavy"])
def test_bad_weight(dataset_prefix: str, tokenizer_file: str, weight: str) -> None:
    cfg = DataConfig(
        blend=["1", dataset_prefix, weight, dataset_prefix], tokenizer_model=tokenizer_file
    )
    msg = _error(cfg)
    assert msg.startswith("data.blend[2]: weight must be a positive number") and repr(weight) in msg


def test_number_where_prefix_expected(tokenizer_file: str) -> None:
    cfg = DataConfig(blend=["1", "2"], tokenizer_model=tokenizer_file)
    assert _error(cfg).startswith("data.blend[1]: expected a path prefix")


def test_empty_blend(tokenizer_file: str) -> None:
    assert _error(DataConfig(blend=[], tokenizer_model=tokenizer_file)).startswith(
        "data.blend: empty"
    )


@pytest.mark.parametrize("split", ["", "a,b", "1,2,3,4", "0,0,0", "-1,2"])
def test_bad_split(split: str) -> None:
    assert _error(DataConfig(split=split)).startswith("data.split:")


def test_small_vocab() -> None:
    assert _error(DataConfig(default_vocab_size=100)).startswith("data.default_vocab_size:")


def test_parse_blend_and_split() -> None:
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["30", "a", " 70 ", "b"]) == (["a", "b"], [30.0, 70.0])
    assert split_shares("98,2,0") == pytest.approx((0.98, 0.02, 0.0))
    assert split_shares("1") == (1.0, 0.0, 0.0)


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIVPREC_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DIVPREC_CACHE")
    assert resolve_cache_dir(None) == Path("~/.cache/divprec").expanduser()


def test_works_as_structured_hydra_config(dataset_prefix: str, tokenizer_file: str) -> None:
    cfg = OmegaConf.structured(DataConfig)
    cfg = OmegaConf.merge(
        cfg,
        OmegaConf.from_dotlist(
            [f"blend=[2,{dataset_prefix}]", f"tokenizer_model={tokenizer_file}"]
        ),
    )
    validate_data_config(cfg)
    assert parse_blend(cfg.blend) == ([dataset_prefix], [2.0])
    cfg.tokenizer_model = None
    with pytest.raises(ValueError, match=r"^data.tokenizer_model: required"):
        validate_data_config(cfg)
