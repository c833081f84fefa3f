"""The console commands under the documented launchers, run as users type them, against one process.

Each test starts ``littlebird-ds`` subcommands the way launch/README.md and docs/scale.md show
(``launch/deepspeed_multinode.sh --module littlebird_ds.cli pretrain ...`` on two simulated
nodes, ``launch/torchrun.sh -m littlebird_ds.cli pretrain --tensor-parallel 2 ...``), on a
slice of the Chichewa Bible with a tiny model, and compares every logged training loss and
evaluation with a one-process run of the same global batch (``--grad-accum`` standing in
for the data-parallel ranks), and the exported models' weights.

Tolerance 1e-5 (fp32): the runs add the same per-micro-batch terms in another order (gloo
all-reduce against gradient accumulation, vocabulary- or sequence-sharded sums against
whole ones), which moves the last bits only; measured differences are below 1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, launch_env, run_together

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TIMEOUT = 300
ATOL = 1e-5

# Dropout on for data parallelism: masks must follow the micro-batch, not the rank. Tensor and
# sequence parallelism draw attention-dropout masks per head shard (as Megatron does), so their
# comparison with one process runs without dropout.


def _check(p: subprocess.CompletedProcess, what: str) -> None:
    assert p.returncode == 0, f"{what}: exit {p.returncode}\nstdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-6000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``corpus/`` (three books), ``tok/`` (unigram, 1000 ids), ``model_drop.yaml`` and
    ``model_nodrop.yaml``: the parity benchmark's pretraining inputs."""
    from littlebird_ds.bench.parity import prepare_pretraining

    return prepare_pretraining(tmp_path_factory.mktemp("launch"))


def _pretrain_args(d: Path, out: Path, model: str = "model_drop.yaml") -> list[str]:
    return ["pretrain", "--preset", str(d / model), "--tokenizer", str(d / "tok"), "--corpus", str(d / "corpus"),
            "--validation-fraction", "0.2", "--max-length", "64", "--eval-examples", "16", "--max-steps", "4",
            "--eval-every", "2", "--log-every", "1", "--lr", "2e-3", "--warmup-steps", "1", "--out", str(out)]


def _one_process(args: list[str]) -> None:
    p = subprocess.run([sys.executable, "-m", "littlebird_ds.cli", *args], env=launch_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT)
    _check(p, "one process")


def _records(out: Path) -> tuple[dict[int, float], dict[int, tuple[float, float]]]:
    """Training losses and (eval_loss, eval_accuracy) by step, from OUT/metrics.jsonl."""
    train, evals = {}, {}
    for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if "loss" in r:
            train[r["step"]] = r["loss"]
        if "eval_loss" in r:
            evals[r["step"]] = (r["eval_loss"], r["eval_accuracy"])
    return train, evals


def _assert_same_run(out: Path, ref: Path) -> None:
    (t, e), (rt, re) = _records(out), _records(ref)
    assert sorted(t) == sorted(rt) == [1, 2, 3, 4] and sorted(e) == sorted(re) == [0, 2, 4], (t, e)
    for s in rt:
        assert abs(t[s] - rt[s]) <= ATOL, f"step {s}: loss {t[s]!r} vs one process {rt[s]!r}"
    for s in re:
        assert abs(e[s][0] - re[s][0]) <= ATOL and abs(e[s][1] - re[s][1]) <= ATOL, (s, e[s], re[s])
    assert rt[4] < rt[1], rt  # it trains
    from safetensors.torch import load_file

    a, b = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=lambda m: f"exported {k}: {m}")


@pytest.fixture(scope="module")
def reference_accum2(data, tmp_path_factory) -> Path:
    """One process, micro-batch 2 x --grad-accum 2: the global batch of two data-parallel ranks."""
    out = tmp_path_factory.mktemp("ref_accum2") / "run"
    _one_process([*_pretrain_args(data, out), "--batch-size", "2", "--grad-accum", "2"])
    return out


@pytest.fixture(scope="module")
def reference_nodrop(data, tmp_path_factory) -> Path:
    """One process, micro-batch 2, no dropout: the reference of tensor and sequence parallelism."""
    out = tmp_path_factory.mktemp("ref_nodrop") / "run"
    _one_process([*_pretrain_args(data, out, "model_nodrop.yaml"), "--batch-size", "2"])
    return out


def test_deepspeed_launcher_on_two_nodes_pretrains_as_one_process(data, reference_accum2, tmp_path):
    """launch/deepspeed_multinode.sh on two simulated nodes (launch/hostfile, --no_ssh, loopback),
    one process each, with the Megatron-style ``--deepspeed --deepspeed_config`` flags: the
    launcher puts ``--local_rank=N`` before the subcommand. Before the fix each node printed the
    help and exited 0 without a step; and with span masks from a generator seeded alike on every
    rank, two ranks did not see one process's masks."""
    port = str(free_port())
    out = tmp_path / "run"
    args = [*_pretrain_args(data, out), "--batch-size", "2", "--deepspeed", "--deepspeed_config",
            str(ROOT / "ds_configs" / "zero2_fp32.json")]
    run_together([(["bash", str(LAUNCH / "deepspeed_multinode.sh"), "--module", "littlebird_ds.cli", *args],
                   launch_env(NODE_RANK=str(r), NPROC_PER_NODE="1", MASTER_PORT=port)) for r in (0, 1)],
                 "deepspeed_multinode.sh", TIMEOUT)
    meta = json.loads((out / "checkpoints" / "step_00000004" / "littlebird_checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2
    _assert_same_run(out, reference_accum2)


@pytest.mark.parametrize("flag", ["--tensor-parallel", "--sequence-parallel"])
def test_torchrun_model_parallel_2_pretrains_as_one_process(data, reference_nodrop, tmp_path, flag):
    """``launch/torchrun.sh -m littlebird_ds.cli pretrain --tensor-parallel 2`` (and
    ``--sequence-parallel 2``): before the fix TP crashed at its first evaluation (a vocabulary
    shard read as the whole vocabulary) and SP at its first step (one rank's masked tokens read
    as the batch's)."""
    out = tmp_path / "run"
    p = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "-m", "littlebird_ds.cli",
                        *_pretrain_args(data, out, "model_nodrop.yaml"), "--batch-size", "2", flag, "2"],
                       env=launch_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())), cwd=ROOT, capture_output=True,
                       text=True, timeout=TIMEOUT)
    _check(p, f"torchrun {flag} 2")
    _assert_same_run(out, reference_nodrop)


# ------------------------------------------------------------------------------------------
# The command line: launcher conventions and runs that would train nothing
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", [["--local_rank=1"], ["--local-rank", "1"], ["--local_rank", "1"]])
def test_cli_takes_the_launchers_local_rank_anywhere(spelling, monkeypatch, capsys):
    from littlebird_ds.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main([*spelling, "info", "--json"]) == 0  # before the subcommand, as the deepspeed launcher puts it
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.delenv("LOCAL_RANK")
    assert main(["info", *spelling, "--json"]) == 0
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setenv("LOCAL_RANK", "0")  # a launcher's environment wins
    assert main([*spelling, "info", "--json"]) == 0
    assert os.environ["LOCAL_RANK"] == "0"


def test_cli_with_only_launcher_arguments_and_no_command_fails(capsys):
    from littlebird_ds.cli import main

    assert main(["--local_rank=0"]) == 1
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "0"], "--max-steps 0 must be >= 1"),
    (["--max-steps", "-5"], "--max-steps -5 must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--deepspeed"], "--deepspeed without a path needs --deepspeed_config"),
    (["--deepspeed", "ds_configs/zero1_fp32.json", "--deepspeed_config", "ds_configs/zero2_fp32.json"],
     "name different configs"),
])
def test_pretrain_that_would_train_nothing_or_is_ambiguous_exits_2_and_writes_nothing(data, tmp_path, capsys,
                                                                                      argv, message):
    from littlebird_ds.cli import main

    out = tmp_path / "run"
    args = [a for a in _pretrain_args(data, out) if a not in ("--max-steps", "4")]
    assert main([*args, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not out.exists()


def test_a_diverged_run_stops_with_one_line_keeps_the_last_good_checkpoint_and_writes_no_model(data, tmp_path):
    out = tmp_path / "run"
    args = [a for a in _pretrain_args(data, out) if a not in ("--lr", "2e-3")]
    p = subprocess.run([sys.executable, "-m", "littlebird_ds.cli", *args, "--lr", "1e10", "--batch-size", "2",
                        "--save-every", "1"], env=launch_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    err = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "training diverged: the loss is nan at step 2" in err[0] and "Traceback" not in p.stderr
    assert "step_00000001" in err[0] and "lower --lr" in err[0]
    assert not (out / "final").exists()
    assert sorted(d.name for d in (out / "checkpoints").glob("step_*")) == ["step_00000001"]


def test_megatron_style_deepspeed_flags_name_the_same_config():
    import argparse

    from littlebird_ds.train.engine import add_training_arguments
    from littlebird_ds.train.ds_config import deepspeed_config_path

    p = add_training_arguments(argparse.ArgumentParser())
    cfg = "ds_configs/zero2_fp32.json"
    for argv in (["--deepspeed", cfg], ["--deepspeed", "--deepspeed_config", cfg], ["--deepspeed_config", cfg],
                 ["--deepspeed-config", cfg], ["--deepspeed", cfg, "--deepspeed_config", cfg]):
        assert deepspeed_config_path(p.parse_args(argv)) == cfg, argv
    assert deepspeed_config_path(p.parse_args([])) is None


# ------------------------------------------------------------------------------------------
# The documented multi-node command lines, as written in launch/README.md
# ------------------------------------------------------------------------------------------
def documented_commands(text: str) -> list[list[str]]:
    """The training command lines of a markdown text: indented code lines, ``\\`` continuations
    joined, that start ``littlebird_ds.cli pretrain``."""
    import shlex

    commands, current = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            current = ""
            continue
        current += " " + line.strip().rstrip("\\")
        if not line.rstrip().endswith("\\"):
            if "littlebird_ds.cli pretrain" in current:
                commands.append(shlex.split(current))
            current = ""
    return commands


def _node(words: list[str]) -> int | None:
    for i, w in enumerate(words):
        if w.startswith("NODE_RANK="):
            return int(w.split("=", 1)[1])
        if w == "--machine_rank":
            return int(words[i + 1])
    return None


def _tiny(words: list[str], data: Path, out: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """A documented command at a tiny size on this machine: loopback, one process per node,
    this test's corpus and tokenizer, 2 steps of 64 tokens, output under ``out``."""
    env, argv = {}, list(words)
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "NPROC_PER_NODE" in env or "deepspeed_multinode.sh" in " ".join(argv):
        env["NPROC_PER_NODE"] = "1"
    swap = {"--main_process_ip": "127.0.0.1", "--main_process_port": str(port), "--tokenizer": str(data / "tok"),
            "--corpus": str(data / "corpus"), "--max-length": "64", "--max-steps": "2", "--out": str(out)}
    for i, w in enumerate(argv[:-1]):
        if w in swap:
            argv[i + 1] = swap[w]
    if argv[0] == "torchrun":  # its own default port would collide with other runs
        argv[1:1] = ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    return argv, env


def _run_together(commands: list[list[str]], data: Path, out: Path, what: str) -> None:
    port = free_port()
    run_together([(argv, launch_env(**env)) for argv, env in (_tiny(w, data, out, port) for w in commands)],
                 what, TIMEOUT)


@pytest.mark.parametrize("doc", ["README.md", "launch/README.md"])
def test_documented_training_command_lines_run_as_written(doc, data, tmp_path):
    """Every ``littlebird_ds.cli pretrain`` command line in the doc runs as written, at a tiny size
    (loopback, one process per node, 2 steps of 64 tokens, this test's corpus and tokenizer):
    two-node pairs (``NODE_RANK=R`` / ``--machine_rank R``) start together. Each trains 2 steps
    with the world size and ZeRO stage its line asks for, and exports a model."""
    commands = documented_commands((ROOT / doc).read_text())
    singles = [c for c in commands if _node(c) is None]
    pairs: dict[str, list[list[str]]] = {}
    for c in commands:
        if _node(c) is not None:
            pairs.setdefault(next(k for k in ("torchrun", "deepspeed", "accelerate") if any(k in w for w in c)), []).append(c)
    assert all(sorted(map(_node, p)) == [0, 1] for p in pairs.values()), pairs
    want = {"README.md": (2, ["deepspeed"]), "launch/README.md": (1, ["accelerate", "deepspeed", "torchrun"])}[doc]
    assert (len(singles), sorted(pairs)) == want, (singles, sorted(pairs))
    runs = [(f"line {i}", [c]) for i, c in enumerate(singles)] + sorted(pairs.items())
    for name, group in runs:
        out = tmp_path / name.replace(" ", "_")
        _run_together(group, data, out, name)
        train, _ = _records(out)
        assert max(train) == 2, (name, train)  # the last step is always logged
        meta = json.loads((out / "checkpoints" / "step_00000002" / "littlebird_checkpoint.json").read_text())
        words = group[0]
        world = int(words[words.index("--nproc_per_node") + 1]) if "--nproc_per_node" in words else len(group)
        assert meta["world_size"] == world, (name, meta)
        stage = 1 if "zero1" in " ".join(words) else 2
        assert meta["zero_stage"] == stage, (name, meta)
        assert (out / "final" / "model.safetensors").exists()
