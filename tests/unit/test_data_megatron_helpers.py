"""The NumPy port of megatron's helpers.cpp matches the C++ extension exactly."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from divprec.data import megatron_helpers as port


def _cpp():
    """megatron-core's compiled helpers, loaded from their file (even if the port is registered).

    The megatron-core wheels ship the extension for CPython 3.10-3.13 on Linux x86_64/aarch64,
    the platforms divprec supports: there its absence is a broken install and fails the test.
    """
    import importlib.machinery
    import importlib.util
    import platform
    from pathlib import Path

    import megatron.core.datasets as package

    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    found = [p for p in Path(package.__file__).parent.glob("helpers_cpp*") if p.name.endswith(
        tuple(suffixes))]  # fmt: skip
    if not found:
        shipped = (
            sys.platform == "linux"
            and platform.machine() in ("x86_64", "aarch64")
            and (3, 10) <= sys.version_info[:2] <= (3, 13)
        )
        if shipped:
            pytest.fail("megatron-core's helpers_cpp extension is missing: reinstall megatron-core")
        pytest.skip("megatron-core ships no helpers_cpp wheel for this platform")
    spec = importlib.util.spec_from_file_location("megatron.core.datasets.helpers_cpp", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_idx_hand_example() -> None:
    # Documents of 3 and 5 tokens, samples of 3 (+1 extra) tokens: starts at tokens 0, 3, 6.
    sizes = np.array([3, 5], dtype=np.int32)
    out = port.build_sample_idx_int32(sizes, np.array([0, 1], dtype=np.int32), 3, 1, 8, True, 1)
    assert out.tolist() == [[0, 0], [1, 0], [1, 3]] and out.dtype == np.int32


def test_sample_idx_matches_cpp() -> None:
    cpp = _cpp()
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 25))
        sizes = rng.integers(0, 40, size=n).astype(np.int32)  # includes empty documents
        sizes[0] += 3
        epochs = int(rng.integers(1, 4))
        doc_idx = np.tile(np.arange(n, dtype=np.int32), epochs)
        rng.shuffle(doc_idx)
        seq = int(rng.integers(2, 17))
        for drop_last in (True, False):
            for extra in (0, 1):
                args = (sizes, doc_idx, seq, epochs, int(sizes.sum()), drop_last, extra)
                want = cpp.build_sample_idx_int64(*args)
                got = port.build_sample_idx_int64(*args)
                np.testing.assert_array_equal(got, want)


def test_blending_indices_match_cpp() -> None:
    cpp = _cpp()
    rng = np.random.default_rng(1)
    for _ in range(50):
        k, size = int(rng.integers(1, 5)), int(rng.integers(1, 400))
        weights = rng.random(k)
        weights /= weights.sum()
        outs = []
        for impl in (cpp, port):
            index, sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
            impl.build_blending_indices(index, sample, weights, k, size, False)
            outs.append((index, sample))
        for a, b in zip(*outs, strict=True):
            np.testing.assert_array_equal(a, b)

        sizes = rng.integers(1, 60, size=k).astype(np.int64)
        outs = []
        for impl in (cpp, port):
            index, sample = np.zeros(sizes.sum(), np.int16), np.zeros(sizes.sum(), np.int64)
            impl.build_exhaustive_blending_indices(index, sample, sizes, k)
            outs.append((index, sample))
        for a, b in zip(*outs, strict=True):
            np.testing.assert_array_equal(a, b)


def test_fallback_is_installed_when_the_extension_is_missing() -> None:
    # A fresh interpreter where importing the extension fails, as on a machine without it.
    code = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("ignore")
        sys.modules["megatron.core.datasets.helpers_cpp"] = None  # import now raises ImportError
        import numpy as np
        from divprec.data.megatron_helpers import ensure_megatron_helpers
        assert ensure_megatron_helpers() == "numpy"
        assert ensure_megatron_helpers() == "numpy"
        from megatron.core.datasets import helpers
        sizes = np.array([3, 5], dtype=np.int32)
        out = helpers.build_sample_idx(sizes, np.array([0, 1], dtype=np.int32), 3, 1, 8)
        assert out.tolist() == [[0, 0], [1, 0], [1, 3]], out
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_ensure_reports_cpp_here() -> None:
    _cpp()
    assert port.ensure_megatron_helpers() == "cpp"
