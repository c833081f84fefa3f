"""GPU check of the attention kernels: flex vs eager/blocked parity in bf16, then timings.

    python experiments/gpu_check.py                 # on a GPU machine, under 5 minutes
    python experiments/gpu_check.py --device cpu --lengths 512 --parity-length 256   # logic smoke test

1. Parity (bf16 inputs, fp32 ``eager`` as the reference): outputs and input gradients of
   ``flex`` and ``blocked`` against ``eager`` run in fp32 on the same bf16-rounded inputs, at
   ``--parity-length`` with a padded second sequence. Tolerance: bf16 (2e-2 relative to the
   largest reference value), the kernels' own rounding differs.
2. Timing: attention kernel alone (B=1, H=4, dh=64, b=s=64, bf16), forward and
   forward+backward, at each of ``--lengths`` (default 16k, 32k, 64k), median of 5 after
   warm-up (flex compiles once per length bucket), and peak GPU memory of each.
Prints a markdown table; exits 1 if parity fails. Where backward is unavailable (flex on
CPU) only the forward is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from littlebird_ds.model.attention import get_kernel  # noqa: E402
from littlebird_ds.model.bialibi import BiALiBi  # noqa: E402
from littlebird_ds.model.layout import BlockLayout  # noqa: E402


def inputs(lengths, heads, dh, block, pack, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, l = len(lengths), max(lengths)
    mask = torch.zeros(B, l, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    layout = BlockLayout.build(mask.to(device), block)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    t = [rnd(B, heads, l, dh) for _ in range(3)] + [rnd(B, heads, pack, dh) for _ in range(2)]
    bialibi = BiALiBi(heads).to(device)
    return t, bialibi.slopes(), layout, mask.to(device)


def run_kernel(name, tensors, slopes, layout, device, backward, dout=None):
    fn = get_kernel(name, device.type, training=backward)
    ts = [x.detach().requires_grad_(backward) for x in tensors]
    with torch.set_grad_enabled(backward):
        out = fn(*ts, slopes, layout)
        grads = None
        if backward:
            grads = torch.autograd.grad(out, ts, dout if dout is not None else torch.ones_like(out))
    return out.detach(), grads


def parity(args, device) -> bool:
    tensors, slopes, layout, mask = inputs([args.parity_length, args.parity_length * 2 // 3], 4, 64, 64, 64,
                                           torch.bfloat16, device)
    train = device.type != "cpu"
    real = mask.bool().view(mask.shape[0], 1, -1, 1)
    dout = torch.randn(tensors[0].shape, device=device, dtype=torch.bfloat16) * real
    ref_out, ref_grads = run_kernel("eager", [t.float() for t in tensors], slopes, layout, device, train, dout.float())
    ok = True
    print(f"## Parity at {args.parity_length} tokens (bf16 vs fp32 eager){'' if train else ', forward only'}\n")
    print("| kernel | max out err / max | max grad err / max | result |\n|---|---|---|---|")
    for name in ("flex", "blocked"):
        try:
            out, grads = run_kernel(name, tensors, slopes, layout, device, train, dout)
        except ValueError as e:
            print(f"| {name} | unavailable: {e} | | |")
            continue
        o_err = ((out.float() - ref_out) * real).abs().max().item() / ref_out.abs().max().item()
        g_err = 0.0
        if grads is not None:
            g_err = max((g.float() - r).abs().max().item() / r.abs().max().item() for g, r in zip(grads, ref_grads))
        good = o_err < 2e-2 and g_err < 2e-2
        ok &= good
        print(f"| {name} | {o_err:.2e} | {g_err:.2e} | {'ok' if good else 'FAIL'} |")
    print()
    return ok


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timing(args, device):
    print("## Attention kernel timings (B=1, H=4, dh=64, b=s=64, bf16)\n")
    print("| length | kernel | forward ms | fwd+bwd ms | peak memory GB |\n|---|---|---|---|---|")
    for L in args.lengths:
        tensors, slopes, layout, _ = inputs([L], 4, 64, 64, 64, torch.bfloat16, device)
        for name in ("flex", "blocked", "eager"):
            row = []
            for backward in (False, True):
                try:
                    get_kernel(name, device.type, backward)
                except ValueError:
                    row.append(None)
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                run_kernel(name, tensors, slopes, layout, device, backward)  # warm-up / compile
                times = []
                for _ in range(args.repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    run_kernel(name, tensors, slopes, layout, device, backward)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                row.append(statistics.median(times) * 1e3)
            mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
            cells = ["-" if x is None else f"{x:.1f}" for x in row]
            print(f"| {L} | {name} | {cells[0]} | {cells[1]} | {mem:.2f} |", flush=True)
    print()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[16384, 32768, 65536])
    p.add_argument("--parity-length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing checked (run on a GPU machine, or --device cpu for a smoke test)")
        return 0
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    t0 = time.time()
    ok = parity(args, device)
    timing(args, device)
    print(f"total {time.time() - t0:.0f} s; parity {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
