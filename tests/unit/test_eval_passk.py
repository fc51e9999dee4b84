"""pass@k: the unbiased estimator against brute-force enumeration, edge cases, large n."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from divprec.eval.passk import pass_at_k, pass_at_k_curve


def _brute_force(n: int, c: int, k: int) -> Fraction:
    """Share of k-subsets of n samples (the first c correct) that hold a correct one."""
    hits = total = 0
    for subset in itertools.combinations(range(n), k):
        total += 1
        hits += any(i < c for i in subset)
    return Fraction(hits, total)


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration_for_small_n(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = _brute_force(n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12), (n, c, k)


def test_matches_exact_binomials():
    for n, c, k in [(20, 3, 5), (30, 1, 1), (40, 10, 20), (50, 49, 1), (16, 4, 16)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_edge_cases_are_exact():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c = 4 < k: every 5-subset has a correct sample
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the accuracy


def test_stable_for_paper_sizes():
    # n = 128, k = 64: C(128, 64) ~ 2.4e37; the product form keeps full float precision.
    for c in (1, 2, 5, 32, 64):
        exact = 1 - Fraction(math.comb(128 - c, 64), math.comb(128, 64))
        got = pass_at_k(128, c, 64)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(float(exact), rel=1e-12), c
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)
    assert pass_at_k(10_000, 3, 1) == pytest.approx(3e-4)


def test_monotone_in_k_and_c():
    values = [pass_at_k(128, 5, k) for k in range(1, 129)]
    assert all(a <= b + 1e-15 for a, b in itertools.pairwise(values))
    values = [pass_at_k(128, c, 8) for c in range(129)]
    assert all(a <= b + 1e-15 for a, b in itertools.pairwise(values))


def test_rejects_invalid_arguments():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_curve_is_the_mean_over_problems():
    curve = pass_at_k_curve([0, 2, 4], 4, [1, 2, 4])
    assert curve[1] == pytest.approx((0 + 0.5 + 1) / 3)
    assert curve[2] == pytest.approx((0 + (1 - 1 / 6) + 1) / 3)
    assert curve[4] == pytest.approx(2 / 3)
    assert list(curve) == [1, 2, 4]
    with pytest.raises(ValueError):
        pass_at_k_curve([], 4, [1])
