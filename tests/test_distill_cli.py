"""The `distill` command end to end on a tiny teacher, and its bad-input errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

import littlebird_ds  # noqa: F401
from littlebird_ds.data.corpus import load_corpus
from littlebird_ds.data.tokenizer import train_tokenizer

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    corpus = root / "corpus"
    corpus.mkdir()
    for d in load_corpus("chichewa-bible")[56:65]:  # nine short epistles
        (corpus / f"{d.id.replace('/', '_')}.txt").write_text(d.text, encoding="utf-8")
    tok_dir = train_tokenizer(corpus, root / "tok", vocab_size=700)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    other = train_tokenizer(corpus, root / "other-tok", vocab_size=600)
    return root, corpus, other


def _distill(root, corpus, out, *extra):
    cmd = [sys.executable, "-m", "littlebird_ds.cli", "distill", "--teacher", str(root / "teacher"), "--corpus", str(corpus),
           "--max-length", "64", "--block-size", "8", "--pack-size", "4", "--batch-size", "4", "--max-steps", "4",
           "--log-every", "1", "--eval-every", "2", "--eval-examples", "8", "--validation-fraction", "0.3", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def test_distill_command_trains_a_student_with_padding_insertion(setup):
    root, corpus, _ = setup
    out = root / "run"
    res = _distill(root, corpus, out, "--padding-insertion", "1.0", "--pi-max-length", "256")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_cosine" in r]
    assert train and {"kl", "mse", "mlm", "cosine", "tokens_per_s", "lr"} <= set(train[-1])
    assert evals and -1.0 <= evals[-1]["eval_cosine"] <= 1.0
    assert (out / "eval_cosine.png").stat().st_size > 1000  # the curve, as a picture
    student = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert type(student).__name__ == "LittleBirdForMaskedLM"
    assert student.config.block_size == 8 and student.config.hidden_size == 32


def test_teacher_with_another_tokenizer_is_a_clear_error(setup):
    root, corpus, other = setup
    out = root / "bad"
    res = _distill(root, corpus, out, "--tokenizer", str(other))
    assert res.returncode != 0
    assert "tokenizer differs" in res.stderr
    assert not (out / "final").exists()


def test_student_longer_than_teacher_positions_is_a_clear_error(setup):
    root, corpus, _ = setup
    res = _distill(root, corpus, root / "bad2", "--max-length", "512")
    assert res.returncode != 0 and "exceeds the teacher's 128 positions" in res.stderr


def test_mask_rate_zero_with_masked_terms_is_a_clear_error(setup):
    root, corpus, _ = setup
    out = root / "bad3"
    res = _distill(root, corpus, out, "--mask-rate", "0")
    assert res.returncode != 0 and "--kl-weight 0 --mlm-weight 0" in res.stderr
    assert not out.exists()
    res = _distill(root, corpus, out, "--dropout", "1.5")
    assert res.returncode != 0 and "--dropout 1.5 must be in [0, 1)" in res.stderr
    assert not out.exists()
    res = _distill(root, corpus, out, "--layer-map", "1:3")
    assert res.returncode != 0 and "teacher layers 1..2" in res.stderr
    assert not out.exists()


def test_mask_rate_zero_distils_hidden_states_on_clean_text(setup):
    from littlebird_ds.train.distill import make_distill_collate
    from littlebird_ds.data.tokenizer import load_tokenizer

    root, corpus, _ = setup
    tok = load_tokenizer(str(root / "teacher"))
    ids = tok("Ndipo Mulungu anati, Pakhale kuyera; ndipo kunali kuyera.")["input_ids"]
    examples = [{"input_ids": ids}, {"input_ids": ids[:7]}]
    clean = make_distill_collate(tok, mask_rate=0.0, block_size=8, padding_insertion=0.0, pi_max_length=None)(examples)
    assert clean["input_ids"][0, : len(ids)].tolist() == ids  # nothing masked or replaced
    assert clean["input_ids"][1, :7].tolist() == ids[:7] and clean["attention_mask"][1, 7:].sum() == 0
    assert (clean["labels"] == -100).all()
    masked = make_distill_collate(tok, mask_rate=0.5, block_size=8, padding_insertion=0.0, pi_max_length=None)(examples)
    assert (masked["labels"] != -100).any()  # the same collate does mask at a positive rate

    out = root / "clean"
    res = _distill(root, corpus, out, "--mask-rate", "0", "--kl-weight", "0", "--mlm-weight", "0", "--dropout", "0",
                   "--layer-map", "all")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = AutoModelForMaskedLM.from_pretrained(out / "final").config
    assert cfg.hidden_dropout_prob == 0 and cfg.attention_probs_dropout_prob == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train and "mse" in train[-1] and "mlm" not in train[-1] and "kl" not in train[-1]
    assert all(r["loss"] == r["loss"] for r in train)  # finite, no NaN from an empty masked set
