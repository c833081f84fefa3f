"""Does a model learn the cloze-matching skill of `make-qa` data? A diagnostic, not a test.

Trains a small QA model on short windows of ``make-qa`` training data (the windows that hold
the answer, as ``finetune-qa`` builds them) and prints the training loss and the start-token
accuracy on the validation set's windows every ``--every`` steps. ``--model bert`` trains a
Hugging Face ``BertForQuestionAnswering`` of the same size with dense attention and learned
positions, so a failure to learn can be pinned on the data and budget (both fail) or on
LittleBird (only it fails). Chance accuracy is about 1 / (context tokens per window).

    python experiments/qa_learnability.py --data runs/qa --tokenizer runs/tok --model littlebird \
        --length 128 --steps 1000 --lr 1e-3
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def main() -> None:
    from littlebird_ds.config import BIALIBI_INITS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="make-qa output folder (train-512.json, validation-512.json)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model", choices=("littlebird", "bert"), default="littlebird")
    p.add_argument("--length", type=int, default=128, help="window length in tokens")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--preset", default="tiny", help="model size preset, the same for both kinds")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-steps", type=int, default=0,
                   help="first train this many steps on synthetic copy questions over random tokens")
    p.add_argument("--bialibi-lr-scale", type=float, default=1.0,
                   help="learning-rate multiplier of LittleBird's BiALiBi slopes (as the training commands' flag)")
    p.add_argument("--bialibi-global-keys", type=int, default=None, metavar="N",
                   help="LittleBird only: the first N keys (the question in block 0) at BiALiBi's constant "
                        "first-token distance (config bialibi_global_keys; default: the model's own, 1)")
    p.add_argument("--bialibi-init", default=None, choices=BIALIBI_INITS,
                   help="LittleBird only: initial BiALiBi slopes (config bialibi_init)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from a pretrained model instead of random: for LittleBird e.g. a pretrain run's "
                        "OUT/final, for --model bert any Hugging Face BERT-style encoder folder")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from littlebird_ds.data.qa import load_qa_examples
    from littlebird_ds.train.finetune_qa import collate_qa, train_features
    from littlebird_ds.train.presets import build_model

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = {}
    for split in ("train", "validation"):
        examples = load_qa_examples(f"{args.data}/{split}-512.json")
        rows[split] = train_features(examples, tok, max_length=args.length, stride=args.length // 2,
                                     block_size=args.block_size)
    train, val = rows["train"], rows["validation"][: args.eval_windows]
    pad = tok.pad_token_id
    overrides = dict(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    if args.bialibi_global_keys is not None:
        if args.model != "littlebird":
            raise SystemExit("--bialibi-global-keys is a LittleBird option")
        overrides["bialibi_global_keys"] = args.bialibi_global_keys
    if args.bialibi_init is not None:
        overrides["bialibi_init"] = args.bialibi_init
    if args.init:
        from transformers import AutoModelForQuestionAnswering

        import littlebird_ds  # noqa: F401 - registers LittleBird with the Auto classes

        model = AutoModelForQuestionAnswering.from_pretrained(args.init, **overrides)
    elif args.model == "bert":
        model = build_model("bert", args.preset, len(tok), pad, head="qa",
                            max_position_embeddings=max(512, args.length), **overrides)
    else:
        model = build_model("littlebird", args.preset, len(tok), pad, head="qa", block_size=args.block_size, **overrides)
    from littlebird_ds.train.optim import param_groups

    opt = torch.optim.AdamW(param_groups(model, 0.01, bialibi_lr_scale=args.bialibi_lr_scale, lr=args.lr), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)) * max(0.1, 1 - s / args.steps))

    def start_accuracy() -> float:
        model.eval()
        hit = 0
        with torch.no_grad():
            for i in range(0, len(val), 32):
                b = collate_qa(val[i:i + 32], pad)
                out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                            attention_mask=b["attention_mask"])
                # Context tokens only (token type 1); the question and padding cannot be answers.
                start = out.start_logits.masked_fill(b["token_type_ids"] == 0, -1e9).argmax(-1)
                hit += int((start == b["start_positions"]).sum())
        model.train()
        return hit / len(val)

    rng = random.Random(args.seed)
    print(f"{args.model}: {len(train)} training windows, {len(val)} validation windows of {args.length} tokens")
    t0 = time.time()
    if args.synthetic_steps:
        ordinary = [i for i in range(len(tok)) if i not in set(tok.all_special_ids)]
        for step in range(args.synthetic_steps):
            b = synthetic_batch(rng, ordinary, tok, args.batch_size, args.length)
            for g in opt.param_groups:  # warm-up, then constant; the cloze phase has its own schedule
                g["lr"] = g["initial_lr"] * min(1.0, (step + 1) / max(1, args.warmup_steps))
            out = model(**b)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            if step % args.every == 0 or step == args.synthetic_steps - 1:
                with torch.no_grad():
                    model.eval()
                    v = synthetic_batch(random.Random(1), ordinary, tok, 64, args.length)
                    hit = (model(**{k: x for k, x in v.items() if "positions" not in k}).start_logits.argmax(-1)
                           == v["start_positions"]).float().mean()
                    model.train()
                print(f"synthetic step {step:5d}  loss {out.loss.item():.3f}  synthetic start accuracy {hit:.3f}  "
                      f"cloze start accuracy {start_accuracy():.3f}  {time.time() - t0:.0f} s", flush=True)
    for step in range(args.steps):
        b = collate_qa(rng.sample(train, args.batch_size), pad)
        out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"],
                    start_positions=b["start_positions"], end_positions=b["end_positions"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % args.every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.3f}  validation start accuracy {start_accuracy():.3f}  "
                  f"{time.time() - t0:.0f} s", flush=True)


def synthetic_batch(rng: random.Random, ordinary: list[int], tok, batch_size: int, length: int) -> dict:
    """Copy questions over random tokens: the question is a snippet of the context with one to
    three tokens replaced by one ``[MASK]``; the answer is those tokens in the context."""
    rows = []
    for _ in range(batch_size):
        q_len = rng.randint(8, 24)
        ctx_len = length - q_len - 2  # [CLS] q [SEP] ctx [SEP] with q_len - 1 + k question tokens
        ctx = [rng.choice(ordinary) for _ in range(ctx_len)]
        k = rng.randint(1, 3)
        at = rng.randint(0, ctx_len - q_len - k)
        blank = at + rng.randint(1, q_len - 2)
        question = ctx[at:blank] + [tok.mask_token_id] + ctx[blank + k:at + q_len + k - 1]
        ids = [tok.cls_token_id, *question, tok.sep_token_id, *ctx, tok.sep_token_id][:length]
        offset = len(question) + 2
        rows.append((ids, offset, offset + blank, offset + blank + k - 1))
    n = max(len(r[0]) for r in rows)
    ids = torch.full((batch_size, n), tok.pad_token_id)
    types = torch.zeros((batch_size, n), dtype=torch.long)
    mask = torch.zeros((batch_size, n), dtype=torch.long)
    for i, (row, offset, _, _) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        types[i, offset:len(row)] = 1
        mask[i, :len(row)] = 1
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask,
                start_positions=torch.tensor([r[2] for r in rows]), end_positions=torch.tensor([r[3] for r in rows]))


if __name__ == "__main__":
    main()
