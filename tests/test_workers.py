"""Several workers on one batch: the coordinator in one process, and `batchrunner run` processes
sharing a batch in PostgreSQL against the local fake API.

The fake server counts the requests it receives per exact body, so "done once" is measured where
it matters: a body received twice was sent twice. The process tests need the PostgreSQL server
named by BATCHRUNNER_TEST_PG; the coordinator tests run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from batchrunner import report
from batchrunner.config import LEASE_ENV, RunConfig
from batchrunner.coordination import JOIN_HOLD_S, Coordinator, WorkerCounters
from batchrunner.dispatcher import Dispatcher
from batchrunner.fakeapi import FakeConfig, FakeServerThread
from batchrunner.ingest import submit_file
from batchrunner.limiter import Pacer
from batchrunner.models import JobState
from batchrunner.outcome import Outcome, OutcomeKind
from batchrunner.store import Ended, JobStore, pid_alive, this_host
from tests.conftest import chat, dead_pid

MakeFile = Callable[..., Path]

#: A worker process that is not killed must end within this long.
RUN_TIMEOUT_S = 60.0
#: How often the tests look at the database and the server while they wait.
POLL_S = 0.05


# --------------------------------------------------------------------------- helpers


async def _scalar(store: JobStore, sql: str, **params: object) -> Any:
    async with store.engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar_one()


async def _rows(store: JobStore, sql: str, **params: object) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


def _digest(body: str) -> bytes:
    return hashlib.sha256(body.encode()).digest()


async def _bodies(store: JobStore, batch_id: str) -> dict[int, bytes]:
    rows = await _rows(store, "SELECT id, body FROM jobs WHERE batch_id = :b", b=batch_id)
    return {r.id: _digest(r.body) for r in rows}


async def _assert_all_succeeded_once(store: JobStore, batch_id: str, total: int) -> None:
    counts = await store.counts(batch_id)
    assert counts.total == total
    assert counts.counts["succeeded"] == total, counts.counts
    results = await _scalar(store, "SELECT COUNT(*) FROM results WHERE batch_id = :b", b=batch_id)
    assert results == total


async def _all_jobs(store: JobStore, batch_id: str) -> list[Any]:
    return await _rows(store, "SELECT id FROM jobs WHERE batch_id = :b", b=batch_id)


def _counters() -> WorkerCounters:
    return WorkerCounters(sent=0, succeeded=0, failed=0, tokens=0)


def _coordinator(
    store: JobStore,
    batch_id: str,
    worker_id: str,
    pacer: Pacer,
    *,
    counters: Callable[[], WorkerCounters] = _counters,
    clock: Callable[[], float] = time.time,
    on_share: Callable[[int], None] | None = None,
) -> Coordinator:
    return Coordinator(
        store,
        batch_id,
        worker_id,
        pacer,
        rpm=pacer.snapshot().rpm,
        tpm=pacer.snapshot().tpm,
        lease_s=60.0,
        heartbeat_s=15.0,
        counters=counters,
        clock=clock,
        on_share=on_share,
    )


def _rate_limited(retry_after_s: float) -> Outcome:
    return Outcome(OutcomeKind.RETRY, 429, error_kind="rate_limit", retry_after_s=retry_after_s)


async def _batch(store: JobStore, make_file: MakeFile, jobs: int, base_url: str) -> str:
    rows = [chat(f"shared question {i}", metadata={"i": i}) for i in range(jobs)]
    return (await submit_file(store, make_file(rows), base_url=base_url)).batch.id


# --------------------------------------------------------------------------- the coordinator


async def test_the_limits_are_shared_by_the_live_workers(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _batch(store, make_file, 3, "http://127.0.0.1:9/v1")
    now = time.time()
    for wid in ("w-a", "w-b", "w-c"):
        await store.register_worker(wid, batch_id, now)
    # A worker whose heartbeat is long gone does not count, though its process (ours) lives.
    await store.register_worker("w-stale", batch_id, now - 3_600)
    pacer = Pacer(600, 90_000)
    coordinator = _coordinator(store, batch_id, "w-a", pacer)

    seen = await coordinator.look()
    assert seen.workers == 3 and coordinator.workers == 3
    snap = pacer.snapshot()
    assert snap.rpm == pytest.approx(200) and snap.tpm == pytest.approx(30_000)

    await store.stop_worker("w-c", time.time())
    assert (await coordinator.look()).workers == 2
    assert pacer.snapshot().rpm == pytest.approx(300)
    await store.stop_worker("w-b", time.time())
    await coordinator.look()
    snap = pacer.snapshot()
    assert snap.rpm == pytest.approx(600) and snap.tpm == pytest.approx(90_000)


async def test_without_limits_nothing_is_divided(store: JobStore, make_file: MakeFile) -> None:
    batch_id = await _batch(store, make_file, 1, "http://127.0.0.1:9/v1")
    for wid in ("w-a", "w-b"):
        await store.register_worker(wid, batch_id, time.time())
    pacer = Pacer(None, None)
    told: list[int] = []
    coordinator = _coordinator(store, batch_id, "w-a", pacer, on_share=told.append)
    assert (await coordinator.look()).workers == 2
    snap = pacer.snapshot()
    assert snap.rpm is None and snap.tpm is None
    # The run is told all the same (its progress line says whose tokens it shows).
    await coordinator.look()
    await store.stop_worker("w-b", time.time())
    await coordinator.look()
    assert told == [2, 1]


@pytest.mark.parametrize("beats_before", [2, 0], ids=["late-heartbeat", "first-heartbeat"])
async def test_leases_that_ran_out_before_a_heartbeat_stay_lapsed(
    store: JobStore, make_file: MakeFile, beats_before: int
) -> None:
    """A worker frozen past its lease (a machine asleep, SIGSTOP), thawed: its next heartbeat
    extends only what is still its own, but the run took every job it held for alive and
    retried requests another worker had taken over and finished meanwhile. Frozen before
    its first heartbeat, it took that one for an extension of leases still its own."""
    batch_id = await _batch(store, make_file, 1, "http://127.0.0.1:9/v1")
    now = [time.time()]
    await store.register_worker("w-a", batch_id, now[0])
    coordinator = _coordinator(store, batch_id, "w-a", Pacer(None, None), clock=lambda: now[0])
    start = now[0]
    for _ in range(beats_before):
        await coordinator.beat()  # on time (the lease is 60 s)
        now[0] += 30.0
        assert coordinator.lapsed_at == 0.0
    now[0] += 61.0  # frozen past the lease
    await coordinator.beat()
    assert coordinator.lapsed_at == now[0]

    run = SimpleNamespace(
        _claims={"claimed-before": start + 60.0, "claimed-after": now[0] + 60.0},
        _coordinator=coordinator,
        config=RunConfig(lease_s=60.0),
    )
    # (Real time is now well before the fake clock's leases end.)
    for token, alive in (("claimed-before", False), ("claimed-after", True)):
        job = SimpleNamespace(lease_token=token)
        assert Dispatcher._lease_alive(run, job) is alive  # type: ignore[arg-type]


async def test_the_first_heartbeat_reports_progress_within_seconds(
    store: JobStore, make_file: MakeFile
) -> None:
    """`status` takes a run's speed from its heartbeats: with the first a whole interval (15 s)
    in, it showed "speed -" for the first quarter of a minute of every run."""
    batch_id = await _batch(store, make_file, 1, "http://127.0.0.1:9/v1")
    started = time.time()
    await store.register_worker("w-a", batch_id, started)
    coordinator = _coordinator(
        store,
        batch_id,
        "w-a",
        Pacer(None, None),
        counters=lambda: WorkerCounters(sent=5, succeeded=4, failed=1, tokens=90),
    )
    beating = asyncio.create_task(coordinator.run())
    try:
        for _ in range(100):  # 10 s at most, still well within the 15 s interval
            await asyncio.sleep(0.1)
            (worker,) = (
                await store.coordination_view(batch_id, since=started, host=this_host())
            ).workers
            if worker.sent:
                break
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    assert (worker.sent, worker.succeeded, worker.failed, worker.tokens) == (5, 4, 1, 90)
    assert worker.heartbeat_at - started < 15.0
    status = await report.batch_status(store, batch_id)
    assert status.requests_per_s is not None and status.requests_per_s > 0


@pytest.mark.parametrize(
    "died",
    [
        "exited",
        pytest.param(
            "not waited for",
            marks=pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc"),
        ),
    ],
)
async def test_a_dead_worker_of_this_machine_is_reaped_and_its_jobs_come_back(
    store: JobStore, make_file: MakeFile, died: str
) -> None:
    """Also one killed and not yet waited for by its parent (a script that starts several runs
    and waits for them at the end): a zombie, which signal 0 still reaches. Taken for alive,
    its jobs waited out their whole lease (62 s, where a reaped one's came back in 6 s)."""
    with contextlib.nullcontext(dead_pid()) if died == "exited" else _zombie() as pid:
        assert not pid_alive(pid)
        await _reaped_and_its_jobs_come_back(store, make_file, pid)
    assert pid_alive(os.getpid())


async def _gone(store: JobStore, worker_id: str, pid: int) -> None:
    """The worker's row names process `pid` (one that has ended) as its own."""
    async with store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE workers SET pid = :pid WHERE id = :w"), {"pid": pid, "w": worker_id}
        )


async def _reaped_and_its_jobs_come_back(store: JobStore, make_file: MakeFile, pid: int) -> None:
    batch_id = await _batch(store, make_file, 5, "http://127.0.0.1:9/v1")
    now = time.time()
    await store.register_worker("w-me", batch_id, now)
    await store.register_worker("w-gone", batch_id, now)
    await _gone(store, "w-gone", pid)
    held = await store.claim(batch_id, "w-gone", "w-gone.1", 3, now, 600.0)
    assert len(held) == 3
    pacer = Pacer(600, None)
    coordinator = _coordinator(store, batch_id, "w-me", pacer)

    seen = await coordinator.look()
    assert seen.reaped == 1 and seen.workers == 1
    assert pacer.snapshot().rpm == pytest.approx(600)
    stopped = await _scalar(store, "SELECT stopped_at FROM workers WHERE id = 'w-gone'")
    assert stopped is not None
    # Claimable at once, not after the 600 s lease.
    claimed = await store.claim(batch_id, "w-me", "w-me.1", 10, time.time(), 60.0)
    assert sorted(j.id for j in claimed) == sorted(j.id for j in await _all_jobs(store, batch_id))
    # Reaped once: it is marked stopped now.
    assert (await coordinator.look()).reaped == 0


@contextlib.contextmanager
def _zombie() -> Iterator[int]:
    """The id of a process of this machine that was killed and is not yet waited for."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[1][1:2] != b"Z":
            assert time.monotonic() < deadline, "the child did not become a zombie"
            time.sleep(0.01)
        yield child.pid
    finally:
        child.kill()
        child.wait()


async def test_status_does_not_show_a_killed_worker_of_this_machine_as_live(
    store: JobStore, make_file: MakeFile
) -> None:
    # For a minute after a kill -9, status listed the dead run as live, with its last pace
    # and an ETA, while nothing was running.
    batch_id = await _batch(store, make_file, 5, "http://127.0.0.1:9/v1")
    now = time.time()
    await store.register_worker("w-live", batch_id, now)
    await store.register_worker("w-killed", batch_id, now)
    await _gone(store, "w-killed", dead_pid())
    status = await report.batch_status(store, batch_id)
    assert [w.id for w in status.workers] == ["w-live"]


async def test_status_says_when_running_jobs_are_leased_to_no_live_run(
    store: JobStore, make_file: MakeFile
) -> None:
    """After a kill -9 the killed run's jobs stay `running` until a run takes them back:
    status showed them as running, with no worker, as if taken for ever."""
    batch_id = await _batch(store, make_file, 5, "http://127.0.0.1:9/v1")
    now = time.time()
    await store.register_worker("w-killed", batch_id, now)
    await store.claim(batch_id, "w-killed", "w-killed.1", 3, now, 600.0)
    note = "the running ones are leased to no live run"
    assert note not in report.render_status(await report.batch_status(store, batch_id))
    await _gone(store, "w-killed", dead_pid())
    shown = report.render_status(await report.batch_status(store, batch_id))
    assert "running 3," in shown and note in shown


@pytest.mark.skipif(
    not Path("/proc/sys/kernel/random/boot_id").exists(), reason="needs Linux's boot id"
)
async def test_a_machine_of_the_same_name_does_not_take_the_others_workers_for_its_own(
    store: JobStore, make_file: MakeFile
) -> None:
    """Machines cloned from one image share a host name; a worker's pid means nothing on
    another machine, so its jobs must not be given back for a process that is not there."""
    hostname = socket.gethostname()
    assert this_host().startswith(f"{hostname} (") and this_host() != hostname
    batch_id = await _batch(store, make_file, 3, "http://127.0.0.1:9/v1")
    now = time.time()
    await store.register_worker("w-clone", batch_id, now)
    async with store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE workers SET pid = :pid, host = :host WHERE id = 'w-clone'"),
            {"pid": dead_pid(), "host": f"{hostname} (0ther000)"},
        )
    held = await store.claim(batch_id, "w-clone", "w-clone.1", 3, now, 600.0)
    await store.register_worker("w-me", batch_id, time.time())
    seen = await _coordinator(store, batch_id, "w-me", Pacer(600, None)).look()
    assert seen.reaped == 0 and seen.workers == 2
    assert await store.claim(batch_id, "w-me", "w-me.1", 10, time.time(), 60.0) == []
    assert len(held) == 3


async def test_status_shows_a_running_batch_at_its_recent_pace(
    store: JobStore, make_file: MakeFile
) -> None:
    """A run that went at 10 jobs a second for its first minute and then slowed to 1 (429s,
    a stalling server) is at 1 a second now: its ETA is the unfinished jobs at 1 a second,
    not at the average since it started; a run that ended nothing since its last heartbeat
    shows 0, and no ETA."""
    batch_id = await _batch(store, make_file, 30, "http://127.0.0.1:9/v1")
    t0 = time.time() - 100.0
    await store.register_worker("w-slowed", batch_id, t0)
    now = [t0]
    done = [(0, 0)]

    def counters() -> WorkerCounters:
        ended, tokens = done[0]
        return WorkerCounters(sent=ended, succeeded=ended, failed=0, tokens=tokens)

    coordinator = _coordinator(
        store, batch_id, "w-slowed", Pacer(None, None), counters=counters, clock=lambda: now[0]
    )
    for at, ended in [(60.0, 600), (90.0, 630)]:
        now[0], done[0] = t0 + at, (ended, 20 * ended)
        await coordinator.beat()
    status = await report.batch_status(store, batch_id)
    (worker,) = status.workers
    assert worker.recent_requests_per_s == pytest.approx(1.0)  # 30 in the last 30 s
    assert status.requests_per_s == pytest.approx(1.0)  # not 630 / 90 = 7
    assert status.tokens_per_s == pytest.approx(20.0)
    assert status.eta_s == pytest.approx(30 / 1.0)
    (as_json,) = status.to_json()["workers"]
    assert as_json["recent_requests_per_s"] == pytest.approx(1.0)

    now[0] = t0 + 99.0
    await coordinator.beat()  # nothing ended since
    status = await report.batch_status(store, batch_id)
    assert status.requests_per_s == 0.0 and status.eta_s is None
    assert "speed     0.0 req/s, 0 tokens/s, ETA -" in report.render_status(status)


async def test_a_server_pause_seen_by_one_worker_pauses_the_others(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _batch(store, make_file, 1, "http://127.0.0.1:9/v1")
    for wid in ("w-a", "w-b"):
        await store.register_worker(wid, batch_id, time.time())
    pacer_a, pacer_b = Pacer(600, None), Pacer(600, None)
    a = _coordinator(store, batch_id, "w-a", pacer_a)
    b = _coordinator(store, batch_id, "w-b", pacer_b)
    await a.look()
    await b.look()
    assert await a.publish_pause() is None  # nothing to tell yet

    # The server tells worker A to wait 30 s.
    await pacer_a.acquire()
    pacer_a.observe(_rate_limited(30.0))
    published = await a.publish_pause()
    assert published is not None and published == pytest.approx(time.time() + 30, abs=1)
    assert await a.publish_pause() is None  # written once, not at every check
    row = await _scalar(store, "SELECT paused_until FROM workers WHERE id = 'w-a'")
    assert row == pytest.approx(published)

    assert pacer_b.snapshot().pause_left_s == 0
    seen = await b.look()
    assert seen.paused_until == pytest.approx(published)
    assert pacer_b.snapshot().pause_left_s == pytest.approx(30, abs=1)
    # B follows A's pause: it does not publish it as its own, and A does not follow itself.
    assert await b.publish_pause() is None
    assert await _scalar(store, "SELECT paused_until FROM workers WHERE id = 'w-b'") is None
    assert (await a.look()).paused_until is None

    # A heartbeat keeps the published pause.
    await a.beat()
    row = await _scalar(store, "SELECT paused_until FROM workers WHERE id = 'w-a'")
    assert row == pytest.approx(published)


async def test_a_pause_from_a_skewed_clock_is_followed_for_a_bounded_time(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _batch(store, make_file, 1, "http://127.0.0.1:9/v1")
    for wid in ("w-a", "w-b"):
        await store.register_worker(wid, batch_id, time.time())
    await store.publish_pause("w-a", time.time() + 86_400)
    pacer = Pacer(600, None)
    await _coordinator(store, batch_id, "w-b", pacer).look()
    assert 0 < pacer.snapshot().pause_left_s <= 121


async def test_a_worker_joining_others_waits_for_them_to_make_room(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _batch(store, make_file, 1, "http://127.0.0.1:9/v1")
    await store.register_worker("w-first", batch_id, time.time())
    first = Pacer(600, None)
    await _coordinator(store, batch_id, "w-first", first).join()
    assert first.snapshot().pause_left_s == 0  # alone: starts at once

    await store.register_worker("w-second", batch_id, time.time())
    second = Pacer(600, None)
    await _coordinator(store, batch_id, "w-second", second).join()
    snap = second.snapshot()
    assert snap.rpm == pytest.approx(300)
    assert snap.pause_left_s == pytest.approx(JOIN_HOLD_S, abs=0.5)


async def test_a_late_answer_is_fenced_and_counted_as_such(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _batch(store, make_file, 2, "http://127.0.0.1:9/v1")
    now = time.time()
    late = await store.claim(batch_id, "w-slow", "w-slow.1", 2, now, 1.0)
    # Its leases expire; another worker takes the jobs over.
    taken = await store.claim(batch_id, "w-fast", "w-fast.1", 2, now + 5, 60.0)
    assert [j.id for j in taken] == [j.id for j in late]

    def ended(job_id: int, token: str) -> Ended:
        return Ended(job_id, token, JobState.FAILED, 1, 400, 1.0, error_kind="http_400")

    slow = await store.record(
        batch_id, "w-slow", [ended(j.id, j.lease_token) for j in late], [], now + 6
    )
    assert (slow.recorded, slow.fenced) == (0, 2)
    fast = await store.record(
        batch_id, "w-fast", [ended(j.id, j.lease_token) for j in taken], [], now + 7
    )
    assert (fast.recorded, fast.fenced) == (2, 0)


def test_the_lease_can_be_set_from_the_environment(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from batchrunner.cli import cli

    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    bad = CliRunner().invoke(cli, ["--db", db, "run", "batch_x"], env={LEASE_ENV: "soon"})
    assert bad.exit_code == 2 and "--lease" in bad.output
    short = CliRunner().invoke(cli, ["--db", db, "run", "batch_x"], env={LEASE_ENV: "0.1"})
    assert short.exit_code == 2 and "--lease" in short.output
    # A valid lease gets past the options to the database.
    ok = CliRunner().invoke(cli, ["--db", db, "run", "batch_x"], env={LEASE_ENV: "2.5"})
    assert ok.exit_code == 2 and "no database at" in ok.output


# --------------------------------------------------------------------------- worker processes


@dataclass
class WorkerProcess:
    """One `batchrunner run` process; its output goes to files (a full pipe would stall it)."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def _env(lease_s: float | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHRUNNER_DB", "OPENAI_BASE_URL")}
    env["OPENAI_API_KEY"] = "sk-test-workers"
    env.pop(LEASE_ENV, None)
    if lease_s is not None:
        env[LEASE_ENV] = str(lease_s)
    return env


class Launcher:
    """Starts `batchrunner run` processes; whatever still runs when the test ends is killed."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[WorkerProcess] = []

    def start(
        self,
        n: int,
        db_url: str,
        batch_id: str,
        *,
        concurrency: int,
        extra: tuple[str, ...] = (),
        lease_s: float | None = None,
    ) -> list[WorkerProcess]:
        workers = []
        for _ in range(n):
            err = self.cwd / f"worker-{len(self.started)}.err"
            with err.open("wb") as err_file:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "batchrunner",
                        "--db",
                        db_url,
                        "run",
                        batch_id,
                        "--concurrency",
                        str(concurrency),
                        "--quiet",
                        *extra,
                    ],
                    cwd=self.cwd,
                    env=_env(lease_s),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err_file,
                )
            workers.append(WorkerProcess(proc, err))
        self.started.extend(workers)
        return workers

    def kill_all(self) -> None:
        for w in self.started:
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    started = Launcher(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


async def _published_pauses(store: JobStore, batch_id: str) -> int:
    sql = "SELECT COUNT(*) FROM workers WHERE batch_id = :b AND paused_until IS NOT NULL"
    return int(await _scalar(store, sql, b=batch_id))


async def _wait_for_exit(
    workers: list[WorkerProcess],
    timeout_s: float = RUN_TIMEOUT_S,
    *,
    each_poll: Callable[[], Awaitable[None]] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while any(w.proc.poll() is None for w in workers):
        if time.monotonic() > deadline:
            raise AssertionError(f"workers still running after {timeout_s}s")
        if each_poll is not None:
            await each_poll()
        await asyncio.sleep(POLL_S)


def _assert_exited_cleanly(workers: list[WorkerProcess]) -> None:
    for w in workers:
        err = w.stderr()
        assert w.proc.returncode == 0, err
        assert "Traceback" not in err, err


async def _worker_id(store: JobStore, batch_id: str, pid: int) -> str:
    """The id the worker process with this pid registered under (waits for it)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        rows = await _rows(
            store, "SELECT id FROM workers WHERE batch_id = :b AND pid = :p", b=batch_id, p=pid
        )
        if rows:
            return str(rows[0].id)
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"worker {pid} never registered")


async def _held_by(store: JobStore, batch_id: str, worker_id: str) -> set[int]:
    rows = await _rows(
        store,
        "SELECT id FROM jobs WHERE batch_id = :b AND state = 'running' AND lease_owner = :w",
        b=batch_id,
        w=worker_id,
    )
    return {r.id for r in rows}


async def _busy(store: JobStore, batch_id: str, worker_id: str, *, recorded: int) -> None:
    """Wait until the worker has recorded `recorded` attempts and holds unfinished jobs."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        done = await _scalar(
            store, "SELECT COUNT(*) FROM attempts WHERE worker_id = :w", w=worker_id
        )
        if done >= recorded and await _held_by(store, batch_id, worker_id):
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"worker {worker_id} never got busy")


async def _resent(store: JobStore, batch_id: str, received: dict[bytes, int]) -> dict[int, int]:
    """Jobs whose body reached the server more than once: job id -> receptions."""
    bodies = await _bodies(store, batch_id)
    assert all(received.get(d, 0) >= 1 for d in bodies.values()), "a job was never sent"
    return {job_id: received[d] for job_id, d in bodies.items() if received[d] > 1}


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[JobStore]:
    s = await JobStore.open(pg_url)
    try:
        yield s
    finally:
        await s.close()


async def _share_a_batch(
    store: JobStore, db_url: str, make_file: MakeFile, launcher: Launcher, n: int
) -> None:
    """`n` workers on one batch: every job is sent once, and each worker takes part."""
    total = 100 * n
    with FakeServerThread(FakeConfig(seed=n, latency_ms=100)) as srv:
        batch_id = await _batch(store, make_file, total, srv.url)
        workers = launcher.start(n, db_url, batch_id, concurrency=4)
        most_live = 0
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while any(w.proc.poll() is None for w in workers) and time.monotonic() < deadline:
            live = await store.live_workers(batch_id, time.time())
            most_live = max(most_live, len(live))
            await asyncio.sleep(POLL_S)
        await _wait_for_exit(workers)
        stats = srv.stats

    _assert_exited_cleanly(workers)
    await _assert_all_succeeded_once(store, batch_id, total)
    assert await _resent(store, batch_id, stats.requests_by_body) == {}
    assert stats.requests_total == total
    # They really shared it: each took part, and all were live at once.
    per_worker = await _rows(
        store,
        "SELECT a.worker_id, w.pid, COUNT(*) AS n FROM attempts a"
        " JOIN workers w ON w.id = a.worker_id WHERE a.batch_id = :b GROUP BY a.worker_id, w.pid",
        b=batch_id,
    )
    assert sorted(r.pid for r in per_worker) == sorted(w.pid for w in workers)
    assert most_live == n
    # Each ended by marking itself stopped.
    assert await store.live_workers(batch_id, time.time()) == []


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("n", [1, 2, 4])
async def test_workers_share_a_batch_and_send_every_job_once(
    pg_store: JobStore, pg_url: str, make_file: MakeFile, launcher: Launcher, n: int
) -> None:
    await _share_a_batch(pg_store, pg_url, make_file, launcher, n)


@pytest.mark.slow
async def test_workers_of_one_machine_share_a_batch_in_sqlite(
    sqlite_url: str, make_file: MakeFile, launcher: Launcher
) -> None:
    async with await JobStore.open(sqlite_url) as store:
        await _share_a_batch(store, sqlite_url, make_file, launcher, 2)


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_killed_worker_s_jobs_are_finished_by_the_others(
    pg_store: JobStore,
    pg_url: str,
    make_file: MakeFile,
    launcher: Launcher,
) -> None:
    store = pg_store
    total = 300
    with FakeServerThread(FakeConfig(seed=11, latency_ms=100)) as srv:
        batch_id = await _batch(store, make_file, total, srv.url)
        workers = launcher.start(3, pg_url, batch_id, concurrency=4, lease_s=5.0)
        victim = workers[0]
        victim_id = await _worker_id(store, batch_id, victim.pid)
        await _busy(store, batch_id, victim_id, recorded=8)
        # Frozen first, so that what it holds can be read before anyone may take it over.
        victim.proc.send_signal(signal.SIGSTOP)
        held = await _held_by(store, batch_id, victim_id)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        await _wait_for_exit(workers[1:])
        stats = srv.stats

    _assert_exited_cleanly(workers[1:])
    await _assert_all_succeeded_once(store, batch_id, total)
    # Sent again: only what the dead worker held (sent, or answered and not yet recorded).
    resent = await _resent(store, batch_id, stats.requests_by_body)
    assert set(resent) <= held, (resent, held)
    assert all(n == 2 for n in resent.values())
    # A process of this machine that is gone is noticed, not waited out.
    assert await _scalar(store, "SELECT stopped_at FROM workers WHERE id = :w", w=victim_id)


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_frozen_worker_s_jobs_go_to_the_others_when_its_leases_expire(
    pg_store: JobStore,
    pg_url: str,
    make_file: MakeFile,
    launcher: Launcher,
) -> None:
    """A worker that stops answering (a machine lost to the network, a paused VM) cannot be
    told from a dead one: its jobs pass to the others when their leases expire, and when it
    comes back its late answers are fenced off."""
    store = pg_store
    total = 240
    with FakeServerThread(FakeConfig(seed=12, latency_ms=100)) as srv:
        batch_id = await _batch(store, make_file, total, srv.url)
        workers = launcher.start(3, pg_url, batch_id, concurrency=4, lease_s=2.0)
        victim = workers[0]
        victim_id = await _worker_id(store, batch_id, victim.pid)
        await _busy(store, batch_id, victim_id, recorded=8)
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            held = await _held_by(store, batch_id, victim_id)
            await _wait_for_exit(workers[1:])
            await _assert_all_succeeded_once(store, batch_id, total)
            # Not reaped: its process lives; the others went by the leases alone.
            stopped = await _scalar(
                store, "SELECT stopped_at FROM workers WHERE id = :w", w=victim_id
            )
            assert stopped is None
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        await _wait_for_exit([victim])
        stats = srv.stats

    _assert_exited_cleanly(workers)
    await _assert_all_succeeded_once(store, batch_id, total)
    resent = await _resent(store, batch_id, stats.requests_by_body)
    assert set(resent) <= held, (resent, held)
    assert all(n == 2 for n in resent.values())
    assert resent, "the frozen worker had nothing in flight"
    assert "late answer(s) were not recorded" in victim.stderr()


def _status_json(db_url: str, batch_id: str, cwd: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "batchrunner", "--db", db_url, "status", batch_id, "--json"],
        cwd=cwd,
        env=_env(None),
        capture_output=True,
        check=True,
        timeout=RUN_TIMEOUT_S,
    )
    status: dict[str, Any] = orjson.loads(out.stdout)
    return status


def _rate_per_s(times: list[float], start: float, end: float) -> float:
    """Answers per second between two moments (the server's clock: time.monotonic)."""
    return sum(start <= t < end for t in times) / (end - start)


def _busiest_window_per_s(times: list[float], window_s: float) -> float:
    """Answers per second in the busiest `window_s` of the run."""
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - window_s:
            first += 1
        most = max(most, last - first + 1)
    return most / window_s


def _per_second(times: list[float]) -> list[int]:
    first = min(times)
    counts = [0] * (int(max(times) - first) + 1)
    for t in times:
        counts[int(t - first)] += 1
    return counts


@pytest.mark.slow
@pytest.mark.postgres
async def test_workers_keep_the_batch_s_request_limit_together(
    pg_store: JobStore,
    pg_url: str,
    make_file: MakeFile,
    tmp_path: Path,
    launcher: Launcher,
) -> None:
    store = pg_store
    total = 270
    rpm = 1800.0
    # The server enforces 15 % more than the batch's limit, per second as OpenAI does: what it
    # refuses was sent too fast, and what it answers is timed at the rate the workers send.
    server = FakeConfig(seed=13, latency_ms=50, rpm_limit=1.15 * rpm)
    with FakeServerThread(server) as srv:
        batch_id = await _batch(store, make_file, total, srv.url)
        workers = launcher.start(3, pg_url, batch_id, concurrency=8, extra=("--rpm", str(rpm)))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(await store.live_workers(batch_id, time.time())) < 3:
            assert time.monotonic() < deadline, "the workers never were all live"
            await asyncio.sleep(POLL_S)
        # From here on, every worker paces at its share: the last one waits JOIN_HOLD_S, the
        # others see it at their next look.
        steady_from = time.monotonic() + JOIN_HOLD_S
        status = _status_json(pg_url, batch_id, tmp_path)
        await _wait_for_exit(workers)
        stats = srv.stats

    assert sorted(w["pid"] for w in status["workers"]) == sorted(w.pid for w in workers)
    _assert_exited_cleanly(workers)
    await _assert_all_succeeded_once(store, batch_id, total)
    refused = stats.answers_by_status.get("429", 0)
    resent = await _resent(store, batch_id, stats.requests_by_body)
    assert sum(n - 1 for n in resent.values()) == refused  # nothing else was sent twice
    # A handful of refusals is tolerated: a worker slowed by a loaded machine may read the
    # others' arrival a moment late.
    assert refused <= total // 50, stats.answers_by_status
    times = list(stats.success_times_s)
    assert len(times) == total
    limit_per_s = rpm / 60.0
    # Up to the last second, when the workers run out of jobs one after the other.
    steady = _rate_per_s(times, steady_from, max(times) - 1.0)
    busiest = _busiest_window_per_s(times, 2.0)
    print(f"limit {limit_per_s:.1f}/s: steady {steady:.1f}/s, busiest 2 s {busiest:.1f}/s")
    assert steady <= 1.15 * limit_per_s, (steady, _per_second(times))
    # Joins included: a worker reads the others' arrival up to a look late.
    assert busiest <= 1.3 * limit_per_s, (busiest, _per_second(times))


@pytest.mark.slow
@pytest.mark.postgres
async def test_workers_above_the_server_s_limit_slow_down_and_lose_nothing(
    pg_store: JobStore,
    pg_url: str,
    make_file: MakeFile,
    launcher: Launcher,
) -> None:
    store = pg_store
    total = 120
    server_rpm = 1200.0
    # The batch is allowed twice what the server takes: 429s follow, and the workers' pauses
    # and slower rates have to absorb them.
    with FakeServerThread(FakeConfig(seed=14, latency_ms=50, rpm_limit=server_rpm)) as srv:
        batch_id = await _batch(store, make_file, total, srv.url)
        workers = launcher.start(
            3,
            pg_url,
            batch_id,
            concurrency=8,
            extra=("--rpm", str(2 * server_rpm), "--max-attempts", "30"),
        )
        # Watched while they run: a heartbeat after a pause has ended clears it from the row.
        published = 0

        async def watch() -> None:
            nonlocal published
            published = max(published, await _published_pauses(store, batch_id))

        await _wait_for_exit(workers, each_poll=watch)
        stats = srv.stats

    _assert_exited_cleanly(workers)
    await _assert_all_succeeded_once(store, batch_id, total)
    assert stats.successes == total
    refused = stats.answers_by_status.get("429", 0)
    # Refusals happened, and the workers adapted instead of sending everything twice.
    assert 0 < refused < total, stats.answers_by_status
    assert published >= 1
