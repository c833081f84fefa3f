"""Extractive QA fine-tuning on the shared training engine, with Padding Insertion and a
length curriculum.

Pipeline (:func:`finetune_qa`):

1. Inputs are loaded and checked **before anything is written**: QA files
   (:func:`~littlebird_ds.data.qa.load_qa_examples` raises on answers that do not match their
   context, empty contexts or questions), training features per curriculum length and
   validation features (``prepare_features`` raises on a question longer than block 0). A bad
   input therefore leaves no ``OUT``.
2. Training features: ``[CLS] question [SEP] context-window [SEP]`` windows of ``--max-length``
   tokens (or of each curriculum length). For answerable questions only the windows holding the
   answer are kept: a cloze context cut into 128-token windows would otherwise be mostly
   "answer not here" windows, which teach the ``[CLS]`` prior and little else. Windows of
   unanswerable (SQuAD v2) questions are all kept, labelled ``[CLS]``.
3. Batches (:class:`QABatches`, a resumable :data:`~littlebird_ds.train.engine.BatchIteratorFactory`):
   padded to the longest row; then, with probability ``padding_insertion``, Padding
   Insertion spreads pads through the context so the batch looks up to ``pi_max_length``
   tokens long. The question prefix ``[CLS] question [SEP]`` is protected (it must stay in
   block 0, the global block), the answer span is kept together, and the answer positions are
   moved with the index map. The decision is made per *batch*: a batch is as long as its
   longest row, so per-row decisions would make nearly every batch long and cost the
   ``pi_max_length / max_length`` factor on every step; per batch, each example still gets
   Padding Insertion with probability ``p`` and, when it does, its own target length, under
   a cap drawn once per batch (``shared_cap``), so a PI batch is on average about half way
   between its real length and ``pi_max_length`` long, not nearly all of it.
4. :class:`~littlebird_ds.train.engine.Trainer` with :func:`qa_loss` and an eval function that
   scores the validation file(s) (EM/F1, per file when several are given: one per context
   length for ``make-qa`` output) and logs ``eval_*``; ``OUT/final`` holds the model and the
   tokenizer and loads with ``AutoModelForQuestionAnswering``.

Curriculum: ``"128:0.7,256:0.2,512:0.1"`` trains the first 70% of ``--max-steps`` at 128 tokens,
the next 20% at 256 and the rest at 512 (spec section 6: from scratch, training directly at
512 tokens stayed at chance; the curriculum broke the plateau).
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from littlebird_ds.data.padding_insertion import insert_padding_batch
from littlebird_ds.data.qa import load_qa_examples, prepare_features

from .batches import dataset_batches
from .qa_eval import DEFAULT_EVAL_MAX_LENGTH, evaluate_files, write_results

__all__ = [
    "PRESETS",
    "QABatches",
    "build_qa_model_factory",
    "collate_qa",
    "finetune_qa",
    "parse_curriculum",
    "qa_loss",
    "stage_boundaries",
    "train_features",
]

#: Fallback for ``--preset`` when ``littlebird_ds.train.presets`` (the shared presets) is absent.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512,
                 block_size=32, pack_size=16),
}


# ---------------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------------
def parse_curriculum(text: str | None, max_length: int) -> list[tuple[int, float]]:
    """``"128:0.7,256:0.2,512:0.1"`` -> ``[(128, 0.7), (256, 0.2), (512, 0.1)]``.

    ``None`` or ``""`` means one stage at ``max_length``. Fractions are of ``--max-steps``,
    must be positive and sum to 1 (within 1e-6); lengths must be positive and not exceed
    ``max_length``. Raises ``ValueError`` naming the bad part.
    """
    if not text:
        return [(int(max_length), 1.0)]
    stages: list[tuple[int, float]] = []
    for part in text.split(","):
        part = part.strip()
        try:
            length_s, frac_s = part.split(":")
            length, frac = int(length_s), float(frac_s)
        except ValueError:
            raise ValueError(
                f"--curriculum part {part!r} is not LENGTH:FRACTION; write e.g. 128:0.7,256:0.2,512:0.1"
            ) from None
        if length < 1 or frac <= 0:
            raise ValueError(f"--curriculum part {part!r}: the length and the fraction must be positive")
        if length > max_length:
            raise ValueError(
                f"--curriculum length {length} exceeds --max-length {max_length}; raise --max-length or "
                "shorten the stage"
            )
        stages.append((length, frac))
    total = sum(f for _, f in stages)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"--curriculum fractions sum to {total:g}, not 1; e.g. 128:0.7,256:0.2,512:0.1")
    return stages


def stage_boundaries(stages: Sequence[tuple[int, float]], max_steps: int) -> list[int]:
    """First optimizer step of each stage, plus ``max_steps`` at the end (rounded so the last
    stage ends exactly at ``max_steps``; a stage may get 0 steps in a very short run)."""
    bounds = [0]
    acc = 0.0
    for _, frac in stages[:-1]:
        acc += frac
        bounds.append(min(max_steps, int(round(acc * max_steps))))
    bounds.append(max_steps)
    return bounds


# ---------------------------------------------------------------------------------------------
# Features and batches
# ---------------------------------------------------------------------------------------------
def train_features(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    stride: int,
    block_size: int,
    truncate_question: bool = False,
) -> list[dict[str, Any]]:
    """Training rows of ``max_length``-token windows (see the module docstring, step 2).

    Each row: ``input_ids``, ``token_type_ids``, ``attention_mask`` (lists), ``start_positions``,
    ``end_positions`` (token indices; 0 = ``[CLS]`` = no answer), ``prefix_length`` (tokens of
    ``[CLS] question [SEP]``). Raises ``ValueError`` on a question longer than block 0 (see
    :func:`~littlebird_ds.data.qa.prepare_features`) or when no window holds an answer.
    """
    room = max_length - (block_size - 2) - 3
    feats = prepare_features(examples, tokenizer, max_length=max_length,
                             stride=min(stride, max(1, room // 2)), block_size=block_size,
                             truncate_question=truncate_question)
    rows: list[dict[str, Any]] = []
    for i in range(len(feats["input_ids"])):
        example = examples[feats["example_index"][i]]
        start, end = feats["start_positions"][i], feats["end_positions"][i]
        if start == 0 and not example.get("is_impossible"):
            continue  # an answerable question's window without its answer: see the module doc
        types = feats["token_type_ids"][i]
        mask = feats["attention_mask"][i]
        prefix = sum(1 for t, m in zip(types, mask) if t == 0 and m)
        rows.append({
            "input_ids": feats["input_ids"][i], "token_type_ids": types, "attention_mask": mask,
            "start_positions": start, "end_positions": end, "prefix_length": prefix,
        })
    if not rows:
        raise ValueError(
            f"no {max_length}-token training window holds an answer; check that the answers lie "
            "inside their contexts and that --max-length (or the curriculum's lengths) leaves room for them"
        )
    return rows


def collate_qa(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows -> a batch padded to its longest row: ``input_ids``, ``token_type_ids``,
    ``attention_mask`` ``[B, L]``; ``start_positions``, ``end_positions``, ``prefix_length`` ``[B]``."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    types = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.as_tensor(r["input_ids"])
        types[b, :n] = torch.as_tensor(r["token_type_ids"])
        mask[b, :n] = torch.as_tensor(r["attention_mask"])
    return {
        "input_ids": ids, "token_type_ids": types, "attention_mask": mask,
        "start_positions": torch.tensor([r["start_positions"] for r in rows], dtype=torch.long),
        "end_positions": torch.tensor([r["end_positions"] for r in rows], dtype=torch.long),
        "prefix_length": torch.tensor([r["prefix_length"] for r in rows], dtype=torch.long),
    }


def apply_padding_insertion(
    batch: Mapping[str, torch.Tensor],
    *,
    max_length: int,
    pad_token_id: int,
    block_size: int,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Padding Insertion on a QA batch from :func:`collate_qa` (every row gets a target length,
    under one cap per batch drawn in ``[longest row, max_length]``).

    Pads never go into ``[CLS] question [SEP]`` (``prefix_length``) nor inside the answer span;
    ``start_positions``/``end_positions`` follow their tokens; the batch is rounded up to whole
    blocks. ``prefix_length`` is kept, ``index_map`` dropped.
    """
    keep = [[(int(s), int(e))] if int(s) > 0 else [] for s, e in
            zip(batch["start_positions"].tolist(), batch["end_positions"].tolist())]
    real = int(batch["attention_mask"].sum(-1).max())
    out = insert_padding_batch(
        {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")},
        max_length=max(max_length, real), probability=1.0, protected_prefix=batch["prefix_length"],
        keep_together=keep, pad_token_id=pad_token_id, pad_to_multiple_of=block_size, generator=rng,
        shared_cap=True,
    )
    out.pop("index_map")
    out["prefix_length"] = batch["prefix_length"]
    return out


@dataclass
class QABatches:
    """Resumable batch factory over curriculum stages, with Padding Insertion.

    ``stages[i]`` is ``(length, rows)``; stage ``i`` runs from optimizer step ``bounds[i]`` to
    ``bounds[i + 1]``. Within a stage the rows are shuffled per epoch as
    :func:`~littlebird_ds.train.engine.dataset_batches` does (seed ``seed + i``); Padding
    Insertion for global micro-step ``m`` on data-parallel rank ``r`` of ``dp`` draws from
    ``numpy.random.default_rng([seed, m * dp + r])`` (the global micro-batch index), so a resumed
    run, and any split of the same micro-batches over ranks and accumulation steps, sees the same
    batches.
    ``pi_max_length`` ``None`` means ``pi_factor`` times the stage length, rounded up to whole
    blocks.
    """

    stages: list[tuple[int, list[dict[str, Any]]]]
    bounds: list[int]
    batch_size: int
    grad_accum: int
    seed: int
    pad_token_id: int
    block_size: int
    padding_insertion: float = 0.5
    pi_max_length: int | None = None
    pi_factor: int = 8
    pi_start_step: int = 0
    """Optimizer steps before this one get no Padding Insertion (a warm-up on plain short contexts)."""

    def bind(self, *, micro_batch: int, grad_accum: int) -> None:
        """The engine's final micro-batch and accumulation (from flags, ``--global-batch-size``
        or the DeepSpeed config), which place every micro-batch in its optimizer step."""
        self.batch_size, self.grad_accum = int(micro_batch), int(grad_accum)

    def pi_target(self, stage_length: int) -> int:
        """The longest Padding Insertion target at a stage of ``stage_length`` tokens."""
        target = self.pi_max_length or self.pi_factor * stage_length
        return int(math.ceil(target / self.block_size) * self.block_size)

    def __call__(self, start: int, dp_rank: int, dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
        m = start
        while True:
            step = m // self.grad_accum
            # The stage holding this step (stages with no steps are skipped); the last runs for ever.
            i = 0
            while i < len(self.stages) - 1 and self.bounds[i + 1] <= step:
                i += 1
            length, rows = self.stages[i]
            first = self.bounds[i] * self.grad_accum
            last = self.bounds[i + 1] * self.grad_accum if i < len(self.stages) - 1 else None
            factory = dataset_batches(rows, lambda r: collate_qa(r, self.pad_token_id), self.batch_size,
                                      self.seed + i, shuffle=True)
            it = factory(m - first, dp_rank, dp_size)
            while last is None or m < last:
                batch = next(it)
                # Seeded by the global micro-batch index, as the engine seeds its generators: a
                # micro-batch gets the same insertion on any split over ranks and accumulation.
                rng = np.random.default_rng([self.seed, m * dp_size + dp_rank])
                pi_now = self.padding_insertion > 0 and m // self.grad_accum >= self.pi_start_step
                if pi_now and rng.random() < self.padding_insertion:
                    batch = apply_padding_insertion(batch, max_length=self.pi_target(length),
                                                    pad_token_id=self.pad_token_id, block_size=self.block_size,
                                                    rng=rng)
                yield batch
                m += 1


def qa_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of the start and end cross-entropies (the model's own QA loss); logs the batch length."""
    out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"], start_positions=batch["start_positions"],
                end_positions=batch["end_positions"], return_dict=True)
    return out.loss, {"seq_len": float(batch["input_ids"].shape[1])}


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def build_qa_model_factory(model_dir: str | None, preset: str | None, tokenizer: Any, random_init: bool = False,
                           global_keys: int | None = None, dropout: float | None = None):
    """``(factory, config)``: a factory building the QA model from ``model_dir`` (pretrained
    weights; a missing QA head is initialised; with ``random_init`` only its architecture, with
    fresh weights) or from a preset (random init). ``global_keys`` sets the config's
    ``bialibi_global_keys`` (no weights depend on it). ``None`` applies the spec's decision "the
    question is global": the block size (the whole of block 0, where the question sits) for a
    model that does not set it (``1``, the default) or a preset, else the model's own value.
    ``dropout`` (``None``: the model's own) sets the hidden and attention dropout."""
    import littlebird_ds  # noqa: F401 - registers the Auto* classes
    from littlebird_ds import LittleBirdConfig, LittleBirdForQuestionAnswering
    from littlebird_ds.train.presets import dropout_overrides

    drop = dropout_overrides(dropout)
    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if model_dir is not None:
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"--model {model_dir} holds no model (no config.json); pass a LittleBird model "
                                    "folder such as a pretrain or distill run's OUT/final")
        config = LittleBirdConfig.from_pretrained(model_dir)
        if config.vocab_size < vocab:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but the model at {model_dir} only {config.vocab_size}; "
                "pass the tokenizer the model was trained with (--tokenizer)"
            )
    else:
        try:
            from littlebird_ds.train.presets import build_config
        except ImportError:  # the presets module is optional; the tiny preset is known here too
            build_config = None
        if build_config is not None:
            config = build_config("littlebird", preset, vocab, pad)
        elif preset in PRESETS:
            config = LittleBirdConfig(vocab_size=vocab, pad_token_id=pad, **PRESETS[preset])
        else:
            raise ValueError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)} or pass --model DIR")
    if global_keys is None and int(config.bialibi_global_keys) == 1:  # the question is global
        global_keys = int(config.block_size)
    if global_keys is not None or drop:  # through the constructor, so the values are validated
        extra = {} if global_keys is None else {"bialibi_global_keys": global_keys}
        config = LittleBirdConfig.from_dict({**config.to_dict(), **extra, **drop})
    if model_dir is not None and not random_init:

        def factory():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "newly initialized qa_outputs" is expected
                return LittleBirdForQuestionAnswering.from_pretrained(model_dir, config=config)

        return factory, config
    return (lambda: LittleBirdForQuestionAnswering(config)), config


# ---------------------------------------------------------------------------------------------
# The command's body
# ---------------------------------------------------------------------------------------------
def _split_paths(text: str | None) -> list[str]:
    return [p for p in (text or "").split(",") if p.strip()]


def finetune_qa(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune a QA model as the module docstring describes; returns ``{"step", "final_dir",
    "eval"}`` (``eval``: the last validation results, as :func:`evaluate_files` returns them
    without predictions, or ``None``). ``args`` are those of ``littlebird-ds finetune-qa``.

    Every input is checked before ``args.out`` is created: raises ``ValueError`` (bad QA data,
    over-long question, bad curriculum or flags) or ``FileNotFoundError`` with nothing written.
    """
    from transformers import AutoTokenizer

    from .engine import Trainer

    if (args.model is None) == (args.preset is None):
        raise ValueError("pass exactly one of --model DIR (pretrained) or --preset NAME (random init)")
    if args.random_init and args.model is None:
        raise ValueError("--random-init takes the architecture of --model DIR; with --preset the weights are random already")
    if args.preset is not None and not args.tokenizer:
        raise ValueError("--preset builds a model from scratch and needs --tokenizer DIR")
    if not 0.0 <= args.padding_insertion <= 1.0:
        raise ValueError(f"--padding-insertion must be a probability in [0, 1], got {args.padding_insertion}")
    pi_start = float(getattr(args, "pi_start_fraction", 0.0))
    if not 0.0 <= pi_start < 1.0:
        raise ValueError(f"--pi-start-fraction must be in [0, 1) (the share of --max-steps before Padding Insertion "
                         f"starts), got {pi_start}")
    for flag, path in [("--train", args.train), *[("--validation", p) for p in _split_paths(args.validation)]]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist; pass a SQuAD-format JSON or JSONL file")
    for flag, path in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path} is not a folder; pass a model folder saved with its tokenizer "
                                    "(e.g. a pretrain run's OUT/final) or a `littlebird-ds train-tokenizer` OUTPUT")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, use_fast=True)
    factory, config = build_qa_model_factory(args.model, args.preset, tokenizer, args.random_init,
                                             getattr(args, "bialibi_global_keys", None), getattr(args, "dropout", None))
    block = int(config.block_size)
    pi = 0.0 if args.no_padding_insertion else float(args.padding_insertion)
    stages_spec = parse_curriculum(args.curriculum, args.max_length)

    # 1. Everything that can fail on the inputs, before OUT exists.
    train_examples = load_qa_examples(args.train)
    if not train_examples:
        raise ValueError(f"--train {args.train} holds no QA examples")
    version_2 = bool(args.version_2 or any(e.get("is_impossible") for e in train_examples))
    stage_rows: dict[int, list[dict[str, Any]]] = {}
    for length, _ in stages_spec:
        if length not in stage_rows:
            stage_rows[length] = train_features(train_examples, tokenizer, max_length=length, stride=args.stride,
                                                block_size=block, truncate_question=args.truncate_question)
    val_paths = _split_paths(args.validation)
    eval_kwargs = dict(language=getattr(args, "language", "en"), max_length=args.eval_max_length, stride=args.stride, version_2=version_2,
                       truncate_question=args.truncate_question, max_examples=args.max_eval_examples)
    for path in val_paths:
        # Validates the file and every question's length, so a bad file fails now, not at the end.
        examples = load_qa_examples(path)
        prepare_features(examples[: args.max_eval_examples] if args.max_eval_examples else examples, tokenizer,
                         max_length=args.eval_max_length, stride=min(args.stride, 64), block_size=block,
                         truncate_question=args.truncate_question)

    micro = args.batch_size or 8
    accum = args.grad_accum or 1
    bounds = stage_boundaries(stages_spec, args.max_steps)
    batches = QABatches(
        stages=[(length, stage_rows[length]) for length, _ in stages_spec], bounds=bounds, batch_size=micro,
        grad_accum=accum, seed=args.seed, pad_token_id=config.pad_token_id, block_size=block,
        padding_insertion=pi, pi_max_length=args.pi_max_length, pi_factor=args.pi_factor,
        pi_start_step=int(round(pi_start * args.max_steps)),
    )
    last_eval: dict[str, Any] = {}

    def eval_fn(model: Any, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        results = evaluate_files(model, tokenizer, val_paths, **eval_kwargs)
        metrics: dict[str, float] = {"exact_match": results["exact_match"], "f1": results["f1"]}
        if len(results["by_length"]) > 1:
            for label, row in results["by_length"].items():
                metrics[f"f1@{label}"] = row["f1"]
                metrics[f"exact_match@{label}"] = row["exact_match"]
        metrics["seconds"] = time.perf_counter() - t0
        last_eval.clear()
        last_eval.update(step=step, **{k: v for k, v in results.items() if k != "files"})
        last_eval["files"] = {p: {"label": f["label"], "metrics": f["metrics"]} for p, f in results["files"].items()}
        return metrics

    trainer = Trainer(args, model_factory=factory, loss_fn=qa_loss, batches=batches,
                      eval_fn=eval_fn if val_paths else None, tokenizer=tokenizer)
    result = trainer.fit()
    if last_eval and trainer.rank == 0:
        write_results(Path(args.out) / "eval_results.json", last_eval)
    return {"step": result.step, "final_dir": result.final_dir, "eval": last_eval or None,
            "stages": [(length, bounds[i], bounds[i + 1]) for i, (length, _) in enumerate(stages_spec)]}


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``finetune-qa`` flags (the engine's shared flags included); returns ``parser``."""
    from .engine import add_training_arguments

    add_training_arguments(parser)
    g = parser.add_argument_group("QA fine-tuning")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="pretrained LittleBird directory (MLM or QA)")
    src.add_argument("--preset", metavar="NAME", help="random init from a preset (tiny); needs --tokenizer")
    g.add_argument("--random-init", action="store_true",
                   help="with --model: its architecture with fresh random weights (the baseline that shows "
                        "what pretraining adds)")
    g.add_argument("--tokenizer", metavar="DIR", help="fast tokenizer directory (default: --model)")
    g.add_argument("--bialibi-global-keys", type=int, default=None, metavar="N",
                   help="put the first N keys (up to the block size: the question in block 0) at BiALiBi's constant "
                        "first-token distance from every query, instead of a bias growing with distance (default: "
                        "the block size, the question is global, unless the model sets a larger value than 1; 1 is "
                        "the paper's exact formula, [CLS] only). Saved in the model's config")
    g.add_argument("--dropout", type=float, default=None, metavar="P",
                   help="hidden and attention dropout while fine-tuning (default: the model's own; saved in its config)")
    g.add_argument("--train", required=True, metavar="FILE", help="SQuAD-format training file (JSON or JSONL)")
    g.add_argument("--validation", metavar="FILE[,FILE...]", default=None,
                   help="validation file(s); several (e.g. one per context length) are scored separately")
    g.add_argument("--max-length", type=int, default=512, help="training window in tokens (default 512)")
    g.add_argument("--stride", type=int, default=128, help="overlap of consecutive windows in tokens (default 128)")
    g.add_argument("--curriculum", default=None, metavar="L:F,...",
                   help="length curriculum, fractions of --max-steps per length, e.g. 128:0.7,256:0.2,512:0.1")
    g.add_argument("--padding-insertion", type=float, default=0.5, metavar="P",
                   help="probability that a batch gets Padding Insertion (default 0.5)")
    g.add_argument("--no-padding-insertion", action="store_true", help="turn Padding Insertion off")
    g.add_argument("--pi-max-length", type=int, default=None, metavar="N",
                   help="longest Padding Insertion target (default: --pi-factor x the current training length)")
    g.add_argument("--pi-factor", type=int, default=8, help="see --pi-max-length (default 8)")
    g.add_argument("--pi-start-fraction", type=float, default=0.0, metavar="F",
                   help="Padding Insertion only after this share of --max-steps (default 0: from the start); a "
                        "distilled student left the QA plateau more slowly with Padding Insertion from step 0")
    g.add_argument("--eval-max-length", type=int, default=DEFAULT_EVAL_MAX_LENGTH,
                   help=f"validation window in tokens (default {DEFAULT_EVAL_MAX_LENGTH}: whole contexts)")
    g.add_argument("--max-eval-examples", type=int, default=None, metavar="N",
                   help="score only N questions of each validation file, spread evenly through it (default all)")
    g.add_argument("--version-2", action="store_true",
                   help="SQuAD v2 (no-answer predictions); on automatically when the training data has them")
    g.add_argument("--truncate-question", action="store_true",
                   help="cut questions longer than block 0 (with a warning) instead of failing")
    g.add_argument("--language", default="en", metavar="CODE",
                   help="language of the answers, for the validation EM/F1: en (default) drops SQuAD's articles "
                        "a/an/the; es, de, vi drop theirs; any other code (e.g. nya) drops none")
    return parser

