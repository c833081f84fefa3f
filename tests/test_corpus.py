"""Corpus loading (txt dir, jsonl, saved dataset, chichewa-bible), errors and the split."""

from __future__ import annotations

import json

import pytest

from littlebird_ds.data.corpus import (
    Document,
    in_validation,
    iter_corpus,
    iter_split,
    load_chichewa_bible,
    load_corpus,
    split_corpus,
)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_txt_directory_one_document_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("\ufeffanother document", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    docs = load_corpus(tmp_path)
    assert [d.id for d in docs] == ["a.txt", "sub/b.txt"]
    assert docs[0].text == "first line\nsecond line\n"  # boundaries and newlines kept
    assert docs[1].text == "another document"  # BOM dropped
    assert [d.id for d in load_corpus(tmp_path / "a.txt")] == ["a.txt"]


def test_jsonl_file_and_directory(tmp_path):
    rows = [{"body": "doc one", "key": "x1"}, {"body": "doc two\nwith two lines", "key": "x2"}]
    (tmp_path / "part1.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "part2.jsonl").write_text(json.dumps({"body": "third", "key": "x3"}) + "\n", encoding="utf-8")
    docs = load_corpus(tmp_path / "part1.jsonl", text_field="body", id_field="key")
    assert [(d.id, d.text) for d in docs] == [("x1", "doc one"), ("x2", "doc two\nwith two lines")]
    assert docs[0].meta == {"key": "x1"}
    docs = load_corpus(tmp_path, text_field="body")
    assert [d.id for d in docs] == ["part1.jsonl#0", "part1.jsonl#1", "part2.jsonl#0"]


def test_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"], "id": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    docs = load_corpus(tmp_path / "ds", id_field="id")
    assert [(d.id, d.text) for d in docs] == [("a", "alpha beta"), ("b", "gamma")]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["x y"]})}).save_to_disk(str(tmp_path / "dd"))
    assert load_corpus(tmp_path / "dd", text_field="content")[0].text == "x y"
    with pytest.raises(ValueError, match="no split 'validation'.*'train'"):
        load_corpus(tmp_path / "dd", text_field="content", split="validation")


def test_chichewa_bible_books_and_offsets():
    docs = load_chichewa_bible()
    assert len(docs) == 66
    assert len({d.id for d in docs}) == 66
    genesis = docs[0]
    assert genesis.meta["book"] == "Genesis" and genesis.meta["book_index"] == 1
    assert len(genesis.meta["chapter_offsets"]) == 50
    start, end = genesis.meta["verse_offsets"][0][0]
    assert genesis.text[start:end] == "Pachiyambi Mulungu adalenga kumwamba ndi dziko lapansi."
    total_verses = 0
    for doc in docs:
        chapters = doc.meta["chapter_offsets"]
        # chapters tile the text, separated by exactly one newline
        assert chapters[0][0] == 0 and chapters[-1][1] == len(doc.text)
        for (_, end_prev), (start_next, _) in zip(chapters, chapters[1:]):
            assert doc.text[end_prev:start_next] == "\n"
        for (c_start, c_end), verses in zip(chapters, doc.meta["verse_offsets"]):
            assert "\n" not in doc.text[c_start:c_end]
            assert verses[0][0] == c_start and verses[-1][1] == c_end
            total_verses += len(verses)
    assert total_verses == 31104  # as documented for the package (DATA.md)
    assert [d.id for d in load_corpus("chichewa-bible")] == [d.id for d in docs]


def test_empty_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="empty: the directory holds no .txt or .jsonl"):
        load_corpus(tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty: every document in it is empty"):
        load_corpus(tmp_path)


def test_not_utf8_names_file_and_line(tmp_path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8: byte 0xe9 on line 3.*Re-encode"):
        load_corpus(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff byte"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl is not valid UTF-8: byte 0xff on line 2"):
        load_corpus(bad)


def test_missing_text_field_names_existing_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "x", "title": "y"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no text field 'text'; its fields are \['body', 'title'\].*text_field="):
        load_corpus(path)


def test_unknown_builtin_name():
    with pytest.raises(ValueError, match=r"unknown corpus 'chichewa-bibel'.*Built-in names: chichewa-bible"):
        load_corpus("chichewa-bibel")


def test_streaming_is_lazy(tmp_path):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\xff")
    stream = iter_corpus(tmp_path)
    assert next(stream).id == "a.txt"  # the bad file is only read when reached
    with pytest.raises(ValueError, match="b.txt is not valid UTF-8"):
        next(stream)


def test_split_is_deterministic_disjoint_and_near_fraction():
    docs = [Document(id=f"doc-{i}", text="t") for i in range(4000)]
    train, validation = split_corpus(docs, validation_fraction=0.1, seed=3)
    assert {d.id for d in train}.isdisjoint(d.id for d in validation)
    assert len(train) + len(validation) == 4000
    assert abs(len(validation) / 4000 - 0.1) < 0.02
    # same answer in another order, and while streaming
    again = split_corpus(list(reversed(docs)), validation_fraction=0.1, seed=3)[1]
    assert {d.id for d in again} == {d.id for d in validation}
    assert [d.id for d in iter_split(docs, "validation", 0.1, seed=3)] == [d.id for d in validation]
    # another seed gives another split
    assert {d.id for d in split_corpus(docs, 0.1, seed=4)[1]} != {d.id for d in validation}
    assert not in_validation("x", 0.0) and in_validation("x", 1.0)


def test_split_rejects_an_empty_side():
    docs = [Document(id="only-a", text="t"), Document(id="only-b", text="t")]
    with pytest.raises(ValueError, match="split empty"):
        for seed in range(50):  # with two documents some seed puts both on one side
            split_corpus(docs, validation_fraction=0.5, seed=seed)


def test_duplicate_ids_rejected(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="two documents with id '1'"):
        load_corpus(path, id_field="id")
