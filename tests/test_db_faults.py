"""The job database failing under a run: locked, full, read-only, connections cut.

Each test runs the real command line in a subprocess against the local fake API, lets the
database fail, and checks what docs/RELIABILITY.md promises: the run stops (or rides it out)
with a clear message and no traceback, nothing is recorded twice, and the next run finishes
the batch, sending again only what the failed run had sent without recording.

How each fault is made, and why that way:

- locked: another process holds `BEGIN EXCLUSIVE`. The product waits `SQLITE_BUSY_TIMEOUT_MS`
  (30 s) for a lock; the run under test is started through a two-line wrapper that sets a short
  one first, so that "longer than the busy timeout" takes a second, not a minute.
- full: `PRAGMA max_page_count` lives on one connection and is not stored in the file, so the
  command cannot be pointed at it. The run instead gets a file-size limit (RLIMIT_FSIZE): a write
  past it fails, as on a full disk, whatever user the tests run as. SQLite reports "disk I/O
  error" for that rather than "database or disk is full".
- read-only: the tests run as root, whom file modes do not stop, and the interpreter lives where
  an unprivileged user cannot run it; SQLite's own read-only open (`file:...?mode=ro&uri=true`
  in the URL) stands in.
- PostgreSQL: instead of restarting a server others may be using, the test terminates the run's
  own backends (`pg_terminate_backend`), which the client sees the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import resource
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs; used for one admin query
import pytest
from sqlalchemy import text

from batchrunner.config import LEASE_ENV
from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.store import JobStore
from tests.conftest import chat, pg_admin_url

MakeFile = Callable[..., Path]

CONCURRENCY = 8
JOBS = 300
#: The fake API's answer time: long enough that a run is still going when the fault comes.
LATENCY_MS = 40.0
#: The busy timeout the run under test waits for a lock.
SHORT_BUSY_MS = 200
#: A lease far longer than any test: a job still leased by a failed run can only come back
#: before it by being given back or released as a dead worker's.
LONG_LEASE_S = 600.0
#: A resumed run that has to wait for such a lease would take minutes; a working one, seconds.
RESUME_LIMIT_S = 30.0
#: A run the fault hits mid-way retries its writes for a while first (dispatcher.WRITE_ATTEMPTS).
FAILING_RUN_LIMIT_S = 60.0
#: Runs the product with a short SQLite busy timeout: `python -c WRAPPER MS batchrunner-args...`.
WRAPPER = (
    "import sys, batchrunner.database as db; db.SQLITE_BUSY_TIMEOUT_MS = int(sys.argv.pop(1)); "
    "from batchrunner.cli import main; main()"
)
#: Holds SQLite's write lock: `python -c LOCKER PATH SECONDS`; prints "locked" once it holds
#: it, and lets go after SECONDS, or (SECONDS < 0) when its stdin closes.
LOCKER = (
    "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
    "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); s = float(sys.argv[2]); "
    "time.sleep(s) if s >= 0 else sys.stdin.read(); c.execute('COMMIT')"
)
#: Hold the lock until the test says so.
UNTIL_RELEASED = -1.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHRUNNER_DB", "OPENAI_BASE_URL")}
    env["OPENAI_API_KEY"] = "sk-test-db-faults"
    env.update(extra)
    return env


async def _start(
    db_url: str,
    args: Sequence[str],
    cwd: Path,
    *,
    busy_ms: int | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> asyncio.subprocess.Process:
    head = ["-c", WRAPPER, str(busy_ms)] if busy_ms is not None else ["-m", "batchrunner"]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *head,
        "--db",
        db_url,
        *args,
        cwd=cwd,
        env=env or _env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec_fn,
    )


def _run_args(batch_id: str) -> list[str]:
    return ["run", batch_id, "--concurrency", str(CONCURRENCY), "--timeout", "10", "--quiet"]


async def _finish(proc: asyncio.subprocess.Process, limit_s: float = RESUME_LIMIT_S) -> str:
    try:
        _, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the run did not end within {limit_s:.0f} s") from None
    return err.decode()


def _assert_clean_failure(stderr: str, *reasons: str) -> None:
    """Exit 1 is checked by the caller; here: one readable error, no traceback."""
    assert "Traceback" not in stderr, stderr
    # "Error: ..." when the run could not start, "error: ..." when it stopped.
    errors = [line for line in stderr.splitlines() if line.lower().startswith("error: ")]
    assert len(errors) == 1, stderr
    assert any(r in errors[0] for r in reasons), stderr


async def _wait_for_requests(srv: FakeServer, n: int, proc: asyncio.subprocess.Process) -> None:
    while srv.stats.requests_total < n:
        assert proc.returncode is None, "the run ended before the fault"
        await asyncio.sleep(0.005)


def _digest(body: str) -> bytes:
    return hashlib.sha256(body.encode()).digest()


async def _rows(store: JobStore, sql: str, **params: Any) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def _unrecorded(store: JobStore, batch_id: str, srv: FakeServer) -> set[bytes]:
    """Bodies the server received whose job has not ended: all a resumed run may send again."""
    received = srv.stats.requests_by_body
    rows = await _rows(store, "SELECT body, state FROM jobs WHERE batch_id = :b", b=batch_id)
    return {
        d
        for d in (_digest(r.body) for r in rows if r.state not in ("succeeded", "failed"))
        if received.get(d, 0)
    }


async def _assert_finished_once(
    store: JobStore, batch_id: str, srv: FakeServer, resendable: set[bytes]
) -> None:
    counts = await store.counts(batch_id)
    assert counts.counts["succeeded"] == JOBS and counts.unfinished == 0
    results = await _rows(store, "SELECT job_id FROM results WHERE batch_id = :b", b=batch_id)
    assert len(results) == len({r.job_id for r in results}) == JOBS
    received = srv.stats.requests_by_body
    bodies = await _rows(store, "SELECT body FROM jobs WHERE batch_id = :b", b=batch_id)
    for r in bodies:
        d = _digest(r.body)
        assert 1 <= received.get(d, 0) <= 1 + (d in resendable), r.body


async def _batch(store: JobStore, make_file: MakeFile, srv: FakeServer) -> str:
    rows = [chat(f"db fault {i}") for i in range(JOBS)]
    return (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id


def _sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


# -- SQLite locked by another process ---------------------------------------------------------


async def _release(locker: asyncio.subprocess.Process) -> None:
    assert locker.stdin is not None
    locker.stdin.close()
    assert await locker.wait() == 0


async def _lock(path: Path, hold_s: float) -> asyncio.subprocess.Process:
    locker = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", LOCKER, str(path), str(hold_s)],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert locker.stdout is not None
    assert await locker.stdout.readline() == b"locked\n"
    return locker


@pytest.mark.slow
async def test_sqlite_locked_before_the_run_stops_it_with_a_message(
    sqlite_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    async with await JobStore.open(sqlite_url) as store, FakeServer(FakeConfig()) as srv:
        batch_id = await _batch(store, make_file, srv)
        locker = await _lock(_sqlite_path(sqlite_url), UNTIL_RELEASED)
        try:
            proc = await _start(sqlite_url, _run_args(batch_id), tmp_path, busy_ms=SHORT_BUSY_MS)
            stderr = await _finish(proc)
        finally:
            await _release(locker)
        assert proc.returncode == 1, stderr
        _assert_clean_failure(stderr, "database is locked")
        assert srv.stats.requests_total == 0
        assert (await store.counts(batch_id)).counts["pending"] == JOBS

        proc = await _start(sqlite_url, _run_args(batch_id), tmp_path)
        stderr = await _finish(proc)
        assert proc.returncode == 0, stderr
        await _assert_finished_once(store, batch_id, srv, set())


@pytest.mark.slow
async def test_sqlite_lock_error_is_one_readable_line(
    sqlite_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    """The message names the problem, without the SQL statement and the library's help link."""
    async with await JobStore.open(sqlite_url) as store, FakeServer(FakeConfig()) as srv:
        batch_id = await _batch(store, make_file, srv)
        locker = await _lock(_sqlite_path(sqlite_url), UNTIL_RELEASED)
        try:
            proc = await _start(sqlite_url, _run_args(batch_id), tmp_path, busy_ms=SHORT_BUSY_MS)
            stderr = await _finish(proc)
        finally:
            await _release(locker)
    assert proc.returncode == 1
    (error,) = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert "database is locked" in error
    assert "[SQL:" not in stderr and "sqlalche.me" not in stderr, stderr


@pytest.mark.slow
async def test_sqlite_locked_mid_run_nothing_twice_and_the_next_run_finishes(
    sqlite_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    async with (
        await JobStore.open(sqlite_url) as store,
        FakeServer(FakeConfig(latency_ms=LATENCY_MS)) as srv,
    ):
        batch_id = await _batch(store, make_file, srv)
        proc = await _start(sqlite_url, _run_args(batch_id), tmp_path, busy_ms=SHORT_BUSY_MS)
        await _wait_for_requests(srv, JOBS // 5, proc)
        locker = await _lock(_sqlite_path(sqlite_url), 2.0)
        stderr = await _finish(proc, FAILING_RUN_LIMIT_S)
        assert await locker.wait() == 0
        # Riding it out (the writer retries) or stopping are both fine; silence is not.
        assert proc.returncode in (0, 1), stderr
        assert "Traceback" not in stderr, stderr
        if proc.returncode == 1:
            _assert_clean_failure(stderr, "database is locked")
        resendable = await _unrecorded(store, batch_id, srv)

        proc = await _start(sqlite_url, _run_args(batch_id), tmp_path)
        stderr = await _finish(proc)
        assert proc.returncode == 0, stderr
        await _assert_finished_once(store, batch_id, srv, resendable)


# -- disk full ---------------------------------------------------------------------------------


#: What the run may write beyond the empty write-ahead log before "the disk" is full.
FILE_SIZE_LIMIT_BYTES = 256 * 1024


def _limit_file_size() -> None:
    # In the child, before exec; Python ignores SIGXFSZ, so a write past it fails with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))


@pytest.mark.slow
async def test_disk_full_stops_the_run_and_the_next_run_finishes_at_once(
    sqlite_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    async with (
        await JobStore.open(sqlite_url) as store,
        FakeServer(FakeConfig(latency_ms=LATENCY_MS)) as srv,
    ):
        batch_id = await _batch(store, make_file, srv)
        # The log starts empty, so the limit is what the run itself may write. (A plain
        # connection: the store's own open a transaction, in which a checkpoint cannot run.)
        with contextlib.closing(sqlite3.connect(_sqlite_path(sqlite_url))) as conn:
            assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        proc = await _start(
            sqlite_url,
            _run_args(batch_id),
            tmp_path,
            env=_env(**{LEASE_ENV: str(LONG_LEASE_S)}),
            preexec_fn=_limit_file_size,
        )
        stderr = await _finish(proc, FAILING_RUN_LIMIT_S)
        assert proc.returncode == 1, stderr
        _assert_clean_failure(stderr, "disk I/O error", "database or disk is full")
        assert srv.stats.requests_total > 0, "the disk filled up before the first request"
        resendable = await _unrecorded(store, batch_id, srv)
        # Its summary counted answers the database does not have: it says where they are.
        said = re.search(r"(\d+) succeeded and (\d+) failed in this run", stderr)
        assert said is not None, stderr
        counts = (await store.counts(batch_id)).counts
        unwritten = int(said[1]) + int(said[2]) - counts["succeeded"] - counts["failed"]
        assert unwritten > 0
        assert f"note: {unwritten} of these answer(s) are not in the database yet" in stderr

        # The failed run could not give its jobs back; they must not wait out its lease.
        proc = await _start(sqlite_url, _run_args(batch_id), tmp_path)
        stderr = await _finish(proc)
        assert proc.returncode == 0, stderr
        await _assert_finished_once(store, batch_id, srv, resendable)
        # Nor is anything sent twice: the answers the failed run could not write waited in
        # its journal (on the same full disk: a journal's segment stays under the limit).
        assert set(srv.stats.requests_by_body.values()) == {1}, stderr


async def test_a_worker_marked_stopped_holds_no_job(store: JobStore, make_file: MakeFile) -> None:
    """A run that cannot give its jobs back (the database refused the write) may still manage
    to mark itself stopped. The next run must not then wait out the stopped worker's leases:
    `register_worker` releases only the jobs of workers that look alive and whose process is
    gone, and a stopped worker's process may be gone or busy with something else entirely."""
    rows = [chat(f"held {i}") for i in range(3)]
    batch_id = (await submit_file(store, make_file(rows))).batch.id
    now = time.time()
    await store.register_worker("w-stopped", batch_id, now)
    held = await store.claim(batch_id, "w-stopped", "t-stopped", 10, now, LONG_LEASE_S)
    assert len(held) == 3
    # The give-back failed; marking the worker stopped did not.
    await store.stop_worker("w-stopped", now + 1)

    await store.register_worker("w-next", batch_id, now + 2)
    taken = await store.claim(batch_id, "w-next", "t-next", 10, now + 2, LONG_LEASE_S)
    assert [j.id for j in taken] == [j.id for j in held]


# -- read-only database ------------------------------------------------------------------------


@pytest.mark.slow
async def test_read_only_database_stops_the_run_before_sending(
    sqlite_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    path = _sqlite_path(sqlite_url)
    read_only_url = f"sqlite:///file:{path}?mode=ro&uri=true"
    async with await JobStore.open(sqlite_url) as store, FakeServer(FakeConfig()) as srv:
        batch_id = await _batch(store, make_file, srv)
        proc = await _start(read_only_url, _run_args(batch_id), tmp_path)
        stderr = await _finish(proc)
        assert proc.returncode == 1, stderr
        _assert_clean_failure(stderr, "readonly database", "read-only")
        assert srv.stats.requests_total == 0
        assert (await store.counts(batch_id)).counts["pending"] == JOBS

        # Reading needs no write access.
        proc = await _start(read_only_url, ["status", batch_id, "--json"], tmp_path)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert batch_id.encode() in out

        proc = await _start(sqlite_url, _run_args(batch_id), tmp_path)
        stderr = await _finish(proc)
        assert proc.returncode == 0, stderr
        await _assert_finished_once(store, batch_id, srv, set())


# -- PostgreSQL connections cut ----------------------------------------------------------------


async def _terminate_backends(database: str) -> int:
    admin = pg_admin_url()
    assert admin is not None
    conn = await asyncpg.connect(admin)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
        )
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.postgres
async def test_postgres_connections_cut_mid_run_nothing_twice_and_the_next_run_finishes(
    pg_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    database = pg_url.rpartition("/")[2]
    async with FakeServer(FakeConfig(latency_ms=LATENCY_MS)) as srv:
        async with await JobStore.open(pg_url) as store:
            batch_id = await _batch(store, make_file, srv)
        proc = await _start(pg_url, _run_args(batch_id), tmp_path)
        terminated = 0
        for cut in range(1, 4):
            await _wait_for_requests(srv, cut * JOBS // 5, proc)
            terminated += await _terminate_backends(database)
        stderr = await _finish(proc, FAILING_RUN_LIMIT_S)
        assert terminated >= 3
        assert proc.returncode in (0, 1), stderr
        assert "Traceback" not in stderr, stderr
        if proc.returncode == 1:
            _assert_clean_failure(stderr, "connection", "terminat")
        async with await JobStore.open(pg_url) as store:
            resendable = await _unrecorded(store, batch_id, srv)
        proc = await _start(pg_url, _run_args(batch_id), tmp_path)
        stderr = await _finish(proc)
        assert proc.returncode == 0, stderr
        async with await JobStore.open(pg_url) as store:
            await _assert_finished_once(store, batch_id, srv, resendable)
