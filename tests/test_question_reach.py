"""The question-reach probe (experiments/question_reach.py) asks only what it claims to ask."""

import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "question_reach.py")


@pytest.fixture(scope="module")
def reach():
    spec = importlib.util.spec_from_file_location("question_reach", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labels_say_whether_each_context_token_occurs_in_the_question(reach):
    b = reach.make_batch(np.random.default_rng(0), 3, 300, vocab=200, question=10)
    ids, labels = b["input_ids"].numpy(), b["labels"].numpy()
    for row, lab in zip(ids, labels):
        assert row[0] == reach.CLS and row[11] == reach.SEP and row[-1] == reach.SEP
        question = set(row[1:11].tolist())
        assert len(question) == 10  # distinct question tokens
        context = slice(12, 299)
        assert (lab[:12] == -100).all() and lab[-1] == -100
        assert [int(t in question) for t in row[context]] == lab[context].tolist()


def test_nothing_but_the_question_separates_the_two_classes(reach):
    """Question tokens and distractors are equally frequent in the context, so a token's own
    frequency in its window carries no label information; the sets change per example."""
    b = reach.make_batch(np.random.default_rng(1), 64, 1000, vocab=512, question=16)
    ids, labels = b["input_ids"].numpy(), b["labels"].numpy()
    valid = labels >= 0
    assert abs(labels[valid].mean() - 0.5) < 0.01
    pos_types = {len(set(r[l == 1].tolist())) for r, l in zip(ids, labels)}
    neg_types = {len(set(r[l == 0].tolist())) for r, l in zip(ids, labels)}
    assert pos_types == neg_types == {16}
    assert len({tuple(sorted(set(r[1:17].tolist()))) for r in ids}) == 64  # a new question each row


def test_variant_strings_parse_and_bad_ones_name_the_format(reach):
    assert reach.parse_variant("g-pi:4096:bialibi_global_keys=32") == ("g-pi", 4096, {"bialibi_global_keys": 32})
    assert reach.parse_variant("spec:0") == ("spec", 0, {})
    with pytest.raises(SystemExit, match="NAME:PI_MAX"):
        reach.parse_variant("spec")
