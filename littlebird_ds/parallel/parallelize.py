"""``parallelize``: the one place that applies tensor and sequence parallelism together.

Order: tensor parallel (swap layers for sharded ones), attention kernels wrapped for head
shards (Ulysses all-to-all under SP, forked dropout RNG in any case), then sequence parallel
(token sharding and token-stream dropout). Apply activation checkpointing after this, then
``deepspeed.initialize(mpu=state)``. The model's forwards are never replaced.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.modeling import LittleBirdForMaskedLM, LittleBirdForQuestionAnswering, LittleBirdModel
from .groups import ParallelState
from .mappings import _size
from .partition import check_parallel_config
from .sequence_parallel import apply_sequence_parallel, wrap_attention
from .tensor_parallel import apply_tensor_parallel


def _base(model: nn.Module) -> LittleBirdModel:
    if isinstance(model, LittleBirdModel):
        return model
    if isinstance(model, (LittleBirdForMaskedLM, LittleBirdForQuestionAnswering)):
        return model.littlebird
    raise TypeError(
        f"parallelize expects LittleBirdModel, LittleBirdForMaskedLM or LittleBirdForQuestionAnswering, got {type(model).__name__}"
    )


def _check_replicas_agree(model: nn.Module, state: ParallelState) -> None:
    """Fail fast when the ranks of a TP x SP group hold different full weights or different
    default RNG states (each rank slices its shard from its own copy, and dropout on replicated
    activations relies on one generator state): one ``[params + 1]`` fp64 fingerprint, reduced
    by max and min over the TP and SP groups."""
    with torch.no_grad():
        sums = [p.detach().double().sum() for p in model.parameters()]
        rng = torch.random.get_rng_state().double()
        rng_fp = (rng * torch.arange(1, rng.numel() + 1, dtype=torch.float64)).sum()
        fp = torch.stack(sums + [rng_fp]).cpu()  # [params + 1]
    for group in (state.tensor_parallel_group, state.sequence_parallel_group):
        if _size(group) == 1:
            continue
        hi, lo = fp.clone(), fp.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
        if not torch.equal(hi[:-1], lo[:-1]):
            raise ValueError(
                "ranks of one tensor/sequence-parallel group hold different model weights; build the model after "
                "torch.manual_seed(same seed) on every rank, or load the same checkpoint, before parallelize()"
            )
        if hi[-1] != lo[-1]:
            raise ValueError(
                "ranks of one tensor/sequence-parallel group have different torch RNG states, so dropout on "
                "replicated activations would draw different masks; call torch.manual_seed(same seed) on every rank "
                "before parallelize()"
            )


def parallelize(model: nn.Module, state: ParallelState) -> nn.Module:
    """Convert a built single-process LittleBird model in place for ``state``'s TP x SP layout
    and return it. Weights are sliced from the model, so every rank must hold the same full
    weights beforehand (same seed, or load a checkpoint first).

    Raises ``ValueError`` when the heads do not split over ``TP * SP`` ranks, or when the ranks of
    a TP x SP group hold different weights or RNG states (seed every rank the same).

    Inputs stay what the single-process model takes (full ``[B, L]`` ids, mask, labels, the same
    on every TP and SP rank); outputs are the single-process outputs (full length, full
    vocabulary) on every rank; see ``sequence_parallel`` for gradients.

    The trivial state (TP = SP = 1) returns the model unchanged.
    """
    base = _base(model)
    if getattr(model, "parallel_state", None) is not None and not model.parallel_state.is_trivial:
        raise ValueError("model is already parallelized; build a fresh model to parallelize it again")
    check_parallel_config(base.config, state.tensor_parallel_size, state.sequence_parallel_size)
    if state.is_trivial:
        model.parallel_state = state
        return model
    _check_replicas_agree(model, state)
    apply_tensor_parallel(base, model, state)
    for layer in base.layers:
        wrap_attention(layer, state)
    apply_sequence_parallel(base, model, state)
    model.parallel_state = state
    if model is not base:
        base.parallel_state = state
    return model
