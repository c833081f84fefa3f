"""Can a token see the question from far away? A diagnostic of BiALiBi's reach, not a test.

Long-document QA needs every context token to compare itself with the question in block 0,
from any distance. This probe asks for exactly that and nothing else, with a label on every
token so that a small model learns it in a few hundred steps (cloze QA, one pointer per
sequence, sits on a plateau for thousands, docs/qa.md):

    [CLS] q_1 .. q_m [SEP] c_1 c_2 ... c_n [SEP]

The question is ``m`` distinct random tokens; a second set of ``m`` distinct tokens (the
distractors) is drawn per example, and each context token is drawn from the question set or
the distractor set with equal odds; token types mark the two segments, as in QA inputs.
Its label: "is this token in the question?". Both sets
are equally frequent in the context, so nothing local tells them apart: only the question
does. Chance accuracy is 0.5.

Each variant trains a ``LittleBirdModel`` (from a preset) with a per-token linear head on
``--length``-token sequences, with or without Padding Insertion (pads up to
``--pi-max-length``), and is scored on fresh sequences of each ``--eval-lengths`` length,
broken down by the token's distance from the question. All variants run in one process,
one after the other, on the same seeds and batches. Prints a table, writes ``--out`` (JSON)
and a plot::

    python experiments/question_reach.py --steps 400 --out runs/reach/reach.json \\
        --variant spec:0 --variant spec-pi:4096
    # config overrides after a second colon, e.g.  --variant global-pi:4096:bialibi_global_keys=32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from torch import nn

SPECIAL = 5  # ids 0..4: [PAD], [UNK], [CLS], [SEP], [MASK], as the project's tokenizers
PAD, CLS, SEP = 0, 2, 3
DISTANCE_BINS = (0, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def make_batch(rng: np.random.Generator, batch_size: int, length: int, vocab: int, question: int):
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, length]`` (labels -100 off the context)."""
    ids = np.zeros((batch_size, length), dtype=np.int64)
    labels = np.full((batch_size, length), -100, dtype=np.int64)
    n = length - question - 3
    for r in range(batch_size):
        sets = rng.choice(np.arange(SPECIAL, vocab), size=2 * question, replace=False)
        q, d = sets[:question], sets[question:]
        inq = rng.random(n) < 0.5
        ctx = np.where(inq, q[rng.integers(0, question, n)], d[rng.integers(0, question, n)])
        ids[r] = np.concatenate([[CLS], q, [SEP], ctx, [SEP]])
        labels[r, question + 2: question + 2 + n] = inq
    ids_t = torch.from_numpy(ids)
    types = torch.ones_like(ids_t)
    types[:, : question + 2] = 0  # segment A: [CLS] question [SEP], as QA inputs
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "token_type_ids": types,
            "labels": torch.from_numpy(labels)}


class ReachModel(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.head(out.last_hidden_state)


def parse_variant(text: str) -> tuple[str, int, dict]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise SystemExit(f"--variant {text!r}: expected NAME:PI_MAX[:key=value,...] (PI_MAX 0: no Padding Insertion)")
    overrides = {}
    for kv in filter(None, (parts[2].split(",") if len(parts) == 3 else [])):
        key, _, value = kv.partition("=")
        overrides[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return parts[0], int(parts[1]), overrides


def evaluate(model, lengths, args) -> dict:
    """Accuracy per eval length and per distance bin (distance from the question's [SEP])."""
    model.eval()
    out = {}
    with torch.no_grad():
        for length in lengths:
            rng = np.random.default_rng(10_000 + length)
            nbins = len(DISTANCE_BINS) - 1
            hits, counts = np.zeros(nbins), np.zeros(nbins)
            rows = max(1, args.eval_tokens // length)
            per_batch = max(1, args.batch_size * args.length // length)  # about the training batch's tokens
            which = np.digitize(np.arange(length) - (args.question + 1), DISTANCE_BINS) - 1  # bin of each position
            for i in range(0, rows, per_batch):
                b = make_batch(rng, min(rows - i, per_batch), length, args.vocab, args.question)
                pred = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).argmax(-1)
                ok = (pred == b["labels"]).numpy()
                valid = (b["labels"] >= 0).numpy()
                bins = np.broadcast_to(which, valid.shape)[valid]
                hits += np.bincount(bins, weights=ok[valid], minlength=nbins)
                counts += np.bincount(bins, minlength=nbins)
            out[length] = {
                "accuracy": float(hits.sum() / counts.sum()),
                "by_distance": {f"{DISTANCE_BINS[k]}-{DISTANCE_BINS[k + 1]}": float(hits[k] / counts[k])
                                for k in range(len(counts)) if counts[k]},
            }
    model.train()
    return out


def run_variant(name: str, pi_max: int, overrides: dict, args) -> dict:
    from littlebird_ds.data.padding_insertion import insert_padding_batch
    from littlebird_ds.model import LittleBirdModel
    from littlebird_ds.train.optim import param_groups
    from littlebird_ds.train.presets import build_config

    torch.manual_seed(args.seed)
    dropout = dict(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    config = build_config("littlebird", args.preset, args.vocab, PAD, **{**dropout, **overrides})
    if args.question > config.block_size - 2:
        raise SystemExit(f"--question {args.question} does not fit block 0 ({config.block_size} - 2 tokens)")
    model = ReachModel(LittleBirdModel(config))
    opt = torch.optim.AdamW(param_groups(model, 0.01, bialibi_lr_scale=args.bialibi_lr_scale, lr=args.lr), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup_steps) * max(0.1, 1 - s / args.steps))
    data_rng, pi_rng = np.random.default_rng(args.seed), np.random.default_rng(args.seed + 1)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    curve, t0, tokens = [], time.time(), 0
    for step in range(1, args.steps + 1):
        b = make_batch(data_rng, args.batch_size, args.length, args.vocab, args.question)
        if pi_max:
            b = insert_padding_batch(b, max_length=pi_max, probability=args.pi_probability,
                                     protected_prefix=args.question + 2, pad_to_multiple_of=config.block_size,
                                     pad_token_id=PAD, generator=pi_rng, shared_cap=True)
        logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        loss = loss_fn(logits.flatten(0, 1).float(), b["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        tokens += b["input_ids"].numel()
        if step % args.every == 0 or step == args.steps:
            acc = evaluate(model, [args.length], args)[args.length]["accuracy"]
            curve.append({"step": step, "loss": loss.item(), f"accuracy@{args.length}": acc})
            print(f"{name:>14}  step {step:5d}  loss {loss.item():.3f}  accuracy@{args.length} {acc:.3f}  "
                  f"{time.time() - t0:.0f} s", flush=True)
    train_s = time.time() - t0
    result = evaluate(model, args.eval_lengths, args)
    slopes = [tuple(float(t.detach().min()) for t in layer.attention.bialibi.slopes())
              for layer in model.encoder.layers]
    return {"name": name, "pi_max_length": pi_max, "overrides": overrides, "train_seconds": train_s,
            "train_tokens": tokens, "curve": curve, "eval": result,
            "min_slopes_alpha_beta_gamma": slopes}


def plot(results: list[dict], train_length: int, path: str) -> None:
    """Accuracy against distance from the question at the longest eval length, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    longest = max(results[0]["eval"], key=int)
    bins = list(results[0]["eval"][longest]["by_distance"])
    mids = [math.sqrt(max(1, DISTANCE_BINS[i]) * DISTANCE_BINS[i + 1]) for i in range(len(bins))]
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(results):  # distinct dashes: variants that coincide stay visible
        by = r["eval"][longest]["by_distance"]
        ax.plot(mids, [by[k] for k in bins], marker="os^v"[i % 4], ls=styles[i % 4], label=r["name"])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.axvline(train_length, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(f"distance of the token from the question (tokens), {longest}-token inputs")
    ax.set_ylabel("accuracy: is this token in the question?")
    ax.set_title(f"question reach, trained at {train_length} tokens (dotted line)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, metavar="NAME:PI_MAX[:key=value,...]")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--question", type=int, default=16, help="question tokens (must fit block 0)")
    p.add_argument("--length", type=int, default=512, help="training sequence length")
    p.add_argument("--eval-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048, 8192])
    p.add_argument("--eval-tokens", type=int, default=65536, help="context tokens scored per eval length")
    p.add_argument("--pi-probability", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bialibi-lr-scale", type=float, default=1.0)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON results; the plot goes next to it (.png)")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    from littlebird_ds.utils.io import atomic_write_json

    results = []
    for name, pi_max, overrides in variants:
        results.append(run_variant(name, pi_max, overrides, args))
        atomic_write_json(args.out, {"args": vars(args), "results": results})  # kept after every variant

    bins = [k for k in results[0]["eval"][max(args.eval_lengths)]["by_distance"]]
    print("\naccuracy by distance from the question (chance 0.5), longest eval length")
    print("| variant | train s | " + " | ".join(bins) + " | " + " | ".join(f"all @{n}" for n in args.eval_lengths) + " |")
    print("|" + " --- |" * (2 + len(bins) + len(args.eval_lengths)))
    for r in results:
        by = r["eval"][max(args.eval_lengths)]["by_distance"]
        print(f"| {r['name']} | {r['train_seconds']:.0f} | " + " | ".join(f"{by[k]:.3f}" for k in bins) + " | "
              + " | ".join(f"{r['eval'][n]['accuracy']:.3f}" for n in args.eval_lengths) + " |")

    plot(results, args.length, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.png")


if __name__ == "__main__":
    main()
