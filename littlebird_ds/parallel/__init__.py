"""Parallelism applied from outside the single-process model, in one order:
tensor parallel + sequence parallel (``parallelize``), then activation checkpointing
(``apply_activation_checkpointing``), then ``deepspeed.initialize(mpu=state)`` (ZeRO, data
parallel). See each module's docstring for the contracts.

Modules, imports pointing one way: ``groups`` and ``mappings`` (communication) <- ``rng``,
``cross_entropy``, ``partition`` <- ``tensor_parallel`` (layers), ``sequence_parallel``
(attention, token sharding) <- ``parallelize`` (the only module that imports both).
"""

from .checkpointing import apply_activation_checkpointing
from .groups import ParallelState, initialize_model_parallel, single_process_state
from .parallelize import parallelize
from .partition import (
    TensorParallelCheckpointError,
    check_checkpoint_tensor_parallel_size,
    load_tensor_parallel_state_dict,
    merge_tensor_parallel_state_dicts,
    shard_state_dict,
    tensor_parallel_checkpoint_metadata,
)
from .sequence_parallel import allreduce_sequence_parallel_grads

__all__ = [
    "ParallelState",
    "TensorParallelCheckpointError",
    "allreduce_sequence_parallel_grads",
    "apply_activation_checkpointing",
    "check_checkpoint_tensor_parallel_size",
    "initialize_model_parallel",
    "load_tensor_parallel_state_dict",
    "merge_tensor_parallel_state_dicts",
    "parallelize",
    "shard_state_dict",
    "single_process_state",
    "tensor_parallel_checkpoint_metadata",
]
