"""The training engine every training command (pretrain, distill, finetune-qa) is built on.

A command supplies four things and the engine does the rest::

    from littlebird_ds.train.engine import Trainer, add_training_arguments, finish_worker

    def add_arguments(parser):
        add_training_arguments(parser)           # --deepspeed, --tensor-parallel, --max-steps, ...
        parser.add_argument("--data", required=True)

    def run(args):
        def loss_fn(model, batch):                # model: the DeepSpeed engine (call it like the module)
            out = model(**batch)
            return out.loss, {"masked_tokens": int((batch["labels"] != -100).sum())}
        trainer = Trainer(args,
                          model_factory=lambda: LittleBirdForMaskedLM(config),
                          loss_fn=loss_fn,
                          train_dataset=dataset, collate_fn=collate,   # or batches=factory
                          eval_fn=None, tokenizer=tokenizer)
        result = trainer.fit()                    # OUT/final holds the HF model + tokenizer
        finish_worker()                           # barrier + os._exit(0): see its docstring

The loop and its arguments live here; each piece it uses has its own module:
:mod:`.distributed` (process group, DeepSpeed on CPU, worker exit), :mod:`.ds_config`
(DeepSpeed configs and batch arithmetic), :mod:`.optim` (parameter groups, schedule),
:mod:`.batches` (data order), :mod:`.checkpoint` (atomic, verified checkpoints) and
:mod:`.metrics` (metrics.jsonl, TensorBoard, W&B).

What the engine does, in order:

1. Process group: joins the one a launcher describes (``torchrun``, ``deepspeed`` with
   ``--local_rank``, ``accelerate launch``) or, with no launcher, starts a 1-process gloo
   group on 127.0.0.1. On CPU it sets ``DS_ACCELERATOR=cpu``, uses gloo and skips the
   JIT build of DeepSpeed's shared-memory allreduce (a C++ op that only the ccl backend
   uses, and that takes about a minute to compile).
2. Model parallel groups (``littlebird_ds.parallel``, imported only when tp*sp > 1).
3. The model: ``model_factory()`` after seeding, then (one documented order) tensor /
   sequence parallelism, activation checkpointing, then DeepSpeed/ZeRO.
4. ``deepspeed.initialize`` with the ds_config (``--deepspeed`` or the built-in ZeRO-0 fp32
   default; ``"auto"`` batch fields filled from ``--batch-size``/``--grad-accum``), a client
   ``torch.optim.AdamW`` (weight decay off for biases, LayerNorms, BiALiBi scalars and the
   packed sequence), unless the config offloads the optimizer: then DeepSpeed builds its
   own CPU optimizer from the config, which is what offload requires.
5. Linear warmup, then linear or cosine decay to ``--min-lr-ratio * --lr`` at
   ``--max-steps``.
6. The loop: one optimizer step = ``--grad-accum`` micro-batches per data-parallel rank.
   Logs ``OUT/metrics.jsonl`` and ``OUT/tb/`` (rank 0), a tqdm bar on rank 0.
7. Checkpoints every ``--save-every`` steps (atomic, see :mod:`littlebird_ds.train.checkpoint`)
   with the data position and every rank's RNG states, so ``--resume`` after a SIGKILL
   reproduces the uninterrupted fp32 losses exactly. A launched worker dies with its launcher
   (:func:`exit_with_launcher`), so no orphan writes checkpoints beside a resumed job.
8. At the end: a final checkpoint, exported (ZeRO gather, TP merge) to ``OUT/final`` with
   ``save_pretrained`` plus the tokenizer.

Data order: global micro-step ``m`` (counting from 0 over the whole run) consists of
``dp_size`` consecutive micro-batches; data-parallel rank ``r`` takes the ``r``-th. So a run on
``dp`` ranks with ``--grad-accum g`` sees, step by step, the same samples as a 1-process run
with ``--grad-accum g*dp``, and (for per-sample-mean losses over equal-size micro-batches)
the same losses: the engine's parity tests rely on it.

Randomness: before each micro-batch is drawn, python, numpy and torch are seeded from
``(--seed, global micro-batch index)`` (:func:`seed_micro_batch`; the index is
``micro_step * dp_size + dp_rank``), so span masks, recurring spans, Padding Insertion and
dropout belong to the micro-batch, not to the rank or accumulation step that takes it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.io import atomic_write_json
from ..utils.log import ensure_logging
from ..parallel import apply_activation_checkpointing, initialize_model_parallel, parallelize
from ..parallel.checkpointing import POLICIES as AC_POLICIES
from .batches import BatchIteratorFactory, count_tokens, dataset_batches, to_device
from .checkpoint import CheckpointManager, read_meta
from .distributed import finish_worker, init_process_group, on_cpu, prepare_environment, release_freed_memory
from .ds_config import base_ds_config, deepspeed_config_path, offloads_optimizer, resolve_ds_config
from .metrics import MetricsLogger
from .optim import ADAM_BETAS, ADAM_EPS, fill_optimizer_params, lr_lambda, param_groups

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "add_training_arguments", "finish_worker",
           "normalize_training_args", "seed_micro_batch"]

_log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags every training command shares; returns ``parser``."""
    g = parser.add_argument_group("training engine")
    g.add_argument("--deepspeed", metavar="PATH", nargs="?", const=True, default=None,
                   help="DeepSpeed JSON config (see ds_configs/); default: built-in ZeRO-0 fp32. Megatron style "
                        "`--deepspeed --deepspeed_config PATH` is accepted too")
    g.add_argument("--deepspeed_config", "--deepspeed-config", metavar="PATH", default=None,
                   help="the DeepSpeed JSON config, Megatron/DeepSpeed style (same as --deepspeed PATH)")
    g.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="tensor-parallel size")
    g.add_argument("--sequence-parallel", type=int, default=1, metavar="N", help="sequence-parallel size")
    g.add_argument("--activation-checkpointing", choices=AC_POLICIES, default="none",
                   help="recompute layer activations in backward: none, full (every layer), every_k")
    g.add_argument("--activation-checkpointing-k", type=int, default=2, metavar="K",
                   help="with every_k: checkpoint every K-th layer")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps to train (>= 1)")
    g.add_argument("--seed", type=int, default=42,
                   help="seeds the weights and every random draw of the data (span masks, Padding Insertion, "
                        "shuffling) and dropout, per global micro-batch: any split over data-parallel ranks and "
                        "--grad-accum with the same micro-batch size sees the same batches")
    g.add_argument("--out", "--output", default="runs/train", metavar="DIR", help="output directory")
    g.add_argument("--resume", action="store_true", help="resume from OUT/checkpoints/latest")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr as a fraction of --lr")
    g.add_argument("--lr-decay", choices=("linear", "cosine"), default="linear")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--bialibi-lr-scale", type=float, default=1.0, metavar="X",
                   help="learning-rate multiplier of LittleBird's BiALiBi slopes (default 1); they are 3 scalars per "
                        "head that move about --lr per step, so at fine-tuning rates they barely leave their "
                        "initialisation (30 did not speed up QA fine-tuning of a distilled student; docs/qa.md)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="micro-batch size per data-parallel rank (fills 'auto' in the ds_config; default 8)")
    g.add_argument("--grad-accum", type=int, default=None,
                   help="gradient accumulation steps (fills 'auto' in the ds_config; default 1)")
    g.add_argument("--global-batch-size", type=int, default=None, metavar="G",
                   help="examples per optimizer step over all data-parallel ranks (Megatron style): "
                        "--grad-accum becomes G / (--batch-size x data-parallel size), which must be a whole number; "
                        "without --batch-size the micro-batch is G / data-parallel size. The same G and --batch-size "
                        "give the same training on any number of ranks and nodes"),
    g.add_argument("--log-every", type=int, default=10, help="log every N steps")
    g.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the initial model of a fresh run as step 0 of metrics.jsonl, the baseline the "
                        "run's evaluations compare with (default on)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=3, metavar="K", help="keep the last K checkpoints")
    g.add_argument("--rewind-on-nonfinite", type=int, default=0, metavar="N",
                   help="on a non-finite loss, reload the last checkpoint and skip the data of the steps since it "
                        "(the bad one included), then go on; at most N times per run (default 0: stop at once, no "
                        "final model). What large-scale trainers do for isolated loss spikes; a run that diverges "
                        "again after N rewinds stops")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--wandb-project", default=None, metavar="NAME",
                   help="also log every metrics.jsonl record to this Weights & Biases project (needs `pip install "
                        "wandb`; WANDB_MODE=offline logs without a network). The run id is kept in OUT, so --resume "
                        "continues the same W&B run")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (overrides the ds_config)")
    g.add_argument("--release-memory", action="store_true",
                   help="CPU: hand freed activation memory back to the OS at once (glibc), so long documents "
                        "peak about 2x lower in resident memory at about 30%% more step time")
    # The deepspeed launcher passes --local_rank=N; torchrun and accelerate use LOCAL_RANK.
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def training_defaults() -> dict[str, Any]:
    """Every engine flag's default, as :func:`add_training_arguments` defines it (the one place
    that owns them)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_training_arguments(parser)
    return {a.dest: a.default for a in parser._actions if a.dest != argparse.SUPPRESS}


def normalize_training_args(args):
    """Check the engine's flags once, before anything is written, fill in the defaults of those a
    script's own parser left out (so the engine reads ``args.flag`` directly), and fold the
    launchers' spellings into one: ``args.deepspeed`` becomes the config path (or ``None``).
    Returns ``args``."""
    for name, default in training_defaults().items():
        if not hasattr(args, name):
            setattr(args, name, default)
    args.deepspeed = deepspeed_config_path(args)
    if hasattr(args, "deepspeed_config"):
        args.deepspeed_config = args.deepspeed
    if int(args.max_steps) < 1:
        raise ValueError(f"--max-steps {args.max_steps} must be >= 1: a training run that trains no step "
                         "writes no model")
    for name in ("batch_size", "grad_accum", "global_batch_size", "log_every", "keep_checkpoints"):
        value = getattr(args, name, None)
        if value is not None and int(value) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be >= 1")
    for name in ("warmup_steps", "save_every", "eval_every", "weight_decay", "rewind_on_nonfinite"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be >= 0")
    if not (0 < args.lr < float("inf")):
        raise ValueError(f"--lr {args.lr} must be a positive number")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio {args.min_lr_ratio} must be between 0 and 1 (a fraction of --lr)")
    if args.wandb_project:
        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb-project needs Weights & Biases: pip install wandb (or drop the flag)")
    return args


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
LossFn = Callable[[Any, Any], "tuple[torch.Tensor, dict[str, float]]"]
EvalFn = Callable[[Any, int], "dict[str, float]"]


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns (on every rank)."""

    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, steps run in this process
    final_dir: Path | None = None
    checkpoint_dir: Path | None = None


class Trainer:
    """Trains ``model_factory()`` with DeepSpeed; see the module docstring.

    Args:
        args: parsed arguments with the fields :func:`add_training_arguments` adds.
        model_factory: ``() -> PreTrainedModel``, called after seeding with ``--seed`` (every
            rank builds the same initial weights).
        loss_fn: ``(model, batch) -> (loss, metrics)``: ``model`` is the DeepSpeed engine
            (call it like the module); ``loss`` a scalar tensor, the mean over the
            micro-batch; ``metrics`` floats averaged over the step and the data-parallel
            ranks. A ``tokens`` entry overrides the token count used for ``tokens_per_s``.
        train_dataset, collate_fn: a map-style or iterable dataset and its collate function
            (see :func:`dataset_batches`); or
        batches: a :data:`BatchIteratorFactory` that can start at any micro-step.
        eval_fn: ``(model, step) -> metrics``, run on every rank in eval mode every
            ``--eval-every`` steps and at the end; rank 0's metrics are logged as ``eval_*``.
        tokenizer: saved into checkpoints and ``OUT/final``.
        shuffle: shuffle a map-style ``train_dataset`` each epoch.
    """

    def __init__(self, args, *, model_factory: Callable[[], torch.nn.Module], loss_fn: LossFn,
                 train_dataset=None, collate_fn: Callable | None = None,
                 batches: BatchIteratorFactory | None = None, eval_fn: EvalFn | None = None,
                 tokenizer=None, shuffle: bool = True):
        if (train_dataset is None) == (batches is None):
            raise ValueError("pass exactly one of train_dataset (with collate_fn) or batches")
        ensure_logging()  # a script built on the engine shows its status lines and warnings too
        self.args = normalize_training_args(args)
        self.model_factory = model_factory
        self.loss_fn = loss_fn
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn
        self.batches = batches
        self.eval_fn = eval_fn
        self.tokenizer = tokenizer
        self.shuffle = shuffle
        self.out = Path(args.out)
        self.engine = None
        self.state = None  # ParallelState when tp*sp > 1

    # -- setup ----------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        a = self.args
        tp, sp = int(a.tensor_parallel), int(a.sequence_parallel)
        if tp < 1 or sp < 1:
            raise ValueError(f"--tensor-parallel and --sequence-parallel must be >= 1, got {tp} and {sp}")
        if sp > 1:
            cfg, source = base_ds_config(a)  # whichever source: --deepspeed or accelerate's plugin
            if int(cfg.get("zero_optimization", {}).get("stage", 0)) == 3:
                # Measured (docs/scale.md, `littlebird-ds parity`): under DeepSpeed 0.19 ZeRO-3 with
                # SP=2 leaves the one-process losses from the second step (also with its contiguous
                # gradient path, which has the SP correction that its reduce-scatter path lacks), and
                # zero_to_fp32 cannot gather its checkpoints (partitioned over SP x DP ranks, read as
                # DP). ZeRO-1/2 with SP match one process.
                raise ValueError(
                    f"--sequence-parallel {sp} with ZeRO stage 3 ({source}) is not supported: DeepSpeed's ZeRO-3 "
                    "reduces sequence-parallel gradients wrongly and cannot export the checkpoint; use ZeRO-2 with "
                    "sequence parallelism (ds_configs/zero2_fp32.json), "
                    "or ZeRO-3 with --tensor-parallel instead"
                )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % (tp * sp):
            raise ValueError(
                f"world size {world} is not divisible by tensor-parallel {tp} x sequence-parallel {sp} = {tp * sp}; "
                f"launch a multiple of {tp * sp} processes or lower --tensor-parallel/--sequence-parallel"
            )
        prepare_environment(a.local_rank)
        if a.release_memory and on_cpu() and not release_freed_memory():
            _log.warning("--release-memory: this C library has no mallopt (not glibc); ignored")
        init_process_group()
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.tp, self.sp = tp, sp
        self.mpu = None
        if tp * sp > 1:
            self.state = initialize_model_parallel(tensor_parallel=tp, sequence_parallel=sp)
            self.mpu = self.state  # the Megatron-style object deepspeed.initialize(mpu=...) takes
            # Every TP and SP rank of one data-parallel replica reads the same micro-batches.
            self.dp_rank = self.mpu.get_data_parallel_rank()
            self.dp_size = self.mpu.get_data_parallel_world_size()
            self.dp_group = self.mpu.get_data_parallel_group()
        else:
            self.dp_rank, self.dp_size, self.dp_group = self.rank, self.world, None
        self.device = torch.device("cpu") if on_cpu() else torch.device("cuda", int(os.environ["LOCAL_RANK"]))

    def _build_model(self) -> torch.nn.Module:
        a = self.args
        seed_everything(a.seed)
        model = self.model_factory()
        # Order: tensor/sequence parallel, then activation checkpointing, then ZeRO (initialize).
        if self.state is not None:
            model = parallelize(model, self.state)
        policy = a.activation_checkpointing
        if policy not in AC_POLICIES:
            raise ValueError(f"--activation-checkpointing must be one of {AC_POLICIES}, got {policy!r}")
        if policy != "none":
            model = apply_activation_checkpointing(model, policy, every_k=int(a.activation_checkpointing_k))
        return model.to(self.device)

    def _initialize(self, model) -> None:
        import deepspeed

        a = self.args
        source = deepspeed_config_path(a) or "built-in default"
        self.ds_config = resolve_ds_config(a, self.dp_size, source)
        self.micro_batch = self.ds_config["train_micro_batch_size_per_gpu"]
        self.grad_accum = self.ds_config["gradient_accumulation_steps"]
        bind = getattr(self.batches, "bind", None)
        if bind is not None:  # batch iterators that map micro-batches to optimizer steps
            bind(micro_batch=self.micro_batch, grad_accum=self.grad_accum)
        groups = param_groups(model, a.weight_decay, bialibi_lr_scale=a.bialibi_lr_scale, lr=a.lr)
        schedule = lr_lambda(a.warmup_steps, a.max_steps, a.lr_decay, a.min_lr_ratio)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

        if offloads_optimizer(self.ds_config) and "optimizer" not in self.ds_config:
            # ZeRO-Offload requires DeepSpeed's CPU optimizer; let DeepSpeed build it.
            self.ds_config["optimizer"] = {"type": "AdamW", "params": {}}
        if "optimizer" in self.ds_config:
            fill_optimizer_params(self.ds_config, lr=a.lr, weight_decay=a.weight_decay)
            optimizer, params = None, groups
        else:
            optimizer, params = torch.optim.AdamW(groups, lr=a.lr, betas=tuple(ADAM_BETAS), eps=ADAM_EPS), None
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler,
            config=self.ds_config, mpu=self.mpu, dist_init_required=False,
        )
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))

    def _data_micro_steps(self, step: int) -> int:
        """Global micro-steps of data consumed before optimizer step ``step``: the steps trained
        plus those whose data rewinds skipped (``--rewind-on-nonfinite``)."""
        return (step + self.data_skip) * self.grad_accum

    def _batches_from(self, step: int) -> Iterator:
        """This rank's batch iterator, positioned at the data of optimizer step ``step``."""
        return self._batch_factory()(self._data_micro_steps(step), self.dp_rank, self.dp_size)

    def _batch_factory(self) -> BatchIteratorFactory:
        if self.batches is not None:
            return self.batches
        return dataset_batches(self.train_dataset, self.collate_fn, self.micro_batch, self.args.seed, self.shuffle)

    # -- state ----------------------------------------------------------------------------------
    def _meta(self) -> dict:
        module = self.engine.module
        return {
            "format": "littlebird-ds/1",
            "tensor_parallel": self.tp,
            "sequence_parallel": self.sp,
            "world_size": self.world,
            "zero_stage": self.zero_stage,
            "bf16": bool(self.ds_config.get("bf16", {}).get("enabled")),
            "model_class": type(module).__name__,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "bialibi_lr_scale": float(getattr(self.args, "bialibi_lr_scale", 1.0)),
        }

    def _write_extra(self, tmp: Path) -> None:
        config = getattr(self.engine.module, "config", None)
        if config is not None:
            config.save_pretrained(tmp)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp / "tokenizer")

    def _client_state(self, step: int) -> dict:
        return {
            "step": step,
            "micro_steps": self._data_micro_steps(step),  # global micro-steps consumed: the data position
            "data_skip": self.data_skip,  # optimizer steps' worth of data skipped by rewinds (--rewind-on-nonfinite)
            "seed": self.args.seed,
            "tensor_parallel": self.tp,
            "sequence_parallel": self.sp,
            "data_parallel": self.dp_size,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "model_config": getattr(getattr(self.engine.module, "config", None), "to_dict", dict)(),
        }

    def _check_resumable(self, tag_dir: Path) -> None:
        meta = read_meta(tag_dir)
        saved_tp, saved_sp = meta.get("tensor_parallel", 1), meta.get("sequence_parallel", 1)
        if saved_tp != self.tp:
            raise ValueError(
                f"checkpoint {tag_dir} was saved with tensor-parallel size {saved_tp}, this run uses "
                f"{self.tp}; resume with --tensor-parallel {saved_tp}, or run `littlebird-ds export {tag_dir} DIR` "
                f"to merge the shards into a Hugging Face model and start a new run from DIR with "
                f"--tensor-parallel {self.tp} (the optimizer state does not carry over)"
            )
        saved_scale = float(meta.get("bialibi_lr_scale", 1.0))
        scale = float(getattr(self.args, "bialibi_lr_scale", 1.0))
        if saved_scale != scale:
            # The slopes' optimizer group exists only when the scale is not 1, and a saved group's
            # lr would silently override a new value.
            raise ValueError(
                f"checkpoint {tag_dir} was saved with --bialibi-lr-scale {saved_scale:g}, this run uses {scale:g}; "
                f"resume with --bialibi-lr-scale {saved_scale:g}, or start a new run from an exported model"
            )
        # A different SP size is allowed: SP shards activations, not parameters or optimizer state.
        saved_dp = meta.get("world_size", self.world) // (saved_tp * saved_sp)
        if saved_dp * meta.get("micro_batch", self.micro_batch) * meta.get("grad_accum", self.grad_accum) != \
                self.dp_size * self.micro_batch * self.grad_accum:
            raise ValueError(
                f"checkpoint {tag_dir} was saved with a global batch of {saved_dp} data-parallel ranks x "
                f"{meta.get('micro_batch')} x grad-accum {meta.get('grad_accum')}; this run's is {self.dp_size} x "
                f"{self.micro_batch} x {self.grad_accum}; resume with the same global batch so the data position "
                "and the schedule stay valid"
            )

    # -- loop -----------------------------------------------------------------------------------
    def setup(self):
        """Process group, model parallel groups, the model and ``deepspeed.initialize`` (steps
        1-4 of the module docstring); returns the DeepSpeed engine. :meth:`fit` calls it;
        call it alone to drive steps yourself (the scale benchmark does)."""
        self._setup_distributed()
        model = self._build_model()
        self._initialize(model)
        return self.engine

    def fit(self) -> TrainResult:
        """Train to ``--max-steps`` (resuming if ``--resume``), save and export; see the class doc."""
        a = self.args
        self.setup()
        import torch.distributed as dist

        ckpt = CheckpointManager(self.out / "checkpoints", keep=a.keep_checkpoints, rank=self.rank,
                                 barrier=dist.barrier)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        step = 0
        self.data_skip = 0  # steps' worth of data passed over by rewinds; saved with every checkpoint
        if a.resume:
            # Rank 0 verifies the files against the manifest (hashing every shard once, not once per
            # rank) and tells the others which checkpoint to load, or the error to stop with.
            found: list = [None, None]
            if self.rank == 0:
                try:
                    found[0] = ckpt.newest_intact()  # falls back past a corrupt checkpoint
                except ValueError as e:
                    found[1] = str(e)
            dist.broadcast_object_list(found, src=0)
            if found[1] is not None:
                raise ValueError(found[1])
            tag = found[0]
            if tag is None:
                if self.rank == 0:
                    _log.info(f"--resume: no checkpoint under {ckpt.root}; starting from step 0")
            else:
                self._check_resumable(ckpt.root / tag)
                client = ckpt.load(self.engine, tag)
                step = int(client["step"])
                self.data_skip = int(client.get("data_skip", 0))
                if self.rank == 0:
                    _log.info(f"--resume: continuing from step {step} of {a.max_steps} ({ckpt.root / tag})")
        if self.rank == 0:
            # The settings this run ran with (every flag, after defaults and launcher folding) and
            # what it resolved: the layout and the batch arithmetic. Written once --resume has found
            # its checkpoint, so a refused resume changes nothing.
            atomic_write_json(self.out / "run_settings.json", {
                "command": sys.argv, "arguments": {k: v for k, v in sorted(vars(a).items()) if not k.startswith("_")},
                "world_size": self.world, "data_parallel": self.dp_size, "tensor_parallel": self.tp,
                "sequence_parallel": self.sp, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "zero_stage": self.zero_stage, "resumed_at_step": step}, indent=2, default=str)
        ckpt.clean_stale()
        if step == 0 and not a.resume and self.rank == 0 and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()  # a fresh run: do not append to an old log

        logger = MetricsLogger(self.out, self.rank, resumed_at=step, wandb_project=a.wandb_project,
                         settings=vars(a))
        if step == 0 and self.eval_fn is not None and a.eval_at_start:
            self._evaluate(0, logger)  # the initial model: the baseline of every later evaluation
        it = self._batches_from(step)
        rewinds_left = int(a.rewind_on_nonfinite)
        result = TrainResult(step=step, checkpoint_dir=ckpt.root)
        bar = _progress(self.rank, a.max_steps, step)
        last_saved = step if a.resume and step > 0 else -1
        self.engine.train()
        try:
            while step < a.max_steps:
                t0 = time.perf_counter()
                lr = float(self.lr_scheduler.get_last_lr()[0])  # the lr this step applies
                loss_sum, tokens, metric_sums = 0.0, 0, {}
                for k in range(self.grad_accum):
                    # The data's random draws (made as the iterator collates) and dropout come from
                    # generators seeded by the global micro-batch index: the same for one process
                    # with --grad-accum g*dp as for dp ranks with --grad-accum g.
                    micro = (self._data_micro_steps(step) + k) * self.dp_size + self.dp_rank
                    seed_micro_batch(a.seed, micro)
                    batch = to_device(next(it), self.device)
                    loss, metrics = self.loss_fn(self.engine, batch)
                    metrics = dict(metrics or {})
                    tokens += int(metrics.pop("tokens", count_tokens(batch)))
                    self.engine.backward(loss)
                    self.engine.step()
                    loss_sum += float(loss.detach().float())
                    for k, v in metrics.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
                step += 1
                # Average over micro-batches and data-parallel ranks (every rank gets the value).
                vals = torch.tensor([loss_sum, float(tokens), *metric_sums.values()], dtype=torch.float64)
                dist.all_reduce(vals, group=self.dp_group)
                dt = time.perf_counter() - t0
                loss_val = float(vals[0]) / (self.grad_accum * self.dp_size)
                result.losses[step] = loss_val
                if not math.isfinite(loss_val):  # the same value on every rank: all act together
                    good = ckpt.latest()
                    if rewinds_left > 0 and good is not None:
                        # PaLM-style: back to the last good state, past the data that led to the spike.
                        rewinds_left -= 1
                        back_to = int(ckpt.load(self.engine, good)["step"])
                        self.data_skip += step - back_to
                        logger.log({"step": step, "loss": loss_val, "lr": lr, "rewound_to": back_to,
                                    "data_skipped_steps": step - back_to})
                        if self.rank == 0:
                            _log.warning(f"the loss is {loss_val} at step {step}: rewound to {ckpt.root / good} "
                                         f"(step {back_to}), skipping the data of {step - back_to} step(s); "
                                         f"{rewinds_left} rewind(s) left")
                        step = back_to
                        for later in [k for k in result.losses if k > step]:  # replayed on other data
                            del result.losses[later]
                        it = self._batches_from(step)
                        bar.n = step
                        bar.refresh()
                        continue
                    logger.log({"step": step, "loss": loss_val, "lr": lr})
                    logger.close()
                    rewound = " after every --rewind-on-nonfinite rewind" if a.rewind_on_nonfinite else ""
                    raise TrainingDiverged(
                        f"training diverged: the loss is {loss_val} at step {step} (lr {lr:g}){rewound}; no final "
                        f"model is written, the last good checkpoint is {good or 'none (no checkpoint saved yet)'} "
                        f"under {ckpt.root}; lower --lr or add --warmup-steps, then rerun (with --resume to "
                        "continue from that checkpoint; --rewind-on-nonfinite N skips isolated spikes)")
                if step % max(1, a.log_every) == 0 or step == a.max_steps:
                    record = {"step": step, "loss": loss_val, "lr": lr,
                              "tokens_per_s": float(vals[1]) / max(dt, 1e-9)}
                    for i, k in enumerate(metric_sums):
                        record[k] = float(vals[2 + i]) / (self.grad_accum * self.dp_size)
                    logger.log(record)
                if self.eval_fn is not None and a.eval_every and step % a.eval_every == 0 and step < a.max_steps:
                    self._evaluate(step, logger)
                if a.save_every and step % a.save_every == 0:
                    ckpt.save(self.engine, step, self._client_state(step), self._meta(), self._write_extra)
                    last_saved = step
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}")
        finally:
            bar.close()
        if self.eval_fn is not None:
            self._evaluate(step, logger)
        if last_saved != step:
            ckpt.save(self.engine, step, self._client_state(step), self._meta(), self._write_extra)
        logger.close()
        result.step = step
        result.final_dir = self.out / "final"
        if self.rank == 0:
            from .export import export_checkpoint

            export_checkpoint(ckpt.root, result.final_dir)
        dist.barrier()
        return result

    def _evaluate(self, step: int, logger: MetricsLogger) -> None:
        self.engine.eval()
        with torch.no_grad():
            metrics = self.eval_fn(self.engine, step) or {}
        self.engine.train()
        logger.log({"step": step, **{f"eval_{k}": float(v) for k, v in metrics.items()}})


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: the run stops before saving anything more."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_micro_batch(seed: int, micro_batch: int) -> None:
    """Seed python, numpy and torch from ``(seed, global micro-batch index)``.

    The engine calls it before each micro-batch is drawn and run, so span masks, recurring
    spans, Padding Insertion and dropout are functions of the run's seed and the micro-batch's
    place in the global order, not of which rank or accumulation step takes it (the TP and SP
    ranks of one replica take the same index and so draw the same masks, as they must)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(micro_batch)]).generate_state(2, np.uint64)
    value = int(state[0]) % 2**63
    random.seed(value)
    np.random.seed(int(state[1]) % 2**32)
    torch.manual_seed(value)


def _progress(rank: int, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=rank != 0, desc="train", dynamic_ncols=True,
                file=sys.stderr)


def train(args, **kwargs) -> TrainResult:
    """``Trainer(args, **kwargs).fit()``."""
    return Trainer(args, **kwargs).fit()
