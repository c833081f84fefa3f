"""Train a SentencePiece tokenizer on a corpus and save it as a Hugging Face fast tokenizer.

``train_tokenizer`` writes into ``output_dir``:

* ``spm.model`` / ``spm.vocab``: the SentencePiece model (unigram by default, or BPE);
* ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``: a fast
  tokenizer that ``transformers.AutoTokenizer.from_pretrained(output_dir)`` loads offline,
  encoding exactly as ``SentencePieceProcessor.encode`` does (same ids) and adding
  ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` (token type 0 for ``[CLS] A [SEP]``, 1 for
  ``B [SEP]``), with character offsets.

Fixed special ids (**decision**, the model and data code rely on them)::

    0 [PAD]   1 [UNK]   2 [CLS]   3 [SEP]   4 [MASK]   5 [QUESTION]   6.. user symbols

``[CLS]``/``[SEP]`` are SentencePiece's BOS/EOS control pieces, ``[MASK]``/``[QUESTION]``
(the latter reserved for recurring span selection) are user-defined pieces so that a
literal ``[MASK]`` in text maps to its id in both tokenizers.

Character coverage: ``None`` (the default) picks it from the corpus, following
SentencePiece's own guidance: ``1.0`` for a small character set (alphabets and
abugidas, at most ``SMALL_CHARSET`` distinct characters: every character gets a piece,
so no rare letter becomes ``[UNK]``), ``0.9995`` for a large one (Chinese, Japanese,
Korean syllables: the rarest characters are left to byte fallback rather than each
taking a vocabulary slot, which at full coverage can also exceed a small vocabulary).

Documents are fed to SentencePiece as lines (``iter_sentences``); lines longer than
``max_sentence_length`` bytes are cut at sentence ends or spaces, because SentencePiece
silently drops longer ones. ``input_sentence_size`` caps how many lines it samples
(shuffled), which bounds time and memory on large corpora.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from littlebird_ds.data.corpus import Document, iter_corpus
from littlebird_ds.utils.io import TMP_PREFIX

__all__ = [
    "SPECIAL_TOKENS",
    "SMALL_CHARSET",
    "TokenizerRecipe",
    "TOKENIZER_FILES",
    "auto_character_coverage",
    "has_tokenizer_files",
    "iter_sentences",
    "load_recipe",
    "spm_to_fast",
    "train_tokenizer",
]

logger = logging.getLogger(__name__)

#: Files a saved tokenizer loads from. ``tokenizer_config.json`` alone is not one: from it
#: transformers builds a tokenizer of the special tokens only.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer_files(path: str | os.PathLike[str]) -> bool:
    """Whether the directory ``path`` holds a loadable tokenizer (one of ``TOKENIZER_FILES``)."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)

PAD, UNK, CLS, SEP, MASK, QUESTION = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[QUESTION]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK, QUESTION)
SMALL_CHARSET = 500
# Characters counted to choose the coverage: a few MB show a script's character set.
_CHARSET_SAMPLE_CHARS = 10_000_000

ModelType = Literal["unigram", "bpe"]


@dataclass
class TokenizerRecipe:
    """Settings of ``train_tokenizer``; a recipe YAML file holds any subset of these keys."""

    vocab_size: int = 8000
    """Total vocabulary size, special tokens and byte pieces included."""
    model_type: ModelType = "unigram"
    """``"unigram"`` (default, as the LittleBird paper's tokenizers) or ``"bpe"``."""
    character_coverage: float | None = None
    """Share of characters (by frequency) given their own piece; ``None``: chosen from the corpus."""
    byte_fallback: bool = True
    """Encode characters without a piece as UTF-8 byte pieces instead of ``[UNK]`` (adds 256 pieces)."""
    user_defined_symbols: list[str] = field(default_factory=list)
    """Extra pieces always kept whole (ids from 6 on), e.g. markup tags."""
    input_sentence_size: int = 2_000_000
    """At most this many lines (sampled) are used for training; 0 means all."""
    shuffle_input_sentence: bool = True
    """Sample those lines at random rather than take the first ones."""
    max_sentence_length: int = 4192
    """Longest line in bytes handed to SentencePiece; longer lines are cut, not dropped."""
    normalization_rule_name: str = "nmt_nfkc"
    """SentencePiece normalisation (``nmt_nfkc``, ``nfkc``, ``identity``, ...)."""
    split_digits: bool = False
    """Split every digit into its own piece."""
    model_max_length: int = 65536
    """``model_max_length`` of the saved HF tokenizer; LittleBird has no position limit."""
    text_field: str = "text"
    """JSON/dataset field holding the document text."""
    num_threads: int = 2
    seed: int = 0
    """Seed of SentencePiece's sampling and shuffling."""

    def __post_init__(self) -> None:
        if self.model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {self.model_type!r}")
        reserved = len(SPECIAL_TOKENS) + len(self.user_defined_symbols) + (256 if self.byte_fallback else 0)
        if self.vocab_size <= reserved:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves no room for learned pieces: {reserved} ids are "
                f"taken by special tokens, user symbols and byte pieces. Raise vocab_size above {reserved}."
            )
        if self.character_coverage is not None and not 0.98 <= self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in [0.98, 1.0] or None, got {self.character_coverage}")
        clash = set(self.user_defined_symbols) & set(SPECIAL_TOKENS)
        if clash:
            raise ValueError(f"user_defined_symbols {sorted(clash)} are built-in special tokens; remove them.")


def load_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a recipe YAML file (flat ``key: value`` mapping of ``TokenizerRecipe`` fields, plus
    optional ``corpus``). Unknown keys are an error naming the known ones."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {os.fspath(path)!r} must be a YAML mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TokenizerRecipe)} | {"corpus"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"recipe {os.fspath(path)!r} has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    return data


_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？।؟።])\s+")


def _cut(line: str, max_bytes: int) -> Iterator[str]:
    """Cut ``line`` into pieces of at most ``max_bytes`` UTF-8 bytes, at sentence ends, else spaces."""
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    chunk = ""
    for sentence in _SENTENCE_END.split(line):
        for word in sentence.split(" ") if len(sentence.encode("utf-8")) > max_bytes else [sentence]:
            # A single word longer than the limit (unspaced scripts) is cut by characters.
            while len(word.encode("utf-8")) > max_bytes:
                head = word[: max_bytes // 4]
                if chunk:
                    yield chunk
                    chunk = ""
                yield head
                word = word[len(head):]
            candidate = f"{chunk} {word}" if chunk else word
            if len(candidate.encode("utf-8")) > max_bytes:
                yield chunk
                chunk = word
            else:
                chunk = candidate
    if chunk:
        yield chunk


def iter_sentences(docs: Iterable[Document | str], max_bytes: int = 4192) -> Iterator[str]:
    """The non-blank lines of each document, each at most ``max_bytes`` UTF-8 bytes."""
    for doc in docs:
        text = doc.text if isinstance(doc, Document) else doc
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield from _cut(line, max_bytes)


def auto_character_coverage(chars: Iterable[str]) -> float:
    """SentencePiece's recommended coverage for a corpus with these distinct characters.

    ``1.0`` for at most ``SMALL_CHARSET`` distinct non-space characters, else ``0.9995``.
    """
    distinct = {c for c in chars if not c.isspace()}
    return 1.0 if len(distinct) <= SMALL_CHARSET else 0.9995


def _spm_error(exc: Exception, recipe: TokenizerRecipe) -> ValueError:
    message = str(exc)
    if "Vocabulary size is smaller than required_chars" in message:
        fix = "raise vocab_size, or lower character_coverage (e.g. 0.9995) so rare characters use byte fallback"
    elif "Vocabulary size too high" in message:
        fix = "lower vocab_size, or train on more text"
    else:
        fix = "check the settings above"
    return ValueError(f"SentencePiece training failed ({message.strip()}); {fix}. Settings: {asdict(recipe)}")


def spm_to_fast(spm_model: str | os.PathLike[str], model_max_length: int = 65536):
    """Convert a SentencePiece model trained by ``train_tokenizer`` to a ``PreTrainedTokenizerFast``.

    Uses transformers' ``SpmConverter.build_tokenizer_from_spm_proto``, which follows the
    model's own normaliser settings so ids equal ``SentencePieceProcessor.encode``, and adds
    a ``TemplateProcessing`` post-processor for ``[CLS] A [SEP] (B [SEP])``.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    pieces = [p.piece for p in proto.pieces]
    if tuple(pieces[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(
            f"{os.fspath(spm_model)!r} does not start with the special pieces {list(SPECIAL_TOKENS)} "
            f"(it has {pieces[: len(SPECIAL_TOKENS)]}); train it with train_tokenizer."
        )
    if proto.trainer_spec.model_type == 1:  # unigram
        vocab: Any = [(p.piece, p.score) for p in proto.pieces]
    else:  # BPE: merges are derived from piece scores
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    cls_id, sep_id = pieces.index(CLS), pieces.index(SEP)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        additional_special_tokens=[QUESTION],
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def train_tokenizer(
    corpus: str | os.PathLike[str] | Iterable[Document | str],
    output_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 8000,
    model_type: ModelType = "unigram",
    character_coverage: float | None = None,
    byte_fallback: bool = True,
    user_defined_symbols: Sequence[str] = (),
    input_sentence_size: int = 2_000_000,
    shuffle_input_sentence: bool = True,
    max_sentence_length: int = 4192,
    normalization_rule_name: str = "nmt_nfkc",
    split_digits: bool = False,
    model_max_length: int = 65536,
    text_field: str = "text",
    num_threads: int = 2,
    seed: int = 0,
) -> Path:
    """Train SentencePiece on ``corpus`` and save it plus a HF fast tokenizer in ``output_dir``.

    Args:
        corpus: anything ``littlebird_ds.data.corpus.iter_corpus`` accepts (a path or a
            built-in name such as ``"chichewa-bible"``), or an iterable of ``Document`` or
            strings. It is streamed, never loaded whole.
        output_dir: created if missing; see the module docstring for the files written.
        The other arguments are the fields of ``TokenizerRecipe`` (documented there).

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        ValueError: bad settings, an empty corpus, or SentencePiece refusing the settings
            (vocabulary too large for the text or too small for the character set); the
            message names the fix.
    """
    import sentencepiece as spm

    recipe = TokenizerRecipe(
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        byte_fallback=byte_fallback, user_defined_symbols=list(user_defined_symbols),
        input_sentence_size=input_sentence_size, shuffle_input_sentence=shuffle_input_sentence,
        max_sentence_length=max_sentence_length, normalization_rule_name=normalization_rule_name,
        split_digits=split_digits, model_max_length=model_max_length, text_field=text_field,
        num_threads=num_threads, seed=seed,
    )
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file; pass a directory to write the tokenizer to")
    # Built in a temporary folder beside OUTPUT and moved into place at the end: a bad corpus
    # or setting leaves OUTPUT as it was (absent, or an earlier tokenizer).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + out.name + "-", dir=out.parent))
    try:
        _train_into(tmp, corpus, recipe, text_field, spm)
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _train_into(out: Path, corpus, recipe: TokenizerRecipe, text_field: str, spm) -> None:
    vocab_size, model_type, character_coverage = recipe.vocab_size, recipe.model_type, recipe.character_coverage
    byte_fallback, input_sentence_size = recipe.byte_fallback, recipe.input_sentence_size
    shuffle_input_sentence, max_sentence_length = recipe.shuffle_input_sentence, recipe.max_sentence_length
    normalization_rule_name, split_digits = recipe.normalization_rule_name, recipe.split_digits
    num_threads, seed, model_max_length = recipe.num_threads, recipe.seed, recipe.model_max_length
    user_defined_symbols = recipe.user_defined_symbols

    if isinstance(corpus, (str, os.PathLike)):
        docs: Iterable[Document | str] = iter_corpus(corpus, text_field=text_field)
    else:
        docs = corpus
    sentences = iter_sentences(docs, max_bytes=max_sentence_length)
    # Look at the start of the stream to choose the coverage, then train on all of it.
    head: list[str] = []
    seen = 0
    for sentence in sentences:
        head.append(sentence)
        seen += len(sentence)
        if seen >= _CHARSET_SAMPLE_CHARS:
            break
    if not head:
        raise ValueError("the corpus has no text to train a tokenizer on; pass a non-empty corpus.")
    if character_coverage is None:
        character_coverage = auto_character_coverage(itertools.chain.from_iterable(head))
        logger.info("character_coverage=%s chosen from the corpus's character set", character_coverage)
    recipe.character_coverage = character_coverage

    # Process-wide in SentencePiece; set just before training so the sampling is reproducible.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain(head, sentences),
            model_prefix=str(out / "spm"),
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=shuffle_input_sentence,
            max_sentence_length=max_sentence_length,
            normalization_rule_name=normalization_rule_name,
            split_digits=split_digits,
            num_threads=num_threads,
            pad_id=0, pad_piece=PAD,
            unk_id=1, unk_piece=UNK,
            bos_id=2, bos_piece=CLS,
            eos_id=3, eos_piece=SEP,
            user_defined_symbols=[MASK, QUESTION, *user_defined_symbols],
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise _spm_error(exc, recipe) from exc

    fast = spm_to_fast(out / "spm.model", model_max_length=model_max_length)
    fast.save_pretrained(str(out))
    special_map = {
        "pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK,
        "additional_special_tokens": [QUESTION],
    }
    # transformers 5 keeps these in tokenizer_config.json only; older readers look here.
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n", encoding="utf-8")


def load_tokenizer(path: str | os.PathLike[str]):
    """A fast tokenizer from a local directory, checked for the tokens span masking needs."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {p} does not exist; train one with "
            f"`littlebird-ds train-tokenizer --corpus CORPUS --output {p}` or pass --tokenizer DIR"
        )
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{p} holds no tokenizer (no tokenizer.json or tokenizer_config.json); pass the OUTPUT directory "
            "of `littlebird-ds train-tokenizer`, or a model directory saved with its tokenizer"
        )
    tok = AutoTokenizer.from_pretrained(str(p))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer {p} is not a fast tokenizer; re-save it with `littlebird-ds train-tokenizer`")
    missing = [name for name in ("pad_token", "cls_token", "sep_token", "mask_token") if getattr(tok, name) is None]
    if missing:
        raise ValueError(f"tokenizer {p} has no {', '.join(missing)}; span masking needs [PAD], [CLS], [SEP] "
                         "and [MASK] (`littlebird-ds train-tokenizer` adds them)")
    return tok
