"""The main job end to end on a few short books with tiny step counts, and its resume rule."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from littlebird_ds.data.corpus import load_corpus

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["vocab_size=700", "teacher_steps=4", "teacher_length=128", "distill_steps=4", "distill_length=128",
        "further_steps=4", "further_length=256", "qa_steps=4", "qa_length=256", "qa_curriculum=128:0.5,256:0.5",
        "eval_lengths=256,512", "batch_size=4", "questions_per_document=6,3,3",
        "validation_fraction=0.25"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-corpus")
    for d in load_corpus("chichewa-bible")[50:62]:  # twelve mid-length epistles
        (root / f"{d.id.replace('/', '_')}.txt").write_text(d.text, encoding="utf-8")
    return root


def _pipeline(out, corpus, *extra):
    cmd = [sys.executable, "-m", "littlebird_ds.cli", "pipeline", "--out", str(out), "--corpus", str(corpus)]
    for s in TINY:
        cmd += ["--set", s]
    cmd += extra  # after TINY: a --set here wins
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1500)


def test_pipeline_runs_every_stage_writes_a_report_and_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    res = _pipeline(out, corpus)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    for stage in ("tokenizer", "teacher", "distill", "further", "qa-data", "qa", "evaluate", "report"):
        assert (out / stage / "DONE.json").exists(), stage
    report = json.loads((out / "report.json").read_text())
    # The default run trains and evaluates one QA model, the product.
    assert set(report["qa_f1_by_length"]) == {"pretrained_pi"}
    assert set(report["qa_f1_by_length"]["pretrained_pi"]) in ({"256", "512"}, {256, 512})
    for row in report["qa_f1_by_length"]["pretrained_pi"].values():  # every F1 with its 95% interval
        assert row["f1_ci95"][0] <= row["f1"] <= row["f1_ci95"][1]
    assert {"qa_learned", "long_contexts", "distillation", "padding_insertion", "pretraining_pays"} <= set(report["checks"])
    assert "--ablations" in report["checks"]["pretraining_pays"]["not_measured"]
    # The question is global: the student carries bialibi_global_keys = block size from distillation on.
    for model in (out / "distill" / "final", out / "further" / "final", out / "qa" / "pretrained_pi" / "final"):
        config = json.loads((model / "config.json").read_text())
        assert config["bialibi_global_keys"] == config["block_size"] == 32, model
    md = (out / "report.md").read_text()
    assert "QA test F1 / EM by context length" in md and (out / "report_qa_f1.png").exists() and (out / "report_losses.png").exists()
    # A finished stage is not redone; --ablations adds the two comparisons to the finished run.
    before = {st: (out / st / "DONE.json").read_text() for st in ("teacher", "further")}
    product = (out / "qa" / "pretrained_pi.log").read_text()
    res = _pipeline(out, corpus, "--ablations")
    assert res.returncode == 0, res.stderr[-3000:]
    assert {st: (out / st / "DONE.json").read_text() for st in before} == before
    assert (out / "qa" / "pretrained_pi.log").read_text() == product  # the product is not retrained
    report = json.loads((out / "report.json").read_text())
    assert set(report["qa_f1_by_length"]) == {"pretrained_pi", "pretrained_no_pi", "random_pi"}
    assert "f1_random_init_ci95" in report["checks"]["pretraining_pays"]
    assert "not_measured" not in report["checks"]["padding_insertion"]
    # An unfinished training stage continues from its last checkpoint, not from step 0.
    (out / "further" / "DONE.json").unlink()
    res = _pipeline(out, corpus)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--resume: continuing from step 4 of 4" in (out / "further" / "log.txt").read_text()
    assert (out / "further" / "DONE.json").exists()
    # A changed setting reruns the stages that depend on it, and only those; their old folders are
    # kept under OUT/stale/. The test sets are made at the new lengths, and the QA model retrains
    # on the remade data.
    before = {st: (out / st / "DONE.json").read_text() for st in ("tokenizer", "teacher", "distill", "further")}
    res = _pipeline(out, corpus, "--set", "eval_lengths=256")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage qa-data: rerunning, its inputs changed (eval_lengths: [256, 512] -> (256,))" in res.stdout + res.stderr
    assert {st: (out / st / "DONE.json").read_text() for st in before} == before
    assert (out / "qa-data" / "test-256.json").exists() and not (out / "qa-data" / "test-512.json").exists()
    stale = sorted(p.name.rsplit("-", 2)[0] for p in (out / "stale").iterdir())
    assert stale == ["evaluate", "qa", "qa-data"], stale
    report = json.loads((out / "report.json").read_text())
    assert set(report["qa_f1_by_length"]["pretrained_pi"]) in ({"256"}, {256})


def test_pipeline_with_the_minilm_teacher_skips_teacher_training_and_distills_on_clean_text(corpus, tmp_path):
    out = tmp_path / "run"
    res = _pipeline(out, corpus, "--teacher", "minilm")
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    for stage in ("tokenizer", "distill", "further", "qa-data", "qa", "evaluate", "report"):
        assert (out / stage / "DONE.json").exists(), stage
    assert not (out / "teacher").exists()
    assert json.loads((out / "distill" / "DONE.json").read_text())["loss"] == "hidden-state MSE on clean text"
    assert "--mask-rate 0 --kl-weight 0 --mlm-weight 0" in (out / "distill" / "log.txt").read_text()
    assert json.loads((out / "distill" / "final" / "config.json").read_text())["hidden_size"] == 384  # MiniLM's width
    report = json.loads((out / "report.json").read_text())
    assert {"qa_learned", "long_contexts", "distillation"} <= set(report["checks"])
    assert 0 < report["checks"]["distillation"]["final_hidden_cosine"] <= 1
    md = (out / "report.md").read_text()
    assert "Teacher `minilm`, given (not trained here)" in md and "| teacher |" not in md


def test_unknown_setting_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "littlebird_ds.cli", "pipeline", "--out", str(tmp_path), "--set", "warp=9"],
                         capture_output=True, text=True, env=ENV)
    assert res.returncode != 0 and "expected KEY=VALUE with KEY one of" in res.stderr


def _fake_run(out, f1s, half_width=3.0):
    """An OUT folder holding only the evaluation results: run -> {length: F1}, each with a 95%
    interval of +-half_width."""
    (out / "evaluate").mkdir(parents=True)
    for run, by in f1s.items():
        by_length = {str(n): {"f1": f1, "exact_match": 0.0, "total": 200, "f1_ci95": [f1 - half_width, f1 + half_width]}
                     for n, f1 in by.items()}
        (out / "evaluate" / f"{run}.json").write_text(json.dumps({"by_length": by_length}))


def test_report_calls_qa_comparisons_not_shown_when_the_models_are_near_chance(tmp_path):
    from littlebird_ds.report import summarize

    # Near chance: PI is "within 10 points" and "ahead" by noise; that is not evidence.
    _fake_run(tmp_path / "chance", {"pretrained_pi": {512: 3.4, 4096: 2.9}, "pretrained_no_pi": {512: 7.3, 4096: 0.3},
                                    "random_pi": {512: 2.0, 4096: 1.0}}, half_width=0.5)
    checks = summarize(tmp_path / "chance", {"qa_length": 512})["checks"]
    for key in ("long_contexts", "padding_insertion", "pretraining_pays"):
        assert checks[key]["passed"] is False and "has not learned the task" in checks[key]["not_shown"]
    assert checks["qa_learned"]["passed"] is False and checks["qa_learned"]["f1"] == 3.4
    # A model that learned the task: the same rules decide.
    _fake_run(tmp_path / "learned", {"pretrained_pi": {512: 40.0, 4096: 35.0}, "pretrained_no_pi": {512: 41.0, 4096: 5.0},
                                     "random_pi": {512: 20.0, 4096: 10.0}})
    checks = summarize(tmp_path / "learned", {"qa_length": 512})["checks"]
    for key in ("qa_learned", "long_contexts", "padding_insertion", "pretraining_pays"):
        assert checks[key]["passed"] is True and "not_shown" not in checks[key], key
    _fake_run(tmp_path / "drop", {"pretrained_pi": {512: 40.0, 4096: 20.0}, "pretrained_no_pi": {512: 41.0, 4096: 5.0},
                                  "random_pi": {512: 45.0, 4096: 10.0}})
    checks = summarize(tmp_path / "drop", {"qa_length": 512})["checks"]
    assert checks["long_contexts"]["passed"] is False and checks["pretraining_pays"]["passed"] is False
    assert checks["padding_insertion"]["passed"] is True  # 20 against 5 at 4096: ahead, intervals apart


def test_a_comparison_is_shown_only_when_the_95_percent_intervals_separate(tmp_path):
    from littlebird_ds.report import summarize

    # Ahead by 6 F1 at 512 and by 4 at 4096, but with +-3.5 intervals: both overlap, neither is shown.
    runs = {"pretrained_pi": {512: 40.0, 4096: 35.0}, "pretrained_no_pi": {512: 40.0, 4096: 31.0},
            "random_pi": {512: 34.0, 4096: 30.0}}
    _fake_run(tmp_path / "wide", runs, half_width=3.5)
    checks = summarize(tmp_path / "wide", {"qa_length": 512})["checks"]
    assert checks["padding_insertion"]["passed"] is False
    assert checks["padding_insertion"]["by_length"][4096]["separated"] is False
    assert checks["pretraining_pays"]["passed"] is False and checks["pretraining_pays"]["f1_gain_at_train_length"] == 6.0
    # The same means with +-1.5 intervals: both separate.
    _fake_run(tmp_path / "narrow", runs, half_width=1.5)
    checks = summarize(tmp_path / "narrow", {"qa_length": 512})["checks"]
    assert checks["padding_insertion"]["passed"] is True and checks["pretraining_pays"]["passed"] is True
    # Without --ablations the comparisons are not measured, and the report says how to measure them.
    _fake_run(tmp_path / "product", {"pretrained_pi": runs["pretrained_pi"]})
    checks = summarize(tmp_path / "product", {"qa_length": 512})["checks"]
    for key in ("padding_insertion", "pretraining_pays"):
        assert "--ablations" in checks[key]["not_measured"]


def test_an_existing_teacher_brings_its_tokenizer_and_the_random_baseline_copies_the_student(tmp_path):
    from transformers import AutoTokenizer

    from littlebird_ds.pipeline import Pipeline, PipelineOptions
    from littlebird_ds.train.distill import resolve_teacher_path

    pipe = Pipeline(PipelineOptions(out=tmp_path / "run", teacher="minilm", ablations=True), echo=lambda s: None)
    assert [name for name, _ in pipe.stages()][:2] == ["tokenizer", "distill"]  # no teacher pretraining
    info = pipe.stage_tokenizer()
    theirs = AutoTokenizer.from_pretrained(resolve_teacher_path("minilm"))
    ours = AutoTokenizer.from_pretrained(info["tokenizer"])
    assert ours.get_vocab() == theirs.get_vocab() and info["vocab_size"] == len(theirs)
    assert not (tmp_path / "run" / "tokenizer.tmp").exists()
    # The random-init QA run is the pretrained model's architecture with fresh weights.
    runs = pipe.qa_runs()
    assert runs["random_pi"] == runs["pretrained_pi"] + ["--random-init"]


def test_a_teacher_without_a_tokenizer_is_a_clear_error_and_leaves_no_tokenizer(tmp_path):
    from transformers import BertConfig, BertModel

    from littlebird_ds.pipeline import Pipeline, PipelineOptions

    teacher = tmp_path / "teacher"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(teacher)  # weights only, no tokenizer
    pipe = Pipeline(PipelineOptions(out=tmp_path / "run", teacher=str(teacher)), echo=lambda s: None)
    with pytest.raises(ValueError, match="no tokenizer loads from .*the pipeline reuses the teacher's tokenizer"):
        pipe.stage_tokenizer()
    assert not (tmp_path / "run" / "tokenizer").exists()
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Pipeline(PipelineOptions(out=tmp_path / "run", teacher=str(tmp_path / "nothing")), echo=lambda s: None).stage_tokenizer()


def test_distillation_reads_clean_text_and_matches_states_only_when_the_teacher_has_no_mlm_head(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from littlebird_ds.pipeline import Pipeline, PipelineOptions

    def loss_args(teacher):
        return Pipeline(PipelineOptions(out=tmp_path / "run", teacher=str(teacher)), echo=lambda s: None).distill_loss_args()

    clean = ["--mask-rate", "0", "--kl-weight", "0", "--mlm-weight", "0", "--mse-weight", "1"]
    assert loss_args("minilm") == clean  # all-MiniLM-L6-v2 ships without an MLM head
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path / "encoder")
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    assert loss_args(tmp_path / "encoder") == clean
    assert loss_args(tmp_path / "mlm") == []  # span masking with KL, MSE and the student's own MLM loss


def test_the_ablation_qa_runs_differ_only_in_padding_insertion_and_initialisation(tmp_path, monkeypatch):
    from littlebird_ds.pipeline import Pipeline, PipelineOptions

    assert list(Pipeline(PipelineOptions(out=tmp_path / "one"), echo=lambda s: None).qa_runs()) == ["pretrained_pi"]
    pipe = Pipeline(PipelineOptions(out=tmp_path / "run", ablations=True,
                                    overrides={"qa_bialibi_lr_scale": 30.0, "qa_pi_start_fraction": 0.5}),
                    echo=lambda s: None)
    calls = {}

    def run(self, stage, argv, **kw):
        calls[kw["log_name"]] = argv
        (self.dir("qa") / kw["log_name"].removesuffix(".log")).mkdir(parents=True)

    monkeypatch.setattr(Pipeline, "_run", run)
    pipe.stage_qa()
    assert set(calls) == {"pretrained_pi.log", "pretrained_no_pi.log", "random_pi.log"}
    for argv in calls.values():  # the slopes' learning rate is the same in all three
        assert argv[argv.index("--bialibi-lr-scale") + 1] == "30.0"
    pi = calls["pretrained_pi.log"]
    assert pi[pi.index("--pi-factor") + 1] == "4" and "--no-padding-insertion" not in pi
    assert pi[pi.index("--pi-start-fraction") + 1] == "0.5"
    no_pi = calls["pretrained_no_pi.log"]
    assert "--pi-factor" not in no_pi and "--pi-start-fraction" not in no_pi and "--no-padding-insertion" in no_pi
    assert "--random-init" in calls["random_pi.log"]
    strip = {"--pi-factor", "4", "--pi-start-fraction", "0.5", "--no-padding-insertion", "--random-init"}
    common = [[a for a in argv if a not in strip and "/qa/" not in a] for argv in calls.values()]
    assert common[0] == common[1] == common[2]


def test_launcher_prefix_names_the_module_the_way_each_launcher_takes_it():
    from littlebird_ds.pipeline import launcher_prefix

    assert launcher_prefix("torchrun --nproc_per_node 2") == ["torchrun", "--nproc_per_node", "2", "-m",
                                                              "littlebird_ds.cli"]
    assert launcher_prefix("/opt/venv/bin/deepspeed --num_accelerators 2")[-2:] == ["--module", "littlebird_ds.cli"]
    assert launcher_prefix("accelerate launch --num_processes 2")[-2:] == ["-m", "littlebird_ds.cli"]
    with pytest.raises(ValueError, match="--launcher is empty"):
        launcher_prefix("  ")


def test_pipeline_on_two_simulated_nodes_with_the_deepspeed_launcher_reports_as_one_process(corpus, tmp_path):
    """The same pipeline command on two nodes (launch/deepspeed_multinode.sh, launch/hostfile,
    --no_ssh, loopback; NODE_RANK 0 and 1, one process each, ZeRO-2) and in one process: with
    the same global batch and micro-batch (one process accumulates 2 micro-batches), every
    training stage trains the same model, so the reports agree (losses to 1e-4, F1 exactly)."""
    from conftest import free_port, launch_env, run_together

    root = Path(__file__).resolve().parents[1]
    zero2 = str(root / "ds_configs" / "zero2_fp32.json")
    common = ["--corpus", str(corpus), "--deepspeed", zero2]
    for s in [*TINY, "batch_size=4", "micro_batch_size=2"]:
        common += ["--set", s]
    cli = [sys.executable, "-m", "littlebird_ds.cli", "pipeline"]
    ref, run = tmp_path / "one", tmp_path / "two"
    run_together([([*cli, "--out", str(ref), *common], launch_env())], "one process", 1500)
    launcher = ["--launcher", f"bash {root / 'launch' / 'deepspeed_multinode.sh'}"]
    port = str(free_port())
    run_together([([*cli, "--out", str(run), *launcher, *common], launch_env(NODE_RANK=str(r), NPROC_PER_NODE="1",
                                                                           MASTER_PORT=port)) for r in (0, 1)],
                 "pipeline on two nodes", 1500)
    for stage in ("teacher", "distill", "further", "qa/pretrained_pi"):
        meta = json.loads(next((run / stage / "checkpoints").glob("step_*/littlebird_checkpoint.json")).read_text())
        assert meta["world_size"] == 2 and meta["zero_stage"] == 2, (stage, meta)
    assert (run / "teacher" / "log.node1.txt").exists() and (run / "qa" / "pretrained_pi.node1.log").exists()
    a, b = json.loads((run / "report.json").read_text()), json.loads((ref / "report.json").read_text())
    assert a["qa_f1_by_length"] == b["qa_f1_by_length"]
    assert a["checks"].keys() == b["checks"].keys()
    for key in ("final_losses", "final_eval"):
        assert a[key].keys() == b[key].keys()
    for name, loss in b["final_losses"].items():
        assert (loss is None) == (a["final_losses"][name] is None)
        if loss is not None:
            assert abs(a["final_losses"][name] - loss) <= 1e-4, (name, a["final_losses"][name], loss)
    for name, ev in b["final_eval"].items():
        for k, v in ev.items():
            if isinstance(v, float) and not k.endswith("seconds"):
                assert abs(a["final_eval"][name][k] - v) <= 1e-4, (name, k, a["final_eval"][name][k], v)


def test_a_yaml_recipe_sets_the_run_and_command_line_flags_win(tmp_path):
    import argparse

    from littlebird_ds.commands.pipeline import add_arguments, apply_recipe, parse_overrides

    recipe = tmp_path / "run.yaml"
    recipe.write_text("out: runs/from-recipe\ncorpus: my-corpus\nlanguage: en\nablations: true\n"
                      "settings:\n  qa_steps: 300\n  eval_lengths: [512, 4096]\n  lr: 0.0005\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = apply_recipe(p.parse_args(["--config", str(recipe), "--language", "nya", "--set", "lr=0.002"]))
    assert (args.out, args.corpus, args.language, args.ablations) == ("runs/from-recipe", "my-corpus", "nya", True)
    assert parse_overrides(args.set, "tiny") == {"qa_steps": 300, "eval_lengths": (512, 4096), "lr": 0.002}
    with pytest.raises(ValueError, match="--out is required"):
        apply_recipe(p.parse_args([]))
