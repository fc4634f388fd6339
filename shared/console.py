"""Progress lines on stderr, and the verbosity every `hmd` command takes (``-v``/``-q``).

Progress (training steps, epochs, what a command is doing) goes to the ``hmd.progress`` logger,
which prints the bare line on stderr at INFO: shown by default, hidden by ``-q``. ``-v`` also
shows the DEBUG logs of great-hmd's own modules (``hmd.*`` loggers) with their level and name;
libraries stay at WARNING. Used as a library (no ``hmd`` command), progress prints as before.
"""
from __future__ import annotations

import logging
import sys

PROGRESS = logging.getLogger("hmd.progress")


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (looked up at each line, so captured output sees it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


if not PROGRESS.handlers:
    PROGRESS.addHandler(_StderrHandler())
    PROGRESS.propagate = False
    PROGRESS.setLevel(logging.INFO)


def progress(line: str) -> None:
    """One progress line on stderr (hidden by ``-q``)."""
    PROGRESS.info(line)


def set_verbosity(verbose: int = 0, quiet: bool = False) -> None:
    """``-q``: errors only (no progress, no warnings of our own); ``-v``: our DEBUG logs as well."""
    own = logging.getLogger("hmd")
    if quiet:
        PROGRESS.setLevel(logging.WARNING)
        own.setLevel(logging.ERROR)
    elif verbose:
        PROGRESS.setLevel(logging.DEBUG)
        own.setLevel(logging.DEBUG)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    else:
        PROGRESS.setLevel(logging.INFO)
        own.setLevel(logging.NOTSET)
