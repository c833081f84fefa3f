"""SQuAD exact match and F1, written out so they run offline.

The answerable-question rules are those of the official SQuAD v1.1 evaluation script
(``evaluate-v1.1.py``): normalise both strings (lowercase, drop ASCII punctuation, drop the
articles ``a``/``an``/``the``, collapse whitespace), then EM is string equality and F1 is the
bag-of-tokens overlap F1; the score of a question is the maximum over its gold answers.

Unanswerable questions (SQuAD v2: ``is_impossible`` or no gold answers) follow
``evaluate-v2.0.py``: the gold answer is the empty string, so a prediction scores EM = F1 = 1
exactly when it normalises to the empty string, else 0.

The articles are English ones, and removing them is right only for English: ``a`` is a word in
Chichewa (the possessive "of", as in *mwana wa* / *ana a*), so stripping it changes EM and F1.
Every function here takes ``language``: ``"en"`` (the default, SQuAD's rules) strips
a/an/the; ``es``, ``de`` and ``vi`` strip their articles as MLQA's evaluation does; any other
language strips none (:data:`ARTICLES`).

Scores in the dicts returned here are percentages (0-100), as the official scripts print them.
Every summary also carries a 95% bootstrap interval of its EM and F1 (``exact_match_ci95``,
``f1_ci95``: percentile bootstrap over questions, 2,000 resamples, fixed seed), so two models
are told apart only when their intervals separate.
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_PUNCTUATION = frozenset(string.punctuation)

#: Articles the normaliser drops, by language: English as SQuAD's script, Spanish, German and
#: Vietnamese as MLQA's. A language not listed drops none. ISO 639-3 codes map to these too.
ARTICLES: dict[str, tuple[str, ...]] = {
    "en": ("a", "an", "the"),
    "es": ("un", "una", "unos", "unas", "el", "la", "los", "las"),
    "de": ("ein", "eine", "einen", "einem", "eines", "einer", "der", "die", "das", "des", "dem", "den"),
    "vi": ("của", "là", "cái", "chiếc", "những"),
}
_ISO3 = {"eng": "en", "spa": "es", "deu": "de", "ger": "de", "vie": "vi"}
_ARTICLE_RES: dict[str, re.Pattern | None] = {}


def _articles(language: str) -> re.Pattern | None:
    language = (language or "").lower()
    if language not in _ARTICLE_RES:
        words = ARTICLES.get(_ISO3.get(language, language))
        _ARTICLE_RES[language] = re.compile(r"\b(" + "|".join(words) + r")\b", re.UNICODE) if words else None
    return _ARTICLE_RES[language]

#: Upper edges (in tokens) of the default context-length buckets.
DEFAULT_BUCKET_EDGES: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)


def normalize_answer(s: str, language: str = "en") -> str:
    """Lowercase, remove punctuation, the language's articles and extra whitespace (official
    SQuAD order; ``language`` picks the articles, see :data:`ARTICLES`)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    articles = _articles(language)
    if articles is not None:
        s = articles.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str, language: str = "en") -> float:
    """1.0 if the normalised strings are equal, else 0.0 (SQuAD v1.1)."""
    return float(normalize_answer(prediction, language) == normalize_answer(ground_truth, language))


def f1_score(prediction: str, ground_truth: str, language: str = "en") -> float:
    """Token-overlap F1 of the normalised strings (SQuAD v1.1: 0.0 when nothing overlaps)."""
    prediction_tokens = normalize_answer(prediction, language).split()
    ground_truth_tokens = normalize_answer(ground_truth, language).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def score_prediction(prediction: str, gold_answers: Sequence[str], language: str = "en") -> tuple[float, float]:
    """(EM, F1) in [0, 1] for one question.

    ``gold_answers`` empty means the question is unanswerable: the prediction must then be
    empty after normalisation (SQuAD v2). Otherwise the SQuAD v1.1 max over gold answers.
    """
    if not gold_answers:
        correct = float(normalize_answer(prediction, language) == "")
        return correct, correct
    return (
        max(exact_match_score(prediction, gt, language) for gt in gold_answers),
        max(f1_score(prediction, gt, language) for gt in gold_answers),
    )


def length_bucket(n_tokens: int, edges: Sequence[int] = DEFAULT_BUCKET_EDGES) -> str:
    """Label of the bucket holding ``n_tokens``: ``"<=512"``, ``"513-1024"``, ..., ``">16384"``."""
    lower = 0
    for edge in edges:
        if n_tokens <= edge:
            return f"<={edge}" if lower == 0 else f"{lower + 1}-{edge}"
        lower = edge
    return f">{lower}"


def _gold_answers(example: Mapping[str, Any]) -> list[str]:
    if example.get("is_impossible"):
        return []
    answers = example.get("answers") or {}
    texts = answers.get("text", []) if isinstance(answers, Mapping) else [a["text"] for a in answers]
    return list(texts)


def _bucket_of(example: Mapping[str, Any], edges: Sequence[int]) -> str:
    # Examples made by ``make_qa`` carry the context length they were cut for; that label is
    # what a length curve is plotted against. Other examples are bucketed by their token count
    # when known, else by whitespace words (a stated, cruder proxy).
    if example.get("target_length") is not None:
        return str(int(example["target_length"]))
    if example.get("context_tokens") is not None:
        return length_bucket(int(example["context_tokens"]), edges)
    return length_bucket(len(example["context"].split()), edges) + " words"


#: Resamples and seed of the bootstrap intervals (fixed, so a result file is reproducible).
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def bootstrap_interval(scores: Sequence[float], confidence: float = 0.95) -> list[float]:
    """``[low, high]`` percentile-bootstrap interval of the mean of per-question ``scores`` (in
    [0, 1]), as percentages; ``[mean, mean]`` for fewer than two questions or equal scores."""
    import numpy as np

    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return [0.0, 0.0]
    if x.size < 2 or np.all(x == x[0]):  # no spread to resample (scipy refuses degenerate data)
        return [100.0 * float(x.mean())] * 2
    from scipy.stats import bootstrap

    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                    method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    ci = res.confidence_interval
    return [round(100.0 * float(ci.low), 3), round(100.0 * float(ci.high), 3)]


def _summary(em: list[float], f1: list[float]) -> dict[str, Any]:
    n = len(em)
    return {
        "exact_match": 100.0 * sum(em) / n if n else 0.0,
        "f1": 100.0 * sum(f1) / n if n else 0.0,
        "total": n,
        "exact_match_ci95": bootstrap_interval(em),
        "f1_ci95": bootstrap_interval(f1),
    }


def _bucket_sort_key(label: str) -> tuple[bool, int, str]:
    # Token buckets first, then word-count buckets; each by its upper edge.
    digits = re.findall(r"\d+", label)
    edge = (int(digits[-1]) if digits else 0) + (1 if label.startswith(">") else 0)
    return label.endswith("words"), edge, label


def evaluate_predictions(
    examples: Iterable[Mapping[str, Any]],
    predictions: Mapping[str, str | Mapping[str, Any]],
    *,
    bucket_edges: Sequence[int] = DEFAULT_BUCKET_EDGES,
    language: str = "en",
) -> dict[str, Any]:
    """Score predictions against QA examples; the entry point of the ``evaluate-qa`` command.

    Args:
        examples: flat QA examples (``id``, ``context``, ``answers{text, answer_start}``,
            optional ``is_impossible``, ``target_length``, ``context_tokens``), as returned by
            :func:`littlebird_ds.data.qa.load_qa_examples`.
        predictions: example id -> predicted answer text, or -> a dict with a ``"text"`` key
            (the output of :func:`littlebird_ds.data.qa.postprocess_predictions`).
            ``""`` predicts "no answer".
        bucket_edges: token edges of the length buckets for examples without ``target_length``.
        language: the answers' language, which picks the articles the normaliser drops
            (``"en"``: SQuAD's a/an/the; a language without articles listed drops none).

    Returns:
        ``{"exact_match", "f1", "total", "exact_match_ci95", "f1_ci95", "missing", "HasAns": {...},
        "NoAns": {...}, "by_length": {bucket: {"exact_match", "f1", "total", "exact_match_ci95",
        "f1_ci95"}}}``; scores are percentages, ``*_ci95`` their 95% bootstrap intervals.
        ``HasAns``/``NoAns`` are present only when such questions exist. A question without a
        prediction scores 0 and is counted in ``missing`` (with one warning), as in the
        official v1.1 script.
    """
    em_all: list[float] = []
    f1_all: list[float] = []
    groups: dict[str, tuple[list[float], list[float]]] = collections.defaultdict(lambda: ([], []))
    buckets: dict[str, tuple[list[float], list[float]]] = collections.defaultdict(lambda: ([], []))
    missing: list[str] = []
    for example in examples:
        qid = str(example["id"])
        gold = _gold_answers(example)
        if qid in predictions:
            pred = predictions[qid]
            text = pred["text"] if isinstance(pred, Mapping) else pred
            em, f1 = score_prediction(text, gold, language)
        else:
            missing.append(qid)
            em, f1 = 0.0, 0.0
        em_all.append(em)
        f1_all.append(f1)
        group = groups["HasAns" if gold else "NoAns"]
        group[0].append(em)
        group[1].append(f1)
        bucket = buckets[_bucket_of(example, bucket_edges)]
        bucket[0].append(em)
        bucket[1].append(f1)
    if missing:
        warnings.warn(
            f"{len(missing)} question(s) have no prediction and score 0 (first: {missing[0]!r}); "
            "pass a prediction for every example id, '' for 'no answer'.",
            stacklevel=2,
        )
    result: dict[str, Any] = _summary(em_all, f1_all)
    result["missing"] = len(missing)
    for name in ("HasAns", "NoAns"):
        if name in groups:
            result[name] = _summary(*groups[name])
    result["by_length"] = {
        label: _summary(*buckets[label]) for label in sorted(buckets, key=_bucket_sort_key)
    }
    return result
