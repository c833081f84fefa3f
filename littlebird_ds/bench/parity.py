"""Distributed parity: every launcher and parallel layout against one process, through the CLI.

Each *mode* starts the console commands the way launch/README.md shows (``launch/torchrun.sh``,
``launch/deepspeed_multinode.sh`` on two simulated nodes, ``accelerate launch`` with the
shipped multi-node YAML), at a tiny size on this machine over loopback, and each *command*
(``pretrain``, ``distill``, ``finetune-qa``) runs 4 optimiser steps with a global batch of 4
sequences: micro-batches of 2, ``--grad-accum 2 / DP``. The reference is one process with
``--batch-size 2 --grad-accum 2``. A cell holds the largest absolute difference, over every
logged step, of the training loss, of every evaluation metric, and of every exported weight.

Data-parallel layouts keep dropout on (masks follow the global micro-batch, so they must
match); tensor- and sequence-parallel layouts run without dropout, because attention dropout is
drawn per head shard (as Megatron does) and cannot equal one process's masks.

Dimension legend: ``DP`` data-parallel ranks, ``TP`` tensor-parallel, ``SP`` sequence-parallel.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..utils.io import atomic_write_json, free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
DS_CONFIGS = ROOT / "ds_configs"
TOLERANCE = 1e-5
STEPS = 4
COMMANDS = ("pretrain", "distill", "finetune-qa")

MODEL_YAML = """\
hidden_size: 32
num_hidden_layers: 2
num_attention_heads: 2
intermediate_size: 64
block_size: 16
pack_size: 8
hidden_dropout_prob: {p}
attention_probs_dropout_prob: {p}
"""


@dataclass(frozen=True)
class Mode:
    name: str
    launcher: str  # torchrun | torchrun-2nodes | deepspeed-2nodes | accelerate-2nodes
    procs: int  # processes in all
    dp: int  # data-parallel ranks
    ds_config: str = "zero2_fp32.json"
    flags: tuple[str, ...] = ()
    dropout: bool = True

    @property
    def grad_accum(self) -> int:
        return 2 // self.dp


MODES: dict[str, Mode] = {m.name: m for m in [
    Mode("dp2-zero0", "torchrun", 2, 2, "zero0_fp32.json"),
    Mode("dp2-zero1", "torchrun", 2, 2, "zero1_fp32.json"),
    Mode("dp2-zero2", "torchrun", 2, 2, "zero2_fp32.json"),
    Mode("dp2-zero3", "torchrun", 2, 2, "zero3_fp32.json"),
    Mode("dp2-zero2-ac", "torchrun", 2, 2, "zero2_fp32.json", ("--activation-checkpointing", "full")),
    Mode("tp2", "torchrun", 2, 1, "zero1_fp32.json", ("--tensor-parallel", "2"), dropout=False),
    Mode("sp2", "torchrun", 2, 1, "zero1_fp32.json", ("--sequence-parallel", "2"), dropout=False),
    Mode("sp2-zero3", "torchrun", 2, 1, "zero3_fp32.json", ("--sequence-parallel", "2"), dropout=False),
    Mode("tp2xdp2-zero1", "torchrun", 4, 2, "zero1_fp32.json", ("--tensor-parallel", "2"), dropout=False),
    Mode("sp2xdp2-zero2", "torchrun", 4, 2, "zero2_fp32.json", ("--sequence-parallel", "2"), dropout=False),
    Mode("torchrun-2nodes", "torchrun-2nodes", 2, 2, "zero2_fp32.json"),
    Mode("deepspeed-2nodes", "deepspeed-2nodes", 2, 2, "zero2_fp32.json"),
    Mode("accelerate-2nodes", "accelerate-2nodes", 2, 2, "zero2_fp32.json"),
]}


_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR",
                       "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU")


def launch_env(**extra: str) -> dict[str, str]:
    """This environment for launching workers (the tests use it too): no launcher variables of
    its own, CPU and gloo, one thread per process, loopback, this interpreter's scripts on PATH,
    the checkout importable, no hub."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    # The launch scripts call ``python``/``deepspeed``: this interpreter's, as in an activated venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


# ----- data ---------------------------------------------------------------------------------


def prepare_pretraining(data: Path) -> Path:
    """``data/corpus`` (three books of the Chichewa Bible), ``data/tok`` (a 1000-id tokenizer) and
    ``data/model_drop.yaml`` / ``model_nodrop.yaml`` (the tiny model, dropout 0.1 and 0)."""
    from ..data.corpus import load_corpus
    from ..data.tokenizer import train_tokenizer

    (data / "corpus").mkdir(parents=True)
    books = {d.id.rsplit("/", 1)[1]: d.text for d in load_corpus("chichewa-bible")}
    for b in ("06", "07", "08"):
        (data / "corpus" / f"book{b}.txt").write_text(books[b], encoding="utf-8")
    train_tokenizer(data / "corpus", data / "tok", vocab_size=1000)
    for drop in (True, False):
        (data / f"model_{_tag(drop)}.yaml").write_text(MODEL_YAML.format(p=0.1 if drop else 0.0))
    return data


def prepare(data: Path) -> Path:
    """Tiny inputs under ``data`` (made once): :func:`prepare_pretraining`'s, a random BERT
    teacher, random LittleBird masked-LM models to fine-tune, and QA files made by ``make-qa``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from ..config import LittleBirdConfig
    from ..model.modeling import LittleBirdForMaskedLM

    if (data / "DONE").exists():
        return data
    shutil.rmtree(data, ignore_errors=True)
    prepare_pretraining(data)
    tok = AutoTokenizer.from_pretrained(data / "tok")
    for drop in (True, False):
        p = 0.1 if drop else 0.0
        torch.manual_seed(0)
        cfg = LittleBirdConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, block_size=16, pack_size=8, hidden_dropout_prob=p,
                               attention_probs_dropout_prob=p, pad_token_id=tok.pad_token_id)
        LittleBirdForMaskedLM(cfg).save_pretrained(data / f"mlm_{_tag(drop)}")
        tok.save_pretrained(data / f"mlm_{_tag(drop)}")
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                         pad_token_id=tok.pad_token_id))
    teacher.save_pretrained(data / "teacher")
    tok.save_pretrained(data / "teacher")
    _check(subprocess.run([sys.executable, "-m", "littlebird_ds.cli", "make-qa", "--corpus", str(data / "corpus"),
                           "--tokenizer", str(data / "tok"), "--output", str(data / "qa"), "--lengths", "128",
                           "--train-lengths", "64", "--block-size", "16", "--allow-short"],
                          env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=600), "make-qa")
    (data / "DONE").write_text("ok\n")
    return data


def _tag(dropout: bool) -> str:
    return "drop" if dropout else "nodrop"


def command_args(command: str, data: Path, out: Path, dropout: bool) -> list[str]:
    """The tiny command line of ``command`` (no batch or launcher flags)."""
    common = ["--max-steps", str(STEPS), "--log-every", "1", "--eval-every", "2", "--lr", "2e-3",
              "--warmup-steps", "1", "--out", str(out)]
    if command == "pretrain":
        return ["pretrain", "--preset", str(data / f"model_{_tag(dropout)}.yaml"), "--tokenizer", str(data / "tok"),
                "--corpus", str(data / "corpus"), "--validation-fraction", "0.2", "--max-length", "64",
                "--eval-examples", "16", *common]
    if command == "distill":
        return ["distill", "--teacher", str(data / "teacher"), "--corpus", str(data / "corpus"),
                "--validation-fraction", "0.2", "--max-length", "64", "--block-size", "16", "--pack-size", "8",
                "--dropout", "0.1" if dropout else "0", "--eval-examples", "16", *common]
    if command == "finetune-qa":
        return ["finetune-qa", "--model", str(data / f"mlm_{_tag(dropout)}"), "--train", str(data / "qa" / "train-64.json"),
                "--validation", str(data / "qa" / "validation-128.json"), "--max-length", "64", "--stride", "16",
                "--max-eval-examples", "16", *common]
    raise ValueError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")


# ----- runs ---------------------------------------------------------------------------------


def _check(p: subprocess.CompletedProcess, what: str) -> None:
    if p.returncode != 0:
        raise RuntimeError(f"{what}: exit {p.returncode}\n{p.stderr[-3000:]}")


def _cli_prefix(mode: Mode, node: int, port: int) -> tuple[list[str], dict[str, str]]:
    """The launcher's command (ending where ``littlebird_ds.cli``'s arguments start) and environment."""
    if mode.launcher == "torchrun":
        return (["bash", str(LAUNCH / "torchrun.sh"), "-m", "littlebird_ds.cli"],
                launch_env(NPROC_PER_NODE=str(mode.procs), MASTER_PORT=str(port)))
    if mode.launcher == "torchrun-2nodes":
        return (["bash", str(LAUNCH / "torchrun.sh"), "-m", "littlebird_ds.cli"],
                launch_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE=str(mode.procs // 2), MASTER_PORT=str(port)))
    if mode.launcher == "deepspeed-2nodes":
        return (["bash", str(LAUNCH / "deepspeed_multinode.sh"), "--module", "littlebird_ds.cli"],
                launch_env(NODE_RANK=str(node), NPROC_PER_NODE=str(mode.procs // 2), MASTER_PORT=str(port)))
    if mode.launcher == "accelerate-2nodes":
        return ([str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                 str(LAUNCH / "accelerate_zero2_multinode.yaml"), "--machine_rank", str(node), "--main_process_ip",
                 "127.0.0.1", "--main_process_port", str(port), "-m", "littlebird_ds.cli"], launch_env())
    raise ValueError(f"unknown launcher {mode.launcher!r}")


def run_mode(mode: Mode, command: str, data: Path, out: Path, timeout: int = 900) -> None:
    """Run ``command`` under ``mode``'s launcher (both simulated nodes at once for 2-node modes)."""
    args = command_args(command, data, out, mode.dropout) + ["--batch-size", "2", "--grad-accum", str(mode.grad_accum),
                                                           *mode.flags]
    if mode.launcher != "accelerate-2nodes":  # accelerate's YAML names its DeepSpeed config
        args += ["--deepspeed", "--deepspeed_config", str(DS_CONFIGS / mode.ds_config)]
    port = free_port()
    nodes = 2 if mode.launcher.endswith("2nodes") else 1
    procs = []
    for node in range(nodes):
        prefix, env = _cli_prefix(mode, node, port)
        log = open(out.parent / f"{out.name}.node{node}.log", "w")
        procs.append((subprocess.Popen([*prefix, *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    failed = None
    for node, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log.close()
        if rc != 0 and failed is None:
            failed = (node, rc)
    if failed is not None:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
        lines = (out.parent / f"{out.name}.node{failed[0]}.log").read_text(errors="replace").splitlines()
        said = [ln for ln in lines if ": error: " in ln and not ln.startswith("[")]  # the command's one line
        raise RuntimeError(f"node {failed[0]} exit {failed[1]}: " + " | ".join(said[:1] or lines[-15:]))


def run_reference(command: str, data: Path, out: Path, dropout: bool, timeout: int = 900) -> None:
    args = command_args(command, data, out, dropout) + ["--batch-size", "2", "--grad-accum", "2"]
    _check(subprocess.run([sys.executable, "-m", "littlebird_ds.cli", *args], env=launch_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout), f"one process {command}")


# ----- comparison ---------------------------------------------------------------------------

def _compared(key: str) -> bool:
    return key.startswith("eval_") and not key.endswith("seconds")  # timings are not results


def _zero_gradient_keys(keys) -> set[str]:
    """Parameters whose gradient is zero in exact arithmetic: the QA head's bias and the last
    layer's output LayerNorm bias shift every position's start (end) logit by the same amount,
    and the softmax over positions does not change. Their gradients are rounding noise, which
    Adam normalises to steps of size ``lr``, so two runs that add in another order leave them
    apart by up to ``lr`` while every other weight agrees to 1e-6. Reported separately."""
    if "qa_outputs.bias" not in keys:
        return set()
    layers = [int(k.split(".")[2]) for k in keys if k.startswith("littlebird.layers.")]
    return {"qa_outputs.bias", f"littlebird.layers.{max(layers)}.output_LayerNorm.bias"}


def _records(out: Path) -> tuple[dict[int, float], dict[tuple[int, str], float]]:
    train, evals = {}, {}
    for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if "loss" in r:
            train[r["step"]] = float(r["loss"])
        for k, v in r.items():
            if _compared(k) and isinstance(v, (int, float)):
                evals[(r["step"], k)] = float(v)
    return train, evals


def compare(out: Path, ref: Path) -> dict:
    """Largest |difference| of training losses, evaluation metrics and exported weights."""
    from safetensors.torch import load_file

    (t, e), (rt, re_) = _records(out), _records(ref)
    if sorted(t) != sorted(rt) or sorted(e) != sorted(re_):
        return {"status": "different steps", "loss": math.inf, "eval": math.inf, "weights": math.inf}
    loss = max(abs(t[s] - rt[s]) for s in rt)
    ev = max((abs(e[k] - re_[k]) for k in re_), default=0.0)
    a, b = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    if sorted(a) != sorted(b):
        return {"status": "different weights", "loss": loss, "eval": ev, "weights": math.inf}
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in b}
    noise = _zero_gradient_keys(diff)
    w = max(v for k, v in diff.items() if k not in noise)
    worst = max(loss, ev, w)
    ok = worst <= TOLERANCE and rt[max(rt)] < rt[min(rt)]
    return {"status": "ok" if ok else ("differs" if worst > TOLERANCE else "did not train"), "loss": loss,
            "eval": ev, "weights": w, "zero_gradient_weights": max((diff[k] for k in noise), default=None),
            "evals_compared": len(re_), "losses": {s: (t[s], rt[s]) for s in rt}}


def run_table(out: Path, modes: list[str], commands: list[str], echo=print) -> list[dict]:
    """Every (mode, command) cell; results also in ``out/parity.json`` after each cell."""
    data = prepare(out / "data")
    rows = []
    refs: dict[tuple[str, bool], Path] = {}
    for command in commands:
        for name in modes:
            mode = MODES[name]
            key = (command, mode.dropout)
            if key not in refs:
                refs[key] = out / "reference" / f"{command}-{_tag(mode.dropout)}"
                shutil.rmtree(refs[key], ignore_errors=True)
                refs[key].parent.mkdir(parents=True, exist_ok=True)
                run_reference(command, data, refs[key], mode.dropout)  # a failing reference stops the table
            run_out = out / "runs" / f"{command}-{name}"
            shutil.rmtree(run_out, ignore_errors=True)
            run_out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            try:
                run_mode(mode, command, data, run_out)
                cell = compare(run_out, refs[key])
            except (RuntimeError, OSError, ValueError) as e:
                # A layout the engine refuses with a reason (one line, exit 2) is reported as such.
                refused = "is not supported" in str(e)
                cell = {"status": "refused" if refused else "error", "error": str(e)[-600:], "loss": None,
                        "eval": None, "weights": None}
            cell.update(mode=name, command=command, seconds=round(time.perf_counter() - t0, 1))
            rows.append(cell)
            echo(format_row(cell))
            atomic_write_json(out / "parity.json", rows, indent=1, default=str)
    return rows


def format_row(c: dict) -> str:
    def f(x):
        return "-" if x is None else ("inf" if x == math.inf else f"{x:.1e}")
    return (f"| {c['mode']:<18} | {c['command']:<11} | {f(c.get('loss'))} | {f(c.get('eval'))} | {f(c.get('weights'))} "
            f"| {f(c.get('zero_gradient_weights'))} | {c['status']} |")


def markdown(rows: list[dict]) -> str:
    head = ("| mode | command | max abs loss diff | max abs eval diff | max abs weight diff | zero-gradient weights | status |\n"
            "|---|---|---|---|---|---|---|\n")
    return head + "\n".join(format_row(r) for r in rows) + "\n"
