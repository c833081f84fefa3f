"""Padding Insertion (spec section 5): spread pad tokens inside short examples.

Trained only on short inputs, a model with a position bias never sees long distances or
sparse windows. Padding Insertion makes a short example look long: with probability ``p``
an example of real length ``l`` gets a target length ``L'`` drawn uniformly from
``[l, max_length]`` (``max_length`` a multiple of the block size), and ``L' - l`` pad tokens
are inserted between its tokens, in ``k`` runs at ``k`` distinct random gaps (``k`` uniform
in ``1..min(gaps, pads, max_runs)``, run sizes a uniform random composition of the pads).

Contract:

* the real tokens keep their order; inserted pads have id ``pad_token_id``, attention mask
  0, label -100 (``IGNORE_INDEX``) and the token type of the real token right after them;
* no pad goes before position ``protected_prefix`` (default 1: never before ``[CLS]``; for
  QA pass the length of ``[CLS] question [SEP]``), nor inside a ``keep_together`` span
  (e.g. the answer), nor after the last real token (that would be ordinary padding);
* the real length is the position of the last attended token plus one; trailing padding is
  dropped and, for batches, added back to the longest row (``pad_to_multiple_of``);
* ``index_map[i]`` is the new position of old position ``i`` (``map_positions`` applies it
  to answer starts/ends or span boundaries; negative positions, "no answer"/"ignored"
  markers, are kept as they are).

The model gives inserted pads their own position index (nothing is compacted), so the
position bias sees long distances, as in a long document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "PaddingInsertion",
    "insert_padding",
    "insert_padding_batch",
    "map_positions",
    "plan_insertion",
]

IGNORE_INDEX = -100

# Per-token batch fields this module knows how to fill at inserted pads; token_type_ids is
# special-cased (neighbour's type) and input_ids gets pad_token_id.
DEFAULT_FILL: dict[str, int] = {
    "attention_mask": 0,
    "labels": IGNORE_INDEX,
    "span_left": -1,
    "span_right": -1,
    "span_offset": -1,
}
# Batch fields whose values are positions in the sequence: remapped through the index map.
DEFAULT_POSITION_KEYS: tuple[str, ...] = ("start_positions", "end_positions", "span_left", "span_right")


def _as_rng(generator: np.random.Generator | torch.Generator | int | None) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator) or generator is None:
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
    return np.random.default_rng(int(generator))


def plan_insertion(
    real_length: int,
    max_length: int,
    rng: np.random.Generator,
    *,
    protected_prefix: int = 1,
    keep_together: Sequence[tuple[int, int]] = (),
    max_runs: int | None = None,
) -> np.ndarray:
    """The index map of one insertion: ``int64 [real_length]``, new position of each token.

    Draws ``L'`` uniformly in ``[real_length, max_length]`` and places ``L' - real_length``
    pads in runs before tokens ``g`` with ``max(protected_prefix, 1) <= g < real_length``,
    skipping gaps inside ``keep_together`` spans (``(start, end)`` inclusive token ranges).
    """
    if max_length < real_length:
        raise ValueError(
            f"max_length={max_length} is shorter than the example's real length {real_length}; "
            "truncate the example first or raise max_length (a multiple of the block size)."
        )
    index_map = np.arange(real_length, dtype=np.int64)
    n_pads = int(rng.integers(real_length, max_length + 1)) - real_length
    allowed = np.zeros(real_length, dtype=bool)
    allowed[max(protected_prefix, 1) :] = True
    for start, end in keep_together:
        if start >= 0 and end >= start:
            allowed[start + 1 : end + 1] = False  # gaps strictly inside the span
    gaps = np.flatnonzero(allowed)
    if n_pads == 0 or len(gaps) == 0:
        return index_map
    k = int(rng.integers(1, min(len(gaps), n_pads, max_runs or n_pads) + 1))
    chosen = rng.choice(gaps, size=k, replace=False)
    cuts = np.sort(rng.choice(np.arange(1, n_pads), size=k - 1, replace=False)) if k > 1 else np.zeros(0, np.int64)
    sizes = np.diff(np.concatenate([[0], cuts, [n_pads]]))
    inserted_before = np.zeros(real_length, dtype=np.int64)
    inserted_before[chosen] = sizes
    return index_map + np.cumsum(inserted_before)


def map_positions(positions: Any, index_map: Any) -> Any:
    """Map old positions to new ones through ``index_map``; negative values stay as they are.

    ``positions``: an int, a sequence, a numpy array or a tensor (returned in the same
    kind). ``index_map``: 1-D, from ``insert_padding``.
    """
    table = np.asarray(index_map.cpu() if isinstance(index_map, torch.Tensor) else index_map, dtype=np.int64)
    if isinstance(positions, (int, np.integer)):
        return int(map_positions(np.array([positions]), table)[0])
    array = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions, dtype=np.int64)
    # Past the real length (trailing padding) positions shift by the total inserted.
    shift = int(table[-1]) + 1 - len(table) if len(table) else 0
    inside = np.take(table, np.clip(array, 0, max(len(table) - 1, 0))) if len(table) else array
    mapped = np.where(array < 0, array, np.where(array < len(table), inside, array + shift))
    if isinstance(positions, torch.Tensor):
        return torch.from_numpy(mapped).to(device=positions.device, dtype=positions.dtype)
    if isinstance(positions, np.ndarray):
        return mapped
    return mapped.tolist()


@dataclass
class PaddingInsertion:
    """Result of ``insert_padding`` on one example (same kind as the input: list or tensor).

    ``labels`` is None when none were given. ``index_map[i]`` is the new position of old
    position ``i`` for ``i < real length``; ``inserted`` says whether any pad was inserted.
    """

    input_ids: Any
    attention_mask: Any
    token_type_ids: Any
    labels: Any
    index_map: Any
    inserted: bool


def _array(x: Any) -> np.ndarray:
    return np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.int64)


def _apply(
    index_map: np.ndarray, new_length: int, values: np.ndarray, fill: int
) -> np.ndarray:
    out = np.full(new_length, fill, dtype=np.int64)
    out[index_map] = values[: len(index_map)]
    return out


def _right_neighbour(index_map: np.ndarray, new_length: int) -> np.ndarray:
    # Old index of the first real token at or after each new position.
    return np.minimum(np.searchsorted(index_map, np.arange(new_length)), len(index_map) - 1)


def insert_padding(
    input_ids: Sequence[int] | torch.Tensor,
    *,
    max_length: int,
    probability: float = 1.0,
    attention_mask: Sequence[int] | torch.Tensor | None = None,
    token_type_ids: Sequence[int] | torch.Tensor | None = None,
    labels: Sequence[int] | torch.Tensor | None = None,
    protected_prefix: int = 1,
    keep_together: Sequence[tuple[int, int]] = (),
    pad_token_id: int = 0,
    max_runs: int | None = None,
    generator: np.random.Generator | torch.Generator | int | None = None,
) -> PaddingInsertion:
    """Padding Insertion on one example (1-D list or tensor); see the module docstring.

    With probability ``1 - probability`` the example comes back unchanged except that
    trailing padding is dropped (``index_map`` the identity).
    """
    rng = _as_rng(generator)
    as_tensor = isinstance(input_ids, torch.Tensor)
    ids = _array(input_ids)
    if ids.ndim != 1:
        raise ValueError(f"insert_padding takes one example (1-D), got shape {ids.shape}; use insert_padding_batch")
    mask = np.ones_like(ids) if attention_mask is None else _array(attention_mask)
    types = np.zeros_like(ids) if token_type_ids is None else _array(token_type_ids)
    attended = np.flatnonzero(mask)
    real_length = int(attended[-1]) + 1 if len(attended) else 0
    if real_length > 0 and rng.random() < probability:
        index_map = plan_insertion(real_length, max_length, rng, protected_prefix=protected_prefix,
                                   keep_together=keep_together, max_runs=max_runs)
    else:
        index_map = np.arange(real_length, dtype=np.int64)
    new_length = int(index_map[-1]) + 1 if real_length else 0
    new_ids = _apply(index_map, new_length, ids, pad_token_id)
    new_mask = _apply(index_map, new_length, mask, 0)
    new_types = types[_right_neighbour(index_map, new_length)] if real_length else types[:0]
    new_labels = None if labels is None else _apply(index_map, new_length, _array(labels), IGNORE_INDEX)

    def out(x: np.ndarray | None) -> Any:
        if x is None:
            return None
        return torch.from_numpy(x).to(input_ids.device) if as_tensor else x.tolist()

    return PaddingInsertion(
        input_ids=out(new_ids), attention_mask=out(new_mask), token_type_ids=out(new_types),
        labels=out(new_labels), index_map=out(index_map), inserted=new_length > real_length,
    )


def insert_padding_batch(
    batch: Mapping[str, torch.Tensor],
    *,
    max_length: int,
    probability: float = 1.0,
    protected_prefix: int | Sequence[int] | torch.Tensor = 1,
    keep_together: Sequence[Sequence[tuple[int, int]]] | None = None,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    max_runs: int | None = None,
    position_keys: Sequence[str] = DEFAULT_POSITION_KEYS,
    fill_values: Mapping[str, int] | None = None,
    generator: np.random.Generator | torch.Generator | int | None = None,
    shared_cap: bool = False,
) -> dict[str, torch.Tensor]:
    """Padding Insertion on a collated batch; each row is decided and drawn independently.

    A batch is as long as its longest row, so with independent targets in
    ``[l, max_length]`` a batch of 16 rows is nearly ``max_length`` long whenever a few rows
    get Padding Insertion: the whole batch pays for the longest target. ``shared_cap=True``
    first draws one cap ``C`` uniformly in ``[longest real row, max_length]`` (rounded up to
    ``pad_to_multiple_of``) and then each row its target in ``[l, C]``: every target up to
    ``max_length`` still occurs, and a batch costs about half way between its real length and
    ``max_length`` instead of nearly all of it.

    Args:
        batch: ``input_ids`` ``[B, L]`` and any other tensors. Per-token tensors (shape
            ``[B, L]``) are moved with their tokens and filled at inserted pads
            (``DEFAULT_FILL`` updated by ``fill_values``; ``token_type_ids`` takes the next
            real token's type). Tensors named in ``position_keys`` hold positions and are
            remapped (per-token ones too, before the move). Other tensors are passed through.
        protected_prefix: one int for all rows or one per row (QA: question length + 2).
        keep_together: per row, inclusive token spans never split by pads (e.g. answers).
        pad_to_multiple_of: round the batch length up (e.g. the block size).
        shared_cap: draw one cap on the targets per batch (see above).

    Returns:
        The new batch, plus ``index_map`` ``[B, L]`` (new position of each old position;
        -1 past a row's real length).

    Raises:
        ValueError: a per-token tensor without a known fill value; the message names it.
    """
    rng = _as_rng(generator)
    ids = batch["input_ids"]
    n_rows, length = ids.shape
    device = ids.device
    fills = {**DEFAULT_FILL, **(fill_values or {})}
    per_token = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape]
    unknown = [k for k in per_token if k not in fills and k not in ("input_ids", "token_type_ids")]
    if unknown:
        raise ValueError(
            f"batch fields {unknown} are per-token [B, L] but have no fill value for inserted pads; "
            "pass fill_values={name: value} (e.g. -100 for ignored labels)."
        )
    prefixes = (
        [int(p) for p in protected_prefix.tolist()] if isinstance(protected_prefix, torch.Tensor)
        else [protected_prefix] * n_rows if isinstance(protected_prefix, int) else [int(p) for p in protected_prefix]
    )
    arrays = {k: _array(batch[k]) for k in per_token}
    mask = arrays.get("attention_mask", np.ones((n_rows, length), dtype=np.int64))
    reals = [int(np.flatnonzero(mask[b])[-1]) + 1 if mask[b].any() else 0 for b in range(n_rows)]
    cap = max_length
    if shared_cap:
        longest = max(reals + [0])
        if longest > max_length:
            raise ValueError(
                f"max_length={max_length} is shorter than the batch's longest row ({longest} tokens); "
                "truncate the examples first or raise max_length (a multiple of the block size)."
            )
        cap = int(rng.integers(longest, max_length + 1))
        if pad_to_multiple_of:
            cap = min(max_length, -(-cap // pad_to_multiple_of) * pad_to_multiple_of)
    maps: list[np.ndarray] = []
    for b, real_length in enumerate(reals):
        if real_length > 0 and rng.random() < probability:
            maps.append(plan_insertion(real_length, cap, rng, protected_prefix=prefixes[b],
                                       keep_together=keep_together[b] if keep_together else (), max_runs=max_runs))
        else:
            maps.append(np.arange(real_length, dtype=np.int64))
    new_length = max([int(m[-1]) + 1 for m in maps if len(m)] + [1])
    if pad_to_multiple_of:
        new_length = -(-new_length // pad_to_multiple_of) * pad_to_multiple_of

    out: dict[str, torch.Tensor] = {}
    index_map = np.full((n_rows, length), -1, dtype=np.int64)
    for b, m in enumerate(maps):
        index_map[b, : len(m)] = m
    for key, value in batch.items():
        if key in per_token:
            array = arrays[key]
            if key in position_keys:
                array = np.stack([map_positions(array[b], maps[b]) if len(maps[b]) else array[b] for b in range(n_rows)])
            fill = pad_token_id if key == "input_ids" else fills.get(key, 0)
            new = np.full((n_rows, new_length), fill, dtype=np.int64)
            for b, m in enumerate(maps):
                new[b, m] = array[b, : len(m)]
                if key == "token_type_ids" and len(m):
                    # inserted pads take the next real token's type; trailing padding keeps 0
                    new[b, : int(m[-1]) + 1] = array[b][_right_neighbour(m, int(m[-1]) + 1)]
            out[key] = torch.from_numpy(new).to(device=device, dtype=value.dtype)
        elif key in position_keys and isinstance(value, torch.Tensor):
            positions = value.cpu().numpy().astype(np.int64)
            mapped = np.stack([
                map_positions(positions[b], maps[b]) if len(maps[b]) else positions[b] for b in range(n_rows)
            ])
            out[key] = torch.from_numpy(mapped).to(device=device, dtype=value.dtype)
        else:
            out[key] = value
    out["index_map"] = torch.from_numpy(index_map).to(device)
    return out
