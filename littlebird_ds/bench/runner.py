"""Run the benchmark: lengths ascending; per length, rounds; per round, every system once
(order rotated each round) plus one matmul-rate probe, each in a fresh process.

A system is skipped at a length when its training step, extrapolated from the lengths
already measured (log-log slope of the last two, at least 1), would exceed
``max_step_s``, or its peak memory would exceed ``max_memory_gb``; and after it failed
(error or killed) at a shorter length. Skips are recorded with the reason.
"""

from __future__ import annotations

import ctypes.util
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field


@dataclass
class Plan:
    systems: list[str]  # "littlebird", "bigbird", ...; "littlebird:eager" pins a kernel
    lengths: list[int]
    size: str = "default"
    rounds: int = 3
    steps: int = 2
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_step_s: float = 60.0
    max_memory_gb: float = 16.0
    timeout_s: float = 1800.0
    release_memory: bool = False  # peak memory measured with freed memory handed back to the OS (worker.py)
    allocator: str = ""  # malloc library preloaded into the timed processes ("" = the C library's own)


#: ``--allocator`` names -> (library stems for ``find_library``, the Debian/Ubuntu package).
ALLOCATORS = {"tcmalloc": (("tcmalloc_minimal", "tcmalloc"), "libtcmalloc-minimal4"),
              "jemalloc": (("jemalloc",), "libjemalloc2")}


def resolve_allocator(name: str) -> str:
    """What to preload for ``--allocator NAME``: ``""`` for the C library's own allocator, else
    a library name the dynamic linker finds, or the absolute path given."""
    if name in ("", "default"):
        return ""
    if name in ALLOCATORS:
        stems, package = ALLOCATORS[name]
        for stem in stems:
            found = ctypes.util.find_library(stem)
            if found:
                return found
        raise ValueError(f"--allocator {name}: no lib{stems[0]} found on this machine; install it "
                         f"(Debian/Ubuntu: apt install {package}) or pass the library's path")
    if not os.path.isfile(name):
        raise ValueError(f"--allocator {name!r}: no such file; pass default, tcmalloc, jemalloc or the path of a "
                         "malloc library (a .so file)")
    return os.path.abspath(name)


def split_system(name: str) -> tuple[str, str]:
    """``"littlebird:flex"`` -> ``("littlebird", "flex")``; ``"bigbird"`` -> ``("bigbird", "auto")``."""
    base, _, kernel = name.partition(":")
    return base, kernel or "auto"


def run_worker(name: str, length: int, plan: Plan) -> dict:
    """One configuration. With ``plan.release_memory`` it takes two fresh processes: the steps
    are timed with the C library's default allocator (what a training job gets), and the peak
    memory comes from a second process that hands freed memory back to the OS at once (one
    warm-up and one step per mode; its times are kept as ``release_times_s``). With the
    default allocator, freed activations stay resident and the high-water mark counts them;
    handing them back makes every large tensor cost fresh pages, which slows every system, by
    different amounts (at 16k tokens 7-32% across systems and runs), so neither process alone
    measures both. ``plan.allocator`` is preloaded into the timed process only: the peak is
    always measured with the C library's allocator, which can be told to release."""
    res = _run_worker(name, length, plan, plan.steps, release_memory=False)
    if not plan.release_memory or not ("infer" in res or "train" in res):  # an error, or the matmul probe
        return res
    mem = _run_worker(name, length, plan, 1, release_memory=True)
    if "error" in mem:
        return mem
    res["release_memory"] = mem["release_memory"]
    for mode in ("infer", "train"):
        if mode in res and mode in mem:
            res[mode]["default_allocator_peak_bytes"] = res[mode]["peak_bytes"]
            res[mode]["peak_bytes"] = mem[mode]["peak_bytes"]
            res[mode]["hwm_reset"] = mem[mode]["hwm_reset"]
            res[mode]["release_times_s"] = mem[mode]["times_s"]
    return res


def _run_worker(name: str, length: int, plan: Plan, steps: int, release_memory: bool) -> dict:
    system, kernel = split_system(name)
    cmd = [sys.executable, "-m", "littlebird_ds.bench.worker", "--system", system, "--length", str(length),
           "--size", plan.size, "--kernel", kernel, "--steps", str(steps), "--threads", str(plan.threads)]
    if release_memory:
        cmd.append("--release-memory")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    if plan.allocator and not release_memory:
        env["LD_PRELOAD"] = " ".join(filter(None, [plan.allocator, env.get("LD_PRELOAD", "")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=plan.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"system": name, "length": length, "error": f"timed out after {plan.timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            res = json.loads(line[len("BENCH_RESULT "):])
            res["system"] = name
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"system": name, "length": length, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _predict(points: list[tuple[int, float]], length: int) -> float | None:
    """Extrapolate ``value(length)`` from measured ``(length, value)`` points on log-log axes."""
    if not points:
        return None
    (l1, v1) = points[-1]
    slope = 1.0
    if len(points) >= 2:
        (l0, v0) = points[-2]
        if v0 > 0 and v1 > 0 and l1 != l0:
            slope = max(1.0, math.log(v1 / v0) / math.log(l1 / l0))
    return v1 * (length / l1) ** slope


def skip_reason(name: str, length: int, results: list[dict], plan: Plan) -> str | None:
    mine = [r for r in results if r["system"] == name and r["length"] < length]
    if any("error" in r for r in mine):
        return "failed at a shorter length"
    by_len: dict[int, list[dict]] = {}
    for r in mine:
        if "train" in r:
            by_len.setdefault(r["length"], []).append(r)
    t_pts = [(L, statistics.median(x["train"]["median_s"] for x in rs)) for L, rs in sorted(by_len.items())]
    m_pts = [(L, statistics.median(x["train"]["peak_bytes"] for x in rs) / 1e9) for L, rs in sorted(by_len.items())]
    t, m = _predict(t_pts, length), _predict(m_pts, length)
    if t is not None and t > plan.max_step_s:
        return f"predicted training step {t:.0f} s > --max-step-s {plan.max_step_s:g}"
    if m is not None and m > plan.max_memory_gb:
        return f"predicted peak memory {m:.1f} GB > --max-memory-gb {plan.max_memory_gb:g}"
    return None


def run(plan: Plan, progress: bool = True, on_result=None) -> list[dict]:
    """All measurements, one dict per worker run (or skip), in the order they ran."""
    from tqdm import tqdm

    results: list[dict] = []
    total = len(plan.lengths) * plan.rounds * (len(plan.systems) + 1)
    bar = tqdm(total=total, disable=not progress, unit="run", dynamic_ncols=True)
    for length in plan.lengths:
        skipped = {name: skip_reason(name, length, results, plan) for name in plan.systems}
        for name, why in skipped.items():
            if why:
                results.append({"system": name, "length": length, "skipped": why})
        active = [n for n in plan.systems if not skipped[n]]
        for rnd in range(plan.rounds):
            k = rnd % max(1, len(active))
            order = active[k:] + active[:k] + ["matmul"]  # interleaved, rotated each round
            for name in order:
                bar.set_description(f"{length:>6} tokens, round {rnd + 1}/{plan.rounds}: {name}")
                res = run_worker(name, length, plan)
                res["round"] = rnd
                results.append(res)
                if on_result is not None:
                    on_result(results)
                bar.update(1)
            bar.update(len(plan.systems) - len(active))
    bar.close()
    return results
