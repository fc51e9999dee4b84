"""Batched autoregressive sampling from an :class:`EvalModel`.

Rows are grouped by prompt length (all samples of a prompt share it), so every row of a batch is
a plain left-aligned sequence: position ids 0..s-1, the implicit causal mask, and the next token
read at the last position. No padding, so no attention mask, which every attention backend
(SDPA, Transformer Engine) handles the same way. Finished rows leave the batch. Decoding uses
megatron-core's static KV cache (divprec.eval.decoding.CachedDecoder) unless ``use_cache=False``
(recompute the whole sequence each step: the reference, and the path for non-megatron models).

Determinism: row (prompt i, sample j) draws its uniforms from its own generator seeded by
(seed, i, j), so its tokens do not depend on the batch it lands in; under tensor parallelism the
gathered logits and the draws are identical on every rank, so all ranks choose the same tokens.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from divprec.eval.decoding import CachedDecoder, Decoder, RecomputeDecoder
from divprec.eval.model import EvalModel
from divprec.eval.nucleus import next_tokens

FINISH_REASONS = ("eod", "stop", "length")


@dataclass
class Sample:
    """One sampled completion.

    ``token_ids`` are the generated tokens including the one that ended it (eod, or the token
    that completed the stop string); ``text`` is their decoding without eod and cut before the
    stop string. ``logprobs`` / ``entropies`` are per generated token, under the
    temperature-scaled model (see divprec.eval.nucleus.next_tokens).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    entropies: list[float]
    finish_reason: str
    prompt_ids: list[int] = field(default_factory=list)


def _row_seed(seed: int, prompt: int, sample: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _row_uniforms(seed: int, prompt: int, sample: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_row_seed(seed, prompt, sample))
    return torch.rand(n, generator=gen, dtype=torch.float64)


@dataclass
class _Row:
    prompt: int
    sample: int
    uniforms: torch.Tensor  # [max_new_tokens]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""


def _finished(row: _Row, decode: Callable[[list[int]], str], eod: int, stop: str | None) -> bool:
    if row.ids[-1] == eod:
        row.finish_reason, row.text = "eod", decode(row.ids[:-1])
        return True
    text = decode(row.ids)
    if stop and stop in text:
        row.finish_reason, row.text = "stop", text[: text.index(stop)]
        return True
    row.text = text
    return False


def _decoder(em: EvalModel, use_cache: bool, batch_size: int, max_length: int) -> Decoder:
    if use_cache and isinstance(em, EvalModel):
        return CachedDecoder(em.model, em.vocab_size, batch_size, max_length)
    return RecomputeDecoder(em.logits)


@torch.no_grad()
def _generate_batch(
    decoder: Decoder,
    tokenizer,
    prompts: torch.Tensor,
    rows: list[_Row],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: str | None,
) -> None:
    """Extend ``rows`` (prompts ``[b, s]``, one per row) until each finishes; fills the rows."""
    device = prompts.device
    active = list(range(len(rows)))
    logits = decoder.prefill(prompts)  # [b, V]
    for t in range(max_new_tokens):
        uniforms = torch.stack([rows[i].uniforms[t] for i in active]).to(device)  # [b_active]
        chosen = next_tokens(logits, temperature, top_p, uniforms)
        ids, logprobs, entropies = (
            x.tolist() for x in (chosen.ids, chosen.logprobs, chosen.entropies)
        )
        still = []
        for k, i in enumerate(active):
            row = rows[i]
            row.ids.append(ids[k])
            row.logprobs.append(logprobs[k])
            row.entropies.append(entropies[k])
            if not _finished(row, tokenizer.decode, tokenizer.eod_id, stop):
                still.append(k)
        if not still or t == max_new_tokens - 1:
            return
        next_ids = chosen.ids
        if len(still) < len(active):
            keep = torch.tensor(still, device=device)
            decoder.keep(keep)
            next_ids = next_ids[keep]
            active = [active[k] for k in still]
        logits = decoder.step(next_ids)


def sample(
    em: EvalModel,
    prompts: list[str],
    num_samples: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    stop: str | None = "\n\n",
    return_details: bool = False,
    use_cache: bool = True,
) -> list[list[str]] | list[list[Sample]]:
    """``num_samples`` completions of every prompt: ``out[i][j]`` is sample j of prompt i.

    A completion ends at the end-of-document token, at ``stop`` (cut off, not included in the
    text), or after ``max_new_tokens``. ``temperature`` 0 is greedy. Up to ``batch_size``
    sequences run through the model at once. With ``return_details`` the entries are
    :class:`Sample` objects (token ids, per-token logprobs and entropies) instead of strings.
    ``use_cache``: KV-cached decoding (the same tokens as recomputation; T token-forwards per
    row instead of ~T^2 / 2). Under tensor parallelism call it on every rank of the group with the same
    arguments: all ranks return the same samples. Puts the model in eval mode for the duration
    (restored after). Only ``em.tokenizer``, ``em.logits`` and (optionally) ``em.model`` /
    ``em.device`` are used.
    """
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("num_samples, batch_size and max_new_tokens must be >= 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    tok = em.tokenizer
    prompt_ids = tok.encode_batch(prompts)
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("sample: empty prompts have no position to predict from")
    device = getattr(em, "device", torch.device("cpu"))
    by_length: dict[int, list[_Row]] = defaultdict(list)
    for i, ids in enumerate(prompt_ids):
        for j in range(num_samples):
            by_length[len(ids)].append(_Row(i, j, _row_uniforms(seed, i, j, max_new_tokens)))

    model = getattr(em, "model", None)
    was_training = bool(model is not None and model.training)
    if model is not None:
        model.eval()
    try:
        for length in sorted(by_length):
            group = by_length[length]
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                prompt_batch = torch.tensor(
                    [prompt_ids[r.prompt] for r in batch], dtype=torch.long, device=device
                )  # [b, length]: equal lengths, no padding
                decoder = _decoder(em, use_cache, len(batch), length + max_new_tokens)
                _generate_batch(
                    decoder, tok, prompt_batch, batch, temperature, top_p, max_new_tokens, stop
                )
    finally:
        if model is not None and was_training:
            model.train()

    out: list[list] = [[None] * num_samples for _ in prompts]
    for group in by_length.values():
        for row in group:
            out[row.prompt][row.sample] = (
                Sample(
                    row.text,
                    row.ids,
                    row.logprobs,
                    row.entropies,
                    row.finish_reason,
                    prompt_ids[row.prompt],
                )
                if return_details
                else row.text
            )
    return out
