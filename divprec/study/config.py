"""What a study runs: settings, pre-training budget, data, evaluation and RL-probe sizes.

A study pre-trains the CPU study model (``experiment=study``, conf/model/study.yaml) once per loss
setting on the same data and seed, evaluates each checkpoint on held-out data and held-out
arithmetic problems, and runs a short GRPO probe from each. :func:`full_config` is the documented
configuration (docs/study.md, under an hour on 2 CPU cores); :func:`quick_config` the smoke test.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from divprec.rl.grpo import GRPOConfig
from divprec.study.data import DataSpec

# The paper's five settings = the conf/loss presets (docs/study.md).
SETTINGS = ("ce", "precision", "diversity", "tail_penalty", "head_bonus")


@dataclass(frozen=True)
class EvalSpec:
    """Held-out measurements of a pre-trained checkpoint.

    Token statistics (perplexity, entropy, top-k / tail mass, target rank) over
    ``heldout_samples`` held-out sequences of each data source; Pass@k for k = 1..``samples`` on
    ``problems`` eval-split arithmetic problems, ``samples`` completions each, at the paper's
    sampling settings (temperature 0.7, top-p 0.95), plus greedy accuracy.
    """

    heldout_samples: int = 128
    topk: int = 100
    # 288 problems: one setting's Pass@8 has a standard error <= 0.5 / sqrt(287) < 0.03 whatever
    # the per-problem values (docs/study.md, evaluation noise; 64 problems gave 0.044-0.052).
    problems: int = 288
    samples: int = 16
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 40
    batch_size: int = 128
    greedy: bool = True


def study_rl(**changes) -> GRPOConfig:
    """The study's GRPO probe: divprec.rl.grpo.GRPOConfig with the study's sizes (its ``seed`` is
    replaced by the study's when the probe runs)."""
    probe = GRPOConfig(
        steps=40,
        prompts_per_step=16,
        samples_per_prompt=8,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=40,
        # The paper's RL lr is its pre-training lr / 300 (1e-6 vs 3e-4); that ratio gives 1e-5
        # here, which moves nothing in 40 steps (the paper ran 1000), so the probe uses 1e-4.
        lr=1e-4,
        # Before the first step and after the last, on 288 problems: Pass@8's standard error
        # <= 0.5 / sqrt(287) < 0.03 (with 64 problems it was up to 0.0625). 8 samples give the
        # same bound as 16 at half the cost (per problem Pass@8 is then 0 or 1).
        eval_every=40,
        eval_problems=288,
        eval_samples=8,
        pass_ks=(1, 2, 4, 8),
        eval_temperature=0.7,  # the pre-training Pass@k's sampling settings
        eval_top_p=0.95,
        sample_batch_size=128,
        micro_batch_size=32,
    )
    return replace(probe, **changes)


@dataclass(frozen=True)
class StudyConfig:
    """One study. ``train_overrides`` go after ``experiment=<experiment> loss=<setting>`` on every
    pre-training command line (e.g. ``train.steps=20`` for a smoke run)."""

    name: str = "full"
    settings: tuple[str, ...] = SETTINGS
    seed: int = 1234
    experiment: str = "study"
    train_overrides: tuple[str, ...] = ()
    data: DataSpec = field(default_factory=DataSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    rl: GRPOConfig = field(default_factory=study_rl)
    run_rl: bool = True
    torch_threads: int | None = None  # evaluation / RL processes; None: torch's default

    def __post_init__(self) -> None:
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise ValueError(f"settings {unknown or '()'} : choose from {', '.join(SETTINGS)}")
        if len(set(self.settings)) != len(self.settings):
            raise ValueError(f"settings repeat: {self.settings}")

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Everything that decides the numbers, except which settings are run: a report
        directory holds one fingerprint, so adding settings later reuses the finished ones."""
        record = self.to_dict()
        for key in ("settings", "name", "torch_threads"):
            record.pop(key)
        text = json.dumps(record, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def full_config(**changes) -> StudyConfig:
    """The documented study: the preset's pre-training budget, full evaluation and RL probe."""
    return replace(StudyConfig(name="full"), **changes)


def quick_config(**changes) -> StudyConfig:
    """A few minutes end to end: a handful of steps, a tiny evaluation and RL probe. The numbers
    mean nothing; it checks that every stage, the report and the plots work."""
    quick = StudyConfig(
        name="quick",
        train_overrides=(
            "train.steps=12",
            "optim.warmup_steps=2",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "train.seq_length=128",
        ),
        data=DataSpec(arith_problems=2000, stdlib_max_files=150),
        eval=EvalSpec(heldout_samples=8, problems=8, samples=4, max_new_tokens=24, batch_size=32),
        rl=study_rl(
            steps=2,
            prompts_per_step=2,
            samples_per_prompt=4,
            max_new_tokens=24,
            eval_every=2,
            eval_problems=4,
            eval_samples=4,
            pass_ks=(1, 2, 4),
        ),
    )
    return replace(quick, **changes)
