"""TP x SP parity with the single-process reference built from the same seed in this worker.

Usage: ``parallel_parity.py --tp T --sp S [--extras] [--deepspeed]`` under torch.distributed.run
with ``T * S`` processes. Checks, for the masked-LM and QA models (heads = 4, pack_size 5 !=
block_size 8, vocab 97 so vocab shards are uneven), a length-37 sequence (not a multiple of
2 * block_size) and a padded batch of lengths 37 and 23: outputs, loss and every gradient
(summed over SP, compared with the reference's TP shard) within ``TOL`` relative.

``--extras``: (TP > 1) state-dict merge/shard round trip and the TP-size error; dropout masks
equal where activations are replicated (TP ranks, the packed stream) and different across
sequence shards; activation checkpointing policies with dropout give the same gradients.
``--deepspeed``: the same parity through ``deepspeed.initialize(mpu=state)`` (ZeRO stage 0),
whose own gradient reduction replaces the manual SP all-reduce; and with DeepSpeed's activation
checkpointing (``partition_activations=True`` over TP).
"""

import parallel_common as pc  # noqa: I001  (sets env before torch)

import argparse
import copy
import importlib

import torch
import torch.distributed as dist

from littlebird_ds.parallel import (
    TensorParallelCheckpointError,
    apply_activation_checkpointing,
    initialize_model_parallel,
    load_tensor_parallel_state_dict,
    merge_tensor_parallel_state_dicts,
    parallelize,
    shard_state_dict,
    tensor_parallel_checkpoint_metadata,
)


def run(tp: int, sp: int, extras: bool = False, use_deepspeed: bool = False,
        batches_wanted: str = "single37,padded37_23") -> dict:
    """The checks of the module docstring on an initialised world of ``tp * sp * dp`` ranks."""
    state = initialize_model_parallel(tp, sp)
    cfg = pc.tiny()
    batches = {"single37": pc.batch([37], seed=1), "padded37_23": pc.batch([37, 23], seed=2)}
    batches = {k: batches[k] for k in batches_wanted.split(",")}
    result = {"tol": pc.TOL}
    worst = 0.0

    for kind in ("mlm", "mlm_masked", "mlm_rss", "qa"):
        ref, par = pc.build_pair(kind, cfg)
        parallelize(par, state)
        for bname, b in batches.items():
            errs = pc.max_over_ranks(pc.compare(kind, ref, par, state, b))
            result[f"{kind}.{bname}"] = errs
            worst = max(worst, *(v for v in errs.values() if isinstance(v, float)))
        if kind == "mlm":
            # The encoder alone (LittleBirdModel's forward), every hidden state at the input length.
            b = batches[list(batches)[-1]]
            x = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            with torch.no_grad():
                r_out, p_out = ref.littlebird(**x), par.littlebird(**x)
            assert len(r_out.hidden_states) == len(p_out.hidden_states) == cfg.num_hidden_layers + 1
            e = max(pc.rel_err(ph, rh) for ph, rh in zip(p_out.hidden_states, r_out.hidden_states))
            assert p_out.last_hidden_state.shape == r_out.last_hidden_state.shape
            result["encoder_hidden_states"] = pc.max_over_ranks({"err": e})["err"]
            worst = max(worst, result["encoder_hidden_states"])

    if extras and state.tensor_parallel_size > 1:
        # State dicts: merge(shards) == full, shard(full) == this rank's, wrong TP size is refused.
        ref, par = pc.build_pair("mlm", cfg)
        parallelize(par, state)
        mine = {k: v.clone() for k, v in par.state_dict().items()}
        everyone = [None] * state.tensor_parallel_size
        dist.all_gather_object(everyone, mine, group=state.tensor_parallel_group)
        merged = merge_tensor_parallel_state_dicts(everyone, cfg)
        full = ref.state_dict()
        assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)
        shard = shard_state_dict(full, cfg, state.tensor_parallel_rank, state.tensor_parallel_size)
        assert all(torch.equal(shard[k], mine[k]) for k in mine)
        load_tensor_parallel_state_dict(par, shard, tensor_parallel_checkpoint_metadata(state), state)
        try:
            load_tensor_parallel_state_dict(par, full, None, state)
            raise AssertionError("expected TensorParallelCheckpointError")
        except TensorParallelCheckpointError as e:
            result["tp_size_error"] = str(e)
        try:  # metadata lies: the shapes still give it away
            load_tensor_parallel_state_dict(par, full, tensor_parallel_checkpoint_metadata(state), state)
            raise AssertionError("expected TensorParallelCheckpointError")
        except TensorParallelCheckpointError as e:
            assert "shape" in str(e)
        result["state_dict_round_trip"] = "ok"

    if extras:
        # Dropout: replicated activations draw the same masks on every TP rank (equal losses), and
        # checkpointing replays every mask (head-shard masks included): gradients equal without it.
        dcfg = pc.tiny(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        _, base = pc.build_pair("mlm", dcfg)
        parallelize(base, state)
        b = pc.inputs_for("mlm", batches["padded37_23"])

        def grads(model, policy):
            m = copy.deepcopy(model)
            apply_activation_checkpointing(m, policy, every_k=2)
            torch.manual_seed(11)
            loss = m(**b).loss
            loss.backward()
            return loss.detach(), {n: p.grad for n, p in m.named_parameters()}

        loss0, g0 = grads(base, "none")
        losses = [torch.empty(()) for _ in range(state.tensor_parallel_size)]
        dist.all_gather(losses, loss0, group=state.tensor_parallel_group)
        assert all(torch.equal(x, losses[0]) for x in losses), losses
        ckpt = {}
        for policy in ("full", "every_k"):
            loss1, g1 = grads(base, policy)
            assert torch.equal(loss1, loss0)
            G = max(float(g.abs().max()) for g in g0.values())
            ckpt[policy] = max(pc.rel_err(g1[n], g0[n], G) for n in g0)
            worst = max(worst, ckpt[policy])
        torch.manual_seed(12)
        other = base(**b).loss.detach()
        assert not torch.equal(other, loss0)  # dropout is really on
        result["checkpointing_with_dropout"] = pc.max_over_ranks(ckpt)

        def gathered(module, group):
            torch.manual_seed(3)
            mask = module(torch.ones(1, 8, 4))
            everyone = [torch.empty_like(mask) for _ in range(dist.get_world_size(group))]
            dist.all_gather(everyone, mask, group=group)
            return everyone

        tok = base.littlebird.embeddings.dropout  # token stream: per SP shard, same over TP
        assert all(torch.equal(m, gathered(tok, state.tensor_parallel_group)[0])
                   for m in gathered(tok, state.tensor_parallel_group))
        sp_masks = gathered(tok, state.sequence_parallel_group)
        assert state.sequence_parallel_size == 1 or not torch.equal(sp_masks[0], sp_masks[1])
        pack = base.littlebird.layers[0].pack_dropout  # packed stream: replicated everywhere
        assert all(torch.equal(m, gathered(pack, None)[0]) for m in gathered(pack, None))
        result["dropout_masks"] = "ok"

    if use_deepspeed:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT build
        import deepspeed

        ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
        ref, par = pc.build_pair("mlm", cfg)
        parallelize(par, state)
        engine, *_ = deepspeed.initialize(model=par, optimizer=torch.optim.SGD(par.parameters(), lr=0.0),
                                          config=ds_cfg, mpu=state)
        b = batches["padded37_23"]
        x = pc.inputs_for("mlm", b)
        ref(**x).loss.backward()
        engine.backward(engine(**x).loss)
        want = shard_state_dict({n: p.grad for n, p in ref.named_parameters()}, cfg,
                                state.tensor_parallel_rank, state.tensor_parallel_size)
        G = max(float(p.grad.abs().max()) for p in ref.parameters())
        err = max(pc.rel_err(p.grad, want[n], G) for n, p in par.named_parameters())
        result["deepspeed_zero0_grad"] = pc.max_over_ranks({"grad": err})["grad"]
        worst = max(worst, result["deepspeed_zero0_grad"])

        # DeepSpeed's activation checkpointing, inputs partitioned over TP, gives the same gradients.
        _, par = pc.build_pair("mlm", cfg)
        parallelize(par, state)
        apply_activation_checkpointing(par, "full", impl="deepspeed", mpu=state, partition_activations=True)
        errs = pc.max_over_ranks(pc.compare("mlm", ref, par, state, b))
        result["deepspeed_checkpointing_partitioned"] = errs
        worst = max(worst, errs["grad"], errs["loss"], errs["logits"])

    result["worst"] = worst
    assert worst <= pc.TOL, result
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--sp", type=int, default=1)
    ap.add_argument("--extras", action="store_true")
    ap.add_argument("--deepspeed", action="store_true")
    ap.add_argument("--batches", default="single37,padded37_23", help="comma-separated subset of the batches")
    args = ap.parse_args()
    pc.init()
    pc.finish(run(args.tp, args.sp, args.extras, args.deepspeed, args.batches))
