"""Run megatron-core on CPU (gloo) when CUDA is absent.

Why this exists: divprec is meant to be debuggable on a laptop. megatron-core assumes a GPU in a
handful of places (``torch.cuda.current_device()`` as the allocation device, ``device="cuda"``
literals, ``tensor.cuda()``, CUDA RNG states). With those bridged, the CPU path runs *the same
algorithm* as the GPU path -- the same tensor/pipeline-parallel layers, the same collectives
(through gloo instead of NCCL), the same 1F1B schedule, the same RNG-tracker semantics -- only the
device differs. Numerical results of a parallel CPU run therefore match a single-process reference,
which is what the tests check.

``enable_cpu_execution()`` does nothing when CUDA is available. Otherwise it bridges exactly:

Global (process-wide; each is something megatron reaches through no per-module name):
  1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. It is the allocation device of
     buffers and activations in ~25 megatron modules (layers, mappings, DDP buffers, RoPE, p2p...),
     some of them imported lazily, so there is no per-module name to patch.
  2. ``torch.Tensor.cuda()`` moves to CPU (i.e. returns the tensor itself). It is a tensor method
     (``LanguageModule.setup_embeddings_and_output_layer`` with pipeline parallelism and tied
     embeddings, ``tensor_parallel.broadcast_data``), so it can only be patched on the class.
  Both originals can only raise in a CUDA-less process, so no code path that worked before changes.

Per module (the name ``torch`` inside these megatron modules is replaced by a stand-in that is
``torch`` except for the members below):
  3. factory functions ``torch.empty/ones/tensor/zeros`` called with ``device="cuda"`` allocate on
     CPU -- in ``pipeline_parallel.schedules`` (token counter), ``transformer.utils`` (default
     causal mask, built when ``attention_mask`` is None) and ``tensor_parallel.data``
     (``broadcast_data``);
  4. ``torch.cuda.synchronize()`` is a no-op -- in ``pipeline_parallel.p2p_communication`` and
     ``dist_checkpointing.strategies.{filesystem_async,async_utils}`` (the checkpoint writers);
  5. ``torch.cuda.get_rng_state()`` / ``torch.cuda.manual_seed()`` act on the CPU default
     generator -- in ``tensor_parallel.random`` (``CudaRNGStatesTracker.add`` and
     ``model_parallel_cuda_manual_seed``; the latter thus seeds the default generator with the
     data-parallel seed, exactly as it seeds the CUDA generator on GPU).

Model-parallel RNG tracker (``tensor_parallel.random``):
  6. ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read/write the CPU default generator (on a
     CPU-only build the original setter is queued by ``torch.cuda._lazy_call`` and silently never
     runs). Used by ``CudaRNGStatesTracker.fork`` and activation checkpointing.
  7. ``CudaRNGStatesTracker.fork`` is the same save/switch/restore algorithm without the
     "CPU RNG state changed within GPU RNG context" warning: on CPU the tracked generator *is* the
     CPU generator, so the warning would fire on every dropout inside the fork.

Everything is patched where megatron looks it up at call time (module globals, class attributes),
so functions imported by name before this call (``from megatron.core.tensor_parallel import
model_parallel_cuda_manual_seed``) are covered too. Ordering: call it before seeding megatron's RNG
(``model_parallel_cuda_manual_seed``) and building models; ``initialize_model_parallel`` works on
gloo either way. Simplest: first thing in each process.

On CPU the host generator and the "device" generator are one and the same: seeding megatron's RNG
reseeds ``torch``'s default generator (as on GPU it reseeds the CUDA one). Keep host-side
randomness (data order, sampling) on explicit ``torch.Generator`` objects.

What this module does *not* do (the model builder's job): use the local layer specs
(``gpt_layer_specs.get_gpt_layer_local_spec``; Transformer Engine needs CUDA), and set
``TransformerConfig(use_cpu_initialization=True)`` where weights must not depend on the
tensor-parallel size (it initialises the full master weight and splits it; without it each shard is
initialised on its own inside the RNG-tracker fork, which also runs here, as on GPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["enable_cpu_execution", "is_cpu_execution_enabled"]

_log = logging.getLogger(__name__)
_CPU = torch.device("cpu")
_enabled = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    return isinstance(device, torch.device) and device.type == "cuda"


def _cuda_to_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that an explicit ``device="cuda"`` allocates on CPU instead."""

    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return wrapper


class _CpuCudaNamespace(types.ModuleType):
    """Stand-in for ``torch.cuda`` inside selected megatron modules: the CPU meaning of the few
    members they call, everything else forwarded to the real ``torch.cuda``."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:  # only called for names not defined below
        return getattr(torch.cuda, name)

    @staticmethod
    def synchronize(device: Any = None) -> None:
        """CPU ops are synchronous: nothing to wait for."""

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def manual_seed(seed: int) -> None:
        # Only the default CPU generator: the one the GPU path's CUDA generator stands for.
        # (torch.manual_seed would also reseed other backends.)
        torch.default_generator.manual_seed(int(seed))


class _CpuTorchNamespace(types.ModuleType):
    """Stand-in for ``torch`` inside selected megatron modules: ``torch`` itself except that
    ``torch.cuda`` is :class:`_CpuCudaNamespace` and ``device="cuda"`` factories allocate on CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCudaNamespace()
        for name in ("empty", "ones", "tensor", "zeros"):
            setattr(self, name, _cuda_to_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:  # only called for names not set in __init__
        return getattr(torch, name)


# Megatron modules whose ``torch`` name is replaced (see the module docstring, items 3-5).
_MODULES_WITH_CPU_TORCH = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.random",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)


def _cpu_current_device() -> torch.device:
    return _CPU


def _cpu_tensor_cuda(
    self: torch.Tensor,
    device: Any = None,
    non_blocking: bool = False,
    memory_format: torch.memory_format = torch.preserve_format,
) -> torch.Tensor:
    # Like .cuda() on a tensor already on the target device: no copy, same tensor back.
    return self.to(device=_CPU, non_blocking=non_blocking, memory_format=memory_format)


def _cpu_get_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    # torch.get_rng_state() already returns a copy; CPU has no CUDA graphs, so graph_safe is moot.
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_fork(random_module: types.ModuleType) -> Callable[..., Any]:
    default_name = random_module._MODEL_PARALLEL_RNG_TRACKER_NAME

    @contextlib.contextmanager
    def fork(self: Any, name: str = default_name) -> Iterator[None]:
        """Fork the (CPU) RNG state, run the body, store the advanced state under ``name`` and
        restore the original one. Same algorithm as megatron's ``CudaRNGStatesTracker.fork``."""
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        orig_state = _cpu_get_rng_state()
        orig_state_name = self._current_state_name
        if orig_state_name != "default-rng":  # nested fork: remember the outer tracked state
            self.states_[orig_state_name] = orig_state
        _cpu_set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current state name {self._current_state_name} is not the same as the "
                    f"desired state name {name}."
                )
            self.states_[name] = _cpu_get_rng_state()
            if orig_state_name != "default-rng":
                orig_state = self.states_[orig_state_name]
            _cpu_set_rng_state(orig_state)
            self._current_state_name = orig_state_name

    return fork


def is_cpu_execution_enabled() -> bool:
    """Whether :func:`enable_cpu_execution` has patched this process."""
    return _enabled


def enable_cpu_execution() -> bool:
    """Let megatron-core models, RNG tracker and pipeline schedules run on CPU (gloo).

    Returns False and changes nothing when CUDA is available; otherwise applies the bridges listed
    in the module docstring and returns True. Idempotent (later calls return True, patch nothing).
    Call it in every process before building models or seeding megatron's RNG tracker.
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True

    # 1-2: global; see the module docstring for why these cannot be narrower.
    torch.cuda.current_device = _cpu_current_device
    torch.Tensor.cuda = _cpu_tensor_cuda  # type: ignore[method-assign]

    # 3-5: per module.
    cpu_torch = _CpuTorchNamespace()
    for module_name in _MODULES_WITH_CPU_TORCH:
        importlib.import_module(module_name).torch = cpu_torch

    # 6-7: the model-parallel RNG tracker.
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    random.CudaRNGStatesTracker.fork = _make_cpu_fork(random)

    _enabled = True
    _log.info("CUDA not available: megatron-core runs on CPU (divprec.parallel.cpu)")
    return True
