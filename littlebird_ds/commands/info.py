"""Show versions, the attention kernels available on this machine, and the device.

Versions are read from package metadata, so nothing heavy (deepspeed) is imported.
"""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata

PACKAGES = ("littlebird-ds", "torch", "transformers", "safetensors", "tokenizers", "sentencepiece",
            "datasets", "deepspeed", "accelerate")


def collect() -> dict:
    import torch

    from littlebird_ds.model.attention import available_kernels, select_default_kernel

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    kernels = {
        dev: {
            mode: {"available": available_kernels(dev, mode == "training"),
                   "auto": select_default_kernel(dev, mode == "training")}
            for mode in ("training", "inference")
        }
        for dev in devices
    }
    device = {
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    return {"versions": versions, "attention_kernels": kernels, "device": device}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for k, v in info["versions"].items():
        print(f"  {k:14s} {v or 'not installed'}")
    print("attention kernels (auto choice first):")
    for dev, modes in info["attention_kernels"].items():
        for mode, k in modes.items():
            print(f"  {dev:5s} {mode:9s} auto={k['auto']:6s} available={', '.join(k['available'])}")
    d = info["device"]
    gpus = ", ".join(d["gpus"]) if d["gpus"] else "none"
    print(f"device: python {d['python']}, {d['cpu_threads']} CPU threads, CUDA {'yes' if d['cuda'] else 'no'} (GPUs: {gpus})")
    return 0
