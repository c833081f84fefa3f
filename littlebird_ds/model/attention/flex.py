"""FlexAttention kernel: ``torch.nn.attention.flex_attention`` with a block-sparse mask for
the LittleBird pattern and BiALiBi as ``score_mod``.

Key sequence: the packed keys (zero-padded to whole blocks, ``sp = ceil(s / b) b``) are put
in front of the tokens, so kv position ``j`` is packed key ``j`` for ``j < sp`` and token
``j - sp`` otherwise. The block mask is built directly from block indices (never by
evaluating the mask over ``l x l``): query block ``i`` visits the packed blocks, token block 0
and its window blocks ``w_i .. w_i + 2``; ``mask_mod`` states the same pattern per position
and masks pad keys and the zero padding of the packed part. Lengths are bucketed (four buckets per octave, whole blocks) and
the extra queries/keys masked, so a new length usually reuses a compiled kernel; block masks
are cached per (bucket, layout).

Availability: torch 2.13 has no FlexAttention backward on CPU (and even its forward refuses
inputs that require grad), so on CPU this kernel serves inference only; on GPU it trains.
Shapes as in ``attention/__init__.py``; ``lb`` bucketed length, ``nb = lb / b``.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..layout import BlockLayout

_MASK_CACHE: OrderedDict = OrderedDict()
_MASK_CACHE_SIZE = 16


def unavailable(device_type: str, training: bool) -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no torch.nn.attention.flex_attention"
    if device_type == "cpu" and training:
        return "torch has no FlexAttention backward on CPU"
    if device_type not in ("cpu", "cuda", "xpu"):
        return f"FlexAttention does not run on {device_type}"
    return None


def bucket_length(length: int, block: int) -> int:
    """Round ``length`` up to one of four lengths per octave, in whole blocks."""
    if length <= 8 * block:
        return -(-length // block) * block
    step = max(block, 2 ** (math.floor(math.log2(length)) - 2))
    step = -(-step // block) * block
    return -(-length // step) * step


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(layout: BlockLayout, s: int, lb: int, device: torch.device):
    """The block mask of one layout at bucketed length ``lb`` (cached)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, n = layout.block_size, layout.num_blocks
    B = layout.key_mask.shape[0]
    key = (b, s, lb, str(device), layout.key_mask.cpu().numpy().tobytes(), layout.window_start.cpu().numpy().tobytes())
    if key in _MASK_CACHE:
        _MASK_CACHE.move_to_end(key)
        return _MASK_CACHE[key]
    nb, sb = lb // b, -(-s // b)  # query blocks, packed blocks
    ws = layout.window_start.to(device)
    ws = torch.cat([ws, ws[:, -1:].expand(B, nb - n)], dim=1)  # [B, nb] bucket blocks reuse the last window
    tok = torch.cat([torch.zeros_like(ws).unsqueeze(-1), ws.unsqueeze(-1) + torch.arange(3, device=device)], -1)  # [B, nb, 4]
    packed = torch.arange(sb, device=device).expand(B, nb, sb)  # [B, nb, sb]
    kv_indices = torch.cat([packed, tok + sb], dim=-1).int()  # [B, nb, sb + 4]
    # BlockMask wants one row per query block as wide as all kv blocks; the tail is unused.
    kv_indices = F.pad(kv_indices, (0, nb - 4)).unsqueeze(1)  # [B, 1, nb, sb + nb]
    kv_num = torch.full((B, 1, nb), sb + 4, dtype=torch.int32, device=device)
    key_mask = F.pad(layout.key_mask.to(device), (0, lb - layout.length))  # [B, lb]
    sp = sb * b

    def mask_mod(bi, h, q_idx, kv_idx):
        # The whole pattern, not only pad keys: the block indices above say which blocks to
        # visit, and this says which positions inside them count (and is the whole truth for
        # FlexAttention's uncompiled reference path, which ignores block sparsity).
        tok_idx = (kv_idx - sp).clamp(min=0)
        kblock, w = tok_idx // b, ws[bi, q_idx // b]
        in_pattern = (kblock == 0) | ((kblock >= w) & (kblock < w + 3))
        return (kv_idx < s) | ((kv_idx >= sp) & key_mask[bi, tok_idx] & in_pattern)

    mask = BlockMask.from_kv_blocks(kv_num, kv_indices, BLOCK_SIZE=b, mask_mod=mask_mod, seq_lengths=(lb, sp + lb))
    _MASK_CACHE[key] = mask
    if len(_MASK_CACHE) > _MASK_CACHE_SIZE:
        _MASK_CACHE.popitem(last=False)
    return mask


def flex_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kp: torch.Tensor | None,
    vp: torch.Tensor | None,
    slopes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    layout: BlockLayout,
    *,
    first_token: str = "constant",
    global_keys: int = 1,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    if training and dropout_p > 0:
        raise ValueError("the flex kernel has no attention dropout; use attention_kernel='blocked' or set "
                         "attention_probs_dropout_prob=0")
    alpha, beta, gamma = (t.float() for t in slopes)
    B, H, l, dh = q.shape
    b = layout.block_size
    s = 0 if kp is None else kp.shape[2]
    sp = -(-s // b) * b
    lb = bucket_length(l, b)
    mask = _block_mask(layout, s, lb, q.device)
    # [B, H, l, dh] -> [B, H, lb, dh]: bucket padding (its keys are masked, its queries dropped).
    q = F.pad(q, (0, 0, 0, lb - l))
    k, v = F.pad(k, (0, 0, 0, lb - l)), F.pad(v, (0, 0, 0, lb - l))
    if s:
        k = torch.cat([F.pad(kp, (0, 0, 0, sp - s)), k], dim=2)  # [B, H, sp + lb, dh]
        v = torch.cat([F.pad(vp, (0, 0, 0, sp - s)), v], dim=2)
    dp = (beta + gamma) / 2 * b  # [H]
    linear = first_token == "linear"

    def score_mod(score, bi, h, q_idx, kv_idx):
        j = kv_idx - sp  # token position of the key (negative: packed)
        rel = (q_idx - j).float()
        d = torch.where(rel > 0, beta[h] * rel, gamma[h] * (-rel))
        first = (q_idx == 0) | ((j >= 0) & (j < global_keys))
        d = torch.where(first, alpha[h] * rel.abs() if linear else alpha[h], d)
        d = torch.where(rel == 0, 0.0, d)
        return score - torch.where(j < 0, dp[h], d)

    out = _compiled()(q, k, v, score_mod=score_mod, block_mask=mask)  # [B, H, lb, dh]
    return out[:, :, :l]
