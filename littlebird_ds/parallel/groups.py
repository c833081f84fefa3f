"""Process groups for tensor x sequence x data parallelism, and the ``mpu`` DeepSpeed reads.

Dimension legend: ``TP`` tensor-parallel size, ``SP`` sequence-parallel (Ulysses) size,
``DP`` data-parallel size, ``W = TP * SP * DP`` world size.

Rank order (TP fastest, then SP, then DP)::

    rank = dp_rank * (TP * SP) + sp_rank * TP + tp_rank

so a TP group is ``TP`` consecutive ranks (the most communication-heavy dimension stays on
neighbouring devices), an SP group strides by ``TP``, a DP group by ``TP * SP``.

What each group is for:

* TP group: column/row-parallel linears, vocab-parallel embedding and cross entropy.
  Parameters sharded over it are marked ``tensor_model_parallel = True`` (DeepSpeed counts
  them on every TP rank in the gradient norm, replicated ones once).
* SP group: the Ulysses all-to-all. Parameters are replicated over it but each rank sees
  only its slice of the sequence, so its gradients are *partial*: the true gradient is their
  sum over the SP group.
* DP group (pure data parallel): different samples. DeepSpeed's batch-size arithmetic uses it.
* Sequence-data-parallel group (``SP x DP``, ranks with the same TP index): DeepSpeed
  all-reduces gradients and partitions ZeRO state over it, dividing by ``DP`` only (it sums
  over SP), which is exactly what the partial SP gradients need.

``ParallelState`` is also the ``mpu`` object: ``deepspeed.initialize(..., mpu=state)``. For
DeepSpeed "model parallel" means tensor parallel (checkpoint files ``mp_rank_XX`` are per TP
rank; SP ranks hold identical weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class ParallelState:
    """This rank's place in the ``TP x SP x DP`` grid and its process groups.

    A group is ``None`` only in the trivial single-process state (``single_process_state()``),
    where every size is 1 and every rank 0; communication helpers treat a ``None`` group or a
    group of size 1 as "no communication", so callers need no branches.
    """

    tensor_parallel_size: int = 1
    sequence_parallel_size: int = 1
    data_parallel_size: int = 1
    tensor_parallel_rank: int = 0
    sequence_parallel_rank: int = 0
    data_parallel_rank: int = 0
    tensor_parallel_group: object = None
    sequence_parallel_group: object = None
    data_parallel_group: object = None
    sequence_data_parallel_group: object = None
    tensor_parallel_ranks: list[int] = field(default_factory=lambda: [0])
    data_parallel_ranks: list[int] = field(default_factory=lambda: [0])

    def __deepcopy__(self, memo):
        return self  # process groups are handles: a copied model shares them

    # ----- convenience -------------------------------------------------------------------
    @property
    def model_parallel_rank(self) -> int:
        """Rank among the ``TP * SP`` ranks that share one sample (used to fork dropout seeds)."""
        return self.sequence_parallel_rank * self.tensor_parallel_size + self.tensor_parallel_rank

    @property
    def is_trivial(self) -> bool:
        return self.tensor_parallel_size == 1 and self.sequence_parallel_size == 1

    # ----- Megatron-style mpu interface (what deepspeed.initialize(mpu=...) calls) -------
    def get_model_parallel_rank(self) -> int:
        return self.tensor_parallel_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tensor_parallel_size

    def get_model_parallel_group(self):
        return self.tensor_parallel_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group."""
        return self.tensor_parallel_ranks[0]

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_rank

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_group(self):
        return self.data_parallel_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.data_parallel_ranks)

    def get_sequence_parallel_rank(self) -> int:
        return self.sequence_parallel_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.sequence_parallel_size

    def get_sequence_parallel_group(self):
        return self.sequence_parallel_group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.data_parallel_rank * self.sequence_parallel_size + self.sequence_parallel_rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.data_parallel_size * self.sequence_parallel_size

    def get_sequence_data_parallel_group(self):
        return self.sequence_data_parallel_group

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def single_process_state() -> ParallelState:
    """The trivial state (TP = SP = DP = 1, no process groups): ``parallelize`` leaves the
    model untouched and every mapping is the identity."""
    return ParallelState()


def initialize_model_parallel(tensor_parallel: int = 1, sequence_parallel: int = 1) -> ParallelState:
    """Build the TP, SP, DP and SP x DP groups over the whole world (see the module docstring
    for the rank order) and return this rank's :class:`ParallelState`.

    Needs ``torch.distributed`` initialised (every rank must call this, in the same order, as
    ``new_group`` is collective). Raises ``ValueError`` when the world size is not divisible by
    ``tensor_parallel * sequence_parallel``.
    """
    for name, v in (("tensor_parallel", tensor_parallel), ("sequence_parallel", sequence_parallel)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not dist.is_available() or not dist.is_initialized():
        if tensor_parallel == 1 and sequence_parallel == 1:
            return single_process_state()
        raise RuntimeError(
            "initialize_model_parallel needs torch.distributed initialised first "
            "(torch.distributed.init_process_group or deepspeed.init_distributed)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, sp = tensor_parallel, sequence_parallel
    if world % (tp * sp):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel ({tp}) * sequence_parallel ({sp}) = {tp * sp}; "
            f"launch a multiple of {tp * sp} processes or choose sizes whose product divides {world}"
        )
    dp = world // (tp * sp)
    tp_rank, sp_rank, dp_rank = rank % tp, (rank // tp) % sp, rank // (tp * sp)

    def idx(d: int, s: int, t: int) -> int:
        return d * tp * sp + s * tp + t

    state = ParallelState(tp, sp, dp, tp_rank, sp_rank, dp_rank)
    # new_group is collective: every rank creates every group, in the same order.
    for d in range(dp):
        for s in range(sp):
            ranks = [idx(d, s, t) for t in range(tp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                state.tensor_parallel_group, state.tensor_parallel_ranks = g, ranks
    for d in range(dp):
        for t in range(tp):
            ranks = [idx(d, s, t) for s in range(sp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                state.sequence_parallel_group = g
    for s in range(sp):
        for t in range(tp):
            ranks = [idx(d, s, t) for d in range(dp)]
            g = dist.new_group(ranks)
            if rank in ranks:
                state.data_parallel_group, state.data_parallel_ranks = g, ranks
    for t in range(tp):
        ranks = [idx(d, s, t) for d in range(dp) for s in range(sp)]
        g = dist.new_group(ranks)
        if rank in ranks:
            state.sequence_data_parallel_group = g
    return state
