"""DeepSpeed configs: the built-in default, reading a JSON file, filling ``"auto"`` batch
fields from the flags (Megatron-style global batch included) and taking accelerate's
DeepSpeed plugin settings from its environment. Used by :mod:`.engine`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


#: The built-in config when ``--deepspeed`` is not given: plain data parallel, fp32.
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 0},
    "bf16": {"enabled": False},
    "fp16": {"enabled": False},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


def deepspeed_config_path(args) -> str | None:
    """The DeepSpeed config file the arguments name: ``--deepspeed PATH``, or Megatron/DeepSpeed style
    ``--deepspeed --deepspeed_config PATH`` (or ``--deepspeed_config PATH`` alone); ``None`` for the built-in
    default. Raises ``ValueError`` when the two name different files or ``--deepspeed`` names none."""
    flag = getattr(args, "deepspeed", None)
    config = getattr(args, "deepspeed_config", None)
    path = flag if isinstance(flag, (str, os.PathLike)) else None
    if path is not None and config is not None and Path(path) != Path(config):
        raise ValueError(f"--deepspeed {path} and --deepspeed_config {config} name different configs; pass one")
    if flag is True and config is None:
        raise ValueError("--deepspeed without a path needs --deepspeed_config PATH (Megatron style), "
                         "or pass --deepspeed PATH (e.g. ds_configs/zero2_fp32.json)")
    return str(path if path is not None else config) if (path or config) else None


def load_ds_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; ``None`` gives a copy of :data:`DEFAULT_DS_CONFIG`.

    Raises ``FileNotFoundError``/``ValueError`` naming the file and the problem.
    """
    if path is None:
        return json.loads(json.dumps(DEFAULT_DS_CONFIG))
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"DeepSpeed config {p} does not exist; pass one of ds_configs/*.json "
            "(e.g. --deepspeed ds_configs/zero2_fp32.json) or omit --deepspeed for plain data parallel"
        )
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {p} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"DeepSpeed config {p} must be a JSON object, got {type(cfg).__name__}")
    if "zero_optimization" not in cfg:
        raise ValueError(
            f"DeepSpeed config {p} has no 'zero_optimization' key; add e.g. "
            '"zero_optimization": {"stage": 0} (see ds_configs/README.md)'
        )
    zo = cfg["zero_optimization"]
    if not isinstance(zo, dict) or zo.get("stage") not in (0, 1, 2, 3):
        raise ValueError(
            f"DeepSpeed config {p}: 'zero_optimization' must be an object with 'stage' 0, 1, 2 or 3, got {zo!r}"
        )
    return cfg


def _fill(cfg: dict, key: str, cli_value: int | None, default: int, flag: str, source: str) -> int:
    value = cfg.get(key, "auto")
    if value == "auto":
        value = cli_value if cli_value is not None else default
    elif cli_value is not None and int(value) != cli_value:
        raise ValueError(
            f"{flag} {cli_value} contradicts {key}={value} in {source}; set {key} to \"auto\" in the config "
            f"or drop {flag}"
        )
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r} (from {source} or {flag})")
    cfg[key] = value
    return value


def _split_global_batch(global_batch: int, micro: int | None, accum: int | None, dp_size: int) -> tuple[int, int]:
    """``(micro-batch, accumulation)`` for ``--global-batch-size``: ``G = micro x accum x dp``."""
    if global_batch % dp_size:
        raise ValueError(f"--global-batch-size {global_batch} does not split over {dp_size} data-parallel ranks; "
                         f"pass a multiple of {dp_size}")
    per_rank = global_batch // dp_size
    if micro is None:
        micro = max(1, per_rank // (accum or 1))
    if per_rank % micro:
        raise ValueError(f"--global-batch-size {global_batch} is {per_rank} examples per data-parallel rank "
                         f"({dp_size} rank(s)), not a whole number of micro-batches of {micro}; pass a --batch-size "
                         f"that divides {per_rank}")
    if accum is not None and accum != per_rank // micro:
        raise ValueError(f"--grad-accum {accum} contradicts --global-batch-size {global_batch} = --batch-size {micro} x "
                         f"{per_rank // micro} accumulation steps x {dp_size} rank(s); drop --grad-accum")
    return micro, per_rank // micro


def offloads_optimizer(cfg: Mapping) -> bool:
    dev = (cfg.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return dev not in (None, "none")


def resolve_ds_config(args, dp_size: int, source: str = "built-in default") -> dict[str, Any]:
    """The final DeepSpeed config: file (or default) with the batch fields and precision filled.

    Under ``accelerate launch`` with a DeepSpeed plugin and no ``--deepspeed``, the plugin's
    settings (ZeRO stage, offload, clipping) come from accelerate's environment.
    """
    cfg, source = base_ds_config(args, source)
    global_batch = getattr(args, "global_batch_size", None)
    micro_flag, accum_flag = getattr(args, "batch_size", None), getattr(args, "grad_accum", None)
    if global_batch is not None:
        micro_flag, accum_flag = _split_global_batch(int(global_batch), micro_flag, accum_flag, dp_size)
    micro = _fill(cfg, "train_micro_batch_size_per_gpu", micro_flag, 8, "--batch-size", source)
    accum = _fill(cfg, "gradient_accumulation_steps", accum_flag, 1, "--grad-accum", source)
    total = micro * accum * dp_size
    if cfg.get("train_batch_size", "auto") not in ("auto", total):
        raise ValueError(
            f"train_batch_size={cfg['train_batch_size']} in {source} is not micro-batch {micro} x grad-accum "
            f"{accum} x data-parallel {dp_size} = {total}; set it to \"auto\""
        )
    cfg["train_batch_size"] = total
    if getattr(args, "bf16", False) or os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16":
        cfg["bf16"] = {**(cfg.get("bf16") or {}), "enabled": True}
        cfg["fp16"] = {"enabled": False}
    if (cfg.get("fp16") or {}).get("enabled"):
        raise ValueError(f"{source} enables fp16; LittleBird trains in fp32 or bf16: use a *_bf16.json config")
    cfg.setdefault("steps_per_print", 1_000_000_000)
    return cfg


def base_ds_config(args, source: str = "built-in default") -> tuple[dict[str, Any], str]:
    """The config as given, before the batch fields are filled, and where it came from:
    ``--deepspeed``, accelerate's DeepSpeed plugin, or the built-in default."""
    path = deepspeed_config_path(args)
    cfg = load_ds_config(path)
    if path is not None:
        return cfg, str(path)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return _config_from_accelerate_env(cfg), "accelerate's DeepSpeed plugin"
    return cfg, source


def _config_from_accelerate_env(base: dict) -> dict:
    from accelerate.utils import DeepSpeedPlugin

    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and config_file.lower() != "none":
        return load_ds_config(config_file)
    plugin = DeepSpeedPlugin()  # reads ACCELERATE_DEEPSPEED_* from the launcher's environment
    cfg = json.loads(json.dumps(plugin.deepspeed_config, default=str))
    zo = cfg.setdefault("zero_optimization", {"stage": 0})
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zo.get(key), dict) and zo[key].get("device") in (None, "none"):
            zo.pop(key)
    if cfg.get("gradient_clipping") in (None, "auto"):
        cfg["gradient_clipping"] = base["gradient_clipping"]
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        cfg[key] = "auto"
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    cfg.setdefault("bf16", {"enabled": False})
    return cfg
