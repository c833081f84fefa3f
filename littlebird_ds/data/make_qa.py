"""Extractive cloze QA made from a raw corpus, in any language, in SQuAD format.

No QA data exists offline for a low-resource language, so questions are made from the text:

* A **question** is one sentence (a Bible verse, a line) of a document with one content-word
  span blanked out (``style="blank"``: replaced by the tokenizer's mask token or ``blank``) or
  removed (``style="removed"``). Sentences too long for the question budget are cut to the
  words around the blank.
* The **answer** is that span, found in a **context** window of the surrounding document cut to
  a target length in tokens (counted with the model's tokenizer); the answer's position inside
  the window is random. The question's own sentence stays in the context: the task is to find
  the matching sentence anywhere in a long document and copy the blanked words, which is what
  tests long-range attention. A candidate is kept only if its answer text occurs exactly once
  in the context (and not in the question), so the gold span is unambiguous.
* Length: a target length ``L`` is the whole model input ``[CLS] question [SEP] context [SEP]``,
  so the context gets ``L - question_tokens - 3`` tokens and an ``L``-token model reads the
  example in one window. ``target_length`` and ``context_tokens`` are stored on each question.
* **Question budget**: the question must fit LittleBird's global block 0, so at most
  ``block_size - 2`` tokens (see :mod:`littlebird_ds.data.qa`).
* **Splits** are by document (no document in two splits), from a seeded shuffle of the ids.
  Evaluation splits are made at every length in ``lengths`` from the *same* questions (a
  question is kept only if it is valid at all lengths), so F1 against context length compares
  like with like. Everything is deterministic given the seed.

Content words are found without a language's stopword list: the ``function_word_top_k`` most
frequent word types of the corpus are treated as function words, and answer spans start and end
on other words of at least ``min_word_chars`` characters.
"""

from __future__ import annotations

import bisect
import collections
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from littlebird_ds.eval.squad_metrics import normalize_answer
from littlebird_ds.utils.io import atomic_write_json

# Words, keeping apostrophe-joined forms such as Chichewa "m'mawa" whole.
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*", re.UNICODE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass
class ClozeQAConfig:
    """Settings of :func:`make_cloze_qa`; every field is validated in ``__post_init__``."""

    lengths: tuple[int, ...] = (512, 2048, 4096, 8192)
    """Target lengths (tokens of the whole input) of the validation and test sets."""
    train_lengths: tuple[int, ...] = (512,)
    """Target lengths of the training sets (each length sampled independently)."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Fractions of documents in train/validation/test (each non-empty split gets >= 1 doc)."""
    seed: int = 0
    """Seed of the document split and of all sampling."""
    block_size: int = 32
    """The model's block size; questions fit in block 0. The default, 32, is the smallest of
    the presets' (``tiny``), so its questions fit in block 0 of every preset's model."""
    max_question_tokens: int | None = None
    """Question budget in tokens; default ``block_size - 2``."""
    questions_per_document: tuple[int, int, int] = (256, 100, 100)
    """Most questions made per document, for train/validation/test (per target length)."""
    style: str = "blank"
    """``"blank"``: the answer span is replaced by ``blank``; ``"removed"``: it is deleted."""
    blank: str | None = None
    """Blank marker; default the tokenizer's mask token, else ``"_____"``."""
    min_answer_words: int = 1
    max_answer_words: int = 3
    min_sentence_words: int = 5
    """Shorter sentences give too little to match on and are not used as questions."""
    min_word_chars: int = 3
    function_word_top_k: int = 100
    allow_short: bool = False
    """Use a whole document shorter than the context budget as the context (its
    ``context_tokens`` is then below target); by default such documents are skipped at that
    length."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values recorded in the manifest."""

    def __post_init__(self) -> None:
        self.lengths = tuple(int(x) for x in self.lengths)
        self.train_lengths = tuple(int(x) for x in self.train_lengths)
        if self.max_question_tokens is None:
            self.max_question_tokens = self.block_size - 2
        if self.max_question_tokens < 4:
            raise ValueError(
                f"max_question_tokens={self.max_question_tokens} leaves no room for a question; "
                "raise block_size (questions live in block 0: block_size - 2 tokens)"
            )
        for length in self.lengths + self.train_lengths:
            if length - self.max_question_tokens - 3 < 32:
                raise ValueError(
                    f"target length {length} leaves under 32 context tokens after a "
                    f"{self.max_question_tokens}-token question; use lengths >= "
                    f"{self.max_question_tokens + 35}"
                )
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions) or abs(
            sum(self.split_fractions) - 1.0
        ) > 1e-6:
            raise ValueError(
                f"split_fractions={self.split_fractions} must be three non-negative fractions "
                "(train, validation, test) summing to 1"
            )
        if self.style not in ("blank", "removed"):
            raise ValueError(f"style={self.style!r}: choose 'blank' or 'removed'")
        if not 1 <= self.min_answer_words <= self.max_answer_words:
            raise ValueError("need 1 <= min_answer_words <= max_answer_words")


@dataclass
class _Candidate:
    """A question made from one sentence, before a context window is cut."""

    sentence_index: int
    question: str
    question_tokens: int
    answer: str
    answer_char: int  # in the document
    span_char: tuple[int, int]  # the question's sentence part, in the document
    span_tok: tuple[int, int]  # its first and last document token
    position: float  # where the answer sits in every window, as a fraction


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text``: lines, each cut after ``.``, ``!``, ``?``.

    Spans exclude surrounding whitespace; empty lines give none.
    """
    spans: list[tuple[int, int]] = []
    for line in re.finditer(r"[^\n]+", text):
        start = line.start()
        for piece in _SENTENCE_END.split(line.group()):
            pos = text.index(piece, start) if piece else start
            stripped = piece.strip()
            if stripped:
                a = pos + (len(piece) - len(piece.lstrip()))
                spans.append((a, a + len(stripped)))
            start = pos + len(piece)
    return spans


def function_words(documents: Iterable[Any], top_k: int) -> frozenset[str]:
    """The ``top_k`` most frequent lower-cased word types of the documents."""
    counts: collections.Counter[str] = collections.Counter()
    for doc in documents:
        counts.update(w.lower() for w in _WORD.findall(_field(doc, "text")))
    return frozenset(w for w, _ in counts.most_common(top_k))


def split_documents(
    doc_ids: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, list[str]]:
    """Seeded document-level split into ``train``/``validation``/``test`` (disjoint, complete).

    Validation and test get ``round(fraction * n)`` documents, at least one when their
    fraction is positive and there are at least three documents; train gets the rest.
    """
    if len(set(doc_ids)) != len(doc_ids):
        dup = next(d for d, c in collections.Counter(doc_ids).items() if c > 1)
        raise ValueError(f"document id {dup!r} occurs twice; document ids must be unique")
    ids = sorted(doc_ids)
    random.Random(f"split:{seed}").shuffle(ids)
    n = len(ids)

    def share(frac: float) -> int:
        k = round(frac * n)
        return max(k, 1) if frac > 0 and n >= 3 else k

    n_val, n_test = share(fractions[1]), share(fractions[2])
    if fractions[0] > 0 and n_val + n_test >= n and n >= 3:
        raise ValueError(f"{n} documents are too few for the split {tuple(fractions)}")
    return {
        "test": ids[:n_test],
        "validation": ids[n_test : n_test + n_val],
        "train": ids[n_test + n_val :],
    }


def _field(doc: Any, name: str, default: Any = None) -> Any:
    # Documents are dicts or objects with attributes (``corpus.Document``).
    if isinstance(doc, Mapping):
        return doc.get(name, default)
    return getattr(doc, name, default)


def sentence_spans(doc: Any) -> list[tuple[int, int]]:
    """Question sentences of a document: its verses when the corpus records them
    (``meta["verse_offsets"]``, per chapter, as ``load_corpus("chichewa-bible")`` gives),
    else :func:`split_sentences` of its text."""
    meta = _field(doc, "meta") or {}
    verses = meta.get("verse_offsets") if isinstance(meta, Mapping) else None
    if verses:
        return [(int(a), int(b)) for chapter in verses for a, b in chapter if b > a]
    return split_sentences(_field(doc, "text"))


class _Document:
    """A tokenized document: token character offsets for windowing and counting."""

    def __init__(self, doc: Any, tokenizer: Any) -> None:
        self.id = str(_field(doc, "id"))
        self.text: str = _field(doc, "text")
        self.sentences = sentence_spans(doc)
        enc = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
        offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]
        self.tok_starts = [o[0] for o in offsets]
        self.tok_ends = [o[1] for o in offsets]

    @property
    def n_tokens(self) -> int:
        return len(self.tok_starts)

    def token_span(self, a: int, b: int) -> tuple[int, int]:
        """First and last token overlapping characters ``[a, b)``."""
        return bisect.bisect_right(self.tok_ends, a), bisect.bisect_left(self.tok_starts, b) - 1


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _make_candidate(
    doc: _Document,
    index: int,
    span: tuple[int, int],
    rng: random.Random,
    tokenizer: Any,
    config: ClozeQAConfig,
    blank: str,
    stop: frozenset[str],
) -> _Candidate | None:
    a, b = span
    sentence = doc.text[a:b]
    words = [(m.start(), m.end()) for m in _WORD.finditer(sentence)]
    if len(words) < config.min_sentence_words:
        return None

    def content(k: int) -> bool:
        w = sentence[words[k][0] : words[k][1]]
        return len(w) >= config.min_word_chars and w.lower() not in stop and not w.isdigit()

    options = []
    for i in range(len(words)):
        if not content(i):
            continue
        for n in range(config.min_answer_words, config.max_answer_words + 1):
            j = i + n - 1
            if j >= len(words) or not content(j):
                continue
            # Only whitespace between the words of a span: no clause punctuation inside.
            if any(sentence[words[k][1] : words[k + 1][0]].strip() for k in range(i, j)):
                continue
            options.append((i, j))
    if not options:
        return None
    i, j = rng.choice(options)
    ans_a, ans_b = words[i][0], words[j][1]
    answer = sentence[ans_a:ans_b]
    if not normalize_answer(answer):
        return None

    def bounds(radius: int) -> tuple[int, int]:
        lo = words[i - radius][0] if i - radius > 0 else 0
        hi = words[j + radius][1] if j + radius < len(words) - 1 else len(sentence)
        return lo, hi

    def build(radius: int) -> str:
        lo, hi = bounds(radius)
        left, right = sentence[lo:ans_a], sentence[ans_b:hi]
        if config.style == "blank":
            return (left + blank + right).strip()
        return " ".join((left.rstrip() + " " + right.lstrip()).split())

    # Largest radius of words around the answer whose question fits the budget.
    radius = max(i, len(words) - 1 - j)
    question = build(radius)
    q_tokens = _count_tokens(tokenizer, question)
    if q_tokens > config.max_question_tokens:
        lo_r, hi_r = 0, radius - 1
        best = None
        while lo_r <= hi_r:
            mid = (lo_r + hi_r) // 2
            q = build(mid)
            n_tok = _count_tokens(tokenizer, q)
            if n_tok <= config.max_question_tokens:
                best, lo_r = (q, n_tok, mid), mid + 1
            else:
                hi_r = mid - 1
        if best is None:
            return None
        question, q_tokens, radius = best
    if len(_WORD.findall(question)) < 3:
        return None  # cut so short that it no longer singles out its sentence
    if answer in question:
        return None
    lo, hi = bounds(radius)
    return _Candidate(
        sentence_index=index,
        question=question,
        question_tokens=q_tokens,
        answer=answer,
        answer_char=a + ans_a,
        span_char=(a + lo, a + hi),
        span_tok=doc.token_span(a + lo, a + hi),
        position=rng.random(),
    )


def _snap(text: str, c0: int, c1: int, s0: int, s1: int) -> tuple[int, int]:
    """Move ``[c0, c1)`` inward to whitespace so no word is cut, never into ``[s0, s1)``,
    then drop surrounding whitespace."""
    if c0 > 0 and not text[c0 - 1].isspace():
        nxt = re.search(r"\s", text[c0:s0])
        c0 = c0 + nxt.end() if nxt else s0
    if c1 < len(text) and not text[c1].isspace():
        spaces = [m.start() for m in re.finditer(r"\s", text[s1:c1])]
        c1 = s1 + spaces[-1] if spaces else s1
    while c0 < c1 and text[c0].isspace():
        c0 += 1
    while c1 > c0 and text[c1 - 1].isspace():
        c1 -= 1
    return c0, c1


def _cut_context(
    doc: _Document, cand: _Candidate, length: int, config: ClozeQAConfig, tokenizer: Any
) -> dict[str, Any] | None:
    """The QA record of ``cand`` with a context of about ``length`` input tokens, or None."""
    budget = length - cand.question_tokens - 3
    # The window holds the question's whole sentence part (so it can be matched), at a random
    # position; the answer lies inside it.
    t0, t1 = cand.span_tok
    if t1 - t0 + 1 > budget:
        return None
    s0, s1 = cand.span_char
    if doc.n_tokens <= budget:
        if not config.allow_short and doc.n_tokens < budget:
            return None
        ws, we = 0, doc.n_tokens - 1
    else:
        lo, hi = max(0, t1 + 1 - budget), min(t0, doc.n_tokens - budget)
        ws = lo + round(cand.position * (hi - lo))
        we = ws + budget - 1
    c0, c1 = _snap(doc.text, doc.tok_starts[ws], doc.tok_ends[we], s0, s1)
    if doc.text.count(cand.answer, c0, c1) != 1:
        return None  # the answer text occurs again: ambiguous gold span (checked before the
        # costlier token count; the final window is this one or a little smaller)
    # The tokens of a cut-out context can differ from the document's at its edges (e.g. a
    # SentencePiece word-start piece), so count the context itself and shrink until it fits.
    for _ in range(8):
        c0, c1 = _snap(doc.text, doc.tok_starts[ws], doc.tok_ends[we], s0, s1)
        context = doc.text[c0:c1]
        n_tokens = _count_tokens(tokenizer, context)
        excess = n_tokens - budget
        if excess <= 0:
            break
        # Trim the side with more room outside the question's sentence.
        if t0 - ws >= we - t1:
            ws = min(t0, ws + excess)
        else:
            we = max(t1, we - excess)
    else:
        return None
    start = cand.answer_char - c0
    if context.find(cand.answer) != start or context.find(cand.answer, start + 1) != -1:
        return None  # the answer text occurs again: ambiguous gold span
    return {
        "id": f"{doc.id}:{cand.sentence_index}:L{length}",
        "question": cand.question,
        "answers": [{"text": cand.answer, "answer_start": start}],
        "is_impossible": False,
        "doc_id": doc.id,
        "sentence_index": cand.sentence_index,
        "target_length": length,
        "context_tokens": n_tokens,
        "question_tokens": cand.question_tokens,
        "context": context,
    }


def _questions_for_split(
    docs: Sequence[_Document],
    lengths: Sequence[int],
    per_document: int,
    same_questions: bool,
    tokenizer: Any,
    config: ClozeQAConfig,
    blank: str,
    stop: frozenset[str],
) -> dict[int, list[dict[str, Any]]]:
    from tqdm.auto import tqdm

    out: dict[int, list[dict[str, Any]]] = {length: [] for length in lengths}
    for doc in tqdm(docs, desc="questions", unit="doc", leave=False, disable=None):  # a bar on terminals
        # Per-document generator: a document's questions do not depend on the others.
        rng = random.Random(f"{config.seed}:{doc.id}")
        sentences = doc.sentences
        order = list(range(len(sentences)))
        rng.shuffle(order)
        made = {length: 0 for length in lengths}
        for index in order:
            if all(made[length] >= per_document for length in lengths):
                break
            cand = _make_candidate(doc, index, sentences[index], rng, tokenizer, config, blank, stop)
            if cand is None:
                continue
            records: dict[int, dict[str, Any] | None] = {}
            for length in lengths:
                records[length] = _cut_context(doc, cand, length, config, tokenizer)
                if same_questions and records[length] is None:
                    break
            if same_questions and (len(records) < len(lengths) or None in records.values()):
                continue
            for length, record in records.items():
                if record is not None and made[length] < per_document:
                    out[length].append(record)
                    made[length] += 1
    return out


@dataclass
class ClozeQASets:
    """What :func:`make_cloze_qa` makes."""

    examples: dict[str, dict[int, list[dict[str, Any]]]]
    """split name -> target length -> flat records."""
    documents: dict[str, list[str]]
    """split name -> document ids (disjoint)."""


def make_cloze_qa(
    documents: Iterable[Any], tokenizer: Any, config: ClozeQAConfig | None = None
) -> ClozeQASets:
    """Make cloze QA examples for every split and target length.

    Args:
        documents: ``{"id": str, "text": str}`` dicts or objects with ``id``/``text``
            attributes (``littlebird_ds.data.corpus.load_corpus`` documents); ids must be
            unique. Verse offsets in ``meta["verse_offsets"]`` are used as the sentences.
        tokenizer: a Hugging Face fast tokenizer; it counts every token budget.
        config: see :class:`ClozeQAConfig`.

    Each record has ``id, question, answers [{text, answer_start}], is_impossible, doc_id,
    sentence_index, target_length, context_tokens, question_tokens, context``; its answer text
    equals ``context[answer_start:answer_start + len(text)]`` and occurs once in the context.
    """
    config = config or ClozeQAConfig()
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("make_cloze_qa needs a fast tokenizer (offset mappings)")
    docs_in = [d for d in documents if _field(d, "text", "").strip()]
    if not docs_in:
        raise ValueError("no non-empty documents given; check the corpus path or name")
    blank = config.blank or getattr(tokenizer, "mask_token", None) or "_____"
    stop = function_words(docs_in, config.function_word_top_k)
    split = split_documents([str(_field(d, "id")) for d in docs_in], config.split_fractions,
                            config.seed)
    by_id = {str(_field(d, "id")): d for d in docs_in}
    result: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for k, name in enumerate(SPLITS):
        docs = [_Document(by_id[i], tokenizer) for i in sorted(split[name])]
        lengths = config.train_lengths if name == "train" else config.lengths
        result[name] = _questions_for_split(
            docs, lengths, config.questions_per_document[k], name != "train", tokenizer,
            config, blank, stop,
        )
        _check_not_empty(name, docs, result[name], config, name != "train")
    return ClozeQASets(examples=result, documents=split)


def _check_not_empty(name: str, docs: Sequence[_Document], made: Mapping[int, list], config: ClozeQAConfig,
                     shared: bool) -> None:
    """Stop before anything is written when a split has no question at some length: say how
    many documents it has, how long the longest is, and what to change."""
    empty = [length for length, records in made.items() if not records]
    if not empty:
        return
    longest = max((d.n_tokens for d in docs), default=0)
    flag = "--lengths" if name != "train" else "--train-lengths"
    why = (f"questions of the validation and test sets are shared across lengths, so each must fit "
           f"the longest of {flag} ({max(made)} tokens)" if shared else f"contexts must reach {min(empty)} tokens")
    raise ValueError(
        f"the {name} split would have 0 questions at length {', '.join(map(str, empty))}: its {len(docs)} "
        f"document(s) have at most {longest} tokens and {why}. Lower {flag} to at most about {longest}, "
        "pass --allow-short to use whole shorter documents as contexts, or use a corpus of longer documents "
        "(e.g. whole books rather than chapters)"
    )


def to_squad(records: Sequence[Mapping[str, Any]], version: str = "littlebird-cloze-1") -> dict:
    """Flat cloze records -> SQuAD nested JSON (one article per document, one paragraph per
    question since every question has its own context window)."""
    articles: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        qa = {k: v for k, v in r.items() if k != "context"}
        articles.setdefault(r["doc_id"], []).append({"context": r["context"], "qas": [qa]})
    return {"version": version,
            "data": [{"title": doc_id, "paragraphs": ps} for doc_id, ps in articles.items()]}


def write_cloze_qa(
    documents: Iterable[Any],
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    config: ClozeQAConfig | None = None,
) -> dict[str, Any]:
    """Make cloze QA and write ``{split}-{length}.json`` (SQuAD format) plus ``manifest.json``.

    All examples are made before anything is written, and each file is written atomically,
    so an error leaves no partial output. Returns the manifest: settings, the document split,
    and ``files`` (file name -> number of questions).
    """
    config = config or ClozeQAConfig()
    made = make_cloze_qa(documents, tokenizer, config)
    files: dict[str, int] = {}
    payloads: dict[str, dict] = {}
    for name in SPLITS:
        for length, records in made.examples[name].items():
            fname = f"{name}-{length}.json"
            payloads[fname] = to_squad(records)
            files[fname] = len(records)
    manifest = {
        "format": "SQuAD v1.1 JSON; cloze questions made by littlebird_ds.data.make_qa",
        "config": {k: v for k, v in vars(config).items()},
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "documents": made.documents,
        "files": files,
    }
    for fname, payload in payloads.items():
        atomic_write_json(os.path.join(out_dir, fname), payload)
    atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest

