"""QA examples: loading/validation, windowed features with labels, span decoding."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from littlebird_ds.data.qa import (
    best_spans,
    load_qa_examples,
    postprocess_predictions,
    prepare_features,
    to_dataset,
    validate_example,
)
from littlebird_ds.eval.squad_metrics import evaluate_predictions

DATA = os.path.join(os.path.dirname(__file__), "data")

WORDS = (
    "the river lake town mountain capital flows joins named after scotland malawi zambezi "
    "shire mangochi zomba lilongwe blantyre mulanje rises metres until when replaced which "
    "how long high who first climbed it is was of a to in and at out by people market road"
).split()


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny WordPiece BERT-style fast tokenizer trained in memory (no downloads)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400)]
    text += [str(n) for n in range(0, 3100, 7)]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    assert tok.token_to_id("[PAD]") == 0
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def _long_example(qid: str = "long", n_words: int = 400, seed: int = 1) -> dict:
    rng = random.Random(seed)
    words = [rng.choice(WORDS[:20]) for _ in range(n_words)]
    answer = "mulanje rises 3002 metres"
    pos = n_words * 2 // 3
    before = " ".join(words[:pos]) + " "
    context = before + answer + " " + " ".join(words[pos:])
    return {"id": qid, "context": context, "question": "how high is the mountain?",
            "answers": {"text": [answer], "answer_start": [len(before)]}}


def test_load_squad_v2_nested_and_flat_jsonl() -> None:
    nested = load_qa_examples(os.path.join(DATA, "qa_squad_v2_sample.json"))
    assert [e["id"] for e in nested] == ["r1", "r2", "r3", "t1"]
    assert nested[1]["answers"] == {"text": ["the Zambezi", "Zambezi"], "answer_start": [63, 67]}
    assert nested[2]["is_impossible"] and nested[2]["answers"]["text"] == []
    assert nested[3]["title"] == "Towns" and not nested[3]["is_impossible"]
    flat = load_qa_examples(os.path.join(DATA, "qa_flat_sample.jsonl"))
    assert [e["is_impossible"] for e in flat] == [False, False, True]
    ds = to_dataset(flat)
    assert len(ds) == 3 and ds[0]["answers"]["text"] == ["Scotland"]


def test_load_json_list_and_records(tmp_path) -> None:
    records = [json.loads(line) for line in open(os.path.join(DATA, "qa_flat_sample.jsonl"))]
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(records))
    assert load_qa_examples(path) == load_qa_examples(records)
    # SQuAD-style list answers are accepted in flat records too.
    rec = {"id": "x", "context": "ab cd", "question": "q?", "answers": [{"text": "cd", "answer_start": 3}]}
    assert load_qa_examples([rec])[0]["answers"] == {"text": ["cd"], "answer_start": [3]}


def test_files_are_read_by_content_not_extension_and_parquet_through_datasets(tmp_path, monkeypatch) -> None:
    """JSON Lines written by ``datasets``' ``to_json('x.json')`` (the extension says JSON), a
    Parquet file, and SQuAD articles one per line all load as the same examples."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    flat = load_qa_examples(os.path.join(DATA, "qa_flat_sample.jsonl"))
    ds = datasets.Dataset.from_list(flat)
    ds.to_json(tmp_path / "from_datasets.json")  # JSON Lines under a .json name
    ds.to_parquet(tmp_path / "qa.parquet")
    assert load_qa_examples(tmp_path / "from_datasets.json") == flat
    assert load_qa_examples(tmp_path / "qa.parquet") == flat
    assert load_qa_examples(ds) == flat
    squad = json.load(open(os.path.join(DATA, "qa_squad_v2_sample.json")))
    (tmp_path / "articles.jsonl").write_text("\n".join(json.dumps(a) for a in squad["data"]) + "\n")
    assert load_qa_examples(tmp_path / "articles.jsonl") == load_qa_examples(squad)


def test_bad_qa_files_are_errors_that_name_the_file_the_record_and_the_field(tmp_path) -> None:
    def error(content: str | bytes, name: str = "qa.json") -> str:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError) as info:
            load_qa_examples(path)
        assert str(path) in str(info.value)
        return str(info.value)

    assert "is empty" in error("")
    assert "not valid JSON: Expecting value at line 1 column 1" in error("nonsense")
    assert "line 2: not valid JSON" in error('{"id": "a"}\n{"id": \n')
    assert "not UTF-8" in error(b"\xff\xfe{}")
    rec = {"id": "q7", "context": "ab cd", "question": "q?", "answers": [{"text": "cd"}]}
    msg = error(json.dumps([rec]))
    assert "record 0" in msg and "answers[0] lacks 'answer_start'" in msg
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "ab cd", "qas": [
        {"id": "q8", "question": "q?", "answers": [{"text": "cd", "answer_start": "x"}]}]}]}]}
    msg = error(json.dumps(squad))
    assert "data[0].paragraphs[0].qas[0] (id 'q8')" in msg and "'answer_start' must hold integers" in msg
    assert "'answers' has 'text' but no 'answer_start'" in error(json.dumps([dict(rec, answers={"text": ["cd"]})]))
    assert "record 1: expected an object" in error(json.dumps([dict(rec, answers={"text": ["cd"], "answer_start": [3]}), 5]))
    assert "'cd' does not match" in error(json.dumps([dict(rec, answers={"text": ["cd"], "answer_start": [2]})]))
    assert "not a readable Parquet file" in error("not parquet", "bad.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_qa_examples(tmp_path / "missing.json")


def test_validation_errors_name_example_and_fix() -> None:
    good = {"id": "g1", "context": "Zomba was the capital.", "question": "What was Zomba?",
            "answers": {"text": ["the capital"], "answer_start": [10]}}
    validate_example(good)
    bad = dict(good, answers={"text": ["the capital"], "answer_start": [9]})
    with pytest.raises(ValueError, match=r"'g1'.*'the capital'.*found ' the capita'.*should probably be 10"):
        validate_example(bad)
    with pytest.raises(ValueError, match="'g1'.*empty context"):
        validate_example(dict(good, context="  "))
    with pytest.raises(ValueError, match="'g1'.*empty question"):
        validate_example(dict(good, question=""))
    with pytest.raises(ValueError, match="'g1'.*not occur"):
        validate_example(dict(good, answers={"text": ["Lilongwe"], "answer_start": [0]}))
    with pytest.raises(ValueError, match="occurs twice"):
        load_qa_examples([good, good])


def test_features_single_window_layout(tokenizer) -> None:
    examples = load_qa_examples(os.path.join(DATA, "qa_squad_v2_sample.json"))
    feats = prepare_features(examples, tokenizer, max_length=128, stride=16, block_size=32)
    assert feats["example_id"] == ["r1", "r2", "r3", "t1"]  # short contexts: one window each
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for i, ex in enumerate(examples):
        ids, types = feats["input_ids"][i], feats["token_type_ids"][i]
        q_len = ids.index(sep) - 1
        assert ids[0] == cls and ids[-1] == sep and q_len + 2 <= 32  # question inside block 0
        assert types == [0] * (q_len + 2) + [1] * (len(ids) - q_len - 2)
        offsets = feats["offset_mapping"][i]
        assert all(o is None for o in offsets[: q_len + 2]) and offsets[-1] is None
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        if ex["is_impossible"]:
            assert (s, e) == (0, 0)
        else:
            text = ex["context"][offsets[s][0] : offsets[e][1]]
            assert text.lower() == ex["answers"]["text"][0].lower()


def test_features_windows_with_stride(tokenizer) -> None:
    ex = _long_example()
    feats = prepare_features([ex], tokenizer, max_length=64, stride=16, block_size=16)
    n = len(feats["input_ids"])
    assert n > 3 and all(len(ids) <= 64 for ids in feats["input_ids"])
    answered = 0
    for i in range(n):
        offsets = feats["offset_mapping"][i]
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        ctx = [o for o in offsets if o is not None]
        inside = ctx[0][0] <= ex["answers"]["answer_start"][0] and ctx[-1][1] >= (
            ex["answers"]["answer_start"][0] + len(ex["answers"]["text"][0]))
        if inside:
            answered += 1
            assert ex["context"][offsets[s][0] : offsets[e][1]] == ex["answers"]["text"][0]
        else:
            assert (s, e) == (0, 0)
        if i + 1 < n:  # consecutive windows overlap by exactly `stride` context tokens
            nxt = [o for o in feats["offset_mapping"][i + 1] if o is not None]
            assert ctx[-16:] == nxt[:16]
    assert answered >= 1


def test_question_budget_is_block_zero(tokenizer) -> None:
    ex = _long_example()
    long_q = dict(ex, question=" ".join(["which river flows out of the lake"] * 6) + "?")
    with pytest.raises(ValueError, match=r"'long'.*at most 14 fit in LittleBird's global block 0"):
        prepare_features([long_q], tokenizer, max_length=64, stride=8, block_size=16)
    with pytest.warns(UserWarning, match="truncated"):
        feats = prepare_features([long_q], tokenizer, max_length=64, stride=8, block_size=16,
                                 truncate_question=True)
    for ids in feats["input_ids"]:
        assert ids.index(tokenizer.sep_token_id) + 1 <= 16
    with pytest.raises(ValueError, match="raise max_length or lower stride"):
        prepare_features([ex], tokenizer, max_length=40, stride=30, block_size=16)


def _oracle_logits(feats, length_pad: int = 5):
    """Logits that put all mass on the labelled span (padded past the feature length)."""
    starts, ends = [], []
    for ids, s, e in zip(feats["input_ids"], feats["start_positions"], feats["end_positions"]):
        st = np.zeros(len(ids) + length_pad)
        en = np.zeros(len(ids) + length_pad)
        st[s] += 10.0
        en[e] += 10.0
        starts.append(st)
        ends.append(en)
    return starts, ends


def test_postprocess_recovers_gold_over_windows(tokenizer) -> None:
    examples = load_qa_examples(os.path.join(DATA, "qa_squad_v2_sample.json")) + load_qa_examples(
        [_long_example()])
    feats = prepare_features(examples, tokenizer, max_length=64, stride=16, block_size=32)
    starts, ends = _oracle_logits(feats)
    preds = postprocess_predictions(examples, feats, starts, ends, version_2=True)
    for ex in examples:
        p = preds[ex["id"]]
        if ex["is_impossible"]:
            assert p["text"] == "" and p["start"] is None
        else:
            assert p["text"] == ex["answers"]["text"][0]
            assert ex["context"][p["start"] : p["end"]] == p["text"]
    scores = evaluate_predictions(examples, preds)
    assert scores["exact_match"] == 100.0 and scores["NoAns"]["total"] == 1
    # Without v2 an answer is always given, from context tokens only.
    preds_v1 = postprocess_predictions(examples, feats, starts, ends, version_2=False)
    assert preds_v1["r3"]["text"] != "" and preds_v1["r3"]["text"] in examples[2]["context"]


def test_postprocess_threshold_and_question_tokens_excluded(tokenizer) -> None:
    ex = load_qa_examples(os.path.join(DATA, "qa_squad_v2_sample.json"))[0]
    feats = prepare_features([ex], tokenizer, max_length=128, stride=16, block_size=32)
    s, e = feats["start_positions"][0], feats["end_positions"][0]
    n = len(feats["input_ids"][0])
    start = np.zeros(n)
    end = np.zeros(n)
    start[1:5] = 100.0  # question tokens score highest but are never part of an answer
    end[1:5] = 100.0
    start[s], end[e] = 3.0, 3.0
    start[0], end[0] = 4.0, 4.0  # null 8 vs span 6
    p = postprocess_predictions([ex], feats, [start], [end], version_2=True)["r1"]
    assert p["text"] == "" and p["null_score"] == 8.0
    p = postprocess_predictions([ex], feats, [start], [end], version_2=True,
                                null_score_diff_threshold=2.5)["r1"]
    assert p["text"] == "Lake Malawi" and p["score"] == 6.0
    assert all(c["start"] is not None for c in p["n_best"])
    # torch tensors are accepted as logits.
    import torch

    p = postprocess_predictions([ex], feats, [torch.tensor(start)], [torch.tensor(end)])["r1"]
    assert p["text"] == "Lake Malawi"


def test_best_spans_is_exact_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(3, 40))
        start, end = rng.normal(size=n), rng.normal(size=n)
        mask = rng.random(n) < 0.7
        max_len = int(rng.integers(1, 8))
        brute = sorted(
            ((i, j, start[i] + end[j]) for i in range(n) for j in range(i, min(n, i + max_len))
             if mask[i] and mask[j]),
            key=lambda t: -t[2],
        )[:5]
        got = best_spans(start, end, mask, n_best=5, max_answer_tokens=max_len)
        assert [round(t[2], 9) for t in got] == [round(t[2], 9) for t in brute]
        assert all(mask[i] and mask[j] and i <= j < i + max_len for i, j, _ in got)


def test_features_via_dataset_map(tokenizer, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    examples = load_qa_examples(os.path.join(DATA, "qa_flat_sample.jsonl"))
    ds = to_dataset(examples)
    feats = ds.map(
        lambda batch: prepare_features(batch, tokenizer, max_length=64, stride=8, block_size=32),
        batched=True, remove_columns=ds.column_names,
    )
    direct = prepare_features(examples, tokenizer, max_length=64, stride=8, block_size=32)
    assert feats["input_ids"] == direct["input_ids"]
    assert feats["start_positions"] == direct["start_positions"]
    starts, ends = _oracle_logits(direct)
    preds = postprocess_predictions(examples, feats, starts, ends, version_2=True)
    assert [preds[e["id"]]["text"] for e in examples] == ["Scotland", "3002 metres", ""]
