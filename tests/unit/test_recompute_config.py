"""model.recompute settings: what megatron-core receives, and the combinations validation rejects."""

from __future__ import annotations

import re

import pytest
import torch

from divprec.config.compose import compose_config
from divprec.config.validate import ConfigError, validate
from divprec.model.builder import transformer_config


def _megatron_config(overrides: list[str], pipeline: int = 1):
    cfg = compose_config(overrides).model
    return transformer_config(
        cfg,
        tensor_parallel=1,
        pipeline_parallel=pipeline,
        sequence_parallel=False,
        params_dtype=torch.float32,
    )


def test_none_sets_no_recompute() -> None:
    assert _megatron_config([]).recompute_granularity is None


def test_selective_passes_the_modules() -> None:
    config = _megatron_config(
        ["model.recompute=selective", "model.recompute_modules=[core_attn,mlp]"]
    )
    assert config.recompute_granularity == "selective"
    assert config.recompute_modules == ["core_attn", "mlp"]
    assert config.recompute_num_layers is None  # megatron-core: must be None for selective


def test_full_passes_method_and_layers() -> None:
    config = _megatron_config(
        ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=3"]
    )
    assert (config.recompute_granularity, config.recompute_method) == ("full", "block")
    assert config.recompute_num_layers == 3


BAD = {
    "mode": (
        ["model.recompute=some"],
        1,
        r"^model\.recompute='some': use none, selective or full$",
    ),
    "method": (
        ["model.recompute=full", "model.recompute_method=every"],
        1,
        r"^model\.recompute_method='every': use uniform or block$",
    ),
    "layers_zero": (
        ["model.recompute=full", "model.recompute_num_layers=0"],
        1,
        r"^model\.recompute_num_layers=0 must be in \[1, 4\] \(layers per pipeline stage\)$",
    ),
    "layers_past_stage": (  # 4 layers over 2 stages: 2 per stage
        ["model.recompute=full", "model.recompute_num_layers=3", "parallel.pipeline=2"],
        2,
        r"^model\.recompute_num_layers=3 must be in \[1, 2\]",
    ),
    "uniform_not_dividing": (
        ["model.recompute=full", "model.recompute_num_layers=3"],
        1,
        r"^model\.recompute_num_layers=3 does not divide the 4 layers per pipeline stage: ",
    ),
    "unknown_module": (
        ["model.recompute=selective", "model.recompute_modules=[core_attn,layernorm]"],
        1,
        r"^model\.recompute_modules=\['core_attn', 'layernorm'\]: choose from ",
    ),
    "no_modules": (
        ["model.recompute=selective", "model.recompute_modules=[]"],
        1,
        r"^model\.recompute_modules=\[\]: choose from .*\(at least one\)$",
    ),
    "moe_on_dense": (
        ["model.recompute=selective", "model.recompute_modules=[moe]"],
        1,
        r"^model\.recompute_modules: moe needs a MoE model",
    ),
    "mlp_on_moe": (
        ["model=moe_tiny", "model.recompute=selective", "model.recompute_modules=[mlp]"],
        1,
        r"^model\.recompute_modules: mlp recomputes dense MLPs only; use moe",
    ),
}


@pytest.mark.parametrize(("overrides", "world_size", "match"), BAD.values(), ids=BAD.keys())
def test_validation_rejects(overrides: list[str], world_size: int, match: str) -> None:
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size)
    message = str(err.value)
    assert "\n" not in message
    assert re.search(match, message), message


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.recompute=selective"],
        ["model.recompute=full", "model.recompute_num_layers=2"],
        ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=4"],
        ["model=moe_tiny", "model.recompute=selective", "model.recompute_modules=[core_attn,moe]"],
        # Method and layer count only matter with full: left at any value otherwise.
        ["model.recompute=none", "model.recompute_num_layers=3"],
    ],
)
def test_validation_accepts(overrides: list[str]) -> None:
    validate(compose_config(overrides), 1)
