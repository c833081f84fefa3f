"""Megatron-style tensor parallelism for a built, single-process LittleBird model.

Dimension legend: ``B`` batch, ``t`` tokens on this rank (``l`` without sequence
parallelism), ``s`` packed length, ``d`` hidden size, ``I`` FFN width, ``H`` heads,
``V`` vocabulary, ``P`` tensor-parallel size, ``N`` flattened tokens; ``X/P`` is this rank's
shard of ``X``.

``parallelize(model, state)`` converts the model in place:

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

Dropout RNG: the default generator stays identical on all TP and SP ranks, so dropout on
activations replicated over TP (hidden states, the packed stream) draws the same masks on every
TP rank. Attention-probability dropout inside a head shard runs under a forked generator seeded
from a number drawn from the default generator plus this rank's model-parallel rank: different
masks per shard, as Megatron's model-parallel RNG tracker gives. Under sequence parallelism the
token-stream dropout forks per SP rank (see ``sequence_parallel``). Because non-reentrant
checkpointing restores the default generator before recomputation, recomputed layers draw the
same masks (no tracker state to save).

Sharded parameters carry ``tensor_model_parallel = True`` and ``partition_dim`` (Megatron's
attributes), which DeepSpeed's gradient-norm code reads.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..model.bialibi import BiALiBi
from ..model.modeling import LittleBirdForMaskedLM, LittleBirdForQuestionAnswering, LittleBirdModel
from .groups import ParallelState
from .mappings import (
    _all_reduce,
    _size,
    copy_to_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
)

# ----- partitioning rules (shared by parallelize and the state-dict converters) -------------

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
    vocabulary range ``[..., V/P]``. State-dict keys match ``LittleBirdLMHead``."""

    def __init__(self, head: nn.Module, embedding: VocabParallelEmbedding, group):
        super().__init__()
        self.group = group
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


class TensorParallelBiALiBi(_GroupMixin, BiALiBi):
    """BiALiBi sharing the full-size ``[H]`` parameters of the wrapped module; ``slopes`` passes
    them through ``copy_to_tensor_parallel_region`` so their gradient is all-reduced over TP
    (each rank reads only its heads; see the module docstring)."""

    def __init__(self, source: BiALiBi, group):
        nn.Module.__init__(self)
        self.num_heads, self.first_token, self.group = source.num_heads, source.first_token, group
        self.alpha_raw, self.beta_raw, self.gamma_raw = source.alpha_raw, source.beta_raw, source.gamma_raw

    def slopes(self, head_start: int = 0, num_heads: int | None = None):
        h = self.num_heads - head_start if num_heads is None else num_heads
        if head_start < 0 or head_start + h > self.num_heads:
            raise ValueError(f"head slice [{head_start}, {head_start + h}) outside the layer's {self.num_heads} heads")
        sl = slice(head_start, head_start + h)
        return tuple(
            F.softplus(copy_to_tensor_parallel_region(p, self.group)[sl].float())
            for p in (self.alpha_raw, self.beta_raw, self.gamma_raw)
        )


# ----- loss ---------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_end, group, ignore_index):
        # logits [N, V/P] fp32, target [N] global ids.
        tp = _size(group) > 1
        lmax = logits.max(dim=-1).values  # [N]
        if tp:
            torch.distributed.all_reduce(lmax, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = logits - lmax.unsqueeze(-1)  # stability: exp never overflows
        ignore = target == ignore_index
        t = target.masked_fill(ignore, 0)
        mine = (t >= vocab_start) & (t < vocab_end)
        local_t = (t - vocab_start).masked_fill(~mine, 0)
        picked = shifted.gather(1, local_t.unsqueeze(1)).squeeze(1).masked_fill(~mine, 0.0)  # [N]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)  # [N]
        if tp:
            picked, sum_exp = _all_reduce(picked, group), _all_reduce(sum_exp, group)
        loss = (sum_exp.log() - picked).masked_fill(ignore, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, mine, ignore)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, mine, ignore = ctx.saved_tensors
        grad = softmax.clone()  # d loss / d logits = softmax - onehot(target)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= mine.to(grad.dtype)
        grad.mul_((g * (~ignore).to(g.dtype)).unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_end: int,
                                 group, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross entropy ``[N]`` from this rank's logits ``[N, V/P]`` for vocabulary ids
    ``[vocab_start, vocab_end)``, without gathering ``[N, V]``: max, target logit and sum of
    exponentials are all-reduced over TP. Ignored targets get loss 0 and no gradient."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_end, group, ignore_index)


# ----- dropout RNG --------------------------------------------------------------------------


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


# ----- parallelize --------------------------------------------------------------------------


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


def parallelize(model: nn.Module, state: ParallelState, gather_output: bool = True) -> nn.Module:
    """Convert a built single-process LittleBird model in place for ``state``'s TP x SP layout
    and return it. Weights are sliced from the model, so every rank must hold the same full
    weights beforehand (same seed, or load a checkpoint first). Order: tensor parallel, then
    sequence parallel; apply activation checkpointing after this, then ``deepspeed.initialize``.

    Raises ``ValueError`` when the heads do not split over ``TP * SP`` ranks, or when the ranks of
    a TP x SP group hold different weights or RNG states (seed every rank the same).

    Inputs stay what the single-process model takes (full ``[B, L]`` ids, mask, labels, the same
    on every TP and SP rank); outputs come back at the full input length (see
    ``sequence_parallel``). ``gather_output=False`` leaves masked-LM logits as this rank's
    ``[B, t, V/P]`` shard (the loss is computed without them either way).

    The trivial state (TP = SP = 1) returns the model unchanged.
    """
    from . import sequence_parallel  # noqa: PLC0415  (it imports this module)

    base = _base(model)
    if getattr(model, "parallel_state", None) is not None and not model.parallel_state.is_trivial:
        raise ValueError("model is already parallelized; build a fresh model to parallelize it again")
    cfg = base.config
    tp, sp, r = state.tensor_parallel_size, state.sequence_parallel_size, state.tensor_parallel_rank
    check_parallel_config(cfg, tp, sp)
    if state.is_trivial:
        model.parallel_state = state
        return model
    _check_replicas_agree(model, state)
    g = state.tensor_parallel_group
    heads_per_rank = cfg.num_attention_heads // tp

    emb = VocabParallelEmbedding.from_embedding(base.embeddings.word_embeddings, g, r)
    base.embeddings.word_embeddings = emb
    for layer in base.layers:
        attns = [layer.attention] + ([layer.pack_attention] if layer.has_pack else [])
        for attn in attns:
            for name in ("query", "key", "value"):
                setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), g, r))
            attn.output = RowParallelLinear.from_linear(attn.output, g, r)
        layer.attention.head_start = r * heads_per_rank
        layer.attention.bialibi = TensorParallelBiALiBi(layer.attention.bialibi, g)
        layer.ffn.intermediate = ColumnParallelLinear.from_linear(layer.ffn.intermediate, g, r)
        layer.ffn.output = RowParallelLinear.from_linear(layer.ffn.output, g, r)
        sequence_parallel.wrap_attention(layer, state)
    sequence_parallel.shard_token_dropout(base, state)
    base.pad_multiple = sp
    if isinstance(model, LittleBirdForMaskedLM):
        model.lm_head = VocabParallelLMHead(model.lm_head, emb, g)
    sequence_parallel.install_forward(model, state, gather_output=gather_output)
    model.parallel_state = state
    if model is not base:
        base.parallel_state = state
    return model


def tensor_parallel_sizes(vocab_size: int, state: ParallelState) -> list[int]:
    """Vocabulary shard size of every TP rank (for gathering logits)."""
    return [e - s for s, e in vocab_ranges(vocab_size, state.tensor_parallel_size)]


__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "TensorParallelBiALiBi",
    "TensorParallelCheckpointError",
    "check_checkpoint_tensor_parallel_size",
    "check_parallel_config",
    "load_tensor_parallel_state_dict",
    "merge_tensor_parallel_state_dicts",
    "parallelize",
    "partition_rule",
    "shard_state_dict",
    "sharded_dropout_rng",
    "tensor_parallel_checkpoint_metadata",
    "vocab_parallel_cross_entropy",
    "vocab_ranges",
]
