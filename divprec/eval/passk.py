"""The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n - c, k) / C(n, k).

Given n samples of which c are correct, it is the probability that a random subset of k samples
holds at least one correct one. Computed as a product, never with the binomials themselves:

    C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i)

so n = 128, k = 64 (the paper's Pass@64) stays exact to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if c == 0:
        return 0.0
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def pass_at_k_curve(correct_counts: Sequence[int], n: int, ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over problems, for every k in ``ks``; ``correct_counts[i]`` of n are correct."""
    if not correct_counts:
        raise ValueError("pass_at_k_curve: no problems")
    return {
        int(k): sum(pass_at_k(n, int(c), int(k)) for c in correct_counts) / len(correct_counts)
        for k in ks
    }
