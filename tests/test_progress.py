"""The run's own progress line: its pace and ETA are the latest, not the run's average."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from batchrunner.dispatcher import RunStats
from batchrunner.ingest import submit_file
from batchrunner.limiter import OUTAGE_AFTER, OUTAGE_SILENCE_S, Pacer
from batchrunner.outcome import Outcome, OutcomeKind
from batchrunner.progress import (
    PACE_WINDOW_S,
    Pace,
    live_columns,
    live_layout,
    refresh,
    status_line,
)
from batchrunner.states import JobState
from batchrunner.store import JobStore
from tests.conftest import chat, succeeded

MakeFile = Callable[..., Path]


def _run(stats: RunStats) -> Any:
    """What the progress line reads of a dispatcher."""
    return SimpleNamespace(stats=stats, pacer=Pacer(None, None))


def test_a_run_that_slowed_shows_its_pace_now_and_the_eta_at_it() -> None:
    """10 jobs a second for two minutes, then 1 a second: after a minute of the slow pace the
    line says 1.0 req/s (not the run's average, 5.5) and the ETA at 1 a second."""
    stats = RunStats(started_s=0.0, total=10_000)
    run, pace = _run(stats), Pace()
    line = ""
    for second in range(1, 181):
        stats.succeeded += 10 if second <= 120 else 1
        stats.tokens = 20 * stats.succeeded
        if second % 5 == 0:
            line = status_line(run, pace, now=float(second))
    left = 10_000 - 1_260
    assert "1.0 req/s, 20 tok/s" in line
    assert f"ETA {left // 3600}h{left % 3600 // 60:02d}m" in line


def test_the_line_says_when_the_api_has_not_answered_for_a_while() -> None:
    clock = [0.0]
    stats = RunStats(started_s=0.0, total=100)
    run = SimpleNamespace(stats=stats, pacer=Pacer(None, None, clock=lambda: clock[0]))
    for _ in range(OUTAGE_AFTER):
        sent = run.pacer.acquire_now()
        run.pacer.observe(Outcome(OutcomeKind.RETRY, None, error_kind="timeout"), sent_at_s=sent)
        clock[0] += OUTAGE_SILENCE_S
    line = status_line(run, Pace(), now=clock[0])
    assert line.endswith(", no answer from the API for 50s: one request at a time")


def test_until_a_window_has_passed_the_pace_is_since_the_start() -> None:
    stats = RunStats(started_s=0.0, total=100)
    stats.succeeded = 20
    per_s, tokens_per_s, eta_s = Pace().sample(stats, PACE_WINDOW_S / 3)
    assert per_s == pytest.approx(20 / (PACE_WINDOW_S / 3))
    assert tokens_per_s == 0.0
    assert eta_s == pytest.approx(80 / per_s)


def test_a_resumed_run_paces_from_its_own_start_not_from_zero() -> None:
    """The live line's first sample came before the batch's counts were read: the 2,000 jobs
    ended by earlier runs counted as ended in the first second (3,773 req/s, falling over
    half a minute, for a run going at 25)."""
    stats = RunStats(started_s=0.0)
    pace = Pace()
    assert pace.sample(stats, 0.01) == (0.0, 0.0, None)  # (nothing known yet)
    stats.total, stats.ended_before = 3_000, 2_000  # the dispatcher's first read
    stats.succeeded = 25
    per_s, _, _ = pace.sample(stats, 1.0)
    assert per_s == pytest.approx(25.0)


@pytest.mark.parametrize(
    ("width", "name", "bar", "parts"),
    [(160, True, 40, 4), (100, True, 17, 2), (80, True, 10, 1), (60, False, 12, 1),
     (49, False, None, 1)],
)  # fmt: skip
def test_the_live_line_fits_the_terminal_dropping_the_least_wanted_first(
    width: int, name: bool, bar: int | None, parts: int
) -> None:
    """On 80 columns rich cut the count to "2…" and dropped the bar to fit everything else."""
    from rich.console import Console
    from rich.progress import Progress

    details = ["ok 256  failed 0  25.6 req/s", "in flight 8", "retrying 0", "1234 tok/s"]
    batch, count = "batch_7d87231f7e2a4b1c", "2000/3000"
    shown, bar_width, detail = live_layout(width, batch, count, details)
    assert (shown == batch, bar_width, detail) == (name, bar, "  ".join(details[:parts]))

    out = io.StringIO()
    columns, bar_column = live_columns()
    bar_column.bar_width = bar_width or 0
    console = Console(file=out, width=width, force_terminal=True, color_system=None)
    with Progress(*columns, console=console, auto_refresh=False) as progress:
        task = progress.add_task("", total=3000, name=shown, count=count, detail=detail)
        progress.update(task, completed=2000)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    line = [line for line in text.splitlines() if line.strip()][-1]
    assert "…" not in line and len(line) <= width
    assert f"{shown} " in line and f" {count} " in line and line.endswith(detail)
    assert line.count("━") + line.count("╸") + line.count(" ") >= (bar_width or 0)


def test_two_runs_sharing_a_batch_each_show_the_time_left_to_both() -> None:
    """Each run counted only its own ends: two runs at 5 a second each showed half the
    batch done and an ETA twice too long. What other runs end comes in with each refresh."""
    stats = RunStats(started_s=0.0, total=1_000)
    run, pace = _run(stats), Pace()
    line = ""
    for second in range(1, 61):
        stats.succeeded += 5  # this run
        if second % 15 == 0:
            stats.ended_before = 5 * second  # the other run's, as a refresh reads them
        if second % 5 == 0:
            line = status_line(run, pace, now=float(second))
    assert line.startswith("600/1000 done (300 ok, 0 failed this run)")
    assert "10.0 req/s" in line and "ETA 0m40s" in line
    assert "tok/s, ETA" in line  # (nobody said there were two)
    stats.runs = 2  # as the coordinator's look says
    # Its tokens are its own: said so, beside the batch's jobs.
    assert "tok/s this run, ETA" in status_line(run, pace, now=61.0)


async def test_a_refresh_reads_what_others_ended_and_what_retry_put_back(
    store: JobStore, make_file: MakeFile
) -> None:
    batch = (await submit_file(store, make_file([chat(f"q{i}") for i in range(10)]))).batch
    stats = RunStats(total=10)
    run = SimpleNamespace(stats=stats, store=store, batch=batch)
    jobs = await store.claim(batch.id, "w-other", "t-1", 4, time.time(), 60.0)
    ends = [succeeded(job, "a") for job in jobs[:2]]
    ends += [replace(succeeded(job, "x"), state=JobState.FAILED) for job in jobs[2:]]
    assert (await store.record(batch.id, "w-other", ends, [], time.time())).recorded == 4
    stats.succeeded = 1  # this run's own, not written yet
    await refresh(run)
    assert (stats.total, stats.ended_before) == (10, 4)
    # This run's recorded ends are its own, not others'.
    (mine,) = await store.claim(batch.id, "w-this", "t-2", 1, time.time(), 60.0)
    assert (
        await store.record(batch.id, "w-this", [succeeded(mine, "m")], [], time.time())
    ).recorded
    stats.succeeded, stats.recorded = 2, 1
    await refresh(run)
    assert stats.ended_before == 4
    assert await store.retry_failed(batch.id) == 2
    await refresh(run)
    assert stats.ended_before == 2


def test_a_run_that_ended_nothing_lately_has_no_eta() -> None:
    stats = RunStats(started_s=0.0, total=100)
    pace = Pace()
    stats.succeeded = 50
    pace.sample(stats, 10.0)
    per_s, _, eta_s = pace.sample(stats, 10.0 + PACE_WINDOW_S)
    assert per_s == 0.0 and eta_s is None
