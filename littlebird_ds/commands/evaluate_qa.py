"""Evaluate a QA model: SQuAD exact match and F1, broken down by context length.

Reads one or more SQuAD-format files (e.g. make-qa's test-512.json,test-4096.json),
answers every question (batched by length, whole contexts in one window up to
--max-length tokens, longer ones windowed with --stride), scores EM/F1 as SQuAD v1.1
defines them (--version-2: no-answer predictions and the v2 rules for unanswerable
questions), prints a table per context length and writes predictions + metrics to
--out atomically.

Example:
  littlebird-ds evaluate-qa --model out/qa-model/final \\
      --data out/qa/test-512.json,out/qa/test-4096.json --out out/qa-results.json
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebird_ds.train.qa_eval import DEFAULT_EVAL_MAX_LENGTH

    parser.add_argument("--model", required=True, metavar="DIR", help="QA model directory (e.g. OUT/final)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: --model)")
    parser.add_argument("--data", required=True, metavar="FILE[,FILE...]", help="SQuAD-format QA file(s)")
    parser.add_argument("--out", "--output", required=True, metavar="FILE", help="results JSON (predictions + metrics)")
    parser.add_argument("--version-2", action="store_true", help="allow 'no answer' predictions (SQuAD v2)")
    parser.add_argument("--null-threshold", type=float, default=0.0,
                        help="with --version-2: answer only when the best span beats the null score by this")
    parser.add_argument("--max-length", type=int, default=DEFAULT_EVAL_MAX_LENGTH,
                        help=f"window in tokens (default {DEFAULT_EVAL_MAX_LENGTH}: whole contexts)")
    parser.add_argument("--stride", type=int, default=128, help="window overlap for longer contexts (default 128)")
    parser.add_argument("--max-answer-tokens", type=int, default=30, help="longest answer in tokens (default 30)")
    parser.add_argument("--batch-tokens", type=int, default=32768, help="padded tokens per batch (default 32768)")
    parser.add_argument("--max-examples", type=int, default=None, metavar="N",
                        help="score only N questions of each file, spread evenly through it")
    parser.add_argument("--language", default="en", metavar="CODE",
                        help="language of the answers: en (default) drops SQuAD's articles a/an/the before scoring; "
                             "es, de, vi drop theirs; any other code (e.g. nya) drops none")
    parser.add_argument("--truncate-question", action="store_true",
                        help="cut questions longer than block 0 (with a warning) instead of failing")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from littlebird_ds.train.qa_eval import evaluate_files, format_table, load_model_and_tokenizer, write_results

    paths = [p for p in args.data.split(",") if p.strip()]
    for flag, value in (("--max-examples", args.max_examples), ("--max-length", args.max_length),
                        ("--max-answer-tokens", args.max_answer_tokens), ("--batch-tokens", args.batch_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if not 0 <= args.stride < args.max_length:
        raise ValueError(f"--stride {args.stride} must be >= 0 and below --max-length {args.max_length}")
    if os.path.isdir(args.out):
        raise IsADirectoryError(f"--out {args.out} is a folder; pass the results file to write, e.g. {args.out}/results.json")
    if not paths:
        raise ValueError("--data names no file; pass FILE[,FILE...]")
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer)
        model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        results = evaluate_files(
            model, tokenizer, paths, max_examples=args.max_examples, max_length=args.max_length,
            stride=args.stride, version_2=args.version_2, null_score_diff_threshold=args.null_threshold,
            max_answer_tokens=args.max_answer_tokens, truncate_question=args.truncate_question,
            max_tokens_per_batch=args.batch_tokens, language=args.language, progress=None,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"evaluate-qa: error: {e}") from None
    results = {"model": str(args.model), "version_2": bool(args.version_2), "language": args.language, **results}
    write_results(args.out, results)
    print(format_table(results))
    print(f"predictions and metrics written to {args.out}")
    return 0
