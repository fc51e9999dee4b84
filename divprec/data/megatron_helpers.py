"""Make megatron-core's dataset index helpers importable on any machine.

megatron-core's GPT and blended datasets call ``megatron.core.datasets.helpers``, a thin wrapper
over the C++ extension ``helpers_cpp``. megatron-core 0.16.1 wheels (CPython 3.10-3.13, Linux
x86_64/aarch64) ship that extension prebuilt, and a source install compiles it when a C++
compiler and pybind11 are present; its runtime fallback ``compile_helpers()`` needs a Makefile
the package no longer ships. So nothing is compiled at run time here: if the extension does not
import, an exact NumPy port of the three functions the GPT path uses is registered under the
extension's module name instead (slower on huge blends, same indices; see the unit tests).
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import types

import numpy as np

logger = logging.getLogger(__name__)

_MODULE = "megatron.core.datasets.helpers_cpp"


def _build_sample_idx(
    dtype: type[np.integer],
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    """helpers.cpp ``build_sample_idx``: (document index, offset) where each sample starts.

    Sample j starts at token j * seq_length of the documents concatenated in ``document_idx``
    order; its entry names the document holding its last token (the one at j * seq_length +
    extra - 1), as the C++ walk does, so a sample ending exactly at a document end points there.
    """
    extra = int(add_extra_token_to_sequence)
    total = int(num_epochs) * int(tokens_per_epoch) - extra
    if drop_last_partial_sequence:
        num_samples = total // seq_length
    else:  # the C++ computes this ceil in single precision
        num_samples = int(math.ceil(np.float32(total) / np.float32(seq_length)))

    doc_sizes = np.asarray(sizes)[np.asarray(document_idx)].astype(np.int64)
    # cum[k] = first token of the k-th document of document_idx; shape [num_docs + 1]
    cum = np.concatenate([[0], np.cumsum(doc_sizes)])
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    doc = np.searchsorted(cum, starts + extra - 1, side="right") - 1
    offset = starts - cum[np.minimum(doc, len(doc_sizes) - 1)]
    past_end = doc >= len(doc_sizes)  # last sample of a non-dropped partial sequence
    doc[past_end] = len(doc_sizes) - 1
    offset[past_end] = doc_sizes[-1] - extra

    out = np.zeros((num_samples + 1, 2), dtype=dtype)  # shape [num_samples + 1, 2]
    out[1:, 0] = doc
    out[1:, 1] = offset
    return out


def build_sample_idx_int32(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    return _build_sample_idx(
        np.int32,
        sizes,
        document_idx,
        seq_length,
        num_epochs,
        tokens_per_epoch,
        drop_last_partial_sequence,
        add_extra_token_to_sequence,
    )


def build_sample_idx_int64(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    return _build_sample_idx(
        np.int64,
        sizes,
        document_idx,
        seq_length,
        num_epochs,
        tokens_per_epoch,
        drop_last_partial_sequence,
        add_extra_token_to_sequence,
    )


def build_blending_indices(
    dataset_index: np.ndarray,
    dataset_sample_index: np.ndarray,
    weights: np.ndarray,
    num_datasets: int,
    size: int,
    verbose: bool,
) -> None:
    """helpers.cpp ``build_blending_indices``: fill, in place, which dataset each sample comes
    from (the one furthest below its weight so far; lowest index on ties) and its rank there."""
    w = [float(x) for x in weights[:num_datasets]]
    counts = [0] * num_datasets
    chosen = [0] * size
    rank = [0] * size
    for i in range(size):
        x = float(max(i, 1))
        best, best_err = 0, w[0] * x - counts[0]
        for k in range(1, num_datasets):
            err = w[k] * x - counts[k]
            if err > best_err:
                best, best_err = k, err
        chosen[i], rank[i] = best, counts[best]
        counts[best] += 1
    dataset_index[:size] = chosen
    dataset_sample_index[:size] = rank


def build_exhaustive_blending_indices(
    dataset_index: np.ndarray,
    dataset_sample_index: np.ndarray,
    sizes: np.ndarray,
    num_datasets: int,
) -> None:
    """helpers.cpp ``build_exhaustive_blending_indices``: as above with weights proportional to
    ``sizes``, drawing exactly ``sizes[k]`` samples from dataset k."""
    sizes_ = [int(s) for s in sizes[:num_datasets]]
    total = sum(sizes_)
    w = [s / float(total) for s in sizes_]
    counts = [0] * num_datasets
    unspent = [k for k in range(num_datasets)]
    chosen = [0] * total
    rank = [0] * total
    i = 0
    while unspent and i < total:
        x = float(max(i, 1))
        best, best_err = -1, -math.inf
        for k in unspent:
            err = w[k] * x - counts[k]
            if err > best_err:
                best, best_err = k, err
        chosen[i], rank[i] = best, counts[best]
        counts[best] += 1
        if counts[best] == sizes_[best]:
            unspent.remove(best)
        i += 1
    dataset_index[:total] = chosen
    dataset_sample_index[:total] = rank


def numpy_helpers_module() -> types.ModuleType:
    """A module with the helpers_cpp functions the GPT dataset path needs."""
    module = types.ModuleType(_MODULE, "NumPy port of megatron-core's helpers.cpp (divprec)")
    module.__divprec_numpy_port__ = True  # type: ignore[attr-defined]
    for fn in (
        build_sample_idx_int32,
        build_sample_idx_int64,
        build_blending_indices,
        build_exhaustive_blending_indices,
    ):
        setattr(module, fn.__name__, fn)
    return module


def ensure_megatron_helpers() -> str:
    """Make ``megatron.core.datasets.helpers`` importable; returns "cpp" or "numpy".

    Idempotent; call before building megatron datasets (every rank does it independently, so
    nothing needs coordinating across ranks).
    """
    try:
        module = importlib.import_module(_MODULE)
        return "numpy" if getattr(module, "__divprec_numpy_port__", False) else "cpp"
    except ImportError as err:
        logger.warning(
            "megatron-core's C++ dataset helpers are unavailable (%s); using divprec's NumPy port",
            err,
        )
    import megatron.core.datasets as package

    module = numpy_helpers_module()
    sys.modules[_MODULE] = module
    package.helpers_cpp = module  # type: ignore[attr-defined]
    return "numpy"
