"""train.loss_averaging: the gradients of one step, through the training path (schedule, loss_func,
DeepSpeed's data-parallel reduction), against one process's direct autograd of the averaged loss.

The global batch's four microbatches hold very different numbers of unmasked tokens, and so do the
two data-parallel ranks' halves of it. ``token`` must give the gradient of the mean over all of
its tokens; ``microbatch`` that of the mean of the microbatches' token means (the behaviour before
``token`` existed). One process, DP2 and PP2.
"""

from __future__ import annotations

import pytest
import torch
from toy_model import TOY_MODEL, tiny_run

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

MICRO, SEQ = 2, 64
# Unmasked fraction of each microbatch of the global batch (4 microbatches of 2 x 64 tokens):
# DP rank 0 takes microbatches 0, 1 (~135 tokens), rank 1 takes 2, 3 (~90 tokens).
KEEP = (1.0, 0.05, 0.55, 0.15)
BASE = tiny_run(*TOY_MODEL, "train.steps=1", f"train.micro_batch_size={MICRO}")
MODES = ("token", "microbatch")


def _global_batch(vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    batches = []
    for keep in KEEP:
        tokens = torch.randint(0, vocab, (MICRO, SEQ + 1), generator=gen)
        mask = (torch.rand(MICRO, SEQ, generator=gen) < keep).float()
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": mask,
                "position_ids": torch.arange(SEQ).expand(MICRO, SEQ),
            }
        )
    return batches


def _global_names(model: torch.nn.Module) -> dict[str, str]:
    """Stage-local parameter name -> its name in the one-stage model."""
    names = {}
    for index, layer in enumerate(model.decoder.layers):
        for n, _ in layer.named_parameters():
            names[f"decoder.layers.{index}.{n}"] = f"decoder.layers.{layer.layer_number - 1}.{n}"
    return {n: names.get(n, n) for n, _ in model.named_parameters()}


def _reference(model: torch.nn.Module, batches: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Autograd of each mode's averaged loss over the whole global batch, in this one process
    (no schedule, no loss_func, no DeepSpeed); the averaging in float64."""
    params = dict(model.named_parameters())
    grads = {}
    for mode in MODES:  # a forward each: the shaped loss's backward reuses its buffers
        sums, counts = [], []
        for b in batches:
            out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [b, s, 6]
            mask = b["loss_mask"].double()  # [b, s]
            sums.append((out[..., 0].double() * mask).sum())
            counts.append(mask.sum())
        if mode == "token":
            loss = torch.stack(sums).sum() / torch.stack(counts).sum()
        else:
            loss = torch.stack([s / c for s, c in zip(sums, counts, strict=True)]).mean()
        values = torch.autograd.grad(loss, list(params.values()))
        grads[mode] = {n: g.float() for n, g in zip(params, values, strict=True)}
    return grads


def _step_gradients(rank: int, world: int, layout: list[str], run_dir: str) -> dict:
    """Each mode's reduced gradients after one step's schedule, by one-stage parameter name."""
    from deepspeed.utils import safe_get_full_grad

    from divprec.parallel.deepspeed_engine import discard_gradients
    from divprec.train.build import build_run
    from divprec.train.step import accumulate_gradients

    cfg = compose_config([*BASE, *layout, f"run.dir={run_dir}"])
    validate(cfg, world)
    run = build_run(cfg)
    batches = _global_batch(run.datasets.tokenizer.vocab_size)
    per_rank = len(batches) // run.ctx.data_size
    mine = batches[run.ctx.data_rank * per_rank : (run.ctx.data_rank + 1) * per_rank]
    names = _global_names(run.model)
    out = {"reference": _reference(run.model, batches) if world == 1 else None}
    for mode in MODES:
        run.cfg.train.loss_averaging = mode
        accumulate_gradients(run, iter(mine))
        out[mode] = {
            names[n]: safe_get_full_grad(p).detach().clone()
            for n, p in run.model.named_parameters()
        }
        discard_gradients(run.engine)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run_in_processes(_step_gradients, 1, [], str(tmp_path_factory.mktemp("one")))[0]


def _merged(results: list[dict], mode: str) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        for name, grad in result[mode].items():
            if name in merged:  # a replica (DP): every rank holds the reduced gradient
                torch.testing.assert_close(grad, merged[name], rtol=0, atol=0)
            merged[name] = grad
    return merged


def _assert_grads_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=1e-6, msg=name)


def test_the_batch_tells_the_modes_apart(single):
    # The masks are unequal enough that the two averages' gradients differ by far more than the
    # tolerance, so each equality below can fail.
    token, microbatch = single["reference"]["token"], single["reference"]["microbatch"]
    differences = [(token[n] - microbatch[n]).abs().max().item() for n in token]
    assert max(differences) > 1e-3, differences


@pytest.mark.parametrize("mode", MODES)
def test_one_process_equals_the_direct_gradient(single, mode):
    _assert_grads_equal(single[mode], single["reference"][mode])


@pytest.mark.parametrize("layout", ["data", "pipeline"])
def test_two_processes_equal_one(single, tmp_path, layout):
    # DP2: each rank holds half the global batch, with different token counts; PP2: the scale
    # is applied on the last stage and the first stage's gradients flow back from it.
    overrides = ["parallel.pipeline=2"] if layout == "pipeline" else []
    results = run_in_processes(_step_gradients, 2, overrides, str(tmp_path))
    for mode in MODES:
        _assert_grads_equal(_merged(results, mode), single["reference"][mode])
