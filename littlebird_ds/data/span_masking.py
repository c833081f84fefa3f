"""SpanBERT span masking as a DataLoader collator, and recurring span selection (RSS) examples.

Span masking (Joshi et al. 2020, as in spec section 5), per example:

* A *word* is a piece that starts a word (SentencePiece: begins with ``"▁"``, or follows a
  special token) plus its continuation pieces. Special tokens are never masked and end words.
* The masking budget is ``max(1, round(mask_rate * n))`` tokens, ``n`` the example's real
  non-special tokens.
* Span lengths in words are drawn from a geometric distribution with ``p = 0.2`` truncated
  at 10 words, as SpanBERT's reference code does: ``P(L = k) ∝ p (1-p)^(k-1)`` for
  ``k = 1..10`` (mean ≈ 3.79, SpanBERT's "3.8"; see ``span_length_distribution``).
* Each span's first word is drawn uniformly among the positions where the whole span fits
  without touching an earlier span (redrawn up to ``max_placement_tries`` times, keeping
  the length, so the length distribution is not bent towards short spans); a span that
  cannot be placed is dropped to one word anywhere free. Spans are added until the budget is
  met; the last one stops at the first whole word that meets it, so words are never split.
* Per span: 80% of spans become ``[MASK]``, 10% random tokens (drawn per token from the
  non-special vocabulary), 10% stay unchanged. ``labels`` hold the original id on masked
  tokens and -100 elsewhere.

For the optional span boundary objective the collator also returns, per token, the position
of the token just left and just right of its span (``span_left``, ``span_right``; clamped
to the sequence) and its offset inside the span (``span_offset``, 0-based), all -1 on
tokens that are not masked. Placed spans never touch, so boundary tokens are unmasked
(only a rare fallback one-word span may touch another).

Randomness comes only from the ``generator`` passed in (``numpy.random.Generator``, a
``torch.Generator`` or an int seed), so results are reproducible. With ``generator=None``
each call seeds from torch's global RNG, which a DataLoader seeds differently per worker;
a shared explicit generator would give every worker the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "RSSExample",
    "SpanMaskingCollator",
    "build_rss_example",
    "sample_masked_spans",
    "span_length_distribution",
    "word_spans",
]

IGNORE_INDEX = -100


def span_length_distribution(p: float = 0.2, max_words: int = 10) -> np.ndarray:
    """``P(L = k)`` for ``k = 1..max_words``: a geometric(``p``) law truncated and renormalised.

    Its mean is ``sum(k * P(L = k))``, about 3.79 for the defaults.
    """
    if not 0.0 < p <= 1.0 or max_words < 1:
        raise ValueError(f"need 0 < p <= 1 and max_words >= 1, got p={p}, max_words={max_words}")
    k = np.arange(1, max_words + 1)
    weights = p * (1.0 - p) ** (k - 1)
    return weights / weights.sum()


def _as_rng(generator: np.random.Generator | torch.Generator | int | None) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator) or generator is None:
        # One draw from the torch generator seeds this call's numpy generator.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return np.random.default_rng(seed)
    return np.random.default_rng(int(generator))


def word_start_table(pieces: Sequence[str]) -> np.ndarray:
    """Bool ``[V]``: piece ``i`` starts a word, by the vocabulary's marker convention
    (``"▁"`` SentencePiece, ``"Ġ"`` byte-level BPE, else ``"##"`` WordPiece continuations).
    The convention is the one whose marker the most pieces carry."""
    counts = {m: sum(p.startswith(m) for p in pieces) for m in ("▁", "Ġ", "##")}
    marker = max(counts, key=counts.get)
    if counts[marker] == 0:
        raise ValueError("cannot tell word starts in this vocabulary: no piece begins with '▁' (SentencePiece), "
                         "'Ġ' (byte-level BPE) or '##' (WordPiece); build SpanMaskingCollator(word_start=...) yourself")
    if marker == "##":
        return np.array([not p.startswith("##") for p in pieces], dtype=bool)
    return np.array([p.startswith(marker) for p in pieces], dtype=bool)


def word_spans(
    input_ids: Sequence[int], word_start: np.ndarray, special: np.ndarray, length: int | None = None
) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` token ranges of the words of ``input_ids[:length]``.

    ``word_start[id]``: the piece starts a word; ``special[id]``: never masked, not in a word.
    """
    ids = np.asarray(input_ids[: len(input_ids) if length is None else length], dtype=np.int64)
    is_special = special[ids]
    starts = word_start[ids] & ~is_special
    # A non-special piece right after a special one (or at position 0) starts a word too.
    prev_special = np.concatenate([[True], is_special[:-1]]) if len(ids) else np.zeros(0, dtype=bool)
    starts |= prev_special & ~is_special
    first = np.flatnonzero(starts)
    # A word ends at the next word start or special token, or at the end.
    boundaries = np.append(np.flatnonzero(starts | is_special), len(ids))
    end = boundaries[np.searchsorted(boundaries, first, side="right")]
    return list(zip(first.tolist(), end.tolist()))


def sample_masked_spans(
    words: Sequence[tuple[int, int]],
    budget: int,
    rng: np.random.Generator,
    length_probs: np.ndarray,
    max_placement_tries: int = 20,
) -> list[tuple[int, int, int]]:
    """Choose disjoint, non-touching word spans covering at least ``budget`` tokens (or all).

    Returns ``(first_word, end_word, sampled_length)`` triples (``end_word`` exclusive), in
    the order drawn. See the module docstring for the procedure.
    """
    n_words = len(words)
    taken = np.zeros(n_words + 2, dtype=bool)  # padded by one word each side: taken[w + 1]
    spans: list[tuple[int, int, int]] = []
    masked = 0
    cdf = np.cumsum(length_probs)
    cdf[-1] = 1.0  # guard against rounding leaving u >= cdf[-1]
    if budget > n_words:  # more than all words can hold only if near-everything is masked
        budget = min(budget, sum(e - s for s, e in words))
    while masked < budget:
        length = int(np.searchsorted(cdf, rng.random(), side="right")) + 1
        length = min(length, n_words)
        first = -1
        for _ in range(max_placement_tries):
            cand = int(rng.integers(0, n_words - length + 1))
            # the span and one word on each side must be free, so spans never touch
            if not taken[cand : cand + length + 2].any():
                first = cand
                break
        if first < 0:
            free = np.flatnonzero(~taken[1 : n_words + 1])
            if len(free) == 0:
                break
            first, length = int(rng.choice(free)), 1
        end = first
        while end < first + length and masked < budget:
            masked += words[end][1] - words[end][0]
            taken[end + 1] = True
            end += 1
        spans.append((first, end, length))
    return spans


@dataclass
class SpanMaskingCollator:
    """Collate token id lists into a span-masked MLM batch (see the module docstring).

    Build it with ``SpanMaskingCollator.from_tokenizer(tokenizer, ...)`` or directly from the
    id tables. Call it on a list of examples, each a list/1-D tensor of ids or a mapping with
    ``input_ids`` (and optionally ``token_type_ids``, ``attention_mask``, and
    ``keep_unmasked``: positions never to mask, treated like special tokens). Returns ``int64``
    tensors ``[B, L]``: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``,
    ``span_left``, ``span_right``, ``span_offset``; ``L`` is the longest example, rounded up
    to ``pad_to_multiple_of``.

    Attributes:
        word_start: bool ``[V]``, piece id starts a word.
        special: bool ``[V]``, piece id is never masked (pad, cls, sep, mask, ...).
        mask_token_id, pad_token_id: ids of ``[MASK]`` and ``[PAD]``.
        mask_rate: share of real tokens to mask (0.15).
        geometric_p, max_span_words: span length law (0.2, 10 words).
        replace_mask, replace_random: per-span shares of ``[MASK]`` and random tokens
            (0.8, 0.1); the rest stay unchanged.
        pad_to_multiple_of: e.g. the block size, or None.
        generator: seed source (see module docstring); advanced on every call.
        max_placement_tries: anchor redraws before a span falls back to one word.
    """

    word_start: np.ndarray
    special: np.ndarray
    mask_token_id: int
    pad_token_id: int = 0
    mask_rate: float = 0.15
    geometric_p: float = 0.2
    max_span_words: int = 10
    replace_mask: float = 0.8
    replace_random: float = 0.1
    pad_to_multiple_of: int | None = None
    generator: np.random.Generator | torch.Generator | int | None = None
    max_placement_tries: int = 20

    def __post_init__(self) -> None:
        self.word_start = np.asarray(self.word_start, dtype=bool)
        self.special = np.asarray(self.special, dtype=bool)
        if self.word_start.shape != self.special.shape:
            raise ValueError(f"word_start {self.word_start.shape} and special {self.special.shape} must both be [vocab]")
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}")
        if self.replace_mask < 0 or self.replace_random < 0 or self.replace_mask + self.replace_random > 1:
            raise ValueError("replace_mask and replace_random must be >= 0 and sum to at most 1")
        self.length_probs = span_length_distribution(self.geometric_p, self.max_span_words)
        self._unmaskable = self.special.copy()
        self._unmaskable[self.pad_token_id] = True
        self.random_ids = np.flatnonzero(~self._unmaskable)
        if len(self.random_ids) == 0:
            raise ValueError("every id is special: nothing to draw random replacement tokens from")
        if isinstance(self.generator, int):
            self.generator = np.random.default_rng(self.generator)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> SpanMaskingCollator:
        """Tables from a HF tokenizer; its special ids (``all_special_ids``) are never masked.

        Which pieces start a word follows the tokenizer's own convention, read from its
        vocabulary: SentencePiece marks word starts with ``"▁"``, byte-level BPE (GPT-2,
        RoBERTa) with ``"Ġ"``, and WordPiece (BERT, MiniLM) marks continuations with ``"##"``
        instead, so there every other piece starts a word."""
        vocab_size = len(tokenizer)
        pieces = [p or "" for p in tokenizer.convert_ids_to_tokens(list(range(vocab_size)))]
        word_start = word_start_table(pieces)
        special = np.zeros(vocab_size, dtype=bool)
        special[list(tokenizer.all_special_ids)] = True
        kwargs.setdefault("mask_token_id", tokenizer.mask_token_id)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        return cls(word_start=word_start, special=special, **kwargs)

    def _rng(self) -> np.random.Generator:
        return _as_rng(self.generator)

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        rng = self._rng()
        rows = [_unpack(ex) for ex in examples]
        if not rows:
            raise ValueError("SpanMaskingCollator got an empty batch")
        length = max(len(ids) for ids, _, _, _ in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), length)
        input_ids = np.full(shape, self.pad_token_id, dtype=np.int64)
        attention = np.zeros(shape, dtype=np.int64)
        token_type = np.zeros(shape, dtype=np.int64)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        left = np.full(shape, -1, dtype=np.int64)
        right = np.full(shape, -1, dtype=np.int64)
        offset = np.full(shape, -1, dtype=np.int64)
        for b, (ids, types, mask, keep) in enumerate(rows):
            n = len(ids)
            input_ids[b, :n] = ids
            attention[b, :n] = mask
            token_type[b, :n] = types
            # Padding inside the example (attention 0) and kept positions are treated like special tokens.
            maskable = np.where(mask.astype(bool) & ~keep, ids, self.pad_token_id)
            words = word_spans(maskable, self.word_start, self._unmaskable)
            n_real = int((~self._unmaskable[maskable]).sum())
            if n_real == 0:
                continue
            budget = max(1, round(self.mask_rate * n_real))
            for first, end, _ in sample_masked_spans(words, budget, rng, self.length_probs, self.max_placement_tries):
                start_tok, end_tok = words[first][0], words[end - 1][1]
                positions = np.arange(start_tok, end_tok)
                # A span of several words may enclose a special or kept token between two of
                # them (a question token, an inserted pad): that one stays as it is.
                positions = positions[~self._unmaskable[maskable[positions]]]
                labels[b, positions] = ids[positions]
                left[b, positions] = max(start_tok - 1, 0)
                right[b, positions] = min(end_tok, n - 1)
                offset[b, positions] = positions - start_tok
                u = rng.random()
                if u < self.replace_mask:
                    input_ids[b, positions] = self.mask_token_id
                elif u < self.replace_mask + self.replace_random:
                    input_ids[b, positions] = rng.choice(self.random_ids, size=len(positions))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.from_numpy(token_type),
            "labels": torch.from_numpy(labels),
            "span_left": torch.from_numpy(left),
            "span_right": torch.from_numpy(right),
            "span_offset": torch.from_numpy(offset),
        }


def _unpack(example: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, token_type_ids, attention_mask, keep)`` arrays of one example; ``keep`` (bool,
    from an optional ``keep_unmasked`` field) marks positions never to mask, such as the kept
    occurrence of a recurring span."""
    keep = None
    if isinstance(example, Mapping):
        ids = np.asarray(_to_list(example["input_ids"]), dtype=np.int64)
        types = example.get("token_type_ids")
        mask = example.get("attention_mask")
        keep = example.get("keep_unmasked")
        types = np.zeros_like(ids) if types is None else np.asarray(_to_list(types), dtype=np.int64)
        mask = np.ones_like(ids) if mask is None else np.asarray(_to_list(mask), dtype=np.int64)
    else:
        ids = np.asarray(_to_list(example), dtype=np.int64)
        types, mask = np.zeros_like(ids), np.ones_like(ids)
    keep = np.zeros(ids.shape, dtype=bool) if keep is None else np.asarray(_to_list(keep), dtype=bool)
    if ids.ndim != 1 or types.shape != ids.shape or mask.shape != ids.shape or keep.shape != ids.shape:
        raise ValueError(
            f"each example must be one sequence: input_ids {ids.shape}, token_type_ids {types.shape}, "
            f"attention_mask {mask.shape}, keep_unmasked {keep.shape}; pass un-batched examples (lists or 1-D tensors)."
        )
    return ids, types, mask, keep


def _to_list(x: Any) -> Any:
    return x.tolist() if isinstance(x, torch.Tensor) else x


# ----------------------------------------------------------------------------- RSS


@dataclass
class RSSExample:
    """One recurring-span-selection example.

    Attributes:
        input_ids: the sequence with every occurrence but one of each chosen recurring span
            replaced by a single ``[QUESTION]`` token.
        question_positions: position of each ``[QUESTION]`` in ``input_ids``.
        answer_starts, answer_ends: per question, first and last (inclusive) position in
            ``input_ids`` of the occurrence that was kept; the target of that question.
        spans: per question, the token ids of the recurring span (for inspection and tests).
    """

    input_ids: list[int]
    question_positions: list[int]
    answer_starts: list[int]
    answer_ends: list[int]
    spans: list[tuple[int, ...]]


def build_rss_example(
    input_ids: Sequence[int],
    *,
    question_token_id: int,
    word_start: np.ndarray,
    special: np.ndarray,
    min_words: int = 2,
    max_words: int = 10,
    max_groups: int = 30,
    generator: np.random.Generator | torch.Generator | int | None = None,
) -> RSSExample:
    """Recurring span selection (Ram et al. 2021) on one tokenised document.

    A *recurring span* is a run of ``min_words..max_words`` whole words (no special token)
    whose token ids occur at least twice without overlapping. Longest spans are chosen first
    (ties in random order), each only if none of its occurrences overlaps or touches one
    already chosen, up to ``max_groups`` spans. For each chosen span one occurrence, drawn
    uniformly, is kept; every other occurrence becomes one ``[QUESTION]`` token, whose
    target is the kept occurrence's start and end. ``min_words=2`` by default keeps out
    single frequent words (the paper filters stop words instead).

    With no recurring span the example has no questions and ``input_ids`` unchanged.
    """
    rng = _as_rng(generator)
    ids = [int(i) for i in _to_list(input_ids)]
    words = word_spans(ids, np.asarray(word_start, dtype=bool), np.asarray(special, dtype=bool))
    # Words form a span only inside a run without special tokens: number those runs.
    n_words = len(words)
    run = np.cumsum([0] + [words[k][1] != words[k + 1][0] for k in range(n_words - 1)])
    groups: dict[tuple[int, ...], list[int]] = {}
    for n in range(min_words, max_words + 1):
        for w in range(n_words - n + 1):
            if run[w] != run[w + n - 1]:
                continue  # a special token sits between these words
            key = tuple(ids[words[w][0] : words[w + n - 1][1]])
            groups.setdefault(key, []).append(words[w][0])
    candidates = []
    for key, starts in groups.items():
        kept: list[int] = []
        for s in starts:  # non-overlapping occurrences, left to right
            if not kept or s >= kept[-1] + len(key):
                kept.append(s)
        if len(kept) >= 2:
            candidates.append((len(key), float(rng.random()), key, kept))
    candidates.sort(key=lambda c: (-c[0], c[1]))

    used = np.zeros(len(ids) + 2, dtype=bool)  # used[t + 1]: token t is in a chosen occurrence
    chosen: list[tuple[tuple[int, ...], list[int]]] = []
    for length, _, key, starts in candidates:
        if len(chosen) >= max_groups:
            break
        if any(used[s : s + length + 2].any() for s in starts):
            continue
        for s in starts:
            used[s + 1 : s + length + 1] = True
        chosen.append((key, starts))

    # Which occurrence each chosen span keeps; the others collapse to [QUESTION].
    replace: dict[int, tuple[int, int]] = {}  # start -> (length, group index)
    keep_start: list[int] = []
    for g, (key, starts) in enumerate(chosen):
        keep = int(rng.integers(len(starts)))
        keep_start.append(starts[keep])
        for j, s in enumerate(starts):
            if j != keep:
                replace[s] = (len(key), g)

    new_ids: list[int] = []
    new_pos = [0] * len(ids)  # old position -> new position (for kept tokens)
    question_positions: list[int] = []
    question_group: list[int] = []
    t = 0
    while t < len(ids):
        if t in replace:
            length, g = replace[t]
            question_positions.append(len(new_ids))
            question_group.append(g)
            new_ids.append(question_token_id)
            t += length
            continue
        new_pos[t] = len(new_ids)
        new_ids.append(ids[t])
        t += 1
    answer_starts = [new_pos[keep_start[g]] for g in question_group]
    answer_ends = [new_pos[keep_start[g] + len(chosen[g][0]) - 1] for g in question_group]
    return RSSExample(
        input_ids=new_ids,
        question_positions=question_positions,
        answer_starts=answer_starts,
        answer_ends=answer_ends,
        spans=[chosen[g][0] for g in question_group],
    )
