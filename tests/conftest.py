import os
import sys
from pathlib import Path

import pytest
import torch

# Tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides):
    from littlebird_ds import LittleBirdConfig

    kw = dict(
        vocab_size=97,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=48,
        block_size=8,
        pack_size=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kw.update(overrides)
    return LittleBirdConfig(**kw)


@pytest.fixture
def tiny():
    return tiny_config


from littlebird_ds.utils.io import free_port  # noqa: E402,F401  (the tests' one free-port helper; after the env above)

ROOT = Path(__file__).resolve().parents[1]


def launch_env(**extra) -> dict:
    """This process's environment for launching workers: no launcher variables of its own, CPU and
    gloo, one thread per process, loopback, this venv's scripts on PATH, the checkout importable."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED",
              "ACCELERATE_USE_CPU"):
        env.pop(k, None)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env
