"""Sequence length ownership: padding to whole blocks and the per-sequence block layout.

One function pads (``pad_to_blocks``), one object describes the padded batch
(``BlockLayout``), and every model output is cut back to the input length by the model.

Shape legend: ``B`` batch, ``l`` padded length, ``b`` block size, ``n = l / b`` blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MIN_BLOCKS = 4  # block 0 + a three-block window that never overlaps it


def padded_length(length: int, block_size: int, multiple: int = 1) -> int:
    """Smallest length >= ``length`` that holds at least 4 blocks and is a multiple of
    ``lcm(block_size, multiple)`` (``multiple`` is the sequence-parallel size)."""
    unit = math.lcm(block_size, multiple)
    target = max(length, MIN_BLOCKS * block_size)
    return -(-target // unit) * unit


def pad_to_blocks(
    tensors: dict[str, torch.Tensor | None],
    attention_mask: torch.Tensor,
    block_size: int,
    pad_values: dict[str, int | float],
    multiple: int = 1,
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, int]:
    """Right-pad every tensor in ``tensors`` (sequence on dim 1) and the mask.

    Returns ``(padded tensors, padded mask [B, l], original length)``.
    """
    length = attention_mask.shape[1]
    target = padded_length(length, block_size, multiple)
    extra = target - length
    if extra == 0:
        return tensors, attention_mask, length
    out: dict[str, torch.Tensor | None] = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        pad = [0, 0] * (t.dim() - 2) + [0, extra]  # F.pad counts dims from the last one
        out[name] = F.pad(t, pad, value=pad_values.get(name, 0))
    return out, F.pad(attention_mask, (0, extra), value=0), length


@dataclass
class BlockLayout:
    """Where each query block looks, computed once per forward and shared by all layers.

    Attributes:
        block_size: ``b``.
        num_blocks: ``n``, blocks in the padded tensor.
        key_mask: ``[B, l]`` bool, True on real tokens (inserted and trailing pads False).
        seq_blocks: ``[B]`` each sequence's own block count
            ``max(4, ceil((index of its last real token + 1) / b))`` (padding invariance).
        window_start: ``[B, n]`` first window block ``w = clamp(i - 1, 1, n_seq - 3)``.
        cache: per-layout constants kernels derive once and share across layers (bias
            patterns, window masks), keyed by the kernel.
    """

    block_size: int
    num_blocks: int
    key_mask: torch.Tensor
    seq_blocks: torch.Tensor
    window_start: torch.Tensor
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.block_size * self.num_blocks

    @classmethod
    def build(cls, attention_mask: torch.Tensor, block_size: int) -> "BlockLayout":
        B, l = attention_mask.shape
        if l % block_size or l // block_size < MIN_BLOCKS:
            raise ValueError(f"padded length {l} must be a multiple of block_size {block_size} with >= {MIN_BLOCKS} blocks")
        n = l // block_size
        key_mask = attention_mask.bool()
        positions = torch.arange(l, device=attention_mask.device)
        last_real = torch.where(key_mask, positions, -1).amax(dim=1)  # [B]
        seq_blocks = torch.clamp(torch.div(last_real, block_size, rounding_mode="floor") + 1, min=MIN_BLOCKS)  # [B]
        i = torch.arange(n, device=attention_mask.device)
        window_start = torch.minimum((i - 1).clamp(min=1).unsqueeze(0), (seq_blocks - 3).unsqueeze(1))  # [B, n]
        return cls(block_size, n, key_mask, seq_blocks, window_start)

    def window_blocks(self) -> torch.Tensor:
        """``[B, n, 3]`` indices of the three window blocks of every query block."""
        return self.window_start.unsqueeze(-1) + torch.arange(3, device=self.window_start.device)

    def allowed(self) -> torch.Tensor:
        """``[B, l, l]`` bool token-to-token pattern (block 0 + window). For dense references
        and tests only: it is quadratic in length."""
        b = self.block_size
        kblock = torch.arange(self.length, device=self.key_mask.device) // b  # [l]
        wb = self.window_blocks()  # [B, n, 3]
        in_window = (kblock.view(1, 1, 1, -1) == wb.unsqueeze(-1)).any(dim=2)  # [B, n, l]
        in_window = in_window | (kblock == 0).view(1, 1, -1)
        return in_window.repeat_interleave(b, dim=1)  # [B, l, l]


class LocalTokens:
    """Where this process's tokens live along the sequence: here, all of them.

    The model's forwards run every head on the tokens this process holds and call these four
    methods where a sharded sequence would need communication; sequence parallelism replaces
    the object (``parallel.sequence_parallel.SequenceSharding``) and the forwards stay the same.
    Shapes: ``l`` the padded length, ``t = l / size`` tokens held here, ``L`` the input length.
    """

    #: Number of sequence shards; the padded length is a multiple of ``lcm(block_size, size)``.
    size = 1

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This process's share ``[B, t, ...]`` of a padded per-token tensor ``[B, l, ...]``."""
        return x

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Per-token states held here ``[B, t, ...]`` -> every token at the input length ``[B, L, ...]``."""
        return x[:, :length]

    def gather_rows(self, rows: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Rows of the selected tokens held here -> the rows of ``selected [B, l]`` (padded, the
        same on every shard) in row-major order."""
        return rows

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """A sum over the tokens held here -> the sum over every token."""
        return x
