"""The Hydra config: presets compose and validate, every validation rule fails with its one-line
message naming the key, and the entry point turns config errors into ``divprec: error: ...``
(exit 2) before any corpus, model or process group exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from bad_data import SmallCorpus, copy_dataset, make_small_corpus, truncate
from hydra.errors import ConfigCompositionException, MissingConfigException

from divprec.checkpoint.layout import LATEST, METADATA, step_dir_name
from divprec.config.compose import CONF_DIR, compose_config
from divprec.config.schema import PretrainConfig
from divprec.config.validate import ConfigError, validate

VOCAB = 4096

MODELS = ("tiny", "moe_tiny", "dense_1b", "dense_4b", "moe_5b_a0_3b", "moe_10b_a0_5b")
LOSSES = ("ce", "precision", "diversity", "tail_penalty", "head_bonus")
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))

# The paper's reward shapes (loss.<key>).
LOSS_VALUES = {
    "ce": dict(beta=0.0, topk_negative_reward=0.0, tail_negative_reward=0.0),
    "precision": dict(beta=-0.25, topk_negative_reward=0.0, tail_negative_reward=0.0),
    "diversity": dict(beta=0.5, topk_negative_reward=0.0, tail_negative_reward=0.0),
    "tail_penalty": dict(beta=0.0, topk=100, topk_negative_reward=0.0, tail_negative_reward=-0.1),
    "head_bonus": dict(beta=0.0, topk=100, topk_negative_reward=0.1, tail_negative_reward=0.0),
}

# The paper's model shapes (model.<key>).
MODEL_SHAPES = {
    "dense_1b": dict(
        num_layers=28,
        hidden_size=1536,
        ffn_hidden_size=4608,
        num_attention_heads=16,
        num_query_groups=4,
        num_experts=None,
    ),
    "dense_4b": dict(
        num_layers=36,
        hidden_size=2560,
        ffn_hidden_size=9728,
        num_attention_heads=32,
        num_query_groups=8,
        num_experts=None,
    ),
    "moe_5b_a0_3b": dict(
        num_layers=12,
        hidden_size=1024,
        moe_ffn_hidden_size=320,
        num_attention_heads=32,
        num_query_groups=4,
        num_experts=384,
        moe_router_topk=12,
    ),
    "moe_10b_a0_5b": dict(
        num_layers=16,
        hidden_size=1536,
        moe_ffn_hidden_size=320,
        num_attention_heads=32,
        num_query_groups=4,
        num_experts=384,
        moe_router_topk=12,
    ),
}


def _error(cfg: PretrainConfig, world_size: int = 1, vocab_size: int | None = VOCAB) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size, vocab_size=vocab_size)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- presets ---------------------------------------------------------------------------------


def test_defaults_compose_and_validate() -> None:
    cfg = compose_config()
    assert isinstance(cfg, PretrainConfig)
    assert cfg.model.name == "tiny" and cfg.loss.is_cross_entropy
    validate(cfg, world_size=1, vocab_size=VOCAB)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("model", MODELS)
def test_every_preset_composes_and_validates(model: str, loss: str) -> None:
    cfg = compose_config([f"model={model}", f"loss={loss}"])
    assert cfg.model.name == model
    validate(cfg, world_size=1, vocab_size=VOCAB)


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_presets_have_the_papers_values(loss: str) -> None:
    cfg = compose_config([f"loss={loss}"]).loss
    for key, value in LOSS_VALUES[loss].items():
        assert getattr(cfg, key) == value, f"loss={loss}: loss.{key}"
    assert cfg.positive_form == "power"
    assert cfg.is_cross_entropy == (loss == "ce")


@pytest.mark.parametrize("model", sorted(MODEL_SHAPES))
def test_model_presets_have_the_papers_shapes(model: str) -> None:
    cfg = compose_config([f"model={model}"]).model
    for key, value in MODEL_SHAPES[model].items():
        assert getattr(cfg, key) == value, f"model={model}: model.{key}"
    assert cfg.is_moe == (cfg.num_experts is not None)


@pytest.mark.parametrize(
    ("overrides", "world_size"),
    [
        (["model=dense_4b", "parallel.tensor=8", "parallel.pipeline=4"], 64),
        (["model=dense_4b", "parallel.tensor=8", "parallel.sequence_parallel=true"], 16),
        (["model=dense_1b", "parallel.tensor=4", "parallel.pipeline=4"], 32),
        (["model=dense_1b", "parallel.tensor=4", "parallel.zero_stage=2"], 8),
        (
            [
                "model=moe_5b_a0_3b",
                "parallel.tensor=4",
                "parallel.sequence_parallel=true",
                "parallel.pipeline=4",
            ],
            16,
        ),
        (
            [
                "model=moe_10b_a0_5b",
                "parallel.tensor=4",
                "parallel.sequence_parallel=true",
                "parallel.pipeline=4",
            ],
            64,
        ),
        (
            [
                "model=moe_tiny",
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "parallel.pipeline=2",
            ],
            4,
        ),
    ],
    ids=lambda v: v if isinstance(v, int) else "-".join(o.split(".")[-1] for o in v),
)
def test_large_layouts_validate(overrides: list[str], world_size: int) -> None:
    validate(compose_config(["loss=precision", *overrides]), world_size, vocab_size=151936)


@pytest.mark.parametrize(
    "experiment",
    EXPERIMENTS or [pytest.param(None, marks=pytest.mark.skip(reason="conf/experiment/ is empty"))],
)
def test_experiment_presets_compose_and_validate(experiment: str) -> None:
    cfg = compose_config([f"experiment={experiment}"])
    if cfg.data.blend is not None:  # a cluster's corpus paths: not checkable here
        cfg.data.blend = cfg.data.tokenizer_model = None
    # The paper presets are sized for one node of 8 GPUs (the MoE ones split experts 8 ways).
    world = 8 if experiment.startswith("paper_") else cfg.parallel.tensor * cfg.parallel.pipeline
    validate(cfg, world, vocab_size=VOCAB)


# --- validation errors -----------------------------------------------------------------------

# (overrides, world size, vocab size, regex of the message). "{tmp}" is replaced by a temporary
# directory holding an existing tokenizer file "tok.model" and nothing else.
ERRORS = {
    "heads_tensor": (
        ["parallel.tensor=3"],
        3,
        VOCAB,
        r"^model\.num_attention_heads=4 is not divisible by parallel\.tensor=3: ",
    ),
    "heads_tensor_before_world_size": (
        ["parallel.tensor=3"],
        1,
        VOCAB,
        r"^model\.num_attention_heads=4 is not divisible by parallel\.tensor=3: ",
    ),
    "kv_heads_tensor": (
        ["parallel.tensor=4"],
        4,
        VOCAB,
        r"^model\.num_query_groups=2 \(KV heads\) is not divisible by parallel\.tensor=4: ",
    ),
    "kv_heads_divide_heads": (
        ["model.num_query_groups=3"],
        1,
        VOCAB,
        r"^model\.num_query_groups=3 must divide model\.num_attention_heads=4",
    ),
    "head_dim": (
        ["model.hidden_size=130"],
        1,
        VOCAB,
        r"^model\.hidden_size=130 is not divisible by model\.num_attention_heads=4: "
        r"set model\.kv_channels",
    ),
    "model_size": (["model.num_layers=0"], 1, VOCAB, r"^model\.num_layers must be >= 1, got 0"),
    "layers_pipeline": (
        ["parallel.pipeline=3"],
        3,
        VOCAB,
        r"^model\.num_layers=4 is not divisible by parallel\.pipeline=3: ",
    ),
    "tensor_zero": (["parallel.tensor=0"], 1, VOCAB, r"^parallel\.tensor must be >= 1, got 0"),
    "pipeline_zero": (
        ["parallel.pipeline=0"],
        1,
        VOCAB,
        r"^parallel\.pipeline must be >= 1, got 0",
    ),
    "world_size": (
        ["parallel.tensor=2"],
        3,
        VOCAB,
        r"^world size 3 is not a multiple of parallel\.tensor x parallel\.pipeline = 2: ",
    ),
    "global_batch": (
        ["train.global_batch_size=12"],
        2,
        VOCAB,
        r"^train\.global_batch_size=12 is not divisible by train\.micro_batch_size x data "
        r"parallel = 4 x 2: make it a multiple of 8",
    ),
    "global_batch_zero": (
        ["train.global_batch_size=0"],
        1,
        VOCAB,
        r"^train\.global_batch_size must be >= 1, got 0",
    ),
    "zero2_pipeline": (
        ["parallel.zero_stage=2", "parallel.pipeline=2"],
        2,
        VOCAB,
        r"^parallel\.zero_stage=2 cannot be combined with parallel\.pipeline > 1",
    ),
    "zero3": (["parallel.zero_stage=3"], 1, VOCAB, r"^parallel\.zero_stage=3 is not supported"),
    "max_skipped_steps": (
        ["train.max_skipped_steps=0"],
        1,
        VOCAB,
        r"^train\.max_skipped_steps must be >= 1 \(non-finite steps in a row before stopping\)",
    ),
    "preemption_signal_uncatchable": (
        ["train.preemption_signal=KILL"],
        1,
        VOCAB,
        r"^train\.preemption_signal='KILL' is not a signal that can be caught: use USR1",
    ),
    "preemption_signal_unknown": (
        ["train.preemption_signal=USR7"],
        1,
        VOCAB,
        r"^train\.preemption_signal='USR7' is not a signal that can be caught",
    ),
    "loss_spike_window": (
        ["train.loss_spike_window=1"],
        1,
        VOCAB,
        r"^train\.loss_spike_window must be 0 \(off\) or >= 2 steps, got 1",
    ),
    "skip_spikes_without_window": (
        ["train.skip_loss_spikes=true"],
        1,
        VOCAB,
        r"^train\.skip_loss_spikes=true needs train\.loss_spike_window > 0",
    ),
    "collective_timeout": (
        ["parallel.timeout_minutes=0"],
        1,
        VOCAB,
        r"^parallel\.timeout_minutes must be > 0, got 0",
    ),
    "eval_interval_negative": (
        ["eval.interval=-1"],
        1,
        VOCAB,
        r"^eval\.interval must be >= 0 \(steps between validations; 0: never\), got -1$",
    ),
    "eval_iters_zero": (
        ["eval.interval=5", "eval.iters=0"],
        1,
        VOCAB,
        r"^eval\.iters must be >= 1 \(global batches per validation\), got 0$",
    ),
    "eval_without_validation_split": (
        ["eval.interval=5", "data.split='100,0,0'"],
        1,
        VOCAB,
        r"^eval\.interval=5 needs a validation split: give data\.split a non-zero second share",
    ),
    "sequence_parallel_tp1": (
        ["parallel.sequence_parallel=true"],
        1,
        VOCAB,
        r"^parallel\.sequence_parallel=true needs parallel\.tensor > 1",
    ),
    "backend": (["parallel.backend=mpi"], 1, VOCAB, r"^parallel\.backend='mpi': use auto"),
    "nccl_without_cuda": (
        ["parallel.backend=nccl"],
        1,
        VOCAB,
        r"^parallel\.backend=nccl needs CUDA devices",
    ),
    "topk_vocab": (
        ["loss.topk=5000"],
        1,
        VOCAB,
        r"^loss\.topk=5000 is larger than the vocabulary \(4096\)",
    ),
    "model_vocab_small": (
        ["model.vocab_size=1000"],
        1,
        VOCAB,
        r"^model\.vocab_size=1000 is smaller than the tokenizer's vocabulary \(4096\)",
    ),
    "stable_steps_negative": (
        ["optim.stable_steps=-5"],
        1,
        VOCAB,
        r"^optim\.stable_steps must be >= 0 or null",
    ),
    "decay_fraction_range": (
        ["optim.decay_fraction=1.5"],
        1,
        VOCAB,
        r"^optim\.decay_fraction=1\.5 must be in \[0, 1\]",
    ),
    "decay_fraction_and_steps": (
        ["optim.decay_steps=10"],
        1,
        VOCAB,
        r"^optim\.decay_fraction=0\.2 must be in \[0, 1\] and not combined with optim\.decay_steps",
    ),
    "lr": (["optim.lr=0"], 1, VOCAB, r"^optim\.lr must be > 0"),
    "final_lr": (
        ["optim.final_lr=1.0"],
        1,
        VOCAB,
        r"^optim\.final_lr=1\.0 must be in \[0, optim\.lr\]",
    ),
    "decay_style": (["optim.decay_style=step"], 1, VOCAB, r"^optim\.decay_style='step'"),
    "steps": (["train.steps=0"], 1, VOCAB, r"^train\.steps must be >= 1, got 0"),
    "precision": (
        ["train.precision=fp16"],
        1,
        VOCAB,
        r"^train\.precision='fp16': use auto, bf16 or fp32",
    ),
    "loss_averaging": (
        ["train.loss_averaging=sample"],
        1,
        VOCAB,
        r"^train\.loss_averaging='sample': use token or microbatch$",
    ),
    "missing_data_file": (
        ["data.blend=['{tmp}/corpus']", "data.tokenizer_model='{tmp}/tok.model'"],
        1,
        VOCAB,
        r"^data\.blend\[0\]: missing .*/corpus\.bin for prefix",
    ),
    "missing_weighted_data_file": (
        ["data.blend=[1.0,'{tmp}/corpus']", "data.tokenizer_model='{tmp}/tok.model'"],
        1,
        VOCAB,
        r"^data\.blend\[1\]: missing .*/corpus\.bin for prefix",
    ),
    "missing_tokenizer_file": (
        ["data.blend=['{tmp}/corpus']", "data.tokenizer_model='{tmp}/nope.model'"],
        1,
        VOCAB,
        r"^data\.tokenizer_model: file not found: .*/nope\.model",
    ),
    "checkpoint_load": (
        ["checkpoint.load='{tmp}/step_7'"],
        1,
        VOCAB,
        r"^checkpoint\.load=.*/step_7: not a checkpoint \(the directory does not exist\); point it "
        r"at a complete step_\* directory$",
    ),
    "checkpoint_load_not_a_checkpoint": (
        ["checkpoint.load='{tmp}'"],
        1,
        VOCAB,
        rf"^checkpoint\.load=.*: not a checkpoint \({re.escape(METADATA)} is missing \(an "
        r"interrupted save\)\); point it at a complete step_\* directory$",
    ),
    "checkpoint_resume": (
        ["checkpoint.resume=always"],
        1,
        VOCAB,
        r"^checkpoint\.resume='always': use auto or never",
    ),
    "wandb_mode": (
        ["logging.wandb.mode=cloud"],
        1,
        VOCAB,
        r"^logging\.wandb\.mode must be one of offline, online, disabled, got 'cloud'",
    ),
    "moe_topk_experts": (
        ["model=moe_tiny", "model.moe_router_topk=9"],
        1,
        VOCAB,
        r"^model\.moe_router_topk=9 must be in \[1, model\.num_experts=8\]",
    ),
    "moe_ffn_missing": (
        ["model=moe_tiny", "model.moe_ffn_hidden_size=null"],
        1,
        VOCAB,
        r"^model\.moe_ffn_hidden_size must be set when model\.num_experts is set",
    ),
    "moe_score_function": (
        ["model=moe_tiny", "model.moe_router_score_function=relu"],
        1,
        VOCAB,
        r"^model\.moe_router_score_function='relu': use sigmoid or softmax",
    ),
    "moe_expert_bias_softmax": (
        ["model=moe_tiny", "model.moe_router_score_function=softmax"],
        1,
        VOCAB,
        r"^model\.moe_router_expert_bias=true needs model\.moe_router_score_function=sigmoid: ",
    ),
    "moe_tensor_without_sequence_parallel": (
        ["model=moe_tiny", "parallel.tensor=2"],
        2,
        VOCAB,
        r"^model\.num_experts=8 \(MoE\) with parallel\.tensor=2 needs "
        r"parallel\.sequence_parallel=true: ",
    ),
    "expert_parallel_dense": (
        ["parallel.expert=2"],
        2,
        VOCAB,
        r"^parallel\.expert=2 needs a MoE model \(model\.num_experts\), but model=tiny is dense: "
        r"set parallel\.expert=1$",
    ),
    "expert_parallel_experts": (
        ["model=moe_tiny", "parallel.expert=3"],
        3,
        VOCAB,
        r"^model\.num_experts=8 is not divisible by parallel\.expert=3: ",
    ),
    "expert_parallel_data": (
        [
            "model=moe_tiny",
            "parallel.expert=4",
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
        ],
        4,
        VOCAB,
        r"^parallel\.expert=4 x parallel\.tensor=2 does not divide data parallel 2 x "
        r"parallel\.tensor=2 \(world size 4 / parallel\.pipeline=1\): choose parallel\.expert "
        r"dividing 2, or launch more processes$",
    ),
    "moe_experts": (
        ["model=moe_tiny", "model.moe_experts=loop"],
        1,
        VOCAB,
        r"^model\.moe_experts='loop': use one of auto, grouped, sequential$",
    ),
    "expert_parallel_size": (
        ["model=moe_tiny", "parallel.expert=0"],
        1,
        VOCAB,
        r"^parallel\.expert must be >= 1, got 0$",
    ),
}


@pytest.mark.parametrize(
    ("overrides", "world_size", "vocab_size", "match"), ERRORS.values(), ids=ERRORS.keys()
)
def test_validation_error(
    overrides: list[str],
    world_size: int,
    vocab_size: int,
    match: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "tok.model").write_bytes(b"")
    cfg = compose_config([o.replace("{tmp}", str(tmp_path)) for o in overrides])
    message = _error(cfg, world_size, vocab_size)
    assert re.search(match, message), f"{message!r} does not match {match!r}"


def test_checkpoint_load_of_the_checkpoints_folder_names_the_step(tmp_path: Path) -> None:
    (tmp_path / LATEST).write_text(step_dir_name(4) + "\n")
    message = _error(compose_config([f"checkpoint.load={tmp_path}"]))
    assert message.endswith(f"point it at {tmp_path / step_dir_name(4)} (named by {LATEST})")


def test_the_loss_is_checked_against_the_vocabulary_in_one_place() -> None:
    """validate() calls validate_loss, inside the entry point's exit-2 handler; nothing else does
    (the trainer did too, after start-up, where a failure was a traceback)."""
    import ast

    import divprec

    callers = []
    for path in sorted(Path(divprec.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "validate_loss":
                callers.append(path.name)
    assert callers == ["validate.py"]


# --- bad data: one line before any process group (the data files are read here) --------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> SmallCorpus:
    """20 documents: with the default data.split "98,2,0" the valid split gets none."""
    corpus = make_small_corpus(tmp_path_factory.mktemp("small_corpus"))
    truncate(f"{copy_dataset(corpus.prefix, corpus.root / 'short_bin')}.bin", 100)
    truncate(f"{copy_dataset(corpus.prefix, corpus.root / 'short_idx')}.idx", 16)
    (corpus.root / "garbage.model").write_bytes(b"not a sentencepiece model")
    return corpus


def _data_overrides(overrides: list[str], corpus: SmallCorpus) -> list[str]:
    fields = {"prefix": corpus.prefix, "tok": corpus.tokenizer, "root": str(corpus.root)}
    fields["small_tok"] = corpus.smaller_tokenizer
    return [o.format(**fields) for o in overrides]


# (overrides with {prefix} {tok} {small_tok} {root} of the small corpus, regex of the message)
DATA_ERRORS = {
    "tiny_corpus_default_split": (
        ["data.blend=[1.0,'{prefix}']", "data.tokenizer_model='{tok}'"],
        r"^data\.split='98,2,0': the valid split of data\.blend\[1\] \(.*/corpus\) gets 0 of its "
        r"20 documents \(0 tokens\), fewer than one sample of train\.seq_length \+ 1 = 257 tokens; "
        r"give the valid split a larger share \(now 2%\), set its share to 0 or use more data$",
    ),
    "truncated_bin": (
        [
            "data.blend=['{root}/short_bin/corpus']",
            "data.tokenizer_model='{tok}'",
            "data.split='90,10,0'",
        ],
        r"^data\.blend\[0\]: .*/short_bin/corpus\.bin and .*/short_bin/corpus\.idx disagree: ",
    ),
    "truncated_idx": (
        [
            "data.blend=['{root}/short_idx/corpus']",
            "data.tokenizer_model='{tok}'",
            "data.split='90,10,0'",
        ],
        r"^data\.blend\[0\]: .*/short_idx/corpus\.idx is \d+ bytes but its header describes 20 "
        r"sequences and 21 documents \(\d+ bytes\): the \.idx is truncated; ",
    ),
    "ids_beyond_the_tokenizer": (
        ["data.blend=['{prefix}']", "data.tokenizer_model='{small_tok}'", "data.split='90,10,0'"],
        r"^data\.blend\[0\]: .*/corpus\.bin holds token ids up to 1023, beyond the vocabulary of "
        r"data\.tokenizer_model=.*/small_tok\.model \(600\): it was tokenized with tok\.model ",
    ),
    "unreadable_tokenizer": (
        ["data.blend=['{prefix}']", "data.tokenizer_model='{root}/garbage.model'"],
        r"^data\.tokenizer_model: .*/garbage\.model: not a readable SentencePiece model \(",
    ),
}


@pytest.mark.parametrize(("overrides", "match"), DATA_ERRORS.values(), ids=DATA_ERRORS.keys())
def test_bad_data_fails_validation(
    overrides: list[str], match: str, small_corpus: SmallCorpus
) -> None:
    cfg = compose_config(_data_overrides(overrides, small_corpus))
    message = _error(cfg, vocab_size=None)  # the vocabulary is read from data.tokenizer_model
    assert re.search(match, message), f"{message!r} does not match {match!r}"


def test_good_small_corpus_validates(small_corpus: SmallCorpus) -> None:
    overrides = ["data.blend=[1.0,'{prefix}']", "data.tokenizer_model='{tok}'"]
    cfg = compose_config([*_data_overrides(overrides, small_corpus), "data.split='90,10,0'"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"^loss\.topk=2000 is larger than the vocabulary \(1024"):
        validate(
            compose_config(
                [
                    *_data_overrides(overrides, small_corpus),
                    "loss.topk=2000",
                    "data.split='90,10,0'",
                ]
            ),
            world_size=1,
        )


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("loss.beta=nan", r"^loss\.beta must be finite, got nan$"),
        ("loss.tail_negative_reward=-inf", r"^loss\.tail_negative_reward must be finite"),
        ("loss.topk=0", r"^loss\.topk must be an integer >= 1, got 0$"),
        ("loss.positive_form=log", r"^loss\.positive_form must be one of power, product"),
    ],
)
def test_loss_field_checks_fail_at_composition(override: str, match: str) -> None:
    """ShapedLossConfig checks its own fields when OmegaConf builds the typed config."""
    with pytest.raises(ValueError, match=match) as info:
        compose_config([override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.steps=abc", "train.steps"),
        ("parallel.tensor=1.5", "parallel.tensor"),
        ("loss.beta=high", "loss.beta"),
        ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel"),
        ("train.stepz=5", "train.stepz"),
    ],
)
def test_hydra_rejects_bad_override_types(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    # Hydra's own message names the override; the OmegaConf cause names the full key.
    assert key in str(info.value).splitlines()[0]
    assert f"full_key: {key}" in str(info.value.__cause__)


@pytest.mark.parametrize("group", ["model", "loss", "optim", "experiment"])
def test_hydra_rejects_unknown_presets(group: str) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_config([f"{group}=nope"])
    # Hydra's message is multi-line (it lists the available options); its first line names it.
    assert f"Could not find '{group}/nope'" in str(info.value).splitlines()[0]


# --- the entry point -------------------------------------------------------------------------

ENTRY_ERRORS = {
    "heads": (
        ["parallel.tensor=3"],
        "divprec: error: model.num_attention_heads=4 is not divisible by parallel.tensor=3: "
        "choose a tensor-parallel size that divides the heads",
    ),
    "beta_nan": (
        ["loss=precision", "loss.beta=nan"],
        "divprec: error: loss.beta must be finite, got nan",
    ),
    "topk_zero": (["loss.topk=0"], "divprec: error: loss.topk must be an integer >= 1, got 0"),
}
# Bad data and a load directory that is not a checkpoint: (overrides, regex of the one line).
# The tiny corpus hung forever before step 1 (megatron-core's epoch loop over an empty split);
# ENTRY_DEADLINE_S bounds it.
ENTRY_DATA_ERRORS = {
    "tiny_corpus_default_split": (
        DATA_ERRORS["tiny_corpus_default_split"][0],
        "divprec: error: " + DATA_ERRORS["tiny_corpus_default_split"][1][1:],
    ),
    "checkpoint_load_not_a_checkpoint": (
        ["checkpoint.load='{root}'"],
        r"divprec: error: checkpoint\.load=.*: not a checkpoint \(",
    ),
}
ENTRY_DEADLINE_S = 120


def _run_entry_point(args: list[str], cwd: Path, run_dir: Path) -> tuple:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "HYDRA_FULL_ERROR")}
    env["DS_ACCELERATOR"] = "cpu"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "divprec.pretrain", *args, f"run.dir={run_dir}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=ENTRY_DEADLINE_S,
    )
    return proc.returncode, proc.stdout, proc.stderr, cwd, run_dir, time.monotonic() - started


@pytest.fixture(scope="module", autouse=True)
def _entry_futures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Start the entry-point runs (mostly interpreter and torch import time) in the background
    when the module starts, so they overlap the in-process tests; only if any test needs them."""
    if not any(
        "entry_point" in item.name and item.path == request.path for item in request.session.items
    ):
        yield {}
        return
    cases = {name: overrides for name, (overrides, _) in ENTRY_ERRORS.items()}
    cases["cfg_job"] = ["--cfg", "job", "loss=precision"]
    if any("entry_point_bad_data" in item.name for item in request.session.items):
        corpus = request.getfixturevalue("small_corpus")
        for name, (overrides, _) in ENTRY_DATA_ERRORS.items():
            cases[name] = _data_overrides(overrides, corpus)
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {}
        for name, args in cases.items():
            cwd = tmp_path_factory.mktemp(name)
            futures[name] = pool.submit(_run_entry_point, args, cwd, cwd / "r")
        yield futures


@pytest.fixture
def entry_runs(_entry_futures: dict[str, Future]) -> dict[str, tuple]:
    return {name: future.result() for name, future in _entry_futures.items()}


@pytest.mark.parametrize("name", ENTRY_ERRORS)
def test_entry_point_config_error(name: str, entry_runs: dict[str, tuple]) -> None:
    returncode, out, err, cwd, run_dir, _elapsed = entry_runs[name]
    assert returncode == 2, (out, err)
    assert err.splitlines() == [ENTRY_ERRORS[name][1]], err
    assert "Traceback" not in out + err
    # Failed before any corpus, model or run work: nothing written, not even by Hydra.
    assert not run_dir.exists()
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("name", ENTRY_DATA_ERRORS)
def test_entry_point_bad_data(name: str, entry_runs: dict[str, tuple]) -> None:
    returncode, out, err, cwd, run_dir, _elapsed = entry_runs[name]
    assert returncode == 2, (out, err)
    assert len(err.splitlines()) == 1 and re.match(ENTRY_DATA_ERRORS[name][1], err), err
    assert "Traceback" not in out + err
    assert not run_dir.exists() and list(cwd.iterdir()) == []


def test_entry_point_cfg_job_prints_the_config(entry_runs: dict[str, tuple]) -> None:
    returncode, out, err, cwd, run_dir, _ = entry_runs["cfg_job"]
    assert returncode == 0, err
    lines = out.splitlines()
    assert "loss:" in lines and "  beta: -0.25" in lines
    assert f"  dir: {run_dir}" in lines
    assert not run_dir.exists() and list(cwd.iterdir()) == []
