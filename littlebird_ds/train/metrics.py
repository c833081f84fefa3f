"""Where a training run's records go: ``OUT/metrics.jsonl``, TensorBoard (``OUT/tb``, tags
grouped ``train/`` and ``eval/``) and, with ``--wandb-project``, Weights & Biases; rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from ..utils.io import atomic_write_text


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key, grouped as TensorBoard shows sections:
    ``eval_f1@4096`` -> ``eval/f1@4096``, ``loss`` -> ``train/loss``, ``lr`` -> ``train/lr``."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


class MetricsLogger:
    """metrics.jsonl + TensorBoard (+ Weights & Biases with ``--wandb-project``) on rank 0;
    no-op elsewhere."""

    def __init__(self, out: Path, rank: int, resumed_at: int = 0, wandb_project: str | None = None,
                 settings: dict | None = None):
        self.rank = rank
        self.file = self.tb = self.wandb = None
        if rank != 0:
            return
        if wandb_project:
            self.wandb = _wandb_run(out, wandb_project, settings or {})
        path = out / "metrics.jsonl"
        if resumed_at > 0 and path.exists():
            # Drop records past the checkpoint (a killed run logged them); the resumed run re-logs them.
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resumed_at]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resumed_at + 1 if resumed_at else None)
        except ImportError:  # tensorboard is a dependency; still, never fail a run over logging
            self.tb = None

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {tensorboard_tag(k): v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(out: Path, project: str, settings: dict):
    """A W&B run named after OUT, its id kept in ``OUT/wandb_run_id`` so a resumed run continues it."""
    import wandb  # checked by the argument checks

    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    atomic_write_text(id_file, run_id + "\n")
    config = {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return wandb.init(project=project, name=out.name, id=run_id, resume="allow", dir=str(out), config=config)
