"""Turn a training checkpoint into a Hugging Face model directory.

Steps: ZeRO gather (``deepspeed.utils.zero_to_fp32``) of every tensor-parallel rank's shards
into full fp32 state dicts, tensor-parallel merge (``littlebird_ds.parallel``) when the run
used TP > 1, then ``save_pretrained`` (safetensors) of the model class the run trained, plus
the checkpoint's tokenizer when it has one. The result loads with
``AutoModel.from_pretrained`` / ``AutoModelFor*.from_pretrained`` (after ``import
littlebird_ds``). Runs in one process with no process group and no accelerator.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import read_meta, resolve_checkpoint, verify_checkpoint, weights_only_loads

_MP_RE = re.compile(r"mp_rank_(\d+)")


def _gather_one(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of one model-parallel rank whose files sit in ``root/tag``."""
    tag_dir = root / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints per-tensor progress; keep the export's output readable.
        with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        return {k: v.float() for k, v in sd.items()}
    # ZeRO-0 without a ZeRO/bf16 optimizer: the module weights are the fp32 weights.
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    with weights_only_loads():  # a crafted file cannot run code here
        states = torch.load(files[0], map_location="cpu")
    return {k: v.float() for k, v in states["module"].items()}


def gather_state_dicts(root: Path, tag: str, tp_size: int) -> list[dict[str, torch.Tensor]]:
    """One full (ZeRO-gathered) fp32 state dict per tensor-parallel rank, in rank order."""
    if tp_size == 1:
        return [_gather_one(root, tag)]
    tag_dir = root / tag
    out = []
    for r in range(tp_size):
        # zero_to_fp32 reads every mp rank's files in a directory; give it one rank's at a time.
        with tempfile.TemporaryDirectory(prefix=f"tp{r}-", dir=root) as tmp:
            view = Path(tmp) / tag
            view.mkdir()
            for f in tag_dir.iterdir():
                m = _MP_RE.search(f.name)
                if f.is_file() and m and int(m.group(1)) == r:
                    os.symlink(f.resolve(), view / f.name.replace(f"mp_rank_{m.group(1)}", "mp_rank_00"))
            if not any(view.iterdir()):
                raise FileNotFoundError(f"{tag_dir} has no files of tensor-parallel rank {r} (expected mp_rank_{r:02d}*)")
            out.append(_gather_one(Path(tmp), tag))
    return out


def _common_keys(sds: list[dict], tied: set[str], where) -> list[dict]:
    """The TP ranks' state dicts with one key order, without tied copies.

    zero_to_fp32 orders keys by optimizer group and restores a tied weight (the MLM decoder,
    tied to the word embeddings) only where DeepSpeed recorded the sharing, which can differ
    between TP ranks; the tie is rebuilt after loading, so tied copies are dropped here.
    """
    keys = [k for k in sds[0] if k not in tied]
    for r, sd in enumerate(sds):
        extra = set(sd) - set(keys) - tied
        missing = set(keys) - set(sd)
        if extra or missing:
            raise RuntimeError(
                f"{where}: tensor-parallel rank {r} has other parameters than rank 0 (missing {sorted(missing)[:8]}, "
                f"extra {sorted(extra)[:8]}); the checkpoint is incomplete or mixes runs"
            )
    return [{k: sd[k] for k in keys} for sd in sds]


def load_checkpoint_model(ckpt: str | os.PathLike):
    """The model a checkpoint holds, as an unsharded fp32 ``PreTrainedModel`` (CPU, eval mode)."""
    import littlebird_ds  # registers the model classes
    import transformers
    from transformers import AutoConfig

    root, tag = resolve_checkpoint(ckpt)
    tag_dir = root / tag
    problem = verify_checkpoint(tag_dir)
    if problem is not None:
        raise ValueError(f"checkpoint {tag_dir} is corrupt: {problem}; export an earlier step_* directory of {root}")
    meta = read_meta(tag_dir)
    tp = int(meta.get("tensor_parallel", 1))
    # AutoConfig: a run may train a Hugging Face model too (the BERT teacher of `pretrain`).
    config = AutoConfig.from_pretrained(tag_dir)
    cls_name = meta.get("model_class", "LittleBirdForMaskedLM")
    cls = getattr(littlebird_ds, cls_name, None) or getattr(transformers, cls_name, None)
    if cls is None:
        raise ValueError(f"{tag_dir}: unknown model class {cls_name!r}; expected one of littlebird_ds's model classes")
    tied = set(getattr(cls, "_tied_weights_keys", None) or {})
    sds = gather_state_dicts(root, tag, tp)
    if tp > 1:
        sds = _common_keys(sds, tied, tag_dir)
        try:
            from littlebird_ds.parallel import merge_tensor_parallel_state_dicts
        except ImportError as e:
            raise RuntimeError(
                f"{tag_dir} was trained with tensor-parallel size {tp}; merging its shards needs "
                f"littlebird_ds.parallel.merge_tensor_parallel_state_dicts, which failed to import: {e}"
            ) from e
        sd = merge_tensor_parallel_state_dicts(sds, config)
    else:
        sd = sds[0]
    model = cls(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"{tag_dir} does not match {cls_name}({config.model_type}): missing {missing[:8]}, "
            f"unexpected {list(unexpected)[:8]}"
        )
    model.tie_weights()
    return model.eval()


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Export ``ckpt`` (a checkpoint root, a ``step_*`` directory, or a training OUT directory)
    to ``out`` with ``save_pretrained`` (safetensors) and the tokenizer; returns ``out``."""
    root, tag = resolve_checkpoint(ckpt)
    model = load_checkpoint_model(root / tag)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok = root / tag / "tokenizer"
    if tok.is_dir():
        for f in tok.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    return out
