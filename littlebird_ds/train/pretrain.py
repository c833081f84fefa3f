"""Pretraining with the span-masking objective: a LittleBird, or a short-input BERT teacher.

The data path, in order (steps 2-4 live in :mod:`littlebird_ds.data.mlm`, which ``distill``
shares):

1. ``iter_corpus`` streams the documents (any source it accepts), split by document id hash
   (``iter_split``);
2. the tokenizer (``AutoTokenizer.from_pretrained(DIR)``, a fast tokenizer) turns each
   document into token ids in batched calls, with a progress bar, once: the ids go to the
   token cache and are memory-mapped from there (``tokenized_corpus_splits``), so neither
   the text nor the ids of a corpus need to fit in memory;
3. each document is cut into windows of ``max_length - 2`` tokens, each example
   ``[CLS] window [SEP]``. A window never spans two documents and documents are never
   packed together (a short document, or the model would attend across documents, gives
   one short example that the collator pads). The last window of a long document is
   aligned to the document's end, overlapping its predecessor, so that every example of a
   long document is full length;
4. ``SpanMaskingCollator`` masks spans (SpanBERT); optionally ``insert_padding_batch``
   spreads pads inside the examples (Padding Insertion, LittleBird further pretraining);
5. the shared training engine (``littlebird_ds.train.engine.Trainer``) trains with
   the masked-LM loss.

Evaluation uses a fixed masked validation set: the validation split's windows (evenly
chosen when there are more than ``--eval-examples``), masked once with a seeded generator,
so every evaluation of every run with the same data and seed sees the same masks. It
reports the mean cross-entropy over masked tokens (``eval_loss``) and the share of masked
tokens predicted exactly (``eval_accuracy``), logged by the engine to ``metrics.jsonl`` and
TensorBoard every ``--eval-every`` steps and at the end. A fresh run (not ``--resume``) also
evaluates the initial model as the step-0 record of ``metrics.jsonl`` (the engine's
``--eval-at-start``, on by default for every training command).

**Recurring span selection** (``--rss-weight W``, LittleBird only; Ram et al. 2021, the
original LittleBird work's objective): before masking, every occurrence but one of up to
``--rss-max-questions`` recurring spans (runs of 2-10 whole words whose ids occur at least
twice in the window) becomes one question token, and a span-selection head on each question
token's state points at the kept occurrence (start and end). The question token is
``[MASK]``, the blank of ``make-qa``'s cloze questions, so pretraining practises exactly the
skill cloze QA needs: find where the blank's surroundings recur and point there. Kept
occurrences are never masked; the loss is ``mlm + W * rss``; evaluation adds
``rss_loss`` and ``rss_accuracy`` (start and end both exact).

Not wired in: the span boundary objective (the model has no SBO head yet); the collator
already returns the SBO fields.
"""

from __future__ import annotations

import logging
import argparse
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.mlm import (
    IGNORE_INDEX,
    WindowDataset,
    fixed_eval_batches,
    make_train_collate,
    tokenized_corpus_splits,
)
from ..data.tokenizer import load_tokenizer
from ..model.modeling import masked_logits_kwargs
from .presets import MODEL_KINDS, PRESETS, build_config, build_model, max_positions

_log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``pretrain``'s own flags and the shared engine flags; returns ``parser``."""
    from .engine import add_training_arguments

    g = parser.add_argument_group("model")
    g.add_argument("--model-type", "--model", dest="model", choices=MODEL_KINDS, default=None,
                   help="littlebird (default) or bert (the 512-position teacher, HF BertForMaskedLM); --model is "
                        "the older spelling (elsewhere --model is a model folder)")
    g.add_argument("--preset", default="base", metavar="NAME|FILE",
                   help=f"preset ({', '.join(PRESETS['littlebird'])}) or a JSON/YAML file of config fields "
                        "(default base)")
    g.add_argument("--init-from", metavar="DIR", default=None,
                   help="continue from a saved model (save_pretrained directory, e.g. a previous OUT/final); "
                        "its kind and config win over --model-type/--preset")
    d = parser.add_argument_group("data")
    d.add_argument("--corpus", required=True, help="corpus path or built-in name (e.g. chichewa-bible)")
    d.add_argument("--text-field", default="text", help="JSON/dataset field holding the text")
    d.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory (littlebird-ds train-tokenizer OUTPUT); default: --init-from DIR")
    d.add_argument("--max-length", type=int, default=512,
                   help="tokens per example, [CLS] and [SEP] included (BERT teacher: at most 512)")
    d.add_argument("--validation-fraction", type=float, default=0.05,
                   help="share of documents held out for evaluation (0: no evaluation)")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split by document")
    d.add_argument("--eval-examples", type=int, default=256,
                   help="at most this many validation windows, evenly chosen (default 256)")
    d.add_argument("--mask-rate", type=float, default=0.15, help="share of tokens in masked spans")
    d.add_argument("--padding-insertion", type=float, default=0.0, metavar="P",
                   help="LittleBird only: probability per example of Padding Insertion (default 0: off)")
    d.add_argument("--pi-max-length", type=int, default=None, metavar="N",
                   help="length examples are padded out to by Padding Insertion (a multiple of the block size)")
    d.add_argument("--rss-weight", type=float, default=0.0, metavar="W",
                   help="LittleBird only: add recurring span selection with this weight (default 0: off); "
                        "the model gets a span-selection head")
    d.add_argument("--rss-max-questions", type=int, default=30, metavar="Q",
                   help="most recurring spans turned into questions per window (default 30)")
    d.add_argument("--tokenize-batch-size", type=int, default=16, help="documents per tokenizer call")
    add_training_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# Data (the MLM data library is littlebird_ds.data.mlm)
# ---------------------------------------------------------------------------------------------
def is_main_process() -> bool:
    """Rank 0 of a launched job, or no launcher at all (before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def _device_of(model) -> torch.device:
    device = getattr(model, "device", None)  # the DeepSpeed engine has one
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_mlm(model, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Masked-token ``loss`` (mean cross-entropy over all masked tokens of all batches),
    ``accuracy`` (share predicted exactly) and ``masked_tokens``; with recurring-span
    questions in the batches also ``rss_loss``, ``rss_uniform_loss`` (chance: pointing
    uniformly over each row's tokens), ``rss_accuracy`` (start and end both right) and
    ``rss_questions``. The caller sets eval mode."""
    device = _device_of(model)
    loss_sum, correct, count = 0.0, 0, 0
    rss_loss_sum, rss_uniform_sum, rss_correct, rss_count = 0.0, 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        kw = masked_logits_kwargs(model)
        if not kw:
            batch.pop("labels")
        out = model(**batch, **kw)
        logits = out.logits  # [B, L, V], or [M, V] with masked_logits_only
        sel = labels != IGNORE_INDEX
        picked = (logits if kw else logits[sel]).float()  # [M, V]
        target = labels[sel]
        loss_sum += float(torch.nn.functional.cross_entropy(picked, target, reduction="sum"))
        correct += int((picked.argmax(-1) == target).sum())
        count += int(sel.sum())
        if "rss_questions" in batch:
            valid = batch["rss_questions"] >= 0
            n = int(valid.sum())
            if n:
                rss_loss_sum += float(out.rss_loss) * n
                # The loss of pointing uniformly over the row's attended tokens: chance level.
                real = batch["attention_mask"].sum(-1, keepdim=True).expand_as(valid)[valid].double()
                rss_uniform_sum += float(real.log().sum())
                hit = (out.rss_start_logits.argmax(-1) == batch["rss_starts"][valid]) & (
                    out.rss_end_logits.argmax(-1) == batch["rss_ends"][valid])
                rss_correct += int(hit.sum())
                rss_count += n
    metrics = ({"loss": float("nan"), "accuracy": float("nan"), "masked_tokens": 0.0} if count == 0 else
               {"loss": loss_sum / count, "accuracy": correct / count, "masked_tokens": float(count)})
    if rss_count:
        metrics.update(rss_loss=rss_loss_sum / rss_count, rss_uniform_loss=rss_uniform_sum / rss_count,
                       rss_accuracy=rss_correct / rss_count, rss_questions=float(rss_count))
    return metrics


def mlm_loss_fn(model, batch: dict[str, torch.Tensor], rss_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The engine's ``loss_fn``: masked-LM loss, plus masked tokens and train masked accuracy.
    With recurring-span questions in the batch, ``loss = mlm + rss_weight * rss``."""
    kw = masked_logits_kwargs(model)
    out = model(**batch, **kw)
    labels = batch["labels"]
    sel = labels != IGNORE_INDEX
    with torch.no_grad():
        picked = out.logits if kw else out.logits[sel]  # [M, V]
        acc = (picked.argmax(-1) == labels[sel]).float().mean() if bool(sel.any()) else torch.tensor(0.0)
    logs = {"masked_tokens": int(sel.sum()), "masked_accuracy": float(acc)}
    loss = out.loss
    if "rss_questions" in batch:
        loss = loss + rss_weight * out.rss_loss
        logs.update(mlm=out.loss.item(), rss=out.rss_loss.item(), rss_questions=int((batch["rss_questions"] >= 0).sum()))
    return loss, logs


# ---------------------------------------------------------------------------------------------
# Set-up (every check happens here, before any process group or model exists)
# ---------------------------------------------------------------------------------------------
@dataclass
class PretrainSetup:
    """Everything ``run_pretraining`` hands the engine; built by :func:`prepare_pretraining`."""

    kind: str
    config: Any
    tokenizer: Any
    train_dataset: WindowDataset
    eval_batches: list[dict[str, torch.Tensor]]
    collate_fn: Callable
    model_factory: Callable[[], torch.nn.Module]
    stats: dict[str, Any] = field(default_factory=dict)
    rss_weight: float = 0.0


def _resolve_model(args) -> tuple[str, Any]:
    """``(kind, config)`` from ``--init-from`` or ``--model``/``--preset`` (config not yet sized to the tokenizer
    when built from a preset: ``None`` then)."""
    if args.init_from is None:
        return args.model or "littlebird", None
    from transformers import AutoConfig

    import littlebird_ds  # noqa: F401 - registers LittleBird with AutoConfig

    p = Path(args.init_from)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {p}: no config.json there; pass a directory written by "
                                "save_pretrained (e.g. a previous run's OUT/final)")
    config = AutoConfig.from_pretrained(str(p))
    kind = "littlebird" if config.model_type == "littlebird" else "bert" if config.model_type == "bert" else None
    if kind is None:
        raise ValueError(f"--init-from {p} holds a {config.model_type!r} model; pretrain continues LittleBird or "
                         "BERT models only")
    if args.model is not None and args.model != kind:
        raise ValueError(f"--model-type {args.model} contradicts --init-from {p}, which holds a {kind} model; drop --model-type")
    return kind, config


def prepare_pretraining(args) -> PretrainSetup:
    """Check the arguments, load and tokenise the corpus, build the datasets and the model factory.

    Raises ``FileNotFoundError``/``ValueError`` with the problem and the fix: a missing
    tokenizer, an empty corpus, ``--max-length`` beyond a BERT teacher's positions,
    Padding Insertion settings that do not fit, a model larger than the tokenizer allows.
    """
    kind, config = _resolve_model(args)
    tok_dir = args.tokenizer or args.init_from
    if tok_dir is None:
        raise ValueError("no tokenizer: pass --tokenizer DIR (the OUTPUT of `littlebird-ds train-tokenizer`)")
    tokenizer = load_tokenizer(tok_dir)
    if config is None:
        config = build_config(kind, args.preset, len(tokenizer), tokenizer.pad_token_id)
    elif config.vocab_size < len(tokenizer):
        raise ValueError(f"--init-from {args.init_from} has a vocabulary of {config.vocab_size} but tokenizer "
                         f"{tok_dir} has {len(tokenizer)} tokens; pass the tokenizer the model was trained with")

    max_len = int(args.max_length)
    limit = max_positions(config)
    if limit is not None and max_len > limit:
        raise ValueError(f"--max-length {max_len} exceeds the BERT teacher's {limit} positions; use --max-length "
                         f"{limit} or less (the teacher reads short inputs; LittleBird reads long ones)")
    if max_len < 8:
        raise ValueError(f"--max-length {max_len} is too short; use at least 8 tokens")
    block = getattr(config, "block_size", None) if kind == "littlebird" else None
    pi, pi_max = float(args.padding_insertion), args.pi_max_length
    if not 0.0 <= pi <= 1.0:
        raise ValueError(f"--padding-insertion is a probability in [0, 1], got {pi}")
    if pi > 0:
        if kind != "littlebird":
            raise ValueError("--padding-insertion needs --model-type littlebird: inserted pads keep their positions, "
                             "which only LittleBird's position bias handles beyond 512 tokens")
        if pi_max is None or pi_max < max_len:
            raise ValueError(f"--padding-insertion needs --pi-max-length N >= --max-length {max_len} (e.g. 4 x)")
        if pi_max % block:
            raise ValueError(f"--pi-max-length {pi_max} is not a multiple of the block size {block}; "
                             f"use {-(-pi_max // block) * block}")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise ValueError(f"--validation-fraction must be in [0, 1), got {args.validation_fraction}")
    rss_weight = float(getattr(args, "rss_weight", 0.0) or 0.0)
    rss_q = int(getattr(args, "rss_max_questions", 30)) if rss_weight else None
    if rss_weight < 0:
        raise ValueError(f"--rss-weight {rss_weight} must be >= 0 (0: no recurring span selection)")
    if rss_weight:
        if kind != "littlebird":
            raise ValueError("--rss-weight needs --model-type littlebird: the span-selection head is LittleBird's")
        if rss_q < 1:
            raise ValueError(f"--rss-max-questions {rss_q} must be >= 1")

    main = is_main_process()
    t0 = time.perf_counter()
    train_ids, val_ids = tokenized_corpus_splits(args.corpus, tokenizer, text_field=args.text_field,
                                                 validation_fraction=args.validation_fraction, seed=args.split_seed,
                                                 batch_size=args.tokenize_batch_size, show_progress=main)
    train_set = WindowDataset(train_ids, max_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
    val_set = WindowDataset(val_ids, max_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
    if len(train_set) == 0:
        raise ValueError(f"corpus {args.corpus!r} gave no training tokens after the split; pass a larger corpus "
                         "or a smaller --validation-fraction")
    batch = int(args.batch_size or 8)
    eval_batches = fixed_eval_batches(val_set, tokenizer, batch_size=batch, max_examples=args.eval_examples,
                                      seed=args.seed, mask_rate=args.mask_rate, pad_to_multiple_of=block,
                                      rss_max_questions=rss_q)
    collate = make_train_collate(tokenizer, mask_rate=args.mask_rate, pad_to_multiple_of=block,
                                 padding_insertion=pi, pi_max_length=pi_max, rss_max_questions=rss_q)
    stats = {
        "documents": {"train": len(train_ids), "validation": len(val_ids)},
        "tokens": {"train": int(train_ids.offsets[-1]), "validation": int(val_ids.offsets[-1])},
        "examples": {"train": len(train_set), "validation": len(val_set),
                     "eval": int(sum(len(b["input_ids"]) for b in eval_batches))},
        "data_seconds": round(time.perf_counter() - t0, 2),
    }
    if main:
        _log.info(f"pretrain: {kind} | documents {stats['documents']} | tokens {stats['tokens']} | "
                  f"examples of {max_len} tokens {stats['examples']} | data ready in {stats['data_seconds']} s")

    init_from = args.init_from

    def model_factory() -> torch.nn.Module:
        if init_from is not None:
            from transformers import AutoModelForMaskedLM

            import littlebird_ds  # noqa: F401 - registers LittleBird with the Auto classes

            # rss_head=True adds a freshly initialised span-selection head if the saved model has none.
            return AutoModelForMaskedLM.from_pretrained(init_from, **({"rss_head": True} if rss_weight else {}))
        return build_model(kind, args.preset, len(tokenizer), tokenizer.pad_token_id, head="mlm",
                           **({"rss_head": True} if rss_weight else {}))

    return PretrainSetup(kind=kind, config=config, tokenizer=tokenizer, train_dataset=train_set,
                         eval_batches=eval_batches, collate_fn=collate, model_factory=model_factory, stats=stats,
                         rss_weight=rss_weight)


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------
def run_pretraining(args, setup: PretrainSetup | None = None):
    """Pretrain as the parsed ``args`` say; returns the engine's ``TrainResult``.

    ``OUT/final`` then holds the model (``save_pretrained``) and the tokenizer;
    ``OUT/metrics.jsonl`` the training records and the ``eval_loss``/``eval_accuracy``
    records. Call ``finish_worker()`` afterwards in a launched script (the CLI does).
    """
    from .engine import Trainer

    setup = setup or prepare_pretraining(args)
    eval_batches = setup.eval_batches
    eval_fn = (lambda model, step: evaluate_mlm(model, eval_batches)) if eval_batches else None

    def loss_fn(model, batch):
        return mlm_loss_fn(model, batch, rss_weight=setup.rss_weight)

    trainer = Trainer(args, model_factory=setup.model_factory, loss_fn=loss_fn, train_dataset=setup.train_dataset,
                      collate_fn=setup.collate_fn, eval_fn=eval_fn, tokenizer=setup.tokenizer)
    return trainer.fit()
