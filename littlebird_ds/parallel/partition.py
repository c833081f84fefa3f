"""How a full LittleBird state dict splits over tensor-parallel ranks, and back.

Rules by state-dict key (:func:`partition_rule`): Q/K/V and FFN ``intermediate`` split their
output dim, attention/FFN ``output`` their input dim, into equal chunks; the word embeddings, the
tied LM decoder and the LM bias split the vocabulary into contiguous ranges (:func:`vocab_ranges`,
the last one shorter when ``P`` does not divide ``V``). Every other key is replicated. The same
rules drive :func:`~littlebird_ds.parallel.parallelize` (through the layers' ``from_*``
constructors), the converters here, and the TP-size checks of checkpoints.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .groups import ParallelState

#: Key suffix -> (partitioned dim, kind). ``even``: equal chunks; ``vocab``: vocabulary ranges.
_RULES: list[tuple[re.Pattern, int, str]] = [
    (re.compile(r"(^|\.)(attention|pack_attention)\.(query|key|value)\.(weight|bias)$"), 0, "even"),
    (re.compile(r"(^|\.)ffn\.intermediate\.(weight|bias)$"), 0, "even"),
    (re.compile(r"(^|\.)(attention|pack_attention)\.output\.weight$"), 1, "even"),
    (re.compile(r"(^|\.)ffn\.output\.weight$"), 1, "even"),
    (re.compile(r"(^|\.)embeddings\.word_embeddings\.weight$"), 0, "vocab"),
    (re.compile(r"(^|\.)lm_head\.decoder\.weight$"), 0, "vocab"),
    (re.compile(r"(^|\.)lm_head\.bias$"), 0, "vocab"),
]


def partition_rule(key: str) -> tuple[int, str] | None:
    """``(dim, kind)`` for a tensor-parallel-sharded state-dict key, ``None`` if replicated."""
    for pattern, dim, kind in _RULES:
        if pattern.search(key):
            return dim, kind
    return None


def vocab_ranges(vocab_size: int, tp_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` vocabulary range of every TP rank: ``ceil(V / P)`` ids each,
    the last range shorter when ``P`` does not divide ``V`` (no vocabulary padding needed)."""
    chunk = -(-vocab_size // tp_size)
    return [(min(r * chunk, vocab_size), min((r + 1) * chunk, vocab_size)) for r in range(tp_size)]


def check_parallel_config(config, tensor_parallel: int, sequence_parallel: int = 1) -> None:
    """Raise a ``ValueError`` naming the sizes when the model cannot be split this way."""
    H = config.num_attention_heads
    if H % (tensor_parallel * sequence_parallel):
        raise ValueError(
            f"num_attention_heads ({H}) must be divisible by tensor_parallel ({tensor_parallel}) * "
            f"sequence_parallel ({sequence_parallel}) = {tensor_parallel * sequence_parallel}: every rank holds "
            "whole heads; choose sizes whose product divides the head count"
        )
    if config.intermediate_size % tensor_parallel:
        raise ValueError(
            f"intermediate_size ({config.intermediate_size}) must be divisible by tensor_parallel ({tensor_parallel})"
        )


def _shard(key: str, tensor: torch.Tensor, config, tp_rank: int, tp_size: int) -> torch.Tensor:
    rule = partition_rule(key)
    if rule is None or tp_size == 1:
        return tensor
    dim, kind = rule
    if kind == "vocab":
        start, end = vocab_ranges(tensor.shape[dim], tp_size)[tp_rank]
        return tensor.narrow(dim, start, end - start)
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"{key}: dim {dim} of size {tensor.shape[dim]} does not split over {tp_size} TP ranks")
    n = tensor.shape[dim] // tp_size
    return tensor.narrow(dim, tp_rank * n, n)


def shard_state_dict(full_sd: dict, config, tp_rank: int, tp_size: int) -> dict:
    """TP rank ``tp_rank``'s share of a full (single-process) state dict: sharded keys sliced
    by :func:`partition_rule`, replicated keys copied. Keys are unchanged, so the result loads
    with ``load_state_dict(strict=True)`` into a model parallelized with ``tp_size``."""
    check_parallel_config(config, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    return {k: (_shard(k, v, config, tp_rank, tp_size).clone() if torch.is_tensor(v) else v) for k, v in full_sd.items()}


def merge_tensor_parallel_state_dicts(state_dicts: list[dict], config) -> dict:
    """Inverse of :func:`shard_state_dict`: join the state dicts of TP ranks ``0..P-1`` (in
    rank order) into one full state dict. Replicated keys are taken from rank 0."""
    if not state_dicts:
        raise ValueError("no state dicts to merge")
    P = len(state_dicts)
    keys = list(state_dicts[0])
    for r, sd in enumerate(state_dicts[1:], start=1):
        if list(sd) != keys:
            raise ValueError(f"state dict of TP rank {r} has different keys from rank 0")
    out = {}
    for k in keys:
        rule = partition_rule(k)
        if rule is None or P == 1 or not torch.is_tensor(state_dicts[0][k]):
            out[k] = state_dicts[0][k]
        else:
            out[k] = torch.cat([sd[k] for sd in state_dicts], dim=rule[0])
    return out


# ----- checkpoint metadata -----------------------------------------------------------------

CHECKPOINT_FORMAT = "littlebird-ds-tensor-parallel"


def tensor_parallel_checkpoint_metadata(state: ParallelState) -> dict[str, str]:
    """Metadata to store beside a TP-sharded checkpoint (strings, so it also fits safetensors
    metadata): ``format``, ``tensor_parallel_size``, ``tensor_parallel_rank``."""
    return {
        "format": CHECKPOINT_FORMAT,
        "tensor_parallel_size": str(state.tensor_parallel_size),
        "tensor_parallel_rank": str(state.tensor_parallel_rank),
    }


class TensorParallelCheckpointError(ValueError):
    """A checkpoint's tensor-parallel size differs from the run that loads it."""


def check_checkpoint_tensor_parallel_size(metadata: dict | None, tensor_parallel_size: int) -> None:
    """Raise :class:`TensorParallelCheckpointError` when a checkpoint saved with another TP size
    is loaded without conversion. Missing metadata means a full single-process (TP = 1) state dict."""
    saved = int((metadata or {}).get("tensor_parallel_size", 1))
    if saved == tensor_parallel_size:
        return
    if saved == 1:
        fix = f"it is a full (single-process) state dict: shard it with shard_state_dict(full, config, tp_rank, {tensor_parallel_size})"
    else:
        fix = (
            f"convert it first: full = merge_tensor_parallel_state_dicts([state dicts of TP ranks 0..{saved - 1}], config)"
            + ("" if tensor_parallel_size == 1 else f", then shard_state_dict(full, config, tp_rank, {tensor_parallel_size})")
        )
    raise TensorParallelCheckpointError(
        f"checkpoint was saved with tensor_parallel_size={saved} but this run uses tensor_parallel_size="
        f"{tensor_parallel_size}; {fix}"
    )


def load_tensor_parallel_state_dict(model: nn.Module, state_dict: dict, metadata: dict | None, state: ParallelState):
    """``model.load_state_dict(state_dict, strict=True)`` after checking the checkpoint's TP size
    (metadata, then every shape) against this run's."""
    check_checkpoint_tensor_parallel_size(metadata, state.tensor_parallel_size)
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and torch.is_tensor(v) and tuple(v.shape) != tuple(own[k].shape):
            raise TensorParallelCheckpointError(
                f"{k} has shape {tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} in this "
                f"tensor_parallel_size={state.tensor_parallel_size} model; the checkpoint was saved with another "
                "tensor-parallel size: convert it with merge_tensor_parallel_state_dicts / shard_state_dict"
            )
    return model.load_state_dict(state_dict, strict=True)


def tensor_parallel_sizes(vocab_size: int, tensor_parallel_size: int) -> list[int]:
    """Vocabulary shard size of every TP rank (for gathering logits)."""
    return [e - s for s, e in vocab_ranges(vocab_size, tensor_parallel_size)]
