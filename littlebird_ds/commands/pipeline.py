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
    p.add_argument("--out", required=True, help="output directory (stages in subfolders)")
    p.add_argument("--corpus", default="chichewa-bible",
                   help="a folder of .txt files, a .jsonl file or folder, a saved datasets folder, or 'chichewa-bible'")
    p.add_argument("--language", default="nya", help="language code, recorded in the report (default nya)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--teacher", default=None, help="an existing HF teacher directory, or 'minilm' (skips teacher "
                                                   "pretraining; its tokenizer becomes the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher", default="", help='prefix for training stages, e.g. "torchrun --nproc_per_node 2"')
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config for the training stages")
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
        if isinstance(default, tuple):
            out[key] = tuple(int(x) for x in value.split(","))
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value)
    return out


def run(args: argparse.Namespace) -> int:
    from littlebird_ds.pipeline import Pipeline, PipelineOptions

    opts = PipelineOptions(out=Path(args.out), corpus=args.corpus, language=args.language, preset=args.preset,
                           teacher=args.teacher, seed=args.seed, launcher=args.launcher, deepspeed=args.deepspeed,
                           overrides=parse_overrides(args.set, args.preset))
    report = Pipeline(opts).run()
    print(report.read_text())
    return 0
