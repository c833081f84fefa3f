"""The console script and its lightweight subcommands."""

import json
import subprocess
import sys

import pytest

from littlebird_ds.cli import COMMANDS, main


def test_info_reports_versions_kernels_and_device(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"].startswith("2.")
    assert "eager" in info["attention_kernels"]["cpu"]["training"]["available"]
    assert info["device"]["cpu_threads"] >= 1


def test_demo_reads_a_long_document_and_reports_time_and_memory(capsys):
    assert main(["demo", "--length", "2000", "--hidden-size", "32", "--layers", "1", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "inference" in out and "training step" in out and "finite=True" in out and "MiB" in out


def test_every_registered_command_has_help(capsys):
    for name in COMMANDS:
        try:
            main([name, "--help"])
        except SystemExit as e:
            assert e.code == 0, name
        assert f"usage: littlebird-ds {name}" in capsys.readouterr().out


def test_help_shows_every_option_default_once(capsys):
    """Defaults appear in --help, also for options without a help text, and never twice where
    the help already names its default."""
    import re

    with pytest.raises(SystemExit):
        main(["finetune-qa", "--help"])
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--warmup-steps WARMUP_STEPS (default: 0)" in out
    assert "peak learning rate (default: 0.0001)" in out
    assert "final lr as a fraction of --lr (default: 0.0)" in out
    assert "(default 1); they are 3 scalars" in out and "(default: 1.0)" not in out.split("--bialibi-lr-scale")[1][:400]
    assert "--resume resume from OUT/checkpoints/latest --lr" in out  # a flag's False is not a default to show


def test_log_level_anywhere_on_the_command_line_filters_the_package_messages(tmp_path, capsys, monkeypatch):
    """Status lines are INFO, warnings WARNING: ``--log-level warning`` keeps the warning and drops
    the status line, ``info`` shows both; a bad level is a one-line error naming the choices."""
    import logging

    from littlebird_ds.cli import take_log_level
    from littlebird_ds.utils.log import configure_logging

    monkeypatch.delenv("LITTLEBIRD_DS_LOG_LEVEL", raising=False)
    assert take_log_level(["info", "--log-level", "warning", "--json"]) == (["info", "--json"], "warning")
    assert take_log_level(["--log-level=debug", "info"]) == (["info"], "debug")
    assert take_log_level(["info"]) == (["info"], "info")
    with pytest.raises(SystemExit, match="not one of debug, info, warning, error"):
        take_log_level(["info", "--log-level", "loud"])
    log = logging.getLogger("littlebird_ds.train.engine")
    for level, shown in (("warning", ["warning: disk almost full"]), ("info", ["resumed at step 3", "warning: disk almost full"])):
        configure_logging(level)
        capsys.readouterr()
        log.info("resumed at step 3")
        log.warning("disk almost full")
        assert capsys.readouterr().err.splitlines() == shown
    assert main(["info", "--log-level", "warning"]) == 0 and "attention kernels" in capsys.readouterr().out
    configure_logging("info")


def test_console_script_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "littlebird_ds.cli", "info"], capture_output=True, text=True)
    assert res.returncode == 0 and "attention kernels" in res.stdout, res.stderr[-1000:]


def test_unknown_command_is_a_clear_error(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as e:
        assert e.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"littlebird-ds {version('littlebird-ds')}"


def test_underscore_flags_and_out_output_spellings_reach_the_same_options():
    """Megatron/DeepSpeed scripts write --max_steps and --output; the commands take both spellings."""
    from littlebird_ds.cli import _dashed_flags, build_parser

    def parse(argv):
        parser = build_parser(only=argv[0])
        return parser.parse_args(_dashed_flags(parser, argv[0], argv))

    a = parse(["make-qa", "--corpus", "c", "--tokenizer", "t", "--out", "o", "--questions_per_document", "1,2,3"])
    assert a.output == "o" and a.questions_per_document == (1, 2, 3)
    a = parse(["pretrain", "--corpus", "c", "--max_steps", "3", "--output", "d", "--global_batch_size=8", "--deepspeed",
               "--deepspeed_config", "ds.json"])
    assert (a.max_steps, a.out, a.global_batch_size, a.deepspeed_config) == (3, "d", 8, "ds.json")
    a = parse(["train-tokenizer", "--out", "tok"])
    assert a.output == "tok"
