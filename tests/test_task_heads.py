"""Sequence classification, token classification and multiple choice heads: losses as BERT's,
padding invariance, Auto classes and save/load, and one Hugging Face Trainer step."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import (
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import littlebird_ds  # noqa: F401 - registers the Auto classes

HEADS = {
    "sequence": AutoModelForSequenceClassification,
    "token": AutoModelForTokenClassification,
    "choice": AutoModelForMultipleChoice,
}


def _batch(B: int = 2, L: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 25:] = 0  # the second row is shorter
    ids[1, 25:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_trains_saves_and_loads_through_its_auto_class(kind, tmp_path):
    torch.manual_seed(0)
    model = HEADS[kind].from_config(tiny_config(num_labels=3))
    assert type(model).__name__ == {"sequence": "LittleBirdForSequenceClassification",
                                    "token": "LittleBirdForTokenClassification",
                                    "choice": "LittleBirdForMultipleChoice"}[kind]
    batch = _batch()
    if kind == "sequence":
        labels = torch.tensor([0, 2])
    elif kind == "token":
        labels = torch.randint(0, 3, (2, 40)).masked_fill(batch["attention_mask"] == 0, -100)
    else:  # two examples, three choices each
        batch = {k: v.unsqueeze(1).expand(-1, 3, -1).clone() for k, v in batch.items()}
        batch["input_ids"][:, 1, 3] = 7  # the choices differ
        batch["input_ids"][:, 2, 5] = 9
        labels = torch.tensor([1, 2])
    out = model(**batch, labels=labels)
    expected = {"sequence": (2, 3), "token": (2, 40, 3), "choice": (2, 3)}[kind]
    assert tuple(out.logits.shape) == expected and torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not [n for n in no_grad if "bialibi" not in n and "packed" not in n], no_grad
    model.eval()
    model.save_pretrained(tmp_path)
    again = HEADS[kind].from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)


def test_sequence_and_token_logits_do_not_depend_on_padding():
    """Row 1 alone (25 tokens) and padded to 40 in a batch give the same [CLS] class logits and
    the same per-token logits on its real tokens."""
    torch.manual_seed(0)
    seq = AutoModelForSequenceClassification.from_config(tiny_config(num_labels=4)).eval()
    tok = AutoModelForTokenClassification.from_config(tiny_config(num_labels=5)).eval()
    batch = _batch()
    alone = {"input_ids": batch["input_ids"][1:, :25], "attention_mask": batch["attention_mask"][1:, :25]}
    with torch.no_grad():
        torch.testing.assert_close(seq(**batch).logits[1:], seq(**alone).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tok(**batch).logits[1:, :25], tok(**alone).logits, atol=1e-5, rtol=1e-5)


def test_multiple_choice_scores_each_choice_as_its_own_sequence():
    torch.manual_seed(0)
    mc = AutoModelForMultipleChoice.from_config(tiny_config()).eval()
    batch = {k: v.unsqueeze(1).expand(-1, 2, -1).clone() for k, v in _batch().items()}
    batch["input_ids"][:, 1, 10] = 11
    with torch.no_grad():
        logits = mc(**batch).logits
        for c in range(2):
            hidden = mc.littlebird(batch["input_ids"][:, c], batch["attention_mask"][:, c]).last_hidden_state
            torch.testing.assert_close(logits[:, c], mc.classifier(mc.pooler(hidden)).squeeze(-1))
    with pytest.raises(ValueError, match=r"\[batch, choices, length\]"):
        mc(input_ids=batch["input_ids"][:, 0])


def test_sequence_problem_types_follow_bert():
    torch.manual_seed(0)
    batch = _batch()
    reg = AutoModelForSequenceClassification.from_config(tiny_config(num_labels=1))
    out = reg(**batch, labels=torch.tensor([0.5, -1.0]))
    assert reg.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0])))
    multi = AutoModelForSequenceClassification.from_config(tiny_config(num_labels=3))
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = multi(**batch, labels=targets)
    assert multi.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))


def test_token_classification_trains_one_step_with_the_hugging_face_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(tiny_config(num_labels=3))
    b = _batch(B=4, L=32)
    labels = torch.randint(0, 3, (4, 32)).masked_fill(b["attention_mask"] == 0, -100)
    data = Dataset.from_dict({"input_ids": b["input_ids"].tolist(), "attention_mask": b["attention_mask"].tolist(),
                              "labels": labels.tolist()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.endswith("classifier.weight"))
