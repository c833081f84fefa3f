"""Export a training checkpoint to a Hugging Face model directory (safetensors + tokenizer).

Gathers ZeRO shards (any stage) into fp32 weights, merges tensor-parallel shards when the
run used --tensor-parallel > 1, and writes OUT with save_pretrained; OUT loads with
AutoModel.from_pretrained after `import littlebird_ds`. Needs no process group or GPU.

CKPT is a checkpoint root (uses its `latest`), one step_* directory in it, or a training
--out directory.

Example:
  littlebird-ds export runs/pretrain/checkpoints runs/pretrain/hf
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint root, step_* directory, or training OUT directory")
    parser.add_argument("out", metavar="OUT", help="directory to write the Hugging Face model to")


def run(args) -> int:
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # gathering needs no accelerator
    from littlebird_ds.train.export import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out)
    print(f"exported {args.ckpt} -> {out}")
    return 0
