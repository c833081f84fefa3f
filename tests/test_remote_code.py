"""A saved model folder loads where littlebird-ds is not installed (trust_remote_code), and
still loads through the installed package without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import tiny_config
from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

import littlebird_ds  # noqa: F401 - registers the Auto classes

_LOAD_WITHOUT_PACKAGE = """
import sys
sys.modules["littlebird_ds"] = None  # as on a machine that only has the model folder
import torch, transformers
ref = torch.load(sys.argv[2], weights_only=True)
for name, folder in (("qa", "AutoModelForQuestionAnswering"), ("ner", "AutoModelForTokenClassification")):
    cls = getattr(transformers, folder)
    model = cls.from_pretrained(f"{sys.argv[1]}/{name}", trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        out = model(input_ids=ref["ids"], attention_mask=ref["mask"])
    got = out.start_logits if name == "qa" else out.logits
    torch.testing.assert_close(got, ref[name])
print("OK")
"""


def test_a_saved_model_loads_with_trust_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(5, 90, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    ref = {"ids": ids, "mask": mask}
    for name, cls in (("qa", AutoModelForQuestionAnswering), ("ner", AutoModelForTokenClassification)):
        model = cls.from_config(tiny_config(num_labels=5)).eval()
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        ref[name] = out.start_logits if name == "qa" else out.logits
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["auto_map"]["AutoModelForQuestionAnswering"] == "modeling_littlebird.LittleBirdForQuestionAnswering"
        # With the package installed, the local classes load it, trust_remote_code or not.
        again = cls.from_pretrained(tmp_path / name)
        assert type(again).__module__.startswith("littlebird_ds.")
    torch.save(ref, tmp_path / "ref.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_PACKAGE, str(tmp_path), str(tmp_path / "ref.pt")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stderr[-3000:]


def test_the_flattened_code_is_the_package_code_with_flat_imports():
    from littlebird_ds.model.remote_code import FLAT, flat_source

    import ast

    files = set(FLAT.values())
    for module_name in FLAT:
        tree = ast.parse(flat_source(module_name))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: one dot, a flat file beside it
                assert node.level == 1 and (node.module in files or node.module is None), (module_name, node.module)
                if node.module is None:
                    assert {a.name for a in node.names} <= files, module_name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("littlebird_ds"):
                # only the guarded import of save_pretrained, absent where the package is not installed
                assert node.module == "littlebird_ds.model.remote_code", (module_name, node.module)
