"""DeepSpeed-Ulysses sequence parallelism for LittleBird, composed with tensor parallelism.

Dimension legend: ``B`` batch, ``L`` input length, ``l`` padded length (a multiple of
``lcm(block_size, P)``), ``P`` sequence-parallel size, ``t = l / P`` tokens on this rank,
``s`` packed length, ``d`` hidden size, ``H`` heads on this TP rank, ``h = H / P`` heads this
rank attends with, ``dh`` head size, ``V`` vocabulary.

How inputs are passed: exactly as to the single-process model. Every rank of a TP x SP group
gets the same full batch (``input_ids [B, L]``, ``attention_mask``, ``labels`` /
``start_positions`` ...), as a DeepSpeed data loader over the data-parallel ranks gives it. The
wrapped forward pads to ``l``, builds the :class:`BlockLayout` of the *full* sequence, and
computes embeddings only for this rank's contiguous slice ``[r*t, (r+1)*t)``. Outputs come back
at length ``L`` on every rank.

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

Dropout: the token stream (embeddings, sub-layer outputs) is sharded, so each SP rank draws its
own masks (:class:`SequenceShardDropout`); the packed stream is replicated and keeps the
default generator, identical on every rank; attention-probability dropout forks per head shard.

A head with parameters placed by the user on top of the gathered ``last_hidden_state`` would run
replicated and receive the full gradient on each SP rank, so DeepSpeed's sum over SP would count
it ``P`` times: put such heads inside (as the masked-LM and QA classes do here) or divide their
gradients by ``P``.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput, QuestionAnsweringModelOutput

from ..model.layers import Dropout
from ..model.layout import BlockLayout
from ..model.modeling import (
    LittleBirdForMaskedLM,
    LittleBirdForQuestionAnswering,
    LittleBirdModel,
    LittleBirdModelOutput,
)
from .groups import ParallelState
from .mappings import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    gather_heads_from_sequence_parallel_region,
    gather_rows_from_sequence_parallel_region,
    head_to_seq,
    reduce_from_sequence_parallel_region,
    seq_to_head,
)
from .tensor_parallel import sharded_dropout_rng, tensor_parallel_sizes, vocab_parallel_cross_entropy


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


# ----- forward ------------------------------------------------------------------------------


def _local_slice(x: torch.Tensor | None, state: ParallelState) -> torch.Tensor | None:
    """This SP rank's contiguous slice of the (padded) sequence dim 1. A plain slice: the
    gradient of a replicated input is partial (zero outside the slice), as everywhere under SP."""
    if x is None or state.sequence_parallel_size == 1:
        return x
    t = x.shape[1] // state.sequence_parallel_size
    return x.narrow(1, state.sequence_parallel_rank * t, t)  # [B, l, ...] -> [B, t, ...]


def encode(model: LittleBirdModel, state: ParallelState, input_ids=None, attention_mask=None, token_type_ids=None,
           inputs_embeds=None, output_hidden_states=False):
    """Run embeddings and layers on this rank's tokens.

    Returns ``(x [B, t, d], hidden states as [B, t, d] or None, L, l)``.
    """
    padded, layout, L = model.prepare_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds)
    B, l = layout.key_mask.shape  # the layout covers the full sequence, on every rank
    x = model.embeddings(*(_local_slice(padded[k], state) for k in ("input_ids", "token_type_ids", "inputs_embeds")))
    p = None if model.packed_init is None else model.packed_init.to(x.dtype).unsqueeze(0).expand(B, -1, -1)  # [B, s, d]
    hidden = [x] if output_hidden_states else None
    for layer in model.layers:
        x, p = layer(x, p, layout)  # [B, t, d], [B, s, d]
        if hidden is not None:
            hidden.append(x)
    return x, hidden, L, l


def _gather_seq(x: torch.Tensor, state: ParallelState, L: int) -> torch.Tensor:
    return gather_from_sequence_parallel_region(x, state.sequence_parallel_group)[:, :L]  # [B, t, ...] -> [B, L, ...]


def _return(config, return_dict, out):
    rd = return_dict if return_dict is not None else getattr(config, "return_dict", True)
    return out if rd else out.to_tuple()


def _model_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                   output_hidden_states=None, return_dict=None, **kwargs):
    state = self.parallel_state
    x, hidden, L, _ = encode(self, state, input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states)
    out = LittleBirdModelOutput(
        last_hidden_state=_gather_seq(x, state, L),
        hidden_states=tuple(_gather_seq(h, state, L) for h in hidden) if hidden is not None else None,
    )
    return _return(self.config, return_dict, out)


def _hidden(state, hidden, L):
    return tuple(_gather_seq(h, state, L) for h in hidden) if hidden is not None else None


def _mlm_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, labels=None,
                 output_hidden_states=None, return_dict=None, masked_logits_only=False, **kwargs):
    """Masked LM: logits ``[B, t, V/P_tp]`` per rank; loss by vocab-parallel cross entropy over
    local tokens, summed over SP and divided by the labelled-token count of the whole batch.

    ``masked_logits_only=True`` (with ``labels``): the vocabulary projection only at this rank's
    labelled tokens (the loss never sees a ``[B, t, V]`` tensor, which at a 32k vocabulary is most
    of a long document's activation memory); the returned ``logits`` keep the single-process
    contract, ``[M, V]`` over the whole vocabulary in row-major order of the whole batch's
    ``labels != -100``, gathered over TP (vocabulary) and SP (rows) with gradients back to this
    rank's shard, so accuracy, evaluation and distillation read them as they do without
    parallelism. ``parallel_gather_output = False`` returns this rank's ``[M_local, V/P_tp]``."""
    state = self.parallel_state
    base = self.littlebird
    x, hidden, L, l = encode(base, state, input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states)
    if masked_logits_only and labels is None:
        raise ValueError("masked_logits_only=True needs labels (it keeps the positions where labels != -100)")
    logits = None if masked_logits_only else self.lm_head(x)  # [B, t, V/P]
    loss = None
    if labels is not None:
        if tuple(labels.shape) != (x.shape[0], L):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {(x.shape[0], L)}")
        full = torch.nn.functional.pad(labels, (0, l - L), value=-100)  # [B, l]
        targets = _local_slice(full, state).reshape(-1)  # [B*t]
        if masked_logits_only:
            selected = targets != -100
            logits = self.lm_head(x.reshape(-1, x.shape[-1])[selected])  # [M_local, V/P]
            targets = targets[selected]
        per_token = vocab_parallel_cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets,
            self.lm_head.vocab_start, self.lm_head.vocab_end, state.tensor_parallel_group,
        )
        total = reduce_from_sequence_parallel_region(per_token.sum(), state.sequence_parallel_group)
        loss = total / (labels != -100).sum()  # mean over labelled tokens, as F.cross_entropy
        if masked_logits_only and self.parallel_gather_output:
            logits = _gather_masked_logits(logits, full != -100, state, self.config.vocab_size)
    if self.parallel_gather_output and not masked_logits_only:
        sizes = tensor_parallel_sizes(self.config.vocab_size, state)
        logits = gather_from_tensor_parallel_region(logits, state.tensor_parallel_group, sizes)  # [B, t, V]
        logits = _gather_seq(logits, state, L)  # [B, L, V]
    res = MaskedLMOutput(loss=loss, logits=logits, hidden_states=_hidden(state, hidden, L))
    return _return(self.config, return_dict, res)


_mlm_forward.supports_masked_logits_only = True


def _gather_masked_logits(logits: torch.Tensor, selected: torch.Tensor, state: ParallelState,
                          vocab_size: int) -> torch.Tensor:
    """This rank's masked-token logits ``[M_local, V/P_tp]`` -> the whole batch's ``[M, V]`` in
    row-major order of ``selected [B, l]`` (the padded labels' ``!= -100``, identical on every rank)."""
    logits = gather_from_tensor_parallel_region(logits, state.tensor_parallel_group,
                                                tensor_parallel_sizes(vocab_size, state))  # [M_local, V]
    P = state.sequence_parallel_size
    if P == 1:
        return logits
    B, l = selected.shape
    t = l // P
    shards = [selected[:, r * t:(r + 1) * t] for r in range(P)]
    sizes = [int(s.sum()) for s in shards]
    rows = gather_rows_from_sequence_parallel_region(logits, state.sequence_parallel_group, sizes)  # rank-major
    key = torch.arange(B * l, device=selected.device).view(B, l)  # row-major position of each token
    rank_major = torch.cat([key[:, r * t:(r + 1) * t][shards[r]] for r in range(P)])
    return rows.index_select(0, torch.argsort(rank_major))


def _qa_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_hidden_states=None, return_dict=None, **kwargs):
    """QA: start/end logits per local token, gathered to ``[B, L, 2]``; loss as the single-process class."""
    state = self.parallel_state
    base = self.littlebird
    x, hidden, L, _ = encode(base, state, input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states)
    logits = _gather_seq(self.qa_outputs(x).float(), state, L)  # [B, t, 2] -> [B, L, 2]
    if attention_mask is not None:
        logits = logits.masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(logits.dtype).min)
    start_logits, end_logits = logits[..., 0], logits[..., 1]
    loss = None
    if start_positions is not None and end_positions is not None:
        start = start_positions.view(-1).clamp(0, L)
        end = end_positions.view(-1).clamp(0, L)
        ce = nn.CrossEntropyLoss(ignore_index=L)
        loss = (ce(start_logits, start) + ce(end_logits, end)) / 2
    res = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                       hidden_states=_hidden(state, hidden, L))
    return _return(self.config, return_dict, res)


def install_forward(model: nn.Module, state: ParallelState, gather_output: bool = True) -> None:
    """Bind the sharded forwards on the instance (the class is untouched)."""
    base = model if isinstance(model, LittleBirdModel) else model.littlebird
    base.parallel_state = state
    base.forward = types.MethodType(_model_forward, base)
    if isinstance(model, LittleBirdForMaskedLM):
        model.parallel_gather_output = gather_output
        model.forward = types.MethodType(_mlm_forward, model)
    elif isinstance(model, LittleBirdForQuestionAnswering):
        model.forward = types.MethodType(_qa_forward, model)


def allreduce_sequence_parallel_grads(model: nn.Module, state: ParallelState) -> None:
    """Sum every parameter gradient over the SP group (what DeepSpeed's gradient reduction does;
    call it yourself only when training without DeepSpeed)."""
    if state.sequence_parallel_size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=state.sequence_parallel_group)
