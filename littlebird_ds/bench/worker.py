"""One benchmark configuration in a fresh process; prints one JSON line.

    python -m littlebird_ds.bench.worker --system bigbird --length 4096 --size default

Memory: Linux keeps each process's resident high-water mark (``VmHWM`` in
``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
resident size. The baseline is the resident size after the model and its input are built.
For each mode (inference, then training) one untimed warm-up step runs first (it allocates
gradients, and compiles where a kernel compiles), the high-water mark is reset, the timed
steps run, and the step's peak memory is ``VmHWM - baseline``. So a step is charged for
everything it holds at its peak beyond the built model, including what earlier steps left
resident (gradient buffers, compiled code, allocator caches), the same way for every system.
Where ``clear_refs`` is not writable, the high-water mark is not reset and memory is
reported as the process-lifetime peak (flagged ``hwm_reset: false``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(system: str, length: int, size_name: str, kernel: str, modes: list[str], steps: int, threads: int,
            release_memory: bool = False) -> dict:
    import torch

    if release_memory:  # before anything large is allocated
        from littlebird_ds.train.distributed import release_freed_memory

        release_memory = release_freed_memory()

    from .flops import matmul_rate
    from .systems import Size, build

    torch.set_num_threads(threads)
    preloaded = os.environ.get("LD_PRELOAD", "")  # the runner's --allocator, if any
    if system == "matmul":
        return {"system": "matmul", "length": length, "flops_per_s": matmul_rate(), "preloaded": preloaded}
    torch.manual_seed(0)
    model, inputs = build(system, Size.named(size_name), length, kernel)
    gc.collect()
    baseline_kb = _status_kb("VmRSS")
    result: dict = {"system": system, "length": length, "size": size_name, "kernel": kernel, "threads": threads,
                    "release_memory": release_memory, "preloaded": preloaded}

    def infer_step():
        model.eval()
        with torch.no_grad():
            model(**inputs)

    def train_step():
        model.train()
        out = model(**inputs)
        out.last_hidden_state.float().mean().backward()
        model.zero_grad(set_to_none=True)  # every step allocates its gradients anew

    for mode, step in (("infer", infer_step), ("train", train_step)):
        if mode not in modes:
            continue
        step()  # warm-up
        gc.collect()
        reset = _reset_hwm()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        result[mode] = {
            "times_s": times,
            "median_s": statistics.median(times),
            "peak_bytes": (_status_kb("VmHWM") - baseline_kb) * 1024,
            "hwm_reset": reset,
        }
    if system == "littlebird":
        from littlebird_ds.model.attention import select_default_kernel

        name = kernel if kernel != "auto" else None
        result["kernels"] = {m: name or select_default_kernel("cpu", m == "train") for m in modes}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--system", required=True)
    p.add_argument("--length", type=int, default=0)
    p.add_argument("--size", default="default")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--release-memory", action="store_true")
    a = p.parse_args(argv)
    res = measure(a.system, a.length, a.size, a.kernel, a.modes.split(","), a.steps, a.threads, a.release_memory)
    sys.stdout.write("BENCH_RESULT " + json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
