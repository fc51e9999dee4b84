"""The study's pre-training data: the stdlib corpus blended with synthetic arithmetic text.

Every setting trains on exactly the same tokens: one tokenizer (the stdlib corpus's, whose
``split_digits`` pieces spell numbers digit by digit), one arithmetic JSONL written from the
train split of :class:`divprec.eval.synthetic.ArithmeticTask`, one weighted megatron blend.
Everything lands under ``<data_dir>`` and ``meta.json`` (written last) marks it done, so a
rerun reuses it::

    <data_dir>/default_corpus/<key>/{tokenizer.model, stdlib.bin, stdlib.idx}
    <data_dir>/arith_train.jsonl, arith.{bin,idx}
    <data_dir>/cache/            megatron's dataset-index cache (data.cache_dir of every run)
    <data_dir>/meta.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from divprec.data.default_corpus import ensure_default_corpus
from divprec.data.preprocess import preprocess_files

META = "meta.json"


@dataclass(frozen=True)
class DataSpec:
    """What the blend is made of (part of the study config; a change rebuilds the data)."""

    vocab_size: int = 4096  # the stdlib tokenizer's vocabulary
    stdlib_max_files: int | None = None  # the first N stdlib files only (smoke runs); None: all
    # The task, scaled to what the CPU study model learns within its budget (docs/study.md):
    # 1-2 operations over 1..9 (the task's default, 2-4 operations over 1..20, stays at chance).
    task_min_steps: int = 1
    task_max_steps: int = 2
    task_max_operand: int = 9
    # Worked problems in the arithmetic JSONL: most of the ~5k distinct train-split expressions
    # of the task above (generate() draws distinct ones), repeated over epochs by the blend.
    arith_problems: int = 4000
    arith_weight: float = 0.7  # share of training sequences drawn from the arithmetic text
    seed: int = 0


@dataclass(frozen=True)
class PreparedData:
    """Absolute paths of a prepared blend, as the pre-training config wants them."""

    tokenizer_model: str
    stdlib_prefix: str
    arith_prefix: str
    cache_dir: str
    arith_weight: float

    @property
    def blend(self) -> list[str]:
        """Megatron-style weighted blend: ["w", "prefix", "w", "prefix"]."""
        w = self.arith_weight
        return [f"{1.0 - w:g}", self.stdlib_prefix, f"{w:g}", self.arith_prefix]

    def overrides(self) -> list[str]:
        """Hydra overrides that point a run at this data."""
        blend = ",".join(self.blend)
        return [
            f"data.blend=[{blend}]",
            f"data.tokenizer_model={self.tokenizer_model}",
            f"data.cache_dir={self.cache_dir}",
        ]


def make_task(spec: DataSpec):
    """The study's arithmetic task (same generator for training text, evaluation and RL)."""
    from divprec.eval.synthetic import ArithmeticTask

    return ArithmeticTask(
        min_steps=spec.task_min_steps,
        max_steps=spec.task_max_steps,
        max_operand=spec.task_max_operand,
        seed=spec.seed,
    )


def prepare_data(data_dir: str | Path, spec: DataSpec, show_progress: bool = False) -> dict:
    """Build (once) the study's blend under ``data_dir``; returns its meta record.

    The record holds the spec, the paths (``tokenizer_model``, ``stdlib_prefix``,
    ``arith_prefix``, ``cache_dir``), token counts and build seconds. A ``meta.json`` from an
    identical spec is reused as is; a different spec rebuilds the arithmetic part.
    """
    from divprec.eval.synthetic import write_training_jsonl

    data_dir = Path(data_dir).resolve()
    meta_path = data_dir / META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == asdict(spec):
            return meta
    data_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer_model, stdlib_prefix = ensure_default_corpus(
        data_dir, spec.vocab_size, max_files=spec.stdlib_max_files, show_progress=show_progress
    )
    jsonl = write_training_jsonl(
        data_dir / "arith_train.jsonl", spec.arith_problems, seed=spec.seed, task=make_task(spec)
    )
    stats = preprocess_files(
        [jsonl], tokenizer_model, data_dir / "arith", workers=1, show_progress=show_progress
    )
    corpus_meta = json.loads((Path(stdlib_prefix).parent / "meta.json").read_text())
    meta = {
        "spec": asdict(spec),
        "tokenizer_model": tokenizer_model,
        "stdlib_prefix": stdlib_prefix,
        "arith_prefix": str(data_dir / "arith"),
        "cache_dir": str(data_dir / "cache"),
        "stdlib_tokens": corpus_meta["num_tokens"],
        "stdlib_documents": corpus_meta["num_documents"],
        "arith_tokens": stats.num_tokens,
        "arith_documents": stats.num_documents,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    tmp = meta_path.with_name(META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(meta_path)
    return meta


def prepared_from_meta(meta: dict) -> PreparedData:
    """The :class:`PreparedData` a meta record describes."""
    return PreparedData(
        tokenizer_model=meta["tokenizer_model"],
        stdlib_prefix=meta["stdlib_prefix"],
        arith_prefix=meta["arith_prefix"],
        cache_dir=meta["cache_dir"],
        arith_weight=float(meta["spec"]["arith_weight"]),
    )
