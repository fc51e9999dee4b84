"""The whole pre-training configuration: one typed dataclass per Hydra group.

YAML in conf/ only chooses values; the types and defaults live next to what they configure and are
collected here. Hydra checks every override against these types before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from divprec.checkpoint.config import CheckpointConfig
from divprec.data.config import DataConfig
from divprec.loss.config import ShapedLossConfig
from divprec.metrics.config import LoggingConfig
from divprec.model.config import ModelConfig
from divprec.parallel.config import OptimConfig, ParallelConfig
from divprec.train.config import EvalConfig, TrainConfig

SCHEMA_NAME = "pretrain_schema"


@dataclass
class RunConfig:
    """Where a run writes its resolved config, metrics and (by default) checkpoints."""

    dir: str = "runs/default"
    name: str | None = None  # a label for loggers (wandb run name); None: the run dir's name


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: ShapedLossConfig = field(default_factory=ShapedLossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


def register_schema() -> None:
    """Make the schema available to conf/config.yaml's defaults list as ``pretrain_schema``."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=PretrainConfig)


def to_typed(cfg: DictConfig) -> PretrainConfig:
    """Hydra's DictConfig -> PretrainConfig. Field-level checks (e.g. loss values) run here."""
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, PretrainConfig):
        raise TypeError("the composed config is not a PretrainConfig: keep pretrain_schema first")
    return typed


def to_dict(cfg: PretrainConfig) -> dict:
    """The resolved config as plain containers (for saving and for loggers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
