"""Held-out token statistics of a model: perplexity, entropy, head (top-k) and tail mass, rank.

The statistics are the per-token stats of the training objective (divprec.loss) under a
cross-entropy config with the requested top-k, over the model's full (padded) vocabulary exactly
as training reports them, averaged over the tokens the batches' loss masks keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from divprec.data.batches import collate_samples
from divprec.data.dataset import build_gpt_datasets
from divprec.eval.model import EvalModel
from divprec.loss import ShapedLossConfig, vocab_parallel_shaped_loss

_STATS = ("nll", "entropy", "topk_mass", "target_prob", "target_rank")


@torch.no_grad()
def token_statistics(
    em: EvalModel,
    batches: Iterable[dict[str, torch.Tensor]],
    topk: int = 100,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Token means over ``batches`` (dicts of ``[b, s]`` tokens, labels, loss_mask, position_ids,
    as divprec.data batches are).

    Returns perplexity (exp of the mean nll), nll, entropy (nats), topk_mass (probability of the
    ``topk`` most likely tokens), tail_mass (1 - topk_mass), target_prob, target_rank (tokens
    ranked strictly above the target; 0 = the target is the argmax), top1_accuracy and
    num_tokens. Under tensor parallelism every rank gets the same numbers.
    """
    cfg = ShapedLossConfig(topk=topk)
    device = em.device
    sums = dict.fromkeys((*_STATS, "top1"), 0.0)
    count = 0.0
    was_training = em.model.training
    em.model.eval()
    try:
        for n, batch in enumerate(batches):
            if max_batches is not None and n >= max_batches:
                break
            tokens = batch["tokens"].to(device)  # [b, s]
            labels = batch["labels"].to(device)  # [b, s]
            position_ids = batch["position_ids"].to(device)  # [b, s]
            mask = batch["loss_mask"].to(device, torch.float64)  # [b, s]
            logits = em.model(tokens, position_ids, None)  # [b, s, V/tp]
            _, stats = vocab_parallel_shaped_loss(logits, labels, cfg)  # each [b, s]
            for name in _STATS:
                sums[name] += float((stats[name].double() * mask).sum())
            sums["top1"] += float(((stats["target_rank"] == 0).double() * mask).sum())
            count += float(mask.sum())
    finally:
        em.model.train(was_training)
    if count == 0:
        raise ValueError("token_statistics: no unmasked tokens in the batches")
    means = {name: value / count for name, value in sums.items()}
    return {
        "perplexity": math.exp(means["nll"]),
        "nll": means["nll"],
        "entropy": means["entropy"],
        "topk_mass": means["topk_mass"],
        "tail_mass": 1.0 - means["topk_mass"],
        "target_prob": means["target_prob"],
        "target_rank": means["target_rank"],
        "top1_accuracy": means["top1"],
        "num_tokens": count,
    }


def heldout_batches(
    em: EvalModel,
    num_samples: int,
    seq_length: int | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    split: str = "valid",
) -> Iterator[dict[str, torch.Tensor]]:
    """``num_samples`` sequences of the run's held-out data, in batches of ``batch_size``.

    The documents of the run's ``data`` config's ``split`` ("valid", falling back to "test" when
    the config gives valid no share; or "test"), as megatron's GPT dataset cuts them for
    training: never seen by the training split. ``seq_length`` defaults to the run's, ``seed``
    (the shuffle of the held-out samples) to the run's.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cfg = em.config
    datasets = build_gpt_datasets(
        cfg.data,
        sequence_length=seq_length or cfg.train.seq_length,
        seed=cfg.train.seed if seed is None else seed,
        train_samples=1,
        valid_samples=num_samples,
        test_samples=num_samples,
        show_progress=False,
    )
    dataset = datasets.valid if split == "valid" else datasets.test
    if dataset is None and split == "valid":
        dataset = datasets.test
    if dataset is None or len(dataset) == 0:
        raise ValueError(
            f"data.split={cfg.data.split!r} leaves no held-out ({split}) documents; "
            "give valid or test a share"
        )
    count = min(num_samples, len(dataset))
    return (
        collate_samples([dataset[i] for i in range(start, min(start + batch_size, count))])
        for start in range(0, count, batch_size)
    )
