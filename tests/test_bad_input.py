"""Bad input through the public commands, the way users meet it.

Every case runs one ``littlebird-ds`` command line with one thing wrong and checks three
things: the exit code is 2, stderr ends in one line ``littlebird-ds <command>: error: ...``
(or argparse's own ``error:`` line) naming the problem, with no traceback, and every file
already in the workspace (earlier outputs: a model, a report, checkpoints) is byte-identical
afterwards. Commands that start a training process group run in a subprocess (the engine
owns its process); the others run in this process, which keeps the suite fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from littlebird_ds.cli import main

#: Outputs the cases name: none may exist after a case.
NEW_OUTPUTS = ("new-tok", "new-qa", "new-run", "new.json", "new-export", "new-pipeline")

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# id, command line ({ws}: the workspace), a fragment the error line must hold, run in a subprocess
CASES: list[tuple[str, list[str], str, bool]] = [
    # train-tokenizer
    ("tokenizer-corpus-missing", ["train-tokenizer", "--corpus", "{ws}/nope.txt", "--output", "{ws}/new-tok"], "nope.txt", False),
    ("tokenizer-corpus-empty", ["train-tokenizer", "--corpus", "{ws}/empty.txt", "--output", "{ws}/new-tok"], "empty", False),
    ("tokenizer-corpus-not-utf8", ["train-tokenizer", "--corpus", "{ws}/latin1.txt", "--output", "{ws}/new-tok"], "UTF-8", False),
    ("tokenizer-vocab-0", ["train-tokenizer", "--corpus", "{ws}/corpus.txt", "--output", "{ws}/new-tok", "--vocab-size", "0"], "vocab_size", False),
    ("tokenizer-vocab-too-large", ["train-tokenizer", "--corpus", "{ws}/corpus.txt", "--output", "{ws}/new-tok", "--vocab-size", "60000"], "vocab", False),
    ("tokenizer-recipe-missing", ["train-tokenizer", "--recipe", "{ws}/nope.yaml", "--output", "{ws}/new-tok"], "nope.yaml", False),
    ("tokenizer-output-is-a-file", ["train-tokenizer", "--corpus", "{ws}/corpus.txt", "--output", "{ws}/earlier/report.md", "--vocab-size", "300"], "report.md", False),
    ("tokenizer-bad-flag-value", ["train-tokenizer", "--corpus", "{ws}/corpus.txt", "--output", "{ws}/new-tok", "--vocab-size", "many"], "invalid int value", False),
    # make-qa
    ("make-qa-tokenizer-missing", ["make-qa", "--corpus", "{ws}/docs", "--tokenizer", "{ws}/nope", "--output", "{ws}/new-qa"], "nope", False),
    ("make-qa-corpus-missing", ["make-qa", "--corpus", "{ws}/nope", "--tokenizer", "{ws}/tok", "--output", "{ws}/new-qa"], "nope", False),
    ("make-qa-documents-too-short", ["make-qa", "--corpus", "{ws}/docs", "--tokenizer", "{ws}/tok", "--output", "{ws}/new-qa", "--lengths", "100000", "--train-lengths", "256"], "0 questions", False),
    ("make-qa-two-question-counts", ["make-qa", "--corpus", "{ws}/docs", "--tokenizer", "{ws}/tok", "--output", "{ws}/new-qa", "--questions-per-document", "1,2"], "three numbers", False),
    ("make-qa-length-0", ["make-qa", "--corpus", "{ws}/docs", "--tokenizer", "{ws}/tok", "--output", "{ws}/new-qa", "--lengths", "0"], "positive", False),
    ("make-qa-block-too-small", ["make-qa", "--corpus", "{ws}/docs", "--tokenizer", "{ws}/tok", "--output", "{ws}/new-qa", "--block-size", "2"], "block", False),
    ("make-qa-model-without-config", ["make-qa", "--corpus", "{ws}/docs", "--tokenizer", "{ws}/tok", "--output", "{ws}/new-qa", "--model", "{ws}/docs"], "config.json", False),
    ("make-qa-output-is-a-file", ["make-qa", "--corpus", "{ws}/docs", "--tokenizer", "{ws}/tok", "--output", "{ws}/earlier/report.md", "--lengths", "256", "--train-lengths", "256"], "report.md", False),
    # pretrain (a training process group: subprocess)
    ("pretrain-max-steps-negative", ["pretrain", "{pretrain}", "--max-steps", "-5"], "--max-steps", True),
    ("pretrain-batch-size-0", ["pretrain", "{pretrain}", "--batch-size", "0"], "--batch-size", True),
    ("pretrain-lr-negative", ["pretrain", "{pretrain}", "--lr", "-1"], "--lr", True),
    ("pretrain-deepspeed-config-missing", ["pretrain", "{pretrain}", "--deepspeed", "{ws}/nope.json"], "nope.json", True),
    ("pretrain-deepspeed-config-invalid-json", ["pretrain", "{pretrain}", "--deepspeed", "{ws}/bad.json"], "not valid JSON", True),
    ("pretrain-out-is-a-file", ["pretrain", "{pretrain_noout}", "--out", "{ws}/earlier/report.md"], "report.md", True),
    ("pretrain-tensor-parallel-2-in-one-process", ["pretrain", "{pretrain}", "--tensor-parallel", "2"], "--tensor-parallel", True),
    ("pretrain-corpus-missing", ["pretrain", "{pretrain_nocorpus}", "--corpus", "{ws}/nope.txt"], "nope.txt", True),
    ("pretrain-tokenizer-missing", ["pretrain", "{pretrain_notok}", "--tokenizer", "{ws}/nope"], "nope", True),
    ("pretrain-resume-no-intact-checkpoint", ["pretrain", "{pretrain_noout}", "--out", "{ws}/earlier/run", "--resume"], "no intact checkpoint", True),
    # distill
    ("distill-teacher-missing", ["distill", "--teacher", "{ws}/nope", "--tokenizer", "{ws}/tok", "--corpus", "{ws}/corpus.txt", "--out", "{ws}/new-run", "--max-steps", "1"], "nope", True),
    ("distill-dropout-out-of-range", ["distill", "--teacher", "{ws}/teacher", "--tokenizer", "{ws}/tok", "--corpus", "{ws}/corpus.txt", "--out", "{ws}/new-run", "--max-steps", "1", "--dropout", "1.5"], "--dropout", True),
    # finetune-qa
    ("finetune-train-missing", ["finetune-qa", "{finetune}", "--train", "{ws}/nope.json"], "nope.json", True),
    ("finetune-train-empty", ["finetune-qa", "{finetune}", "--train", "{ws}/empty.json"], "is empty", True),
    ("finetune-train-invalid-json", ["finetune-qa", "{finetune}", "--train", "{ws}/bad.json"], "not valid JSON", True),
    ("finetune-answer-without-start", ["finetune-qa", "{finetune}", "--train", "{ws}/qa_no_start.json"], "answer_start", True),
    ("finetune-model-missing", ["finetune-qa", "{finetune_nomodel}", "--model", "{ws}/nope"], "nope", True),
    ("finetune-curriculum-malformed", ["finetune-qa", "{finetune}", "--train", "{ws}/qa.json", "--curriculum", "128:2"], "--curriculum", True),
    ("finetune-dropout-negative", ["finetune-qa", "{finetune}", "--train", "{ws}/qa.json", "--dropout", "-0.1"], "--dropout", True),
    ("finetune-question-longer-than-block-0", ["finetune-qa", "{finetune}", "--train", "{ws}/qa_long_question.json"], "block 0", True),
    # evaluate-qa
    ("evaluate-model-missing", ["evaluate-qa", "--model", "{ws}/nope", "--data", "{ws}/qa.json", "--out", "{ws}/new.json"], "nope", False),
    ("evaluate-data-missing", ["evaluate-qa", "--model", "{ws}/model", "--data", "{ws}/nope.json", "--out", "{ws}/new.json"], "nope.json", False),
    ("evaluate-data-invalid-json", ["evaluate-qa", "--model", "{ws}/model", "--data", "{ws}/bad.json", "--out", "{ws}/new.json"], "not valid JSON", False),
    ("evaluate-answer-does-not-match", ["evaluate-qa", "--model", "{ws}/model", "--data", "{ws}/qa_bad_offset.json", "--out", "{ws}/new.json"], "does not match", False),
    ("evaluate-out-is-a-folder", ["evaluate-qa", "--model", "{ws}/model", "--data", "{ws}/qa.json", "--out", "{ws}/earlier"], "earlier", False),
    ("evaluate-max-examples-0", ["evaluate-qa", "--model", "{ws}/model", "--data", "{ws}/qa.json", "--out", "{ws}/new.json", "--max-examples", "0"], "--max-examples", False),
    # predict
    ("predict-model-missing", ["predict", "--model", "{ws}/nope", "--context", "{ws}/context.txt", "--question", "q?"], "nope", False),
    ("predict-context-missing", ["predict", "--model", "{ws}/model", "--context", "{ws}/nope.txt", "--question", "q?"], "nope.txt", False),
    ("predict-empty-question", ["predict", "--model", "{ws}/model", "--context", "{ws}/context.txt", "--question", " "], "question", False),
    ("predict-top-k-0", ["predict", "--model", "{ws}/model", "--context", "{ws}/context.txt", "--question", "q?", "--top-k", "0"], "--top-k", False),
    ("predict-context-not-utf8", ["predict", "--model", "{ws}/model", "--context", "{ws}/latin1.txt", "--question", "q?"], "UTF-8", False),
    # export
    ("export-checkpoint-missing", ["export", "{ws}/nope", "{ws}/new-export"], "nope", False),
    ("export-checkpoint-truncated", ["export", "{ws}/earlier/run/checkpoints", "{ws}/new-export"], "corrupt", False),
    ("export-out-is-a-file", ["export", "{ws}/good-ckpt", "{ws}/earlier/report.md"], "report.md", False),
    # pipeline
    ("pipeline-corpus-missing", ["pipeline", "--out", "{ws}/new-pipeline", "--corpus", "{ws}/nope"], "nope", False),
    ("pipeline-unknown-setting", ["pipeline", "--out", "{ws}/new-pipeline", "--set", "qa_stepz=3"], "qa_stepz", False),
    ("pipeline-setting-bad-value", ["pipeline", "--out", "{ws}/new-pipeline", "--set", "qa_steps=many"], "qa_steps", False),
    ("pipeline-out-is-a-file", ["pipeline", "--out", "{ws}/earlier/report.md"], "report.md", False),
    ("pipeline-node-rank-negative", ["pipeline", "--out", "{ws}/new-pipeline", "--node-rank", "-1"], "--node-rank", False),
    ("pipeline-recipe-missing", ["pipeline", "--config", "{ws}/nope.yaml"], "nope.yaml", False),
    ("pipeline-recipe-invalid-yaml", ["pipeline", "--config", "{ws}/bad.yaml"], "not valid YAML", False),
    ("pipeline-recipe-unknown-key", ["pipeline", "--config", "{ws}/unknown.yaml"], "qa_stepz", False),
]


def _expand(argv: list[str], ws: Path) -> list[str]:
    tok, corpus, model = str(ws / "tok"), str(ws / "corpus.txt"), str(ws / "model")
    groups = {
        "{pretrain}": ["--model-type", "littlebird", "--preset", "tiny", "--corpus", corpus, "--tokenizer", tok,
                       "--max-length", "128", "--max-steps", "1", "--out", str(ws / "new-run")],
        "{finetune}": ["--model", model, "--validation", str(ws / "qa.json"), "--max-length", "128",
                       "--max-steps", "1", "--out", str(ws / "new-run")],
    }
    groups["{pretrain_noout}"] = groups["{pretrain}"][:-2]
    groups["{pretrain_nocorpus}"] = [a for i, a in enumerate(groups["{pretrain}"]) if i not in (4, 5)]
    groups["{pretrain_notok}"] = [a for i, a in enumerate(groups["{pretrain}"]) if i not in (6, 7)]
    groups["{finetune_nomodel}"] = groups["{finetune}"][2:] + ["--train", str(ws / "qa.json")]
    out: list[str] = []
    for a in argv:
        out += groups[a] if a in groups else [a.replace("{ws}", str(ws))]
    return out


def _snapshot(ws: Path) -> dict[str, str]:
    return {p.relative_to(ws).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ws.rglob("*")) if p.is_file()}


def _qa_record(qid: str, context: str, answer: str, question: str = "Mulungu adalenga chiyani?") -> dict:
    return {"id": qid, "context": context, "question": question,
            "answers": [{"text": answer, "answer_start": context.index(answer)}]}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace with good inputs beside bad ones, and earlier outputs that must survive."""
    from littlebird_ds import LittleBirdConfig, LittleBirdForMaskedLM, LittleBirdForQuestionAnswering
    from littlebird_ds.data.corpus import load_corpus
    from littlebird_ds.data.tokenizer import train_tokenizer
    from littlebird_ds.train.checkpoint import write_manifest
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    ws = tmp_path_factory.mktemp("bad-input")
    docs = load_corpus("chichewa-bible")[50:56]
    (ws / "docs").mkdir()
    for d in docs:
        (ws / "docs" / f"{d.id.replace('/', '_')}.txt").write_text(d.text, encoding="utf-8")
    (ws / "corpus.txt").write_text("\n".join(d.text for d in docs), encoding="utf-8")
    (ws / "empty.txt").write_text("")
    (ws / "empty.json").write_text("")
    (ws / "latin1.txt").write_bytes("Mulungu adalenga kumwamba ndi dziko lapansi, caf\xe9 \xff".encode("latin-1"))
    (ws / "bad.json").write_text("{not json")
    (ws / "bad.yaml").write_text("out: [unclosed\n")
    (ws / "unknown.yaml").write_text(f"out: {ws / 'new-pipeline'}\nqa_stepz: 3\n")
    train_tokenizer(str(ws / "corpus.txt"), ws / "tok", vocab_size=600)
    tok = AutoTokenizer.from_pretrained(ws / "tok")
    torch.manual_seed(0)
    config = LittleBirdConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, block_size=32, pack_size=8)
    LittleBirdForQuestionAnswering(config).save_pretrained(ws / "model")
    tok.save_pretrained(ws / "model")
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=256)).save_pretrained(ws / "teacher")
    tok.save_pretrained(ws / "teacher")

    context = docs[0].text[:1500]
    answer = context.split()[40]
    (ws / "context.txt").write_text(context, encoding="utf-8")
    records = [_qa_record(f"q{i}", context, context.split()[40 + i]) for i in range(4)]
    records = [r for r in records if context.count(r["answers"][0]["text"]) >= 1]
    (ws / "qa.json").write_text(json.dumps(records), encoding="utf-8")
    (ws / "qa_no_start.json").write_text(json.dumps([{**records[0], "answers": [{"text": answer}]}]))
    (ws / "qa_bad_offset.json").write_text(json.dumps([{**records[0], "answers": [{"text": answer, "answer_start": 1}]}]))
    (ws / "qa_long_question.json").write_text(json.dumps([_qa_record("long", context, answer, " ".join(context.split()[:60]))]))

    # Earlier outputs: a report, a run whose only checkpoint is truncated, and a good checkpoint.
    (ws / "earlier").mkdir()
    (ws / "earlier" / "report.md").write_text("# an earlier report\n")
    mlm = LittleBirdForMaskedLM(config)
    for where, truncate in ((ws / "earlier" / "run" / "checkpoints", True), (ws / "good-ckpt", False)):
        tag = where / "step_00000002"
        tag.mkdir(parents=True)
        torch.save({"module": mlm.state_dict()}, tag / "mp_rank_00_model_states.pt")
        config.save_pretrained(tag)
        (tag / "littlebird_checkpoint.json").write_text(json.dumps({"step": 2, "model_class": "LittleBirdForMaskedLM"}))
        write_manifest(tag)
        (where / "latest").write_text("step_00000002")
        if truncate:
            with open(tag / "mp_rank_00_model_states.pt", "r+b") as f:
                f.truncate(100)
    return ws


def _run_case(argv: list[str], subprocess_: bool, capfd) -> tuple[int, str]:
    if subprocess_:
        p = subprocess.run([sys.executable, "-m", "littlebird_ds.cli", *argv], capture_output=True, text=True,
                           env=ENV, timeout=300)
        return p.returncode, p.stderr
    capfd.readouterr()
    rc = main(argv)
    return rc, capfd.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, ws, capfd, monkeypatch, tmp_path):
    name, argv, fragment, in_subprocess = case
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("NODE_RANK", "0")
    argv = _expand(argv, ws)
    before = _snapshot(ws)
    try:
        rc, err = _run_case(argv, in_subprocess, capfd)
    except SystemExit as e:  # argparse's own errors exit from main
        rc, err = e.code, capfd.readouterr().err
    finally:
        left = [n for n in NEW_OUTPUTS if (ws / n).exists()]
        for n in left:  # keep the next case's check clean
            shutil.rmtree(ws / n) if (ws / n).is_dir() else (ws / n).unlink()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, f"{name}: exit {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{name}:\n{err[-3000:]}"
    command = argv[0]
    last = lines[-1]
    assert last.startswith((f"littlebird-ds {command}: error: ", "littlebird-ds: error: ", "usage:")) or \
        f"littlebird-ds {command}: error:" in last, f"{name}: {last!r}"
    assert fragment in last, f"{name}: {fragment!r} not in {last!r}"
    assert _snapshot(ws) == before, f"{name} changed files in the workspace"
    assert not left, f"{name} left output behind: {left}"


def test_the_suite_covers_every_command_with_at_least_fifty_cases():
    from littlebird_ds.cli import COMMANDS

    covered = {argv[0] for _, argv, _, _ in CASES}
    assert len(CASES) >= 50
    assert {"train-tokenizer", "make-qa", "pretrain", "distill", "finetune-qa", "evaluate-qa", "predict", "export",
            "pipeline"} <= covered <= set(COMMANDS)
