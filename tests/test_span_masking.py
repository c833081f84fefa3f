"""SpanBERT span masking statistics, boundary info, reproducibility; RSS examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from littlebird_ds.data.span_masking import (
    SpanMaskingCollator,
    build_rss_example,
    sample_masked_spans,
    span_length_distribution,
)

PAD, UNK, CLS, SEP, MASK, QUESTION = range(6)
VOCAB = 1000
N_START = 500  # ids 6..505 start a word, 506..999 continue one


def tables() -> tuple[np.ndarray, np.ndarray]:
    word_start = np.zeros(VOCAB, dtype=bool)
    word_start[6 : 6 + N_START] = True
    special = np.zeros(VOCAB, dtype=bool)
    special[:6] = True
    return word_start, special


def random_document(rng: np.random.Generator, n_words: int, max_pieces: int = 3) -> list[int]:
    # Each word: one start piece followed by 0..max_pieces-1 continuation pieces.
    n_pieces = rng.integers(1, max_pieces + 1, size=n_words)
    is_start = np.zeros(n_pieces.sum(), dtype=bool)
    is_start[np.cumsum(n_pieces) - n_pieces] = True
    pieces = np.where(is_start, rng.integers(6, 6 + N_START, size=len(is_start)),
                      rng.integers(6 + N_START, VOCAB, size=len(is_start)))
    return [CLS, *pieces.tolist(), SEP]


def masked_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, masked in enumerate(list(labels != -100) + [False]):
        if masked and start is None:
            start = i
        elif not masked and start is not None:
            runs.append((start, i))
            start = None
    return runs


def exact_mean_span_words(p: float = 0.2, max_words: int = 10) -> float:
    # Truncated geometric: sum_k k p q^(k-1) / sum_k p q^(k-1), k = 1..10, computed by hand.
    q = 1 - p
    num = sum(k * p * q ** (k - 1) for k in range(1, max_words + 1))
    den = sum(p * q ** (k - 1) for k in range(1, max_words + 1))
    return num / den


@pytest.fixture(scope="module")
def big_batch():
    rng = np.random.default_rng(0)
    # 1.5 pieces per word: ~240k tokens, ~6300 spans; 80/10/10 within 2 points is > 3.5 sigma.
    docs = [random_document(rng, 2000, max_pieces=2) for _ in range(80)]
    word_start, special = tables()
    collator = SpanMaskingCollator(word_start=word_start, special=special, mask_token_id=MASK, generator=1)
    batch = {k: v.numpy() for k, v in collator(docs).items()}
    return docs, batch


def test_distribution_mean_is_spanbert_value():
    probs = span_length_distribution(0.2, 10)
    assert probs.sum() == pytest.approx(1.0)
    mean = float((np.arange(1, 11) * probs).sum())
    assert mean == pytest.approx(exact_mean_span_words(), abs=1e-12)
    assert mean == pytest.approx(3.79, abs=0.01)  # SpanBERT reports 3.8


def test_masking_rate_is_15_percent(big_batch):
    docs, batch = big_batch
    word_start, special = tables()
    rates = []
    for b, doc in enumerate(docs):
        n_real = sum(not special[t] for t in doc)
        rates.append((batch["labels"][b] != -100).sum() / n_real)
    assert abs(np.mean(rates) - 0.15) < 0.01
    assert max(abs(r - 0.15) for r in rates) < 0.01


def test_mean_span_length_matches_truncated_geometric(big_batch):
    docs, batch = big_batch
    word_start, _ = tables()
    lengths = []
    for b, doc in enumerate(docs):
        ids = np.array(doc)
        for start, end in masked_runs(batch["labels"][b][: len(doc)]):
            lengths.append(int(word_start[ids[start:end]].sum()))  # words in the span
    assert len(lengths) > 5000
    # Spans never touch, so every masked run is one span. Only the last span of each
    # example is cut by the budget (1 of ~80), which lowers the mean by about 1%.
    assert np.mean(lengths) == pytest.approx(exact_mean_span_words(), rel=0.03)
    assert max(lengths) <= 10


def test_sampled_span_lengths_follow_the_law():
    rng = np.random.default_rng(3)
    words = [(i, i + 1) for i in range(20000)]
    spans = sample_masked_spans(words, 3000, rng, span_length_distribution())
    sampled = np.array([length for _, _, length in spans])
    counts = np.bincount(sampled, minlength=11)[1:] / len(sampled)
    assert np.abs(counts - span_length_distribution()).max() < 0.03
    placed = [end - first for first, end, _ in spans[:-1]]
    assert placed == list(sampled[:-1])  # every span but the budget-cut last one placed whole


def test_80_10_10_per_span(big_batch):
    docs, batch = big_batch
    kinds = {"mask": 0, "random": 0, "same": 0}
    for b, doc in enumerate(docs):
        original = np.array(doc)
        for start, end in masked_runs(batch["labels"][b][: len(doc)]):
            got = batch["input_ids"][b][start:end]
            assert (batch["labels"][b][start:end] == original[start:end]).all()
            if (got == MASK).all():
                kinds["mask"] += 1
            elif (got == original[start:end]).all():
                kinds["same"] += 1
            else:
                kinds["random"] += 1
                assert not np.isin(got, np.arange(6)).any()  # random ids are never special
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.02
    assert abs(kinds["random"] / total - 0.1) < 0.02
    assert abs(kinds["same"] / total - 0.1) < 0.02


def test_whole_words_and_specials_never_split_or_masked(big_batch):
    docs, batch = big_batch
    word_start, special = tables()
    for b, doc in enumerate(docs):
        ids = np.array(doc)
        labels = batch["labels"][b]
        assert (labels[special[np.pad(ids, (0, len(labels) - len(ids)))]] == -100).all()
        for start, end in masked_runs(labels[: len(doc)]):
            assert word_start[ids[start]]
            assert end == len(ids) or word_start[ids[end]] or special[ids[end]]


def test_specials_and_kept_tokens_inside_text_are_never_masked():
    # Question tokens between words (as recurring span selection leaves them) and positions
    # marked keep_unmasked stay as they are, even at a mask rate whose spans cover them.
    rng = np.random.default_rng(3)
    word_start, special = tables()
    docs, keeps = [], []
    for _ in range(20):
        doc = random_document(rng, 60)
        for at in (10, 30, 50):
            doc[at] = QUESTION
        keep = np.zeros(len(doc), dtype=bool)
        keep[20:24] = True
        docs.append({"input_ids": doc, "keep_unmasked": keep})
        keeps.append(keep)
    collator = SpanMaskingCollator(word_start=word_start, special=special, mask_token_id=MASK, mask_rate=0.6,
                                   generator=0)
    batch = collator(docs)
    for b, ex in enumerate(docs):
        ids, labels = np.array(ex["input_ids"]), batch["labels"][b].numpy()
        fixed = special[ids] | keeps[b]
        assert (labels[: len(ids)][fixed] == -100).all()
        assert (batch["input_ids"][b].numpy()[: len(ids)][fixed] == ids[fixed]).all()
        assert (labels != -100).sum() > 0.4 * (~fixed).sum()  # still masks heavily around them


def test_span_boundary_info(big_batch):
    docs, batch = big_batch
    for b, doc in enumerate(docs[:5]):
        labels = batch["labels"][b]
        unmasked = labels == -100
        for key in ("span_left", "span_right", "span_offset"):
            assert (batch[key][b][unmasked] == -1).all()
        for start, end in masked_runs(labels[: len(doc)]):
            assert (batch["span_left"][b][start:end] == start - 1).all()
            assert (batch["span_right"][b][start:end] == end).all()
            assert batch["span_offset"][b][start:end].tolist() == list(range(end - start))
            assert labels[start - 1] == -100 and labels[end] == -100  # boundaries are visible


def test_reproducible_and_seed_dependent():
    rng = np.random.default_rng(5)
    docs = [random_document(rng, 300) for _ in range(4)]
    word_start, special = tables()

    def run(generator):
        c = SpanMaskingCollator(word_start=word_start, special=special, mask_token_id=MASK, generator=generator)
        return c(docs)

    a, b = run(torch.Generator().manual_seed(7)), run(torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(run(11).values(), run(11).values()))
    assert not torch.equal(a["labels"], run(torch.Generator().manual_seed(8))["labels"])


def test_encodings_padding_and_token_types():
    word_start, special = tables()
    c = SpanMaskingCollator(word_start=word_start, special=special, mask_token_id=MASK, generator=0,
                            pad_to_multiple_of=16)
    first = {"input_ids": torch.tensor([CLS, 10, 600, 11, SEP, 12, 13, SEP]),
             "token_type_ids": [0, 0, 0, 0, 0, 1, 1, 1]}
    second = [CLS, 20, 21, SEP]
    out = c([first, second])
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "labels", "span_left", "span_right",
                        "span_offset"}
    assert all(v.shape == (2, 16) and v.dtype == torch.int64 for v in out.values())
    assert out["attention_mask"][0].tolist() == [1] * 8 + [0] * 8
    assert out["token_type_ids"][0, :8].tolist() == [0] * 5 + [1] * 3
    assert (out["input_ids"][1, 4:] == PAD).all() and (out["labels"][:, 8:] == -100).all()
    assert ((out["labels"] != -100).sum(1) >= 1).all()  # a short example still masks one word


def test_from_hf_tokenizer_masks_whole_words(tmp_path):
    from transformers import AutoTokenizer

    from littlebird_ds.data.corpus import load_chichewa_bible
    from littlebird_ds.data.tokenizer import train_tokenizer

    text = load_chichewa_bible()[0].text[:40000]
    tok = AutoTokenizer.from_pretrained(str(train_tokenizer([text], tmp_path, vocab_size=600)))
    c = SpanMaskingCollator.from_tokenizer(tok, generator=0)
    enc = [tok(line) for line in text.splitlines()[:8]]
    out = c(enc)
    pieces = [tok.convert_ids_to_tokens(e["input_ids"]) for e in enc]
    for b, row in enumerate(pieces):
        labels = out["labels"][b].numpy()
        for start, end in masked_runs(labels[: len(row)]):
            assert row[start].startswith("▁")
            assert end == len(row) or row[end].startswith("▁") or row[end] in tok.all_special_tokens


def test_wordpiece_tokenizer_masks_15_percent_in_whole_words():
    """A BERT-style WordPiece vocabulary marks continuations ("##"), not word starts: the
    collator must still mask ~15% of a window in whole words, not the whole window."""
    from transformers import AutoTokenizer

    from littlebird_ds.train.distill import resolve_teacher_path

    tok = AutoTokenizer.from_pretrained(resolve_teacher_path("minilm"))
    c = SpanMaskingCollator.from_tokenizer(tok, generator=0)
    text = ("The unbelievably rainy afternoon kept everyone indoors, reorganising bookshelves and "
            "rediscovering forgotten correspondence from distant relatives. ") * 20
    enc = [tok(text, truncation=True, max_length=256) for _ in range(16)]
    out = c(enc)
    n_real = out["attention_mask"].sum().item() - 2 * 16  # all but [CLS] and [SEP]
    rate = (out["labels"] != -100).sum().item() / n_real
    assert 0.13 <= rate <= 0.17, rate
    for b in range(16):
        row = tok.convert_ids_to_tokens(enc[b]["input_ids"])
        for start, end in masked_runs(out["labels"][b].numpy()[: len(row)]):
            assert not row[start].startswith("##")
            assert end == len(row) or not row[end].startswith("##")


def test_vocabulary_without_word_markers_is_a_clear_error():
    from littlebird_ds.data.span_masking import word_start_table

    assert word_start_table(["[PAD]", "▁a", "b"]).tolist() == [False, True, False]
    assert word_start_table(["[PAD]", "Ġa", "b"]).tolist() == [False, True, False]
    assert word_start_table(["[PAD]", "a", "##b"]).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="word starts"):
        word_start_table(["a", "b", "c"])


# ----------------------------------------------------------------------------- RSS


def test_rss_known_spans():
    word_start, special = tables()
    a, b = [10, 600, 11, 12], [20, 21]  # 3-word and 2-word phrases
    ids = [CLS, *a, 30, *b, 31, *a, 32, 33, *a, 34, *b, SEP]
    ex = build_rss_example(ids, question_token_id=QUESTION, word_start=word_start, special=special, generator=0)
    assert sorted(len(s) for s in ex.spans) == [2, 4, 4]  # two questions for a, one for b
    assert ex.input_ids.count(QUESTION) == 3
    for q, s, e, span in zip(ex.question_positions, ex.answer_starts, ex.answer_ends, ex.spans):
        assert ex.input_ids[q] == QUESTION
        assert tuple(ex.input_ids[s : e + 1]) == span
    assert len(set(zip(ex.answer_starts, ex.answer_ends))) == 2  # one kept occurrence per phrase


def test_rss_reconstructs_document_and_respects_specials():
    word_start, special = tables()
    rng = np.random.default_rng(0)
    for seed in range(20):
        # a small vocabulary makes many recurring spans, some across a [SEP]
        ids = [CLS] + [int(x) for x in rng.integers(6, 12, size=200)] + [SEP] + [int(x) for x in rng.integers(6, 12, size=50)] + [SEP]
        ex = build_rss_example(ids, question_token_id=QUESTION, word_start=word_start, special=special,
                               generator=seed, max_groups=10)
        assert 0 < len(set(ex.spans)) <= 10
        rebuilt = []
        questions = dict(zip(ex.question_positions, ex.spans))
        for pos, tok in enumerate(ex.input_ids):
            rebuilt.extend(questions[pos] if pos in questions else [tok])
        assert rebuilt == ids
        for s, e, span in zip(ex.answer_starts, ex.answer_ends, ex.spans):
            assert tuple(ex.input_ids[s : e + 1]) == span
            assert 2 <= len(span) <= 10 and SEP not in span and QUESTION not in span


def test_rss_without_repeats_is_unchanged():
    word_start, special = tables()
    ids = [CLS, *range(6, 40), SEP]
    ex = build_rss_example(ids, question_token_id=QUESTION, word_start=word_start, special=special, generator=0)
    assert ex.input_ids == ids and ex.question_positions == []
