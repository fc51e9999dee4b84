"""tools/convert.py against transformers itself: exported logits, generations, tokenizer ids,
round trips both ways, bf16, continued pre-training of an import, and lm-evaluation-harness.

One pair of checkpoints (tiny and moe_tiny, trained 1 step at tensor 2 x pipeline 2) serves every
test: the tiny one is the session's shared run (tests/shared_runs.py, also read by
test_checkpoint_tool.py). They train with a small learning rate, so that greedy generations are
not one repeated token, and moe_tiny with a fast expert-bias update, so that the bias changes the
routing; its vocabulary is padded (model.make_vocab_size_divisible_by) so that the export drops
rows.
Nothing here touches the network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from shared_runs import OFFLINE, STEP, TP2_PP2  # noqa: E402
from shared_runs import train as _train  # noqa: E402

from divprec.parallel.spawn import run_in_processes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONVERT = ROOT / "tools" / "convert.py"
LAYOUT = TP2_PP2
MODELS = {
    "tiny": ["model=tiny"],  # the session's shared run (tests/conftest.py's tiny_tp2_pp2_run)
    "moe_tiny": [
        "model=moe_tiny",
        "parallel.sequence_parallel=true",  # MoE under tensor parallel (megatron-core)
        "model.moe_router_bias_update_rate=0.05",
        "model.make_vocab_size_divisible_by=1000",  # 4096 pieces -> 6000 rows at tensor 2
    ],
}
SEQ = 64
BATCH = 4
NEW_TOKENS = 32


def _convert(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CONVERT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **OFFLINE},
    )


def _real_tokens(tokenizer_file: Path) -> torch.Tensor:
    """``[BATCH, SEQ]`` tokens of real text: a source file of the default corpus's kind."""
    import json as json_module

    from divprec.data.tokenizer import Tokenizer

    text = Path(json_module.__file__).with_name("decoder.py").read_text()
    ids = Tokenizer.from_file(tokenizer_file).encode(text)[: BATCH * SEQ]
    return torch.tensor(ids).reshape(BATCH, SEQ)


def _greedy_divprec(em, prompt: torch.Tensor) -> list[int]:
    tokens = prompt
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            next_id = em.logits(tokens, last_only=True).argmax(-1, keepdim=True)  # [1, 1]
        tokens = torch.cat([tokens, next_id], dim=1)
    return tokens[0, prompt.shape[1] :].tolist()


def _compare(rank: int, world: int, run_dir: str, exports: dict[str, str]) -> dict:
    """In a fresh process: divprec's evaluation model of the checkpoint against transformers'
    loading of each export (``exports``: dtype -> directory)."""
    from transformers import AutoModelForCausalLM

    from divprec.eval.model import load_eval_model

    em = load_eval_model(run_dir)
    tokens = _real_tokens(em.tokenizer.model_path)
    prompt = tokens[:1, :16]
    with torch.no_grad():
        reference = em.logits(tokens)  # [b, s, V]
        # divprec's own bf16 evaluation: the size of a bf16 model's error on these tokens.
        own_bf16 = load_eval_model(run_dir, dtype=torch.bfloat16).logits(tokens)
    out: dict = {
        "scale": reference.abs().max().item(),
        "divprec_bf16_max_diff": (own_bf16 - reference).abs().max().item(),
        "divprec_ids": _greedy_divprec(em, prompt),
    }
    for dtype, path in exports.items():
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
        out[f"{dtype}_class"] = type(hf).__name__
        with torch.no_grad():
            logits = hf(tokens).logits.float()
            out[f"{dtype}_max_diff"] = (logits - reference).abs().max().item()
            out[f"{dtype}_argmax_agree"] = (
                (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            )
            if dtype != "fp32":
                continue
            generated = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            out["hf_ids"] = generated[0, prompt.shape[1] :].tolist()
            biases = [m for n, m in hf.named_buffers() if n.endswith("e_score_correction_bias")]
            if biases:  # the same model routed without the expert bias
                out["bias_abs_max"] = max(b.abs().max().item() for b in biases)
                for b in biases:
                    b.zero_()
                out["unbiased_max_diff"] = (hf(tokens).logits - reference).abs().max().item()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tp2_pp2_run) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf_interop")
    tiny_tp2_pp2_run.start()  # the session's shared tiny run (tests/shared_runs.py), meanwhile:
    run_in_processes(_train, 4, [*LAYOUT, *MODELS["moe_tiny"]], str(base / "moe_tiny"))
    return {"base": base, "tiny": tiny_tp2_pp2_run.result(), "moe_tiny": base / "moe_tiny"}


def _export_and_compare(rank: int, world: int, runs: dict[str, str], exports: dict) -> dict:
    """In one fresh process: the exports the CLI did not write, then :func:`_compare` for each
    checkpoint (``exports``: model -> dtype -> directory)."""
    from divprec.interop.hf_export import export_hf

    for name, by_dtype in exports.items():
        for dtype, path in by_dtype.items():
            if not Path(path).exists():
                export_hf(Path(runs[name]), Path(path), dtype)
    return {name: _compare(rank, world, runs[name], exports[name]) for name in exports}


@pytest.fixture(scope="module")
def converted(runs) -> dict:
    """fp32 and bf16 exports of both checkpoints (the tiny fp32 one by the command line tool, in
    2 MB shards) and what :func:`_compare` measured on them."""
    paths = {n: {d: runs["base"] / f"hf_{n}_{d}" for d in ("fp32", "bf16")} for n in MODELS}
    done = _convert("to-hf", runs["tiny"], paths["tiny"]["fp32"], "--max-shard-gb", 2 / 1024)
    assert done.returncode == 0, done.stderr
    assert "as Qwen3ForCausalLM" in done.stdout
    as_str = {n: {d: str(p) for d, p in by.items()} for n, by in paths.items()}
    (results,) = run_in_processes(_export_and_compare, 1, {n: str(runs[n]) for n in MODELS}, as_str)
    for name, result in results.items():  # shown with pytest -s
        print(name, {k: v for k, v in result.items() if not k.endswith("_ids")})
    return {"paths": paths, "results": results}


@pytest.fixture(scope="module")
def exports(converted) -> dict[str, dict[str, Path]]:
    return converted["paths"]


@pytest.fixture(scope="module")
def compared(converted) -> dict[str, dict]:
    return converted["results"]


def test_export_is_a_stock_transformers_directory(exports, compared):
    dense, moe = exports["tiny"]["fp32"], exports["moe_tiny"]["fp32"]
    for path in (dense, moe):
        for name in ("config.json", "generation_config.json", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):  # fmt: skip
            assert (path / name).is_file(), name
        assert "auto_map" not in json.loads((path / "config.json").read_text())  # no custom code
        assert not list(path.glob("*.py"))
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((dense / s).is_file() for s in shards)
    assert compared["tiny"]["fp32_class"] == "Qwen3ForCausalLM"
    assert compared["moe_tiny"]["fp32_class"] == "Dots1ForCausalLM"
    moe_config = json.loads((moe / "config.json").read_text())
    assert moe_config["vocab_size"] == 4096  # the 6000 - 4096 padding rows are dropped
    assert (moe_config["n_routed_experts"], moe_config["num_experts_per_tok"]) == (8, 2)


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_logits_equal_divprec_eval_model(compared, name):
    result = compared[name]
    assert result["scale"] > 0.1
    assert result["fp32_max_diff"] <= 1e-4 * result["scale"], result
    assert result["fp32_argmax_agree"] == 1.0


def test_moe_export_routes_with_the_expert_bias(compared):
    result = compared["moe_tiny"]
    assert result["bias_abs_max"] >= 0.04  # trained with a fast bias update
    # Without the bias the same weights give other logits: the export's equality needs it.
    assert result["unbiased_max_diff"] > 100 * max(result["fp32_max_diff"], 1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_gives_the_same_ids(compared, name):
    result = compared[name]
    assert len(set(result["divprec_ids"])) > 3, result["divprec_ids"]  # not one repeated token
    assert result["hf_ids"] == result["divprec_ids"]


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_export_loads_and_agrees_to_bf16_precision(exports, compared, name):
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict:
        out: dict = {}
        for shard in path.glob("*.safetensors"):
            out.update(load_file(str(shard)))
        return out

    fp32, bf16 = tensors(exports[name]["fp32"]), tensors(exports[name]["bf16"])
    assert sorted(fp32) == sorted(bf16)
    for key, value in fp32.items():
        if key.endswith("e_score_correction_bias"):  # routing bias stays fp32, as in training
            assert torch.equal(bf16[key], value), key
        else:
            assert bf16[key].dtype == torch.bfloat16 and torch.equal(bf16[key], value.bfloat16())
    # As close to the fp32 logits as divprec's own bf16 model is (the bf16 rounding of the
    # weights and activations; MoE routing near a tie may flip in either).
    result = compared[name]
    assert result["bf16_max_diff"] <= 2 * result["divprec_bf16_max_diff"], result
    assert result["bf16_max_diff"] <= 0.1 * result["scale"], result
    assert result["bf16_argmax_agree"] >= 0.95, result


def test_tokenizer_ids_equal_divprec_tokenizer(runs, exports):
    from transformers import AutoTokenizer

    from divprec.data.default_corpus import stdlib_source_files
    from divprec.data.tokenizer import Tokenizer

    path = exports["tiny"]["fp32"]
    ours = Tokenizer.from_file(runs["tiny"] / "checkpoints" / STEP / "tokenizer.model")
    hf = AutoTokenizer.from_pretrained(path)
    texts = [f.read_text(errors="replace") for f in stdlib_source_files()[::40]]
    texts += [
        "héllo wörld ☃ 日本語 한국어 🙂 \u00a0\u2003 \U0001f9ea",  # unicode, byte fallback
        "0123456789 3.14159 -1e-10 100000 ٣٤٥",  # digits, split one by one
        "a  b   c\t\td\n\n\n    e    \r\n  ",  # whitespace runs
        " leading space",
        "",
        "text with </s> and <s> and <pad> written in it",  # text, not special tokens
    ]
    assert sum(len(t) for t in texts) > 500_000
    assert hf(texts, add_special_tokens=True)["input_ids"] == ours.encode_batch(texts)
    for text in texts[-6:]:
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    # The data pipeline: documents without bos, each followed by the end-of-document token.
    assert hf.eos_token_id == ours.eod_id and hf.pad_token_id == ours.pad_id
    assert hf.decode(ours.encode("x = 1") + [ours.eod_id], skip_special_tokens=True) == "x = 1"
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eod_id


def _local_qwen3(path: Path, tie: bool) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(7)
    config = Qwen3Config(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=SEQ,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    )
    Qwen3ForCausalLM(config).save_pretrained(path)


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _round_trips(rank: int, world: int, base: str, tokenizer: str) -> dict:
    """In a fresh process: locally made Qwen3 models (untied, tied) -> divprec -> HF."""
    from divprec.interop.hf_export import export_hf
    from divprec.interop.hf_import import import_hf

    out = {}
    for tie in (False, True):
        root = Path(base) / f"tie_{tie}"
        _local_qwen3(root / "qwen3", tie)
        summary = import_hf(root / "qwen3", root / "ckpt", Path(tokenizer))
        export_hf(root / "ckpt", root / "back")
        out[tie] = {"root": str(root), "overrides": summary["overrides"]}
    return out


def test_hf_to_divprec_to_hf_is_bit_identical(runs, tmp_path):
    tokenizer = runs["tiny"] / "checkpoints" / STEP / "tokenizer.model"
    (trips,) = run_in_processes(_round_trips, 1, str(tmp_path), str(tokenizer))
    for tie, trip in trips.items():
        root = Path(trip["root"])
        assert trip["overrides"][0] == f"checkpoint.load={root / 'ckpt'}"
        assert f"model.tie_embeddings={str(tie).lower()}" in trip["overrides"]
        meta = json.loads((root / "ckpt" / "divprec.json").read_text())
        assert (meta["step"], meta["consumed_samples"]) == (0, 0)
        assert meta["imported_from"] == str(root / "qwen3")
        original, back = _safetensors(root / "qwen3"), _safetensors(root / "back")
        assert sorted(back) == sorted(original)
        assert ("lm_head.weight" in original) == (not tie)
        for key, tensor in original.items():
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
        config = json.loads((root / "qwen3" / "config.json").read_text())
        config_back = json.loads((root / "back" / "config.json").read_text())
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                    "rms_norm_eps"):  # fmt: skip
            assert config_back[key] == config[key], key
        assert config_back["rope_parameters"]["rope_theta"] == 50000.0


def _first_step(rank: int, world: int, overrides: list[str], run_dir: str) -> list[dict]:
    return _train(rank, world, ["train.steps=1", *overrides], run_dir)


@pytest.mark.slow
def test_divprec_to_hf_to_divprec_keeps_the_first_step_loss(runs, exports, tmp_path):
    """The tiny checkpoint, exported and imported again, trains (at another layout, from step 0)
    with the same first-step lm_loss as the original weights."""
    done = _convert("from-hf", exports["tiny"]["fp32"], tmp_path / "imported")
    assert done.returncode == 0, done.stderr
    assert "step 0, fresh optimizer state" in done.stdout
    overrides = done.stdout.split("divprec-pretrain ", 1)[1].split()
    # The original checkpoint, rewound to step 0 so that both runs see the same first batch.
    rewound = tmp_path / "rewound"
    shutil.copytree(runs["tiny"] / "checkpoints" / STEP, rewound)
    meta = json.loads((rewound / "divprec.json").read_text())
    (rewound / "divprec.json").write_text(json.dumps({**meta, "step": 0, "consumed_samples": 0}))
    with ThreadPoolExecutor(2) as pool:
        imported = pool.submit(run_in_processes, _first_step, 2, ["parallel.tensor=2", *overrides], str(tmp_path / "run_imported"))  # fmt: skip
        original = pool.submit(run_in_processes, _first_step, 2, ["parallel.tensor=2", "model=tiny", f"checkpoint.load={rewound}"], str(tmp_path / "run_original"))  # fmt: skip
        imported, original = imported.result()[0], original.result()[0]
    assert len(imported) == len(original) == 1  # one step each, both from step 0
    assert imported[0]["lm_loss"] == original[0]["lm_loss"], (imported, original)


@pytest.mark.slow
def test_lm_evaluation_harness_runs_the_export_offline(exports, tmp_path):
    pytest.importorskip("lm_eval")
    from divprec.data.tokenizer import Tokenizer

    tasks = tmp_path / "tasks"
    task = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "lm_eval_task.py"), tasks, "--n", "3",
         "--max-gen-toks", str(NEW_TOKENS)],  # fmt: skip
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert task.returncode == 0, task.stderr
    model = exports["tiny"]["fp32"]
    done = subprocess.run(
        ["lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
         "--tasks", "divprec_arithmetic", "--include_path", tasks, "--device", "cpu",
         "--batch_size", "1", "--output_path", tmp_path / "results", "--log_samples"],  # fmt: skip
        capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "results").rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"]["divprec_arithmetic"]
    assert "exact_match,answer" in metrics
    (samples,) = (tmp_path / "results").rglob("samples_divprec_arithmetic_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 3
    # What lm-eval generated is the greedy continuation of the prompt's divprec tokens.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ours = Tokenizer.from_file(model / "tokenizer.model")
    for row in rows:
        prompt = torch.tensor([ours.encode(row["doc"]["prompt"])])
        with torch.no_grad():
            ids = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[
                0, prompt.shape[1] :
            ]
        text = ours.decode(ids.tolist())
        for stop in ("\nQ:", "\n\n"):
            text = text.split(stop)[0]
        assert row["resps"][0][0] == text


@pytest.mark.slow
def test_bad_input_fails_with_one_line(runs, exports, tmp_path):
    cases = [
        (["to-hf", tmp_path / "nowhere", tmp_path / "o1"], "does not exist"),
        (["to-hf", runs["tiny"], exports["tiny"]["fp32"]], "is not an empty directory"),
        (["from-hf", tmp_path, tmp_path / "o2"], "config.json is missing"),
        (["from-hf", exports["moe_tiny"]["fp32"], tmp_path / "o3"], "only Qwen3ForCausalLM"),
    ]
    incomplete = tmp_path / "incomplete"
    shutil.copytree(runs["tiny"] / "checkpoints" / STEP, incomplete, ignore=shutil.ignore_patterns("*.distcp"))  # fmt: skip
    (incomplete / "divprec.json").unlink()
    cases.append((["to-hf", incomplete, tmp_path / "o4"], "divprec.json is missing"))
    # An architecture the target class cannot express: the field is named.
    no_qk_norm = tmp_path / "no_qk_norm"
    shutil.copytree(runs["tiny"] / "checkpoints" / STEP, no_qk_norm)
    config = no_qk_norm / "config.yaml"
    config.write_text(config.read_text().replace("qk_layernorm: true", "qk_layernorm: false"))
    cases.append((["to-hf", no_qk_norm, tmp_path / "o5"], "model.qk_layernorm=false"))
    for args, message in cases:
        done = _convert(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert message in done.stderr, done.stderr
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
