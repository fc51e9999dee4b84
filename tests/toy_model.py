"""Shared Hydra overrides of the tests: the 2-layer toy model the evaluation and RL tests build in
process, and the quick run of the ``tiny`` model the integration tests train."""

TOY_MODEL = [
    "train.seq_length=64",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
]

_TINY_RUN = {
    "train.seq_length": "64",
    "train.global_batch_size": "8",
    "train.micro_batch_size": "2",
    "optim.warmup_steps": "1",
    "logging.wandb.mode": "disabled",
    "logging.progress": "false",
}


def tiny_run(*overrides: str) -> list[str]:
    """A few-second run of the tiny model; ``overrides`` (key=value) add keys or replace them."""
    replaced = {o.split("=", 1)[0] for o in overrides}
    return [f"{k}={v}" for k, v in _TINY_RUN.items() if k not in replaced] + list(overrides)
