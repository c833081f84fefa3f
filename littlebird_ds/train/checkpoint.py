"""Atomic DeepSpeed checkpoints with the state needed to resume a run exactly.

Layout under a checkpoint root (``OUT/checkpoints``)::

    latest                    # text file: the tag of the last complete checkpoint
    step_00000010/            # one complete checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt, *_optim_states.pt   # written by DeepSpeed
        rng_rank_00000.safetensors  # python/numpy/torch RNG of each global rank (no pickle)
        littlebird_checkpoint.json   # step, TP/SP sizes, ZeRO stage, model class
        config.json           # the model's LittleBirdConfig
        tokenizer/            # the tokenizer, when the run has one
        littlebird_manifest.json     # size and SHA-256 of every file above, written last
    .tmp-step_00000012/       # a save in progress (or one a crash interrupted)

A save writes everything into ``.tmp-<tag>``, then rank 0 renames it to ``<tag>`` and
replaces ``latest`` with ``os.replace`` (atomic on POSIX). A crash at any point leaves
``latest`` naming the previous complete checkpoint; stale ``.tmp-*`` directories are removed
by the next run. The root must be on a filesystem all ranks share (the usual multi-node
setup); rank 0 does the rename.

Resuming verifies a checkpoint against its manifest before DeepSpeed reads it
(:meth:`CheckpointManager.newest_intact`): a file truncated, changed or lost after the save
(a full disk, a bad copy between clusters) makes the run fall back to the newest intact
checkpoint, with a warning naming the corrupt one. Every ``torch.load`` of a resume or an
export runs with ``weights_only=True`` (:func:`weights_only_loads`): DeepSpeed's optimizer
files hold three small DeepSpeed classes besides tensors, which are allowlisted; anything
else in a file is refused, never unpickled.
"""

from __future__ import annotations

import logging
import contextlib
import hashlib
import importlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.io import TMP_PREFIX, atomic_write_text, fsync_dir

_log = logging.getLogger(__name__)

LATEST = "latest"
META = "littlebird_checkpoint.json"
MANIFEST = "littlebird_manifest.json"

#: The classes DeepSpeed pickles into its optimizer-state files beside tensors and plain values
#: (ZeRO 1-3, bf16, offload; DeepSpeed 0.19). Allowlisting them lets ``weights_only=True`` read
#: those files: the unpickler may build these classes and nothing else.
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and, if present, CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write an :func:`rng_state` as safetensors (tensors) plus JSON metadata (the python
    state's ints, numpy's scalars): nothing in it is a pickle, so reading it runs no code."""
    from safetensors.torch import save_file

    version, words, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"torch": state["torch"].contiguous(),
               "python_words": torch.tensor(words, dtype=torch.int64),
               "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    for i, t in enumerate(state.get("cuda", [])):
        tensors[f"cuda_{i}"] = t.contiguous()
    meta = {"python": json.dumps([version, gauss]), "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state :func:`save_rng_state` wrote (``ValueError`` naming the file when it is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        version, gauss = json.loads(meta["python"])
        name, pos, has_gauss, cached = json.loads(meta["numpy"])
    except Exception as e:  # noqa: BLE001 - safetensors, json and key errors all mean "not an RNG file"
        raise ValueError(f"{path} is not a littlebird-ds RNG state file ({e}); resume from another checkpoint "
                         "or delete that checkpoint") from e
    state = {"python": (version, tuple(int(x) for x in tensors["python_words"].tolist()), gauss),
             "numpy": (name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached),
             "torch": tensors["torch"]}
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda:
        state["cuda"] = cuda
    return state


def _allowlisted_globals() -> list[Any]:
    found = []
    for name in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: it does not write this class
            pass
    return found


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every ``torch.load`` (DeepSpeed's checkpoint engine and ``zero_to_fp32``
    call it with ``weights_only=False``) reads with ``weights_only=True`` and the
    :data:`DEEPSPEED_CHECKPOINT_GLOBALS` allowlist. A file holding anything else raises a
    ``ValueError`` naming it; nothing in it runs. Not thread-safe (it swaps ``torch.load``)."""
    original = torch.load
    allowed = _allowlisted_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{f} holds objects other than tensors, plain values and DeepSpeed's checkpoint classes, so it is "
                f"not read (unpickling it could run code): {first}. Use a checkpoint written by littlebird-ds"
            ) from e

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(tag_dir: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every file under ``tag_dir`` in ``littlebird_manifest.json``."""
    tag_dir = Path(tag_dir)
    files = {
        p.relative_to(tag_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    (tag_dir / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def verify_checkpoint(tag_dir: str | os.PathLike) -> str | None:
    """``None`` when every file of ``tag_dir`` matches its manifest, else what is wrong (one line).

    A checkpoint without a manifest (written before manifests existed) passes when its
    ``littlebird_checkpoint.json`` is there."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return None if (tag_dir / META).is_file() else f"{tag_dir} has neither {MANIFEST} nor {META}"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest} is not a valid manifest ({e})"
    for rel, want in files.items():
        p = tag_dir / rel
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{p} has {size} bytes, the manifest says {want['bytes']}"
        if _sha256(p) != want["sha256"]:
            return f"{p} does not match its SHA-256 in the manifest"
    return None


def read_latest(root: str | os.PathLike) -> str | None:
    """The tag ``latest`` names, or ``None`` when the root holds no complete checkpoint."""
    p = Path(root) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not tag or not (Path(root) / tag).is_dir():
        raise FileNotFoundError(
            f"{p} names checkpoint {tag!r}, which does not exist under {root}; "
            "point it at an existing step_* directory or start without --resume"
        )
    return tag


def read_meta(tag_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(tag_dir) / META
    if not p.is_file():
        raise FileNotFoundError(
            f"{tag_dir} is not a littlebird-ds checkpoint (no {META}); "
            "pass a directory written by the training engine (OUT/checkpoints or OUT/checkpoints/step_*)"
        )
    return json.loads(p.read_text())


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """``(root, tag)`` of a checkpoint given as its root (uses ``latest``) or as a tag directory."""
    path = Path(path)
    if (path / META).is_file():
        return path.parent, path.name
    if path.is_dir():
        tag = read_latest(path)
        if tag is not None:
            return path, tag
        if (path / "checkpoints").is_dir():  # an engine OUT directory
            return resolve_checkpoint(path / "checkpoints")
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a checkpoint root with a 'latest' file, a step_* "
        "directory inside it, or a training OUT directory with checkpoints/"
    )


class CheckpointManager:
    """Saves and loads DeepSpeed checkpoints atomically under ``root``, keeping the last ``keep``.

    Every rank calls :meth:`save` and :meth:`load` (DeepSpeed's save and load are collective).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 3, *, rank: int = 0, barrier=None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self._barrier = barrier or (lambda: None)

    # -- saving -----------------------------------------------------------------------------
    def clean_stale(self) -> None:
        """Remove ``.tmp-*`` directories left by interrupted saves (rank 0, before training)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self._barrier()

    def save(self, engine, step: int, client_state: dict, meta: dict, write_extra=None) -> Path:
        """Save ``engine`` at ``step``; return the final tag directory.

        ``client_state`` goes into DeepSpeed's checkpoint; ``meta`` (JSON-serialisable) into
        ``littlebird_checkpoint.json``; ``write_extra(tmp_dir)`` runs on rank 0 to add files
        (config, tokenizer) before the commit.
        """
        tag = tag_for_step(step)
        tmp_tag = TMP_PREFIX + tag
        self.root.mkdir(parents=True, exist_ok=True)
        # save_latest=False: ``latest`` is ours to write, after the rename.
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        tmp = self.root / tmp_tag
        save_rng_state(rng_state(), tmp / f"rng_rank_{self.rank:05d}.safetensors")
        self._barrier()  # every rank's shards are on disk
        if self.rank == 0:
            if write_extra is not None:
                write_extra(tmp)
            (tmp / META).write_text(json.dumps({**meta, "step": step, "tag": tag}, indent=2, sort_keys=True))
            write_manifest(tmp)
            self._before_commit(tmp)
            final = self.root / tag
            if final.exists():  # left by an earlier run that got further; this one supersedes it
                old = self.root / f"{TMP_PREFIX}old-{tag}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, tag)
            self._prune(keep_tag=tag)
        self._barrier()
        return self.root / tag

    def _before_commit(self, tmp_dir: Path) -> None:
        """Called on rank 0 after every file is written and before the rename (a test seam)."""

    def _tags(self) -> list[str]:
        """The ``step_*`` checkpoints under the root, oldest first."""
        return sorted((p.name for p in self.root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)),
                      key=lambda t: int(_TAG_RE.match(t).group(1)))

    def _prune(self, keep_tag: str) -> None:
        tags = self._tags()
        for tag in tags[: max(0, len(tags) - self.keep)]:
            if tag != keep_tag:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------
    def latest(self) -> str | None:
        return read_latest(self.root) if self.root.is_dir() else None

    def newest_intact(self) -> str | None:
        """The newest checkpoint that passes :func:`verify_checkpoint`, starting from ``latest``;
        each one passed over is named in a warning (rank 0). ``None`` when the root holds no
        checkpoint; ``ValueError`` when it holds checkpoints and none is intact."""
        if not self.root.is_dir():
            return None
        tags = self._tags()[::-1]  # newest first
        latest_file = self.root / LATEST
        named = latest_file.read_text().strip() if latest_file.is_file() else None
        if named is not None and named in tags:  # never resume past what ``latest`` committed
            tags = tags[tags.index(named):]
        elif named is not None:
            self._warn(f"{latest_file} names checkpoint {named!r}, which does not exist; "
                       "looking for the newest intact checkpoint instead")
        elif not tags:
            return None
        problems = []
        for tag in tags:
            problem = verify_checkpoint(self.root / tag)
            if problem is None:
                if problems:
                    self._warn(f"resuming from the newest intact checkpoint {self.root / tag}")
                return tag
            problems.append(problem)
            self._warn(f"checkpoint {self.root / tag} is corrupt ({problem}); trying the one before it")
        raise ValueError(
            f"no intact checkpoint under {self.root} ({'; '.join(problems) or 'no step_* directory'}); "
            "start without --resume, or restore the files from a copy"
        )

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            _log.warning(message)

    def load(self, engine, tag: str) -> dict:
        """Load ``tag`` into ``engine`` (model, optimizer, scheduler) and restore this rank's RNG.

        Returns DeepSpeed's client state.
        """
        with weights_only_loads():
            path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}; see the messages above")
        rng_file = self.root / tag / f"rng_rank_{self.rank:05d}.safetensors"
        if rng_file.is_file():
            set_rng_state(load_rng_state(rng_file))
        else:
            # A different world size (no saved stream for this rank), or a checkpoint of an older
            # version whose RNG file is a pickle, which is never read. The engine seeds every
            # micro-batch from (seed, index) anyway; reseed deterministically.
            seed = int(client_state.get("seed", 0)) + 1000003 * int(client_state.get("step", 0)) + self.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        return client_state or {}
