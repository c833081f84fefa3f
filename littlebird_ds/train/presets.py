"""Model presets as data, and ``build_model`` for the training commands.

Two model kinds share the presets' widths:

* ``littlebird``: :class:`~littlebird_ds.LittleBirdConfig` (no position embeddings; any
  length; ``block_size`` ``b`` and ``pack_size`` ``s`` set the attention pattern);
* ``bert``: a short-input teacher, Hugging Face ``BertConfig`` with 512 learned positions,
  the same width, depth, heads and FFN as the LittleBird preset of the same name, so a
  distilled student can copy its weights (spec section 5).

Presets (``hidden / layers / heads / FFN``, LittleBird ``block / pack``):

=======  ====================  =========
tiny     128 / 3 / 4 / 512     32 / 16   CPU tests and the 20-minute pipeline
small    256 / 4 / 4 / 1024    64 / 64
base     768 / 12 / 12 / 3072  64 / 64   spec section 4
large    1024 / 24 / 16 / 4096 64 / 64   spec section 4
=======  ====================  =========

Instead of a preset name, a JSON or YAML file of config fields may be given (for ``bert``,
``BertConfig`` fields), or a directory with a ``config.json`` (a saved model's config: the
architecture only, no weights). ``vocab_size`` and ``pad_token_id`` always come from the
tokenizer, so a preset fits any tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

ModelKind = Literal["littlebird", "bert"]
HeadKind = Literal["mlm", "qa"]

MODEL_KINDS: tuple[str, ...] = ("littlebird", "bert")
HEADS: tuple[str, ...] = ("mlm", "qa")

#: Positions of the BERT teacher presets (a standard short-input encoder).
BERT_MAX_POSITIONS = 512

#: Width, depth, heads and FFN shared by both kinds.
_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}

#: LittleBirdConfig fields per preset.
LITTLEBIRD_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**_SIZES["tiny"], "block_size": 32, "pack_size": 16},
    "small": {**_SIZES["small"], "block_size": 64, "pack_size": 64},
    "base": {**_SIZES["base"], "block_size": 64, "pack_size": 64},
    "large": {**_SIZES["large"], "block_size": 64, "pack_size": 64},
}

#: BertConfig fields per preset (the teacher of the LittleBird preset of the same name).
BERT_PRESETS: dict[str, dict[str, Any]] = {
    name: {**sizes, "max_position_embeddings": BERT_MAX_POSITIONS, "type_vocab_size": 2}
    for name, sizes in _SIZES.items()
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"littlebird": LITTLEBIRD_PRESETS, "bert": BERT_PRESETS}


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Config fields from a JSON/YAML file, or from ``DIR/config.json``.

    Raises ``FileNotFoundError``/``ValueError`` naming the file and the problem.
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model config directory {p} has no config.json; pass a preset name, "
                                    "a .json/.yaml file of config fields, or a saved model directory")
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"model config {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            fields = yaml.safe_load(text)
        else:
            fields = json.loads(text)
    except Exception as e:  # noqa: BLE001 - json and yaml raise different types
        raise ValueError(f"model config {p} cannot be parsed: {e}") from e
    if not isinstance(fields, dict):
        raise ValueError(f"model config {p} must hold a mapping of config fields, got {type(fields).__name__}")
    return fields


def config_fields(kind: str, preset_or_config_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config fields a preset name or config file gives (a copy, safe to modify)."""
    _check_kind(kind)
    name = os.fspath(preset_or_config_path)
    if name in PRESETS[kind]:
        return dict(PRESETS[kind][name])
    if not Path(name).exists():
        raise ValueError(
            f"unknown {kind} preset {name!r} and no such file; choose one of {sorted(PRESETS[kind])} "
            "or pass a .json/.yaml file of config fields"
        )
    fields = read_config_file(name)
    # A saved model's config.json carries bookkeeping keys that must not be re-applied.
    for key in ("architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "dtype",
                "torch_dtype"):
        fields.pop(key, None)
    return fields


def dropout_overrides(dropout: float | None) -> dict[str, float]:
    """Config fields for a training command's ``--dropout P`` (hidden and attention dropout);
    ``{}`` for ``None`` (the model's own). Raises ``ValueError`` outside ``[0, 1)``."""
    if dropout is None:
        return {}
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--dropout {dropout} must be in [0, 1)")
    return {"hidden_dropout_prob": float(dropout), "attention_probs_dropout_prob": float(dropout)}


def build_config(kind: str, preset_or_config_path: str | os.PathLike[str], vocab_size: int, pad_token_id: int,
                 **overrides: Any):
    """A ``LittleBirdConfig`` or ``BertConfig`` from a preset or config file.

    ``vocab_size`` and ``pad_token_id`` (from the tokenizer) and ``overrides`` win over the
    preset's fields. Raises ``ValueError`` for unknown presets and invalid fields.
    """
    fields = config_fields(kind, preset_or_config_path)
    fields.update(vocab_size=int(vocab_size), pad_token_id=int(pad_token_id), **overrides)
    if kind == "littlebird":
        from ..config import LittleBirdConfig

        try:
            return LittleBirdConfig(**fields)
        except TypeError as e:
            raise ValueError(f"invalid LittleBird config from {preset_or_config_path!r}: {e}") from e
    from transformers import BertConfig

    config = BertConfig(**fields)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"BERT config from {preset_or_config_path!r}: num_attention_heads "
                         f"{config.num_attention_heads} does not divide hidden_size {config.hidden_size}")
    return config


def build_model(kind: str, preset_or_config_path: str | os.PathLike[str], vocab_size: int, pad_token_id: int,
                head: str = "mlm", **overrides: Any):
    """A freshly initialised model of ``kind`` with a masked-LM or extractive-QA head.

    Args:
        kind: ``"littlebird"`` or ``"bert"`` (the 512-position teacher).
        preset_or_config_path: a preset name (``tiny``, ``small``, ``base``, ``large``), a
            JSON/YAML file of config fields, or a directory holding ``config.json``.
        vocab_size, pad_token_id: from the tokenizer (``len(tokenizer)``, its pad id).
        head: ``"mlm"`` (``*ForMaskedLM``) or ``"qa"`` (``*ForQuestionAnswering``).
        overrides: further config fields, e.g. ``hidden_dropout_prob=0.0``.

    Returns:
        ``LittleBirdForMaskedLM``/``LittleBirdForQuestionAnswering`` or
        ``BertForMaskedLM``/``BertForQuestionAnswering``.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    config = build_config(kind, preset_or_config_path, vocab_size, pad_token_id, **overrides)
    if kind == "littlebird":
        from ..model import LittleBirdForMaskedLM, LittleBirdForQuestionAnswering

        return (LittleBirdForMaskedLM if head == "mlm" else LittleBirdForQuestionAnswering)(config)
    from transformers import BertForMaskedLM, BertForQuestionAnswering

    return (BertForMaskedLM if head == "mlm" else BertForQuestionAnswering)(config)


def max_positions(config) -> int | None:
    """The longest input a config's model accepts: BERT's position count, None for LittleBird."""
    if getattr(config, "model_type", None) == "littlebird":
        return None
    return getattr(config, "max_position_embeddings", None)
