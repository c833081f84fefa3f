"""Run the whole recipe: raw text -> tokenizer -> teacher -> distilled LittleBird -> long-input
pretraining -> cloze QA data -> QA fine-tuning -> evaluation -> report.

With only ``--out`` it runs on the Chichewa Bible with the ``tiny`` preset (about 27 minutes
on 2 CPU cores). Every stage writes into its own folder under OUT and is skipped when it
finished before, so rerunning the same command resumes after a failure or an interruption.
The report is OUT/report.md (+ report.json and PNG plots).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML recipe of the whole run: any of this command's options by name (out, corpus, "
                        "language, preset, teacher, seed, launcher, deepspeed, ablations) and 'settings:' (preset "
                        "settings as --set takes them); flags given on the command line win")
    p.add_argument("--out", "--output", default=None, help="output directory (stages in subfolders); required, "
                                                           "here or in --config")
    p.add_argument("--corpus", default=None,
                   help="a folder of .txt files, a .jsonl file or folder, a saved datasets folder, or 'chichewa-bible' "
                        "(default)")
    p.add_argument("--language", default=None,
                   help="language code of the corpus (default nya): recorded in the report, and it picks the articles "
                        "the EM/F1 normaliser drops (en: a/an/the; nya and most others: none)")
    p.add_argument("--preset", default=None, choices=["tiny", "small", "base"], help="model and budget (default tiny)")
    p.add_argument("--teacher", default=None, help="an existing HF teacher directory, or 'minilm' (skips teacher "
                                                   "pretraining; its tokenizer becomes the pipeline's)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--launcher", default=None, help='prefix for training stages, e.g. "torchrun --nproc_per_node 2"')
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config for the training stages")
    p.add_argument("--node-rank", type=int, default=None, metavar="R",
                   help="this node's rank when the same command runs on several nodes with a multi-node --launcher "
                        "(default: $NODE_RANK, else 0); node 0 runs every stage, the others join the training "
                        "launches. OUT must be on storage all nodes share")
    p.add_argument("--node-wait-timeout", type=float, default=None, metavar="S",
                   help="seconds a node other than 0 waits for node 0 to finish a stage (default 86400)")
    p.add_argument("--ablations", action="store_true", default=None,
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


#: Options a --config recipe may set. Their defaults are PipelineOptions'; the flags default to
#: None, so a flag given on the command line (even with the default's value) wins over the recipe.
RECIPE_OPTIONS = ("out", "corpus", "language", "preset", "teacher", "seed", "launcher", "deepspeed", "ablations",
                  "node_wait_timeout")


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``args`` from ``--config FILE`` where the command line left an option at its default;
    the recipe's ``settings:`` go before the command line's ``--set`` (which therefore wins)."""
    if args.config is None:
        return _fill_defaults(args, {})
    import yaml

    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist; pass a YAML recipe (keys: "
                                f"{', '.join(RECIPE_OPTIONS)}, settings)")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise ValueError(f"--config {path} must be a mapping of option: value, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(RECIPE_OPTIONS) - {"settings"})
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {', '.join(unknown)}; use {', '.join(RECIPE_OPTIONS)} "
                         "or settings")
    settings = recipe.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path}: 'settings' must be a mapping of preset setting: value")
    as_text = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in settings.items()]
    args.set = as_text + list(args.set)
    return _fill_defaults(args, recipe)


def _fill_defaults(args: argparse.Namespace, recipe: dict) -> argparse.Namespace:
    from dataclasses import MISSING, fields

    from littlebird_ds.pipeline import PipelineOptions

    defaults = {f.name: None if f.default is MISSING else f.default for f in fields(PipelineOptions)}
    for key in RECIPE_OPTIONS:
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, defaults[key]))
    if args.out is None:
        raise ValueError("--out is required (or an 'out:' in the --config recipe); name the output folder")
    return args


def run(args: argparse.Namespace) -> int:
    import sys

    from littlebird_ds.pipeline import Pipeline, PipelineOptions, StageFailed

    args = apply_recipe(args)
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
