"""Masked-LM data: tokenize documents once, cut them into windows, collate with span masking
(and optionally Padding Insertion and recurring span selection), and the fixed masked
validation batches. Used by ``pretrain`` and ``distill`` (see :mod:`littlebird_ds.train.pretrain`
for the whole data path).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils.io import atomic_write
from .padding_insertion import DEFAULT_POSITION_KEYS, insert_padding_batch
from .span_masking import SpanMaskingCollator, _as_rng, build_rss_example

_log = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Keys of a collated batch the model takes; the collator's SBO fields are dropped.
MODEL_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "labels")
#: Recurring-span-selection targets ``[B, Q]`` (positions; -1 / -100 in unused slots).
RSS_KEYS: tuple[str, ...] = ("rss_questions", "rss_starts", "rss_ends")


TOKEN_CACHE_ENV = "LITTLEBIRD_DS_CACHE"


def token_cache_dir() -> Path | None:
    """Where tokenized corpora are kept: ``$LITTLEBIRD_DS_CACHE/tokens`` (``off`` disables it),
    else ``~/.cache/littlebird_ds/tokens``. The pipeline points it at ``OUT/cache`` for its
    stages, which multi-node runs keep on storage every node shares."""
    root = os.environ.get(TOKEN_CACHE_ENV)
    if root is not None and root.strip().lower() in ("", "off", "0", "none"):
        return None
    return Path(root).expanduser() / "tokens" if root else Path.home() / ".cache" / "littlebird_ds" / "tokens"


def _token_cache_key(texts: Iterable[str], tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer has no serialised form to key on
        return None
    h = hashlib.sha256(b"littlebird-ds tokens v2\0")
    h.update(backend.to_str().encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class TokenizedDocuments(Sequence[np.ndarray]):
    """The token ids of a corpus's documents: document ``i`` is ``ids[offsets[i]:offsets[i + 1]]``,
    a view (``int32``), with ``ids`` memory-mapped from the token cache, so a corpus larger than
    memory is read from disk as windows are drawn."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenize_documents(texts: Sequence[str] | Callable[[], Iterable[str]], tokenizer, batch_size: int = 16,
                       show_progress: bool = True) -> TokenizedDocuments:
    """Token ids (``int32``, no special tokens) of each text, in batched fast-tokenizer calls.

    ``texts`` is a sequence, or a function returning a fresh iterator over them (a streamed
    corpus, read twice: once to find it in the cache, once to tokenize it), so the texts are
    never all in memory. Tokenized once: the ids go to the token cache (:func:`token_cache_dir`),
    keyed by the tokenizer's full definition and every text, as a flat ``int32`` file
    (``KEY.ids``, written as the tokenizer goes, then memory-mapped) and its document offsets
    (``KEY.offsets.npy``, written last: its presence marks a complete entry). Later runs, the
    pipeline's later stages and other ranks map it instead of tokenizing again; a damaged entry
    is tokenized again. Without a cache the ids are kept in memory."""
    source = texts if callable(texts) else (lambda: texts)
    cache = token_cache_dir()
    key = _token_cache_key(source(), tokenizer) if cache is not None else None
    if key is not None:
        ids_path, offsets_path = cache / f"{key}.ids", cache / f"{key}.offsets.npy"
        if offsets_path.is_file():
            try:
                return _map_cached(ids_path, offsets_path)
            except (OSError, ValueError) as e:
                _log.warning(f"token cache {ids_path} is damaged ({e}); tokenizing again")
        try:
            return _tokenize_into_cache(source(), tokenizer, batch_size, show_progress, ids_path, offsets_path)
        except OSError as e:  # a read-only or full cache only costs the time it would have saved
            _log.warning(f"could not write the token cache {ids_path} ({e}); continuing in memory")
    chunks: list[np.ndarray] = []
    lengths = [0]
    for ids in _tokenize(source(), tokenizer, batch_size, show_progress):
        chunks.append(ids)
        lengths.append(len(ids))
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return TokenizedDocuments(flat, np.cumsum(lengths, dtype=np.int64))


def _map_cached(ids_path: Path, offsets_path: Path) -> TokenizedDocuments:
    offsets = np.load(offsets_path, allow_pickle=False)
    n = int(offsets[-1]) if len(offsets) else -1
    size = ids_path.stat().st_size
    if offsets.ndim != 1 or n < 0 or size != 4 * n or (len(offsets) > 1 and bool((np.diff(offsets) < 0).any())):
        raise ValueError(f"{ids_path.name} has {size} bytes, its offsets say {4 * max(n, 0)}")
    ids = np.memmap(ids_path, dtype=np.int32, mode="r", shape=(n,)) if n else np.zeros(0, dtype=np.int32)
    return TokenizedDocuments(ids, offsets)


def _tokenize_into_cache(texts: Iterable[str], tokenizer, batch_size: int, show_progress: bool,
                         ids_path: Path, offsets_path: Path) -> TokenizedDocuments:
    lengths = [0]

    def write_ids(f) -> None:
        for ids in _tokenize(texts, tokenizer, batch_size, show_progress):
            f.write(ids.tobytes())
            lengths.append(len(ids))

    atomic_write(ids_path, write_ids, binary=True)
    offsets = np.cumsum(lengths, dtype=np.int64)
    atomic_write(offsets_path, lambda f: np.save(f, offsets, allow_pickle=False), binary=True)
    return _map_cached(ids_path, offsets_path)


def _tokenize(texts: Iterable[str], tokenizer, batch_size: int, show_progress: bool) -> Iterator[np.ndarray]:
    """Each text's ids, tokenized ``batch_size`` texts per call, as the texts stream in."""
    total = len(texts) if hasattr(texts, "__len__") else None
    bar = tqdm(total=total, desc="tokenize", unit="doc", disable=not show_progress, file=sys.stderr)
    it = iter(texts)
    while chunk := list(itertools.islice(it, max(1, batch_size))):
        # verbose=False: documents are longer than model_max_length on purpose; windows cut them.
        enc = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)
        for ids in enc["input_ids"]:
            yield np.asarray(ids, dtype=np.int32)
        bar.update(len(chunk))
    bar.close()


def tokenized_corpus_splits(corpus: str, tokenizer, *, text_field: str = "text", validation_fraction: float = 0.05,
                            seed: int = 0, batch_size: int = 16,
                            show_progress: bool = True) -> tuple[TokenizedDocuments, TokenizedDocuments]:
    """``(train, validation)`` token ids of a corpus (any source ``iter_corpus`` reads), split by
    document id hash, streamed through :func:`tokenize_documents`: a corpus is never held in
    memory as text, and its ids are memory-mapped from the token cache."""
    from .corpus import iter_corpus, iter_split, unique_ids

    def split(name: str) -> Callable[[], Iterator[str]]:
        return lambda: (d.text for d in unique_ids(iter_split(iter_corpus(corpus, text_field=text_field), name,
                                                              validation_fraction, seed), corpus))

    train = tokenize_documents(split("train"), tokenizer, batch_size, show_progress)
    val = tokenize_documents(split("validation"), tokenizer, batch_size, show_progress) \
        if validation_fraction > 0 else TokenizedDocuments(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64))
    if 0.0 < validation_fraction < 1.0 and len(train) + len(val) >= 2 and not (len(train) and len(val)):
        raise ValueError(
            f"split of {len(train) + len(val)} documents at validation_fraction={validation_fraction} left the "
            f"{'validation' if len(train) else 'train'} split empty. Use another seed or fraction, or a corpus "
            "with more documents."
        )
    return train, val


def window_spans(doc_lengths: Iterable[int], max_length: int) -> list[tuple[int, int, int]]:
    """``(document, start, end)`` token ranges of the examples cut from documents.

    Each range holds at most ``max_length - 2`` tokens (room for ``[CLS]`` and ``[SEP]``)
    of one document. Windows follow each other without overlap, except the last window of
    a document longer than one window, which ends at the document's end (overlapping its
    predecessor) so it is full length. Empty documents give no window.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be at least 3 ([CLS], one token, [SEP]), got {max_length}")
    width = max_length - 2
    spans: list[tuple[int, int, int]] = []
    for d, n in enumerate(doc_lengths):
        n = int(n)
        if n == 0:
            continue
        if n <= width:
            spans.append((d, 0, n))
            continue
        starts = list(range(0, n - width + 1, width))
        if starts[-1] + width < n:
            starts.append(n - width)
        spans.extend((d, s, s + width) for s in starts)
    return spans


class WindowDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``[CLS] window [SEP]`` examples (lists of ids) over tokenised
    documents; windows from :func:`window_spans`. Holds the documents' ids once, no copies."""

    def __init__(self, docs: Sequence[np.ndarray], max_length: int, cls_token_id: int, sep_token_id: int):
        self.docs = docs if isinstance(docs, TokenizedDocuments) else list(docs)
        self.max_length = max_length
        self.cls_token_id = int(cls_token_id)
        self.sep_token_id = int(sep_token_id)
        # [windows, 3] int64 (document, start, end): 24 bytes a window, for corpora of any size.
        lengths = self.docs.lengths() if isinstance(self.docs, TokenizedDocuments) else (len(d) for d in self.docs)
        spans = window_spans(lengths, max_length)
        self.spans = np.asarray(spans, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> list[int]:
        d, s, e = (int(x) for x in self.spans[i])
        return [self.cls_token_id, *self.docs[d][s:e].tolist(), self.sep_token_id]


def _model_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_KEYS + RSS_KEYS if k in batch}


def _rss_masked_batch(examples: Sequence[Any], collator, question_token_id: int, max_questions: int,
                      generator) -> dict[str, torch.Tensor]:
    """Recurring span selection on each example, then span masking of what is left (kept
    occurrences are never masked); adds :data:`RSS_KEYS` ``[B, Q]`` to the batch."""
    rng = _as_rng(generator)
    rows = [build_rss_example(ex, question_token_id=question_token_id, word_start=collator.word_start,
                              special=collator.special, max_groups=max_questions, generator=rng) for ex in examples]
    masked_in = []
    for r in rows:
        keep = np.zeros(len(r.input_ids), dtype=bool)
        for a, b in zip(r.answer_starts, r.answer_ends):
            keep[a : b + 1] = True
        masked_in.append({"input_ids": r.input_ids, "keep_unmasked": keep})
    batch = collator(masked_in)
    q = max([len(r.question_positions) for r in rows] + [1])
    if q == batch["input_ids"].shape[1]:
        q += 1  # never [B, L]: Padding Insertion would take [B, L] tensors for per-token ones
    questions = torch.full((len(rows), q), -1, dtype=torch.long)
    starts = torch.full((len(rows), q), IGNORE_INDEX, dtype=torch.long)
    ends = torch.full((len(rows), q), IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.question_positions)
        questions[b, :n] = torch.tensor(r.question_positions, dtype=torch.long)
        starts[b, :n] = torch.tensor(r.answer_starts, dtype=torch.long)
        ends[b, :n] = torch.tensor(r.answer_ends, dtype=torch.long)
    return {**batch, "rss_questions": questions, "rss_starts": starts, "rss_ends": ends}


def make_train_collate(tokenizer, *, mask_rate: float = 0.15, pad_to_multiple_of: int | None = None,
                       padding_insertion: float = 0.0, pi_max_length: int | None = None,
                       rss_max_questions: int | None = None) -> Callable:
    """The training collate function: recurring span selection (when ``rss_max_questions``),
    span masking, then (optionally) Padding Insertion.

    Randomness comes from torch's global RNG (``generator=None``), whose state the engine
    checkpoints, so a resumed run draws the same masks as an uninterrupted one.
    """
    collator = SpanMaskingCollator.from_tokenizer(tokenizer, mask_rate=mask_rate,
                                                  pad_to_multiple_of=pad_to_multiple_of, generator=None)

    def collate(examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if rss_max_questions:
            batch = _rss_masked_batch(examples, collator, tokenizer.mask_token_id, rss_max_questions, None)
        else:
            batch = collator(examples)
        if padding_insertion > 0:
            batch = insert_padding_batch(batch, max_length=int(pi_max_length), probability=padding_insertion,
                                         pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                                         position_keys=DEFAULT_POSITION_KEYS + RSS_KEYS, generator=None, shared_cap=True)
        return _model_batch(batch)

    return collate


def fixed_eval_batches(dataset: WindowDataset, tokenizer, *, batch_size: int, max_examples: int, seed: int,
                       mask_rate: float = 0.15, pad_to_multiple_of: int | None = None,
                       rss_max_questions: int | None = None) -> list[dict[str, torch.Tensor]]:
    """A deterministic masked validation set: up to ``max_examples`` windows, evenly spaced
    over ``dataset``, masked (and with ``rss_max_questions``, given recurring-span questions)
    with a generator seeded ``seed``; CPU tensors in batches."""
    n = len(dataset)
    if n == 0:
        return []
    idx = np.unique(np.linspace(0, n - 1, num=min(n, max_examples)).round().astype(int)).tolist()
    rng = np.random.default_rng(seed)
    collator = SpanMaskingCollator.from_tokenizer(tokenizer, mask_rate=mask_rate, pad_to_multiple_of=pad_to_multiple_of,
                                                  generator=rng)
    batches = []
    for j in range(0, len(idx), batch_size):
        examples = [dataset[i] for i in idx[j:j + batch_size]]
        if rss_max_questions:
            batches.append(_model_batch(_rss_masked_batch(examples, collator, tokenizer.mask_token_id,
                                                          rss_max_questions, rng)))
        else:
            batches.append(_model_batch(collator(examples)))
    return batches
