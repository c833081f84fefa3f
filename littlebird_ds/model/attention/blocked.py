"""Blocked kernel with flash-style backward: the fast trainable kernel on every device.

Same math as ``eager`` (spec section 3), organised for speed and memory:

* Keys every query sees (packed keys and block 0) are one ``[s + b]`` key set, so their
  scores are one large matmul ``q @ [kp; k0]^T`` over all ``l`` queries. The three-block
  windows of interior blocks are read from a strided view of ``k`` and ``v`` (consecutive
  windows overlap by two blocks); only edge blocks gather theirs (``_window_matmul``).
* BiALiBi is linear in the slopes: ``D = alpha F + beta L + gamma R`` with position
  patterns ``F, L, R`` that depend only on the layout. The patterns are built once per
  forward (``BlockLayout.cache``) and shared by all layers; a layer's bias is one small
  ``slopes @ patterns`` product. Window patterns depend only on ``delta = i - w_i`` (how far
  a block's window is shifted), so one ``[b, 3b]`` table per distinct ``delta`` serves all
  blocks, and the interior blocks (``delta = 1``) add it as a broadcast view.
* ``torch.autograd.Function`` saving only ``q, k, v, kp, vp``, the output and the row
  log-sum-exp (and the dropout mask, as bool, when dropout is on); backward recomputes the
  probabilities. No ``[l, s + 4b]`` tensor outlives the layer's forward. The output is
  returned in token-major memory, so merging heads for the output projection copies nothing
  and the projection's saved input is the tensor saved here.
* The score-sized temporaries (scores, their gradients, the window gradients) live in
  scratch buffers shared by every layer's forward and backward of one model call
  (``_Scratch``), instead of being allocated anew in each.

Shapes as in ``attention/__init__.py``; also ``K = s + b`` global keys, ``U`` distinct window
shifts.
"""

from __future__ import annotations

import math

import torch

from ..bialibi import bialibi_distance
from ..layout import BlockLayout

_NEG = torch.finfo(torch.float32).min  # finite: a fully masked row stays finite
#: Scores more than this below their row's maximum are raised to it before ``exp``. Their
#: weight, at most ``e^-30`` (9e-14) of the largest, stays below fp32 resolution even summed
#: over every key of a row (<= 3e-11 of the total for ``s + 4b <= 320`` keys), so outputs and
#: gradients are unchanged to rounding, and masked keys weigh at most that. What it buys:
#: ``exp`` of far-below-zero inputs (long BiALiBi distances, masked keys) underflows into
#: denormal numbers, which x86 CPUs process 5-20x slower, and denormal probabilities slow
#: the following matmuls by up to 100x (a 16k-token training step: 30% of its time).
_FLOOR = -30.0
#: Strided windows cost one ``bmm`` call per (row, head); below this many interior query tokens
#: per call the calls' overhead outweighs the saved copy (short training windows, large
#: batches), and the windows are gathered instead.
_STRIDED_MIN_TOKENS = 1024


class _Scratch:
    """Named fp32 buffers for the kernel's temporaries, shared by every layer of one model call
    (kept in ``BlockLayout.cache``, so they live as long as the call's autograd graph).

    The layers run one at a time, forward and backward alike (activation checkpointing
    recomputes a layer's forward only after the later layer's backward has returned), and
    nothing saved for backward or returned lives in a buffer, so one set serves all layers.
    Why: on CPU, glibc hands every block above 32 MiB (every block, with
    ``release_freed_memory``) back to the OS when it is freed, so each fresh score tensor
    costs a page fault per 4 KiB on first touch: a 16k-token training step with releasing
    faulted 5.6 GiB of fresh pages, 4.0 GiB with these buffers (7.39 -> 7.08 s, A/B in one
    process). Torch has no CPU caching allocator to ask instead. On GPU the caching allocator
    would reuse the blocks anyway; sharing them costs nothing. Forwards that no backward
    follows do not use them (``blocked_attention``)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def of(layout: BlockLayout, device: torch.device) -> "_Scratch":
        return layout.cache.setdefault(("blocked-scratch", str(device)), _Scratch())

    def get(self, name: str, *shape: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised fp32 tensor of ``shape`` on ``like``'s device, in buffer ``name``."""
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel, dtype=torch.float32, device=like.device)
        return buf[:numel].view(shape)


def _unit_patterns(qpos: torch.Tensor, kpos: torch.Tensor, rule: tuple[str, int]) -> torch.Tensor:
    """``[3, ...]`` the distance patterns ``F, L, R`` with ``D = alpha F + beta L + gamma R``;
    ``rule`` is ``(first_token, global_keys)``."""
    eye = torch.eye(3, device=qpos.device)
    return bialibi_distance(qpos, kpos, eye[0], eye[1], eye[2], *rule)


def _patterns(layout: BlockLayout, rule: tuple[str, int], device: torch.device) -> dict:
    """Per-layout constants, built once per forward and shared by every layer."""
    key = ("blocked", rule, str(device))
    if key in layout.cache:
        return layout.cache[key]
    b, n, l = layout.block_size, layout.num_blocks, layout.length
    pos = torch.arange(l, device=device)
    p0 = _unit_patterns(pos.view(l, 1), pos[:b].view(1, b), rule)  # [3, l, b]
    ws = layout.window_start.to(device)  # [B, n]
    delta = torch.arange(n, device=device) - ws  # [B, n] query block minus window start
    shifts, inverse = torch.unique(delta, return_inverse=True)  # [U], [B, n]
    r = torch.arange(b, device=device)
    c = torch.arange(3 * b, device=device)
    # Query i*b + r, key w*b + c: only i - w matters, except for query 0 (block 0, r = 0), which
    # gets its own row q0. Positions are offset by 2b so that no table position reads as the
    # first token or a global key (window keys never are: w >= 1 and global_keys <= b).
    qpos = shifts.view(-1, 1, 1) * b + r.view(1, b, 1) + 2 * b  # [U, b, 1]
    pw = _unit_patterns(qpos, (c + 2 * b).view(1, 1, 3 * b), rule)  # [3, U, b, 3b]
    block0_delta = int(delta[0, 0])
    q0 = _unit_patterns(torch.zeros(1, 1, device=device, dtype=torch.long),
                        (ws[0, 0] * b + c).view(1, 3 * b), rule)  # [3, 1, 3b]
    wb = layout.window_blocks().to(device)  # [B, n, 3]
    uniform = bool((wb == wb[:1]).all())
    interior = delta == 1  # [B, n]
    has_pad = not bool(layout.key_mask.all())
    interior_range = _interior_range(interior) if uniform else None
    blocks = torch.arange(n, device=device)
    # Blocks outside the interior range (all of them without one): indexed one by one.
    edge = blocks if interior_range is None else torch.cat([blocks[: interior_range[0]], blocks[interior_range[1] :]])
    out = dict(
        p0=p0.reshape(3, l * b),  # [3, l*b]
        pw=pw.reshape(3, -1),  # [3, U*b*3b]
        q0=q0.view(3, 3 * b),
        block0_shift=int((shifts == block0_delta).nonzero()[0, 0]),
        num_shifts=len(shifts),
        shift_index=inverse,  # [B, n]
        interior=interior,
        interior_range=interior_range,
        edge=edge,  # [e]
        edge_windows=wb[0, edge].reshape(-1),  # [3e] window blocks of the edge blocks (uniform batches)
        wb=wb,
        uniform=uniform,
        has_pad=has_pad,
        key_mask0=layout.key_mask[:, :b].to(device),  # [B, b]
        window_mask=layout.key_mask.view(-1, n, b).to(device)[torch.arange(wb.shape[0], device=device).view(-1, 1, 1), wb].flatten(2),  # [B, n, 3b]
    )
    layout.cache[key] = out
    return out


def _interior_range(interior: torch.Tensor) -> tuple[int, int] | None:
    """``(lo, hi)`` when the interior blocks of row 0 are exactly ``lo..hi-1``."""
    idx = interior[0].nonzero().flatten()
    if len(idx) == 0:
        return None
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    return (lo, hi) if hi - lo == len(idx) else None


def _gather_window(xb: torch.Tensor, pat: dict) -> torch.Tensor:
    """``xb [B, H, n, b, dh]`` -> ``[B, H, n, 3b, dh]``: the window blocks of every query block."""
    B, H, n, b, dh = xb.shape
    wb = pat["wb"]
    if pat["uniform"]:
        g = xb.index_select(2, wb[0].reshape(-1))  # [B, H, 3n, b, dh]
    else:
        g = torch.cat([xb[r : r + 1].index_select(2, wb[r].reshape(-1)) for r in range(B)], dim=0)
    return g.view(B, H, n, 3 * b, dh)  # (i, c, row) -> window rows of block i


def _scatter_window(gw: torch.Tensor, pat: dict, out_b: torch.Tensor) -> None:
    """Adjoint of ``_gather_window``: add ``gw [B, H, n, 3b, dh]`` into ``out_b [B, H, n, b, dh]``."""
    B, H, n, b3, dh = gw.shape
    b = b3 // 3
    wb = pat["wb"]
    g = gw.view(B, H, 3 * n, b, dh)  # [B, H, 3n, b, dh] one row per gathered block
    if pat["uniform"]:
        out_b.index_add_(2, wb[0].reshape(-1), g)
    else:
        for r in range(B):
            out_b[r].index_add_(1, wb[r].reshape(-1), g[r])


def _window_bias_add(sw: torch.Tensor, table: torch.Tensor, pat: dict, sign: float = 1.0) -> None:
    """``sw [B, H, n, b, 3b] += sign * table[:, shift of each block]`` with ``table [H, U, b, 3b]``;
    the interior blocks add one broadcast view, the few edge blocks are indexed."""
    B = sw.shape[0]
    rng = pat["interior_range"]
    edge = pat["edge"]
    for r in range(B):
        idx = pat["shift_index"][r]  # [n]
        if rng is not None:
            lo, hi = rng
            sw[r, :, lo:hi].add_(table[:, idx[lo]].unsqueeze(1), alpha=sign)  # [H, 1, b, 3b] over the blocks
        if len(edge):
            sw[r, :, edge] += sign * table[:, idx[edge]]  # [H, e, b, 3b]


def _window_bias_grad(ds_w: torch.Tensor, pat: dict) -> torch.Tensor:
    """``[H, U, b, 3b]``: ``ds_w [B, H, n, b, 3b]`` summed over the blocks of each shift."""
    B, H, n, b, b3 = ds_w.shape
    U = pat["num_shifts"]
    out = ds_w.new_zeros(H, U, b, b3)
    for r in range(B):
        out.index_add_(1, pat["shift_index"][r], ds_w[r])
    return out


def _window_matmul(a: torch.Tensor, x: torch.Tensor, pat: dict, b: int, keys: bool,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Every query block times its three window blocks of ``x [B, H, l, dh]``: with ``keys``,
    ``a [B, H, n, b, dh] @ window^T`` -> ``[B, H, n, b, 3b]``; else ``a [B, H, n, b, 3b] @
    window`` -> ``[B, H, n, b, dh]``.

    Interior blocks (window = blocks ``i-1 .. i+1``) read their windows from a strided view of
    ``x``, consecutive windows overlapping by two blocks, with one ``bmm`` per (row, head):
    no ``[n, 3b, dh]`` copy of the keys or values (gathering it and the matmul's own
    re-layout took 2.4x the time at 16k tokens). The few edge blocks gather their windows,
    and so do a batch whose rows have different windows and short inputs
    (``_STRIDED_MIN_TOKENS``). The result goes to ``out`` when given. Inside the kernel only:
    ``out=`` has no autograd."""
    B, H, l, dh = x.shape
    n = l // b
    rng = pat["interior_range"]
    if rng is None or (rng[1] - rng[0]) * b < _STRIDED_MIN_TOKENS or x.stride(-1) != 1:
        xw = _gather_window(x.view(B, H, n, b, dh), pat)  # [B, H, n, 3b, dh]
        return torch.matmul(a, xw.transpose(-1, -2) if keys else xw, out=out)
    lo, hi = rng
    if out is None:
        out = a.new_empty(B, H, n, b, 3 * b if keys else dh)
    step = x.stride(2)  # between tokens
    for r in range(B):
        for h in range(H):
            xh = x[r, h]  # [l, dh]
            win = xh.as_strided((hi - lo, 3 * b, dh), (b * step, step, 1), xh.storage_offset() + (lo - 1) * b * step)
            torch.bmm(a[r, h, lo:hi], win.transpose(1, 2) if keys else win, out=out[r, h, lo:hi])
    edge = pat["edge"]
    if len(edge):
        xw = x.view(B, H, n, b, dh).index_select(2, pat["edge_windows"]).view(B, H, len(edge), 3 * b, dh)
        out[:, :, edge] = torch.matmul(a[:, :, edge], xw.transpose(-1, -2) if keys else xw)
    return out


def _scores(qs, kg, sw, slopes, pat, layout, s, sg_out=None, bias_out=None):
    """Biased, masked scores ``(sg [B, H, l, K], sw [B, H, n, b, 3b])`` fp32 from ``qs`` (pre-scaled)
    and ``sw``, the raw window products ``q . k`` (biased and masked in place); ``sg`` goes to
    ``sg_out`` and the block-0 bias to ``bias_out`` when given."""
    alpha, beta, gamma = slopes
    B, H, l, dh = qs.shape
    b, n = layout.block_size, layout.num_blocks
    sl = torch.stack([alpha, beta, gamma], dim=1)  # [H, 3]
    sg = torch.matmul(qs, kg.transpose(-1, -2), out=sg_out).float()  # [B, H, l, K]
    # sub_ on the slice, not ``-=``: that would also copy the slice onto itself.
    if s:
        sg[..., :s].sub_(((beta + gamma) / 2 * b).view(1, H, 1, 1))
    sg[..., s:].sub_(torch.mm(sl, pat["p0"], out=bias_out).view(1, H, l, b))  # BiALiBi to block 0
    table = (sl @ pat["pw"]).view(H, pat["num_shifts"], b, 3 * b)  # [H, U, b, 3b]
    _window_bias_add(sw, table, pat, sign=-1.0)
    # Query 0 ([CLS]) sits at distance alpha from every key, not at its shift-table distance.
    sw[:, :, 0, 0].add_((table[:, pat["block0_shift"], 0] - sl @ pat["q0"]).unsqueeze(0))
    if pat["has_pad"]:
        sg[..., s:].masked_fill_(~pat["key_mask0"].view(B, 1, 1, b), _NEG)
        sw.masked_fill_(~pat["window_mask"].view(B, 1, n, 1, 3 * b), _NEG)
    return sg, sw


def _buffers(layout: BlockLayout, q: torch.Tensor, use: bool = True):
    """``buf(name, *shape)``: a scratch buffer for fp32 inputs; ``None`` (allocate) otherwise."""
    if not use or q.dtype != torch.float32:
        return lambda name, *shape: None
    scratch = _Scratch.of(layout, q.device)
    return lambda name, *shape: scratch.get(name, *shape, like=q)


def _recompute_scores(q, k, v, kp, vp, slopes, layout, rule, buf):
    """The part forward and backward share: ``(pat, qs, kg, vg, sg, sw)``, the layout's patterns,
    the pre-scaled queries, the global keys and values ``[B, H, K, dh]`` and the biased,
    masked scores (``_scores``), in scratch buffers where ``buf`` gives them."""
    B, H, l, dh = q.shape
    b, n = layout.block_size, layout.num_blocks
    s = 0 if kp is None else kp.shape[2]
    pat = _patterns(layout, rule, q.device)
    qs = torch.mul(q, dh**-0.5, out=buf("qs", B, H, l, dh))  # [B, H, l, dh] contiguous
    kb, vb = k.view(B, H, n, b, dh), v.view(B, H, n, b, dh)
    kg = kb[:, :, 0] if kp is None else torch.cat([kp, kb[:, :, 0]], dim=2)  # [B, H, K, dh]
    vg = vb[:, :, 0] if vp is None else torch.cat([vp, vb[:, :, 0]], dim=2)
    sw = _window_matmul(qs.view(B, H, n, b, dh), k, pat, b, keys=True,
                        out=buf("sw", B, H, n, b, 3 * b)).float()  # [B, H, n, b, 3b]
    sg, sw = _scores(qs, kg, sw, slopes, pat, layout, s, sg_out=buf("sg", B, H, l, s + b),
                     bias_out=buf("bias0", H, l * b))
    return pat, qs, kg, vg, sg, sw


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kp, vp, alpha, beta, gamma, layout, rule, dropout_p, scratch):
        B, H, l, dh = q.shape
        b, n = layout.block_size, layout.num_blocks
        s = 0 if kp is None else kp.shape[2]
        buf = _buffers(layout, q, use=scratch)
        pat, qs, kg, vg, sg, sw = _recompute_scores(q, k, v, kp, vp, (alpha, beta, gamma), layout, rule, buf)
        # One softmax over [global keys | window keys], computed in place.
        m = torch.maximum(sg.amax(-1), sw.amax(-1).view(B, H, l))  # [B, H, l]
        pg = sg.sub_(m.unsqueeze(-1)).clamp_(min=_FLOOR).exp_()
        pw = sw.sub_(m.view(B, H, n, b, 1)).clamp_(min=_FLOOR).exp_()
        total = pg.sum(-1) + pw.sum(-1).view(B, H, l)  # [B, H, l]
        log_total = total.log()
        lse = m + log_total
        pg.div_(total.unsqueeze(-1))
        pw.div_(total.view(B, H, n, b, 1))
        masks = ()
        if dropout_p > 0:
            keep = 1.0 - dropout_p
            mg = torch.rand_like(pg) < keep  # [B, H, l, K]
            mw = torch.rand_like(pw) < keep  # [B, H, n, b, 3b]
            pg.mul_(mg).div_(keep)
            pw.mul_(mw).div_(keep)
            masks = (mg, mw)
        pg, pw = pg.to(v.dtype), pw.to(v.dtype)
        out = torch.matmul(pg, vg, out=buf("og", B, H, l, dh))  # [B, H, l, dh]
        out += _window_matmul(pw, v, pat, b, keys=False, out=buf("ow", B, H, n, b, dh)).view(B, H, l, dh)
        # Token-major memory ([B, l, H, dh] behind the [B, H, l, dh] view): the layer's head merge
        # is then a view, so the output projection keeps the very tensor saved here, not a copy.
        # A new tensor always (``contiguous()`` would return the scratch buffer itself for H = 1).
        out = torch.empty(B, l, H, dh, dtype=out.dtype, device=out.device).copy_(out.transpose(1, 2)).transpose(1, 2)
        ctx.save_for_backward(q, k, v, kp, vp, alpha, beta, gamma, out, lse, log_total, *masks)
        ctx.layout, ctx.rule, ctx.dropout_p, ctx.s = layout, rule, dropout_p, s
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kp, vp, alpha, beta, gamma, out, lse, log_total, *masks = ctx.saved_tensors
        layout, s, p = ctx.layout, ctx.s, ctx.dropout_p
        B, H, l, dh = q.shape
        b, n = layout.block_size, layout.num_blocks
        buf = _buffers(layout, q)
        pat, qs, kg, vg, sg, sw = _recompute_scores(q, k, v, kp, vp, (alpha, beta, gamma), layout, ctx.rule, buf)
        scale = dh**-0.5
        # Recomputed probabilities: exp(max(x - m, floor) - log_total) = exp(max(x - lse, floor - log_total)).
        floor = _FLOOR - log_total  # [B, H, l]
        pg = sg.sub_(lse.unsqueeze(-1)).clamp_(min=floor.unsqueeze(-1)).exp_()
        pw = sw.sub_(lse.view(B, H, n, b, 1)).clamp_(min=floor.view(B, H, n, b, 1)).exp_()
        # dout is usually a head view of token-major memory ([B, l, H, dh]); every matmul below
        # takes it as it is (unit stride in dh), so it is not copied.
        doutb = dout.view(B, H, n, b, dh)
        delta = torch.mul(dout, out, out=buf("og", B, H, l, dh)).sum(-1)  # [B, H, l] = rowsum(P * dP), dropout included
        delta = delta.float()
        if p > 0:
            mg, mw = masks
            pdg, pdw = pg * mg / (1 - p), pw * mw / (1 - p)
        else:
            pdg, pdw = pg, pw
        pdg, pdw = pdg.to(v.dtype), pdw.to(v.dtype)  # fp32 softmax, matmuls in the input dtype
        dvg = torch.matmul(pdg.transpose(-1, -2), dout)  # [B, H, K, dh]
        dvw = torch.matmul(pdw.transpose(-1, -2), doutb, out=buf("dvw", B, H, n, 3 * b, dh))  # [B, H, n, 3b, dh]
        del pdg, pdw
        dpg = torch.matmul(dout, vg.transpose(-1, -2), out=buf("dpg", B, H, l, s + b)).float()  # [B, H, l, K]
        dpw = _window_matmul(doutb, v, pat, b, keys=True, out=buf("dpw", B, H, n, b, 3 * b)).float()  # [B, H, n, b, 3b]
        if p > 0:
            dpg.mul_(mg).div_(1 - p)
            dpw.mul_(mw).div_(1 - p)
        dsg = dpg.sub_(delta.unsqueeze(-1)).mul_(pg)  # dS = P * (dP - delta)
        dsw = dpw.sub_(delta.view(B, H, n, b, 1)).mul_(pw)
        del pg, pw
        dsg_, dsw_ = dsg.to(q.dtype), dsw.to(q.dtype)
        dq = torch.matmul(dsg_, kg)
        dq += _window_matmul(dsw_, k, pat, b, keys=False, out=buf("ow", B, H, n, b, dh)).view(B, H, l, dh)
        dq.mul_(scale)
        dkg = torch.matmul(dsg_.transpose(-1, -2), qs)  # [B, H, K, dh]
        dkw = torch.matmul(dsw_.transpose(-1, -2), qs.view(B, H, n, b, dh), out=buf("dkw", B, H, n, 3 * b, dh))
        del dsg_, dsw_
        dk = k.new_zeros(B, H, n, b, dh)
        dv = v.new_zeros(B, H, n, b, dh)
        _scatter_window(dkw, pat, dk)
        _scatter_window(dvw, pat, dv)
        dk[:, :, 0].add_(dkg[:, :, s:])
        dv[:, :, 0].add_(dvg[:, :, s:])
        # Slopes: score = ... - D and D = alpha F + beta L + gamma R, so dslopes = -sum(dS * pattern).
        dsl = -(dsg[..., s:].sum(0).reshape(H, l * b) @ pat["p0"].T)  # [H, 3]
        gw = _window_bias_grad(dsw, pat)  # [H, U, b, 3b]
        dsl -= gw.reshape(H, -1) @ pat["pw"].T
        # Query 0 used the q0 pattern, not its shift-table row (see _scores).
        d00 = dsw[:, :, 0, 0].sum(0)  # [H, 3b]
        dsl -= d00 @ (pat["q0"] - pat["pw"].view(3, pat["num_shifts"], b, 3 * b)[:, pat["block0_shift"], 0]).T
        dkp = dvp = None
        if s:
            dp_sum = -dsg[..., :s].sum((0, 2, 3)) * b / 2  # [H] d/d(Dp) * dDp/dbeta
            dsl[:, 1] += dp_sum
            dsl[:, 2] += dp_sum
            dkp, dvp = dkg[:, :, :s], dvg[:, :, :s]
        dsl = dsl.to(alpha.dtype)
        return (dq, dk.view(B, H, l, dh), dv.view(B, H, l, dh), dkp, dvp,
                dsl[:, 0], dsl[:, 1], dsl[:, 2], None, None, None, None)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kp: torch.Tensor | None,
    vp: torch.Tensor | None,
    slopes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    layout: BlockLayout,
    *,
    first_token: str = "constant",
    global_keys: int = 1,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    alpha, beta, gamma = slopes
    p = dropout_p if training else 0.0
    # Scratch buffers when a backward follows: an inference forward would keep them for its
    # whole length, on top of the feed-forward's peak (16k tokens: 0.24 -> 0.37 GB).
    scratch = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, alpha))
    return _BlockedAttention.apply(q, k, v, kp, vp, alpha, beta, gamma, layout, (first_token, global_keys), p, scratch)
