"""Attention kernels behind one interface.

Every kernel computes the unpack & sliding-window attention of spec section 3 with the
signature of :class:`AttentionKernel`::

    out = kernel(q, k, v, kp, vp, slopes, layout, first_token=..., global_keys=..., dropout_p=..., training=...)

Shape legend (used in every kernel file):
    B  batch              H  heads held by this rank      l  padded length (n * b)
    b  block size         n  blocks                       s  packed length
    dh head size
    q, k, v  [B, H, l, dh]     token queries, keys, values
    kp, vp   [B, H, s, dh]     packed keys and values (Cp Wk, Cp Wv), or None when s = 0
    slopes   (alpha, beta, gamma), each [H] fp32 >= 0, already sliced to this rank's heads
    out      [B, H, l, dh]

``dense`` is the quadratic reference used only by tests; ``eager`` is the readable blocked
kernel that trains everywhere (plain autograd); ``blocked`` computes the same with a
flash-style backward (recomputes probabilities, fast and light: the default for training);
``flex`` is ``torch.nn.attention.flex_attention`` (inference on CPU, training on GPU).
Faster kernels register themselves with :func:`register_kernel` and are tested against
``eager`` and ``dense``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..layout import BlockLayout


class AttentionKernel(Protocol):
    def __call__(
        self,
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
    ) -> torch.Tensor: ...


_KERNELS: dict[str, AttentionKernel] = {}
# name -> (device_type, training) -> None if usable, else the reason it is not.
_UNAVAILABLE: dict[str, Callable[[str, bool], str | None]] = {}


def register_kernel(name: str, fn: AttentionKernel, unavailable: Callable[[str, bool], str | None] | None = None) -> None:
    _KERNELS[name] = fn
    _UNAVAILABLE[name] = unavailable or (lambda device_type, training: None)


def available_kernels(device_type: str, training: bool) -> list[str]:
    return [name for name in _KERNELS if _UNAVAILABLE[name](device_type, training) is None]


def get_kernel(name: str, device_type: str, training: bool) -> AttentionKernel:
    """The kernel called ``name``; ``auto`` picks the fastest valid one for the device and mode."""
    if name == "auto":
        name = select_default_kernel(device_type, training)
    if name not in _KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; available: {sorted(_KERNELS)}")
    reason = _UNAVAILABLE[name](device_type, training)
    if reason is not None:
        raise ValueError(
            f"attention kernel {name!r} is unavailable on {device_type} {'training' if training else 'inference'}: "
            f"{reason}; set config.attention_kernel='eager' (works everywhere) or 'auto'"
        )
    return _KERNELS[name]


def select_default_kernel(device_type: str, training: bool) -> str:
    for name in _PREFERENCE:
        if name in _KERNELS and _UNAVAILABLE[name](device_type, training) is None:
            return name
    return "eager"


# Fastest first; a kernel missing from the registry or unavailable is passed over.
# ``flex`` is opt-in (attention_kernel="flex"), not an ``auto`` choice: once torch.compile's
# recompile limit is reached in a process (a score_mod per layer and a shape per length
# bucket count against it), flex_attention silently runs its uncompiled reference path,
# which builds the full [l, s + l] score matrix: about 19 GB at 32k tokens. ``blocked`` is
# linear in memory whatever happened before.
_PREFERENCE = ("blocked", "eager")

from . import flex  # noqa: E402
from .blocked import blocked_attention  # noqa: E402
from .eager import eager_attention  # noqa: E402

register_kernel("eager", eager_attention)
register_kernel("blocked", blocked_attention)
register_kernel("flex", flex.flex_kernel, unavailable=flex.unavailable)

__all__ = ["AttentionKernel", "register_kernel", "available_kernels", "get_kernel", "select_default_kernel", "eager_attention", "blocked_attention"]
