"""Megatron-style tensor parallelism for a built, single-process LittleBird model.

Dimension legend: ``B`` batch, ``t`` tokens on this rank (``l`` without sequence
parallelism), ``s`` packed length, ``d`` hidden size, ``I`` FFN width, ``H`` heads,
``V`` vocabulary, ``P`` tensor-parallel size, ``N`` flattened tokens; ``X/P`` is this rank's
shard of ``X``.

``apply_tensor_parallel(model, state)`` swaps the model's layers in place (``parallelize`` calls it):

* attention (unpack & sliding window, and pack): Q/K/V column-parallel (``d -> H/P`` heads),
  output row-parallel; heads ``[tp_rank * H/P, (tp_rank + 1) * H/P)`` live on this rank and
  ``head_start`` is set so BiALiBi slopes are read by global head id;
* FFN: ``intermediate`` column-parallel, ``output`` row-parallel;
* word embeddings and the tied LM decoder vocab-parallel (contiguous vocabulary ranges, the
  last one shorter when ``P`` does not divide ``V``), the LM bias sharded the same way, and the
  masked-LM loss computed by :func:`vocab_parallel_cross_entropy` so ``[N, V]`` logits are
  never materialised for the loss;
* replicated (same values and same full gradient on every TP rank): LayerNorms, token-type
  embeddings, ``packed_init``, LM-head transform, QA head, biases of row-parallel linears;
* BiALiBi: parameters replicated at full size ``[H]``. Each rank reads only its slice, so the
  raw parameters pass through ``copy_to_tensor_parallel_region`` before slicing: the backward
  all-reduce over TP gives every rank the full gradient (zeros outside a slice are filled by the
  rank that owns it), and the optimiser keeps them identical.

Dropout: see ``rng``. State-dict rules and converters: see ``partition``.

Sharded parameters carry ``tensor_model_parallel = True`` and ``partition_dim`` (Megatron's
attributes), which DeepSpeed's gradient-norm code reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.bialibi import BiALiBi
from ..model.modeling import LittleBirdForMaskedLM, LittleBirdModel
from .cross_entropy import vocab_parallel_cross_entropy
from .groups import ParallelState
from .mappings import (
    _size,
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
)
from .partition import tensor_parallel_sizes, vocab_ranges

# ----- layers -------------------------------------------------------------------------------


class GroupRef:
    """A process-group handle that ``copy.deepcopy`` keeps by reference (process groups cannot
    be copied), so a parallelized model can be deep-copied (e.g. for an EMA)."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class _GroupMixin:
    @property
    def group(self):
        return self._group_ref.group

    @group.setter
    def group(self, value):
        self._group_ref = GroupRef(value)


def _mark(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1
    return p


class ColumnParallelLinear(_GroupMixin, nn.Module):
    """``y[..., out/P] = x[..., in] W_r^T + b_r``: rows ``[r*out/P, (r+1)*out/P)`` of the full
    ``W [out, in]``. The input is replicated over TP (its gradient is all-reduced); the output
    stays sharded on its last dim."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, rank: int = 0,
                 device=None, dtype=None):
        super().__init__()
        P = _size(group)
        if out_features % P:
            raise ValueError(f"ColumnParallelLinear: out_features {out_features} not divisible by {P} TP ranks")
        self.group, self.rank = group, rank
        self.in_features, self.out_features = in_features, out_features
        self.weight = _mark(nn.Parameter(torch.empty(out_features // P, in_features, device=device, dtype=dtype)), 0)
        self.bias = _mark(nn.Parameter(torch.empty(out_features // P, device=device, dtype=dtype)), 0) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group, rank: int) -> "ColumnParallelLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group, rank,
                linear.weight.device, linear.weight.dtype)
        n = m.weight.shape[0]
        m.weight.copy_(linear.weight[rank * n : (rank + 1) * n])
        if m.bias is not None:
            m.bias.copy_(linear.bias[rank * n : (rank + 1) * n])
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_parallel_region(x, self.group), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (local {self.weight.shape[0]})"


class RowParallelLinear(_GroupMixin, nn.Module):
    """``y[..., out] = sum_r x_r[..., in/P] W_r^T + b``: columns ``[r*in/P, (r+1)*in/P)`` of the
    full ``W``. The input is sharded on its last dim; the partial products are all-reduced and
    the (replicated) bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, rank: int = 0,
                 device=None, dtype=None):
        super().__init__()
        P = _size(group)
        if in_features % P:
            raise ValueError(f"RowParallelLinear: in_features {in_features} not divisible by {P} TP ranks")
        self.group, self.rank = group, rank
        self.in_features, self.out_features = in_features, out_features
        self.weight = _mark(nn.Parameter(torch.empty(out_features, in_features // P, device=device, dtype=dtype)), 1)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group, rank: int) -> "RowParallelLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group, rank,
                linear.weight.device, linear.weight.dtype)
        n = m.weight.shape[1]
        m.weight.copy_(linear.weight[:, rank * n : (rank + 1) * n])
        if m.bias is not None:
            m.bias.copy_(linear.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}"


class VocabParallelEmbedding(_GroupMixin, nn.Module):
    """Rows ``[vocab_start, vocab_end)`` of the embedding table. Ids outside the range look up
    zeros; the all-reduce over TP fills them in from the rank that owns them."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, group=None,
                 rank: int = 0, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.vocab_start, self.vocab_end = vocab_ranges(num_embeddings, _size(group))[rank]
        rows = self.vocab_end - self.vocab_start
        self.weight = _mark(nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype)), 0)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, emb: nn.Embedding, group, rank: int) -> "VocabParallelEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, group, rank, emb.weight.device, emb.weight.dtype)
        m.weight.copy_(emb.weight[m.vocab_start : m.vocab_end])
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        pad = self.padding_idx
        local_pad = pad - self.vocab_start if pad is not None and self.vocab_start <= pad < self.vocab_end else None
        out = F.embedding(local, self.weight, padding_idx=local_pad)  # [B, t, d], zeros wanted where outside
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, vocab range [{self.vocab_start}, {self.vocab_end})"


class VocabParallelLMHead(_GroupMixin, nn.Module):
    """BERT masked-LM head with the decoder tied to a :class:`VocabParallelEmbedding`: the
    transform (dense, activation, LayerNorm) is replicated, the logits are this rank's
    vocabulary range ``[..., V/P]``. State-dict keys and the methods the masked-LM forward
    calls (``token_losses``, ``gather_vocab``) match ``LittleBirdLMHead``."""

    def __init__(self, head: nn.Module, embedding: VocabParallelEmbedding, group):
        super().__init__()
        self.group = group
        self.vocab_size = embedding.num_embeddings
        self.dense, self.act, self.LayerNorm = head.dense, head.act, head.LayerNorm
        self.vocab_start, self.vocab_end = embedding.vocab_start, embedding.vocab_end
        self.decoder = nn.Module()
        self.decoder.weight = embedding.weight  # tied: the same Parameter object
        with torch.no_grad():
            self.bias = _mark(nn.Parameter(head.bias[self.vocab_start : self.vocab_end].clone()), 0)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = copy_to_tensor_parallel_region(self.transform(x), self.group)  # [B, t, d]
        return F.linear(h, self.decoder.weight) + self.bias  # [B, t, V/P]

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-row cross entropy ``[N]`` from this rank's ``logits [N, V/P]`` (vocab-parallel)."""
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_start, self.vocab_end, self.group)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., V/P]`` -> ``[..., V]``; the gradient goes back to this rank's shard."""
        return gather_from_tensor_parallel_region(logits, self.group, tensor_parallel_sizes(self.vocab_size, _size(self.group)))


class TensorParallelBiALiBi(_GroupMixin, BiALiBi):
    """BiALiBi sharing the full-size ``[H]`` parameters of the wrapped module; the slopes read
    them through ``copy_to_tensor_parallel_region`` so their gradient is all-reduced over TP
    (each rank reads only its heads; see the module docstring)."""

    def __init__(self, source: BiALiBi, group):
        nn.Module.__init__(self)
        self.num_heads, self.first_token, self.init, self.group = source.num_heads, source.first_token, source.init, group
        self.alpha_raw, self.beta_raw, self.gamma_raw = source.alpha_raw, source.beta_raw, source.gamma_raw

    def read_raw(self, p: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_parallel_region(p, self.group)


# ----- apply --------------------------------------------------------------------------------


def apply_tensor_parallel(base: LittleBirdModel, model: nn.Module, state: ParallelState) -> None:
    """Swap ``base``'s projections, embeddings and BiALiBi (and ``model``'s LM head) for their
    tensor-parallel versions holding this rank's shard. The forwards are the model's own."""
    g, r = state.tensor_parallel_group, state.tensor_parallel_rank
    heads_per_rank = base.config.num_attention_heads // state.tensor_parallel_size
    emb = VocabParallelEmbedding.from_embedding(base.embeddings.word_embeddings, g, r)
    base.embeddings.word_embeddings = emb
    for layer in base.layers:
        for attn in [layer.attention] + ([layer.pack_attention] if layer.has_pack else []):
            for name in ("query", "key", "value"):
                setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), g, r))
            attn.output = RowParallelLinear.from_linear(attn.output, g, r)
        layer.attention.head_start = r * heads_per_rank
        layer.attention.bialibi = TensorParallelBiALiBi(layer.attention.bialibi, g)
        layer.ffn.intermediate = ColumnParallelLinear.from_linear(layer.ffn.intermediate, g, r)
        layer.ffn.output = RowParallelLinear.from_linear(layer.ffn.output, g, r)
    if isinstance(model, LittleBirdForMaskedLM):
        model.lm_head = VocabParallelLMHead(model.lm_head, emb, g)


__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelBiALiBi",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "apply_tensor_parallel",
]
