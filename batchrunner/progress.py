"""Progress of a run: a live display on a terminal, elsewhere a plain line every few seconds."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import deque
from typing import Any, TextIO

from batchrunner.dispatcher import Dispatcher, RunStats
from batchrunner.errors import StoreError
from batchrunner.limiter import PacerStats

#: Without a terminal, one status line this often.
PLAIN_EVERY_S = 5.0
#: A terminal display refreshes this often.
LIVE_EVERY_S = 0.5
#: The pace shown is over about this many seconds of the latest progress.
PACE_WINDOW_S = 30.0
#: The batch's counts are read again this often (a count of its jobs by state).
REFRESH_EVERY_S = 15.0


class Pace:
    """The batch's jobs ended a second (this run's and any other's sharing it, as far as the
    last `refresh` knows) and this run's tokens a second, over the last PACE_WINDOW_S, and the
    ETA at that pace (until the run is that old, since its start): a run slowed by 429s an hour
    in shows its pace now, not its first minutes'; two runs sharing a batch each show the time
    left to both, not twice that."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque()
        self._start: tuple[float, int, int] | None = None

    def sample(self, st: RunStats, now: float) -> tuple[float, float, float | None]:
        """(jobs ended a second, tokens a second, seconds left) as of `now` (monotonic)."""
        if not st.total:
            # The batch's counts are not read yet (the run's first moment): the jobs ended
            # before would count as ended now, a pace of thousands a second for a resumed run.
            return 0.0, 0.0, None
        done = st.ended_before + st.ended
        if self._start is None:
            self._start = (st.started_s, st.ended_before, 0)
        samples = self._samples
        samples.append((now, done, st.tokens))
        # Keep the latest sample at least a window old, and those after it.
        while len(samples) > 2 and now - samples[1][0] >= PACE_WINDOW_S:
            samples.popleft()
        since, done_then, tokens = samples[0]
        if now - since < PACE_WINDOW_S:
            since, done_then, tokens = self._start
        span = max(now - since, 1e-9)
        # (Less done than before: failed jobs put back by `retry`.)
        per_s = max(done - done_then, 0) / span
        left = st.total - done
        return per_s, (st.tokens - tokens) / span, left / per_s if per_s > 0 and left > 0 else None


async def refresh(d: Dispatcher) -> None:
    """The batch's counts as the database has them now: what other runs sharing the batch
    have ended since this one started, and what `retry` put back, are in the line's figures
    (they were not: two runs each showed half the batch done, and an ETA twice too long)."""
    try:
        counts = await d.store.counts(d.batch.id)
    except StoreError:
        return  # (the next refresh, or the run, says what is wrong)
    st = d.stats
    st.total = counts.total
    # (Less what this run has recorded: its ends still to be written are not in the counts.)
    st.ended_before = max(0, counts.total - counts.unfinished - st.recorded)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def slowed_to(snap: PacerStats) -> float | None:
    """The request rate 429s have set below the one asked for (without `--rpm`, any rate
    they have set), or None: a slow run says why."""
    rpm = snap.effective_rpm
    if rpm is None or (snap.rpm is not None and rpm >= snap.rpm):
        return None
    return rpm


def _tokens_per_s(st: RunStats, per_s: float) -> str:
    # (The line's jobs are the batch's, every run's; its tokens this run's: beside them, each
    # of two runs showed half the token rate status gave.)
    return f"{per_s:.0f} tok/s" + (" this run" if st.runs > 1 else "")


def status_line(d: Dispatcher, pace: Pace, now: float | None = None) -> str:
    st = d.stats
    per_s, tokens_per_s, eta_s = pace.sample(st, time.monotonic() if now is None else now)
    done = st.ended_before + st.ended
    snap = d.pacer.snapshot()
    line = (
        f"{done}/{st.total} done ({st.succeeded} ok, {st.failed} failed this run), "
        f"{st.in_flight} in flight, {st.retrying} retrying, "
        f"{per_s:.1f} req/s, {_tokens_per_s(st, tokens_per_s)}, ETA {_fmt_eta(eta_s)}"
    )
    if snap.pause_left_s > 0:
        line += f", paused {snap.pause_left_s:.1f}s by the server"
    if (rpm := slowed_to(snap)) is not None:
        line += f", slowed to {rpm:.0f} rpm by 429s"
    if snap.outage_s > 0:
        line += f", no answer from the API for {snap.outage_s:.0f}s: one request at a time"
    return line


async def show(d: Dispatcher, stream: TextIO | None = None) -> None:
    """Render progress until cancelled."""
    out = stream or sys.stderr
    if out.isatty() and os.environ.get("TERM", "") not in ("dumb", "unknown"):
        await _live(d, out)
    else:
        pace = Pace()
        refreshed = time.monotonic()
        while True:
            await asyncio.sleep(PLAIN_EVERY_S)
            if time.monotonic() - refreshed >= REFRESH_EVERY_S:
                refreshed = time.monotonic()
                await refresh(d)
            print(status_line(d, pace), file=out, flush=True)


#: The narrowest bar worth drawing, and the widest drawn.
_BAR_MIN, _BAR_MAX = 10, 40


def live_layout(
    width: int, name: str, count: str, details: list[str]
) -> tuple[str, int | None, str]:
    """What of the live line fits `width` columns: (the batch's name or "", the bar's width or
    None for no bar, the details). `details` are the line's parts, the most wanted first; the
    count and the time left always show. On 80 columns rich cut the count to "2…" and dropped
    the bar; the parts are dropped instead, the least wanted first, then the bar, then the
    name."""
    # Five columns, a space between each: name, bar, count, time left, details.
    eta = len("0:00:00")
    for keep_name in (True, False):
        fixed = (len(name) if keep_name else 0) + len(count) + eta + 4
        for n in range(len(details), 0, -1):
            detail = "  ".join(details[:n])
            room = width - fixed - len(detail)
            if room >= _BAR_MIN:
                return (name if keep_name else ""), min(room, _BAR_MAX), detail
        if fixed + 1 + len(details[0]) <= width:  # (a bar of no width is drawn one wide)
            return (name if keep_name else ""), None, details[0]
    return "", None, details[0]


def live_columns() -> tuple[list[Any], Any]:
    """The live line's columns, and its bar's (whose width `live_layout` sets)."""
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
    from rich.table import Column

    bar = BarColumn(bar_width=_BAR_MAX)
    return [
        TextColumn("[bold]{task.fields[name]}", table_column=Column(no_wrap=True)),
        bar,
        TextColumn("{task.fields[count]}", table_column=Column(no_wrap=True)),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}", table_column=Column(no_wrap=True)),
    ], bar


async def _live(d: Dispatcher, out: TextIO) -> None:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(file=out)
    columns, bar_column = live_columns()
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=None, name=d.batch.id, count="", detail="")
        pace = Pace()

        def draw() -> None:
            st = d.stats
            per_s, tokens_per_s, _ = pace.sample(st, time.monotonic())
            snap = d.pacer.snapshot()
            done = st.ended_before + st.ended
            # The most wanted first, and never dropped: what is slowing the run, with its
            # outcome and pace.
            first = [f"ok {st.succeeded}  failed {st.failed}  {per_s:.1f} req/s"]
            if snap.outage_s > 0:
                first.insert(0, f"no answer for {snap.outage_s:.0f}s")
            if snap.pause_left_s > 0:
                first.insert(0, f"paused {snap.pause_left_s:.1f}s")
            if (rpm := slowed_to(snap)) is not None:
                first.insert(0, f"slowed to {rpm:.0f} rpm")
            details = [
                "  ".join(first),
                f"in flight {st.in_flight}",
                f"retrying {st.retrying}",
                _tokens_per_s(st, tokens_per_s),
            ]
            count = f"{done}/{st.total}" if st.total else "starting"
            name, bar_width, detail = live_layout(console.width, d.batch.id, count, details)
            bar_column.bar_width = bar_width or 0
            bar.update(
                task, total=st.total or None, completed=done, name=name, count=count, detail=detail
            )

        refreshed = time.monotonic()
        try:
            while True:
                if time.monotonic() - refreshed >= REFRESH_EVERY_S:
                    refreshed = time.monotonic()
                    await refresh(d)
                draw()
                await asyncio.sleep(LIVE_EVERY_S)
        finally:
            draw()  # (where the run ended, not where the last turn saw it)
            bar.refresh()
