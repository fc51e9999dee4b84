"""The arithmetic task: deterministic disjoint splits, correct worked solutions, the checker."""

from __future__ import annotations

import json
import re

import pytest

from divprec.eval.synthetic import (
    ArithmeticTask,
    Problem,
    is_eval_expression,
    parse_answer,
    write_training_jsonl,
)


def _expression(problem: Problem) -> str:
    return re.match(r"^Q: (.+) = \?\nA:$", problem.prompt).group(1)


def test_generation_is_deterministic_and_prefix_stable():
    task = ArithmeticTask(seed=3)
    assert task.generate(50) == ArithmeticTask(seed=3).generate(50)
    assert task.generate(20, "eval") == task.generate(40, "eval")[:20]
    assert task.generate(50) != ArithmeticTask(seed=4).generate(50)


def test_splits_are_disjoint_across_seeds():
    train = {p.prompt for seed in range(3) for p in ArithmeticTask(seed=seed).generate(2000)}
    evals = {p.prompt for seed in range(3) for p in ArithmeticTask(seed=seed).generate(300, "eval")}
    assert not train & evals
    assert all(not is_eval_expression(_expression(Problem(p, "", 0))) for p in train)
    problems = ArithmeticTask().generate(300, "eval")
    assert len({p.prompt for p in problems}) == 300  # distinct


def test_problems_respect_the_settings():
    task = ArithmeticTask(min_steps=1, max_steps=3, max_operand=9, seed=1)
    for p in task.generate(200):
        parts = _expression(p).split()
        operands, ops = [int(x) for x in parts[0::2]], parts[1::2]
        assert p.steps == len(ops) and 1 <= p.steps <= 3
        assert all(1 <= x <= 9 for x in operands)
        assert "* *" not in " ".join(ops)  # products never chain
        assert p.prompt.isascii()


def test_answers_and_worked_solutions_are_correct():
    task = ArithmeticTask()
    for p in task.generate(300) + task.generate(100, "eval"):
        expression = _expression(p)
        assert int(p.answer) == eval(expression)  # Python's precedence is the task's
        solution = task.solution_text(p)
        assert solution.startswith(" ") and solution.endswith(f"\nAnswer: {p.answer}\n")
        sentences = solution.splitlines()[0].strip().split(". ")
        assert len(sentences) == p.steps
        for sentence in sentences:  # every step is a true equation
            lhs, rhs = sentence.rstrip(".").split(" = ")
            assert eval(lhs) == int(rhs), sentence
        assert task.check(p, solution)


def test_checker_accepts_right_and_rejects_wrong_or_missing_answers():
    task = ArithmeticTask()
    p = Problem("Q: 3 + 4 * 2 - 5 = ?\nA:", "6", 3)
    assert task.solution_text(p) == " 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6.\nAnswer: 6\n"
    assert task.check(p, " 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6.\nAnswer: 6\n")
    assert task.check(p, " blah\nAnswer:6")
    assert not task.check(p, " 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 7.\nAnswer: 7\n")
    assert not task.check(p, " 4 * 2 = 8. 3 + 8 = 11. 11 - 5 = 6.")  # no answer line
    assert not task.check(p, "Answer: 66")
    assert not task.check(p, "Answer: 6.5")
    assert not task.check(p, "Answer: 5\nAnswer: 6")  # the first answer counts
    negative = Problem("Q: 2 - 9 = ?\nA:", "-7", 1)
    assert task.check(negative, " 2 - 9 = -7.\nAnswer: -7\n")
    assert not task.check(negative, "Answer: 7")
    assert parse_answer("x\nAnswer: -12\n") == -12 and parse_answer("no answer") is None


def test_training_jsonl(tmp_path):
    task = ArithmeticTask(max_steps=3)
    path = write_training_jsonl(tmp_path / "sub" / "arith.jsonl", 25, seed=7, task=task)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    seeded = ArithmeticTask(max_steps=3, seed=7)
    expected = [p.prompt + seeded.solution_text(p) for p in seeded.generate(25)]
    assert texts == expected
    assert all(t.startswith("Q: ") and t.endswith("\n") and t.isascii() for t in texts)


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        ArithmeticTask(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        ArithmeticTask().generate(3, "test")
