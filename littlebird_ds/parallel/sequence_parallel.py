"""DeepSpeed-Ulysses sequence parallelism for LittleBird, composed with tensor parallelism.

Dimension legend: ``B`` batch, ``L`` input length, ``l`` padded length (a multiple of
``lcm(block_size, P)``), ``P`` sequence-parallel size, ``t = l / P`` tokens on this rank,
``s`` packed length, ``d`` hidden size, ``H`` heads on this TP rank, ``h = H / P`` heads this
rank attends with, ``dh`` head size, ``V`` vocabulary.

How inputs are passed: exactly as to the single-process model. Every rank of a TP x SP group
gets the same full batch (``input_ids [B, L]``, ``attention_mask``, ``labels`` /
``start_positions`` ...), as a DeepSpeed data loader over the data-parallel ranks gives it. The
model's own forward pads to ``l``, builds the :class:`BlockLayout` of the *full* sequence, and
embeds only this rank's contiguous slice ``[r*t, (r+1)*t)``: it asks its ``token_sharding``
(:class:`SequenceSharding` here, set by :func:`apply_sequence_parallel`), which also gathers
outputs back to length ``L`` on every rank. Nothing here copies a model forward; this module
swaps the attention kernels, the token-stream dropouts and the token sharding.

Per layer (``X`` sequence-sharded ``[B, t, d]``, ``P`` packed stream replicated ``[B, s, d]``):

* unpack & sliding-window attention: Q/K/V of the local tokens ``[B, H, t, dh]`` go through
  ``seq_to_head`` to ``[B, h, l, dh]`` (every position, this rank's heads), so BiALiBi
  distances, windows and the block-0 keys are exact; packed keys/values ``[B, H, s, dh]`` are
  sliced to the same heads; the output returns through ``head_to_seq``. BiALiBi uses global
  head ids ``head_start + r * h``.
* pack attention: keys/values from all tokens, so they go through ``seq_to_head`` too; queries
  come from the replicated packed stream and are sliced to this rank's heads; the result
  ``[B, h, s, dh]`` is all-gathered over heads (backward: reduce-scatter) into the replicated
  ``Cp``.

Gradients: parameters are replicated over SP and each rank back-propagates only its own tokens'
share of the loss, so each rank holds a partial gradient and the true one is the sum over the
SP group. DeepSpeed does exactly that (it reduces over the sequence-data-parallel group and
divides by the data-parallel size only). Without DeepSpeed, all-reduce (sum) gradients over
``state.sequence_parallel_group`` (``allreduce_sequence_parallel_grads``).

Losses: the masked-LM loss is a sum over local tokens, all-reduced in the forward only, divided
by the number of labelled tokens in the whole batch; the QA loss is computed on the gathered
``[B, L, 2]`` logits, identical on every rank, whose gather keeps only the local slice of the
gradient. The returned loss is the full loss on every rank.

Heads that read gathered tokens (the recurring-span-selection head reads every token state)
run replicated and get the full gradient on every SP rank; :func:`apply_sequence_parallel`
divides their gradients by ``P`` so the sum over SP counts them once.

Dropout: the token stream (embeddings, sub-layer outputs) is sharded, so each SP rank draws its
own masks (:class:`SequenceShardDropout`); the packed stream is replicated and keeps the
default generator, identical on every rank; attention-probability dropout forks per head shard.

A head with parameters placed by the user on top of the gathered ``last_hidden_state`` would run
replicated and receive the full gradient on each SP rank, so DeepSpeed's sum over SP would count
it ``P`` times: run it on ``keep_sharded=True`` states (as the masked-LM and QA heads do) or
divide its gradients by ``P`` (:func:`divide_gradients_over_sequence_parallel`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.layers import Dropout
from ..model.layout import BlockLayout, LocalTokens
from ..model.modeling import LittleBirdForMaskedLM, LittleBirdModel
from .groups import ParallelState
from .mappings import (
    gather_from_sequence_parallel_region,
    gather_heads_from_sequence_parallel_region,
    gather_rows_from_sequence_parallel_region,
    head_to_seq,
    reduce_from_sequence_parallel_region,
    seq_to_head,
)
from .rng import sharded_dropout_rng

# ----- attention ----------------------------------------------------------------------------


def wrap_attention(layer: nn.Module, state: ParallelState) -> None:
    """Replace the ``core_attention`` slots of a layer's attentions with head-sharded versions
    (Ulysses all-to-all when ``P > 1``; forked dropout RNG for head shards in any case)."""
    layer.attention.core_attention = UlyssesCoreAttention(layer.attention, state)
    if layer.has_pack:
        layer.pack_attention.core_attention = UlyssesPackCoreAttention(layer.pack_attention, state)


class UlyssesCoreAttention:
    """Unpack & sliding-window core attention on this rank's heads over the full sequence.

    A plain object (not a closure) holding the module and its original kernel call, so
    ``copy.deepcopy`` of the model rebinds them to the copy."""

    def __init__(self, module: nn.Module, state: ParallelState):
        self.module, self.state = module, state
        self.local = module.core_attention  # the single-process kernel call (reads module.bialibi)

    def __call__(self, q, k, v, kp, vp, layout: BlockLayout, head_start: int) -> torch.Tensor:
        group, r = self.state.sequence_parallel_group, self.state.sequence_parallel_rank
        q, k, v = (seq_to_head(x, group) for x in (q, k, v))  # [B, H, t, dh] -> [B, h, l, dh]
        h = q.shape[1]
        if kp is not None:
            kp, vp = kp.narrow(1, r * h, h), vp.narrow(1, r * h, h)  # [B, H, s, dh] -> [B, h, s, dh]
        dropout = self.module.training and self.module.dropout_p > 0
        with sharded_dropout_rng(self.state, dropout, q.device):
            out = self.local(q, k, v, kp, vp, layout, head_start + r * h)  # [B, h, l, dh]
        return head_to_seq(out, group)  # [B, H, t, dh]


class UlyssesPackCoreAttention:
    """Pack attention on this rank's heads: keys/values of every token, queries from the
    replicated packed stream; the head shards are gathered back into the replicated ``Cp``."""

    def __init__(self, module: nn.Module, state: ParallelState):
        self.state = state
        self.local = module.core_attention

    def __call__(self, q, k, v, key_mask, dropout_p, training) -> torch.Tensor:
        group, r = self.state.sequence_parallel_group, self.state.sequence_parallel_rank
        k, v = seq_to_head(k, group), seq_to_head(v, group)  # [B, H, t, dh] -> [B, h, l, dh]
        h = k.shape[1]
        q = q.narrow(1, r * h, h)  # replicated [B, H, s, dh] -> [B, h, s, dh]
        with sharded_dropout_rng(self.state, training and dropout_p > 0, q.device):
            c = self.local(q, k, v, key_mask, dropout_p, training)  # [B, h, s, dh]
        return gather_heads_from_sequence_parallel_region(c, group)  # [B, H, s, dh], replicated


class SequenceShardDropout(Dropout):
    """Dropout on the sequence-sharded token stream: each SP rank draws masks from its own
    stream (its tokens are different positions; sharing the stream would give positions ``i``
    and ``i + t`` the same mask), the TP ranks of one shard the same stream (the activations are
    replicated over TP). The packed stream keeps plain dropout (``layer.pack_dropout``): it is
    replicated over SP and must get the same mask on every rank."""

    def __init__(self, p: float, state: ParallelState):
        super().__init__(p)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with sharded_dropout_rng(self.state, self.training and self.p > 0, x.device, shard="sequence"):
            return super().forward(x)


def shard_token_dropout(model: LittleBirdModel, state: ParallelState) -> None:
    """Swap the token-stream dropouts (embeddings and each layer's sub-layer outputs) for
    :class:`SequenceShardDropout` when ``P > 1``."""
    if state.sequence_parallel_size == 1:
        return
    model.embeddings.dropout = SequenceShardDropout(model.embeddings.dropout.p, state)
    for layer in model.layers:
        layer.dropout = SequenceShardDropout(layer.dropout.p, state)


# ----- tokens -------------------------------------------------------------------------------


class SequenceSharding(LocalTokens):
    """This SP rank holds the contiguous tokens ``[r*t, (r+1)*t)`` of the padded sequence."""

    def __init__(self, state: ParallelState):
        self.state = state
        self.size = state.sequence_parallel_size

    def __deepcopy__(self, memo):
        return self  # holds process groups only (a deep-copied model shares them)

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A plain slice: the gradient of a replicated input is partial (zero outside the slice),
        as everywhere under SP."""
        if x is None:
            return None
        t = x.shape[1] // self.size
        return x.narrow(1, self.state.sequence_parallel_rank * t, t)  # [B, l, ...] -> [B, t, ...]

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        return gather_from_sequence_parallel_region(x, self.state.sequence_parallel_group)[:, :length]

    def gather_rows(self, rows: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Each rank's rows (its selected tokens, in its row-major order) -> all ranks' rows in
        row-major order of ``selected [B, l]``; the backward keeps this rank's rows."""
        P = self.size
        B, l = selected.shape
        t = l // P
        shards = [selected[:, r * t:(r + 1) * t] for r in range(P)]
        sizes = [int(s.sum()) for s in shards]
        gathered = gather_rows_from_sequence_parallel_region(rows, self.state.sequence_parallel_group, sizes)
        key = torch.arange(B * l, device=selected.device).view(B, l)  # row-major position of each token
        rank_major = torch.cat([key[:, r * t:(r + 1) * t][shards[r]] for r in range(P)])
        return gathered.index_select(0, torch.argsort(rank_major))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_sequence_parallel_region(x, self.state.sequence_parallel_group)


# ----- apply --------------------------------------------------------------------------------


def divide_gradients_over_sequence_parallel(module: nn.Module, state: ParallelState) -> None:
    """Divide the gradients of ``module``'s parameters by ``P`` as they are computed: for a
    replicated head that reads gathered tokens, so the sum over SP counts its gradient once."""
    P = state.sequence_parallel_size
    for p in module.parameters():
        p.register_hook(lambda g, P=P: g / P)


def apply_sequence_parallel(base: LittleBirdModel, model: nn.Module, state: ParallelState) -> None:
    """Shard ``base``'s token stream over the SP group: token sharding, token-stream dropout,
    and ``1/P`` gradients for a span-selection head (it reads gathered tokens). The attention
    kernels are wrapped per layer by :func:`wrap_attention`."""
    if state.sequence_parallel_size == 1:
        return
    base.token_sharding = SequenceSharding(state)
    shard_token_dropout(base, state)
    if isinstance(model, LittleBirdForMaskedLM) and model.rss_head is not None:
        divide_gradients_over_sequence_parallel(model.rss_head, state)


def allreduce_sequence_parallel_grads(model: nn.Module, state: ParallelState) -> None:
    """Sum every parameter gradient over the SP group (what DeepSpeed's gradient reduction does;
    call it yourself only when training without DeepSpeed)."""
    if state.sequence_parallel_size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=state.sequence_parallel_group)
