"""BiALiBi: bidirectional ALiBi position bias (spec section 2).

For query position ``i`` and key position ``j`` (absolute indices in the padded tensor)::

    D[h,i,j] = 0                  if i == j
             = alpha_h            if i == 0 or j < g      (or alpha_h * |i - j|, "linear")
             = beta_h  * (i - j)  if i > j
             = gamma_h * (j - i)  if i < j
    score    = q.k / sqrt(d_h) - D

Packed keys sit at the constant distance ``Dp = (beta + gamma) / 2 * b``.

``g`` (config ``bialibi_global_keys``) is 1 in the spec: only ``[CLS]`` is at the constant
distance. A larger ``g`` (up to the block size) puts the first ``g`` keys, the question of a
QA input, at the constant distance from every query, so a token 8,000 positions away sees
the question as a neighbour does instead of ``8000 * beta`` below it (project option, off by
default; docs/qa.md, "Question reach").

The three slopes are trainable per head, kept in fp32 and parameterised through softplus so
they never go below 0 (project decision: negative slopes made far keys win at long lengths).
Parameters cover *all* heads of the layer and are indexed by global head id; a tensor- or
sequence-parallel rank asks for its own slice with ``slopes(head_start, num_heads)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes ``m_h`` for any head count (Press et al.; x-transformers' rule).

    For a power of two ``H``: ``m_h = 2^(-8(h+1)/H)``. Otherwise the slopes of the nearest
    lower power of two, then every other slope of the doubled sequence.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


#: How much steeper the far side of a one-sided head starts (``init="directional"``): keys on
#: that side fade by a factor ``e`` per token, so the head reads its own side.
ONE_SIDED_EXTRA_SLOPE = 1.0


def initial_slopes(num_heads: int, init: str = "alibi") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Initial ``(alpha, beta, gamma)`` per head, fp64.

    ``"alibi"`` (the spec): all three are the ALiBi slope ``m_h``. ``"directional"``: the same,
    except that the steepest ``ceil(H/4)`` heads look left (``gamma = m_h + 1``) and the next
    ``ceil(H/4)`` look right (``beta = m_h + 1``); the other heads stay symmetric (and keep
    the packed keys near, whose distance is ``(beta + gamma) / 2 * b``). With equal slopes on
    both sides a model without position embeddings cannot tell its left neighbour from its
    right one until the slopes part, which they do slowly (docs/qa.md).
    """
    m = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
    alpha, beta, gamma = m.clone(), m.clone(), m.clone()
    if init == "directional":
        q = max(1, -(-num_heads // 4))
        order = torch.argsort(m, descending=True)  # steepest (most local) heads first
        left, right = order[:q], order[q:2 * q]
        gamma[left] += ONE_SIDED_EXTRA_SLOPE
        beta[right] += ONE_SIDED_EXTRA_SLOPE
    elif init != "alibi":
        raise ValueError(f"unknown BiALiBi init {init!r}; use 'alibi' or 'directional'")
    return alpha, beta, gamma


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    # softplus(y) = x  <=>  y = log(expm1(x)); exact for the small positive slopes used here.
    return torch.log(torch.expm1(x))


class BiALiBi(nn.Module):
    """Per-head non-negative slopes ``alpha, beta, gamma`` (fp32), indexed by global head id."""

    def __init__(self, num_heads: int, first_token: str = "constant", init: str = "alibi"):
        super().__init__()
        self.num_heads = num_heads
        self.first_token = first_token
        self.init = init
        self.alpha_raw = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.beta_raw = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.gamma_raw = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.reset_parameters()

    def initial_raw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw ``(alpha, beta, gamma)`` whose softplus are the initial slopes: the ALiBi slope
        of each head (spec decision), or with ``init="directional"`` heads that start
        one-sided (:func:`initial_slopes`)."""
        return tuple(_inverse_softplus(s).float() for s in initial_slopes(self.num_heads, self.init))  # type: ignore[return-value]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p, raw in zip((self.alpha_raw, self.beta_raw, self.gamma_raw), self.initial_raw()):
            p.copy_(raw)

    def slopes(self, head_start: int = 0, num_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, beta, gamma)``, each ``[h]`` fp32 and >= 0, for global heads ``head_start : head_start + h``."""
        h = self.num_heads - head_start if num_heads is None else num_heads
        if head_start < 0 or head_start + h > self.num_heads:
            raise ValueError(f"head slice [{head_start}, {head_start + h}) outside the layer's {self.num_heads} heads")
        sl = slice(head_start, head_start + h)
        return tuple(F.softplus(self.read_raw(p)[sl].float()) for p in (self.alpha_raw, self.beta_raw, self.gamma_raw))  # type: ignore[return-value]

    def read_raw(self, p: torch.Tensor) -> torch.Tensor:
        """A raw parameter as the slopes read it (tensor parallelism routes it through a TP copy
        so its gradient is summed over the ranks that read different head slices)."""
        return p

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, first_token={self.first_token}, init={self.init}"


def bialibi_distance(
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    first_token: str = "constant",
    global_keys: int = 1,
) -> torch.Tensor:
    """``D[h, ...]`` for broadcastable integer position tensors ``qpos`` and ``kpos``.

    ``alpha/beta/gamma`` are ``[h]``; the result is ``[h, *broadcast(qpos, kpos).shape]`` fp32.
    Query 0 and keys at positions ``< global_keys`` get the first-token term.
    """
    rel = (qpos - kpos).float()  # > 0: key on the left
    shape = (-1,) + (1,) * rel.dim()
    a, b, g = alpha.view(shape), beta.view(shape), gamma.view(shape)
    d = torch.where(rel > 0, b * rel, g * (-rel))
    first = (qpos == 0) | ((kpos >= 0) & (kpos < global_keys))
    d = torch.where(first, a * rel.abs() if first_token == "linear" else a.expand_as(d), d)
    return d.masked_fill(rel == 0, 0.0)
