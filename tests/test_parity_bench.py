"""The parity benchmark's own logic: cell comparison and argument errors (the launches it runs
are the ones tests/test_launch_commands.py runs in CI)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from littlebird_ds.bench import parity


def _run(root, losses: dict[int, float], evals: dict[int, float], weights: dict[str, torch.Tensor]):
    (root / "final").mkdir(parents=True)
    rows = [{"step": s, "loss": v, "lr": 1.0, "tokens_per_s": 123.0 * s} for s, v in losses.items()]
    rows += [{"step": s, "eval_f1": v, "eval_seconds": 9.0 * s} for s, v in evals.items()]
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    save_file(weights, root / "final" / "model.safetensors")
    return root


def _qa_weights(shift: float = 0.0) -> dict[str, torch.Tensor]:
    return {"littlebird.layers.0.output_LayerNorm.bias": torch.zeros(4),
            "littlebird.layers.1.output_LayerNorm.bias": torch.full((4,), shift),
            "littlebird.layers.1.ffn.output.weight": torch.ones(4, 4),
            "qa_outputs.bias": torch.full((2,), shift)}


def test_a_cell_reports_loss_eval_and_weight_differences_and_ignores_timings(tmp_path):
    ref = _run(tmp_path / "ref", {1: 5.0, 2: 4.0}, {2: 10.0}, _qa_weights())
    same = _run(tmp_path / "same", {1: 5.0, 2: 4.0 + 1e-7}, {2: 10.0}, _qa_weights())
    cell = parity.compare(same, ref)
    assert cell["status"] == "ok" and abs(cell["loss"] - 1e-7) < 1e-9 and cell["eval"] == 0 and cell["weights"] == 0
    off = _run(tmp_path / "off", {1: 5.0, 2: 4.01}, {2: 10.0}, _qa_weights())
    assert parity.compare(off, ref)["status"] == "differs"
    flat = _run(tmp_path / "flat", {1: 5.0, 2: 5.0}, {2: 10.0}, _qa_weights())
    assert parity.compare(flat, _run(tmp_path / "ref2", {1: 5.0, 2: 5.0}, {2: 10.0}, _qa_weights()))["status"] \
        == "did not train"


def test_zero_gradient_qa_biases_are_reported_apart_and_other_weights_are_not(tmp_path):
    ref = _run(tmp_path / "ref", {1: 5.0, 2: 4.0}, {}, _qa_weights())
    noisy = _run(tmp_path / "noisy", {1: 5.0, 2: 4.0}, {}, _qa_weights(shift=5e-4))
    cell = parity.compare(noisy, ref)
    assert cell["status"] == "ok" and cell["weights"] == 0 and abs(cell["zero_gradient_weights"] - 5e-4) < 1e-9
    moved = _qa_weights()
    moved["littlebird.layers.0.output_LayerNorm.bias"] += 5e-4  # not the last layer: a real difference
    assert parity.compare(_run(tmp_path / "moved", {1: 5.0, 2: 4.0}, {}, moved), ref)["status"] == "differs"


def test_unknown_mode_or_command_is_one_line_exit_2(tmp_path, capsys):
    from littlebird_ds.cli import main

    assert main(["parity", "--modes", "dp2-zero2,dp9", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dp9" in err[0] and "dp2-zero0" in err[0]
    assert main(["parity", "--commands", "pretrain,train", "--out", str(tmp_path / "p")]) == 2
    assert "unknown train" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
