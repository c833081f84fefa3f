"""Make extractive cloze QA (SQuAD format) from a corpus, in any language.

A question is one sentence (verse) of a document with a content-word span blanked out; the
answer is that span in a context window of the same document cut to a target length in
tokens (counted with --tokenizer). Documents are split train/validation/test; validation and
test sets are made at every --lengths value from the same questions, so F1 can be reported
against context length. Writes OUTPUT/{split}-{length}.json and OUTPUT/manifest.json.

Example:
  littlebird-ds make-qa --corpus chichewa-bible --tokenizer out/tok --output out/qa \\
      --lengths 512,2048,4096,8192 --train-lengths 512
"""

from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True,
                        help="corpus path or built-in name (e.g. chichewa-bible), read by load_corpus")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face fast tokenizer directory")
    parser.add_argument("--output", "--out", required=True, help="directory to write the QA files to")
    parser.add_argument("--lengths", type=_ints, default=(512, 2048, 4096, 8192),
                        help="target input lengths in tokens of the validation/test sets (default 512,2048,4096,8192)")
    parser.add_argument("--train-lengths", type=_ints, default=(512,),
                        help="target input lengths of the training sets (default 512)")
    parser.add_argument("--split", type=_floats, default=(0.8, 0.1, 0.1),
                        help="train,validation,test fractions of documents (default 0.8,0.1,0.1)")
    parser.add_argument("--questions-per-document", type=_ints, default=(256, 100, 100),
                        help="most questions per document for train,validation,test (default 256,100,100)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="model block size; questions must fit in block 0 (default: --model's, else 32, "
                             "the smallest preset block, so the questions fit every preset)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="the LittleBird model (a folder with config.json) the data is for: its block size "
                             "is used unless --block-size is given")
    parser.add_argument("--max-question-tokens", type=int, default=None,
                        help="question budget in tokens (default block size - 2)")
    parser.add_argument("--style", choices=["blank", "removed"], default="blank",
                        help="blank out the answer span (default) or remove it")
    parser.add_argument("--blank", default=None, help="blank marker (default: the tokenizer's mask token)")
    parser.add_argument("--max-answer-words", type=int, default=3, help="default 3")
    parser.add_argument("--allow-short", action="store_true",
                        help="use whole documents shorter than a target length as contexts")
    parser.add_argument("--text-field", default="text", help="JSON field with the text (default text)")
    parser.add_argument("--id-field", default=None, help="JSON field with the document id")
    parser.add_argument("--seed", type=int, default=0, help="default 0")


def _model_block_size(model: str | None) -> int:
    from littlebird_ds.data.make_qa import ClozeQAConfig

    if model is None:
        return ClozeQAConfig.block_size
    import json
    import os

    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {model}: no config.json there; pass a model folder (e.g. a run's OUT/final)")
    config = json.load(open(path, encoding="utf-8"))
    if "block_size" not in config:
        raise ValueError(f"--model {model}: its config.json has no block_size (not a LittleBird model); "
                         "pass --block-size instead")
    return int(config["block_size"])


def run(args: argparse.Namespace) -> int:
    import os

    from transformers import AutoTokenizer

    from littlebird_ds.data.corpus import load_corpus
    from littlebird_ds.data.make_qa import ClozeQAConfig, write_cloze_qa

    if len(args.questions_per_document) != 3:
        raise ValueError("--questions-per-document takes three numbers: train,validation,test")
    for flag, values in (("--lengths", args.lengths), ("--train-lengths", args.train_lengths),
                         ("--questions-per-document", args.questions_per_document)):
        if not values or min(values) < 1:
            raise ValueError(f"{flag} {','.join(map(str, values))}: every value must be a positive integer")
    block_size = args.block_size if args.block_size is not None else _model_block_size(args.model)
    config = ClozeQAConfig(
        lengths=args.lengths,
        train_lengths=args.train_lengths,
        split_fractions=args.split,
        seed=args.seed,
        block_size=block_size,
        max_question_tokens=args.max_question_tokens,
        questions_per_document=args.questions_per_document,
        style=args.style,
        blank=args.blank,
        max_answer_words=args.max_answer_words,
        allow_short=args.allow_short,
        extra={"corpus": str(args.corpus)},
    )
    if not os.path.isdir(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer} is not a folder; pass the OUTPUT of "
                                "`littlebird-ds train-tokenizer` or a model folder saved with its tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    documents = load_corpus(args.corpus, text_field=args.text_field, id_field=args.id_field)
    manifest = write_cloze_qa(documents, tokenizer, args.output, config)
    for name, count in manifest["files"].items():
        print(f"{args.output}/{name}: {count} questions")
    return 0
