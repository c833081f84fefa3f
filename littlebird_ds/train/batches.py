"""The data order of a training run: which samples global micro-step ``m`` holds on each
data-parallel rank (see :mod:`.engine`, "Data order"), batches moved to the device, and
token counts for throughput."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch


#: ``batches(start_micro_step, dp_rank, dp_size) -> iterator`` of this rank's micro-batches,
#: starting at global micro-step ``start_micro_step`` (see the module docstring for the order).
BatchIteratorFactory = Callable[[int, int, int], Iterator[Any]]


def dataset_batches(dataset, collate_fn: Callable | None, batch_size: int, seed: int,
                    shuffle: bool = True) -> BatchIteratorFactory:
    """A :data:`BatchIteratorFactory` over a map-style dataset (len + getitem) or an iterable.

    Map-style: epoch ``e`` is a permutation drawn from ``torch.Generator`` seeded ``seed + e``
    (or the identity with ``shuffle=False``); the last incomplete global batch of an epoch is
    dropped, so every rank gets equal-size micro-batches. Positioning is O(1). Iterables
    are read in order and positioned by skipping, which costs a pass over the skipped part.
    """
    collate = collate_fn or torch.utils.data.default_collate

    def factory(start: int, dp_rank: int, dp_size: int) -> Iterator[Any]:
        per_global = batch_size * dp_size
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            n = len(dataset)
            per_epoch = n // per_global
            if per_epoch == 0:
                raise ValueError(
                    f"the training set has {n} samples, fewer than one global micro-batch "
                    f"({batch_size} x {dp_size} data-parallel ranks); use a smaller --batch-size or more data"
                )
            m = start
            while True:
                epoch, i = divmod(m, per_epoch)
                if shuffle:
                    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
                else:
                    order = list(range(n))
                for j in range(i, per_epoch):
                    lo = j * per_global + dp_rank * batch_size
                    yield collate([dataset[k] for k in order[lo: lo + batch_size]])
                m = (epoch + 1) * per_epoch
        else:
            def samples():
                while True:  # restart the iterable at its end: a new pass
                    empty = True
                    for s in dataset:
                        empty = False
                        yield s
                    if empty:
                        raise ValueError("the training iterable yielded no samples")
            it = samples()
            for _ in itertools.islice(it, start * per_global):
                pass
            while True:
                chunk = list(itertools.islice(it, per_global))
                yield collate(chunk[dp_rank * batch_size:(dp_rank + 1) * batch_size])

    return factory


def count_tokens(batch) -> int:
    """Non-pad tokens of a batch: ``attention_mask`` sum, else ``input_ids`` size, else 0."""
    if isinstance(batch, Mapping):
        if batch.get("attention_mask") is not None:
            return int(batch["attention_mask"].sum())
        if batch.get("input_ids") is not None:
            return int(batch["input_ids"].numel())
    return 0


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        return moved if type(batch) is dict else type(batch)(moved)  # keeps BatchEncoding etc.
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
