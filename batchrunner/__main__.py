"""`python -m batchrunner` and the `batchrunner` command: the command line."""

from __future__ import annotations

import signal
import sys
import threading

#: The signals that stop a command.
_STOPS: frozenset[signal.Signals] = frozenset({signal.SIGINT, signal.SIGTERM})


def main() -> None:
    """The command line. Ctrl-C and SIGTERM that come while it imports (a few tenths of a
    second) wait until its own handlers are in place: taken at once, Ctrl-C printed an import's
    traceback, SIGTERM ended the process without a word (not "interrupted", exit 130), and an
    exception raised inside an import can kill the interpreter in an extension's set-up."""
    held = _hold(_STOPS)
    from batchrunner import cli

    cli.sigterm_as_ctrl_c()
    try:
        _release(held)  # (one that came meanwhile is taken here, by the handlers now in place)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(cli.EXIT_INTERRUPTED)
    cli.main()


def _hold(signals: frozenset[signal.Signals]) -> frozenset[signal.Signals]:
    """Block `signals` (in this thread, the main one); returns those it blocked."""
    if not hasattr(signal, "pthread_sigmask"):
        return frozenset()
    if threading.current_thread() is not threading.main_thread():
        return frozenset()
    return signals - signal.pthread_sigmask(signal.SIG_BLOCK, signals)


def _release(held: frozenset[signal.Signals]) -> None:
    """Unblock what `_hold` blocked: a signal pending meanwhile is handled now."""
    if held:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


# Guarded: the worker processes of a large submit or export import the main module again.
if __name__ == "__main__":
    main()
