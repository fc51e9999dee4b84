"""The loss.kernel values to test: "compiled" needs the C++ compiler torch.compile uses on CPU."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

HAS_COMPILER = torch.cuda.is_available() or shutil.which(os.environ.get("CXX", "g++")) is not None
needs_compiler = pytest.mark.skipif(
    not HAS_COMPILER, reason="torch.compile on CPU needs a C++ compiler (g++ or $CXX)"
)
# The CPU top-k kernel (divprec/loss/native/block_topk.c) is built with a C compiler.
HAS_C_COMPILER = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))
needs_c_compiler = pytest.mark.skipif(
    not HAS_C_COMPILER, reason="the CPU top-k kernel needs a C compiler (cc, gcc, clang or $CC)"
)
# Both kernels, as pytest parameters.
KERNELS = [pytest.param("compiled", marks=needs_compiler), "eager"]
