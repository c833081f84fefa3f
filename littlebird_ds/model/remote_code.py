"""Model folders that load without littlebird-ds installed (Hugging Face "remote code").

Teams that train a model for their language publish it for others. ``save_pretrained`` of
every LittleBird model therefore writes, beside ``config.json`` and the weights, the model's
source code, and ``config.json``'s ``auto_map`` names its classes; anyone can then load the
folder (or the Hub repository it is pushed to) with only torch and transformers installed::

    AutoModelForQuestionAnswering.from_pretrained(path, trust_remote_code=True)

transformers' remote-code loader copies the module ``auto_map`` names and the modules it
imports with single-dot relative imports, from the same folder only; the package's modules
live in sub-packages and import each other with ``..``. So the code is flattened here: each
module of the model (``FLAT``) is written as one file, its relative imports rewritten to the
flat names. The source is the installed package's own, so a folder always carries the code
that wrote it. (transformers' ``register_for_auto_class`` copies a class's module and its
same-folder imports only, which cannot follow ``from ..config import``: hence this module.)
With littlebird-ds installed, the local classes are used and ``trust_remote_code`` is not
needed.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

#: The model's modules and their file names in a model folder (dependencies first).
FLAT: dict[str, str] = {
    "littlebird_ds.config": "configuration_littlebird",
    "littlebird_ds.model.layout": "littlebird_layout",
    "littlebird_ds.model.bialibi": "littlebird_bialibi",
    "littlebird_ds.model.attention.eager": "littlebird_attention_eager",
    "littlebird_ds.model.attention.blocked": "littlebird_attention_blocked",
    "littlebird_ds.model.attention.flex": "littlebird_attention_flex",
    "littlebird_ds.model.attention": "littlebird_attention",
    "littlebird_ds.model.layers": "littlebird_layers",
    "littlebird_ds.model.modeling": "modeling_littlebird",
    "littlebird_ds.model.task_heads": "littlebird_task_heads",
}

#: ``config.json``'s ``auto_map``: Auto class -> ``file.Class`` in the model folder.
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_littlebird.LittleBirdConfig",
    "AutoModel": "modeling_littlebird.LittleBirdModel",
    "AutoModelForMaskedLM": "modeling_littlebird.LittleBirdForMaskedLM",
    "AutoModelForQuestionAnswering": "modeling_littlebird.LittleBirdForQuestionAnswering",
    "AutoModelForSequenceClassification": "littlebird_task_heads.LittleBirdForSequenceClassification",
    "AutoModelForTokenClassification": "littlebird_task_heads.LittleBirdForTokenClassification",
    "AutoModelForMultipleChoice": "littlebird_task_heads.LittleBirdForMultipleChoice",
}

_RELATIVE = re.compile(r"^(?P<indent>[ \t]*)from (?P<dots>\.+)(?P<name>\w[\w.]*)? import (?P<what>.+)$", re.M)


def _absolute(module: str, is_package: bool, dots: str, name: str | None) -> str:
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (len(dots) - 1)]
    return ".".join(parts + ([name] if name else []))


def flat_source(module_name: str) -> str:
    """The source of ``module_name`` with its relative imports pointing at the flat files."""
    module = importlib.import_module(module_name)
    source = Path(module.__file__).read_text(encoding="utf-8")
    is_package = hasattr(module, "__path__")

    def rewrite(m: re.Match) -> str:
        indent, what = m["indent"], m["what"]
        target = _absolute(module_name, is_package, m["dots"], m["name"])
        if m["name"] is not None:
            if target not in FLAT:
                raise ValueError(f"{module_name} imports {target}, which is not in remote_code.FLAT; add it")
            return f"{indent}from .{FLAT[target]} import {what}"
        names, _, comment = what.partition("#")
        lines = []
        for name in (n.strip() for n in names.split(",")):  # `from . import flex`: submodules by name
            sub = f"{target}.{name}"
            if sub not in FLAT:
                raise ValueError(f"{module_name} imports {sub}, which is not in remote_code.FLAT; add it")
            # The second line is what transformers' loader looks for to copy the file.
            lines += [f"{indent}from . import {FLAT[sub]} as {name}" + (f"  #{comment}" if comment else ""),
                      f"{indent}from .{FLAT[sub]} import __name__ as _{name}_module  # noqa: F401,E402"]
        return "\n".join(lines)

    header = (f"# Written by littlebird-ds from {module_name} for transformers' trust_remote_code loading;\n"
              "# `pip install littlebird-ds` gives the maintained package. Do not edit here.\n")
    return header + _RELATIVE.sub(rewrite, source)


def write_remote_code(save_directory: str | os.PathLike) -> list[Path]:
    """Write the flattened model code into ``save_directory``; returns the files written."""
    out = Path(save_directory)
    written = []
    for module_name, file_name in FLAT.items():
        path = out / f"{file_name}.py"
        path.write_text(flat_source(module_name), encoding="utf-8")
        written.append(path)
    return written
