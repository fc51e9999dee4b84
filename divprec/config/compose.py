"""Compose the pre-training config from conf/ without a command line (tests, tools, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir

from divprec.config.schema import PretrainConfig, register_schema, to_typed

# divprec/conf is the top-level conf/ (a symlink in the checkout, copied files in a wheel), so the
# presets are found in a checkout, an editable install and an installed wheel alike.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(overrides: Sequence[str] = ()) -> PretrainConfig:
    """The typed config that ``divprec-pretrain <overrides...>`` would run with (not validated)."""
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_typed(cfg)
