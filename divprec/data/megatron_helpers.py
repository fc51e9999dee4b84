"""megatron-core's compiled dataset index helpers, checked once before datasets are built.

megatron-core's GPT and blended datasets call ``megatron.core.datasets.helpers_cpp``, a C++
extension. The megatron-core wheels ship it prebuilt for every platform divprec supports (CPython
3.10-3.13 on Linux x86_64 and aarch64); a source install compiles it when a C++ compiler and
pybind11 are present. Its run-time fallback ``compile_helpers()`` needs a Makefile the package no
longer ships, so a missing extension is reported up front, with the fix, instead of failing deep
inside the first dataset build.
"""

from __future__ import annotations

import importlib

_MODULE = "megatron.core.datasets.helpers_cpp"


def require_megatron_helpers() -> None:
    """Raise RuntimeError naming the fix when the extension does not import."""
    try:
        importlib.import_module(_MODULE)
    except ImportError as err:
        raise RuntimeError(
            f"megatron-core's compiled dataset helpers ({_MODULE}) do not import ({err}): "
            "install megatron-core from its wheel (Linux x86_64/aarch64), or from source with a "
            "C++ compiler and pybind11"
        ) from err
