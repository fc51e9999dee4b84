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
# Both kernels, as pytest parameters.
KERNELS = [pytest.param("compiled", marks=needs_compiler), "eager"]
