"""Answer a question about a text file with a QA model; prints the answer, its score and offsets.

The whole context is read in one window of up to --max-length tokens (default 16384:
LittleBird is linear in length); longer contexts are windowed with --stride tokens of
overlap and the best span over all windows wins. Offsets are 0-based character offsets
into the file's text: context[start:end] == answer. --top-k N prints the N best spans.

Example:
  littlebird-ds predict --model out/qa-model/final --context book.txt --question "Who ...?"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebird_ds.train.qa_eval import DEFAULT_EVAL_MAX_LENGTH

    parser.add_argument("--model", required=True, metavar="DIR", help="QA model directory (e.g. OUT/final)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: --model)")
    parser.add_argument("--context", required=True, metavar="FILE", help="UTF-8 text file with the context")
    parser.add_argument("--question", required=True, help="the question")
    parser.add_argument("--top-k", type=int, default=1, metavar="N", help="print the N best answers (default 1)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_EVAL_MAX_LENGTH,
                        help=f"window in tokens (default {DEFAULT_EVAL_MAX_LENGTH})")
    parser.add_argument("--stride", type=int, default=128, help="window overlap for longer contexts (default 128)")
    parser.add_argument("--max-answer-tokens", type=int, default=30, help="longest answer in tokens (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def predict(model: Any, tokenizer: Any, context: str, question: str, *, top_k: int = 1,
            max_length: int = 16384, stride: int = 128, max_answer_tokens: int = 30) -> list[dict[str, Any]]:
    """The ``top_k`` best answers ``[{"text", "score", "start", "end"}]``, best first.

    Raises ``ValueError`` for an empty context or question, a question longer than the
    model's block 0 (``block_size - 2`` tokens), or ``top_k < 1``.
    """
    from littlebird_ds.train.qa_eval import predict_examples

    if not context.strip():
        raise ValueError("the context is empty; pass a file with the text to search (--context FILE)")
    if not question.strip():
        raise ValueError("the question is empty; pass --question \"...\"")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    example = {"id": "q", "context": context, "question": question}
    preds = predict_examples(model, tokenizer, [example], max_length=max_length, stride=stride,
                             n_best=max(top_k, 1), max_answer_tokens=max_answer_tokens)
    return [{k: c[k] for k in ("text", "score", "start", "end")} for c in preds["q"]["n_best"][:top_k]]


def run(args: argparse.Namespace) -> int:
    import torch

    from littlebird_ds.train.qa_eval import load_model_and_tokenizer

    try:
        path = Path(args.context)
        if not path.is_file():
            raise FileNotFoundError(f"--context {path} does not exist; pass a UTF-8 text file")
        try:
            context = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--context {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it first") from None
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer)
        model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        answers = predict(model, tokenizer, context, args.question, top_k=args.top_k, max_length=args.max_length,
                          stride=args.stride, max_answer_tokens=args.max_answer_tokens)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"predict: error: {e}") from None
    if args.json:
        print(json.dumps({"question": args.question, "answers": answers}, ensure_ascii=False))
        return 0
    if not answers:
        print("no answer found")
        return 0
    for rank, a in enumerate(answers, start=1):
        prefix = f"{rank}. " if len(answers) > 1 else ""
        print(f"{prefix}answer: {a['text']}\n{' ' * len(prefix)}score: {a['score']:.4f}\n"
              f"{' ' * len(prefix)}offsets: {a['start']}-{a['end']}")
    return 0
