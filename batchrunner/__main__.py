"""`python -m batchrunner` and the `batchrunner` command: the command line."""

from __future__ import annotations

import signal
import sys
from types import FrameType

#: What an interrupted command exits with (cli.EXIT_INTERRUPTED, not imported yet here).
_EXIT_INTERRUPTED = 130


def main() -> None:
    """The command line, interruptible from its first moment: importing it takes a few tenths
    of a second before its own handlers are in place, in which Ctrl-C printed a traceback and
    SIGTERM ended the process without a word or the exit code 130 the README promises."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # (one ignored stays ignored)
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        from batchrunner.cli import main as command_line
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(_EXIT_INTERRUPTED)
    command_line()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# Guarded: the worker processes of a large submit or export import the main module again.
if __name__ == "__main__":
    main()
