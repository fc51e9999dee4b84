"""Evaluation on a tiny megatron-core model: loading, KV-cached sampling, tensor-parallel sampling,
token statistics.

The model is built in this process (a gloo world of one, torn down after the module); the
tensor-parallel check runs in two spawned processes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from toy_model import TOY_MODEL

from divprec.config.compose import compose_config
from divprec.data.tokenizer import Tokenizer, train_tokenizer
from divprec.eval.sampling import sample
from divprec.eval.synthetic import ArithmeticTask, write_training_jsonl
from divprec.parallel.spawn import run_in_processes

VOCAB_ROWS = 512  # padded vocabulary that splits over tp = 1 and tp = 2 alike


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    jsonl = write_training_jsonl(root / "arith.jsonl", 400)
    return train_tokenizer([jsonl], root / "tok", 320)


@pytest.fixture(scope="module")
def em(tokenizer_path):
    from divprec.eval.model import build_eval_model
    from divprec.parallel.distributed import shutdown_distributed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds synchronisation
    model = build_eval_model(
        compose_config(TOY_MODEL), Tokenizer.from_file(tokenizer_path), vocab_size=VOCAB_ROWS
    )
    yield model
    shutdown_distributed()
    torch.set_num_threads(threads)


def _prompts(n: int = 3) -> list[str]:
    return [p.prompt for p in ArithmeticTask().generate(n, "eval")]


def test_logits_cover_the_tokenizer_vocabulary(em):
    tokens = torch.tensor(em.tokenizer.encode_batch(["Q: 1 + 2 = ?\nA:"]))
    s = tokens.shape[1]
    with torch.no_grad():
        raw = em.model(tokens, torch.arange(s)[None], None)  # [1, s, 512]
        logits = em.logits(tokens)
        last = em.logits(tokens, last_only=True)
    assert raw.shape == (1, s, VOCAB_ROWS)
    assert logits.shape == (1, s, em.vocab_size) and em.vocab_size < VOCAB_ROWS
    assert torch.equal(logits, raw[..., : em.vocab_size])
    assert torch.equal(last, logits[:, -1])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_matches_recomputation(em, temperature):
    kwargs = dict(temperature=temperature, max_new_tokens=24, seed=5, stop=None, batch_size=4)
    cached = sample(em, _prompts(), 3, return_details=True, **kwargs)
    plain = sample(em, _prompts(), 3, return_details=True, use_cache=False, **kwargs)
    for row_a, row_b in zip(cached, plain, strict=True):
        for a, b in zip(row_a, row_b, strict=True):
            assert a.token_ids == b.token_ids and a.text == b.text
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
            assert a.entropies == pytest.approx(b.entropies, abs=1e-4)


def test_sampling_is_deterministic_and_logprobs_are_the_models(em):
    prompts = _prompts(4)
    first = sample(em, prompts, 4, max_new_tokens=16, seed=1, return_details=True)
    again = sample(em, prompts, 4, max_new_tokens=16, seed=1, return_details=True, batch_size=5)
    assert [[s.token_ids for s in row] for row in first] == [
        [s.token_ids for s in row] for row in again
    ]
    other = sample(em, prompts, 4, max_new_tokens=16, seed=2)
    assert other != [[s.text for s in row] for row in first]
    # The recorded logprobs are those of a full forward over prompt + completion.
    for row in first:
        for s in row:
            seq = torch.tensor([s.prompt_ids + s.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(em.logits(seq[:, :-1]), dim=-1)[0]  # [s - 1, V]
            start = len(s.prompt_ids) - 1
            positions = torch.arange(start, start + len(s.token_ids))
            expected = logp[positions, torch.tensor(s.token_ids)]
            assert s.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
            assert all(t < em.vocab_size for t in s.token_ids)  # never a padding row


def test_token_statistics_match_a_direct_computation(em):
    from divprec.eval.perplexity import token_statistics

    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        tokens = torch.randint(0, em.vocab_size, (2, 17), generator=gen)
        mask = (torch.rand(2, 16, generator=gen) > 0.3).float()
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": mask,
                "position_ids": torch.arange(16).expand(2, 16),
            }
        )
    topk = 20
    stats = token_statistics(em, iter(batches), topk=topk)
    sums = dict.fromkeys(("nll", "ent", "head", "rank", "top1"), 0.0)
    count = 0.0
    with torch.no_grad():
        for b in batches:
            logits = em.model(b["tokens"], b["position_ids"], None).double()  # [2, 16, 512]
            logp = torch.log_softmax(logits, dim=-1)
            target = logits.gather(-1, b["labels"][..., None]).squeeze(-1)
            m = b["loss_mask"].double()
            above = (logits > target[..., None]).sum(-1).double()  # the target's rank
            per_token = {
                "nll": -logp.gather(-1, b["labels"][..., None]).squeeze(-1),
                "ent": -(logp.exp() * logp).sum(-1),
                "head": logp.exp().topk(topk, dim=-1).values.sum(-1),
                "rank": above,
                "top1": (above == 0).double(),
            }
            for key, value in per_token.items():
                sums[key] += float((value * m).sum())
            count += float(m.sum())
    mean = {key: value / count for key, value in sums.items()}
    assert stats["num_tokens"] == count
    assert stats["nll"] == pytest.approx(mean["nll"], rel=1e-5)
    assert stats["perplexity"] == pytest.approx(torch.tensor(mean["nll"]).exp().item(), rel=1e-5)
    assert stats["entropy"] == pytest.approx(mean["ent"], rel=1e-5)
    assert stats["topk_mass"] == pytest.approx(mean["head"], rel=1e-5)
    assert stats["tail_mass"] == pytest.approx(1 - mean["head"], rel=1e-4)
    assert stats["target_rank"] == pytest.approx(mean["rank"], rel=1e-6)
    assert stats["top1_accuracy"] == pytest.approx(mean["top1"], rel=1e-6)
    assert token_statistics(em, iter(batches), topk=topk, max_batches=1)["num_tokens"] == float(
        batches[0]["loss_mask"].sum()
    )


def _save_checkpoint(em, root: Path, step: int) -> None:
    """A checkpoint as the trainer lays it out (model tensors only: the loader reads no more)."""
    from megatron.core import dist_checkpointing

    from divprec.checkpoint.layout import commit, temp_dir

    tmp = temp_dir(root, step)
    tmp.mkdir(parents=True)
    dist_checkpointing.save({"model": em.model.sharded_state_dict(prefix="model.")}, str(tmp))
    (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(em.config)))
    (tmp / "tokenizer.model").write_bytes(Path(em.tokenizer.model_path).read_bytes())
    meta = {"step": step, "consumed_samples": 0, "layout": {"tensor": 1}, "world_size": 1}
    commit(root, step, {**meta, "files": ["config.yaml", "tokenizer.model"]})


def test_load_eval_model_restores_saved_weights(em, tmp_path):
    from divprec.eval.model import load_eval_model, resolve_checkpoint

    tokens = torch.tensor(em.tokenizer.encode_batch(["Q: 7 * 3 - 2 = ?\nA:"]))
    with torch.no_grad():
        initial = em.logits(tokens)
        saved = {n: p.detach().clone() for n, p in em.model.named_parameters()}
        gen = torch.Generator().manual_seed(1)
        for p in em.model.parameters():  # weights no fresh build could have
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        trained = em.logits(tokens)
    try:
        _save_checkpoint(em, tmp_path / "checkpoints", 7)
        step_dir = tmp_path / "checkpoints" / "step_0000007"
        for where in (tmp_path, tmp_path / "checkpoints", step_dir):
            assert resolve_checkpoint(where) == step_dir
            loaded = load_eval_model(where)
            assert loaded.step == 7 and loaded.vocab_size == em.vocab_size
            assert loaded.config.model.hidden_size == 64
            with torch.no_grad():
                logits = loaded.logits(tokens)
            assert torch.equal(logits, trained)
            assert not torch.allclose(logits, initial)
        with pytest.raises(FileNotFoundError):
            load_eval_model(tmp_path / "nothing")
        # A run whose config puts its checkpoints elsewhere (checkpoint.dir).
        run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
        _save_checkpoint(em, elsewhere, 9)
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(f"checkpoint:\n  dir: {elsewhere}\n")
        assert resolve_checkpoint(run_dir) == elsewhere / "step_0000009"
    finally:
        with torch.no_grad():
            for n, p in em.model.named_parameters():
                p.copy_(saved[n])


# --- tensor parallel ---------------------------------------------------------------------------


def _layout_samples(rank: int, world: int, tokenizer_path: str) -> dict:
    """Greedy and seeded samples and token statistics at tp = 1, then tp = 2 (same seed)."""
    from megatron.core import parallel_state

    from divprec.eval.model import build_eval_model
    from divprec.eval.perplexity import token_statistics
    from divprec.parallel.config import ParallelConfig
    from divprec.parallel.distributed import init_distributed

    prompts = _prompts(3)
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(2, 16),
        "position_ids": torch.arange(16).expand(2, 16),
    }
    out = {}
    for tp in (1, 2):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        init_distributed(ParallelConfig(tensor=tp), seed=0)
        em = build_eval_model(
            compose_config(TOY_MODEL), Tokenizer.from_file(tokenizer_path), vocab_size=VOCAB_ROWS
        )
        greedy = sample(em, prompts, 1, temperature=0.0, max_new_tokens=20, return_details=True)
        seeded = sample(em, prompts, 3, max_new_tokens=20, seed=4, top_p=0.9, return_details=True)
        out[tp] = {
            "greedy": [[s.token_ids for s in row] for row in greedy],
            "seeded": [[s.token_ids for s in row] for row in seeded],
            "logprobs": [s.logprobs for row in seeded for s in row],
            "stats": token_statistics(em, [batch], topk=10),
        }
    return out


def test_tensor_parallel_sampling_equals_single_rank(tokenizer_path):
    results = run_in_processes(_layout_samples, 2, str(tokenizer_path))
    for rank_result in results:
        single, split = rank_result[1], rank_result[2]
        assert split["greedy"] == single["greedy"]
        assert split["seeded"] == single["seeded"]
        for a, b in zip(split["logprobs"], single["logprobs"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
        for key, value in single["stats"].items():
            assert split["stats"][key] == pytest.approx(value, rel=1e-5), key
    assert results[0][2] == results[1][2]  # both tp ranks chose the same tokens
