"""2 processes: every mapping alone (forward and backward against hand-computed expectations),
vocab-parallel cross entropy, groups/mpu, forked dropout RNG, and the size errors.

Each rank ``i``'s input is a known formula ``mk(i)``, so every rank can write down what any
collective should return without communicating.

Dimension legend: ``B`` batch, ``H`` heads, ``t`` local length, ``dh`` head size.
"""

import parallel_common as pc  # noqa: I001  (sets env before torch)

import torch
import torch.distributed as dist

from littlebird_ds import LittleBirdModel
from littlebird_ds.parallel import initialize_model_parallel, parallelize
from littlebird_ds.parallel import mappings as M
from littlebird_ds.parallel.cross_entropy import vocab_parallel_cross_entropy
from littlebird_ds.parallel.rng import sharded_dropout_rng


def mk(i, shape, scale=1.0):
    """Rank ``i``'s known input: ``arange * scale + 100 i + 1`` in float64 (exact arithmetic)."""
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float64).view(shape) * scale + 100 * i + 1


def fwd_bwd(fn, x, gout):
    """``(fn(x), d<fn(x), gout>/dx)``."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(gout)
    return y.detach(), x.grad


def run() -> dict:
    """Every check of the module docstring on an initialised world of 2 ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    P = 2
    results = {}

    def check(name, got, want):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert torch.equal(got, want), (name, got, want)
        results[name] = "ok"

    state = initialize_model_parallel(tensor_parallel=2, sequence_parallel=1)
    g = state.tensor_parallel_group
    # copy_to: identity / all-reduce
    y, gx = fwd_bwd(lambda x: M.copy_to_tensor_parallel_region(x, g), mk(rank, (2, 3)), mk(rank, (2, 3), 2.0))
    check("copy_to.fwd", y, mk(rank, (2, 3)))
    check("copy_to.bwd", gx, mk(0, (2, 3), 2.0) + mk(1, (2, 3), 2.0))
    # reduce_from: all-reduce / identity
    y, gx = fwd_bwd(lambda x: M.reduce_from_tensor_parallel_region(x, g), mk(rank, (2, 3)), mk(rank, (2, 3), 3.0))
    check("reduce_from.fwd", y, mk(0, (2, 3)) + mk(1, (2, 3)))
    check("reduce_from.bwd", gx, mk(rank, (2, 3), 3.0))
    # scatter_to (last dim): split / all-gather
    full = mk(7, (2, 4))
    y, gx = fwd_bwd(lambda x: M.scatter_to_tensor_parallel_region(x, g), full, mk(rank, (2, 2)))
    check("scatter_to.fwd", y, full[:, 2 * rank : 2 * rank + 2])
    check("scatter_to.bwd", gx, torch.cat([mk(0, (2, 2)), mk(1, (2, 2))], dim=-1))
    # gather_from (last dim, uneven vocab-like shards 3 + 2): all-gather / split
    sizes = [3, 2]
    y, gx = fwd_bwd(lambda x: M.gather_from_tensor_parallel_region(x, g, sizes), mk(rank, (2, sizes[rank])), mk(9, (2, 5)))
    check("gather_from.fwd", y, torch.cat([mk(0, (2, 3)), mk(1, (2, 2))], dim=-1))
    check("gather_from.bwd", gx, mk(9, (2, 5))[:, sum(sizes[:rank]) : sum(sizes[: rank + 1])])
    # sequence scatter / gather along dim 1
    full = mk(5, (1, 6, 2))
    y, gx = fwd_bwd(lambda x: M.scatter_to_sequence_parallel_region(x, g), full, mk(rank, (1, 3, 2)))
    check("scatter_seq.fwd", y, full[:, 3 * rank : 3 * rank + 3])
    check("scatter_seq.bwd", gx, torch.cat([mk(0, (1, 3, 2)), mk(1, (1, 3, 2))], dim=1))
    y, gx = fwd_bwd(lambda x: M.gather_from_sequence_parallel_region(x, g), mk(rank, (1, 3, 2)), mk(4, (1, 6, 2)))
    check("gather_seq.fwd", y, torch.cat([mk(0, (1, 3, 2)), mk(1, (1, 3, 2))], dim=1))
    check("gather_seq.bwd", gx, mk(4, (1, 6, 2))[:, 3 * rank : 3 * rank + 3])
    # gather heads: all-gather / reduce-scatter (partial gradients summed, then this rank's heads)
    y, gx = fwd_bwd(lambda x: M.gather_heads_from_sequence_parallel_region(x, g), mk(rank, (1, 1, 3, 2)), mk(rank, (1, 2, 3, 2), 5.0))
    check("gather_heads.fwd", y, torch.cat([mk(0, (1, 1, 3, 2)), mk(1, (1, 1, 3, 2))], dim=1))
    check("gather_heads.bwd", gx, (mk(0, (1, 2, 3, 2), 5.0) + mk(1, (1, 2, 3, 2), 5.0))[:, rank : rank + 1])
    # reduce_from_sequence_parallel_region: all-reduce / identity
    y, gx = fwd_bwd(lambda x: M.reduce_from_sequence_parallel_region(x, g), mk(rank, (3,)), mk(rank, (3,), 4.0))
    check("reduce_seq.fwd", y, mk(0, (3,)) + mk(1, (3,)))
    check("reduce_seq.bwd", gx, mk(rank, (3,), 4.0))
    # Ulysses all-to-all with H = 4 heads (2 per rank). x_i [B=1, H=4, t=3, dh=2] on rank i; after
    # seq_to_head rank r holds heads 2r, 2r+1 of every rank's tokens in rank (= sequence) order:
    # y_r = cat_i x_i[:, 2r:2r+2] along the sequence.
    xs = [mk(i, (1, 4, 3, 2)) for i in range(P)]
    gs = [mk(10 + i, (1, 2, 6, 2)) for i in range(P)]
    y, gx = fwd_bwd(lambda x: M.seq_to_head(x, g), xs[rank], gs[rank])
    check("seq_to_head.fwd", y, torch.cat([xs[i][:, 2 * rank : 2 * rank + 2] for i in range(P)], dim=2))
    # d x_r[:, 2q:2q+2] = G_q[:, :, tokens of rank r]
    check("seq_to_head.bwd", gx, torch.cat([gs[q][:, :, 3 * rank : 3 * rank + 3] for q in range(P)], dim=1))
    xs = [mk(i, (1, 2, 6, 2)) for i in range(P)]
    gs = [mk(20 + i, (1, 4, 3, 2)) for i in range(P)]
    y, gx = fwd_bwd(lambda x: M.head_to_seq(x, g), xs[rank], gs[rank])
    # y_r[:, 2q:2q+2] = x_q[:, :, tokens of rank r]
    check("head_to_seq.fwd", y, torch.cat([xs[q][:, :, 3 * rank : 3 * rank + 3] for q in range(P)], dim=1))
    check("head_to_seq.bwd", gx, torch.cat([gs[i][:, 2 * rank : 2 * rank + 2] for i in range(P)], dim=2))
    # round trip
    z = torch.randn(1, 4, 3, 2, generator=torch.Generator().manual_seed(rank))
    check("all_to_all.round_trip", M.head_to_seq(M.seq_to_head(z, g), g), z)

    # Vocab-parallel cross entropy against F.cross_entropy on the full logits (V = 7 -> 4 + 3).
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3
    target = torch.tensor([0, 6, -100, 3, 4])
    ref = logits.clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(ref, target, ignore_index=-100, reduction="none")
    want.sum().backward()
    start, end = [(0, 4), (4, 7)][rank]
    mine = logits[:, start:end].clone().requires_grad_(True)
    got = vocab_parallel_cross_entropy(mine, target, start, end, g)
    got.sum().backward()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got, want)
    assert torch.allclose(mine.grad, ref.grad[:, start:end], rtol=1e-12, atol=1e-12)
    results["vocab_parallel_cross_entropy"] = "ok"

    # mpu / groups, TP fastest.
    assert (state.get_model_parallel_world_size(), state.get_model_parallel_rank()) == (2, rank)
    assert state.get_data_parallel_world_size() == 1 and state.get_sequence_parallel_world_size() == 1
    assert state.get_tensor_model_parallel_src_rank() == 0
    sp_state = initialize_model_parallel(tensor_parallel=1, sequence_parallel=2)
    assert (sp_state.get_sequence_parallel_rank(), sp_state.get_sequence_parallel_world_size()) == (rank, 2)
    assert sp_state.get_sequence_data_parallel_world_size() == 2 and sp_state.get_data_parallel_world_size() == 1
    dp_state = initialize_model_parallel(tensor_parallel=1, sequence_parallel=1)
    assert (dp_state.get_data_parallel_world_size(), dp_state.get_data_parallel_rank()) == (2, rank)
    results["groups"] = "ok"

    # Forked dropout RNG: different numbers per model-parallel rank inside, default stream identical after.
    torch.manual_seed(123)
    with sharded_dropout_rng(state, True, torch.device("cpu")):
        inside = torch.rand(4)
    after = torch.rand(4)
    both = [torch.empty(4), torch.empty(4)]
    dist.all_gather(both, inside)
    assert not torch.equal(both[0], both[1])
    dist.all_gather(both, after)
    assert torch.equal(both[0], both[1])
    torch.manual_seed(123)
    with sharded_dropout_rng(state, True, torch.device("cpu")):
        again = torch.rand(4)
    assert torch.equal(again, inside)  # replayable from the default generator's state
    results["dropout_rng"] = "ok"

    # Clear errors.
    try:
        initialize_model_parallel(tensor_parallel=2, sequence_parallel=2)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        msg = str(e)
        assert "world size 2" in msg and "tensor_parallel (2)" in msg and "sequence_parallel (2)" in msg, msg
        results["world_error"] = msg
    try:
        parallelize(LittleBirdModel(pc.tiny(num_attention_heads=3, hidden_size=24)), sp_state)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        msg = str(e)
        assert "num_attention_heads (3)" in msg and "tensor_parallel (1)" in msg and "sequence_parallel (2)" in msg, msg
        results["heads_error"] = msg
    # Ranks that built different weights (seeded by rank) are refused before any slicing.
    torch.manual_seed(rank)
    try:
        parallelize(LittleBirdModel(pc.tiny()), state)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "different model weights" in str(e), str(e)
        results["replica_error"] = str(e)
    torch.manual_seed(0)
    model = LittleBirdModel(pc.tiny())
    torch.manual_seed(rank)
    try:
        parallelize(model, state)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "different torch RNG states" in str(e), str(e)

    return results


if __name__ == "__main__":
    pc.init()
    pc.finish(run())
