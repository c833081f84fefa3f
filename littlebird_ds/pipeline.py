"""The main job: raw text in a language -> a long-document QA model, in one command.

Stages (each in its own folder under ``OUT``, each skipped when already finished)::

    tokenizer   SentencePiece + HF fast tokenizer trained on the corpus (with --teacher: the
                teacher's own tokenizer, which the student must share)
    teacher     short-input BERT teacher pretrained with span masking (skipped with --teacher)
    distill     LittleBird student initialised from the teacher and distilled from it
    further     further span-masking pretraining of the student on long inputs, Padding Insertion
    qa-data     cloze QA made from the corpus, test sets at several context lengths
    qa          QA fine-tuning of the pretrained student with Padding Insertion (the product);
                with ``--ablations`` also of the same student without Padding Insertion and of
                a randomly initialised LittleBird of the student's architecture, each with the
                same data, steps and settings
    evaluate    EM/F1 (with 95% bootstrap intervals) of every QA model at every test length
    report      OUT/report.md + report.json + PNG plots

On several nodes (``--launcher`` with a multi-node launcher, ``OUT`` on storage every node
shares, as multi-node checkpoints need anyway), the same command runs on every node with its
``NODE_RANK`` (or ``--node-rank``): node 0 runs every stage; the others join each training
stage's launch and otherwise wait for node 0's ``DONE.json`` of each stage, so the nodes move
through the stages together (tested with ``launch/deepspeed_multinode.sh`` on two simulated
nodes: the report equals one process's with the same micro-batch).

Every stage runs as a child process of the ``littlebird-ds`` console script (the training
engine owns its process group and exits the process when done), with its output in
``OUT/<stage>/log.txt`` (other nodes: ``log.node<R>.txt``); a stage is finished when
``OUT/<stage>/DONE.json`` exists, which is written atomically last. A failed or interrupted
stage leaves no ``DONE.json``: rerunning the pipeline resumes there, and a training stage
continues from its last checkpoint (saved every ``max(50, steps / 4)`` steps), not from step 0.

Each stage records what its result depends on (``STAGE_SETTINGS``, the corpus, preset,
teacher, seed and DeepSpeed config, and the stages it reads, ``STAGE_INPUTS``) in
``INPUTS.json`` when it starts and as a fingerprint in ``DONE.json``. A rerun whose settings
differ (``--set eval_lengths=...``) reruns that stage and every stage that reads it; the old
folder is moved to ``OUT/stale/<stage>-<time>`` (nothing is deleted), and the changed values
are printed. The launcher and the number of ranks are not inputs: with the same micro-batch
they train the same model (launch/README.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .utils.io import atomic_write_json

#: Stages that train through ``--launcher`` (every node takes part in them).
TRAINING_STAGES = ("teacher", "distill", "further", "qa")

#: Sizes, lengths and step counts per preset. ``tiny``: 5,000 QA steps, because the cloze task leaves its plateau only
#: after 3,500-4,000 (docs/qa.md, ninth and tenth attempts); README "Measured so far" has its time.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=4000, teacher_steps=300, teacher_length=128, distill_steps=100, distill_length=128,
        further_steps=20, further_length=512, qa_steps=5000, qa_length=512, qa_curriculum="128:0.9,256:0.1", qa_pi_factor=4, qa_bialibi_lr_scale=1.0, qa_pi_start_fraction=0.9,
        qa_warmup_steps=100, qa_min_lr_ratio=0.1,
        bialibi_init="alibi", micro_batch_size=0, qa_dropout=0.1, distill_lr=3e-4, distill_dropout=0.0,
        eval_lengths=(512, 2048, 4096, 8192), batch_size=16, lr=1e-3, questions_per_document="400,24,100",
        validation_fraction=0.05,
    ),
    "small": dict(
        vocab_size=8000, teacher_steps=3000, teacher_length=256, distill_steps=2000, distill_length=256,
        further_steps=2000, further_length=1024, qa_steps=3000, qa_length=512, qa_curriculum="128:0.5,256:0.3,512:0.2", qa_pi_factor=8, qa_bialibi_lr_scale=1.0, qa_pi_start_fraction=0.0,
        qa_warmup_steps=100, qa_min_lr_ratio=0.1,
        bialibi_init="alibi", micro_batch_size=0, qa_dropout=0.1, distill_lr=3e-4, distill_dropout=0.0,
        eval_lengths=(512, 2048, 4096, 8192), batch_size=16, lr=5e-4, questions_per_document="256,64,64",
        validation_fraction=0.05,
    ),
    "base": dict(
        vocab_size=32000, teacher_steps=100000, teacher_length=512, distill_steps=50000, distill_length=512,
        further_steps=50000, further_length=4096, qa_steps=20000, qa_length=512, qa_curriculum="", qa_pi_factor=8, qa_bialibi_lr_scale=1.0, qa_pi_start_fraction=0.0,
        qa_warmup_steps=100, qa_min_lr_ratio=0.1,
        bialibi_init="alibi", micro_batch_size=0, qa_dropout=0.1, distill_lr=1e-4, distill_dropout=0.0,
        eval_lengths=(512, 2048, 4096, 8192, 16384), batch_size=32, lr=1e-4, questions_per_document="256,100,100",
        validation_fraction=0.02,
    ),
}


#: The preset settings each stage's result depends on, besides :data:`STAGE_INPUTS`.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("vocab_size",),
    "teacher": ("teacher_steps", "teacher_length", "batch_size", "micro_batch_size", "lr", "validation_fraction"),
    "distill": ("distill_steps", "distill_length", "distill_lr", "distill_dropout", "bialibi_init", "batch_size",
                "micro_batch_size", "validation_fraction"),
    "further": ("further_steps", "further_length", "batch_size", "micro_batch_size", "lr", "validation_fraction"),
    "qa-data": ("eval_lengths", "qa_length", "questions_per_document"),
    "qa": ("qa_steps", "qa_length", "qa_curriculum", "qa_pi_factor", "qa_pi_start_fraction", "qa_bialibi_lr_scale",
           "qa_dropout", "qa_warmup_steps", "qa_min_lr_ratio", "batch_size", "micro_batch_size", "lr"),
    "evaluate": ("eval_lengths",),
}

#: The stages whose results a stage reads: when one of them is rerun, so is the stage.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "tokenizer": (), "teacher": ("tokenizer",), "distill": ("tokenizer", "teacher"), "further": ("distill",),
    "qa-data": ("tokenizer",), "qa": ("further", "qa-data"), "evaluate": ("qa", "qa-data"),
}


@dataclass
class PipelineOptions:
    out: Path
    corpus: str = "chichewa-bible"
    language: str = "nya"
    preset: str = "tiny"
    teacher: str | None = None
    seed: int = 0
    launcher: str = ""  # e.g. "torchrun --nproc_per_node 2": prefix for the training stages
    deepspeed: str | None = None
    ablations: bool = False  # also train and evaluate the no-PI and random-init comparisons
    node_rank: int = 0  # on multi-node launches: this node's rank (0 runs the non-training stages)
    node_wait_timeout: float = 24 * 3600.0  # seconds a node > 0 waits for node 0 to finish a stage
    overrides: dict = field(default_factory=dict)

    def settings(self) -> dict:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        return {**PRESETS[self.preset], **self.overrides}


def launcher_prefix(launcher: str) -> list[str]:
    """The command that starts ``littlebird_ds.cli`` under ``launcher`` (``torchrun ...``,
    ``deepspeed ...``, ``accelerate launch ...``): the deepspeed launcher names a module with
    ``--module``, the others with ``-m``."""
    words = shlex.split(launcher)
    if not words:
        raise ValueError("--launcher is empty; pass e.g. 'torchrun --nproc_per_node 2'")
    deepspeed = Path(words[0]).name in ("deepspeed", "deepspeed_multinode.sh") or (
        len(words) > 1 and Path(words[1]).name == "deepspeed_multinode.sh")  # "bash launch/deepspeed_multinode.sh"
    module_flag = "--module" if deepspeed else "-m"
    return words + [module_flag, "littlebird_ds.cli"]


class StageFailed(RuntimeError):
    """A stage's child process failed; ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, log_tail: str):
        super().__init__(message)
        self.log_tail = log_tail


class Pipeline:
    """Runs the stages in order; see the module docstring."""

    def __init__(self, opts: PipelineOptions, echo: Callable[[str], None] = print):
        self.o = opts
        self.s = opts.settings()
        from .train.presets import LITTLEBIRD_PRESETS

        self.arch = LITTLEBIRD_PRESETS[opts.preset]  # the student's block and pack sizes
        self.out = Path(opts.out)
        self.echo = echo
        self.cli = [sys.executable, "-m", "littlebird_ds.cli"]

    # -- helpers --------------------------------------------------------------------------------
    def dir(self, stage: str) -> Path:
        return self.out / stage

    def inputs(self, stage: str) -> dict:
        """What ``stage``'s result depends on: its settings, the run's options, and the
        fingerprints of the stages it reads (so a change upstream reaches every stage after it)."""
        options = {"corpus": self.o.corpus, "preset": self.o.preset, "teacher": self.o.teacher, "seed": self.o.seed}
        if stage in TRAINING_STAGES:
            options["deepspeed"] = self.o.deepspeed  # bf16 or fp32 (the ZeRO stage alone does not change results)
        if stage in ("qa", "evaluate"):
            options["language"] = self.o.language  # picks the articles the EM/F1 normaliser drops
        return {"settings": {k: self.s[k] for k in STAGE_SETTINGS.get(stage, ())}, "options": options,
                "reads": {up: self.fingerprint(up) for up in STAGE_INPUTS.get(stage, ())
                          if up != "teacher" or not self.o.teacher}}

    def fingerprint(self, stage: str) -> str:
        text = json.dumps(self.inputs(stage), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _recorded(self, stage: str) -> dict | None:
        """The inputs a started or finished run of ``stage`` recorded (None: none recorded)."""
        for name in ("DONE.json", "INPUTS.json"):
            path = self.dir(stage) / name
            if path.exists():
                info = json.loads(path.read_text())
                if "fingerprint" in info:
                    return info
        return None

    def stale(self, stage: str) -> list[str] | None:
        """The inputs of ``stage`` that changed since its folder was made (None: nothing changed,
        or nothing was recorded, as in folders of versions before fingerprints)."""
        info = self._recorded(stage)
        if info is None or info["fingerprint"] == self.fingerprint(stage):
            return None
        old, new = info.get("inputs", {}), self.inputs(stage)
        # Compared as JSON, as recorded: a tuple setting and the list it was read back as are equal.
        changed = [f"{k}: {old.get(group, {}).get(k)!r} -> {v!r}" for group in ("settings", "options")
                   for k, v in new[group].items()
                   if json.dumps(old.get(group, {}).get(k), default=str) != json.dumps(v, default=str)]
        changed += [f"stage {up} reruns" for up, fp in new["reads"].items() if old.get("reads", {}).get(up) != fp]
        return changed or ["recorded inputs differ"]

    def _set_aside(self, stage: str, changed: list[str]) -> None:
        """Move a stale stage's folder to ``OUT/stale/`` (nothing is deleted) before it reruns."""
        to = self.out / "stale" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        to.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.dir(stage), to)
        self.echo(f"stage {stage}: rerunning, its inputs changed ({'; '.join(changed)}); the old folder is {to}")

    def done(self, stage: str) -> bool:
        """Finished before with the same inputs: ``DONE.json`` exists, its fingerprint matches,
        and, for the QA stages, it names every QA run this invocation asks for (a rerun with
        ``--ablations`` adds the comparisons to a finished default run). The report is always
        rewritten: it is cheap and reads every stage."""
        path = self.dir(stage) / "DONE.json"
        if stage == "report" or not path.exists():
            return False
        info = json.loads(path.read_text())
        want = self.fingerprint(stage)
        if info.get("fingerprint", want) != want:  # none recorded: a folder of an older version
            return False
        if stage in ("qa", "evaluate"):
            return set(self.qa_runs()) <= set(info)
        return True

    def _run(self, stage: str, argv: list[str], *, train: bool = False, log_name: str = "log.txt") -> None:
        d = self.dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        prefix = launcher_prefix(self.o.launcher) if (train and self.o.launcher) else self.cli
        if train and self.o.deepspeed:
            argv = argv + ["--deepspeed", self.o.deepspeed]
        if self.o.node_rank:  # another node's copy of the same launch: its own log file
            stem, dot, ext = log_name.rpartition(".")
            log_name = f"{stem}.node{self.o.node_rank}.{ext}" if dot else f"{log_name}.node{self.o.node_rank}"
        cmd = prefix + argv
        with open(d / log_name, "a") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            # The token cache under OUT: the teacher, distill and further stages tokenize the corpus
            # once between them, and every node reads it (OUT is shared on multi-node runs).
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.setdefault("LITTLEBIRD_DS_CACHE", str(self.out / "cache"))
            res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if res.returncode != 0:
            tail = (d / log_name).read_text().splitlines()[-25:]
            said = [ln for ln in tail if ln.startswith("littlebird-ds ") and ": error: " in ln]
            raise StageFailed(
                f"stage {stage!r} failed (exit {res.returncode}"
                + (f": {said[-1].split(': error: ', 1)[1]}" if said else "")
                + f"); its log is {d / log_name}. Fix the cause and rerun the same command: finished stages are kept",
                "\n".join(tail))

    def _wait_for(self, path: Path, what: str, finished: Callable[[], bool] | None = None) -> None:
        """Node > 0: wait until node 0 has written ``path`` (a stage's or a QA run's DONE.json;
        ``finished``, when given, decides instead of the file's existence)."""
        deadline = time.time() + self.o.node_wait_timeout
        announced = False
        while not (finished() if finished else path.exists()):
            if time.time() > deadline:
                raise RuntimeError(f"node {self.o.node_rank}: node 0 did not finish {what} ({path} missing) within "
                                   f"{self.o.node_wait_timeout:.0f} s; check node 0's log under {path.parent}, fix "
                                   "the cause and start the pipeline again on every node")
            if not announced:
                self.echo(f"node {self.o.node_rank}: waiting for node 0 to finish {what} ({path})")
                announced = True
            time.sleep(1.0)

    def _start(self, stage: str) -> None:
        """Node 0, before a stage runs: set a stale folder aside, then record the inputs (so a
        stage interrupted part-way is also recognised as stale if the settings change)."""
        changed = self.stale(stage) if self.dir(stage).exists() else None
        if changed:
            self._set_aside(stage, changed)
        if stage != "report":
            atomic_write_json(self.dir(stage) / "INPUTS.json",
                              {"fingerprint": self.fingerprint(stage), "inputs": self.inputs(stage)}, indent=2, default=str)

    def _finish(self, stage: str, info: dict) -> None:
        self.dir(stage).mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": self.fingerprint(stage), "inputs": self.inputs(stage)} if stage != "report" else {}
        atomic_write_json(self.dir(stage) / "DONE.json",
                          {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info, **record}, indent=2, default=str)

    def _pretrain_data(self) -> list[str]:
        return ["--corpus", self.o.corpus, "--validation-fraction", str(self.s["validation_fraction"])]

    def _train_common(self, out: Path, steps: int, lr: float | None = None) -> list[str]:
        s = self.s
        # --resume: a training stage stopped part-way continues from its last checkpoint when the
        # pipeline is rerun (with none, it starts at step 0).
        # batch_size is the global batch (Megatron style): the same on one process and on any
        # number of ranks and nodes. micro_batch_size (0: batch_size / data-parallel ranks) fixes
        # the micro-batch, which the data's randomness is keyed on: runs with the same one train
        # the same model whatever the launcher (launch/README.md).
        micro = ["--batch-size", str(s["micro_batch_size"])] if s["micro_batch_size"] else []
        return ["--out", str(out), "--max-steps", str(steps), "--seed", str(self.o.seed), "--resume",
                "--global-batch-size", str(s["batch_size"]), *micro, "--lr", str(s["lr"] if lr is None else lr),
                "--save-every", str(max(50, steps // 4)), "--log-every", "10", "--eval-every", str(max(50, steps // 4))]

    # -- stages ---------------------------------------------------------------------------------
    def tokenizer_dir(self) -> Path:
        return self.dir("tokenizer")

    def stage_tokenizer(self) -> dict:
        if self.o.teacher:
            return self._teacher_tokenizer()
        self._run("tokenizer", ["train-tokenizer", "--corpus", self.o.corpus, "--output", str(self.dir("tokenizer")),
                                "--vocab-size", str(self.s["vocab_size"])])
        return {"tokenizer": str(self.dir("tokenizer"))}

    def _teacher_tokenizer(self) -> dict:
        """An existing teacher fixes the vocabulary (spec section 5: teacher and student share the
        tokenizer), so its tokenizer becomes the pipeline's instead of a newly trained one."""
        from transformers import AutoTokenizer

        from .data.tokenizer import TOKENIZER_FILES, has_tokenizer_files
        from .train.distill import resolve_teacher_path

        path = resolve_teacher_path(self.o.teacher)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--teacher {self.o.teacher}: {path} is not a directory; pass a Hugging Face "
                                    "model directory (with its tokenizer) or 'minilm'")
        hint = "the pipeline reuses the teacher's tokenizer, so the directory must hold one (save_pretrained writes it)"
        # Checked by file: without one, transformers builds a tokenizer of special tokens only.
        if not has_tokenizer_files(path):
            raise ValueError(f"--teacher {self.o.teacher}: no tokenizer loads from {path} (none of "
                             f"{', '.join(TOKENIZER_FILES)}); {hint}")
        try:
            tok = AutoTokenizer.from_pretrained(path, use_fast=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"--teacher {self.o.teacher}: no tokenizer loads from {path} ({e}); {hint}") from e
        if not tok.is_fast:
            raise ValueError(f"--teacher {self.o.teacher}: its tokenizer is not a fast (Rust) tokenizer, which the "
                             "QA data and fine-tuning need for character offsets; save a fast one with the model")
        final = self.dir("tokenizer")
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)  # an unfinished earlier attempt (no DONE.json)
        os.replace(tmp, final)
        return {"tokenizer": str(final), "from_teacher": path, "vocab_size": len(tok)}

    def teacher_dir(self) -> Path:
        return Path(self.o.teacher) if self.o.teacher else self.dir("teacher") / "final"

    def stage_teacher(self) -> dict:
        s = self.s
        self._run("teacher", ["pretrain", "--model-type", "bert", "--preset", self.o.preset, *self._pretrain_data(),
                              "--tokenizer", str(self.tokenizer_dir()), "--max-length", str(s["teacher_length"])]
                  + self._train_common(self.dir("teacher"), s["teacher_steps"]), train=True)
        return {"teacher": str(self.teacher_dir())}

    def distill_loss_args(self) -> list[str]:
        """The distillation loss for this teacher. With an MLM head: the defaults (span masking,
        KL + hidden-state MSE + the student's own masked-LM loss). Without one (MiniLM): clean
        text and the hidden-state MSE only, since [MASK] tokens change such a teacher's states
        across the whole window and the target is matching its states on clean text (the
        English runs stalled at cosine 0.69 with 5% masking and reached 0.90 on clean text)."""
        from .train.distill import teacher_has_mlm_head

        if teacher_has_mlm_head(str(self.teacher_dir())):
            return []
        return ["--mask-rate", "0", "--kl-weight", "0", "--mlm-weight", "0", "--mse-weight", "1"]

    def stage_distill(self) -> dict:
        s = self.s
        loss = self.distill_loss_args()
        self._run("distill", ["distill", "--teacher", str(self.teacher_dir()), "--tokenizer", str(self.tokenizer_dir()),
                              *self._pretrain_data(), "--max-length", str(s["distill_length"]),
                              "--block-size", str(self.arch["block_size"]), "--pack-size", str(self.arch["pack_size"]),
                              # The question is global (spec decision): block 0 at the first-token
                              # distance from every query, carried by the model from here on.
                              "--bialibi-global-keys", str(self.arch["block_size"]),
                              "--bialibi-init", s["bialibi_init"],
                              # A gentle rate without dropout: the student fits the frozen teacher's
                              # eval-mode states (at the common lr 1e-3 the cosine fell; docs/pretraining.md).
                              "--dropout", str(s["distill_dropout"]), *loss]
                  + self._train_common(self.dir("distill"), s["distill_steps"], lr=s["distill_lr"]), train=True)
        return {"student": str(self.dir("distill") / "final"), "loss": "hidden-state MSE on clean text" if loss
                else "span masking: KL + hidden-state MSE + masked LM"}

    def stage_further(self) -> dict:
        s = self.s
        self._run("further", ["pretrain", "--model-type", "littlebird", "--init-from", str(self.dir("distill") / "final"),
                              *self._pretrain_data(), "--tokenizer", str(self.tokenizer_dir()),
                              "--max-length", str(s["further_length"]), "--padding-insertion", "0.5",
                              "--pi-max-length", str(4 * s["further_length"])]
                  + self._train_common(self.dir("further"), s["further_steps"]), train=True)
        return {"model": str(self.dir("further") / "final")}

    def stage_qa_data(self) -> dict:
        s = self.s
        lengths = ",".join(str(x) for x in s["eval_lengths"])
        self._run("qa-data", ["make-qa", "--corpus", self.o.corpus, "--tokenizer", str(self.tokenizer_dir()),
                              "--output", str(self.dir("qa-data")), "--lengths", lengths,
                              "--train-lengths", str(s["qa_length"]), "--questions-per-document", s["questions_per_document"],
                              "--block-size", str(self.arch["block_size"]), "--seed", str(self.o.seed)])
        return {"data": str(self.dir("qa-data"))}

    def qa_runs(self) -> dict[str, list[str]]:
        """name -> model arguments of the QA fine-tuning runs: the product (``pretrained_pi``),
        and with ``--ablations`` the two comparisons, which differ from it in one flag each."""
        pretrained = ["--model", str(self.dir("further") / "final")]
        runs = {"pretrained_pi": pretrained}
        if self.o.ablations:
            runs["pretrained_no_pi"] = pretrained + ["--no-padding-insertion"]
            # The student's architecture with fresh weights: the same model, less the pretraining.
            runs["random_pi"] = pretrained + ["--random-init"]
        return runs

    def stage_qa(self) -> dict:
        s = self.s
        data = self.dir("qa-data")
        val = str(data / f"validation-{s['qa_length']}.json")
        done = {}
        for name, model_args in self.qa_runs().items():
            out = self.dir("qa") / name
            if (out / "final").is_dir() and (out / "DONE.json").exists():
                done[name] = str(out / "final")
                continue
            argv = ["finetune-qa", *model_args, "--train", str(data / f"train-{s['qa_length']}.json"),
                    "--validation", val, "--max-length", str(s["qa_length"])]
            if s.get("qa_curriculum"):
                argv += ["--curriculum", s["qa_curriculum"]]
            argv += ["--dropout", str(s["qa_dropout"]), "--language", self.o.language,
                     # a warm-up of at most a tenth of the run (short test runs keep their lr)
                     "--warmup-steps", str(min(s["qa_warmup_steps"], s["qa_steps"] // 10)),
                     "--min-lr-ratio", str(s["qa_min_lr_ratio"])]
            if "--no-padding-insertion" not in model_args:  # the longest Padding Insertion target, x stage length
                argv += ["--pi-factor", str(s["qa_pi_factor"])]
                if s["qa_pi_start_fraction"] > 0:  # a warm-up on plain short contexts first
                    argv += ["--pi-start-fraction", str(s["qa_pi_start_fraction"])]
            if s["qa_bialibi_lr_scale"] != 1.0:  # the same for every run
                argv += ["--bialibi-lr-scale", str(s["qa_bialibi_lr_scale"])]
            self._run("qa", argv + self._train_common(out, s["qa_steps"]), train=True, log_name=f"{name}.log")
            if self.o.node_rank:
                self._wait_for(out / "DONE.json", f"QA run {name}")
            else:
                atomic_write_json(out / "DONE.json", {"model": str(out / "final")}, indent=2, default=str)
            done[name] = str(out / "final")
        return done

    def stage_evaluate(self) -> dict:
        s = self.s
        data = self.dir("qa-data")
        files = ",".join(str(data / f"test-{n}.json") for n in s["eval_lengths"])
        results = {}
        for name in self.qa_runs():
            res = self.dir("evaluate") / f"{name}.json"
            if not res.exists():
                self._run("evaluate", ["evaluate-qa", "--model", str(self.dir("qa") / name / "final"), "--data", files,
                                       "--language", self.o.language, "--out", str(res)], log_name=f"{name}.log")
            results[name] = str(res)
        return results

    def stage_report(self) -> dict:
        from .report import write_report

        paths = write_report(self.out, self.s, self.o)
        return {k: str(v) for k, v in paths.items()}

    def stages(self) -> list[tuple[str, Callable[[], dict]]]:
        st = [("tokenizer", self.stage_tokenizer)]
        if not self.o.teacher:
            st.append(("teacher", self.stage_teacher))
        st += [("distill", self.stage_distill), ("further", self.stage_further), ("qa-data", self.stage_qa_data),
               ("qa", self.stage_qa), ("evaluate", self.stage_evaluate), ("report", self.stage_report)]
        return st

    def check_inputs(self) -> None:
        """What can be checked before any stage runs: the corpus, the output folder, the files
        the options name. A wrong one is a clear error here, not a failed child process later."""
        from .data.corpus import BUILTIN_CORPORA
        from .train.distill import MINILM

        if not Path(self.o.corpus).exists() and self.o.corpus not in BUILTIN_CORPORA:
            raise FileNotFoundError(f"--corpus {self.o.corpus} is neither an existing path nor a built-in corpus "
                                    f"({', '.join(BUILTIN_CORPORA)}); pass a folder of .txt files, a .jsonl file "
                                    "or a saved dataset")
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"--out {self.out} is a file; pass a folder for the stages")
        if self.o.deepspeed and not Path(self.o.deepspeed).is_file():
            raise FileNotFoundError(f"--deepspeed {self.o.deepspeed} does not exist; pass a DeepSpeed JSON config "
                                    "(see ds_configs/)")
        if self.o.teacher and self.o.teacher != MINILM and not Path(self.o.teacher).is_dir():
            raise FileNotFoundError(f"--teacher {self.o.teacher} is not a directory; pass a Hugging Face model "
                                    "directory (with its tokenizer) or 'minilm'")

    def run(self) -> Path:
        from tqdm.auto import tqdm

        self.check_inputs()
        self.out.mkdir(parents=True, exist_ok=True)
        worker = self.o.node_rank > 0
        if not worker:
            atomic_write_json(self.out / "pipeline.json", {**asdict(self.o), "settings": self.s}, indent=2,
                              default=str)
        stages = self.stages()
        t0 = time.time()
        with tqdm(total=len(stages), desc="pipeline" + (f" (node {self.o.node_rank})" if worker else ""),
                  unit="stage") as bar:
            for name, fn in stages:
                if self.done(name):
                    bar.set_postfix_str(f"{name}: done before")
                    bar.update(1)
                    continue
                bar.set_postfix_str(f"{name} (log: {self.dir(name)})")
                start = time.time()
                if worker:  # join the training launches; node 0 does the rest and marks each stage done
                    if name == "report":
                        bar.update(1)
                        continue
                    if name in TRAINING_STAGES:
                        fn()
                    self._wait_for(self.dir(name) / "DONE.json", f"stage {name}", lambda: self.done(name))
                else:
                    self._start(name)
                    info = fn()
                    self._finish(name, {**info, "seconds": round(time.time() - start, 1)})
                bar.update(1)
        where = "node 0 writes the report: " if worker else ""
        self.echo(f"pipeline finished in {time.time() - t0:.0f} s: {where}{self.out / 'report.md'}")
        return self.out / "report.md"
