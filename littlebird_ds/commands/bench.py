"""Benchmark LittleBird against BigBird, Longformer and full-attention BERT at one size.

For each length (batch 1, fp32, random weights): inference step time (no grad), training
step time (forward + backward) and the peak memory of each, every configuration in a fresh
process; systems interleaved in rounds, medians, ratios of LittleBird to each peer at the
same length, log-log slopes, and LittleBird's achieved FLOP rate as a fraction of the
machine's fp32 matmul rate measured in the same run. Writes bench.json, bench.md and
bench.png into --out. Machines are noisy: compare ratios from one run, not absolute times.

Example:
  littlebird-ds bench --out runs/bench
  littlebird-ds bench --lengths 2048,32768 --systems littlebird,littlebird:eager,bigbird
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

DEFAULT_LENGTHS = "1024,2048,4096,8192,16384"
MAX_LENGTH = 65536


def _lengths(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1 or values[-1] > MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"lengths must lie in [1, {MAX_LENGTH}], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="default", choices=["default", "base"],
                        help="default: hidden 256, 4 layers, 4 heads, FFN 1024; base: 768/12/12/3072 (vocab 8000)")
    parser.add_argument("--lengths", type=_lengths, default=_lengths(DEFAULT_LENGTHS),
                        help=f"comma-separated token counts (default {DEFAULT_LENGTHS}; up to {MAX_LENGTH})")
    parser.add_argument("--systems", default="littlebird,bigbird,longformer,bert",
                        help="comma-separated; littlebird:KERNEL pins an attention kernel (default: auto)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all systems per length (default 3)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode per run, after one warm-up (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run (default: all cores)")
    parser.add_argument("--max-step-s", type=float, default=60.0,
                        help="skip a system at lengths where its training step is predicted slower (default 60)")
    parser.add_argument("--max-memory-gb", type=float, default=16.0,
                        help="skip a system at lengths where its peak memory is predicted higher (default 16)")
    parser.add_argument("--release-memory", action="store_true",
                        help="measure peak memory in a second fresh process per configuration that hands freed memory "
                             "back to the OS at once (glibc mmap threshold; the training engine's --release-memory), so "
                             "it counts what a step holds, not allocator caches; times come from the first process, "
                             "with the default allocator or the one --allocator names")
    parser.add_argument("--allocator", default="default",
                        help="malloc library preloaded (LD_PRELOAD) into every system's timed process: default (the C "
                             "library's), tcmalloc, jemalloc, or a path. glibc hands blocks above 32 MiB back to the OS "
                             "and maps fresh pages for each, which long inputs pay on every large tensor")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: lengths 512,1024, one round, one step (overrides --lengths/--rounds/--steps)")
    parser.add_argument("--out", "--output", default="runs/bench", help="output directory (default runs/bench)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--report-only", nargs="+", metavar="BENCH_JSON",
                        help="measure nothing: summarise the runs of one or more earlier bench.json files together "
                             "(e.g. a long-length run added to a shorter one) into --out")


def run(args: argparse.Namespace) -> int:
    from littlebird_ds.bench import report, runner
    from littlebird_ds.bench.systems import SYSTEMS

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for name in systems:
        if runner.split_system(name)[0] not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)} (littlebird:KERNEL allowed)")
    lengths, rounds, steps = args.lengths, args.rounds, args.steps
    if args.quick:
        lengths, rounds, steps = [512, 1024], 1, 1
    try:
        allocator = runner.resolve_allocator(args.allocator)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    plan = runner.Plan(systems=systems, lengths=lengths, size=args.size, rounds=rounds, steps=steps,
                       threads=args.threads, max_step_s=args.max_step_s, max_memory_gb=args.max_memory_gb,
                       release_memory=args.release_memory, allocator=allocator)
    command = "littlebird-ds bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    out = Path(args.out)
    if args.report_only:
        return _report_only(args.report_only, out, command)

    def checkpoint(results):  # partial results survive an interrupted run
        report.write(report.summarise(results, plan), results, out, command)

    results = runner.run(plan, progress=not args.no_progress, on_result=checkpoint)
    summary = report.summarise(results, plan)
    paths = report.write(summary, results, out, command)
    print(report.markdown(summary, command))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _report_only(paths: list[str], out: Path, command: str | None) -> int:
    """Summarise earlier runs together: systems and lengths are the union, the rest from the first."""
    import json

    from littlebird_ds.bench import report, runner

    loaded = [json.loads(Path(p).read_text()) for p in paths]
    first = dict(loaded[0]["summary"]["plan"])
    systems, lengths, results = [], set(), []
    for d in loaded:
        systems += [s for s in d["summary"]["plan"]["systems"] if s not in systems]
        lengths |= set(d["summary"]["plan"]["lengths"])
        results += d["runs"]
    first.update(systems=systems, lengths=sorted(lengths))
    plan = runner.Plan(**first)
    commands = [d.get("command") for d in loaded if d.get("command")]
    summary = report.summarise(results, plan)
    note = " ; ".join(commands + ([command] if command else []))
    paths_out = report.write(summary, results, out, note)
    print(report.markdown(summary, note))
    print("wrote " + ", ".join(str(p) for p in paths_out.values()))
    return 0
