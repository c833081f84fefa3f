"""Extractive QA data: load SQuAD-format examples, make model features, decode predictions.

Example format (flat, one dict per question; the same as Hugging Face ``squad``/``squad_v2``)::

    {"id": str, "context": str, "question": str,
     "answers": {"text": [str, ...], "answer_start": [int, ...]},
     "is_impossible": bool,          # SQuAD v2; True means "answers" is empty
     ...}                            # other fields (title, target_length, ...) are kept

Feature layout (spec section 5/6): ``[CLS] question [SEP] context [SEP]``, ``token_type_ids``
0 for ``[CLS] question [SEP]`` and 1 for ``context [SEP]``. LittleBird's only global part is
block 0 (the first ``block_size`` tokens, every token attends to it), so the question must fit
in block 0 with its ``[CLS]`` and ``[SEP]``: at most ``block_size - 2`` question tokens. A longer
question would spill into block 1 and be seen only by nearby context tokens, silently hurting
long-document accuracy; so it is an error by default, or truncated with a warning on request.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


Example = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _answer_list(answers: Any, where: str) -> dict[str, list]:
    """SQuAD-style ``[{text, answer_start}, ...]`` or ``{text: [...], answer_start: [...]}`` ->
    the dict form, with a ``ValueError`` naming the record and the field for anything else."""
    if isinstance(answers, list):
        texts, starts = [], []
        for j, a in enumerate(answers):
            if not isinstance(a, Mapping) or "text" not in a or "answer_start" not in a:
                missing = "an object" if not isinstance(a, Mapping) else \
                    " and ".join(repr(k) for k in ("text", "answer_start") if k not in a)
                raise ValueError(f"{where}: answers[{j}] lacks {missing}; every answer needs 'text' and "
                                 "'answer_start' (a 0-based character offset into the context)")
            texts.append(a["text"])
            starts.append(a["answer_start"])
    elif isinstance(answers, Mapping):
        texts, starts = list(answers.get("text", [])), list(answers.get("answer_start", []))
        if texts and "answer_start" not in answers:
            raise ValueError(f"{where}: 'answers' has 'text' but no 'answer_start'; give one 0-based character "
                             "offset into the context per answer text")
    else:
        raise ValueError(f"{where}: 'answers' must be a list of {{text, answer_start}} objects or an object "
                         f"{{text: [...], answer_start: [...]}}, got {type(answers).__name__}")
    try:
        starts = [int(x) for x in starts]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'answer_start' must hold integers, got {starts!r}") from None
    return {"text": texts, "answer_start": starts}


def flatten_squad(squad: Mapping[str, Any], source: str = "SQuAD data") -> list[Example]:
    """Flatten SQuAD v1.1/v2 nested JSON (``data/paragraphs/qas``) into flat examples.

    Extra fields of a question (besides ``question``, ``answers``, ``is_impossible``,
    ``plausible_answers``) are copied onto the example; ``title`` comes from the article.
    ``source`` names the data in errors (the file's path).
    """
    if "data" not in squad or not isinstance(squad["data"], list):
        raise ValueError(
            f"{source}: not SQuAD JSON: expected a top-level object with a 'data' list of articles "
            "(data -> paragraphs -> qas); for flat records use a JSON list or JSON Lines"
        )
    examples: list[Example] = []
    for a, article in enumerate(squad["data"]):
        title = article.get("title", "")
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            context = paragraph.get("context", "")
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{source}: data[{a}].paragraphs[{p}].qas[{q}] (id {qa.get('id', '')!r})"
                example: Example = {
                    k: v for k, v in qa.items()
                    if k not in ("answers", "is_impossible", "plausible_answers")
                }
                example.update(
                    id=str(qa.get("id", "")),
                    title=title,
                    context=context,
                    question=qa.get("question", ""),
                    answers=_answer_list(qa.get("answers", []), where),
                    is_impossible=bool(qa.get("is_impossible", False)),
                )
                examples.append(example)
    return examples


def normalize_record(record: Mapping[str, Any], where: str = "QA record") -> Example:
    """One flat record -> an example with ``answers`` as ``{text: [...], answer_start: [...]}``.

    Accepts ``answers`` as that dict or as a SQuAD-style list of ``{text, answer_start}``;
    ``is_impossible`` defaults to "no answers given". ``where`` names the record in errors.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected an object with id, context, question and answers, "
                         f"got {type(record).__name__}")
    example = dict(record)
    example["answers"] = _answer_list(example.get("answers", {"text": [], "answer_start": []}), where)
    example["id"] = str(example.get("id", ""))
    example.setdefault("is_impossible", len(example["answers"]["text"]) == 0)
    example["is_impossible"] = bool(example["is_impossible"])
    return example


def validate_example(example: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the example if it cannot be trained or scored on.

    Checks: non-empty id, context and question; as many ``answer_start`` as answer texts;
    every answer text equals ``context[answer_start : answer_start + len(text)]``; an
    answerable example has at least one answer and an impossible one has none.
    """
    qid = example.get("id", "")
    where = f"QA example {qid!r}"
    if not qid:
        raise ValueError(f"{where}: empty 'id'; give every question a unique id")
    context = example.get("context", "")
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"{where}: empty context; drop the example or fill in its context")
    question = example.get("question", "")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: empty question; drop the example or fill in its question")
    texts = example["answers"]["text"]
    starts = example["answers"]["answer_start"]
    if len(texts) != len(starts):
        raise ValueError(
            f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values; "
            "give one answer_start per answer text"
        )
    if example.get("is_impossible"):
        if texts:
            raise ValueError(
                f"{where}: is_impossible is true but answers are given; remove the answers "
                "(SQuAD v2 keeps them as 'plausible_answers') or set is_impossible false"
            )
        return
    if not texts:
        raise ValueError(
            f"{where}: no answers and not marked is_impossible; add an answer or set "
            "is_impossible true (SQuAD v2)"
        )
    for text, start in zip(texts, starts):
        found = context[start : start + len(text)] if 0 <= start <= len(context) else ""
        if found != text:
            hint = context.find(text)
            fix = (
                f"answer_start should probably be {hint}" if hint >= 0
                else "the answer text does not occur in the context at all"
            )
            raise ValueError(
                f"{where}: answer text {text!r} does not match the context at answer_start="
                f"{start} (found {found!r}); {fix}. answer_start is a 0-based character offset "
                "into the context (Python str indices, not bytes)"
            )


def read_qa_file(path: str | os.PathLike[str]) -> Any:
    """The records of a QA file, whatever its extension says: SQuAD JSON (``{"data": [...]}``),
    a JSON list of flat records, JSON Lines (flat records or SQuAD articles, one per line, as
    ``datasets``' ``to_json`` writes them), or Parquet (``.parquet``, read with ``datasets``).

    JSON is read with the standard library rather than ``datasets``' Arrow reader: that keeps
    SQuAD's nesting and values exactly as written and lets errors give the line and column.
    Every error is a ``ValueError`` (or ``FileNotFoundError``) that names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"QA file {path} does not exist" + (" (it is a directory)" if os.path.isdir(path) else ""))
    if path.endswith(".parquet"):
        import datasets

        try:
            return datasets.Dataset.from_parquet(path, keep_in_memory=True).to_list()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise ValueError(f"QA file {path} is not a readable Parquet file: {e}") from e
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"QA file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON or JSON Lines") from None
    if not text.strip():
        raise ValueError(f"QA file {path} is empty; expected SQuAD JSON, a JSON list of records, JSON Lines or Parquet")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # more than one JSON value: JSON Lines
            raise ValueError(f"QA file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"QA file {path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                                 "JSON Lines needs one complete JSON object per line") from None
    return {"data": rows} if rows and isinstance(rows[0], Mapping) and "paragraphs" in rows[0] else rows


def load_qa_examples(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]] | Mapping[str, Any],
    *,
    validate: bool = True,
) -> list[Example]:
    """Load QA examples from a file (:func:`read_qa_file`), a SQuAD dict, or in-memory records
    (a list of flat records, a ``datasets.Dataset``).

    Args:
        source: a path, a SQuAD dict, or an iterable of flat records.
        validate: run :func:`validate_example` on every example (and check ids are unique).

    Returns:
        Flat examples (see the module docstring). Errors name the file and the record.
    """
    if isinstance(source, (str, os.PathLike)):
        name = f"QA file {os.fspath(source)}"
        records: Any = read_qa_file(source)
    else:
        name, records = "QA data", source
    if isinstance(records, Mapping):
        examples = [normalize_record(r, f"{name}, question {r.get('id', '')!r}")
                    for r in flatten_squad(records, name)]
    elif isinstance(records, (str, bytes)) or not isinstance(records, Iterable):
        raise ValueError(f"{name}: expected SQuAD JSON (an object with 'data') or a list of records, "
                         f"got {type(records).__name__}")
    else:
        examples = [normalize_record(r, f"{name}, record {i}") for i, r in enumerate(records)]
    if validate:
        seen: set[str] = set()
        for example in examples:
            try:
                validate_example(example)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            if example["id"] in seen:
                raise ValueError(
                    f"{name}: QA example id {example['id']!r} occurs twice; ids must be unique "
                    "because predictions are keyed by id"
                )
            seen.add(example["id"])
    return examples


def to_dataset(examples: Sequence[Example]) -> Any:
    """Examples as a ``datasets.Dataset`` (columns as in the module docstring)."""
    import datasets

    return datasets.Dataset.from_list(list(examples))


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def _fit_question(
    question: str, qid: str, tokenizer: Any, max_question_tokens: int, truncate: bool
) -> str:
    ids = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    n = len(ids["input_ids"])
    if n <= max_question_tokens:
        return question
    if not truncate:
        raise ValueError(
            f"QA example {qid!r}: the question has {n} tokens but at most {max_question_tokens} "
            "fit in LittleBird's global block 0 ([CLS] question [SEP] within block_size tokens). "
            "Shorten the question, raise block_size, or pass truncate_question=True to cut it "
            "(with a warning)"
        )
    # Cut at the character end of the last token that fits; re-check since a prefix can
    # tokenize differently at its new end.
    keep = max_question_tokens
    while keep > 0:
        cut = question[: ids["offset_mapping"][keep - 1][1]]
        if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= max_question_tokens:
            break
        keep -= 1
    warnings.warn(
        f"QA example {qid!r}: question truncated from {n} to {max_question_tokens} tokens to fit "
        "block 0",
        stacklevel=3,
    )
    return cut


def prepare_features(
    examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    tokenizer: Any,
    *,
    max_length: int = 512,
    stride: int = 128,
    block_size: int = 64,
    max_question_tokens: int | None = None,
    truncate_question: bool = False,
    padding: bool | str = False,
) -> dict[str, list[Any]]:
    """Tokenize examples into model features, windowing long contexts.

    Each example yields one or more features ``[CLS] question [SEP] context-window [SEP]`` of
    at most ``max_length`` tokens; consecutive windows of one context overlap by ``stride``
    tokens (HF ``return_overflowing_tokens``). Labels: ``start_positions``/``end_positions``
    are the token indices of the first gold answer's first and last token, or 0 (``[CLS]``)
    when the example is impossible or the answer is not wholly inside this window (SQuAD v2
    convention, so the model learns "not here").

    Args:
        examples: flat examples (list of dicts, or a dict of columns such as a batch from
            ``Dataset.map(batched=True)``).
        tokenizer: a Hugging Face *fast* tokenizer (offsets are needed).
        max_length: tokens per feature, special tokens included.
        stride: overlap in tokens between consecutive windows of one context.
        block_size: the model's block size; the question must fit in block 0.
        max_question_tokens: question budget; default ``block_size - 2`` (room for ``[CLS]`` and
            ``[SEP]``). Longer questions raise ``ValueError`` unless ``truncate_question``.
        truncate_question: cut over-long questions to the budget with a warning instead.
        padding: passed to the tokenizer (``False``: the model pads to its block size itself).

    Returns:
        Columns ``input_ids``, ``token_type_ids``, ``attention_mask``, ``offset_mapping``
        (character ``(start, end)`` into the context for context tokens, ``None`` elsewhere),
        ``example_id``, ``example_index`` (position of the example in ``examples``),
        ``start_positions``, ``end_positions``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "prepare_features needs a fast tokenizer (offset mappings); load it with "
            "AutoTokenizer.from_pretrained(path, use_fast=True) or wrap a `tokenizers` model "
            "in PreTrainedTokenizerFast"
        )
    if max_question_tokens is None:
        max_question_tokens = block_size - 2
    if max_question_tokens > block_size - 2:
        warnings.warn(
            f"max_question_tokens={max_question_tokens} exceeds block_size - 2 = "
            f"{block_size - 2}: long questions will spill out of the global block 0",
            stacklevel=2,
        )
    room = max_length - max_question_tokens - 3  # [CLS] q [SEP] ... [SEP]
    if room <= stride:
        raise ValueError(
            f"max_length={max_length} leaves at most {room} context tokens per window after a "
            f"{max_question_tokens}-token question, not more than stride={stride}; raise "
            "max_length or lower stride"
        )
    if isinstance(examples, Mapping):
        columns = examples
        n = len(columns["id"])
        rows = [{k: columns[k][i] for k in columns} for i in range(n)]
    else:
        rows = [normalize_record(e) if isinstance(e.get("answers"), list) else e for e in examples]
    questions = [
        _fit_question(r["question"].strip(), str(r["id"]), tokenizer, max_question_tokens,
                      truncate_question)
        for r in rows
    ]
    contexts = [r["context"] for r in rows]
    enc = tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=padding,
    )
    sample_map = enc.pop("overflow_to_sample_mapping")
    features: dict[str, list[Any]] = {
        "input_ids": [], "token_type_ids": [], "attention_mask": [], "offset_mapping": [],
        "example_id": [], "example_index": [], "start_positions": [], "end_positions": [],
    }
    for i, offsets in enumerate(enc["offset_mapping"]):
        ex_index = sample_map[i]
        row = rows[ex_index]
        seq_ids = enc.sequence_ids(i)
        ctx_tokens = [j for j, s in enumerate(seq_ids) if s == 1]
        if "token_type_ids" in enc:
            token_type_ids = enc["token_type_ids"][i]
        else:  # tokenizers without segments (RoBERTa-style): derive them
            last_ctx = ctx_tokens[-1] if ctx_tokens else -1
            token_type_ids = [
                1 if s == 1 or (s is None and j > last_ctx >= 0 and enc["attention_mask"][i][j])
                else 0
                for j, s in enumerate(seq_ids)
            ]
        start_pos = end_pos = 0
        answers = row.get("answers") or {"text": [], "answer_start": []}  # none: a question to answer
        if not row.get("is_impossible") and answers["text"] and ctx_tokens:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            first, last = ctx_tokens[0], ctx_tokens[-1]
            if offsets[first][0] <= start_char and offsets[last][1] >= end_char:
                start_pos = first
                while start_pos <= last and offsets[start_pos][1] <= start_char:
                    start_pos += 1
                end_pos = last
                while end_pos >= first and offsets[end_pos][0] >= end_char:
                    end_pos -= 1
        features["input_ids"].append(enc["input_ids"][i])
        features["token_type_ids"].append(list(token_type_ids))
        features["attention_mask"].append(enc["attention_mask"][i])
        features["offset_mapping"].append(
            [tuple(o) if s == 1 else None for o, s in zip(offsets, seq_ids)]
        )
        features["example_id"].append(str(row["id"]))
        features["example_index"].append(ex_index)
        features["start_positions"].append(start_pos)
        features["end_positions"].append(end_pos)
    return features


# --------------------------------------------------------------------------------------------
# Postprocessing
# --------------------------------------------------------------------------------------------


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    context_mask: np.ndarray,
    *,
    n_best: int = 20,
    max_answer_tokens: int = 30,
) -> list[tuple[int, int, float]]:
    """Exact n-best spans ``(start, end, start_logit + end_logit)`` of one feature, best first.

    Valid spans lie in context tokens only, with ``start <= end < start + max_answer_tokens``.
    Every valid span is scored (``O(l * max_answer_tokens)``, vectorised), so unlike a top-k of
    starts times a top-k of ends no valid span can be missed.
    """
    length = len(context_mask)
    neg = np.float64(-np.inf)
    s = np.where(context_mask, start_logits[:length].astype(np.float64), neg)
    e = np.where(context_mask, end_logits[:length].astype(np.float64), neg)
    width = max(1, min(max_answer_tokens, length))
    e_pad = np.concatenate([e, np.full(width - 1, neg)])
    # windows[i, k] = end logit of token i + k          # [l, width]
    windows = np.lib.stride_tricks.sliding_window_view(e_pad, width)
    scores = s[:, None] + windows                       # [l, width]
    flat = scores.ravel()
    valid = np.isfinite(flat)
    k = min(n_best, int(valid.sum()))
    if k == 0:
        return []
    top = np.argpartition(-np.where(valid, flat, neg), k - 1)[:k]
    top = top[np.argsort(-flat[top], kind="stable")]
    return [(int(t // width), int(t // width + t % width), float(flat[t])) for t in top]


def postprocess_predictions(
    examples: Sequence[Mapping[str, Any]],
    features: Mapping[str, Sequence[Any]],
    start_logits: Sequence[Any],
    end_logits: Sequence[Any],
    *,
    n_best: int = 20,
    max_answer_tokens: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Turn per-feature start/end logits into one answer per example.

    The candidates of an example are the n-best valid spans (see :func:`best_spans`) of each
    of its windows; a span's score is ``start_logit + end_logit``; the best one is mapped back
    to character offsets of the original context. With ``version_2``, the null score is the
    smallest ``start_logits[0] + end_logits[0]`` (the ``[CLS]`` span) over the windows, and the
    example is predicted unanswerable when ``null_score - best_span_score >
    null_score_diff_threshold``.

    Args:
        examples: the examples the features were made from.
        features: the output of :func:`prepare_features` (or a ``Dataset`` with its columns);
            ``offset_mapping`` and ``example_id`` are used.
        start_logits, end_logits: one 1-D array (or tensor) per feature, indexed like the
            feature's tokens; longer arrays (batch padding) are cut to the feature length.
        n_best: candidates kept per example (returned under ``"n_best"``).
        max_answer_tokens: longest answer, in tokens.
        version_2: allow "no answer" predictions.
        null_score_diff_threshold: bias towards answering (larger: answer less often).

    Returns:
        ``{example_id: {"text", "score", "start", "end", "null_score", "n_best"}}``; ``start``/
        ``end`` are character offsets into the context (``context[start:end] == text``), ``None``
        for a no-answer prediction (``text == ""``); ``n_best`` is a list of dicts with
        ``text, score, start, end``.
    """
    by_example: dict[str, list[int]] = {}
    for i, qid in enumerate(features["example_id"]):
        by_example.setdefault(str(qid), []).append(i)
    offset_col = features["offset_mapping"]
    results: dict[str, dict[str, Any]] = {}
    for example in examples:
        qid = str(example["id"])
        context = example["context"]
        candidates: list[dict[str, Any]] = []
        null_score = np.inf
        for i in by_example.get(qid, []):
            offsets = offset_col[i]
            s_log = np.asarray(_to_numpy(start_logits[i]), dtype=np.float64)
            e_log = np.asarray(_to_numpy(end_logits[i]), dtype=np.float64)
            null_score = min(null_score, float(s_log[0] + e_log[0]))
            mask = np.array([o is not None for o in offsets], dtype=bool)
            for start, end, score in best_spans(
                s_log, e_log, mask, n_best=n_best, max_answer_tokens=max_answer_tokens
            ):
                c0, c1 = offsets[start][0], offsets[end][1]
                # SentencePiece word-start pieces map to the space before the word: trim it so
                # ``start`` points at the answer's first character.
                while c0 < c1 and context[c0].isspace():
                    c0 += 1
                while c1 > c0 and context[c1 - 1].isspace():
                    c1 -= 1
                candidates.append({"text": context[c0:c1], "score": score, "start": c0, "end": c1})
        # Overlapping windows propose the same character span twice: keep its best score.
        unique: dict[tuple[int, int], dict[str, Any]] = {}
        for cand in sorted(candidates, key=lambda c: -c["score"]):
            unique.setdefault((cand["start"], cand["end"]), cand)
        ranked = list(unique.values())[:n_best]
        if not ranked and not by_example.get(qid):
            raise ValueError(
                f"no features for example {qid!r}; pass the features made from these examples"
            )
        best = ranked[0] if ranked else None
        null = None if np.isinf(null_score) else null_score
        if best is None or (
            version_2 and null is not None and null - best["score"] > null_score_diff_threshold
        ):
            results[qid] = {"text": "", "score": null, "start": None, "end": None,
                            "null_score": null, "n_best": ranked}
        else:
            results[qid] = {**best, "null_score": null, "n_best": ranked}
    return results


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        return x.detach().float().cpu().numpy()
    return x
