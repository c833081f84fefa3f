"""Parallelism applied from outside the single-process model, in one order:
tensor parallel + sequence parallel (``parallelize``), then activation checkpointing
(``apply_activation_checkpointing``), then ``deepspeed.initialize(mpu=state)`` (ZeRO, data
parallel). See each module's docstring for the contracts."""

from .checkpointing import apply_activation_checkpointing
from .groups import ParallelState, initialize_model_parallel, single_process_state
from .sequence_parallel import allreduce_sequence_parallel_grads
from .tensor_parallel import (
    TensorParallelCheckpointError,
    check_checkpoint_tensor_parallel_size,
    load_tensor_parallel_state_dict,
    merge_tensor_parallel_state_dicts,
    parallelize,
    shard_state_dict,
    tensor_parallel_checkpoint_metadata,
)

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
