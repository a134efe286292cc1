"""Helpers for the bulk paths (submit, export) that handle a million rows in one call."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Automatic garbage collection off for the block, back on (if it was) at its end.

    Submit and export make a few short-lived containers per row and no reference cycles, so
    reference counting frees everything as they go; but every few thousand rows the collector
    walked the whole heap (SQLAlchemy's and alembic's objects included), 1-4 us a row in all.
    The few cycles the event loop makes in between wait for the next collection after it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
