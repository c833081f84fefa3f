"""Train a SentencePiece tokenizer on a corpus and save it with a Hugging Face fast tokenizer.

Writes spm.model/spm.vocab and tokenizer.json, tokenizer_config.json,
special_tokens_map.json (loadable with AutoTokenizer.from_pretrained(OUTPUT)) plus
tokenizer_recipe.json with the settings used. Special ids: [PAD] 0, [UNK] 1, [CLS] 2,
[SEP] 3, [MASK] 4, [QUESTION] 5. Settings come from --recipe FILE (YAML, see tokenizer/),
then from flags, which win.

Example:
  littlebird-ds train-tokenizer --recipe tokenizer/chichewa-unigram-8k.yaml --output out/tok
"""

from __future__ import annotations

import argparse
from dataclasses import fields


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that recipe values are only overridden by flags actually given.
    parser.add_argument("--recipe", help="YAML file of settings (keys as the flags, with underscores)")
    parser.add_argument("--corpus", help="corpus path or built-in name (e.g. chichewa-bible); may come from the recipe")
    parser.add_argument("--output", "--out", required=True, help="directory to write the tokenizer to")
    parser.add_argument("--vocab-size", type=int, help="total vocabulary size (default 8000)")
    parser.add_argument("--model-type", choices=["unigram", "bpe"], help="default unigram")
    parser.add_argument("--character-coverage", type=float,
                        help="default: 1.0 for small character sets, 0.9995 for large ones (CJK)")
    parser.add_argument("--byte-fallback", type=_bool, metavar="{true,false}", help="default true")
    parser.add_argument("--user-defined-symbols", nargs="*", metavar="SYMBOL", help="extra unsplittable pieces")
    parser.add_argument("--input-sentence-size", type=int, help="lines sampled for training (default 2000000, 0: all)")
    parser.add_argument("--shuffle-input-sentence", type=_bool, metavar="{true,false}", help="default true")
    parser.add_argument("--max-sentence-length", type=int, help="longest line in bytes (default 4192)")
    parser.add_argument("--normalization-rule-name", help="default nmt_nfkc")
    parser.add_argument("--split-digits", type=_bool, metavar="{true,false}", help="default false")
    parser.add_argument("--model-max-length", type=int, help="saved tokenizer's model_max_length (default 65536)")
    parser.add_argument("--text-field", help="JSON/dataset field with the text (default text)")
    parser.add_argument("--num-threads", type=int, help="default 2")
    parser.add_argument("--seed", type=int, help="default 0")


def run(args: argparse.Namespace) -> int:
    from littlebird_ds.data.tokenizer import TokenizerRecipe, load_recipe, train_tokenizer

    settings = load_recipe(args.recipe) if args.recipe else {}
    for f in fields(TokenizerRecipe):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    corpus = args.corpus or settings.pop("corpus", None)
    settings.pop("corpus", None)
    if not corpus:
        raise SystemExit("train-tokenizer: no corpus; pass --corpus PATH_OR_NAME or set `corpus:` in the recipe")
    out = train_tokenizer(corpus, args.output, **settings)
    print(f"tokenizer written to {out}")
    return 0
