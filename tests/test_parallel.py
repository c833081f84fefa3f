"""Tensor, sequence and data parallelism, activation checkpointing, checkpoint conversion.

Distributed tests launch ``tests/dist_workers/parallel_*.py`` under ``torch.distributed.run``
on CPU with gloo (loopback only), assert exit code 0 and read the ``RESULT`` line of rank 0.
Parity tolerance (fp32, see ``parallel_common.py``): elementwise
``|parallel - reference| <= 1e-5 * |reference| + 1e-6 * scale``; the workers report the worst
ratio of difference to that bound, which must be <= 1.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, tiny_config
from littlebird_ds import LittleBirdForMaskedLM, LittleBirdForQuestionAnswering, LittleBirdModel
from littlebird_ds.parallel import (
    ParallelState,
    TensorParallelCheckpointError,
    apply_activation_checkpointing,
    check_checkpoint_tensor_parallel_size,
    initialize_model_parallel,
    merge_tensor_parallel_state_dicts,
    parallelize,
    shard_state_dict,
    single_process_state,
)

WORKERS = Path(__file__).parent / "dist_workers"
ROOT = Path(__file__).parent.parent



def _launch(nproc: int, script: str, *args: str, timeout: int = 120) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(WORKERS)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKERS / script), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def _assert_parity(result: dict, keys: list[str]) -> None:
    for key in keys:
        errs = result[key]
        for name, value in errs.items():
            if isinstance(value, float):
                assert value <= 1.0, (key, name, value, errs)
    assert result["worst"] <= 1.0, result


# ----- distributed --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_procs() -> dict:
    """One 2-process launch for all 2-rank checks (mappings, TP = 2, SP = 2): one interpreter
    start-up instead of three on a 2-core machine."""
    return _launch(2, "parallel_two_procs.py", timeout=180)


def test_each_mapping_alone_forward_and_backward_and_clear_errors(two_procs):
    """copy/reduce/scatter/gather (TP, SP, heads), seq_to_head/head_to_seq with 2 heads per rank,
    vocab-parallel cross entropy, groups, forked dropout RNG, and the size errors."""
    r = two_procs["mappings"]
    for name in ("copy_to", "reduce_from", "scatter_to", "gather_from", "scatter_seq", "gather_seq",
                 "gather_heads", "reduce_seq", "seq_to_head", "head_to_seq"):
        assert r[f"{name}.fwd"] == "ok" and r[f"{name}.bwd"] == "ok", name
    assert r["all_to_all.round_trip"] == "ok"
    assert r["vocab_parallel_cross_entropy"] == r["groups"] == r["dropout_rng"] == "ok"
    assert "world size 2" in r["world_error"] and "tensor_parallel (2)" in r["world_error"]
    assert "num_attention_heads (3)" in r["heads_error"] and "sequence_parallel (2)" in r["heads_error"]
    assert "torch.manual_seed(same seed)" in r["replica_error"]


def test_tensor_parallel_2_equals_single_process(two_procs):
    """TP = 2 vs TP = 1 (masked LM, with span selection, and QA, pack attention, BiALiBi slices, uneven vocab shards),
    state-dict conversion, TP-size error, dropout masks and checkpointing replay under TP."""
    r = two_procs["tp2"]
    _assert_parity(r, ["mlm.single37", "mlm.padded37_23", "mlm_masked.single37", "mlm_masked.padded37_23",
                       "mlm_rss.single37", "mlm_rss.padded37_23", "qa.single37", "qa.padded37_23"])
    assert r["state_dict_round_trip"] == "ok"
    assert "tensor_parallel_size=1" in r["tp_size_error"] and "shard_state_dict" in r["tp_size_error"]
    assert r["checkpointing_with_dropout"] == {"full": 0.0, "every_k": 0.0}
    assert r["dropout_masks"] == "ok" and r["encoder_hidden_states"] <= 1.0


def test_sequence_parallel_2_equals_single_process(two_procs):
    """SP = 2 vs SP = 1: length 37 (padded to 40, not a multiple of 2 * block_size, shards of 20
    tokens not aligned to blocks) and a padded batch of lengths 37 and 23, masked LM with span
    selection (its head reads gathered tokens, so its gradient is divided by P); dropout masks per
    sequence shard (the packed stream's the same on every rank) and checkpointing replay."""
    r = two_procs["sp2"]
    _assert_parity(r, ["mlm.single37", "mlm.padded37_23", "mlm_masked.single37", "mlm_masked.padded37_23",
                       "mlm_rss.single37", "mlm_rss.padded37_23", "qa.single37", "qa.padded37_23"])
    assert r["encoder_hidden_states"] <= 1.0
    assert r["checkpointing_with_dropout"] == {"full": 0.0, "every_k": 0.0}
    assert r["dropout_masks"] == "ok"


def test_tp2_x_sp2_with_deepspeed_equals_single_process():
    """4 processes, TP = 2 x SP = 2: parity by hand, through deepspeed.initialize(mpu=state)
    (its gradient reduction sums over SP), and with DeepSpeed's partitioned checkpointing."""
    r = _launch(4, "parallel_parity.py", "--tp", "2", "--sp", "2", "--deepspeed", "--batches", "padded37_23",
                timeout=180)
    _assert_parity(r, ["mlm.padded37_23", "mlm_masked.padded37_23", "mlm_rss.padded37_23", "qa.padded37_23",
                       "deepspeed_checkpointing_partitioned"])
    assert r["encoder_hidden_states"] <= 1.0
    assert r["deepspeed_zero0_grad"] <= 1.0


# ----- single process -----------------------------------------------------------------------


def _mlm_batch(cfg, B=2, L=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 23:] = 0
    labels = torch.where(torch.rand(B, L, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def test_activation_checkpointing_policies_recompute_their_layers_with_the_same_gradients():
    """none / full / every_k (k = 2 of 3 layers), dropout on: the selected layers run their forward
    again in backward (counted), and non-reentrant checkpointing restores the RNG state, so
    recomputed layers draw the same masks and gradients are bitwise equal."""
    cfg = tiny_config(num_hidden_layers=3, num_attention_heads=4, hidden_size=32, hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    ref = LittleBirdForMaskedLM(cfg).train()
    batch = _mlm_batch(cfg)

    def grads(m):
        torch.manual_seed(7)
        m(**batch).loss.backward()
        return {n: p.grad for n, p in m.named_parameters()}

    def counting(m):
        counts = [0] * len(m.littlebird.layers)
        for i, layer in enumerate(m.littlebird.layers):
            layer.attention.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        return counts

    want = grads(ref)
    expected = {"none": [False] * 3, "full": [True] * 3, "every_k": [True, False, True]}
    for policy, pattern in expected.items():
        model = apply_activation_checkpointing(copy.deepcopy(ref), policy, every_k=2)
        model.zero_grad(set_to_none=True)
        assert [layer.gradient_checkpointing for layer in model.littlebird.layers] == pattern
        counts = counting(model)
        got = grads(model)
        assert counts == [2 if on else 1 for on in pattern], (policy, counts)
        for n in want:
            assert torch.equal(got[n], want[n]), (policy, n)


def test_activation_checkpointing_rejects_unknown_policy():
    model = LittleBirdModel(tiny_config())
    with pytest.raises(ValueError, match="policy must be one of"):
        apply_activation_checkpointing(model, "selective")
    with pytest.raises(ValueError, match="every_k"):
        apply_activation_checkpointing(model, "every_k", every_k=0)


def test_state_dict_shard_and_merge_round_trip_uneven_vocab():
    """TP = 2 and 3 (97 = 33 + 33 + 31 vocabulary rows): merge(shard(full)) == full, exactly."""
    cfg = tiny_config(num_attention_heads=6, hidden_size=24, intermediate_size=48)
    full = LittleBirdForMaskedLM(cfg).state_dict()
    for tp in (2, 3):
        shards = [shard_state_dict(full, cfg, r, tp) for r in range(tp)]
        assert shards[0]["littlebird.layers.0.attention.query.weight"].shape == (24 // tp, 24)
        assert shards[0]["littlebird.layers.0.ffn.output.weight"].shape == (24, 48 // tp)
        assert shards[-1]["lm_head.bias"].shape[0] == 97 - (tp - 1) * -(-97 // tp)
        assert shards[0]["littlebird.layers.0.attention.bialibi.alpha_raw"].shape == (6,)  # replicated
        merged = merge_tensor_parallel_state_dicts(shards, cfg)
        assert list(merged) == list(full) and all(torch.equal(merged[k], full[k]) for k in full)


def test_checkpoint_with_another_tp_size_is_refused_with_the_fix():
    check_checkpoint_tensor_parallel_size({"tensor_parallel_size": "2"}, 2)
    with pytest.raises(TensorParallelCheckpointError, match="saved with tensor_parallel_size=2 .* uses tensor_parallel_size=4"):
        check_checkpoint_tensor_parallel_size({"tensor_parallel_size": "2"}, 4)
    with pytest.raises(TensorParallelCheckpointError, match="merge_tensor_parallel_state_dicts"):
        check_checkpoint_tensor_parallel_size({"tensor_parallel_size": "2"}, 1)
    with pytest.raises(TensorParallelCheckpointError, match="full .single-process. state dict"):
        check_checkpoint_tensor_parallel_size(None, 2)


def test_heads_not_divisible_by_tp_times_sp_is_a_clear_error():
    model = LittleBirdForQuestionAnswering(tiny_config())  # 3 heads
    state = ParallelState(tensor_parallel_size=2, sequence_parallel_size=1)
    with pytest.raises(ValueError, match=r"num_attention_heads \(3\) .* tensor_parallel \(2\) \* sequence_parallel \(1\)"):
        parallelize(model, state)


def test_single_process_state_leaves_the_model_unchanged():
    state = initialize_model_parallel(1, 1)  # no torch.distributed needed
    assert state.is_trivial and state.get_model_parallel_world_size() == 1 and state.get_data_parallel_group() is None
    torch.manual_seed(0)
    model = LittleBirdForMaskedLM(tiny_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert parallelize(model, single_process_state()) is model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert type(model.littlebird.embeddings.word_embeddings) is torch.nn.Embedding
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        initialize_model_parallel(2, 1)
