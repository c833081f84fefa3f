"""The scale benchmark: its search, its memory guard and its outputs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from types import SimpleNamespace

from littlebird_ds.bench import scale


def test_search_doubles_then_bisects_to_the_limit(monkeypatch):
    tried = []

    def fake_attempt(mode, length, args, log):
        tried.append(length)
        ok = length <= 45_000
        return scale.Attempt(mode, length, ok, "" if ok else "out of memory", step_s=1.0 if ok else None,
                             peak_gb=1 + length / 8192 if ok else None)

    monkeypatch.setattr(scale, "attempt", fake_attempt)
    args = SimpleNamespace(start=8192, max_length=1 << 20, refine=2, granularity=4096)
    got = scale.search("sp2", args, io.StringIO(), lambda a: None)
    # 8k, 16k, 32k fit, 64k does not; then 48k (no: multiple of 4096 x SP=2), 40k (yes)
    assert tried == [8192, 16384, 32768, 65536, 49152, 40960]
    summary = scale.summarise(got, total_gb=24.0, reserve_gb=1.0)["sp2"]
    assert summary["longest_ok"] == 40960 and summary["shortest_failed"] == 49152
    assert abs(summary["gb_per_1k_tokens"] - 1024 / 8192) < 1e-9 and abs(summary["fixed_gb"] - 1) < 1e-9
    assert abs(summary["projected_max_length"] - (24 - 1 - 1) * 8192) <= 1


def test_one_step_is_measured_and_reported(tmp_path, monkeypatch):
    # A stale process-group description in the caller's environment (as an in-process engine
    # test leaves) must not reach the launches.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    out = tmp_path / "scale"
    subprocess.run([sys.executable, "-m", "littlebird_ds.bench.scale", "--size", "default", "--vocab-size", "1000",
                    "--lengths", "1024,8192", "--modes", "sp1", "--release-memory", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    data = json.loads((out / "scale.json").read_text())
    assert [a["length"] for a in data["attempts"]] == [1024, 8192]
    assert all(a["ok"] for a in data["attempts"]), [a["reason"] for a in data["attempts"]]
    assert all(a["ok"] and a["step_s"] > 0 and a["peak_gb"] > 0.1 for a in data["attempts"])
    assert data["summary"]["sp1"]["longest_ok"] == 8192 and "projected_max_length" in data["summary"]["sp1"]
    assert (out / "scale.png").stat().st_size > 0 and "| sp1 | 8,192 |" in (out / "scale.md").read_text()


def test_memory_guard_stops_a_step_as_out_of_memory(tmp_path):
    out = tmp_path / "scale"
    subprocess.run([sys.executable, "-m", "littlebird_ds.bench.scale", "--size", "default", "--vocab-size", "1000",
                    "--lengths", "1024", "--modes", "sp1", "--reserve-gb", "100000", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    (attempt,) = json.loads((out / "scale.json").read_text())["attempts"]
    assert not attempt["ok"] and attempt["reason"].startswith("out of memory")


def test_unknown_mode_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "littlebird_ds.cli", "scale", "--modes", "sp3", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "unknown mode 'sp3'" in res.stderr


def test_append_keeps_earlier_modes_and_replaces_what_is_tried_again(monkeypatch, tmp_path):
    import argparse

    def fake_attempt(mode, length, args, log):
        return scale.Attempt(mode, length, True, step_s=2.0, peak_gb=3.0, peak_gb_per_rank=[1.5, 1.5])

    monkeypatch.setattr(scale, "attempt", fake_attempt)
    old = [scale.Attempt("sp1", 8192, True, step_s=1.0, peak_gb=2.0).__dict__,
           scale.Attempt("sp2", 8192, True, step_s=9.0, peak_gb=9.0).__dict__]
    (tmp_path / "scale.json").write_text(json.dumps({"command": "first", "attempts": old}))
    p = argparse.ArgumentParser()
    scale.add_arguments(p)
    args = p.parse_args(["--modes", "sp2", "--lengths", "8192", "--append", "--out", str(tmp_path)])
    assert scale.run(args, command="second") == 0
    data = json.loads((tmp_path / "scale.json").read_text())
    got = {(a["mode"], a["length"]): a["peak_gb"] for a in data["attempts"]}
    assert got == {("sp1", 8192): 2.0, ("sp2", 8192): 3.0}
    assert data["command"] == "first ; second"
