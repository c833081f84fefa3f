"""SentencePiece training and its Hugging Face fast twin: same ids in many scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from littlebird_ds.data.corpus import load_chichewa_bible
from littlebird_ds.data.tokenizer import (
    SPECIAL_TOKENS,
    auto_character_coverage,
    iter_sentences,
    load_recipe,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = json.loads((Path(__file__).parent / "data" / "udhr_samples.json").read_text(encoding="utf-8"))


def _training_texts() -> list[str]:
    # UDHR samples in 12 scripts plus ~60 KB of Chichewa Bible: trains in well under a second.
    return [s["text"] for s in SAMPLES.values()] + [load_chichewa_bible()[0].text[:60000]]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def trained(request, tmp_path_factory):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = train_tokenizer(
        _training_texts(), tmp_path_factory.mktemp(request.param), vocab_size=1000,
        model_type=request.param, character_coverage=0.98,  # rare characters go to byte fallback
    )
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    return out, sp, AutoTokenizer.from_pretrained(str(out))


def test_fixture_covers_the_required_scripts():
    scripts = {s["script"] for s in SAMPLES.values()}
    assert {"Latin", "Cyrillic", "Arabic", "Devanagari", "Hangul", "Ethiopic"} <= scripts
    assert all(len(s["text"]) >= 300 for s in SAMPLES.values())


def test_spm_and_fast_ids_match_in_many_scripts(trained):
    _, sp, fast = trained
    assert len(fast) == sp.get_piece_size() == 1000
    checked = 0
    for name, sample in SAMPLES.items():
        text = sample["text"]
        variants = text.splitlines() + [
            text,  # newlines inside
            "  leading and   repeated   spaces " + text[:80] + "  ",
            text[:60] + " 🦜 ½ ﬁ Ⅻ",  # unseen character (byte fallback) and NFKC-normalised ones
        ]
        for variant in variants:
            expected = sp.encode(variant)
            got = fast(variant, add_special_tokens=False)["input_ids"]
            assert got == expected, f"{name}: {variant[:40]!r}"
            checked += 1
    assert checked > 50


def test_special_token_ids_and_pair_template(trained):
    out, sp, fast = trained
    assert [sp.id_to_piece(i) for i in range(6)] == list(SPECIAL_TOKENS)
    assert fast.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    assert (fast.pad_token_id, fast.unk_token_id, fast.cls_token_id, fast.sep_token_id, fast.mask_token_id) == (
        0, 1, 2, 3, 4)
    question, context = "Mulungu adalenga chiyani?", "Pachiyambi Mulungu adalenga kumwamba ndi dziko lapansi."
    enc = fast(question, context, return_offsets_mapping=True)
    a, b = sp.encode(question), sp.encode(context)
    assert enc["input_ids"] == [2, *a, 3, *b, 3]
    assert enc["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    single = fast(context)["input_ids"]
    assert single == [2, *b, 3]
    # Offsets point back into the right segment's text: strip the piece marker and compare.
    pieces = fast.convert_ids_to_tokens(enc["input_ids"])
    seq_ids = enc.sequence_ids()
    offsets = enc["offset_mapping"]
    for i, (piece, (start, end), seq) in enumerate(zip(pieces, offsets, seq_ids)):
        if seq is None:
            assert (start, end) == (0, 0)
            continue
        source = (question, context)[seq]
        if piece == "▁" and start == 0:
            # The dummy prefix of a segment has no character of its own: it borrows the next one.
            assert offsets[i + 1] == (start, end)
            continue
        assert source[start:end].strip() == piece.lstrip("▁")
    assert (out / "special_tokens_map.json").exists() and (out / "tokenizer_config.json").exists()
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special["mask_token"] == "[MASK]" and special["additional_special_tokens"] == ["[QUESTION]"]


def test_batch_padding_uses_pad_id_zero(trained):
    _, _, fast = trained
    batch = fast(["ndi", "Pachiyambi Mulungu adalenga kumwamba"], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0


def test_auto_character_coverage():
    assert auto_character_coverage(SAMPLES["eng"]["text"] + SAMPLES["rus"]["text"]) == 1.0
    assert auto_character_coverage(chr(0x4E00 + i) for i in range(2000)) == 0.9995


def test_long_lines_are_cut_not_dropped():
    line = ("Ndipo anati Mulungu, Kuyere; ndipo kunayera. " * 200).strip()
    pieces = list(iter_sentences([line], max_bytes=300))
    assert all(len(p.encode("utf-8")) <= 300 for p in pieces)
    assert " ".join(pieces).split() == line.split()
    unspaced = "世界人权宣言" * 200
    assert "".join(iter_sentences([unspaced], max_bytes=300)) == unspaced


def test_vocab_too_small_for_character_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="raise vocab_size, or lower character_coverage"):
        train_tokenizer(_training_texts(), tmp_path, vocab_size=400, character_coverage=1.0)


def test_every_shipped_recipe_is_valid():
    recipes = sorted((ROOT / "tokenizer").glob("*.yaml"))
    assert any(r.name == "chichewa-unigram-8k.yaml" for r in recipes)
    for recipe in recipes:
        settings = load_recipe(recipe)
        settings.pop("corpus", None)
        from littlebird_ds.data.tokenizer import TokenizerRecipe

        TokenizerRecipe(**settings)  # validates values


def test_cli_recipe_then_flags(tmp_path, capsys):
    from transformers import AutoTokenizer

    from littlebird_ds.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, sample in enumerate(_training_texts()):
        (corpus / f"{i}.txt").write_text(sample, encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"corpus: {corpus}\nvocab_size: 900\nmodel_type: unigram\ncharacter_coverage: 0.98\n")
    out = tmp_path / "tok"
    assert main(["train-tokenizer", "--recipe", str(recipe), "--model-type", "bpe", "--output", str(out)]) == 0
    used = json.loads((out / "tokenizer_recipe.json").read_text())
    assert used["model_type"] == "bpe" and used["vocab_size"] == 900  # flag wins, recipe fills the rest
    assert len(AutoTokenizer.from_pretrained(str(out))) == 900
    recipe.write_text("vocab: 10\n")
    capsys.readouterr()
    assert main(["train-tokenizer", "--recipe", str(recipe), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown keys ['vocab']" in err[0] and "Traceback" not in err[0]
