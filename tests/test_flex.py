"""The flex kernel (torch FlexAttention) equals the eager kernel, fp32 forward, 1e-5.

Most cases run FlexAttention uncompiled (same block mask, mask_mod and score_mod, torch's
reference path) to keep the test fast; one case runs the compiled kernel the model uses.
"""

import pytest
import torch

from littlebird_ds.model.attention import eager_attention, flex, get_kernel, select_default_kernel
from test_attention_parity import TOL, _case


def _compare(lengths, block, pack, heads, first_token="constant", global_keys=1, **kw):
    tensors, bialibi, layout, mask = _case(lengths, block, pack, heads, first_token=first_token, **kw)
    tensors = [None if t is None else t.detach() for t in tensors]
    rule = dict(first_token=first_token, global_keys=global_keys)
    with torch.no_grad():
        got = flex.flex_kernel(*tensors, bialibi.slopes(), layout, **rule)
        want = eager_attention(*tensors, bialibi.slopes(), layout, **rule)
    real = mask.bool().view(len(lengths), 1, -1, 1)  # outputs at pad positions are never read
    torch.testing.assert_close(got * real, want * real, **TOL)


@pytest.fixture
def uncompiled(monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex, "_compiled", lambda: flex_attention)


@pytest.mark.parametrize(
    "lengths,block,pack,heads,first_token",
    [
        ([64], 8, 5, 2, "constant"),  # s not a multiple of b: packed part zero-padded and masked
        ([61, 23, 40], 8, 3, 2, "linear"),  # padded batch, per-sequence edges, linear first-token bias
        ([50, 7], 8, 0, 3, "constant"),  # no packed keys
        ([300], 16, 16, 2, "constant"),  # bucketed length (300 -> 304 -> bucket 320)
    ],
)
def test_flex_matches_eager(uncompiled, lengths, block, pack, heads, first_token):
    _compare(lengths, block, pack, heads, first_token)


def test_flex_matches_eager_with_inserted_padding(uncompiled):
    _compare([70, 45], 8, 4, 2, inserted_pads=True)


def test_flex_matches_eager_with_the_whole_first_block_global(uncompiled):
    _compare([70, 45], 8, 4, 2, inserted_pads=True, global_keys=8)
    _compare([61, 23], 8, 3, 2, first_token="linear", global_keys=6)


def test_compiled_flex_matches_eager():
    _compare([200, 130], 16, 16, 2)


def test_bucket_lengths_are_whole_blocks_and_few():
    for b in (16, 64):
        buckets = {flex.bucket_length(l, b) for l in range(b, 65536 + 1, b)}
        assert all(x % b == 0 for x in buckets)
        assert len(buckets) <= 8 + 4 * 12  # short lengths exact, then four per octave
    assert flex.bucket_length(16384, 64) == 16384
    assert flex.bucket_length(16448, 64) == 20480


def test_selection_and_unavailable_reason():
    # flex is opt-in: past torch.compile's recompile limit it runs a quadratic reference path.
    assert select_default_kernel("cpu", training=True) == "blocked"
    assert select_default_kernel("cpu", training=False) == "blocked"
    assert select_default_kernel("cuda", training=True) == "blocked"
    assert get_kernel("flex", "cpu", training=False) is flex.flex_kernel
    with pytest.raises(ValueError, match="no FlexAttention backward on CPU"):
        get_kernel("flex", "cpu", training=True)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        get_kernel("magic", "cpu", training=False)
