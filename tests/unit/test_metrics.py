"""divprec.metrics: config validation, cross-rank reduction, throughput, and the logging callbacks."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

from divprec.metrics import (
    NUM_TOKENS,
    ConsoleLogger,
    JsonlLogger,
    LoggingConfig,
    ProgressBar,
    Throughput,
    TokenStatSums,
    TrainState,
    WandbConfig,
    WandbLogger,
    build_callbacks,
    device_peak_tflops,
    masked_sums,
    reduce_token_means,
    validate_logging_config,
)
from divprec.metrics.console import format_step_line
from divprec.metrics.wandb_logger import ID_FILENAME
from divprec.parallel.spawn import run_in_processes

STATS = ("lm_loss", "loss", "entropy", "topk_mass", "target_rank")


def _state(run_dir, step=0, total=20, rank0=True, samples=0) -> TrainState:
    return TrainState(
        step=step,
        total_steps=total,
        consumed_samples=samples,
        run_dir=str(run_dir),
        is_logging_rank=rank0,
        config={"model": {"name": "tiny"}, "train": {"lr": 3e-4}},
    )


def _metrics(step: int) -> dict[str, float]:
    return {"lm_loss": 5.0 - 0.1 * step, "loss": 4.9, "grad_norm": 1.0, "lr": 3e-4}


# ------------------------------------------------------------------------------------ config


def test_default_config_is_valid_and_structured():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(LoggingConfig)
    validate_logging_config(cfg)
    validate_logging_config(LoggingConfig())
    assert cfg.wandb.mode == "offline" and cfg.peak_tflops is None and list(cfg.wandb.tags) == []
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["logging.interval=5"]).logging)
    assert merged.interval == 5


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (LoggingConfig(interval=0), "logging.interval"),
        (LoggingConfig(interval=True), "logging.interval"),
        (LoggingConfig(wandb=WandbConfig(mode="cloud")), "logging.wandb.mode"),
        (LoggingConfig(wandb=WandbConfig(project="")), "logging.wandb.project"),
        (LoggingConfig(peak_tflops=0.0), "logging.peak_tflops"),
        (LoggingConfig(peak_tflops=-989.0), "logging.peak_tflops"),
        (LoggingConfig(peak_tflops=math.inf), "logging.peak_tflops"),
    ],
)
def test_validation_names_the_key(cfg, key):
    with pytest.raises(ValueError, match=key) as err:
        validate_logging_config(cfg)
    assert "\n" not in str(err.value)


def test_should_log_every_interval_and_last_step():
    cfg = LoggingConfig(interval=4)
    assert [s for s in range(1, 11) if cfg.should_log(s, total_steps=10)] == [4, 8, 10]


# ------------------------------------------------------------------------------------ reduce


def _rank_microbatches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Per-token stats and a loss mask per microbatch; ranks hold different numbers of tokens."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(2 + rank):  # unequal microbatch counts
        shape = (2, 7)
        mb = {name: torch.rand(shape, generator=g) * 5 for name in STATS}
        mb["loss_mask"] = (torch.rand(shape, generator=g) < (0.3 + 0.4 * rank)).float()
        out.append(mb)
    return out


def _reduce_worker(rank: int, world_size: int) -> tuple[dict[str, float], int]:
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(args[0].numel())
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        acc = TokenStatSums()
        for mb in _rank_microbatches(rank):
            acc.add(masked_sums({n: mb[n] for n in STATS}, mb["loss_mask"]))
        means = acc.reduce(dist.group.WORLD)
    finally:
        dist.all_reduce = all_reduce
    return means, len(calls)


def test_reduction_across_two_gloo_ranks_matches_single_process():
    results = run_in_processes(_reduce_worker, 2)
    mbs = [mb for rank in range(2) for mb in _rank_microbatches(rank)]
    mask = torch.cat([mb["loss_mask"].flatten() for mb in mbs]).double()
    for means, n_collectives in results:
        assert n_collectives == 1
        assert means[NUM_TOKENS] == mask.sum().item()
        for name in STATS:
            values = torch.cat([mb[name].flatten() for mb in mbs]).double()
            expected = (values * mask).sum() / mask.sum()
            assert means[name] == pytest.approx(expected.item(), rel=1e-12)
    assert results[0] == results[1]


def test_reduction_without_process_group_and_without_tokens():
    assert not dist.is_initialized()
    sums = masked_sums({"loss": torch.tensor([[2.0, 4.0, 9.0]])}, torch.tensor([[1.0, 1.0, 0.0]]))
    assert reduce_token_means(sums) == {"loss": 3.0, NUM_TOKENS: 2.0}
    empty = reduce_token_means({"loss": torch.tensor(0.0), NUM_TOKENS: 0})
    assert math.isnan(empty["loss"]) and empty[NUM_TOKENS] == 0.0
    with pytest.raises(ValueError, match="num_tokens"):
        reduce_token_means({"loss": 1.0})
    with pytest.raises(ValueError, match="shape"):
        masked_sums({"loss": torch.zeros(3)}, torch.ones(2, 3))
    acc = TokenStatSums()
    acc.add({"loss": torch.tensor(1.0), NUM_TOKENS: torch.tensor(1.0)})
    with pytest.raises(ValueError, match="differ"):
        acc.add({"nll": torch.tensor(1.0), NUM_TOKENS: torch.tensor(1.0)})


# -------------------------------------------------------------------------------- throughput


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_over_logging_windows():
    clock = FakeClock()
    tp = Throughput(flops_per_token=6e9, num_devices=8, peak_tflops=989.0, clock=clock)
    for _ in range(4):
        clock.now += 0.5
        tp.step(tokens=1_000_000)
    out = tp.compute()
    assert out["tokens_per_s"] == pytest.approx(2e6)
    assert out["step_time_s"] == pytest.approx(0.5)
    assert out["tflops"] == pytest.approx(2e6 * 6e9 / 8 / 1e12)  # 1500 per device
    assert out["mfu"] == pytest.approx(1500 / 989)
    clock.now += 1.0  # the next window starts where the last one ended
    tp.step(tokens=3_000)
    assert tp.compute()["tokens_per_s"] == pytest.approx(3_000)
    assert tp.compute() == {}  # no step in the window
    bare = Throughput(flops_per_token=None, num_devices=1, clock=clock)
    clock.now += 2.0
    bare.step(100)
    assert set(bare.compute()) == {"tokens_per_s", "step_time_s"}


def test_device_peak_tflops(monkeypatch):
    assert device_peak_tflops(torch.device("cpu")) is None
    names = {
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0,
        "NVIDIA H200 NVL": 835.0,  # not an H200 SXM
        "NVIDIA GH200 480GB": 989.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA A100-PCIE-40GB": 312.0,
        "NVIDIA GeForce RTX 4090": None,
    }
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert device_peak_tflops(torch.device("cuda", 0), torch.bfloat16) == peak, name
    assert device_peak_tflops("cuda:0", torch.float32) is None


# ------------------------------------------------------------------------------------- jsonl


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _run_jsonl(run_dir, start: int, stop: int, interval: int = 1) -> None:
    logger = JsonlLogger()
    logger.on_train_start(_state(run_dir, step=start))
    for step in range(start + 1, stop + 1):
        metrics = _metrics(step) if step % interval == 0 else None
        logger.on_step_end(_state(run_dir, step=step, samples=8 * step), metrics)
    logger.on_train_end(_state(run_dir, step=stop))


def test_jsonl_lines_written_and_appended_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _run_jsonl(tmp_path, 0, 6, interval=2)
    records = _read_jsonl(path)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[0]["consumed_samples"] == 16
    assert records[0]["lm_loss"] == pytest.approx(4.8)
    assert list(records[0])[0] == "step"
    _run_jsonl(tmp_path, 6, 8)  # resumed job continues the file
    assert [r["step"] for r in _read_jsonl(path)] == [2, 4, 6, 7, 8]


def test_jsonl_resume_from_earlier_checkpoint_drops_later_and_partial_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _run_jsonl(tmp_path, 0, 5)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 6, "lm_lo')  # killed mid-write
    _run_jsonl(tmp_path, 3, 4)  # resumed from the step-3 checkpoint
    assert [r["step"] for r in _read_jsonl(path)] == [1, 2, 3, 4]


def test_jsonl_only_on_logging_rank_and_strict_json(tmp_path):
    logger = JsonlLogger()
    logger.on_train_start(_state(tmp_path, rank0=False))
    logger.on_step_end(_state(tmp_path, step=1, rank0=False), _metrics(1))
    logger.on_train_end(_state(tmp_path, rank0=False))
    assert not (tmp_path / "metrics.jsonl").exists()
    logger.on_train_start(_state(tmp_path))
    logger.on_step_end(_state(tmp_path, step=1), {"loss": math.nan, "lm_loss": torch.tensor(2.5)})
    logger.on_train_end(_state(tmp_path))
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and json.loads(line)["loss"] is None
    assert json.loads(line)["lm_loss"] == 2.5


# ------------------------------------------------------------------------------------- wandb


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """Keep wandb's settings and caches out of the home directory."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    for var in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_wandb_offline_writes_under_run_dir_and_resume_reuses_id(wandb_home):
    run_dir = wandb_home / "run"
    cfg = WandbConfig(mode="offline", name="unit", tags=["test"])
    ids = []
    for start in (0, 2):
        logger = WandbLogger(cfg)
        logger.on_train_start(_state(run_dir, step=start))
        ids.append(logger.run.id)
        for step in (start + 1, start + 2):
            logger.on_step_end(_state(run_dir, step=step), _metrics(step))
        logger.on_train_end(_state(run_dir, step=start + 2))
        assert logger.run is None
    assert ids[0] == ids[1] == (run_dir / ID_FILENAME).read_text().strip()
    runs = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{ids[0]}*" / f"run-{ids[0]}.wandb"))
    assert len(runs) == 2 and all(os.path.getsize(p) > 0 for p in runs)


def test_wandb_disabled_and_other_ranks_do_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import would fail
    for logger, rank0 in (
        (WandbLogger(WandbConfig(mode="disabled")), True),
        (WandbLogger(WandbConfig(mode="offline")), False),
    ):
        logger.on_train_start(_state(tmp_path, rank0=rank0))
        logger.on_step_end(_state(tmp_path, step=1, rank0=rank0), _metrics(1))
        logger.on_train_end(_state(tmp_path, rank0=rank0))
    assert list(tmp_path.iterdir()) == []


def test_wandb_init_and_log_arguments(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        id, dir, url = "x", str(tmp_path), None

        def log(self, data, step):
            calls.setdefault("log", []).append((step, data))

        def finish(self):
            calls["finish"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    fake = types.SimpleNamespace(init=init, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    state = _state(tmp_path, step=4, samples=32)
    logger = WandbLogger(WandbConfig(mode="online", entity="lab", tags=["a"]))
    logger.on_train_start(state)
    logger.on_step_end(_state(tmp_path, step=5, samples=40), None)
    logger.on_step_end(_state(tmp_path, step=6, samples=48), _metrics(6))
    logger.on_train_end(state)
    init_kwargs = calls["init"]
    assert init_kwargs["resume"] == "allow" and init_kwargs["dir"] == str(tmp_path)
    assert init_kwargs["id"] == (tmp_path / ID_FILENAME).read_text().strip()
    assert init_kwargs["config"] == state.config and init_kwargs["entity"] == "lab"
    assert init_kwargs["settings"]["console"] == "off"
    assert calls["log"] == [(6, {**_metrics(6), "consumed_samples": 48})]
    assert calls["finish"]


# ------------------------------------------------------------------------- console, progress


def test_console_line(tmp_path, caplog):
    metrics = {
        "lm_loss": 5.1234,
        "loss": 5.0009,
        "entropy": 4.2,
        "grad_norm": 1.2,
        "lr": 3e-4,
        "tokens_per_s": 12345.0,
        "topk_mass": 0.9,
    }
    expected = (
        "step 10/50 | lm_loss 5.123 | loss 5.001 | entropy 4.200 | grad_norm 1.200 | "
        "lr 3.0e-04 | 12.3k tok/s"
    )
    assert format_step_line(10, 50, metrics) == expected
    assert format_step_line(1, 2, {"mfu": 0.4123}) == "step 1/2 | mfu 41.2%"
    # A validation step adds val_lm_loss (the other val_ metrics stay in the jsonl/wandb record).
    val_step = {**metrics, "val_lm_loss": 5.4321, "val_ppl": 228.6}
    assert format_step_line(10, 50, val_step) == expected.replace(
        " | 12.3k", " | val_lm_loss 5.432 | 12.3k"
    )
    caplog.set_level(logging.INFO, logger="divprec.metrics")
    console = ConsoleLogger()
    console.on_step_end(_state(tmp_path, step=10, total=50), metrics)
    console.on_step_end(_state(tmp_path, step=11, total=50), None)
    console.on_step_end(_state(tmp_path, step=10, total=50, rank0=False), metrics)
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_progress_bar_resumes_and_shows_postfix(tmp_path, capsys, monkeypatch):
    # The bar is drawn only on a terminal; capsys's stderr is not one, so pretend it is.
    monkeypatch.setattr("divprec.metrics.progress._is_terminal", lambda stream: True)
    bar = ProgressBar(mininterval=0.0)
    bar.on_train_start(_state(tmp_path, step=5, total=10))
    for step in range(6, 11):
        bar.on_step_end(
            _state(tmp_path, step=step, total=10), {**_metrics(step), "tokens_per_s": 2e4}
        )
    assert bar._bar.n == 10
    bar.on_train_end(_state(tmp_path, step=10, total=10))
    err = capsys.readouterr().err
    assert "10/10" in err and "lm_loss=4.0000" in err and "tok/s=20.0k" in err
    other = ProgressBar()
    other.on_train_start(_state(tmp_path, rank0=False))
    other.on_step_end(_state(tmp_path, step=1, rank0=False), _metrics(1))
    other.on_train_end(_state(tmp_path, rank0=False))
    assert capsys.readouterr().err == ""


_PIPED_RUN = """
import logging, sys
from divprec.metrics import ConsoleLogger, ProgressBar
from divprec.metrics.callback import TrainState

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
callbacks = [ConsoleLogger(), ProgressBar(mininterval=0.0)]
state = TrainState(step=0, total_steps=4, consumed_samples=0, run_dir=sys.argv[1],
                   is_logging_rank=True, config={})
for c in callbacks:
    c.on_train_start(state)
for step in range(1, 5):
    state.step = step
    for c in callbacks:
        c.on_step_end(state, {"lm_loss": 5.0 - step, "loss": 5.0 - step})
for c in callbacks:
    c.on_train_end(state)
"""


def test_progress_bar_writes_plain_lines_into_a_pipe(tmp_path):
    """A SLURM .out file or a pipe gets the step lines and no carriage-return frames."""
    proc = subprocess.run(  # capture_output: stdout and stderr are pipes
        [sys.executable, "-c", _PIPED_RUN, str(tmp_path)],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=120,
        check=True,
    )
    assert b"\r" not in proc.stderr, proc.stderr
    lines = proc.stderr.decode().splitlines()
    assert lines == [f"step {s}/4 | lm_loss {5 - s:.3f} | loss {5 - s:.3f}" for s in range(1, 5)]


def test_build_callbacks():
    kinds = [type(c) for c in build_callbacks(LoggingConfig())]
    assert kinds == [JsonlLogger, WandbLogger, ConsoleLogger, ProgressBar]
    quiet = LoggingConfig(jsonl=False, progress=False, wandb=WandbConfig(mode="disabled"))
    assert [type(c) for c in build_callbacks(quiet)] == [ConsoleLogger]
    with pytest.raises(ValueError, match="logging.interval"):
        build_callbacks(LoggingConfig(interval=0))


def test_loss_spike_zscores_match_a_hand_computation():
    from divprec.train.guards import LossSpikes

    spikes = LossSpikes(window=4, threshold=6.0, skip=True)
    for loss, norm in [(1.0, 2.0), (1.1, 2.2), (0.9, 1.8), (1.0, 2.0)]:
        assert spikes.skip_reason(loss) is None  # the window is not full yet
        assert spikes.record(loss, norm, None) == {}
    # mean 1.0, sample std sqrt(0.02 / 3): loss 1.05 is 0.61 sigma, loss 5.0 is 49 sigma.
    assert spikes.skip_reason(1.05) is None
    reason = spikes.skip_reason(5.0)
    assert reason == "loss spike (z-score 49.0 > train.loss_spike_zscore=6)"
    scores = spikes.record(5.0, 2.0, reason)
    assert abs(scores["loss_zscore"] - 4.0 / (0.02 / 3) ** 0.5) < 1e-9
    assert abs(scores["grad_norm_zscore"] - 0.0) < 1e-12
    assert list(spikes.losses) == [1.0, 1.1, 0.9, 1.0]  # a skipped step stays out of the window
