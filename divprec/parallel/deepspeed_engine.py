"""DeepSpeed owns the optimizer: ZeRO partitions, data-parallel gradient reduction, clipping, step.

megatron-core's schedule owns microbatching and pipeline communication; DeepSpeed is told
gradient_accumulation_steps = 1 (the schedule already scales each microbatch loss by
1 / num_microbatches). How one step's accumulated gradients reach DeepSpeed (:class:`GradientSync`):
- ZeRO-1: the schedule calls the bare model, gradients accumulate (in fp32, below), and one
  ``engine.allreduce_gradients()`` after the schedule reduces them over data parallel. This works
  with pipeline parallelism, where DeepSpeed's output hooks do not fire on every stage.
- ZeRO-2 (never with pipeline parallelism): gradients are reduce-scattered by DeepSpeed's
  per-parameter hooks during backward; the schedule calls the engine and its ``no_sync_func``
  turns DeepSpeed's accumulation boundary off for every microbatch but the last.
Under bf16 the sum over microbatches and the data-parallel reduction are fp32 (see
:func:`deepspeed_config`): with ZeRO-1 DeepSpeed's BF16_Optimizer moves each microbatch's gradient
out of ``param.grad`` into an fp32 buffer per parameter and all-reduces that buffer; with ZeRO-2
each microbatch's gradient is reduce-scattered in fp32 and added to an fp32 gradient partition.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core import parallel_state

from divprec.parallel.config import DEFAULT_REDUCE_BUCKET, OptimConfig, reduce_bucket_elements
from divprec.parallel.tp_grads import install_tensor_parallel_grad_hooks


class MegatronMpu:
    """The model-parallel-unit interface DeepSpeed expects, over megatron-core's parallel_state.

    The "model parallel" group is tensor x pipeline: DeepSpeed sums the gradient norm over it.
    The "model parallel rank" is the tensor rank: DeepSpeed counts a replicated (not
    tensor-parallel) parameter's gradient only where it is 0, once per pipeline stage.
    """

    def get_model_parallel_group(self):
        return parallel_state.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return (
            parallel_state.get_tensor_model_parallel_world_size()
            * parallel_state.get_pipeline_model_parallel_world_size()
        )

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()


def deepspeed_config(
    optim: OptimConfig,
    zero_stage: int,
    micro_batch_size: int,
    bf16: bool,
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET,
) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,  # microbatches are megatron-core's schedule's
        "gradient_clipping": optim.clip_grad,
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": reduce_bucket_size},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
        # Skip a step whose gradients are not finite (explicit: under bf16, DeepSpeed before 0.17
        # applied it). immediate_grad_update: under bf16 + ZeRO-1 (DeepSpeed's BF16_Optimizer) a
        # hook adds each microbatch's bf16 gradient into the fp32 buffer as backward produces it;
        # without it the buffer is filled only by engine.backward, which the schedule never calls.
        "bf16": {"enabled": bf16, "check_grad_overflow": True, "immediate_grad_update": True},
        # Gradients are accumulated over the microbatches and reduced over data parallel in fp32
        # (DeepSpeed's default under bf16 is bf16 for both: terms under half a bf16 step of the
        # running sum would be lost). No effect in fp32.
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,  # divprec's metrics callbacks report progress
        "wall_clock_breakdown": False,
    }


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Norm weights, biases and the router's expert bias are not decayed.
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name


def is_expert_parallel_param(param: torch.nn.Parameter) -> bool:
    """megatron-core's mark on an expert weight split over expert-parallel ranks (EP > 1), which
    DeepSpeed also reads as "a MoE parameter" (deepspeed.moe.utils.is_moe_param)."""
    return not getattr(param, "allreduce", True)


def expert_group_name(expert_parallel: int) -> str:
    """The name DeepSpeed gives an expert-parallel group of this size (and its ZeRO groups)."""
    return f"ep_size_{expert_parallel}"


def register_expert_groups(model: torch.nn.Module) -> str | None:
    """Give DeepSpeed megatron-core's expert groups; name the model's expert parameters after them.

    DeepSpeed reduces a MoE parameter's gradient over, and partitions its ZeRO state over, the
    expert-data-parallel group it finds under the parameter's ``group_name``. DeepSpeed's own group
    builder would lay ranks out its way; megatron-core's groups (tp-ep-dp order) are the ones the
    experts were placed by, so they are handed over as they are. Returns the group name, or None
    when the model has no expert-parallel parameters. Collectives: none.
    """
    from deepspeed.utils import groups

    experts = [param for param in model.parameters() if is_expert_parallel_param(param)]
    if not experts:
        return None
    name = expert_group_name(parallel_state.get_expert_model_parallel_world_size())
    for registry, ranks, group in (
        (
            groups._EXPERT_PARALLEL_GROUP,
            groups._EXPERT_PARALLEL_GROUP_RANKS,
            parallel_state.get_expert_model_parallel_group(),
        ),
        (
            groups._EXPERT_DATA_PARALLEL_GROUP,
            groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
            parallel_state.get_expert_data_parallel_group(),
        ),
    ):
        # Replaces a previous world's group of the same name (a rebuilt world in one process).
        registry[name] = group
        ranks[name] = torch.distributed.get_process_group_ranks(group)
    for param in experts:
        param.group_name = name
    return name


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, expert_group: str | None = None
) -> list[dict[str, Any]]:
    """AdamW's groups: decayed or not, and expert-parallel parameters apart (DeepSpeed's MoE
    groups, ``moe=True`` and ``name`` the expert group, which ZeRO partitions over that group)."""
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (is_expert_parallel_param(param), _no_weight_decay(name, param))
            buckets.setdefault(key, []).append(param)
    groups = [{"params": buckets.get((False, False), []), "weight_decay": weight_decay}]
    for expert, no_decay in ((False, True), (True, False), (True, True)):
        params = buckets.get((expert, no_decay))
        if not params:
            continue
        group: dict[str, Any] = {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        if expert:
            if expert_group is None:
                raise ValueError("expert-parallel parameters need an expert group name")
            group.update(moe=True, name=expert_group)
        groups.append(group)
    return groups


@contextlib.contextmanager
def _engine_knowing_experts() -> Iterator[None]:
    """deepspeed.initialize building an engine that knows megatron-core's experts.

    DeepSpeed turns on its MoE handling (expert groups in ZeRO, the expert broadcast) only when
    the model contains its own ``deepspeed.moe.layer.MoE`` class. The engine class used while this
    block runs is DeepSpeed's with one change: a model with expert-parallel parameters counts as
    a MoE model. deepspeed.initialize itself runs unchanged.
    """
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    class EngineKnowingExperts(DeepSpeedEngine):
        def _configure_distributed_model(self, model):
            super()._configure_distributed_model(model)
            if any(is_expert_parallel_param(param) for param in self.module.parameters()):
                self.has_moe_layers = True

    original = deepspeed.DeepSpeedEngine
    deepspeed.DeepSpeedEngine = EngineKnowingExperts
    try:
        yield
    finally:
        deepspeed.DeepSpeedEngine = original


def build_engine(
    model: torch.nn.Module,
    optim: OptimConfig,
    zero_stage: int,
    micro_batch_size: int,
    bf16: bool,
):
    """Wrap the model in a DeepSpeed engine whose ZeRO optimizer is AdamW.

    Expert-parallel parameters (parallel.expert > 1) are DeepSpeed MoE parameters: reduced over
    and partitioned over megatron-core's expert-data-parallel group (:func:`register_expert_groups`).
    Collectives: DeepSpeed broadcasts the parameters over the data-parallel group (experts over
    the expert-data-parallel group) and builds its ZeRO partitions.
    """
    import deepspeed

    # DeepSpeed asserts LOCAL_RANK; a process started without a launcher is local rank 0.
    os.environ.setdefault("LOCAL_RANK", "0")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    fused = next(model.parameters()).is_cuda
    expert_group = register_expert_groups(model)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, optim.weight_decay, expert_group),
        lr=optim.lr,
        betas=(optim.adam_beta1, optim.adam_beta2),
        eps=optim.adam_eps,
        fused=fused,
    )
    with _engine_knowing_experts():
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            mpu=MegatronMpu(),
            config=deepspeed_config(
                optim,
                zero_stage,
                micro_batch_size,
                bf16,
                reduce_bucket_elements(
                    sum(p.numel() for p in model.parameters() if p.requires_grad)
                ),
            ),
        )
    if engine.has_moe_layers != (expert_group is not None):
        raise RuntimeError(
            "DeepSpeed did not take megatron-core's expert parameters as MoE parameters "
            f"(has_moe_layers={engine.has_moe_layers}): this DeepSpeed version builds its engine "
            "differently; run with parallel.expert=1"
        )
    _link_optimizer_state(engine.optimizer)
    return engine


def _link_optimizer_state(zero_optimizer) -> None:
    """Create AdamW's state now and let DeepSpeed map it to the parameters.

    torch's AdamW creates its state at the first step, and DeepSpeed maps the state of every
    parameter group (for deepspeed.utils.safe_get/set_full_optimizer_state) right after the
    first group's first step, before the other groups have state: their moments would never be
    reachable. The state created here is what AdamW would create (zeros, step 0), so training is
    unchanged, and checkpoints can be saved or loaded at any step, even before the first.
    """
    inner = zero_optimizer.optimizer  # the client AdamW over ZeRO's flat fp32 partitions
    for group in inner.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for param in group["params"]:
            state = inner.state[param]
            if not state:
                state["step"] = (
                    torch.zeros((), dtype=torch.float32, device=param.device)
                    if on_device
                    else torch.tensor(0.0)
                )
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    zero_optimizer._lazy_init_hp_params_optimizer_state()


def discard_gradients(engine) -> None:
    """Drop this step's accumulated gradients without an update (weights and Adam state stay).

    What DeepSpeed's ZeRO-1/2 optimizer itself does when it finds a non-finite gradient norm
    (the overflow branch of ``DeepSpeedZeroOptimizer.step`` in deepspeed 0.19): gradients set to
    None and the reduced partitions released. Every rank must call it for the same step.
    """
    zero = engine.optimizer
    zero.zero_grad(set_to_none=True)
    release = getattr(zero, "_release_preflattened_grad_buffers", None)
    if release is not None:
        release()
    for key in list(getattr(zero, "averaged_gradients", {})):
        zero.averaged_gradients[key] = None
        if hasattr(zero, "all_grad_tensors"):
            zero.all_grad_tensors[key] = None


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


class ScheduleView:
    """The engine as megatron-core's schedule sees it: callable, with ``.module`` the GPT model.

    The schedule finds ``config`` and ``set_input_tensor`` by walking ``.module``; the engine itself
    has a ``config`` (DeepSpeed's dict), which would shadow the TransformerConfig.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.module = engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)


def _pipeline_tied_embedding(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """This stage's copy of the tied embedding weight, when pipeline stages share one (PP > 1
    with tied embeddings, on the first or last stage); else None."""
    if not getattr(model, "share_embeddings_and_output_weights", False):
        return None
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return None
    return model.shared_embedding_or_output_weight()


class GradientSync:
    """The one owner of how a step's gradients are reduced; :meth:`attach` wires it.

    1. Tensor parallel: parameters replicated over TP ranks but fed partial inputs (norms under
       sequence parallelism, QK norms) get a hook that sums their gradient over the TP group
       per microbatch (divprec.parallel.tp_grads).
    2. Data parallel: DeepSpeed (see the module doc): ZeRO-1 reduces once after the schedule
       (:meth:`after_backward`); ZeRO-2 reduce-scatters in backward, with the accumulation boundary
       set by :meth:`no_sync`, the schedule's ``no_sync_func``.
    3. megatron-core's own ``finalize_model_grads_func`` and ``grad_scale_func`` are off: DeepSpeed
       reduces and clips, and the schedule already scales each microbatch loss by
       1 / num_microbatches. The one part of it divprec needs, the tied embedding's gradient
       shared between the first and last pipeline stage, is done here before the reduction.
    """

    def __init__(self, engine, zero_stage: int) -> None:
        self.engine = engine
        self.reduce_in_backward = zero_stage >= 2
        self.tied_embedding: torch.nn.Parameter | None = None

    @classmethod
    def attach(cls, engine, model: torch.nn.Module, zero_stage: int, tensor_group) -> GradientSync:
        """Install the TP hooks on ``model`` and point megatron's schedule config at this sync."""
        install_tensor_parallel_grad_hooks(model, tensor_group, model.config.sequence_parallel)
        sync = cls(engine, zero_stage)
        sync.tied_embedding = _pipeline_tied_embedding(model)
        if sync.tied_embedding is not None and not parallel_state.is_pipeline_first_stage():
            # The last stage's copy: DeepSpeed's gradient norm counts the first stage's only.
            sync.tied_embedding.ds_pipe_replicated = True
        model.config.no_sync_func = sync.no_sync
        model.config.finalize_model_grads_func = None
        model.config.grad_scale_func = None
        return sync

    def schedule_model(self):
        """What the schedule calls for each microbatch."""
        return ScheduleView(self.engine) if self.reduce_in_backward else self.engine.module

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """The schedule's ``no_sync_func``: these microbatches' gradients are only accumulated."""
        if not self.reduce_in_backward:
            yield
            return
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def after_backward(self) -> None:
        """After the schedule: reduce over data parallel (ZeRO-1: one all-reduce of the grads).

        Under bf16, DeepSpeed's BF16_Optimizer holds one flat fp32 gradient buffer per parameter
        group; a bucket of one element all-reduces each buffer in place, where a larger bucket
        flattens them together into a copy of every gradient (fp32 ZeRO-1 ignores the size).
        """
        if self.tied_embedding is not None:
            self._sum_tied_embedding_grads()
        if not self.reduce_in_backward:
            self.engine.allreduce_gradients(bucket_size=1)

    def _sum_tied_embedding_grads(self) -> None:
        """Tied embeddings under pipeline parallelism: the first stage's input embedding and the
        last stage's output layer are two copies of one weight. Each holds only its own use's
        gradient; both get the sum (megatron-core's embedding-group all-reduce, which its
        finalize_model_grads would do), so both copies take the same update.

        Collectives: one all-reduce SUM over the embedding group (the first and last stage).
        """
        param = self.tied_embedding
        # BF16_Optimizer (bf16, ZeRO-1) moves each microbatch's gradient into an fp32 buffer.
        grad = getattr(param, "_hp_grad", None)
        if grad is None:
            grad = param.grad
        if grad is None:
            raise RuntimeError("the tied embedding has no accumulated gradient to share")
        torch.distributed.all_reduce(grad, group=parallel_state.get_embedding_group())
