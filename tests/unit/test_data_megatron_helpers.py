"""megatron-core's compiled dataset helpers: present on the supported platforms, and a missing
extension is one clear error before any dataset is built."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from divprec.data.megatron_helpers import require_megatron_helpers


def test_the_extension_imports_here():
    require_megatron_helpers()  # the wheels ship it for every supported platform


def test_a_missing_extension_names_the_fix():
    # A real failed import in a fresh interpreter: the module is blocked in sys.modules.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["megatron.core.datasets.helpers_cpp"] = None
        from divprec.data.megatron_helpers import require_megatron_helpers
        require_megatron_helpers()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: megatron-core's compiled dataset helpers"), last
    assert "install megatron-core from its wheel" in last


def test_helpers_compute_the_sample_index():
    """The extension really runs: megatron's sample index for three documents of 5, 3, 4 tokens
    at sequence length 4 (each sample starts where the previous ended, plus one extra token)."""
    import numpy as np
    from megatron.core.datasets import helpers_cpp

    sizes = np.array([5, 3, 4], dtype=np.int32)
    document_idx = np.arange(3, dtype=np.int32)
    index = helpers_cpp.build_sample_idx_int32(sizes, document_idx, 4, 1, 12, True, 1)
    # (document, offset) of each sample boundary: tokens 0, 4, 8 of the 12 concatenated.
    assert index.tolist() == [[0, 0], [0, 4], [2, 0]]
