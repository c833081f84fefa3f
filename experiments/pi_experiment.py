"""The Padding Insertion experiment: fine-tune twice, with and without Padding Insertion, on
short contexts only, and compare EM/F1 at every context length.

Claim under test (project issue "Language pipeline II"): QA trained on contexts of at most 512
tokens keeps F1 on 4k- and 8k-token contexts within 10 points of its F1 at 512 with Padding
Insertion, and beats the same run without it at those lengths.

:func:`run_pi_experiment` takes a tokenizer directory, a model init (a preset name for random
weights, or a pretrained directory) and a ``make-qa`` output directory (``train-512.json``
and ``{split}-{length}.json`` for the evaluation lengths). Both runs use the same seed, steps,
batches and curriculum; they differ only in ``--no-padding-insertion``. Each run is a
``littlebird-ds finetune-qa`` subprocess (its own process group and DeepSpeed engine); the two
may run side by side. Each ``OUT/final`` is then scored on every length with
:func:`~littlebird_ds.train.qa_eval.evaluate_files`. Results go to ``OUT/pi_results.json``
(atomically) and are returned.

Command line (for the pipeline)::

    python experiments/pi_experiment.py --tokenizer out/tok --qa out/qa \\
        --preset tiny --out out/pi --max-steps 1500 -- --batch-size 16 --lr 1e-3 \\
        --curriculum 128:0.7,256:0.2,512:0.1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from littlebird_ds.train.qa_eval import evaluate_files, load_model_and_tokenizer, write_results
from littlebird_ds.utils.io import atomic_savefig

__all__ = ["run_pi_experiment", "plot_results"]

VARIANTS = ("with_pi", "without_pi")


def _finetune_cmd(variant: str, *, tokenizer: str, model_init: str, train: str, validation: str | None,
                  out: Path, max_steps: int, seed: int, extra: Sequence[str]) -> list[str]:
    init = ["--model", model_init] if Path(model_init).is_dir() else ["--preset", model_init]
    cmd = [sys.executable, "-m", "littlebird_ds.cli", "finetune-qa", *init, "--tokenizer", tokenizer,
           "--train", train, "--max-length", "512", "--max-steps", str(max_steps), "--seed", str(seed),
           "--out", str(out), *extra]
    if validation:
        cmd += ["--validation", validation]
    if variant == "without_pi":
        cmd.append("--no-padding-insertion")
    return cmd


def run_pi_experiment(
    tokenizer: str | os.PathLike[str],
    qa_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model_init: str = "tiny",
    lengths: Sequence[int] = (512, 2048, 4096, 8192),
    split: str = "test",
    max_steps: int = 1500,
    seed: int = 0,
    finetune_args: Sequence[str] = ("--batch-size", "16", "--lr", "1e-3", "--curriculum", "128:0.7,256:0.2,512:0.1"),
    max_eval_examples: int | None = None,
    parallel: bool = True,
) -> dict[str, Any]:
    """Fine-tune with and without Padding Insertion, evaluate both at every length.

    Args:
        tokenizer: fast tokenizer directory (the one ``make-qa`` counted tokens with).
        qa_dir: ``make-qa`` output with ``train-512.json`` and ``{split}-{length}.json``.
        out: results directory: ``with_pi/``, ``without_pi/`` (training runs), ``pi_results.json``.
        model_init: a preset name (random init, e.g. ``"tiny"``) or a pretrained model directory.
        lengths: evaluation context lengths (the files must exist).
        split: which evaluation split to score (``"test"`` or ``"validation"``).
        max_steps, seed, finetune_args: shared by both runs (flags of ``finetune-qa``).
        max_eval_examples: score only N questions per length, spread evenly through each file (default all).
        parallel: run the two fine-tunings side by side (fair on a shared machine: both get
            the same share of it) instead of one after the other.

    Returns:
        ``{"settings": {...}, "with_pi": {"by_length": {length: {"f1", "exact_match", "total"}},
        "train_seconds", "eval_seconds"}, "without_pi": {...}}``. Raises ``FileNotFoundError``
        naming a missing data file, ``RuntimeError`` with the log's tail when a run fails.
    """
    qa = Path(qa_dir)
    out = Path(out)
    train = qa / "train-512.json"
    evals = [qa / f"{split}-{n}.json" for n in lengths]
    for path in [train, *evals]:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; make the data with `littlebird-ds make-qa --lengths "
                f"{','.join(map(str, lengths))} --train-lengths 512 --output {qa}`"
            )
    validation = str(qa / "validation-512.json") if (qa / "validation-512.json").is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    train_seconds: dict[str, float] = {}

    def start(variant: str) -> None:
        cmd = _finetune_cmd(variant, tokenizer=os.fspath(tokenizer), model_init=model_init, train=str(train),
                            validation=validation, out=out / variant, max_steps=max_steps, seed=seed,
                            extra=list(finetune_args))
        log = open(out / f"{variant}.log", "w")
        log.write(" ".join(cmd) + "\n")
        log.flush()
        procs[variant] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)

    def wait(variants: Sequence[str]) -> None:
        # Poll so that each run's wall time ends when it ends, not when the other one does.
        pending = list(variants)
        while pending:
            for v in list(pending):
                proc, t0, log = procs[v]
                rc = proc.poll()
                if rc is None:
                    continue
                train_seconds[v] = time.time() - t0
                log.close()
                pending.remove(v)
                if rc != 0:
                    for other in pending:
                        procs[other][0].kill()
                    tail = (out / f"{v}.log").read_text()[-3000:]
                    raise RuntimeError(f"finetune-qa ({v}) failed with exit code {rc}; log tail:\n{tail}")
            if pending:
                time.sleep(1.0)

    if parallel:
        for v in VARIANTS:
            start(v)
        wait(VARIANTS)
    else:
        for v in VARIANTS:
            start(v)
            wait([v])

    results: dict[str, Any] = {"settings": {
        "tokenizer": os.fspath(tokenizer), "qa_dir": str(qa), "model_init": model_init, "lengths": list(lengths),
        "split": split, "max_steps": max_steps, "seed": seed, "finetune_args": list(finetune_args),
        "max_eval_examples": max_eval_examples,
    }}
    for v in VARIANTS:
        t0 = time.time()
        model, tok = load_model_and_tokenizer(out / v / "final")
        res = evaluate_files(model, tok, [str(p) for p in evals], max_examples=max_eval_examples)
        write_results(out / v / f"{split}_results.json", res)
        results[v] = {
            "by_length": {str(n): res["by_length"][str(n)] for n in lengths},
            "train_seconds": train_seconds[v],
            "eval_seconds": time.time() - t0,
        }
    write_results(out / "pi_results.json", results)
    return results


def plot_results(results: dict[str, Any], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Plot F1 against context length for both runs to a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for v, label, style in (("with_pi", "with Padding Insertion", "o-"), ("without_pi", "without", "s--")):
        rows = results[v]["by_length"]
        xs = [int(k) for k in rows]
        ax.plot(xs, [rows[k]["f1"] for k in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("F1")
    ax.set_title(title or "Cloze QA trained at <= 512 tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Flags after -- are passed to both finetune-qa runs.")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--qa", required=True, help="make-qa output directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="tiny", help="preset name or pretrained model directory")
    parser.add_argument("--lengths", default="512,2048,4096,8192")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-eval-examples", type=int, default=None)
    parser.add_argument("--sequential", action="store_true", help="run the two fine-tunings one after the other")
    parser.add_argument("--plot", default=None, help="also write a PNG of F1 vs length here")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if extra:
        kwargs["finetune_args"] = extra
    results = run_pi_experiment(a.tokenizer, a.qa, a.out, model_init=a.preset,
                                lengths=[int(x) for x in a.lengths.split(",")], split=a.split,
                                max_steps=a.max_steps, seed=a.seed, max_eval_examples=a.max_eval_examples,
                                parallel=not a.sequential, **kwargs)
    if a.plot:
        plot_results(results, a.plot)
    print(json.dumps({v: {k: round(r["f1"], 2) for k, r in results[v]["by_length"].items()} for v in VARIANTS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
