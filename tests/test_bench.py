"""The benchmark: FLOP count, one measured configuration, summaries, table and plot.

Nothing here times anything against a target: machines are noisy, the benchmark itself
reports ratios. These tests check that it measures and reports correctly, quickly.
"""

import ctypes.util
import json
import math

import pytest

from littlebird_ds.bench import flops, report, runner
from littlebird_ds.bench.systems import Size, build


def test_analytic_flops_match_flop_counter_on_a_small_length():
    size = Size.named("default")
    model, inputs = build("littlebird", size, 512, kernel="blocked")
    counted = flops.counted_forward_flops(model, inputs)
    l, s, d = 512, flops.PACK, size.hidden
    sdpa = size.layers * 4 * s * l * d  # pack attention's SDPA, which FlopCounterMode does not count
    analytic = flops.littlebird_forward_flops(size, 512)
    # The remaining difference is the tiny slopes @ patterns bias products (0.2%).
    assert abs(counted + sdpa - analytic) / analytic < 5e-3
    assert flops.littlebird_train_flops(size, 512) == 3 * analytic


def test_flops_at_16k_match_the_issue_estimate():
    # "a LittleBird training step at this size and length is about 440 GFLOP"
    assert 430e9 < flops.littlebird_train_flops(Size.named("default"), 16384) < 450e9


def test_worker_measures_times_and_memory_in_a_fresh_process():
    plan = runner.Plan(systems=["littlebird:blocked"], lengths=[256], steps=1, threads=1)
    res = runner.run_worker("littlebird:blocked", 256, plan)
    assert "error" not in res, res
    assert res["system"] == "littlebird:blocked" and res["kernels"] == {"infer": "blocked", "train": "blocked"}
    for mode in ("infer", "train"):
        assert res[mode]["median_s"] > 0 and len(res[mode]["times_s"]) == 1
        # The peak is the process's resident high-water mark: a real process holds megabytes.
        assert res[mode]["peak_bytes"] > 10 * 2**20, res[mode]
        assert isinstance(res[mode]["hwm_reset"], bool)
    assert res["release_memory"] is False


def test_release_memory_times_with_the_default_allocator_and_takes_the_peak_from_a_releasing_process(monkeypatch):
    # An --allocator is preloaded into the timed process only (libc itself: harmless to preload).
    plan = runner.Plan(systems=["bigbird"], lengths=[256], steps=2, threads=1, release_memory=True,
                       allocator=ctypes.util.find_library("c"))
    calls = []
    real = runner._run_worker

    def spy(name, length, plan, steps, release_memory):
        calls.append((steps, release_memory))
        res = real(name, length, plan, steps, release_memory)
        assert res.get("preloaded", "") == ("" if release_memory else plan.allocator)
        if "train" in res:
            res["train"]["peak_bytes"] = 111 if release_memory else 999  # which process the peak came from
        return res

    monkeypatch.setattr(runner, "_run_worker", spy)
    res = runner.run_worker("bigbird", 256, plan)
    assert "error" not in res, res
    assert calls == [(2, False), (1, True)]  # timed steps first, then one step for the peak
    assert res["release_memory"] is True and res["train"]["median_s"] > 0
    assert len(res["train"]["times_s"]) == 2 and len(res["train"]["release_times_s"]) == 1
    assert res["train"]["peak_bytes"] == 111 and res["train"]["default_allocator_peak_bytes"] == 999
    calls.clear()
    assert runner.run_worker("matmul", 0, plan)["flops_per_s"] > 0 and calls == [(2, False)]  # the probe runs once


def _fake(name, length, plan):
    if name == "matmul":
        return {"system": "matmul", "length": length, "flops_per_s": 1e11}
    base = {"littlebird": 1.0, "bigbird": 4.0, "longformer": 2.0, "bert": 0.5}[runner.split_system(name)[0]]
    power = 2 if name == "bert" else 1
    t = base * (length / 1024) ** power
    step = {"times_s": [t], "median_s": t, "peak_bytes": int(t * 1e8), "hwm_reset": True}
    return {"system": name, "length": length, "train": step, "infer": dict(step)}


def test_rounds_skips_summary_table_and_plot(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "run_worker", _fake)
    plan = runner.Plan(systems=["littlebird", "bigbird", "longformer", "bert"], lengths=[1024, 2048, 4096, 8192],
                       rounds=2, steps=1, max_step_s=20)
    results = runner.run(plan, progress=False)
    # BERT is quadratic: 0.5 * 4^2 = 8 s at 4096 runs, 32 s predicted at 8192 is skipped;
    # BigBird (16 s at 4096) too, at 32 s predicted.
    skipped = {(r["system"], r["length"]) for r in results if r.get("skipped")}
    assert skipped == {("bert", 8192), ("bigbird", 8192)}
    summary = report.summarise(results, plan)
    assert summary["ratios"]["littlebird"]["bigbird"]["4096"]["train_s"] == pytest.approx(0.25)
    assert summary["slopes"]["littlebird"]["train_s"] == pytest.approx(1.0)
    assert summary["slopes"]["bert"]["train_s"] == pytest.approx(2.0)
    frac = summary["table"]["littlebird"]["2048"]["train_fraction_of_matmul"]
    assert frac == pytest.approx(flops.littlebird_train_flops(Size.named("default"), 2048) / 2.0 / 1e11)
    paths = report.write(summary, results, tmp_path, "littlebird-ds bench --test")
    md = paths["markdown"].read_text()
    assert "0.25x" in md and "skipped" in md and "littlebird-ds bench --test" in md
    assert json.loads(paths["json"].read_text())["summary"]["matmul_flops_per_s"] == 1e11
    assert paths["png"].stat().st_size > 1000
    # Re-reporting the saved runs (alone or merged with another run) measures nothing.
    from littlebird_ds.cli import main

    assert main(["bench", "--report-only", str(paths["json"]), "--out", str(tmp_path / "again")]) == 0
    assert "0.25x" in (tmp_path / "again" / "bench.md").read_text()


def test_loglog_slope():
    assert report.loglog_slope([(1, 3), (2, 6), (4, 12)]) == pytest.approx(1.0)
    assert report.loglog_slope([(1, 1)]) is None
    assert math.isclose(report.loglog_slope([(10, 100), (100, 10000)]), 2.0)


def test_cli_rejects_bad_lengths_and_systems(capsys):
    from littlebird_ds.cli import main

    with pytest.raises(SystemExit) as e:  # the flag's own type check, in argparse
        main(["bench", "--lengths", "1024,999999"])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["bench", "--systems", "littlebird,reformer"]) == 2  # the command's check: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown system 'reformer'" in err[0], err


def test_allocator_names_resolve_or_fail_with_the_fix(tmp_path):
    assert runner.resolve_allocator("default") == ""
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"")
    assert runner.resolve_allocator(str(lib)) == str(lib)
    with pytest.raises(ValueError, match="no such file"):
        runner.resolve_allocator(str(tmp_path / "missing.so"))
    for name, (stems, package) in runner.ALLOCATORS.items():
        try:
            assert runner.resolve_allocator(name)  # installed here
        except ValueError as e:
            assert f"apt install {package}" in str(e)  # not installed: the message names the package
