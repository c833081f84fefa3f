"""Run the whole recipe: raw text -> tokenizer -> teacher -> distilled LittleBird -> long-input
pretraining -> cloze QA data -> QA fine-tuning -> evaluation -> report.

With only ``--out`` it runs on the Chichewa Bible with the ``tiny`` preset (about 20 minutes
on 2 CPU cores). Every stage writes into its own folder under OUT and is skipped when it
finished before, so rerunning the same command resumes after a failure or an interruption.
The report is OUT/report.md (+ report.json and PNG plots).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "--output", required=True, help="output directory (stages in subfolders)")
    p.add_argument("--corpus", default="chichewa-bible",
                   help="a folder of .txt files, a .jsonl file or folder, a saved datasets folder, or 'chichewa-bible'")
    p.add_argument("--language", default="nya",
                   help="language code of the corpus (default nya): recorded in the report, and it picks the articles "
                        "the EM/F1 normaliser drops (en: a/an/the; nya and most others: none)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--teacher", default=None, help="an existing HF teacher directory, or 'minilm' (skips teacher "
                                                   "pretraining; its tokenizer becomes the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher", default="", help='prefix for training stages, e.g. "torchrun --nproc_per_node 2"')
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config for the training stages")
    p.add_argument("--node-rank", type=int, default=None, metavar="R",
                   help="this node's rank when the same command runs on several nodes with a multi-node --launcher "
                        "(default: $NODE_RANK, else 0); node 0 runs every stage, the others join the training "
                        "launches. OUT must be on storage all nodes share")
    p.add_argument("--node-wait-timeout", type=float, default=24 * 3600.0, metavar="S",
                   help="seconds a node other than 0 waits for node 0 to finish a stage (default 86400)")
    p.add_argument("--ablations", action="store_true",
                   help="also train and evaluate the two comparisons with the same budget: the student without "
                        "Padding Insertion and the student's architecture from random weights (about twice the QA time)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset setting, e.g. --set qa_steps=2000 (see littlebird_ds/pipeline.py PRESETS)")


def parse_overrides(items: list[str], preset: str) -> dict:
    from littlebird_ds.pipeline import PRESETS

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in PRESETS[preset]:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(PRESETS[preset])}")
        default = PRESETS[preset][key]
        try:
            if isinstance(default, tuple):
                out[key] = tuple(int(x) for x in value.split(","))
            elif isinstance(default, bool):
                out[key] = value.lower() in ("1", "true", "yes")
            else:
                out[key] = type(default)(value)
        except ValueError:
            kind = "comma-separated integers" if isinstance(default, tuple) else type(default).__name__
            raise ValueError(f"--set {item!r}: {key} takes {kind} (the preset's value is {default!r})") from None
    return out


def node_rank(flag: int | None) -> int:
    """``--node-rank``, else ``$NODE_RANK`` (what launch/deepspeed_multinode.sh reads), else 0."""
    import os

    if flag is None:
        env = os.environ.get("NODE_RANK", "0") or "0"
        if not env.isdigit():
            raise SystemExit(f"pipeline: error: NODE_RANK={env!r} is not a node rank; set it to 0, 1, ... or pass "
                             "--node-rank R")
        flag = int(env)
    if flag < 0:
        raise SystemExit(f"pipeline: error: --node-rank {flag} must be >= 0")
    return flag


def run(args: argparse.Namespace) -> int:
    import sys

    from littlebird_ds.pipeline import Pipeline, PipelineOptions, StageFailed

    opts = PipelineOptions(out=Path(args.out), corpus=args.corpus, language=args.language, preset=args.preset,
                           teacher=args.teacher, seed=args.seed, launcher=args.launcher, deepspeed=args.deepspeed,
                           ablations=args.ablations, node_rank=node_rank(args.node_rank),
                           node_wait_timeout=args.node_wait_timeout,
                           overrides=parse_overrides(args.set, args.preset))
    try:
        report = Pipeline(opts).run()
    except StageFailed as e:  # the child's log first, then the one error line
        print(e.log_tail, file=sys.stderr, flush=True)
        raise SystemExit(str(e)) from None
    if opts.node_rank == 0:
        print(report.read_text())
    return 0
