"""AdamW parameter groups (no weight decay for biases, LayerNorms, BiALiBi and the packed
sequence; the slopes' own learning rate), the ds_config's optimizer parameters, and the
warmup-then-decay schedule. Used by :mod:`.engine`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


#: Parameters whose name contains one of these get no weight decay.
NO_DECAY_MARKERS = ("bias", "layernorm", "layer_norm", "bialibi", "packed_init")


def param_groups(model: torch.nn.Module, weight_decay: float, *, bialibi_lr_scale: float = 1.0,
                 lr: float | None = None) -> list[dict]:
    """AdamW groups: decayed weights, and biases/LayerNorms/BiALiBi/packed sequence at 0.

    With ``bialibi_lr_scale != 1`` the BiALiBi slopes get a third group at ``lr *
    bialibi_lr_scale``. They are 3 scalars per head behind a softplus, and Adam moves a raw
    value by about the learning rate per step, so at fine-tuning rates (1e-4) a few hundred
    steps leave every head's left/right slopes where their shared initialisation put them.
    """
    if bialibi_lr_scale != 1.0 and (lr is None or bialibi_lr_scale <= 0):
        raise ValueError(f"bialibi_lr_scale {bialibi_lr_scale} needs a positive scale and the base lr")
    decay, no_decay, slopes = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lname = name.lower()
        if bialibi_lr_scale != 1.0 and "bialibi" in lname:
            slopes.append(p)
        else:
            (no_decay if p.ndim < 2 or any(m in lname for m in NO_DECAY_MARKERS) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if slopes:
        groups.append({"params": slopes, "weight_decay": 0.0, "lr": lr * bialibi_lr_scale})
    return [g for g in groups if g["params"]]


#: AdamW's settings when the flags do not set them (the client optimizer uses the same).
ADAM_BETAS, ADAM_EPS = [0.9, 0.999], 1e-8


def fill_optimizer_params(ds_config: dict, *, lr: float, weight_decay: float) -> dict:
    """A ds_config's ``optimizer.params`` as DeepSpeed needs them: ``lr`` always from ``--lr``
    (the schedule scales it), and ``"auto"`` or missing ``weight_decay``/``betas``/``eps`` from the
    flags and the defaults, the way the Hugging Face Trainer fills the same ``"auto"`` values (so
    one config file serves both). The parameter groups' own ``weight_decay`` (none for biases,
    LayerNorms and BiALiBi) and ``lr`` (the slopes' scale) override these defaults."""
    params = ds_config["optimizer"].setdefault("params", {})
    params["lr"] = lr
    for key, value in (("weight_decay", weight_decay), ("betas", ADAM_BETAS), ("eps", ADAM_EPS)):
        if params.get(key, "auto") == "auto":
            params[key] = value
    return ds_config


def lr_lambda(warmup_steps: int, max_steps: int, decay: str = "linear", min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` scheduler steps: linear warmup from 0 over
    ``warmup_steps``, then linear or cosine decay to ``min_ratio`` at ``max_steps``."""
    if decay not in ("linear", "cosine"):
        raise ValueError(f"lr decay must be 'linear' or 'cosine', got {decay!r}")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, max_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        shape = 1.0 - t if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
        return min_ratio + (1.0 - min_ratio) * shape

    return f
