"""How expert parallelism is wired, without a process group: dispatcher choice and ZeRO groups."""

from __future__ import annotations

import pytest
import torch

from divprec.config.compose import compose_config
from divprec.model.builder import transformer_config
from divprec.parallel.deepspeed_engine import expert_group_name, parameter_groups


@pytest.mark.parametrize(
    ("on_gpu", "expert_parallel", "dispatcher"),
    [(True, 2, "alltoall"), (False, 2, "allgather"), (True, 1, "allgather")],
)
def test_token_dispatcher(monkeypatch, on_gpu, expert_parallel, dispatcher) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu)
    config = transformer_config(
        compose_config(["model=moe_tiny"]).model,
        tensor_parallel=1,
        pipeline_parallel=1,
        sequence_parallel=False,
        params_dtype=torch.float32,
        expert_parallel=expert_parallel,
    )
    assert config.moe_token_dispatcher_type == dispatcher
    assert config.expert_model_parallel_size == expert_parallel


def test_expert_parameters_get_their_own_zero_groups() -> None:
    model = torch.nn.Module()
    model.dense = torch.nn.Linear(4, 4)
    model.expert = torch.nn.Linear(4, 4)
    for param in model.expert.parameters():
        param.allreduce = False  # megatron-core's mark on an expert-parallel weight
    groups = parameter_groups(model, 0.1, expert_group_name(2))
    by_params = {tuple(id(p) for p in g["params"]): g for g in groups}
    dense_w = by_params[(id(model.dense.weight),)]
    dense_b = by_params[(id(model.dense.bias),)]
    expert_w = by_params[(id(model.expert.weight),)]
    expert_b = by_params[(id(model.expert.bias),)]
    assert "moe" not in dense_w and "moe" not in dense_b
    assert (dense_w["weight_decay"], dense_b["weight_decay"]) == (0.1, 0.0)
    for group, decay in ((expert_w, 0.1), (expert_b, 0.0)):
        assert group["moe"] is True and group["name"] == "ep_size_2"
        assert group["weight_decay"] == decay
    with pytest.raises(ValueError, match="expert group name"):
        parameter_groups(model, 0.1)
