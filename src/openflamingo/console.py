"""What a command shows on the console: openflamingo's log messages bare on stderr, and our own errors
(`errors.OpenFlamingoError`) as one line and exit status 2; any other exception keeps its traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import OpenFlamingoError


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a message comes (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_logs() -> None:
    """openflamingo's INFO messages on stderr, without decoration (the server, a long-running process, configures
    its own, time-stamped, instead)."""
    logger = logging.getLogger("openflamingo")
    if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run_command(name: str, run: Callable[[], None]) -> int:
    """Run a command's body: 0 when it returns, 2 with `openflamingo NAME: error: ...` on one line for our errors."""
    try:
        run()
    except OpenFlamingoError as error:
        print(f"openflamingo {name}: error: {error}", file=sys.stderr)
        return 2
    return 0
