"""Pretrain a LittleBird (or a 512-position BERT teacher) with span masking on a corpus.

Documents are tokenised with --tokenizer, cut into windows of --max-length tokens
([CLS] ... [SEP], never across documents), span-masked, and trained with the shared engine
(same flags as every training command: --deepspeed, --max-steps, --resume, ...). Writes
OUT/metrics.jsonl (loss, lr, tokens_per_s; eval_loss and eval_accuracy, the masked-token
loss and accuracy on a fixed masked validation set), OUT/tb/, OUT/checkpoints/ and
OUT/final (model and tokenizer, save_pretrained). Runs single-process, or under torchrun,
the deepspeed launcher and accelerate launch.

Examples:
  littlebird-ds pretrain --model-type littlebird --preset tiny --tokenizer out/tok \\
      --corpus chichewa-bible --max-length 1024 --max-steps 2000 --lr 1e-3 --out out/lb
  littlebird-ds pretrain --model-type bert --preset tiny --tokenizer out/tok \\
      --corpus chichewa-bible --max-length 512 --max-steps 2000 --lr 1e-3 --out out/teacher
  torchrun --nproc-per-node 2 -m littlebird_ds.cli pretrain ... --deepspeed ds_configs/zero2_fp32.json
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebird_ds.train.pretrain import add_pretrain_arguments

    add_pretrain_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from littlebird_ds.train.engine import finish_worker, normalize_training_args
    from littlebird_ds.train.pretrain import prepare_pretraining, run_pretraining

    try:
        normalize_training_args(args)  # before any data is read or anything written
        setup = prepare_pretraining(args)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:
        # A set-up error is the user's to fix: show the message, not a traceback.
        raise SystemExit(f"pretrain: error: {e}") from None
    result = run_pretraining(args, setup)
    print(f"pretrain: {result.step} steps; model and tokenizer in {result.final_dir}", flush=True)
    finish_worker(0)
    return 0
