"""Blocked eager kernel: the reference that trains on every device.

Memory and time are linear in length: each query block attends to ``s + 4b`` keys (packed
keys, block 0, a three-block window), and no ``l x l`` tensor is ever built. Scores are
computed per part and fused in one fp32 softmax. Shapes as in ``attention/__init__.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bialibi import bialibi_distance
from ..layout import BlockLayout


def gather_window(xb: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``xb [B, H, n, b, dh]`` -> ``[B, H, n, 3b, dh]``: the three window blocks of each query block."""
    B, H, n, b, dh = xb.shape
    wb = layout.window_blocks()  # [B, n, 3]
    if B == 1 or bool((wb == wb[:1]).all()):
        # One gather for the whole batch when every sequence has the same block count.
        g = xb.index_select(2, wb[0].reshape(-1))  # [B, H, 3n, b, dh]
    else:
        g = torch.cat([xb[r : r + 1].index_select(2, wb[r].reshape(-1)) for r in range(B)], dim=0)
    return g.view(B, H, n, 3 * b, dh)  # (i, c, row) -> window rows of block i


def window_key_positions(layout: BlockLayout) -> torch.Tensor:
    """``[B, n, 3b]`` absolute positions of the window keys of each query block."""
    b = layout.block_size
    wb = layout.window_blocks()  # [B, n, 3]
    return (wb.unsqueeze(-1) * b + torch.arange(b, device=wb.device)).flatten(2)  # [B, n, 3b]


def eager_attention(
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
    alpha, beta, gamma = slopes
    B, H, l, dh = q.shape
    b, n = layout.block_size, layout.num_blocks
    neg = torch.finfo(torch.float32).min  # finite: a fully masked row gives a uniform row, never NaN
    q = q * dh**-0.5
    qb = q.view(B, H, n, b, dh)
    kb, vb = k.view(B, H, n, b, dh), v.view(B, H, n, b, dh)
    kw, vw = gather_window(kb, layout), gather_window(vb, layout)  # [B, H, n, 3b, dh]

    qpos = torch.arange(l, device=q.device).view(n, b)  # [n, b]
    # Block 0: the first block's keys, seen by every query.
    s0 = torch.matmul(q, kb[:, :, 0].transpose(-1, -2)).float().view(B, H, n, b, b)
    d0 = bialibi_distance(qpos.unsqueeze(-1), qpos[0].view(1, 1, b), alpha, beta, gamma, first_token, global_keys)  # [H, n, b, b]
    s0 = (s0 - d0).masked_fill(~layout.key_mask[:, :b].view(B, 1, 1, 1, b), neg)
    # Window: three blocks around the query block, shifted inward at the sequence's edges.
    sw = torch.matmul(qb, kw.transpose(-1, -2)).float()  # [B, H, n, b, 3b]
    kwpos = window_key_positions(layout)  # [B, n, 3b]
    dw = bialibi_distance(qpos.view(1, n, b, 1), kwpos.unsqueeze(2), alpha, beta, gamma, first_token, global_keys)  # [H, B, n, b, 3b]
    rows = torch.arange(B, device=q.device).view(B, 1, 1)
    wmask = layout.key_mask.view(B, n, b)[rows, layout.window_blocks()].view(B, 1, n, 1, 3 * b)
    sw = (sw - dw.transpose(0, 1)).masked_fill(~wmask, neg)
    parts = [s0, sw]
    if kp is not None:
        s = kp.shape[2]
        dp = ((beta + gamma) / 2 * b).view(1, H, 1, 1, 1)
        sp = torch.matmul(q, kp.transpose(-1, -2)).float().view(B, H, n, b, s) - dp  # [B, H, n, b, s]
        parts.insert(0, sp)

    probs = torch.softmax(torch.cat(parts, dim=-1), dim=-1)  # [B, H, n, b, (s) + b + 3b]
    if training and dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    probs = probs.to(v.dtype)

    pw = probs[..., -3 * b :]
    out = torch.matmul(pw, vw)  # [B, H, n, b, dh]
    p0 = probs[..., -4 * b : -3 * b].reshape(B, H, l, b)
    out = out.view(B, H, l, dh) + torch.matmul(p0, vb[:, :, 0])  # [B, H, l, dh]
    if kp is not None:
        pp = probs[..., :s].reshape(B, H, l, s)
        out = out + torch.matmul(pp, vp)
    return out
