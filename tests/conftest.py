import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

# Tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The token cache of this test session only (not the user's ~/.cache); subprocesses inherit it.
os.environ.setdefault("LITTLEBIRD_DS_CACHE", tempfile.mkdtemp(prefix="littlebird-test-cache-"))
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


# The tests' free port and launch environment (after the env above).
from littlebird_ds.bench.parity import launch_env  # noqa: E402,F401
from littlebird_ds.utils.io import free_port  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]


def run_together(commands: list[tuple[list[str], dict]], what: str, timeout: float) -> list[subprocess.CompletedProcess]:
    """Start every ``(argv, env)`` at once in the checkout (the nodes or launches of one job), wait
    for all, kill all if one outlasts ``timeout``; each must exit 0 (the message shows its output)."""
    procs = [subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, env in commands]
    results = []
    for r, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert proc.returncode == 0, f"{what} node {r}: exit {proc.returncode}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-6000:]}"
        results.append(subprocess.CompletedProcess(proc.args, 0, out, err))
    return results
