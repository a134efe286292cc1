"""Progress of a run: a live display on a terminal, elsewhere a plain line every few seconds."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from batchrunner.dispatcher import Dispatcher
from batchrunner.limiter import PacerStats

#: Without a terminal, one status line this often.
PLAIN_EVERY_S = 5.0
#: A terminal display refreshes this often.
LIVE_EVERY_S = 0.5


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


def status_line(d: Dispatcher) -> str:
    st = d.stats
    now = time.monotonic()
    elapsed = max(now - st.started_s, 1e-9)
    done = st.ended_before + st.ended
    snap = d.pacer.snapshot()
    line = (
        f"{done}/{st.total} done ({st.succeeded} ok, {st.failed} failed this run), "
        f"{st.in_flight} in flight, {st.retrying} retrying, "
        f"{st.ended / elapsed:.1f} req/s, {st.tokens / elapsed:.0f} tok/s, "
        f"ETA {_fmt_eta(st.eta_s(now))}"
    )
    if snap.pause_left_s > 0:
        line += f", paused {snap.pause_left_s:.1f}s by the server"
    if (rpm := slowed_to(snap)) is not None:
        line += f", slowed to {rpm:.0f} rpm by 429s"
    return line


async def show(d: Dispatcher, stream: TextIO | None = None) -> None:
    """Render progress until cancelled."""
    out = stream or sys.stderr
    if out.isatty():
        await _live(d, out)
    else:
        while True:
            await asyncio.sleep(PLAIN_EVERY_S)
            print(status_line(d), file=out, flush=True)


async def _live(d: Dispatcher, out: TextIO) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=out)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(d.batch.id, total=d.stats.total or None, detail="")
        try:
            while True:
                st = d.stats
                elapsed = max(time.monotonic() - st.started_s, 1e-9)
                snap = d.pacer.snapshot()
                detail = (
                    f"ok {st.succeeded}  failed {st.failed}  in flight {st.in_flight}  "
                    f"retrying {st.retrying}  {st.ended / elapsed:.1f} req/s  "
                    f"{st.tokens / elapsed:.0f} tok/s"
                )
                if snap.pause_left_s > 0:
                    detail += f"  paused {snap.pause_left_s:.1f}s"
                if (rpm := slowed_to(snap)) is not None:
                    detail += f"  slowed to {rpm:.0f} rpm"
                bar.update(
                    task,
                    total=st.total or None,
                    completed=st.ended_before + st.ended,
                    detail=detail,
                )
                await asyncio.sleep(LIVE_EVERY_S)
        finally:
            bar.refresh()
