"""How long a document can one training step take? The scale benchmark.

For each *mode* (a launch: sequence-parallel size and DeepSpeed config), one masked-LM
training step of LittleBird at a given size on one random document of ``length`` tokens,
batch 1, with activation checkpointing, run through the training engine exactly as the
training commands run it (``Trainer.setup``: process group, sequence parallelism,
checkpointing policy, ``deepspeed.initialize``), each length in a fresh launch. A step
*fits* when forward, backward and the optimizer step finish.

Memory is what the operating system sees: every rank's resident high-water mark
(``VmHWM``), summed over the ranks of this machine, model, optimizer state and all. A guard
polls the machine's available memory while a step runs and stops the launch when it falls
under ``--reserve-gb`` (recorded as out of memory), so the search never drives the machine
into its OOM killer; the workers also mark themselves first in line for it.

The search doubles the length from ``--start`` until a step fails, then bisects between the
longest length that fit and the shortest that did not, ``--refine`` times, on multiples of
``--granularity`` tokens. The straight line through the peak memory of the two longest steps
that fit (the model is linear in length) also gives a projected limit for the machine's memory.

    littlebird-ds scale --modes sp1,sp2,zero3-offload --release-memory --out runs/scale
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..utils.io import atomic_write_text, free_port
from .systems import SIZES
from .worker import _status_kb

#: mode name -> (sequence-parallel size, DeepSpeed config under ds_configs/ or None for the built-in ZeRO-0)
MODES: dict[str, tuple[int, str | None]] = {
    "sp1": (1, None),
    "sp2": (2, None),
    "zero3-offload": (1, "zero3_offload_fp32.json"),
    "sp2-zero2": (2, "zero2_fp32.json"),
}


def _ds_config_path(name: str | None) -> str | None:
    if name is None:
        return None
    here = Path(__file__).resolve().parents[2] / "ds_configs" / name
    if not here.is_file():
        raise FileNotFoundError(f"{here} not found: modes with a DeepSpeed config read it from the repository's "
                                "ds_configs/; run from a source checkout (pip install -e .) or choose the sp1/sp2 modes")
    return str(here)


def _meminfo_gb(field: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"{field} not in /proc/meminfo")


def mem_available_gb() -> float:
    return _meminfo_gb("MemAvailable")


def mem_total_gb() -> float:
    return _meminfo_gb("MemTotal")


# ---------------------------------------------------------------------------------------------
# Worker: one launch, one training step
# ---------------------------------------------------------------------------------------------
def worker(argv: list[str]) -> None:
    import torch

    from ..config import LittleBirdConfig
    from ..model.modeling import LittleBirdForMaskedLM, masked_logits_kwargs
    from ..train.engine import Trainer, add_training_arguments, finish_worker

    p = argparse.ArgumentParser()
    add_training_arguments(p)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--size", default="base", choices=sorted(SIZES))
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--pack-size", type=int, default=64)
    a = p.parse_args(argv)
    try:  # first in line for the kernel's OOM killer, before anything else on the machine
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    hidden, layers, heads, ffn, _ = SIZES[a.size]
    cfg = LittleBirdConfig(vocab_size=a.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=ffn, block_size=a.block_size,
                           pack_size=a.pack_size)
    trainer = Trainer(a, model_factory=lambda: LittleBirdForMaskedLM(cfg), loss_fn=lambda m, b: None,
                      batches=lambda start, r, n: iter(()))
    engine = trainer.setup()
    import torch.distributed as dist

    g = torch.Generator().manual_seed(a.seed)  # every rank of a sequence-parallel group: the same document
    ids = torch.randint(5, a.vocab_size, (1, a.length), generator=g)
    ids[0, 0] = 2
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape, generator=g) < 0.15
    labels[masked] = ids[masked]
    batch = {"input_ids": ids.to(trainer.device), "labels": labels.to(trainer.device)}
    built_gb = _status_kb("VmRSS") / 2**20
    engine.train()
    t0 = time.perf_counter()
    loss = engine(**batch, **masked_logits_kwargs(engine)).loss
    t_fwd = time.perf_counter() - t0
    engine.backward(loss)
    engine.step()
    step_s = time.perf_counter() - t0
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, {"peak_gb": _status_kb("VmHWM") / 2**20, "built_gb": built_gb})
    if dist.get_rank() == 0:
        print("SCALE_RESULT " + json.dumps({
            "length": a.length, "loss": float(loss.detach()), "step_s": step_s, "forward_s": t_fwd,
            "peak_gb_per_rank": [x["peak_gb"] for x in peaks], "built_gb_per_rank": [x["built_gb"] for x in peaks],
            "peak_gb": sum(x["peak_gb"] for x in peaks), "threads": torch.get_num_threads(),
        }), flush=True)
    finish_worker()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
@dataclass
class Attempt:
    mode: str
    length: int
    ok: bool
    reason: str = ""
    step_s: float | None = None
    peak_gb: float | None = None
    peak_gb_per_rank: list | None = None
    min_available_gb: float | None = None
    wall_s: float = 0.0


def command_for(mode: str, length: int, args) -> list[str]:
    sp, ds = MODES[mode]
    worker_args = ["--length", str(length), "--size", args.size, "--vocab-size", str(args.vocab_size),
                   "--sequence-parallel", str(sp), "--activation-checkpointing", args.activation_checkpointing,
                   "--max-steps", "1", "--batch-size", "1", "--seed", "0", "--out", str(Path(args.out) / "work")]
    if ds:
        worker_args += ["--deepspeed", _ds_config_path(ds)]
    if args.release_memory:
        worker_args.append("--release-memory")
    if sp > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(sp), "--master_port",
                str(free_port()), "-m", "littlebird_ds.bench.scale", "--worker", *worker_args]
    return [sys.executable, "-m", "littlebird_ds.bench.scale", "--worker", *worker_args]


def attempt(mode: str, length: int, args, log) -> Attempt:
    cmd = command_for(mode, length, args)
    # Each launch is its own process group: drop a group description this process may carry
    # (torchrun sets its own for sp > 1; a single worker starts a fresh 1-process group).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(x) or log.write(x) for x in proc.stdout], daemon=True)
    reader.start()
    low, reason = mem_available_gb(), ""
    while proc.poll() is None:
        avail = mem_available_gb()
        low = min(low, avail)
        if avail < args.reserve_gb:
            reason = f"out of memory (available memory fell under {args.reserve_gb} GB)"
        elif time.time() - t0 > args.time_limit_s:
            reason = f"over the time limit ({args.time_limit_s:.0f} s)"
        if reason:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    log.flush()
    wall = time.time() - t0
    result = next((json.loads(x.split("SCALE_RESULT ", 1)[1]) for x in lines if "SCALE_RESULT " in x), None)
    if result is None:
        if not reason:
            reason = ("out of memory (killed by the kernel)" if proc.returncode in (-9, 137)
                      else f"failed (exit {proc.returncode}); see {Path(args.out) / 'scale.log'}")
        return Attempt(mode, length, False, reason, min_available_gb=low, wall_s=wall)
    return Attempt(mode, length, True, "", result["step_s"], result["peak_gb"], result["peak_gb_per_rank"], low, wall)


def search(mode: str, args, log, on_attempt) -> list[Attempt]:
    """Double from ``--start`` until a step fails (or ``--max-length``), then bisect ``--refine`` times."""
    sp, _ = MODES[mode]
    gran = args.granularity * sp
    tried: list[Attempt] = []
    length, good, bad = args.start, None, None
    while length <= args.max_length:
        at = attempt(mode, length, args, log)
        tried.append(at)
        on_attempt(at)
        if not at.ok:
            bad = length
            break
        good = length
        length *= 2
    for _ in range(args.refine if good and bad else 0):
        mid = (good + bad) // 2 // gran * gran
        if mid <= good or mid >= bad:
            break
        at = attempt(mode, mid, args, log)
        tried.append(at)
        on_attempt(at)
        good, bad = (mid, bad) if at.ok else (good, mid)
    return tried


def summarise(attempts: list[Attempt], total_gb: float, reserve_gb: float) -> dict:
    import numpy as np

    out = {}
    for mode in dict.fromkeys(a.mode for a in attempts):
        mine = [a for a in attempts if a.mode == mode]
        ok = [a for a in mine if a.ok]
        failed = [a for a in mine if not a.ok]
        row = {"longest_ok": max((a.length for a in ok), default=None),
               "shortest_failed": min((a.length for a in failed), default=None),
               "failure": next((a.reason for a in sorted(failed, key=lambda a: a.length)), None)}
        best = max(ok, key=lambda a: a.length) if ok else None
        if best:
            row.update(step_s=best.step_s, peak_gb=best.peak_gb, peak_gb_per_rank=best.peak_gb_per_rank)
        if len(ok) >= 2:
            # The line through the two longest steps that fit: at short lengths the peak is the
            # optimizer step's (model states, flat in length), which would bend a fit of all points.
            top = sorted(ok, key=lambda a: a.length)[-2:]
            x = np.array([a.length for a in top], dtype=float)
            y = np.array([a.peak_gb for a in top], dtype=float)
            slope, intercept = np.polyfit(x, y, 1)
            row["gb_per_1k_tokens"] = slope * 1024
            row["fixed_gb"] = intercept
            if y[1] > 1.1 * y[0]:  # else the activations do not show yet: no projection
                row["projected_max_length"] = int((total_gb - reserve_gb - intercept) / slope)
        out[mode] = row
    return out


def markdown(summary: dict, attempts: list[Attempt], command: str, total_gb: float) -> str:
    lines = [f"Machine memory {total_gb:.1f} GB. Command: `{command}`", "",
             "| mode | longest step that fit | step time | peak memory (all ranks) | per rank | next length tried | projected limit |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, r in summary.items():
        per = ", ".join(f"{x:.1f}" for x in r.get("peak_gb_per_rank") or [])
        nxt = f"{r['shortest_failed']:,}: {r['failure']}" if r.get("shortest_failed") else "-"
        proj = f"~{r['projected_max_length']:,}" if r.get("projected_max_length") else "-"
        lines.append(f"| {mode} | {r['longest_ok'] or 0:,} | {r.get('step_s') or 0:.0f} s | {r.get('peak_gb') or 0:.1f} GB "
                     f"| {per} GB | {nxt} | {proj} |")
    lines += ["", "| mode | length | fit | step time | peak memory | lowest available memory during the step |",
              "| --- | --- | --- | --- | --- | --- |"]
    for a in attempts:
        lines.append(f"| {a.mode} | {a.length:,} | {'yes' if a.ok else 'no: ' + a.reason} | "
                     f"{'%.0f s' % a.step_s if a.step_s else '-'} | {'%.1f GB' % a.peak_gb if a.peak_gb else '-'} | "
                     f"{'%.1f GB' % a.min_available_gb if a.min_available_gb is not None else '-'} |")
    return "\n".join(lines) + "\n"


def plot(attempts: list[Attempt], total_gb: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(a.mode for a in attempts):
        ok = sorted((a for a in attempts if a.mode == mode and a.ok), key=lambda a: a.length)
        if ok:
            ax1.plot([a.length for a in ok], [a.peak_gb for a in ok], "o-", label=mode)
            ax2.plot([a.length for a in ok], [a.step_s for a in ok], "o-", label=mode)
        for a in attempts:
            if a.mode == mode and not a.ok:
                ax1.axvline(a.length, ls=":", lw=0.8, color=ax1.lines[-1].get_color() if ok else "gray")
    ax1.axhline(total_gb, color="k", lw=0.8, ls="--", label="machine memory")
    ax1.set(xlabel="document length (tokens)", ylabel="peak memory, all ranks (GB)", xscale="log", yscale="log",
            title="one training step (dotted: first length that did not fit)")
    ax2.set(xlabel="document length (tokens)", ylabel="step time (s)", xscale="log", yscale="log", title="step time")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default="sp1,sp2,zero3-offload",
                   help=f"comma-separated, of {', '.join(MODES)} (default sp1,sp2,zero3-offload)")
    p.add_argument("--size", default="base", choices=sorted(SIZES), help="model size (default base: 768/12/12/3072)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--activation-checkpointing", default="full", choices=["none", "full", "every_k"])
    p.add_argument("--start", type=int, default=8192, help="first length (default 8192)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated lengths to try instead of the search (every one is run)")
    p.add_argument("--max-length", type=int, default=1 << 20, help="stop doubling past this length")
    p.add_argument("--refine", type=int, default=2, help="bisection steps after the first failure (default 2)")
    p.add_argument("--granularity", type=int, default=4096, help="bisect on multiples of this x SP (default 4096)")
    p.add_argument("--reserve-gb", type=float, default=0.75,
                   help="stop a step when the machine's available memory falls under this (default 0.75)")
    p.add_argument("--time-limit-s", type=float, default=3600, help="stop a step after this long (default 3600)")
    p.add_argument("--threads", type=int, default=0, help="OMP threads per rank (default: torch's choice)")
    p.add_argument("--release-memory", action="store_true",
                   help="the training engine's --release-memory (freed activations go back to the OS at once)")
    p.add_argument("--append", action="store_true",
                   help="add to --out's earlier scale.json (a mode and length tried again replaces the earlier try)")
    p.add_argument("--report-only", action="store_true", help="measure nothing: rewrite --out's summary, table and plot")
    p.add_argument("--out", default="runs/scale")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv), command="python -m littlebird_ds.bench.scale " + " ".join(argv))


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """The driver: every mode's search (or ``--lengths``), written to ``--out`` as it goes."""
    command = command or "littlebird-ds scale"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        _ds_config_path(MODES[m][1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = mem_total_gb()
    attempts: list[Attempt] = []
    if args.report_only:
        if not (out / "scale.json").is_file():
            raise SystemExit(f"--report-only: {out / 'scale.json'} does not exist")
        args.append, args.lengths, modes = True, None, []
    if args.append and (out / "scale.json").is_file():  # keep earlier runs, except what is tried again now
        prev = json.loads((out / "scale.json").read_text())
        again = {(m, n) for m in modes for n in (int(x) for x in (args.lengths or "").split(",") if x)}
        attempts = [Attempt(**a) for a in prev["attempts"] if (a["mode"], a["length"]) not in again]
        command = prev["command"] + " ; " + command
    from tqdm.auto import tqdm

    bar = tqdm(desc="scale", unit="step")

    def record(at: Attempt) -> None:
        attempts.append(at)
        bar.update(1)
        bar.set_postfix_str(f"{at.mode} {at.length:,}: {'fit' if at.ok else 'no'}")
        summary = summarise(attempts, total, args.reserve_gb)
        atomic_write_text(out / "scale.json", json.dumps({"command": command, "machine_gb": total, "summary": summary,
                                                      "attempts": [a.__dict__ for a in attempts]}, indent=2))
        atomic_write_text(out / "scale.md", markdown(summary, attempts, command, total))
        plot(attempts, total, out / "scale.png")

    if args.report_only:  # measure nothing: rewrite the summary, table and plot of --out's scale.json
        summary = summarise(attempts, total, args.reserve_gb)
        atomic_write_text(out / "scale.json", json.dumps({"command": prev["command"], "machine_gb": total, "summary": summary,
                                                      "attempts": [a.__dict__ for a in attempts]}, indent=2))
        atomic_write_text(out / "scale.md", markdown(summary, attempts, prev["command"], total))
        plot(attempts, total, out / "scale.png")
        print((out / "scale.md").read_text())
        return 0
    with open(out / "scale.log", "a") as log:
        for mode in modes:
            if args.lengths:
                for n in sorted(int(x) for x in args.lengths.split(",")):
                    record(attempt(mode, n, args, log))
            else:
                search(mode, args, log, record)
    bar.close()
    print((out / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
