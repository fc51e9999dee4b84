"""Hydra overrides for the 2-layer toy model the evaluation and RL tests build in process."""

TOY_MODEL = [
    "train.seq_length=64",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
]
