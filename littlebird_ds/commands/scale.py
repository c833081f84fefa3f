"""The longest document one training step fits on this machine, per launch mode (SP, ZeRO).

For each mode (sp1: one process; sp2: two sequence-parallel ranks; sp2-zero2: the same under
ZeRO-2; zero3-offload: ZeRO-3 with parameters and optimizer offloaded to CPU), one masked-LM
training step of LittleBird (default base size 768/12/12, vocab 32000, full activation
checkpointing) on one random document, each length in a fresh launch through the training
engine. Doubles the length until a step does not fit, then bisects; or tries --lengths. A
memory guard stops a step before the machine runs out. Writes scale.json, scale.md and
scale.png into --out, with a linear projection of the limit from the measured peaks.

Example:
  littlebird-ds scale --modes sp1,sp2,zero3-offload --release-memory --out runs/scale
  littlebird-ds scale --modes sp1 --lengths 8192,16384 --size default --out runs/scale-small
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebird_ds.bench.scale import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from littlebird_ds.bench import scale

    argv = sys.argv[2:] if sys.argv[1:2] == ["scale"] else None
    return scale.run(args, command="littlebird-ds scale " + " ".join(argv) if argv is not None else None)
