"""Dense reference of unpack & sliding-window attention (tests only: quadratic in length).

Builds the full ``[l, s + l]`` bias: ``Dp`` on packed columns, BiALiBi inside the allowed
pattern (block 0 + the three-block window of the query's block), ``-inf`` outside it and on
pad keys, then plain softmax attention. Shapes as in ``attention/__init__.py``.
"""

from __future__ import annotations

import torch

from ..bialibi import bialibi_distance
from ..layout import BlockLayout


def dense_attention(q, k, v, kp, vp, slopes, layout: BlockLayout, *, first_token: str = "constant",
                    global_keys: int = 1) -> torch.Tensor:
    alpha, beta, gamma = slopes
    B, H, l, dh = q.shape
    pos = torch.arange(l, device=q.device)
    d_tok = bialibi_distance(pos.view(l, 1), pos.view(1, l), alpha, beta, gamma, first_token, global_keys)  # [H, l, l]
    allowed = layout.allowed() & layout.key_mask.unsqueeze(1)  # [B, l, l]
    bias = (-d_tok).unsqueeze(0).masked_fill(~allowed.unsqueeze(1), float("-inf"))  # [B, H, l, l]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / dh**0.5 + bias  # [B, H, l, l]
    values = v.float()
    if kp is not None:
        dp = ((beta + gamma) / 2 * layout.block_size).view(1, H, 1, 1)
        sp = torch.matmul(q.float(), kp.float().transpose(-1, -2)) / dh**0.5 - dp  # [B, H, l, s]
        scores = torch.cat([sp, scores], dim=-1)  # [B, H, l, s + l]
        values = torch.cat([vp.float(), values], dim=-2)  # [B, H, s + l, dh]
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values).to(q.dtype)
