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
   intermediate layers), plus the student's own span-masking loss, each weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LittleBirdConfig
from ..model import LittleBirdForMaskedLM


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
            s_logp = F.log_softmax(student_out.logits[masked].float() / T, dim=-1)
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
                mse = mse + F.mse_loss(sh, th)
            terms["mse"] = mse / len(pairs)
            total = total + self.mse_weight * terms["mse"]
        return total, {k: float(v.detach()) for k, v in terms.items()}


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine similarity of final hidden states over real positions."""
    return float(F.cosine_similarity(student_hidden[real].float(), teacher_hidden[real].float(), dim=-1).mean())
