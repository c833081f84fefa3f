"""Dropout randomness under tensor and sequence parallelism.

The default generator stays identical on all TP and SP ranks, so dropout on activations
replicated over TP (hidden states, the packed stream) draws the same masks on every TP rank.
Where ranks hold different shards, :func:`sharded_dropout_rng` forks the generator: per
model-parallel rank for attention probabilities of a head shard (as Megatron's model-parallel RNG
tracker gives), per SP rank for the sequence-sharded token stream. The fork's seed is drawn from
the default generator, which non-reentrant checkpointing restores before recomputation, so
recomputed layers draw the same masks (no tracker state to save).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .groups import ParallelState


@contextmanager
def sharded_dropout_rng(state: ParallelState, enabled: bool, device: torch.device, shard: str = "heads"):
    """Run the block under a generator forked for this rank's shard (see module doc).

    ``shard="heads"``: one stream per model-parallel rank (attention probabilities of a head
    shard). ``shard="sequence"``: one stream per SP rank, shared by the TP ranks of that shard
    (token activations, replicated over TP). The seed is drawn from the default generator of
    ``device``, which is identical on all TP and SP ranks and is restored by non-reentrant
    checkpointing before recomputation, so recomputed masks are the same."""
    if not enabled:
        yield
        return
    if shard == "heads":
        offset = state.model_parallel_rank
    elif shard == "sequence":
        offset = state.tensor_parallel_size * state.sequence_parallel_size + state.sequence_parallel_rank
    else:
        raise ValueError(f"shard must be 'heads' or 'sequence', got {shard!r}")
    seed = int(torch.randint(0, 2**62, (1,), device=device).item()) + 2718 + offset
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        yield
