"""The ``littlebird-ds`` console script: one subcommand per pipeline stage.

Each subcommand lives in its own module (listed in ``COMMANDS``) that defines
``add_arguments(parser)`` and ``run(args) -> int | None``; the module docstring's
first paragraph is the subcommand's ``--help`` text. Modules are imported only
when their subcommand runs, so ``littlebird-ds info`` never imports deepspeed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .utils.log import LEVEL_ENV, LOG_LEVELS, configure_logging

# name -> module path. Keep sorted by pipeline order.
COMMANDS: dict[str, str] = {
    "info": "littlebird_ds.commands.info",
    "demo": "littlebird_ds.commands.demo",
    "train-tokenizer": "littlebird_ds.commands.train_tokenizer",
    "pretrain": "littlebird_ds.commands.pretrain",
    "bench": "littlebird_ds.commands.bench",
    "scale": "littlebird_ds.commands.scale",
    "parity": "littlebird_ds.commands.parity",
    "export": "littlebird_ds.commands.export",
    "make-qa": "littlebird_ds.commands.make_qa",
    "distill": "littlebird_ds.commands.distill",
    "pipeline": "littlebird_ds.commands.pipeline",
    "finetune-qa": "littlebird_ds.commands.finetune_qa",
    "evaluate-qa": "littlebird_ds.commands.evaluate_qa",
    "predict": "littlebird_ds.commands.predict",
}


def _help_of(module_path: str) -> str:
    doc = importlib.import_module(module_path).__doc__ or ""
    return doc.strip().split("\n\n")[0]


def _has_default_to_show(action: argparse.Action) -> bool:
    """Not ``None``, a flag's ``False``, an empty list or argparse's SUPPRESS."""
    d = action.default
    return not (d is None or d is False or (isinstance(d, str) and d == argparse.SUPPRESS) or d == [] or d == ())


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default shown, except where the help
    already states it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not _has_default_to_show(action) or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed distribution's version, without importing torch or transformers
        __version__ = version("littlebird-ds")
    except PackageNotFoundError:  # run from a source tree that is not installed
        __version__ = "unknown (not installed)"
    parser = argparse.ArgumentParser(
        prog="littlebird-ds", description="LittleBird long-document encoder: train, evaluate, serve."
    )
    parser.add_argument("--version", action="version", version=f"littlebird-ds {__version__}")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="messages shown on stderr (anywhere on the command line; default info, or "
                             "$LITTLEBIRD_DS_LOG_LEVEL); --debug shows tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_path in COMMANDS.items():
        if only is not None and name != only:
            # Listed in the top-level help without importing the module.
            sub.add_parser(name, add_help=False)
            continue
        module = importlib.import_module(module_path)
        help_text = _help_of(module_path)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or "").strip(),
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        for action in p._actions:  # options without a help text still show their default
            if action.help is None and action.option_strings and _has_default_to_show(action):
                action.help = "(default: %(default)s)"
    return parser


#: Errors that mean "the input is wrong": one line on stderr and exit code 2, no traceback
#: (``--debug`` anywhere in the arguments, or ``LITTLEBIRD_DEBUG=1``, shows it).
#: ``FloatingPointError``: a training run that diverged (the engine's ``TrainingDiverged``).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               FloatingPointError)


def take_launcher_arguments(argv: list[str]) -> list[str]:
    """Remove what launchers add to a worker's command line, wherever it stands, and return the rest.

    The ``deepspeed`` launcher (and ``torch.distributed.launch``) insert ``--local_rank=N`` before
    the subcommand; ``--local-rank N`` is the newer spelling. The value goes to ``LOCAL_RANK``
    unless the launcher set that too (torchrun and accelerate only set the environment)."""
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"littlebird-ds: error: {name} needs a value")
                value = argv[i + 1]
                i += 1
            if not value.lstrip("-").isdigit():
                raise SystemExit(f"littlebird-ds: error: {name} takes an integer, got {value!r}")
            os.environ.setdefault("LOCAL_RANK", str(int(value)))
        else:
            rest.append(arg)
        i += 1
    return rest


def _dashed_flags(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> list[str]:
    """Megatron and DeepSpeed scripts spell flags with underscores (``--max_steps``); take those as
    the dashed flags (``--max-steps``) a command defines. A flag defined with underscores
    (``--deepspeed_config``) and anything after ``--`` stay as written."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = set(sub._option_string_actions)
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "_" in name and name not in known and name.replace("_", "-") in known:
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def _one_line(command: str, message: str) -> str:
    """A command's ``SystemExit("...")`` message in the one error form:
    ``littlebird-ds COMMAND: error: ...``."""
    message = message.strip()
    if message.startswith("littlebird-ds"):
        return message
    for prefix in (f"{command}: error: ", f"{command}: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
            break
    return f"littlebird-ds {command}: error: {message}"


def take_log_level(argv: list[str]) -> tuple[list[str], str]:
    """Remove ``--log-level L`` / ``--log-level=L`` from ``argv``; returns the rest and the level
    (default ``$LITTLEBIRD_DS_LOG_LEVEL``, else ``info``)."""
    level = os.environ.get(LEVEL_ENV, "info").lower()
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--log-level" and i + 1 < len(argv):
            level, i = argv[i + 1].lower(), i + 2
            continue
        if a.startswith("--log-level="):
            level = a.split("=", 1)[1].lower()
        else:
            rest.append(a)
        i += 1
    if level not in LOG_LEVELS:
        raise SystemExit(f"littlebird-ds: error: --log-level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    return rest, level


def main(argv: list[str] | None = None) -> int:
    argv = take_launcher_arguments(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv or os.environ.get("LITTLEBIRD_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    argv, level = take_log_level(argv)
    configure_logging(level)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=command)
    if command is None:
        if argv and argv[0] == "--version":
            parser.parse_args(argv[:1])  # prints the version and exits 0
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 1
    args = parser.parse_args(_dashed_flags(parser, command, argv))
    module = importlib.import_module(COMMANDS[command])
    try:
        rc = module.run(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"littlebird-ds {command}: error: {e} (--debug shows the traceback)", file=sys.stderr, flush=True)
        return 2
    except SystemExit as e:
        if not isinstance(e.code, str):  # argparse's and finish_worker's exits keep their code
            raise
        print(_one_line(command, e.code), file=sys.stderr, flush=True)  # a command's own one-line error
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
