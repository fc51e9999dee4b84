"""In-loop validation: the same batches every time, the same metrics at every layout, logged at
validation steps only, and a preemption signal honoured between validation batches."""

from __future__ import annotations

import json
import math
import signal
import threading
from pathlib import Path

import pytest
from toy_model import tiny_run

from divprec.config.compose import compose_config
from divprec.config.validate import validate
from divprec.parallel.spawn import run_in_processes

VAL_KEYS = ("val_lm_loss", "val_ppl", "val_entropy", "val_topk_mass", "val_target_rank")

# Validation after steps 2 and 4, logging after 3 and 4: the metrics lines are steps 2, 3, 4.
BASE = tiny_run(
    "loss=tail_penalty",
    "loss.beta=-0.25",
    "train.steps=4",
    "eval.interval=2",
    "eval.iters=2",
    "logging.interval=3",
)


def _train(rank: int, world: int, overrides: list[str], run_dir: str, signal_in_eval: bool):
    from divprec.train import validation
    from divprec.train.preemption import Preempted
    from divprec.train.trainer import pretrain

    if signal_in_eval:  # SIGUSR1 as the first validation starts, as SLURM would send it
        real = validation.build_batch_iterator

        def signalling(*args, **kwargs):
            if rank == 0:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            return real(*args, **kwargs)

        validation.build_batch_iterator = signalling
    cfg = compose_config([*BASE, *overrides, f"run.dir={run_dir}"])
    validate(cfg, world)
    try:
        return {"history": pretrain(cfg).history, "exit": 0}
    except Preempted as stop:
        return {"history": [], "exit": stop.code}


def _run(world: int, overrides: list[str], run_dir: Path, signal_in_eval: bool = False) -> dict:
    return run_in_processes(_train, world, overrides, str(run_dir), signal_in_eval)[0]


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[list[dict], Path]:
    run_dir = tmp_path_factory.mktemp("single")
    return _run(1, [], run_dir)["history"], run_dir


def test_val_metrics_are_logged_at_validation_steps_only(single):
    history, run_dir = single
    lines = _lines(run_dir)
    assert [m["step"] for m in lines] == [2, 3, 4]
    for line in lines:
        has_val = [k in line for k in VAL_KEYS]
        assert all(has_val) if line["step"] in (2, 4) else not any(has_val), line
    for line in (lines[0], lines[2]):
        assert math.isclose(line["val_ppl"], math.exp(line["val_lm_loss"]), rel_tol=1e-12)
    # Training moved the weights between the two validations of the same batches.
    assert lines[2]["val_lm_loss"] < lines[0]["val_lm_loss"]


@pytest.mark.slow
def test_val_metrics_at_tp2_pp2_equal_one_process(single, tmp_path):
    reference = {m["step"]: m for m in single[0]}
    ours = {
        m["step"]: m
        for m in _run(4, ["parallel.tensor=2", "parallel.pipeline=2"], tmp_path)["history"]
    }
    assert sorted(ours) == sorted(reference) == [2, 3, 4]
    for step in (2, 4):
        for key in VAL_KEYS:
            assert math.isclose(ours[step][key], reference[step][key], rel_tol=1e-5), (step, key)


def _evaluate_twice_and_directly(rank: int, world: int, run_dir: str) -> dict:
    import torch

    from divprec.data.batches import collate_samples
    from divprec.model.shaped_gpt import OUTPUT_CHANNELS
    from divprec.train.build import build_run
    from divprec.train.validation import Validator

    cfg = compose_config([*BASE, f"run.dir={run_dir}"])
    validate(cfg, world)
    run = build_run(cfg)
    validator = Validator(run, stop_requested=lambda: False)
    first, second = validator.evaluate(), validator.evaluate()
    model = run.engine.module
    training_after = model.training
    # Independently: the first eval.iters global batches of the split, one sample at a time,
    # through the model in eval mode, token mean in float64.
    model.eval()
    nll_sum = tokens = 0.0
    with torch.no_grad():
        for i in range(cfg.eval.iters * cfg.train.global_batch_size):
            b = collate_samples([run.datasets.valid[i]])
            out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])  # [1, s, 6]
            nll = out[..., OUTPUT_CHANNELS.index("nll")].double()  # [1, s]
            mask = b["loss_mask"].double()
            nll_sum += float((nll * mask).sum())
            tokens += float(mask.sum())
    return {"first": first, "second": second, "direct": nll_sum / tokens, "train": training_after}


def test_validation_reads_the_same_batches_every_time(tmp_path):
    (result,) = run_in_processes(_evaluate_twice_and_directly, 1, str(tmp_path))
    assert result["first"] == result["second"]  # bit-identical: same weights, same batches
    assert set(result["first"]) == set(VAL_KEYS)
    assert math.isclose(result["first"]["val_lm_loss"], result["direct"], rel_tol=1e-6)
    assert result["train"]  # the model is back in train mode


def test_a_signal_during_validation_stops_with_a_checkpoint(tmp_path):
    result = _run(1, [], tmp_path, signal_in_eval=True)
    assert result["exit"] == 75
    marker = json.loads((tmp_path / "preempted.json").read_text())
    assert marker["step"] == 2 and marker["signal"] == "SIGUSR1"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    (line,) = _lines(tmp_path)  # step 2's line, without the interrupted validation
    assert line["step"] == 2 and not any(k in line for k in VAL_KEYS)
