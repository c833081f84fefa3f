"""Activation checkpointing as a policy over LittleBird layers.

Dimension legend: ``n`` layers; layer ``i`` is checkpointed when the policy selects it.

Policies:
  ``none``     no layer is checkpointed;
  ``full``     every layer;
  ``every_k``  layers ``0, k, 2k, ...`` (memory falls roughly by ``1 / k`` of the layer
               activations saved by ``full``; recomputation costs ``1 / k`` of its time).

A checkpointed layer saves only its inputs ``(x, p, layout)`` and recomputes its forward
during backward. The layer's own ``GradientCheckpointingLayer`` slot is used, so parameter
names and module hooks are untouched.

Implementations:
  ``torch``      ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` (default): exact
                 gradients even when an input does not require grad, and the RNG state of the
                 inputs' devices is restored before recomputation, so dropout masks (including
                 the forked head-shard masks, whose seed is drawn from that state) replay.
  ``deepspeed``  ``deepspeed.checkpointing.checkpoint`` after
                 ``deepspeed.checkpointing.configure(mpu, partition_activations=...)``: with
                 tensor parallelism it can partition the saved inputs over TP ranks. It is
                 reentrant: the first layer's inputs must require grad (they do: ``x`` comes
                 from the embeddings, ``p`` from ``packed_init``).

Apply it after ``parallelize`` and before ``deepspeed.initialize``.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.modeling import LittleBirdModel

POLICIES = ("none", "full", "every_k")
IMPLEMENTATIONS = ("torch", "deepspeed")


def _layers(model: nn.Module) -> nn.ModuleList:
    base = model if isinstance(model, LittleBirdModel) else getattr(model, "littlebird", None)
    if not isinstance(base, LittleBirdModel):
        raise TypeError(f"expected a LittleBird model, got {type(model).__name__}")
    return base.layers


def _deepspeed_checkpoint(ds_checkpoint, function, x, p, layout):
    """DeepSpeed's checkpoint sees only the tensors ``x, p``: its partitioned path mishandles
    non-tensor arguments, so the layout (shared by all layers, never differentiated) is closed over."""
    if p is None:  # no pack attention: one tensor in, (x, None) out
        return ds_checkpoint(lambda x_: function(x_, None, layout)[0], x), None
    return ds_checkpoint(lambda x_, p_: function(x_, p_, layout), x, p)


def apply_activation_checkpointing(model: nn.Module, policy: str = "full", every_k: int = 2, impl: str = "torch",
                                   mpu=None, partition_activations: bool = False) -> nn.Module:
    """Set activation checkpointing on ``model``'s layers by ``policy`` and return the model.

    ``impl="deepspeed"`` configures DeepSpeed's checkpointing with ``mpu`` (a ``ParallelState``)
    and ``partition_activations``. Checkpointing only acts in training mode with grad enabled.
    """
    if policy not in POLICIES:
        raise ValueError(f"activation checkpointing policy must be one of {POLICIES}, got {policy!r}")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"activation checkpointing impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if policy == "every_k" and (isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1):
        raise ValueError(f"every_k must be an integer >= 1, got {every_k!r}")
    if impl == "torch":
        fn = partial(checkpoint, use_reentrant=False)
    else:
        import deepspeed  # noqa: PLC0415  (optional dependency, only for this implementation)

        deepspeed.checkpointing.configure(mpu, partition_activations=partition_activations)
        fn = partial(_deepspeed_checkpoint, deepspeed.checkpointing.checkpoint)
    for i, layer in enumerate(_layers(model)):
        on = policy == "full" or (policy == "every_k" and i % every_k == 0)
        layer.gradient_checkpointing = on
        layer._gradient_checkpointing_func = fn if on else None
    return model
