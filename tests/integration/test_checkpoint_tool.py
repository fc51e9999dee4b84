"""tools/checkpoint.py: inspect, and a layout-independent safetensors export of the full model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shared_runs import STEP, train

from divprec.parallel.spawn import run_in_processes

pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parents[2] / "tools" / "checkpoint.py"
# Checkpoint keys stack the layers on dim 0 and name the norms as Transformer Engine fuses them.
CHECKPOINT_TO_MODEL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _tool(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _check_exports(rank: int, world: int, single: str, tp2: str, out: str) -> dict:
    """In a fresh process: export the tp2 x pp2 checkpoint (fp32) and the single one (bf16), then
    compare logits of the single checkpoint loaded directly with those of its export."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from divprec.checkpoint.locate import load_run_config
    from divprec.interop.full_model import build_full_model
    from divprec.interop.safetensors_export import export_model
    from divprec.parallel.distributed import single_process_world

    out_dir = Path(out)
    summaries = {
        "tp2": export_model(Path(tp2), out_dir / "tp2.safetensors"),
        "bf16": export_model(Path(single), out_dir / "single_bf16.safetensors", dtype="bf16"),
    }
    step_dir = Path(single) / "checkpoints" / STEP
    cfg = load_run_config(step_dir)
    exported = load_file(str(out_dir / "single.safetensors"))
    vocab = exported["embedding.word_embeddings.weight"].shape[0]
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, -1)
    with single_process_world(cfg.train.seed):
        direct = build_full_model(cfg, vocab, torch.float32).eval()
        sharded = direct.sharded_state_dict(prefix="model.")
        loaded = dist_checkpointing.load({"model": sharded}, str(step_dir))["model"]
        direct.load_state_dict({k.removeprefix("model."): v for k, v in loaded.items()}, False)
        fresh = build_full_model(cfg, vocab, torch.float32).eval()
        extra = {k: v for k, v in fresh.state_dict().items() if k.endswith("_extra_state")}
        fresh.load_state_dict({**exported, **extra}, strict=True)
        with torch.no_grad():
            logits_direct = direct(tokens, positions, attention_mask=None)
            logits_export = fresh(tokens, positions, attention_mask=None)
    return {
        "summaries": summaries,
        "max_logit_diff": (logits_direct - logits_export).abs().max().item(),
        "logit_scale": logits_direct.abs().max().item(),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tp2_pp2_run) -> dict[str, Path]:
    """The single-process run and the session's shared tensor 2 x pipeline 2 run of the same
    config (tests/shared_runs.py), trained at once: their start-up is mostly one core's work each."""
    base = tmp_path_factory.mktemp("checkpoint_tool")
    tiny_tp2_pp2_run.start()
    run_in_processes(train, 1, [], str(base / "single"))
    return {"single": base / "single", "tp2": tiny_tp2_pp2_run.result(), "out": base / "exports"}


@pytest.fixture(scope="module")
def exports(runs) -> dict:
    done = _tool("export", runs["single"], runs["out"] / "single.safetensors")
    assert done.returncode == 0, done.stderr
    checked = run_in_processes(
        _check_exports, 1, str(runs["single"]), str(runs["tp2"]), str(runs["out"])
    )[0]
    return {"cli_stdout": done.stdout, **checked}


def test_inspect_reports_step_layout_and_shapes(runs):
    done = _tool("inspect", runs["single"], "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["path"].endswith(f"checkpoints/{STEP}") and info["complete"]
    assert (info["step"], info["consumed_samples"]) == (1, 8)
    assert info["layout"]["tensor"] == 1 and info["world_size"] == 1
    assert info["config"]["model"]["name"] == "tiny" and info["config"]["loss"]["beta"] == 0.0
    model = info["tensors"]["model"]
    assert model["decoder.layers.mlp.linear_fc1.weight"] == {
        "shape": [4, 2 * 384, 128],  # 4 layers x [gate; up] x hidden
        "dtype": "float32",
    }
    assert model["decoder.layers.self_attention.linear_qkv.weight"]["shape"] == [4, 256, 128]
    assert model["embedding.word_embeddings.weight"]["shape"][1] == 128
    optimizer = info["tensors"]["optimizer"]
    for state in ("fp32_param", "exp_avg", "exp_avg_sq"):
        for key, value in model.items():
            assert optimizer[f"{state}.model.{key}"]["shape"] == value["shape"]
    expected = sum(torch.Size(t["shape"]).numel() for t in model.values())
    assert info["parameters"] == expected

    text = _tool("inspect", runs["tp2"] / "checkpoints")  # a checkpoint root: resolves latest
    assert text.returncode == 0, text.stderr
    assert f"checkpoint {runs['tp2'] / 'checkpoints' / STEP}" in text.stdout
    assert "step 1, consumed samples 8" in text.stdout
    assert "tensor 2, pipeline 2" in text.stdout
    assert f"parameters: {expected:,}" in text.stdout  # the global shapes, not a shard's
    assert "[4, 768, 128]" in text.stdout


def _raw_model_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors read with plain torch.distributed.checkpoint, unstacked."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(step_dir))
    meta = reader.read_metadata().state_dict_metadata
    raw = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in meta.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    dcp.load(raw, storage_reader=reader, no_dist=True)
    out = {}
    for key, value in raw.items():
        name = key.removeprefix("model.")
        if name.startswith("decoder.layers."):
            sub = name.removeprefix("decoder.layers.")
            for layer, tensor in enumerate(value):
                out[f"decoder.layers.{layer}.{CHECKPOINT_TO_MODEL.get(sub, sub)}"] = tensor
        else:
            out[name] = value
    return out


def test_export_is_self_contained(runs, exports):
    from safetensors import safe_open

    out = runs["out"]
    assert "exported step 1" in exports["cli_stdout"]
    with safe_open(str(out / "single.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "1" and meta["consumed_samples"] == "8"
    assert json.loads(meta["config"])["model"]["name"] == "tiny"
    assert json.loads(meta["saved_layout"])["tensor"] == 1
    ckpt = runs["single"] / "checkpoints" / STEP
    assert (out / "single.tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()
    assert (out / "single.config.yaml").read_text() == (ckpt / "config.yaml").read_text()


def test_export_equals_the_saved_tensors_in_every_layout(runs, exports):
    from safetensors.torch import load_file

    for run, name in (("single", "single"), ("tp2", "tp2")):
        exported = load_file(str(runs["out"] / f"{name}.safetensors"))
        raw = _raw_model_tensors(runs[run] / "checkpoints" / STEP)
        assert sorted(exported) == sorted(raw), run
        for key, tensor in raw.items():
            assert torch.equal(exported[key], tensor), (run, key)  # resharded bit-exactly


def test_tensor_parallel_export_matches_single_process_export(runs, exports):
    from safetensors.torch import load_file

    single = load_file(str(runs["out"] / "single.safetensors"))
    tp2 = load_file(str(runs["out"] / "tp2.safetensors"))
    assert exports["summaries"]["tp2"]["saved_layout"]["tensor"] == 2
    assert exports["summaries"]["tp2"]["saved_layout"]["pipeline"] == 2
    assert sorted(single) == sorted(tp2)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in single  # [gate; up], as at tp=1
    for key in single:
        assert single[key].shape == tp2[key].shape, key
        assert single[key].dtype == tp2[key].dtype == torch.float32, key
        torch.testing.assert_close(tp2[key], single[key], rtol=1e-5, atol=1e-5, msg=key)


def test_export_loads_strictly_and_gives_the_checkpoints_logits(exports):
    assert exports["logit_scale"] > 0.1
    assert exports["max_logit_diff"] == 0.0


def test_bf16_export_casts_the_parameters(runs, exports):
    from safetensors.torch import load_file

    single = load_file(str(runs["out"] / "single.safetensors"))
    bf16 = load_file(str(runs["out"] / "single_bf16.safetensors"))
    assert exports["summaries"]["bf16"]["dtype"] == "bfloat16"
    for key, tensor in single.items():
        assert torch.equal(bf16[key], tensor.to(torch.bfloat16)), key


def test_missing_or_incomplete_checkpoint_fails_with_one_line(runs, tmp_path):
    missing = tmp_path / "nowhere"
    for command in (["inspect", missing], ["export", missing, tmp_path / "m.safetensors"]):
        done = _tool(*command)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert f"{missing} does not exist" in done.stderr

    copy = tmp_path / "checkpoints"
    # Without the tensor data: resolving and describing read only the metadata files.
    shutil.copytree(runs["single"] / "checkpoints", copy, ignore=shutil.ignore_patterns("*.distcp"))
    (copy / STEP / "divprec.json").unlink()
    for path in (copy / STEP, copy):  # the step named directly, or through the root's latest
        done = _tool("export", path, tmp_path / "m.safetensors")
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "divprec.json is missing (an interrupted save)" in done.stderr
        assert str(copy) in done.stderr
    assert not (tmp_path / "m.safetensors").exists()

    done = _tool("inspect", copy / STEP)  # still described, but reported unusable
    assert done.returncode == 2
    assert "complete: no, divprec.json is missing" in done.stdout
    assert "is incomplete" in done.stderr
