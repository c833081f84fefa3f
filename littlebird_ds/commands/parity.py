"""Distributed parity table: every launcher and parallel layout against one process.

Runs pretrain, distill and finetune-qa (4 steps, tiny model, global batch 4) under each mode
(DP=2 with ZeRO 0-3, activation checkpointing, TP=2, SP=2, ZeRO-3 + SP=2, TP=2 x DP=2,
SP=2 x DP=2, torchrun / deepspeed / accelerate on two simulated nodes), each through its
documented launcher on this machine over loopback, and compares every logged loss, every
evaluation metric and the exported weights with one process (--batch-size 2 --grad-accum 2).
Writes parity.json and parity.md into --out; exits 1 when a cell is over 1e-5 or fails
(a layout the engine refuses with a reason, ZeRO-3 + SP, is reported as refused).

Example:
  littlebird-ds parity --out runs/parity
  littlebird-ds parity --modes tp2,sp2 --commands pretrain --out runs/parity-quick
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from littlebird_ds.bench.parity import COMMANDS, MODES

    parser.add_argument("--out", "--output", required=True, help="work directory (data, runs, parity.json, parity.md)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated, from: {', '.join(COMMANDS)}")


def _pick(value: str, allowed, what: str) -> list[str]:
    picked = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        raise ValueError(f"--{what} {value!r}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(allowed)}")
    return picked


def run(args: argparse.Namespace) -> int:
    from littlebird_ds.bench import parity

    modes = _pick(args.modes, parity.MODES, "modes")
    commands = _pick(args.commands, parity.COMMANDS, "commands")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(parity.markdown([]).rstrip())
    rows = parity.run_table(out, modes, commands)
    (out / "parity.md").write_text(parity.markdown(rows))
    bad = [r for r in rows if r["status"] not in ("ok", "refused")]
    refused = sum(r["status"] == "refused" for r in rows)
    print(f"{len(rows) - len(bad) - refused}/{len(rows)} cells within {parity.TOLERANCE:g}, {refused} refused by the "
          f"engine with a reason; table in {out / 'parity.md'}")
    return 1 if bad else 0
