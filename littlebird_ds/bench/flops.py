"""LittleBird's FLOPs, counted analytically (a multiply-add is 2 FLOPs).

Per layer, forward, with ``l`` padded tokens, ``s`` packed, block ``b``, width ``d``, FFN ``f``::

    unpack & sliding window   8 l d^2   (Wq, Wk, Wv, Wo on tokens)
                            + 4 s d^2   (Wk, Wv on Cp)
                            + 4 l (s + 4b) d   (scores and values: s + 4b keys per query)
    pack attention            4 s d^2   (Wq, Wo on P)
                            + 4 l d^2   (Wk, Wv on tokens)
                            + 4 s l d   (scores and values: every packed query sees l keys)
    feed-forward              4 l d f

Embedding lookups, LayerNorms, softmax, bias and activation functions are not counted
(they are not matmuls, and the matmul rate is the yardstick). A training step (forward and
backward) counts 3x the forward: backward needs two matmuls per forward matmul. Work a
kernel repeats on purpose (recomputing probabilities in backward) is not counted: the rate
reported is the model FLOP rate.
"""

from __future__ import annotations

import time

import torch

from ..model.layout import padded_length
from .systems import Size

BLOCK = PACK = 64


def littlebird_forward_flops(size: Size, length: int, block: int = BLOCK, pack: int = PACK) -> int:
    l, s, b, d, f = padded_length(length, block), pack, block, size.hidden, size.ffn
    usw = 8 * l * d * d + 4 * s * d * d + 4 * l * (s + 4 * b) * d
    packed = (4 * s * d * d + 4 * l * d * d + 4 * s * l * d) if s else 0
    ffn = 4 * l * d * f
    return size.layers * (usw + packed + ffn)


def littlebird_train_flops(size: Size, length: int, block: int = BLOCK, pack: int = PACK) -> int:
    return 3 * littlebird_forward_flops(size, length, block, pack)


def counted_forward_flops(model: torch.nn.Module, inputs: dict) -> int:
    """FLOPs of one forward as ``torch.utils.flop_counter.FlopCounterMode`` counts them.

    Cross-check with the analytic count: FlopCounterMode has no formula for the CPU flash
    SDPA op that pack attention runs on (``4 s l d`` per layer, missing from its count), and
    it does count the tiny ``slopes @ patterns`` bias products the analytic count leaves out.
    """
    from torch.utils.flop_counter import FlopCounterMode

    # Grad stays enabled: FlopCounterMode's module tracker needs autograd nodes on the inputs
    # of checkpointable layers. Only the forward runs.
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def matmul_rate(n: int = 4096, repeats: int = 3) -> float:
    """The machine's fp32 GEMM rate in FLOP/s: median of ``repeats`` ``n x n x n`` products."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.matmul(a, b)  # warm-up: threads, packing buffers
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]
