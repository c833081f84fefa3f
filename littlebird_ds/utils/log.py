"""The package's logging: ``littlebird_ds.*`` loggers on stderr, status lines (INFO) as plain
text and other levels prefixed (``warning: ...``). The console script configures it from
``--log-level``; the training engine does when a script built on it has configured nothing."""

from __future__ import annotations

import logging
import os
import sys

#: ``--log-level`` values (anywhere on a command line, like ``--debug``; or ``$LITTLEBIRD_DS_LOG_LEVEL``).
LEVEL_ENV = "LITTLEBIRD_DS_LOG_LEVEL"
LOG_LEVELS = ("debug", "info", "warning", "error")


class _LogFormatter(logging.Formatter):
    """INFO lines as plain text (status lines), other levels prefixed: ``warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is emitted (a handler that kept the
    stream it was made with would write into a closed capture after a test or a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: str) -> None:
    """The package's messages (``littlebird_ds.*`` loggers) on stderr at ``level``; other
    libraries' own loggers at WARNING. The level goes into the environment, so the commands the
    pipeline and the launchers start log the same way; ``debug`` lets transformers talk too."""
    handler = _StderrHandler()
    handler.setFormatter(_LogFormatter("%(message)s"))
    package = logging.getLogger("littlebird_ds")
    package.handlers[:] = [handler]
    package.setLevel(level.upper())
    os.environ[LEVEL_ENV] = level
    if level == "debug":
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")


def ensure_logging() -> None:
    """Configure the package's logging from ``$LITTLEBIRD_DS_LOG_LEVEL`` (default info) unless
    the package or the application has configured logging already."""
    if not logging.getLogger("littlebird_ds").handlers and not logging.getLogger().handlers:
        level = os.environ.get(LEVEL_ENV, "info").lower()
        configure_logging(level if level in LOG_LEVELS else "info")
