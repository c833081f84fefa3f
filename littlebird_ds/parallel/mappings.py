"""Communication as small autograd functions whose names say the direction (Megatron style).

Dimension legend: ``B`` batch, ``H`` heads held before the op, ``t`` local sequence length,
``l = P * t`` full sequence length, ``dh`` head size, ``P`` size of the group (TP or SP),
``V`` vocabulary.

Gradient conventions (what the backward assumes about the incoming gradient):

* Tensor parallel (Megatron): a tensor replicated over TP carries the same, full gradient on
  every TP rank. ``copy_to`` (identity / all-reduce) enters a TP region, ``reduce_from``
  (all-reduce / identity) leaves it; ``scatter_to`` / ``gather_from`` split / join the last dim.
* Sequence parallel (Ulysses): a tensor replicated over SP carries a *partial* gradient (the
  true one is the sum over SP ranks), because parameters are replicated while each rank sees
  only its tokens; DeepSpeed sums gradients over SP. ``gather_heads_from_sequence_parallel_region``
  (all-gather / reduce-scatter) is the one op that joins head shards into a replicated tensor
  under that convention. ``gather_from_sequence_parallel_region`` (all-gather / split) is for
  model *outputs* whose downstream is the same parameter-free computation on every rank (a
  loss on gathered logits), so the incoming gradient is already whole on every rank.

Every function takes the process group; a ``None`` group or a group of one rank makes it the
identity, so single-process code runs the same lines.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order. ``sizes`` (per rank, along
    ``dim``) allows uneven shards: they are padded to the largest for the collective."""
    P = _size(group)
    dim = dim % x.dim()
    top = max(sizes) if sizes is not None else x.shape[dim]
    if x.shape[dim] < top:
        pad_shape = list(x.shape)
        pad_shape[dim] = top - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(P)]
    dist.all_gather(parts, x, group=group)
    if sizes is not None:
        parts = [p.narrow(dim, 0, n) for p, n in zip(parts, sizes)]
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group, sizes: list[int] | None = None) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (equal chunks, or ``sizes`` per rank)."""
    P, r = _size(group), _rank(group)
    if sizes is None:
        if x.shape[dim] % P:
            raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split evenly over {P} ranks")
        sizes = [x.shape[dim] // P] * P
    start = sum(sizes[:r])
    return x.narrow(dim, start, sizes[r]).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return _split(x, dim, group, sizes)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.group, ctx.sizes), None, None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return _all_gather(x, dim, group, sizes)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group, ctx.sizes), None, None, None


class _GatherHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        # Reduce-scatter, written as all-reduce + split: gloo has no reduce_scatter.
        return _split(_all_reduce(g, ctx.group), 1, ctx.group), None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x [P, ...]``: chunk ``j`` goes to rank ``j``; the result's chunk ``i`` came from rank ``i``."""
    x = x.contiguous()  # before empty_like, which would copy a permuted view's strides
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    P = _size(group)
    B, H, t, dh = x.shape
    if H % P:
        raise ValueError(f"{H} heads do not split over {P} sequence-parallel ranks")
    x = x.view(B, P, H // P, t, dh).permute(1, 0, 2, 3, 4)  # [B, H, t, dh] -> [P, B, H/P, t, dh]
    y = _all_to_all(x, group)  # [P (source rank = sequence chunk), B, H/P, t, dh]
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * t, dh)  # -> [B, H/P, l, dh]


def _head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    P = _size(group)
    B, h, l, dh = x.shape
    x = x.view(B, h, P, l // P, dh).permute(2, 0, 1, 3, 4)  # [B, H/P, l, dh] -> [P, B, H/P, t, dh]
    y = _all_to_all(x, group)  # [P (source rank = head chunk), B, H/P, t, dh]
    return y.permute(1, 0, 2, 3, 4).reshape(B, P * h, l // P, dh)  # -> [B, H, t, dh]


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, g):
        return _head_to_seq(g, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_head(g, ctx.group), None


# ----- tensor parallel ----------------------------------------------------------------------


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward identity, backward all-reduce: enter a TP region with a replicated tensor."""
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward all-reduce (sum of partial results), backward identity: leave a TP region."""
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group, sizes: list[int] | None = None) -> torch.Tensor:
    """Forward: this rank's chunk of the last dim; backward: all-gather the last dim."""
    return x if _size(group) == 1 else _ScatterToRegion.apply(x, group, -1, sizes)


def gather_from_tensor_parallel_region(x: torch.Tensor, group, sizes: list[int] | None = None) -> torch.Tensor:
    """Forward: all-gather the last dim (``sizes`` for uneven shards, e.g. vocab ranges);
    backward: keep this rank's chunk of the (replicated) gradient."""
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group, -1, sizes)


# ----- sequence parallel (Ulysses) ----------------------------------------------------------


def scatter_to_sequence_parallel_region(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Forward: this rank's contiguous chunk of the sequence dim; backward: all-gather it."""
    return x if _size(group) == 1 else _ScatterToRegion.apply(x, group, dim, None)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Forward: all-gather sequence shards ``[B, t, ...] -> [B, l, ...]``; backward: keep this
    rank's chunk. For outputs whose downstream is identical on every SP rank (see module doc)."""
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group, dim, None)


def gather_rows_from_sequence_parallel_region(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Forward: concatenate every SP rank's rows ``[M_r, ...] -> [sum(M_r), ...]`` in rank order
    (``sizes`` = every rank's ``M_r``, known to all ranks); backward: keep this rank's rows. For
    outputs whose downstream is identical on every SP rank (see module doc), such as the
    masked-token logits of a batch whose labels every rank holds."""
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group, 0, list(sizes))


def gather_heads_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: all-gather head shards ``[B, H/P, s, dh] -> [B, H, s, dh]``; backward:
    reduce-scatter (the replicated result carries partial gradients, see module doc)."""
    return x if _size(group) == 1 else _GatherHeads.apply(x, group)


def reduce_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward all-reduce, backward identity: a loss summed over sequence shards, where each
    rank back-propagates only its own share (partial-gradient convention)."""
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """Ulysses all-to-all ``[B, H, t, dh]`` (sequence-sharded) -> ``[B, H/P, l, dh]``
    (head-sharded, every position). Rank ``r`` keeps heads ``r*H/P : (r+1)*H/P``.
    Backward is :func:`head_to_seq`."""
    return x if _size(group) == 1 else _SeqToHead.apply(x, group)


def head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`seq_to_head`: ``[B, H/P, l, dh]`` -> ``[B, H, t, dh]``."""
    return x if _size(group) == 1 else _HeadToSeq.apply(x, group)
