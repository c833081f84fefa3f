"""Build a small LittleBird and read one long document through it, printing time and memory.

A smoke test of the install on any machine: a randomly initialised encoder (hidden 256,
4 layers, 4 heads, block 64, pack 64) reads a 32,768-token document in one forward pass,
then takes one training step (forward + backward) on it unless ``--no-train``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--length", type=int, default=32768, help="document length in tokens (default 32768)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    import littlebird_ds as lb
    from littlebird_ds.model.attention import select_default_kernel

    if args.length < 1:
        raise SystemExit("--length must be >= 1")
    torch.manual_seed(args.seed)
    cfg = lb.LittleBirdConfig(vocab_size=8000, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size)
    model = lb.LittleBirdForMaskedLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(5, cfg.vocab_size, (1, args.length))
    ids[0, 0] = 2
    base = _peak_rss_mib()
    print(f"LittleBird: {n_params / 1e6:.1f}M parameters, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
          f"block {cfg.block_size}, pack {cfg.pack_size}; document of {args.length:,} tokens; "
          f"{torch.get_num_threads()} CPU threads")
    model.eval()
    with torch.no_grad():
        t = time.perf_counter()
        out = model.littlebird(ids)
        dt = time.perf_counter() - t
    finite = bool(torch.isfinite(out.last_hidden_state).all())
    print(f"inference ({select_default_kernel('cpu', False)} kernel): {dt:.2f} s, "
          f"{args.length / dt:,.0f} tokens/s, output {tuple(out.last_hidden_state.shape)}, finite={finite}, "
          f"peak memory +{_peak_rss_mib() - base:,.0f} MiB")
    if not args.no_train:
        model.train()
        labels = torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, -100))
        t = time.perf_counter()
        loss = model(ids, labels=labels, masked_logits_only=True).loss  # vocabulary logits at masked tokens only
        loss.backward()
        dt = time.perf_counter() - t
        print(f"training step ({select_default_kernel('cpu', True)} kernel): {dt:.2f} s, loss {loss.item():.3f}, "
              f"peak memory +{_peak_rss_mib() - base:,.0f} MiB")
    return 0 if finite else 1
