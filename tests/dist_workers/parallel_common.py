"""Shared helpers for the parallel worker scripts (run under torch.distributed.run, gloo, CPU).

Dimension legend: ``B`` batch, ``L`` input length, ``V`` vocabulary.
"""

from __future__ import annotations

import copy
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from littlebird_ds import LittleBirdConfig  # noqa: E402
from littlebird_ds.parallel import allreduce_sequence_parallel_grads, shard_state_dict  # noqa: E402

torch.set_num_threads(1)

#: Parity tolerance, fp32, elementwise: |parallel - reference| <= RTOL * |reference| + ATOL * scale,
#: ``scale`` being the largest reference magnitude of the model's outputs (for an output) or of
#: all its gradients (for a gradient). The parallel model only re-associates sums (row-parallel
#: all-reduce, vocab-parallel softmax, head/sequence shards), a few fp32 ulps; RTOL leaves room
#: for ~100 ulps. ATOL is needed for gradients that are zero in exact arithmetic and only fp32
#: noise in both runs (key biases: softmax is shift invariant; the QA bias: softmax minus one-hot
#: sums to zero): their noise is ulps of the summed terms, ~1e-7 of the scale.
RTOL = 1e-5
ATOL = 1e-6
TOL = 1.0  # the reported error is the worst ratio |diff| / (RTOL*|ref| + ATOL*scale); must be <= 1


def init() -> tuple[int, int]:
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish(result: dict) -> None:
    """Rank 0 prints the result line; every rank waits and exits without interpreter teardown."""
    dist.barrier()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def tiny(**kw) -> LittleBirdConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                block_size=8, pack_size=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                type_vocab_size=2)
    base.update(kw)
    return LittleBirdConfig(**base)


def batch(lengths: list[int], vocab: int = 97, seed: int = 0) -> dict:
    """A right-padded batch ``[B, max(lengths)]`` with token types, MLM labels and QA spans."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    ids = torch.randint(5, vocab, (B, L), generator=g)
    ids[:, 0] = 2
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    tt = (torch.arange(L) >= L // 3).long().expand(B, L).clone() * mask
    labels = torch.where((torch.rand(B, L, generator=g) < 0.3) & (mask == 1), ids, torch.full_like(ids, -100))
    start = torch.tensor([min(3, n - 1) for n in lengths])
    end = torch.tensor([n - 2 for n in lengths])
    # Recurring span selection: two question slots per row (the second unused in the first row),
    # questions and targets anywhere in the row, so they cross sequence shards.
    questions = torch.tensor([[n // 2, 1 if i else -1] for i, n in enumerate(lengths)])
    rss_starts = torch.tensor([[n - 5, 2] for n in lengths])
    rss_ends = torch.tensor([[n - 3, 4] for n in lengths])
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels,
                start_positions=start, end_positions=end,
                rss_questions=questions, rss_starts=rss_starts, rss_ends=rss_ends)


def inputs_for(model_kind: str, b: dict) -> dict:
    """``mlm_masked``: the masked-LM model with ``masked_logits_only=True`` (vocabulary logits
    at labelled tokens only, as pretraining runs it)."""
    keep = ["input_ids", "attention_mask", "token_type_ids"]
    keep += ["labels"] if model_kind.startswith("mlm") else ["start_positions", "end_positions"]
    if model_kind == "mlm_rss":  # masked LM (masked logits only) plus recurring span selection
        keep += ["rss_questions", "rss_starts", "rss_ends"]
    x = {k: b[k] for k in keep}
    if model_kind in ("mlm_masked", "mlm_rss"):
        x["masked_logits_only"] = True
    return x


def _finite(ref: torch.Tensor) -> torch.Tensor:
    return ref[ref.abs() < 1e30]  # drop masked QA logits (the dtype's lowest value)


def rel_err(a: torch.Tensor, ref: torch.Tensor, scale: float | None = None) -> float:
    """Worst elementwise ``|a - ref| / (RTOL * |ref| + ATOL * scale)`` (<= 1 passes)."""
    a, ref = a.detach().double(), ref.detach().double()
    if scale is None:
        fin = _finite(ref)
        scale = float(fin.abs().max()) if fin.numel() else 1.0
    bound = RTOL * ref.abs() + ATOL * max(scale, 1e-30)
    return float(((a - ref).abs() / bound).max())


def outputs_of(kind: str, out) -> dict:
    if kind == "mlm_rss":
        return {"loss": out.loss, "logits": out.logits, "rss_loss": out.rss_loss,
                "rss_start_logits": out.rss_start_logits, "rss_end_logits": out.rss_end_logits}
    if kind.startswith("mlm"):  # mlm_masked: [M, V] over the whole vocabulary and batch, as one process
        return {"loss": out.loss, "logits": out.logits}
    return {"loss": out.loss, "start_logits": out.start_logits, "end_logits": out.end_logits}


def objective(kind: str, out) -> torch.Tensor:
    """The scalar differentiated: the loss, plus (``mlm_masked``) a term on the returned masked
    logits, as distillation's KL uses them, so their gradient through the TP/SP gathers is checked."""
    if kind == "mlm_masked":
        return out.loss + 0.1 * out.logits.float().logsumexp(-1).mean()
    if kind == "mlm_rss":  # the span-selection head reads gathered tokens: its gradient must count once
        return out.loss + out.rss_loss
    return out.loss


def compare(kind: str, ref, par, state, b: dict, reduce_sp: bool = True) -> dict:
    """Forward + backward both models on ``b``; return the max relative error of the outputs
    and of every gradient (the parallel one summed over SP and compared with the reference's
    TP shard). Raises if a parameter has no gradient or the names differ."""
    x = inputs_for(kind, b)
    for m in (ref, par):
        m.zero_grad(set_to_none=True)
    r_out = ref(**x)
    objective(kind, r_out).backward()
    p_out = par(**x)
    objective(kind, p_out).backward()
    errs = {k: rel_err(v, outputs_of(kind, r_out)[k]) for k, v in outputs_of(kind, p_out).items()}
    if reduce_sp:
        allreduce_sequence_parallel_grads(par, state)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    want = shard_state_dict(ref_grads, ref.config, state.tensor_parallel_rank, state.tensor_parallel_size)
    got = dict(par.named_parameters())
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    g_err = 0.0
    worst = ""
    G = max(float(g.abs().max()) for g in ref_grads.values())
    for n, p in got.items():
        assert p.grad is not None, n
        assert p.grad.shape == want[n].shape, (n, p.grad.shape, want[n].shape)
        e = rel_err(p.grad, want[n], G)
        if e > g_err:
            g_err, worst = e, n
    errs["grad"] = g_err
    errs["worst_grad"] = worst
    errs["bialibi_grad"] = max(rel_err(got[n].grad, want[n], G) for n in got if "bialibi" in n)
    return errs


def max_over_ranks(errs: dict) -> dict:
    """Every rank's numeric errors reduced by max (rank 0 reports for all)."""
    out = {}
    for k, v in errs.items():
        if isinstance(v, float):
            t = torch.tensor(v, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out[k] = float(t)
        else:
            out[k] = v
    return out


def build_pair(kind: str, cfg: LittleBirdConfig, seed: int = 0):
    from littlebird_ds import LittleBirdForMaskedLM, LittleBirdForQuestionAnswering

    torch.manual_seed(seed)
    cls = LittleBirdForMaskedLM if kind.startswith("mlm") else LittleBirdForQuestionAnswering
    if kind == "mlm_rss":
        cfg = copy.deepcopy(cfg)
        cfg.rss_head = True
    ref = cls(cfg).train()
    # Non-trivial BiALiBi per head, so a wrong head slice shows in outputs.
    with torch.no_grad():
        for layer in ref.littlebird.layers:
            for p in (layer.attention.bialibi.alpha_raw, layer.attention.bialibi.beta_raw,
                      layer.attention.bialibi.gamma_raw):
                p.add_(torch.randn(p.shape) * 0.5)
    return ref, copy.deepcopy(ref)
