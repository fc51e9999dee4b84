"""Token choice (temperature, top-p) and the sampling loop, on toy logits without a model."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from divprec.eval.nucleus import draw, next_tokens, top_p_filter
from divprec.eval.sampling import Sample, sample

PROBS = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1, 0.0])  # ids 0..4: "abcd\n"; 5: eod, never drawn
CHAR_PROBS = dict(zip("abcd\n", PROBS.tolist(), strict=False))
SQUARED = {ch: p**2 / float((PROBS**2).sum()) for ch, p in CHAR_PROBS.items()}  # temperature 0.5


class ToyTokenizer:
    chars = "abcd\n"
    eod_id = 5

    def encode_batch(self, texts):
        return [[self.chars.index(ch) for ch in text] for text in texts]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i != self.eod_id)


class ToyModel:
    """``logits(tokens)``: fixed log PROBS, or (chain) a near-certain ``last + 1``."""

    tokenizer = ToyTokenizer()

    def __init__(self, chain: bool = False) -> None:
        self.chain = chain

    def logits(self, tokens: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        assert last_only
        if self.chain:
            nxt = (tokens[:, -1] + 1).clamp(max=5)
            return torch.nn.functional.one_hot(nxt, 6).float() * 20.0  # [b, V]
        return PROBS.log().expand(tokens.shape[0], -1).clone()  # [b, V]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = PROBS[None, :5].clone()
    assert torch.allclose(top_p_filter(probs, 1.0), probs)
    kept = top_p_filter(probs, 0.5)  # 0.3 + 0.25 reaches 0.5
    assert torch.allclose(kept, torch.tensor([[0.3, 0.25, 0, 0, 0]]) / 0.55)
    assert torch.allclose(top_p_filter(probs, 0.3), torch.tensor([[1.0, 0, 0, 0, 0]]))
    assert torch.allclose(top_p_filter(probs, 0.31).sum(-1), torch.ones(1))
    assert top_p_filter(probs, 0.31)[0, 1] > 0  # 0.3 < 0.31: the next token is needed
    shuffled = probs[:, [3, 0, 4, 1, 2]]  # order in the vocabulary does not matter
    assert torch.allclose(top_p_filter(shuffled, 0.5), kept[:, [3, 0, 4, 1, 2]])
    with pytest.raises(ValueError):
        top_p_filter(probs, 0.0)


def test_inverse_cdf_draw():
    probs = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    assert draw(probs, torch.tensor([0.0, 0.0])).tolist() == [0, 1]
    assert draw(probs, torch.tensor([0.49, 0.99])).tolist() == [0, 1]
    assert draw(probs, torch.tensor([0.51, 0.5])).tolist() == [2, 1]
    assert draw(probs, torch.tensor([1.0 - 1e-12, 0.999])).tolist() == [2, 1]


def test_greedy_and_temperature_details():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    step = next_tokens(logits, 0.0, 1.0, None)
    assert step.ids.tolist() == [0, 2]
    logp = torch.log_softmax(logits, -1)
    assert torch.allclose(step.logprobs, logp[[0, 1], [0, 2]])
    assert torch.allclose(step.entropies, -(logp.exp() * logp).sum(-1))
    hot = next_tokens(logits, 2.0, 1.0, torch.tensor([0.0, 0.0]))
    assert torch.allclose(hot.logprobs, torch.log_softmax(logits / 2, -1)[[0, 1], hot.ids])


def _frequencies(model, num_prompts, **kwargs) -> tuple[Counter, int]:
    out = sample(model, ["a"] * num_prompts, 1, max_new_tokens=50, stop=None, **kwargs)
    counts = Counter(ch for row in out for text in row for ch in text)
    return counts, sum(counts.values())


@pytest.mark.parametrize(
    ("top_p", "temperature", "expected"),
    [
        (0.5, 1.0, {"a": 0.3 / 0.55, "b": 0.25 / 0.55}),
        (1.0, 1.0, CHAR_PROBS),
        (1.0, 0.5, SQUARED),
    ],
)
def test_sampled_distribution_matches_the_nucleus(top_p, temperature, expected):
    counts, total = _frequencies(ToyModel(), 200, top_p=top_p, temperature=temperature, seed=1)
    assert total == 200 * 50
    assert set(counts) == set(expected)  # nothing outside the nucleus, ever
    for ch, p in expected.items():
        sd = math.sqrt(p * (1 - p) / total)
        assert abs(counts[ch] / total - p) < 5 * sd, (ch, counts[ch] / total, p)


def test_sampling_is_deterministic_and_batch_independent():
    model = ToyModel()
    prompts = ["a", "bc", "a", "dd"]
    first = sample(model, prompts, 5, max_new_tokens=12, seed=3, stop=None)
    assert first == sample(model, prompts, 5, max_new_tokens=12, seed=3, stop=None, batch_size=2)
    assert first != sample(model, prompts, 5, max_new_tokens=12, seed=4, stop=None)
    assert len(first) == 4 and all(len(row) == 5 for row in first)
    assert first[0] != first[2]  # the same prompt twice: different rows, different streams


def test_stopping_at_eod_stop_string_and_length():
    chain = ToyModel(chain=True)  # a -> b -> c -> d -> \n -> eod
    [[eod]] = sample(chain, ["a"], 1, temperature=0.0, stop=None, return_details=True)
    assert isinstance(eod, Sample)
    assert (eod.text, eod.token_ids, eod.finish_reason) == ("bcd\n", [1, 2, 3, 4, 5], "eod")
    assert eod.prompt_ids == [0] and len(eod.logprobs) == len(eod.entropies) == 5
    assert all(lp > -1e-6 for lp in eod.logprobs)  # near-certain tokens
    [[stop]] = sample(chain, ["a"], 1, temperature=0.0, stop="cd", return_details=True)
    assert (stop.text, stop.token_ids, stop.finish_reason) == ("b", [1, 2, 3], "stop")
    [[cut]] = sample(chain, ["a"], 1, temperature=0.0, max_new_tokens=2, return_details=True)
    assert (cut.text, cut.token_ids, cut.finish_reason) == ("bc", [1, 2], "length")
    assert sample(chain, ["ab", "c"], 2, temperature=0.0) == [["cd\n"] * 2, ["d\n"] * 2]
