"""The encoder heads of a BERT-style model beyond MLM and QA: sequence classification, token
classification (NER, POS: usually the first tasks in a new language) and multiple choice.

They follow transformers' BERT heads (``BertForSequenceClassification`` and friends): the same
arguments (``labels``, ``num_labels``, ``problem_type``, ``classifier_dropout``), losses and
outputs, so ``Trainer``, the ``text-classification`` and ``token-classification`` pipelines and
task scripts written for BERT take them unchanged. The sequence-level heads read ``[CLS]``
(position 0, in block 0, which every token attends to) through BERT's pooler (dense + tanh).
LittleBird has no position embeddings, so the heads read inputs of any length.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import MultipleChoiceModelOutput, SequenceClassifierOutput, TokenClassifierOutput

from ..config import LittleBirdConfig
from .modeling import LittleBirdModel, LittleBirdPreTrainedModel, _return_dict


def _classifier_dropout(config: LittleBirdConfig) -> nn.Dropout:
    p = getattr(config, "classifier_dropout", None)
    return nn.Dropout(config.hidden_dropout_prob if p is None else p)


class _Pooler(nn.Module):
    """BERT's pooler: ``tanh(W h_[CLS] + b)``."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, d]
        return torch.tanh(self.dense(hidden[:, 0]))


def _sequence_loss(config: LittleBirdConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BERT's rule: regression for one label, single-label CE for integer labels, multi-label BCE
    otherwise (``config.problem_type`` set on first use, as transformers does)."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float()) \
            if config.num_labels == 1 else nn.functional.mse_loss(logits.float(), labels.float())
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, config.num_labels).float(), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())


class LittleBirdForSequenceClassification(LittleBirdPreTrainedModel):
    """Document classification or regression from the pooled ``[CLS]`` state."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.littlebird = LittleBirdModel(config)
        self.pooler = _Pooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        out = self.littlebird(input_ids, attention_mask, token_type_ids, inputs_embeds,
                              output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(self.pooler(out.last_hidden_state)))
        loss = None if labels is None else _sequence_loss(self.config, logits, labels)
        res = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return res if _return_dict(self.config, return_dict) else res.to_tuple()


class LittleBirdForTokenClassification(LittleBirdPreTrainedModel):
    """A label per token (NER, POS). Labels of -100 (padding, sub-word continuations) are ignored."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.littlebird = LittleBirdModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        out = self.littlebird(input_ids, attention_mask, token_type_ids, inputs_embeds,
                              output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(out.last_hidden_state))  # [B, L, num_labels]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1),
                                               ignore_index=-100)
        res = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return res if _return_dict(self.config, return_dict) else res.to_tuple()


class LittleBirdForMultipleChoice(LittleBirdPreTrainedModel):
    """Inputs ``[B, C, L]`` (C choices, each ``[CLS] context [SEP] choice [SEP]``); a score per
    choice from its pooled ``[CLS]``; ``labels`` ``[B]`` is the index of the right choice."""

    def __init__(self, config: LittleBirdConfig):
        super().__init__(config)
        self.littlebird = LittleBirdModel(config)
        self.pooler = _Pooler(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None or ref.dim() != (3 if input_ids is not None else 4):
            raise ValueError("LittleBirdForMultipleChoice takes inputs of shape [batch, choices, length] "
                             "(inputs_embeds: [batch, choices, length, hidden])")
        B, C = ref.shape[:2]

        def flat(t):
            return None if t is None else t.reshape(B * C, *t.shape[2:])

        out = self.littlebird(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(inputs_embeds),
                              output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(self.pooler(out.last_hidden_state))).view(B, C)
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels.view(-1))
        res = MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return res if _return_dict(self.config, return_dict) else res.to_tuple()
