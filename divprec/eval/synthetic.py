"""Verifiable multi-step integer arithmetic: prompts, worked solutions, and an answer checker.

A problem is an expression of ``steps`` binary operations over integers in [1, max_operand]::

    Q: 3 + 4 * 2 - 5 = ?
    A: 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6.
    Answer: 6

The prompt ends at ``A:``; a completion starts with a space (a word boundary for SentencePiece, so
the prompt's tokens are a prefix of the tokens of prompt + completion). The worked solution does
the multiplications first, then adds and subtracts left to right, one operation per sentence.

Train / eval split: a problem belongs to the eval split iff a hash of its expression falls in one
of :data:`EVAL_BUCKETS` of ``NUM_BUCKETS`` buckets. The split depends on the expression only, not
on the seed or the step range, so no seed of the training text can contain an eval problem.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

ANSWER_MARKER = "Answer:"
NUM_BUCKETS = 8
EVAL_BUCKETS = 1  # 1/8 of all expressions are eval-only
_ANSWER = re.compile(re.escape(ANSWER_MARKER) + r"[ \t]*(-?\d+)(?!\d|\.\d)")
_PROMPT = re.compile(r"^Q: (.+) = \?\nA:$")
SPLITS = ("train", "eval")


@dataclass
class Problem:
    prompt: str
    answer: str
    steps: int


def is_eval_expression(expression: str) -> bool:
    """Whether an expression belongs to the eval split (stable across processes and seeds)."""
    digest = hashlib.blake2b(expression.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % NUM_BUCKETS < EVAL_BUCKETS


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _worked_steps(expression: str) -> tuple[list[str], int]:
    """One sentence per operation (products first, then left to right) and the value."""
    tokens = expression.split()
    values, ops = [int(t) for t in tokens[0::2]], tokens[1::2]
    sentences = []
    # Products: fold each '*' into the term on its left (multiplications never chain here).
    terms, term_ops = [values[0]], []
    for op, v in zip(ops, values[1:], strict=True):
        if op == "*":
            product = terms[-1] * v
            sentences.append(f"{terms[-1]} * {v} = {product}.")
            terms[-1] = product
        else:
            terms.append(v)
            term_ops.append(op)
    total = terms[0]
    for op, v in zip(term_ops, terms[1:], strict=True):
        result = _apply(total, op, v)
        sentences.append(f"{total} {op} {v} = {result}.")
        total = result
    return sentences, total


def _expression_of(problem: Problem) -> str:
    m = _PROMPT.match(problem.prompt)
    if m is None:
        raise ValueError(f"not an ArithmeticTask prompt: {problem.prompt!r}")
    return m.group(1)


def parse_answer(completion: str) -> int | None:
    """The integer after the first answer marker, or None when there is none."""
    m = _ANSWER.search(completion)
    return int(m.group(1)) if m else None


@dataclass
class ArithmeticTask:
    """Deterministic generator and checker of arithmetic problems with 2..4 operations."""

    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}"
            )
        if self.max_operand < 2:
            raise ValueError(f"max_operand must be >= 2, got {self.max_operand}")

    def _expression(self, rng: random.Random) -> tuple[str, int]:
        steps = rng.randint(self.min_steps, self.max_steps)
        parts = [str(rng.randint(1, self.max_operand))]
        previous = ""
        for _ in range(steps):
            # No '*' right after '*': products stay two-operand, numbers stay short.
            op = rng.choice("+-" if previous == "*" else "+-*")
            parts += [op, str(rng.randint(1, self.max_operand))]
            previous = op
        return " ".join(parts), steps

    def generate(self, n: int, split: str = "train") -> list[Problem]:
        """``n`` distinct problems of ``split``; the same arguments give the same list, and
        ``generate(m)`` is a prefix of ``generate(n)`` for m < n."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"divprec-arith/{self.seed}/{split}")  # str seeds are stable
        want_eval = split == "eval"
        seen: set[str] = set()
        problems: list[Problem] = []
        attempts = 0
        while len(problems) < n:
            attempts += 1
            if attempts > 1000 * n + 100_000:
                raise ValueError(f"cannot find {n} distinct {split} problems with {self}")
            expression, steps = self._expression(rng)
            if expression in seen or is_eval_expression(expression) != want_eval:
                continue
            seen.add(expression)
            _, value = _worked_steps(expression)
            problems.append(Problem(f"Q: {expression} = ?\nA:", str(value), steps))
        return problems

    def extract_answer(self, completion: str) -> int | None:
        """The completion's final answer: the integer after its first ``Answer:`` marker."""
        return parse_answer(completion)

    def check(self, problem: Problem, completion: str) -> bool:
        """True iff the completion's first ``Answer: <int>`` equals the problem's answer."""
        answer = self.extract_answer(completion)
        return answer is not None and answer == int(problem.answer)

    def solution_text(self, problem: Problem) -> str:
        """The worked completion of ``problem`` (starts with a space, ends with the answer line)."""
        sentences, value = _worked_steps(_expression_of(problem))
        return f" {' '.join(sentences)}\n{ANSWER_MARKER} {value}\n"

    def write_training_jsonl(self, path: str | Path, n: int) -> Path:
        """``n`` train problems with worked solutions as ``{"text": ...}`` lines."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            for problem in self.generate(n, "train"):
                text = problem.prompt + self.solution_text(problem)
                f.write(json.dumps({"text": text}) + "\n")
        tmp.replace(path)
        return path


def write_training_jsonl(
    path: str | Path, n: int, seed: int = 0, task: ArithmeticTask | None = None
) -> Path:
    """Pre-training text for tools/preprocess_data.py: ``n`` train problems of ``task`` (default
    settings when None) drawn with ``seed``, one ``{"text": prompt + solution}`` per line."""
    base = task or ArithmeticTask()
    seeded = ArithmeticTask(base.min_steps, base.max_steps, base.max_operand, seed)
    return seeded.write_training_jsonl(path, n)
