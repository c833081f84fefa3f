"""Blocked attention kernels equal the dense reference (full [l, s + l] bias, -inf outside
the LittleBird pattern) in outputs and gradients, on fresh random inputs (fp32, 1e-5)."""

import pytest
import torch

from littlebird_ds.model.attention import blocked_attention, eager_attention
from littlebird_ds.model.attention.dense import dense_attention
from littlebird_ds.model.bialibi import BiALiBi
from littlebird_ds.model.layout import BlockLayout, padded_length

TOL = dict(rtol=1e-5, atol=1e-5)


def _case(lengths, block, pack, heads, dh=8, seed=0, first_token="constant", inserted_pads=False, slope_shift=-2.0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    l = padded_length(max(lengths), block)
    mask = torch.zeros(B, l, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
        if inserted_pads and n > 3:
            # Padding Insertion: pads in the middle of a sequence keep their positions.
            drop = torch.randperm(n - 2, generator=g)[: n // 4] + 1
            mask[r, drop] = 0
    layout = BlockLayout.build(mask, block)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float().requires_grad_()

    q, k, v = rnd(B, heads, l, dh), rnd(B, heads, l, dh), rnd(B, heads, l, dh)
    kp = vp = None
    if pack:
        kp, vp = rnd(B, heads, pack, dh), rnd(B, heads, pack, dh)
    bialibi = BiALiBi(heads, first_token)
    with torch.no_grad():  # random non-negative slopes, not just the initial ALiBi ones
        for p in (bialibi.alpha_raw, bialibi.beta_raw, bialibi.gamma_raw):
            p.copy_(torch.randn(heads, generator=g) + slope_shift)
    return (q, k, v, kp, vp), bialibi, layout, mask


KERNELS = {"eager": eager_attention, "blocked": blocked_attention}


def _check(lengths, block, pack, heads, kernel="eager", global_keys=1, **kw):
    tensors, bialibi, layout, mask = _case(lengths, block, pack, heads, **kw)
    first = kw.get("first_token", "constant")
    grads = []
    outs = []
    for fn in (dense_attention, KERNELS[kernel]):
        for t in list(tensors) + list(bialibi.parameters()):
            if t is not None:
                t.grad = None
        out = fn(*tensors, bialibi.slopes(), layout, first_token=first, global_keys=global_keys)
        real = mask.bool().unsqueeze(1).unsqueeze(-1)  # outputs at pad positions are never read
        out = out * real
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in list(tensors) + list(bialibi.parameters()) if t is not None])
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    for ge, gd in zip(grads[1], grads[0]):
        torch.testing.assert_close(ge, gd, **TOL)


@pytest.mark.parametrize(
    "lengths,block,pack,heads",
    [
        ([64], 8, 5, 2),  # s != b
        ([64], 8, 8, 2),  # s == b
        ([61, 23, 40], 8, 3, 2),  # padded batch of different lengths, l not a multiple of b
        ([13], 8, 4, 2),  # l < 4b
        ([50, 7], 4, 6, 3),  # head count not a power of two
        ([72, 30], 8, 0, 2),  # pack_size = 0
        ([100], 16, 16, 5),
        ([1100], 8, 4, 2),  # long enough for the blocked kernel's strided windows
    ],
)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_matches_dense_reference(lengths, block, pack, heads, kernel):
    _check(lengths, block, pack, heads, kernel)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_matches_dense_with_inserted_padding(kernel):
    _check([70, 45], 8, 4, 2, kernel, inserted_pads=True)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_matches_dense_with_linear_first_token_bias(kernel):
    _check([48, 33], 8, 4, 2, kernel, first_token="linear")


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("global_keys,first_token", [(5, "constant"), (8, "constant"), (8, "linear")])
def test_kernel_matches_dense_with_the_whole_first_block_at_the_first_token_distance(kernel, global_keys, first_token):
    # bialibi_global_keys > 1: keys 0..g-1 (a QA question) at alpha from every query; the
    # padded batch with inserted pads has rows of 4 blocks and rows long enough for interior ones.
    _check([90, 30], 8, 4, 2, kernel, global_keys=global_keys, first_token=first_token, inserted_pads=True)


def test_global_keys_put_far_queries_at_the_constant_distance_from_the_whole_first_block():
    from littlebird_ds.model.bialibi import bialibi_distance

    one = torch.ones(1)
    far = bialibi_distance(torch.tensor([[1000]]), torch.arange(8).view(1, 8), 0.5 * one, one, one, global_keys=5)
    assert far.flatten().tolist() == [0.5] * 5 + [995.0, 994.0, 993.0]
    spec = bialibi_distance(torch.tensor([[1000]]), torch.arange(3).view(1, 3), 0.5 * one, one, one)
    assert spec.flatten().tolist() == [0.5, 999.0, 998.0]


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_matches_dense_when_most_scores_lie_far_below_the_row_maximum(kernel):
    """Steep BiALiBi slopes over long distances: most scores are 30+ below their row's maximum,
    where the blocked kernel's softmax floor acts (see ``blocked._FLOOR``)."""
    _, bialibi, _, _ = _case([200, 131], 8, 4, 3, slope_shift=1.5, inserted_pads=True)
    assert min(float(t.min()) for t in bialibi.slopes()) > 0.5  # 60+ positions away: 30+ below
    _check([200, 131], 8, 4, 3, kernel, slope_shift=1.5, inserted_pads=True)


def test_blocked_kernel_matches_dense_for_same_length_batch_and_exactly_four_blocks():
    _check([64, 64], 8, 5, 2, "blocked")  # uniform batch: the broadcast interior path with B > 1
    _check([32], 8, 3, 2, "blocked")  # n = 4: no interior block at all
    _check([32, 9], 8, 3, 2, "blocked", first_token="linear")


def test_blocked_kernel_dropout_gradients_match_autograd_through_the_same_mask():
    """With dropout the kernel saves its keep-mask as bool; the same mask applied to plain
    autograd attention (eager-style, probabilities kept) must give the same gradients."""
    from littlebird_ds.model.attention import blocked

    tensors, bialibi, layout, mask = _case([40, 29], 8, 4, 2)
    torch.manual_seed(3)
    out = blocked_attention(*tensors, bialibi.slopes(), layout, dropout_p=0.3, training=True)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) * mask.bool().view(2, 1, -1, 1)
    got = torch.autograd.grad((out * w).sum(), [t for t in tensors] + list(bialibi.parameters()))
    # Replay: same seed, same draws, differentiable math from the kernel's own helpers.
    torch.manual_seed(3)
    q, k, v, kp, vp = tensors
    B, H, l, dh = q.shape
    b, n = layout.block_size, layout.num_blocks
    pat = blocked._patterns(layout, ("constant", 1), q.device)
    kb, vb = k.view(B, H, n, b, dh), v.view(B, H, n, b, dh)
    kg, vg = torch.cat([kp, kb[:, :, 0]], 2), torch.cat([vp, vb[:, :, 0]], 2)
    with torch.enable_grad():
        sg, sw = _differentiable_scores(blocked, q * dh**-0.5, kg, blocked._gather_window(kb, pat), bialibi.slopes(), pat, layout, 4)
    probs = torch.softmax(torch.cat([sg, sw.reshape(B, H, l, 3 * b)], -1), -1)
    pg, pw = probs[..., : sg.shape[-1]], probs[..., sg.shape[-1] :].reshape(B, H, n, b, 3 * b)
    mg = torch.rand_like(pg) < 0.7
    mw = torch.rand_like(pw) < 0.7
    ref = torch.matmul(pg * mg / 0.7, vg) + torch.matmul(pw * mw / 0.7, blocked._gather_window(vb, pat)).view(B, H, l, dh)
    torch.testing.assert_close(out, ref, **TOL)
    want = torch.autograd.grad((ref * w).sum(), [t for t in tensors] + list(bialibi.parameters()))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL)


def _differentiable_scores(blocked, qs, kg, kw, slopes, pat, layout, s):
    # _scores works in place; on fresh (non-leaf) tensors autograd tracks it all the same.
    B, H, l, dh = qs.shape
    b = layout.block_size
    sw = torch.matmul(qs.view(B, H, -1, b, dh), kw.transpose(-1, -2))  # the raw window products
    return blocked._scores(qs, kg, sw, slopes, pat, layout, s)


def test_window_shifts_inward_per_sequence_at_edges():
    mask = torch.zeros(2, 64, dtype=torch.long)
    mask[0, :64] = 1
    mask[1, :20] = 1  # 3 real blocks -> own block count 4
    layout = BlockLayout.build(mask, 8)
    assert layout.seq_blocks.tolist() == [8, 4]
    assert layout.window_start[0].tolist() == [1, 1, 1, 2, 3, 4, 5, 5]
    assert layout.window_start[1].tolist() == [1, 1, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_fully_masked_window_still_attends_to_packed_keys_without_nan(kernel):
    tensors, bialibi, layout, mask = _case([64], 8, 4, 2)
    mask = mask.clone()
    mask[0, 1:] = 0  # only [CLS] is real
    layout = BlockLayout.build(mask, 8)
    out = KERNELS[kernel](*tensors, bialibi.slopes(), layout)
    assert torch.isfinite(out).all()


def test_blocked_kernel_shares_scratch_buffers_only_when_a_backward_follows():
    """Training forwards of one call share score-sized buffers (kept in the layout's cache);
    an inference forward allocates per layer, so it does not hold them for its whole length."""
    tensors, bialibi, layout, _ = _case([64], 8, 3, 2)
    key = ("blocked-scratch", "cpu")
    with torch.no_grad():
        blocked_attention(*tensors, bialibi.slopes(), layout)
    assert key not in layout.cache
    blocked_attention(*tensors, bialibi.slopes(), layout).sum().backward()
    assert layout.cache[key].buffers
