"""Padding Insertion: lengths, order, protected prefix, position mapping, labels, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from littlebird_ds.data.padding_insertion import insert_padding, insert_padding_batch, map_positions

PAD, CLS, SEP = 0, 2, 3


def qa_example(rng: np.random.Generator, q_len: int = 5, c_len: int = 60):
    question = rng.integers(10, 100, size=q_len).tolist()
    context = rng.integers(10, 100, size=c_len).tolist()
    ids = [CLS, *question, SEP, *context, SEP]
    types = [0] * (q_len + 2) + [1] * (c_len + 1)
    return ids, types, q_len + 2  # protected prefix: [CLS] question [SEP]


def runs_of_pads(mask: list[int]) -> int:
    return sum(1 for i, m in enumerate(mask) if m == 0 and (i == 0 or mask[i - 1] == 1))


def test_single_example_contract():
    rng = np.random.default_rng(0)
    lengths, runs = [], []
    for seed in range(300):
        ids, types, prefix = qa_example(rng)
        labels = [t if i % 7 == 0 else -100 for i, t in enumerate(ids)]
        start, end = prefix + 10, prefix + 14
        out = insert_padding(ids, max_length=256, token_type_ids=types, labels=labels,
                             protected_prefix=prefix, generator=seed)
        new, mask, imap = out.input_ids, out.attention_mask, out.index_map
        lengths.append(len(new))
        runs.append(runs_of_pads(mask))
        assert len(ids) <= len(new) <= 256
        assert len(mask) == len(out.token_type_ids) == len(out.labels) == len(new)
        # real tokens kept, in order, exactly where index_map says
        assert [t for t, m in zip(new, mask) if m] == ids
        assert [new[i] for i in imap] == ids and sorted(imap) == imap
        # inserted pads: pad id, no attention, ignored label, the next real token's type
        for pos in range(len(new)):
            if mask[pos] == 0:
                assert new[pos] == PAD and out.labels[pos] == -100
                next_real = next(i for i in imap if i > pos)
                assert out.token_type_ids[pos] == out.token_type_ids[next_real]
        # protected prefix untouched, nothing after the last token
        assert new[:prefix] == ids[:prefix] and imap[:prefix] == list(range(prefix))
        assert new[-1] == SEP and mask[-1] == 1
        # labels aligned, answer positions map to the same tokens
        assert [out.labels[i] for i in imap] == labels
        new_start, new_end = map_positions(start, imap), map_positions(end, imap)
        assert new[new_start] == ids[start] and new[new_end] == ids[end]
    # L' uniform on [real length, max]: both ends reached, mean near the middle
    assert min(lengths) < len(ids) + 20 and max(lengths) > 236
    assert abs(np.mean(lengths) - (len(ids) + 256) / 2) < 12
    assert min(r for r in runs if r) == 1 and max(runs) > 10  # one long run up to many short ones


def test_keep_together_and_probability():
    rng = np.random.default_rng(1)
    ids, types, prefix = qa_example(rng)
    inserted = 0
    for seed in range(200):
        out = insert_padding(ids, max_length=512, protected_prefix=prefix, keep_together=[(20, 30)],
                             probability=0.5, generator=seed)
        assert out.index_map[30] - out.index_map[20] == 10  # answer span not split
        inserted += out.inserted
        if not out.inserted:
            assert out.input_ids == ids and out.attention_mask == [1] * len(ids)
    assert 70 < inserted < 130
    never = insert_padding(ids, max_length=512, probability=0.0, generator=0)
    assert never.input_ids == ids and never.index_map == list(range(len(ids)))


def test_tensors_in_tensors_out_and_trailing_padding_dropped():
    ids = torch.tensor([CLS, 11, 12, 13, SEP, PAD, PAD])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0])
    out = insert_padding(ids, attention_mask=mask, max_length=64, generator=torch.Generator().manual_seed(0))
    assert isinstance(out.input_ids, torch.Tensor) and out.input_ids.dtype == torch.int64
    assert out.input_ids[out.attention_mask.bool()].tolist() == [CLS, 11, 12, 13, SEP]
    assert out.input_ids[0].item() == CLS and out.input_ids[-1].item() == SEP
    assert out.index_map.shape == (5,)
    with pytest.raises(ValueError, match="max_length=3 is shorter than the example's real length 5"):
        insert_padding(ids, attention_mask=mask, max_length=3, generator=0)


def test_map_positions_kinds():
    imap = [0, 3, 4, 9]
    assert map_positions(2, imap) == 4
    assert map_positions([-1, 0, 3, 5], imap) == [-1, 0, 9, 11]  # -1 kept; 5 is past the end: shifted
    t = map_positions(torch.tensor([[1, -100]]), torch.tensor(imap))
    assert t.tolist() == [[3, -100]]


def test_batch_from_span_masking_collator():
    from littlebird_ds.data.span_masking import SpanMaskingCollator

    rng = np.random.default_rng(2)
    vocab = 120
    word_start = np.ones(vocab, dtype=bool)
    special = np.zeros(vocab, dtype=bool)
    special[:5] = True
    examples = [{"input_ids": ex[0], "token_type_ids": ex[1]} for ex in (qa_example(rng, c_len=n) for n in (40, 90, 70))]
    collator = SpanMaskingCollator(word_start=word_start, special=special, mask_token_id=4, generator=0)
    batch = collator(examples)
    batch["start_positions"] = torch.tensor([10, 50, -1])  # -1: no answer
    prefix = torch.tensor([7, 7, 7])
    out = insert_padding_batch(batch, max_length=256, protected_prefix=prefix, pad_to_multiple_of=32, generator=5)
    assert out["input_ids"].shape[1] % 32 == 0 and out["input_ids"].shape[1] <= 256
    assert set(out) == set(batch) | {"index_map"}
    for b in range(3):
        old_ids, new_ids = batch["input_ids"][b], out["input_ids"][b]
        real = int(batch["attention_mask"][b].sum())
        imap = out["index_map"][b][:real]
        assert (out["index_map"][b][real:] == -1).all()
        assert torch.equal(new_ids[imap], old_ids[:real])
        assert torch.equal(new_ids[out["attention_mask"][b].bool()], old_ids[:real])
        assert torch.equal(new_ids[:7], old_ids[:7])
        for key in ("labels", "span_offset"):
            assert torch.equal(out[key][b][imap], batch[key][b][:real])
        masked_new = out["labels"][b] != -100
        assert masked_new.sum() == (batch["labels"][b] != -100).sum()
        # span boundaries point at the same tokens as before
        old_left = batch["span_left"][b][:real][batch["labels"][b][:real] != -100]
        new_left = out["span_left"][b][masked_new]
        assert torch.equal(new_ids[new_left], old_ids[old_left])
        old_right = batch["span_right"][b][:real][batch["labels"][b][:real] != -100]
        assert torch.equal(new_ids[out["span_right"][b][masked_new]], old_ids[old_right])
        assert torch.equal(out["token_type_ids"][b][imap], batch["token_type_ids"][b][:real])
        if batch["start_positions"][b] >= 0:
            assert new_ids[out["start_positions"][b]] == old_ids[batch["start_positions"][b]]
    assert out["start_positions"][2] == -1


def test_batch_unknown_per_token_field_is_named():
    batch = {"input_ids": torch.tensor([[CLS, 5, 6, SEP]]), "special_tokens_mask": torch.tensor([[1, 0, 0, 1]])}
    with pytest.raises(ValueError, match=r"\['special_tokens_mask'\].*fill_values"):
        insert_padding_batch(batch, max_length=16, generator=0)
    out = insert_padding_batch(batch, max_length=16, fill_values={"special_tokens_mask": 1}, generator=0)
    assert (out["special_tokens_mask"][out["input_ids"] == PAD] == 1).all()


def test_shared_cap_halves_the_mean_batch_length_and_still_reaches_max_length():
    # 16 rows of 64 real tokens, max 1024: with independent targets the batch is about as long
    # as the longest of 16 uniform draws (~0.95 of max); with one cap per batch, about half way.
    ids = torch.arange(1, 65).repeat(16, 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lengths = {False: [], True: []}
    for shared in (False, True):
        for seed in range(200):
            out = insert_padding_batch(batch, max_length=1024, pad_to_multiple_of=32, generator=seed, shared_cap=shared)
            assert out["input_ids"].shape[1] <= 1024 and out["input_ids"].shape[1] % 32 == 0
            for b in range(16):  # the real tokens, in order, whatever the cap
                assert torch.equal(out["input_ids"][b][out["attention_mask"][b].bool()], ids[b])
            lengths[shared].append(out["input_ids"].shape[1])
    independent, shared = np.mean(lengths[False]), np.mean(lengths[True])
    assert independent > 0.9 * 1024
    assert 0.4 * 1024 < shared < 0.65 * 1024
    assert max(lengths[True]) > 0.95 * 1024  # long targets still occur


def test_shared_cap_rejects_a_row_longer_than_max_length():
    ids = torch.ones(2, 96, dtype=torch.long)
    with pytest.raises(ValueError, match="longest row"):
        insert_padding_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_length=64,
                             shared_cap=True, generator=0)
