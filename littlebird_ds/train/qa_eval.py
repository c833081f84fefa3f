"""Extractive QA inference and evaluation: features -> logits -> answers -> EM/F1.

The pieces, each usable alone:

* :func:`feature_logits`: batched inference over :func:`~littlebird_ds.data.qa.prepare_features`
  output (no grad, eval mode, features sorted by length and batched under a token budget so
  an 8k-token window is not padded next to a 300-token one);
* :func:`predict_examples`: examples -> features -> logits -> ``postprocess_predictions``;
* :func:`evaluate_examples` / :func:`evaluate_files`: predictions scored with
  :func:`~littlebird_ds.eval.squad_metrics.evaluate_predictions` (SQuAD v1.1 EM/F1, v2 no-answer
  rules), broken down by context length;
* :func:`format_table`: the by-length table ``evaluate-qa`` prints.

Windows: by default a context is read in one window of up to ``max_length`` tokens (16384):
LittleBird is linear in length, so splitting a long document into windows would only throw
away the long-range attention it was trained for. Longer contexts are windowed with
``stride`` tokens of overlap and the best span over all windows wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from littlebird_ds.utils.io import atomic_write_json
from littlebird_ds.data.qa import _fit_question, load_qa_examples, postprocess_predictions, prepare_features
from littlebird_ds.eval.squad_metrics import evaluate_predictions

__all__ = [
    "DEFAULT_EVAL_MAX_LENGTH",
    "evaluate_examples",
    "evaluate_files",
    "feature_logits",
    "format_table",
    "load_model_and_tokenizer",
    "predict_examples",
    "write_results",
]

#: Whole-context window for inference: contexts up to this many tokens are read at once.
DEFAULT_EVAL_MAX_LENGTH = 16384


def _unwrap(model: Any) -> torch.nn.Module:
    # A DeepSpeed engine wraps the module; inference needs no engine features.
    return getattr(model, "module", model)


def load_model_and_tokenizer(model_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str] | None = None):
    """``(AutoModelForQuestionAnswering, fast tokenizer)`` from a model directory (CPU, eval mode).

    The tokenizer is read from ``tokenizer_dir`` or else ``model_dir`` (``OUT/final`` holds
    both). Raises ``FileNotFoundError`` naming the directory when it holds no model.
    """
    import littlebird_ds  # noqa: F401 - registers LittleBird with the Auto* classes
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no model (no config.json); pass a Hugging Face model directory such as "
            "the OUT/final of `littlebird-ds finetune-qa`"
        )
    model = AutoModelForQuestionAnswering.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or path, use_fast=True)
    return model.eval(), tokenizer


def _batches_by_length(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Feature indices grouped into batches of similar length: sorted longest first, each batch
    at most ``max_batch`` rows and ``rows x longest <= max_tokens`` (one row always fits)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_batch or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def feature_logits(
    model: Any,
    features: Mapping[str, Sequence[Any]],
    *,
    max_tokens_per_batch: int = 32768,
    max_batch_size: int = 64,
    pad_token_id: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of every feature: two lists of ``float32 [feature length]`` arrays.

    Runs in eval mode without gradients (the mode is restored afterwards); pads each batch
    to its longest feature with ``pad_token_id`` (default the model's), attention mask 0.
    ``progress``: a tqdm bar over features (``None``: only on a terminal).
    """
    from tqdm.auto import tqdm

    module = _unwrap(model)
    device = torch.device(device) if device is not None else next(module.parameters()).device
    pad = int(module.config.pad_token_id if pad_token_id is None else pad_token_id)
    ids_col = features["input_ids"]
    lengths = [len(x) for x in ids_col]
    starts: list[np.ndarray | None] = [None] * len(lengths)
    ends: list[np.ndarray | None] = [None] * len(lengths)
    was_training = module.training
    module.eval()
    bar = tqdm(total=len(lengths), desc="features", unit="feature", leave=False, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    try:
        for batch in _batches_by_length(lengths, max_tokens_per_batch, max_batch_size):
            bar.update(len(batch))
            longest = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            types = torch.zeros((len(batch), longest), dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for r, i in enumerate(batch):
                n = lengths[i]
                ids[r, :n] = torch.as_tensor(ids_col[i])
                types[r, :n] = torch.as_tensor(features["token_type_ids"][i])
                mask[r, :n] = torch.as_tensor(features["attention_mask"][i])
            out = module(input_ids=ids.to(device), token_type_ids=types.to(device),
                         attention_mask=mask.to(device), return_dict=True)
            s = out.start_logits.float().cpu().numpy()
            e = out.end_logits.float().cpu().numpy()
            for r, i in enumerate(batch):
                starts[i] = s[r, : lengths[i]].copy()
                ends[i] = e[r, : lengths[i]].copy()
    finally:
        bar.close()
        module.train(was_training)
    return starts, ends  # type: ignore[return-value]


def predict_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int = DEFAULT_EVAL_MAX_LENGTH,
    stride: int = 128,
    version_2: bool = False,
    n_best: int = 20,
    max_answer_tokens: int = 30,
    null_score_diff_threshold: float = 0.0,
    truncate_question: bool = False,
    max_tokens_per_batch: int = 32768,
    progress: bool | None = False,
) -> dict[str, dict[str, Any]]:
    """Answers of ``examples``: ``{id: {"text", "score", "start", "end", "null_score", "n_best"}}``.

    Features are made with the model's ``block_size`` as the question budget (a question
    longer than ``block_size - 2`` tokens raises ``ValueError`` unless ``truncate_question``);
    see :func:`~littlebird_ds.data.qa.postprocess_predictions` for the answer fields.
    """
    if not examples:
        return {}
    module = _unwrap(model)
    block = int(module.config.block_size)
    room = max_length - (block - 2) - 3
    features = prepare_features(
        examples, tokenizer, max_length=max_length, stride=min(stride, max(1, room // 2)),
        block_size=block, truncate_question=truncate_question,
    )
    starts, ends = feature_logits(model, features, max_tokens_per_batch=max(max_tokens_per_batch, max_length),
                                  progress=progress)
    return postprocess_predictions(
        examples, features, starts, ends, n_best=n_best, max_answer_tokens=max_answer_tokens,
        version_2=version_2, null_score_diff_threshold=null_score_diff_threshold,
    )


def evaluate_examples(
    model: Any, tokenizer: Any, examples: Sequence[Mapping[str, Any]], **kwargs: Any
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(predictions, metrics)``: :func:`predict_examples` then ``evaluate_predictions``
    (``language=`` goes to the latter: it picks the articles the SQuAD normaliser drops)."""
    language = kwargs.pop("language", "en")
    predictions = predict_examples(model, tokenizer, examples, **kwargs)
    return predictions, evaluate_predictions(examples, predictions, language=language)


def _label(path: str, examples: Sequence[Mapping[str, Any]]) -> str:
    # make_qa files hold one target length each; name the file's row by it.
    lengths = {e.get("target_length") for e in examples}
    if len(lengths) == 1 and None not in lengths:
        return str(int(next(iter(lengths))))
    return Path(path).stem


def spread_sample(items: Sequence[Any], n: int | None) -> list[Any]:
    """``n`` items spread evenly through ``items`` (every ``len // n``-th from the first); all of
    them when ``n`` is None, 0 or at least ``len(items)``."""
    if not n or n >= len(items):
        return list(items)
    return list(items[:: len(items) // n][:n])


def evaluate_files(
    model: Any,
    tokenizer: Any,
    paths: Sequence[str | os.PathLike[str]],
    *,
    max_examples: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate on several QA files (e.g. ``test-512.json,test-4096.json``); every file is
    loaded and validated before any inference, so a bad file fails fast.

    Returns ``{"files": {path: {"label", "metrics", "predictions"}}, "by_length": {label:
    {"exact_match", "f1", "total"}}, "exact_match", "f1", "total"}``: ``by_length`` merges the
    per-file length breakdowns (a file made for one target length gives one row), and the
    overall scores weight every question equally. ``max_examples`` keeps N questions of
    each file spread evenly through it (every ``len // N``-th, so a quick look samples every
    document rather than the first few; the default scores them all).
    """
    loaded: list[tuple[str, list[dict[str, Any]]]] = []
    for path in paths:
        examples = load_qa_examples(path)
        if not examples:
            raise ValueError(f"{path} holds no QA examples; pass a SQuAD-format file with questions")
        loaded.append((os.fspath(path), spread_sample(examples, max_examples)))
    # Question budgets too, before any inference: a bad last file should not cost a model pass.
    block = int(_unwrap(model).config.block_size)
    for path, examples in loaded:
        for e in examples:
            _fit_question(e["question"].strip(), str(e["id"]), tokenizer, block - 2,
                          bool(kwargs.get("truncate_question", False)))
    files: dict[str, Any] = {}
    by_length: dict[str, dict[str, float]] = {}
    em_sum = f1_sum = 0.0
    total = 0
    for path, examples in loaded:
        predictions, metrics = evaluate_examples(model, tokenizer, examples, **kwargs)
        label = _label(path, examples)
        files[path] = {
            "label": label,
            "metrics": metrics,
            "predictions": {k: {f: v[f] for f in ("text", "score", "start", "end")} for k, v in predictions.items()},
        }
        for bucket, row in metrics["by_length"].items():
            key = bucket if len(loaded) == 1 or bucket == label else f"{label}:{bucket}"
            prev = by_length.get(key)
            if prev is None:
                by_length[key] = dict(row)
            else:  # the same length in two files: pool the questions (the pooled row has no interval)
                n = prev["total"] + row["total"]
                by_length[key] = {m: (prev[m] * prev["total"] + row[m] * row["total"]) / n
                                  for m in ("exact_match", "f1")} | {"total": n}
        em_sum += metrics["exact_match"] * metrics["total"]
        f1_sum += metrics["f1"] * metrics["total"]
        total += metrics["total"]
    return {
        "files": files,
        "by_length": by_length,
        "exact_match": em_sum / total if total else 0.0,
        "f1": f1_sum / total if total else 0.0,
        "total": total,
    }


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of EM/F1 per context length, plus the overall row."""
    rows = [("context length", "questions", "EM", "F1")]
    for label, m in results["by_length"].items():
        rows.append((label, str(int(m["total"])), f"{m['exact_match']:.2f}", f"{m['f1']:.2f}"))
    rows.append(("all", str(int(results["total"])), f"{results['exact_match']:.2f}", f"{results['f1']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(path: str | os.PathLike[str], results: Mapping[str, Any]) -> None:
    """Write ``results`` as JSON atomically (a temporary file, then ``os.replace``)."""
    atomic_write_json(path, results)
