"""Recurring span selection (RSS) as a pretraining objective: the batches, the head, a run.

RSS turns every occurrence but one of a recurring span into one question token (``[MASK]``,
the blank of cloze QA) and trains a span-selection head to point from each question at the
kept occurrence. The data builder itself is tested in ``test_span_masking.py``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import tiny_config
from test_pretrain import TEST_CONFIG

from littlebird_ds.model.modeling import LittleBirdForMaskedLM
from littlebird_ds.data.mlm import make_train_collate
from littlebird_ds.train.pretrain import add_pretrain_arguments, prepare_pretraining, run_pretraining



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``corpus/`` (Numbers and Joshua train, Ruth is held out at validation fraction 0.2),
    ``tok/``, ``model.yaml``, and eight 128-token windows of Numbers, which repeats many phrases."""
    from littlebird_ds.data.corpus import in_validation
    from littlebird_ds.data.corpus import load_corpus
    from littlebird_ds.data.tokenizer import train_tokenizer
    from littlebird_ds.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("rss")
    books = {d.id.rsplit("/", 1)[1]: d.text for d in load_corpus("chichewa-bible")}
    corpus = root / "corpus"
    corpus.mkdir()
    for b in ("04", "06", "08"):
        (corpus / f"book{b}.txt").write_text(books[b], encoding="utf-8")
    assert [in_validation(f"book{b}.txt", 0.2) for b in ("04", "06", "08")] == [False, False, True]
    train_tokenizer(corpus, root / "tok", vocab_size=1000)
    (root / "model.yaml").write_text(TEST_CONFIG)
    tok = load_tokenizer(root / "tok")
    ids = tok(books["04"])["input_ids"]
    windows = [[tok.cls_token_id, *ids[i:i + 126], tok.sep_token_id] for i in range(0, 126 * 8, 126)]
    return root, tok, windows


def _args(argv):
    return add_pretrain_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_questions_point_at_kept_occurrences_that_are_never_masked(setup):
    _, tok, windows = setup
    torch.manual_seed(0)
    batch = make_train_collate(tok, mask_rate=0.15, pad_to_multiple_of=16, rss_max_questions=30)(windows)
    q, s, e = batch["rss_questions"], batch["rss_starts"], batch["rss_ends"]
    valid = q >= 0
    assert valid.sum() >= 8, "Numbers repeats phrases: expected several questions in 8 windows"
    assert q.shape[1] != batch["input_ids"].shape[1]
    for b, slot in valid.nonzero().tolist():
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        assert ids[q[b, slot]] == tok.mask_token_id and labels[q[b, slot]] == -100  # a question, not a masked token
        span = slice(int(s[b, slot]), int(e[b, slot]) + 1)
        assert s[b, slot] <= e[b, slot] and (labels[span] == -100).all()  # the kept occurrence is never masked
        assert (ids[span] != tok.mask_token_id).all()
    assert (s[~valid] == -100).all() and (e[~valid] == -100).all()
    # Every question's target text recurs in the original window (it was cut from there).
    b, slot = valid.nonzero()[0].tolist()
    kept = batch["input_ids"][b, int(s[b, slot]):int(e[b, slot]) + 1].tolist()
    original = windows[b]
    hits = [i for i in range(len(original) - len(kept) + 1) if original[i:i + len(kept)] == kept]
    assert len(hits) >= 2


def test_padding_insertion_moves_questions_and_targets_with_their_tokens(setup):
    _, tok, windows = setup
    torch.manual_seed(1)
    plain = make_train_collate(tok, mask_rate=0.15, pad_to_multiple_of=16, rss_max_questions=30)(windows)
    torch.manual_seed(1)
    padded = make_train_collate(tok, mask_rate=0.15, pad_to_multiple_of=16, rss_max_questions=30,
                                padding_insertion=1.0, pi_max_length=512)(windows)
    assert padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    valid = plain["rss_questions"] >= 0
    assert torch.equal(valid, padded["rss_questions"] >= 0)
    for b, slot in valid.nonzero().tolist():
        for key in ("rss_questions", "rss_starts", "rss_ends"):
            assert plain["input_ids"][b, plain[key][b, slot]] == padded["input_ids"][b, padded[key][b, slot]]
        assert padded["attention_mask"][b, padded["rss_starts"][b, slot]] == 1


def _tiny(rss_head=True):
    torch.manual_seed(0)
    return LittleBirdForMaskedLM(tiny_config(rss_head=rss_head))


def test_span_selection_loss_trains_the_head_and_the_encoder():
    model = _tiny()
    ids = torch.randint(5, 50, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    q = torch.tensor([[3, 10, -1], [5, -1, -1]])
    s = torch.tensor([[20, 30, -100], [7, -100, -100]])
    e = torch.tensor([[21, 33, -100], [9, -100, -100]])
    out = model(input_ids=ids, attention_mask=mask, rss_questions=q, rss_starts=s, rss_ends=e)
    assert out.rss_start_logits.shape == (3, 40) and torch.isfinite(out.rss_loss)
    # The loss is the mean of the start and end cross-entropies over the three questions.
    ref = (torch.nn.functional.cross_entropy(out.rss_start_logits, torch.tensor([20, 30, 7]))
           + torch.nn.functional.cross_entropy(out.rss_end_logits, torch.tensor([21, 33, 9]))) / 2
    assert torch.allclose(out.rss_loss, ref)
    assert (out.rss_start_logits[2, 30:] < -1e30).all()  # row 1's padding is never a target
    out.rss_loss.backward()
    assert model.rss_head.start.weight.grad.abs().sum() > 0
    assert model.littlebird.layers[0].attention.query.weight.grad.abs().sum() > 0
    # A batch without questions gives a zero loss that still reaches the head.
    none = torch.full((2, 1), -1)
    out = model(input_ids=ids, rss_questions=none, rss_starts=none * 100, rss_ends=none * 100)
    assert out.rss_loss.item() == 0.0 and out.rss_loss.requires_grad


def test_span_selection_without_the_head_is_a_clear_error():
    model = _tiny(rss_head=False)
    q = torch.tensor([[1]])
    with pytest.raises(ValueError, match="no span-selection head.*rss_head = True"):
        model(input_ids=torch.randint(5, 50, (1, 16)), rss_questions=q, rss_starts=q, rss_ends=q)


def test_pretraining_with_rss_learns_to_point_and_saves_a_qa_ready_model(setup, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoModelForQuestionAnswering

    import littlebird_ds  # noqa: F401

    root, _, _ = setup
    out = tmp_path / "run"
    args = _args(["--tokenizer", str(root / "tok"), "--corpus", str(root / "corpus"), "--validation-fraction", "0.2",
                  "--model", "littlebird", "--preset", str(root / "model.yaml"), "--max-length", "128",
                  "--rss-weight", "1", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "10",
                  "--max-steps", "60", "--eval-every", "60", "--log-every", "20", "--eval-examples", "64",
                  "--weight-decay", "0.0", "--out", str(out)])
    run_pretraining(args)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_rss_loss" in r]
    assert [r["step"] for r in evals] == [0, 60]
    assert evals[0]["eval_rss_questions"] == evals[1]["eval_rss_questions"] > 10  # a fixed validation set
    train = [r for r in rows if "loss" in r]
    assert {"mlm", "rss", "rss_questions"} <= train[-1].keys()
    first, last, chance = evals[0]["eval_rss_loss"], evals[-1]["eval_rss_loss"], evals[-1]["eval_rss_uniform_loss"]
    # Below chance (pointing uniformly over the window), which needs targets the model can
    # relate to the questions; not yet the matching skill itself, which takes far longer.
    assert last < chance - 0.2 < first, f"validation RSS loss {first:.3f} -> {last:.3f}, chance {chance:.3f}"
    mlm = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert mlm.config.rss_head and mlm.rss_head is not None
    qa = AutoModelForQuestionAnswering.from_pretrained(out / "final")
    assert type(qa).__name__ == "LittleBirdForQuestionAnswering"
    assert torch.equal(qa.littlebird.layers[0].attention.query.weight, mlm.littlebird.layers[0].attention.query.weight)


def test_rss_flag_errors(setup, tmp_path):
    root, _, _ = setup
    base = ["--tokenizer", str(root / "tok"), "--corpus", str(root / "corpus"), "--out", str(tmp_path / "x")]
    with pytest.raises(ValueError, match="--rss-weight needs --model-type littlebird"):
        prepare_pretraining(_args(base + ["--model", "bert", "--preset", "tiny", "--max-length", "64",
                                          "--rss-weight", "1"]))
    with pytest.raises(ValueError, match="--rss-weight -1.0 must be >= 0"):
        prepare_pretraining(_args(base + ["--preset", "tiny", "--rss-weight", "-1"]))
    with pytest.raises(ValueError, match="--rss-max-questions 0 must be >= 1"):
        prepare_pretraining(_args(base + ["--preset", "tiny", "--rss-weight", "1", "--rss-max-questions", "0"]))
    assert not (tmp_path / "x").exists()
