"""LittleBird layers (spec section 3), single-process.

Parallelism is applied from outside (``littlebird_ds.parallel``): tensor parallelism swaps
the projections for column/row-parallel ones and sets ``head_start`` so BiALiBi slopes are
sliced by global head id; sequence parallelism wraps ``core_attention`` and
``pack_core_attention``. Head counts are read from tensor shapes, never from the config,
so both work without touching this file.

Shape legend: ``B`` batch, ``l`` padded length, ``s`` packed length, ``d`` hidden size,
``H`` heads on this rank, ``dh`` head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from ..config import LittleBirdConfig
from .attention import get_kernel
from .bialibi import BiALiBi
from .layout import BlockLayout


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, t, _ = x.shape
    return x.view(B, t, -1, head_dim).transpose(1, 2)  # [B, t, H*dh] -> [B, H, t, dh]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, t, dh = x.shape
    return x.transpose(1, 2).reshape(B, t, H * dh)  # [B, H, t, dh] -> [B, t, H*dh]


class _KeepMaskDropout(torch.autograd.Function):
    """``x * keep / (1 - p)`` with ``keep = rand >= p``, saving ``keep`` as bool (as torch's does)."""

    @staticmethod
    def forward(ctx, x, p):
        keep = torch.rand_like(x) >= p
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)  # where: mul would first copy keep to float

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, g, 0.0).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """``nn.Dropout`` that draws its mask as ``rand >= p`` on CPU. Torch's CPU dropout draws it
    with ``bernoulli_``, which takes twice as long as ``rand`` here: in a 16k-token training step
    of the benchmark size (12 dropouts) ``bernoulli_`` was 5% of the step, and the step went
    from 5.94 to 5.69 s (interleaved A/B). Same distribution, same saved bool mask, same
    generator (so checkpointing and the forked parallel streams reproduce it). Elsewhere (GPU:
    one fused kernel) it is torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and not self.inplace and x.device.type == "cpu":
            return _KeepMaskDropout.apply(x, self.p)
        return super().forward(x)


class LittleBirdEmbeddings(nn.Module):
    """Token + token-type embeddings, LayerNorm, dropout. No position embeddings."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, l, d]
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


def sdpa_pack_attention(q, k, v, key_mask, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Packed queries ``q [B, H, s, dh]`` over token keys ``k, v [B, H, l, dh]``; pad keys masked."""
    mask = key_mask.view(key_mask.shape[0], 1, 1, -1)  # [B, 1, 1, l], True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0)


class PackAttention(nn.Module):
    """``Cp = PackAttn(P, X)``: ordinary multi-head attention, queries from ``P``, keys and
    values from ``X``, pad keys masked, no position bias."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__()
        d = config.hidden_size
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.output = nn.Linear(d, d)
        self.core_attention = sdpa_pack_attention

    def forward(self, p: torch.Tensor, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        q = split_heads(self.query(p), self.head_dim)  # [B, H, s, dh]
        k = split_heads(self.key(x), self.head_dim)  # [B, H, l, dh]
        v = split_heads(self.value(x), self.head_dim)
        c = self.core_attention(q, k, v, layout.key_mask, self.dropout_p, self.training)  # [B, H, s, dh]
        return self.output(merge_heads(c))  # [B, s, d]


class UnpackSlidingWindowAttention(nn.Module):
    """``Cx = USWAttn(X, Cp)``: blocked sliding-window attention fused in one softmax with
    unpack attention over the packed keys ``Cp Wk`` / values ``Cp Wv`` (same projections as
    the tokens). ``Wq, Wk, Wv, Wo`` are the ones a BERT teacher's attention weights map to."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__()
        d = config.hidden_size
        self.head_dim = config.head_dim
        self.kernel_name = config.attention_kernel
        self.config = config  # read at call time: Hugging Face's set_attn_implementation changes it
        self.first_token = config.bialibi_first_token
        self.global_keys = config.bialibi_global_keys
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.output = nn.Linear(d, d)
        self.bialibi = BiALiBi(config.num_attention_heads, config.bialibi_first_token,
                               config.bialibi_init)
        self.head_start = 0  # global id of this rank's first head (tensor parallelism sets it)
        self.core_attention = self._local_attention

    def kernel_for(self) -> str:
        """The kernel name: ``config.attention_kernel``, except that an ``auto`` model loaded or
        set with Hugging Face's ``attn_implementation="flex_attention"`` runs ``flex``."""
        if self.kernel_name == "auto" and getattr(self.config, "_attn_implementation", None) == "flex_attention":
            return "flex"
        return self.kernel_name

    def _local_attention(self, q, k, v, kp, vp, layout: BlockLayout, head_start: int) -> torch.Tensor:
        # A kernel is picked for "training" whenever autograd will need its backward (an eval-mode
        # forward with grad enabled included): some kernels (flex on CPU) have none.
        needs_backward = torch.is_grad_enabled() and (q.requires_grad or self.bialibi.alpha_raw.requires_grad)
        kernel = get_kernel(self.kernel_for(), q.device.type, needs_backward)
        slopes = self.bialibi.slopes(head_start, q.shape[1])
        return kernel(q, k, v, kp, vp, slopes, layout, first_token=self.first_token, global_keys=self.global_keys,
                      dropout_p=self.dropout_p, training=self.training)

    def forward(self, x: torch.Tensor, cp: torch.Tensor | None, layout: BlockLayout) -> torch.Tensor:
        q = split_heads(self.query(x), self.head_dim)  # [B, H, l, dh]
        k = split_heads(self.key(x), self.head_dim)
        v = split_heads(self.value(x), self.head_dim)
        kp = vp = None
        if cp is not None:
            kp = split_heads(self.key(cp), self.head_dim)  # [B, H, s, dh]
            vp = split_heads(self.value(cp), self.head_dim)
        out = self.core_attention(q, k, v, kp, vp, layout, self.head_start)  # [B, H, l, dh]
        return self.output(merge_heads(out))  # [B, l, d]


#: Activations whose backward torch computes from the input alone: ``name -> approximate``.
_GELU_APPROXIMATE = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}


class _ActivationFromInput(torch.autograd.Function):
    """``act(h)`` that keeps only ``h`` for backward (exact and tanh GELU through
    ``aten.gelu_backward``; any other activation by re-running it under autograd)."""

    @staticmethod
    def forward(ctx, h, act, approximate):
        ctx.act, ctx.approximate = act, approximate
        ctx.save_for_backward(h)
        return act(h)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        if ctx.approximate is not None:
            return torch.ops.aten.gelu_backward(g, h, approximate=ctx.approximate), None, None
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(True)
            return torch.autograd.grad(ctx.act(h_), h_, g)[0], None, None


class FeedForward(nn.Module):
    """``output(act(intermediate(x)))``. In training it keeps the activation's input ``h`` but
    not its output ``a`` (both ``[B, l, f]``, the largest tensors of a layer): the output
    projection's saved input is replaced by a recipe, and backward recomputes ``act(h)``, an
    elementwise pass, instead. This cuts a layer's saved activations by a sixth. PyTorch's
    selective activation checkpointing could express the same, but it would replay the
    output projection's all-reduce under tensor parallelism; saved-tensor hooks act on that
    one tensor and work unchanged with tensor parallelism and ZeRO-3's parameter hooks."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.approximate = _GELU_APPROXIMATE.get(config.hidden_act)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, recompute_activation: bool = True) -> torch.Tensor:
        h = self.intermediate(x)  # [B, l, f]
        if not (recompute_activation and torch.is_grad_enabled() and h.requires_grad):
            return self.output(self.act(h))
        a = _ActivationFromInput.apply(h, self.act, self.approximate)
        storage = a.untyped_storage().data_ptr()

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() == storage:  # ``a`` or a view of it (linear saves a 2-D view)
                return t.shape, t.stride(), t.storage_offset()
            return t

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            with torch.no_grad():
                return self.act(h).as_strided(*saved)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self.output(a)


class LittleBirdLayer(GradientCheckpointingLayer):
    """One layer: pack, then unpack & sliding window, then the feed-forward block (post-LN)::

        Cp = PackAttn(P, X);  P' = LN_p(Cp + P)
        Cx = USWAttn(X, Cp);  A = LN_1(Cx + X);  X' = LN_2(FFN(A) + A)
    """

    def __init__(self, config: LittleBirdConfig, updates_packed: bool = True):
        super().__init__()
        self.has_pack = config.pack_size > 0
        # The last layer's P' would feed nothing: it is not computed, so no parameter is unused.
        self.updates_packed = self.has_pack and updates_packed
        if self.has_pack:
            self.pack_attention = PackAttention(config)
        if self.updates_packed:
            self.pack_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            # Its own module (same p) so sequence parallelism can give the token stream per-shard
            # masks while the replicated packed stream keeps the same mask on every rank.
            self.pack_dropout = Dropout(config.hidden_dropout_prob)
        self.attention = UnpackSlidingWindowAttention(config)
        self.attention_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.output_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, p: torch.Tensor | None, layout: BlockLayout):
        cp = None
        if self.has_pack:
            cp = self.pack_attention(p, x, layout)  # [B, s, d]
            p = self.pack_LayerNorm(self.pack_dropout(cp) + p) if self.updates_packed else None
        a = self.attention_LayerNorm(self.dropout(self.attention(x, cp, layout)) + x)  # [B, l, d]
        # A checkpointed layer recomputes everything in backward: the FFN keeps no recipe of its own.
        checkpointed = self.gradient_checkpointing and self.training
        x = self.output_LayerNorm(self.dropout(self.ffn(a, recompute_activation=not checkpointed)) + a)
        return x, p
