"""The store's SQLite connections (database.py): URLs read as SQLAlchemy reads them, reads
beside a write, errors, the connections kept, and no SQLAlchemy for a database at head."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import make_url

from batchrunner import coordination, database
from batchrunner.database import SqliteDatabase, SqliteTarget
from batchrunner.errors import ConstraintViolation, StoreError, UsageError
from batchrunner.ingest import submit_file
from batchrunner.store import BatchInfo, JobStore
from tests.conftest import batch_without_importing, chat, coordinator, run_cli

MakeFile = Callable[..., Path]
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///jobs.db",
        "sqlite:////var/lib/batchrunner/jobs.db",
        "sqlite+aiosqlite:///jobs.db",
        "sqlite+pysqlite:///data/a%20b.db",
        "sqlite:///a b#1 ü.db",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file:/tmp/jobs.db?mode=ro&uri=true",
        "sqlite:///file:jobs.db?uri=true",
    ],
)
def test_sqlite_urls_open_what_sqlalchemy_opens(url: str) -> None:
    (filename, *_), options = SQLiteDialect_pysqlite().create_connect_args(make_url(url))
    target = SqliteTarget.parse(url)
    assert (target.filename, target.uri) == (filename, bool(options.get("uri")))
    assert target.database == (make_url(url).database or ":memory:")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sqlite://somehost/jobs.db", "names no host"),
        ("sqlite:///jobs.db?mode=ro", "need uri=true"),
        ("sqlite:///jobs.db?timeout=5", "waits 30 s for a locked database"),
        ("sqlite:jobs.db", "not a database URL"),
    ],
)
def test_sqlite_urls_sqlite_cannot_open_are_refused(url: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        SqliteTarget.parse(url)


_ADD_WORKER = (
    "INSERT INTO workers (id, batch_id, host, pid, started_at, heartbeat_at, sent, succeeded,"
    " failed, tokens) VALUES (:id, :b, 'h', 1, 0, 0, 0, 0, 0, 0)"
)


async def _store_with_a_batch(tmp_path: Path) -> tuple[JobStore, str]:
    """A store and the id of an empty batch (workers belong to one)."""
    store = await JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    (tmp_path / "empty.jsonl").write_text(orjson.dumps(chat("hi")).decode())
    batch = (
        await submit_file(store, tmp_path / "empty.jsonl", base_url="http://127.0.0.1:9")
    ).batch
    return store, batch.id


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?cache=shared&uri=true"]
)
def test_a_database_in_memory_is_refused(url: str) -> None:
    with pytest.raises(UsageError, match="in memory"):
        JobStore.for_url(url)


async def test_a_database_in_a_folder_that_is_not_there_names_it(tmp_path: Path) -> None:
    # "cannot open the database: unable to open database file", and no path (a URL's ~ is
    # not the home folder: SQLAlchemy opens it as a folder named ~).
    folder = tmp_path / "missing"
    with pytest.raises(StoreError) as caught:
        await JobStore.open(f"sqlite:///{folder / 'jobs.db'}")
    assert f"{folder / 'jobs.db'} (there is no folder {folder})" in str(caught.value)
    assert not folder.exists()


@pytest.mark.parametrize(
    ("url", "uri"),
    [
        ("sqlite:///a b#1/jobs.db", f"file:{quote(os.path.abspath('a b#1/jobs.db'))}?mode=rw"),
        ("sqlite:///file:/d/jobs.db?mode=ro&uri=true", "file:/d/jobs.db?mode=ro"),
        (
            "sqlite:///file:/d/jobs.db?cache=private&uri=true",
            "file:/d/jobs.db?cache=private&mode=rw",
        ),
        ("sqlite:///file:/d/jobs.db?uri=true", "file:/d/jobs.db?mode=rw"),
    ],
)
def test_the_uri_for_an_existing_database_never_creates_one(url: str, uri: str) -> None:
    assert SqliteTarget.parse(url).uri_for_existing() == uri


async def test_a_read_beside_an_open_write_sees_the_last_commit(tmp_path: Path) -> None:
    store, batch_id = await _store_with_a_batch(tmp_path)
    async with store:
        writing = asyncio.Event()
        release = asyncio.Event()

        async def write() -> None:
            async with store._write() as conn:
                await conn.execute(_ADD_WORKER, {"id": "w", "b": batch_id})
                writing.set()
                await release.wait()

        writer = asyncio.create_task(write())
        await asyncio.wait_for(writing.wait(), 10)
        # WAL: the read neither waits for the write nor sees it before its commit.
        async with store.reading() as conn:
            assert (await conn.execute("SELECT COUNT(*) FROM workers")).scalar() == 0
        release.set()
        await writer
        async with store.reading() as conn:
            assert (await conn.execute("SELECT COUNT(*) FROM workers")).scalar() == 1


async def test_a_failed_write_is_rolled_back_and_the_next_one_goes_through(
    tmp_path: Path,
) -> None:
    store, b = await _store_with_a_batch(tmp_path)
    async with store:
        async with store._write() as conn:
            await conn.execute(_ADD_WORKER, {"id": "w1", "b": b})
        with pytest.raises(ConstraintViolation, match=r"UNIQUE constraint failed: workers\.id"):
            async with store._write() as conn:
                await conn.execute(_ADD_WORKER, {"id": "w2", "b": b})
                await conn.execute(_ADD_WORKER, {"id": "w1", "b": b})
        with pytest.raises(StoreError, match="database read failed: no such table: missing"):
            async with store.reading() as conn:
                await conn.execute("SELECT * FROM missing")
        async with store._write() as conn:
            await conn.execute(_ADD_WORKER, {"id": "w3", "b": b})
        async with store.reading() as conn:
            ids = (await conn.execute("SELECT id FROM workers ORDER BY id")).scalars()
        assert ids == ["w1", "w3"]  # w2 went with its transaction


async def test_a_statement_of_a_write_that_ended_is_refused_not_committed(tmp_path: Path) -> None:
    """A statement that reaches the writer's thread after its transaction was rolled back (a
    task left running) would run as a transaction of its own and be committed, or become a
    part of the next transaction."""
    store, b = await _store_with_a_batch(tmp_path)
    async with store:
        with pytest.raises(RuntimeError, match="given up"):
            async with store._write() as ended:
                await ended.execute(_ADD_WORKER, {"id": "w1", "b": b})
                raise RuntimeError("given up")
        with pytest.raises(StoreError, match="a transaction that had ended"):
            await ended.execute(_ADD_WORKER, {"id": "late", "b": b})
        async with store._write() as conn:
            await conn.execute(_ADD_WORKER, {"id": "w2", "b": b})
            with pytest.raises(StoreError, match="a transaction that had ended"):
                await ended.executemany(_ADD_WORKER, [{"id": "later", "b": b}])
        async with store.reading() as reader:
            ids = (await reader.execute("SELECT id FROM workers")).scalars()
        assert ids == ["w2"]


def _sqlite_threads() -> int:
    return sum(t.name.startswith("batchrunner-sqlite") for t in threading.enumerate())


async def test_reads_at_once_open_connections_that_are_not_all_kept(tmp_path: Path) -> None:
    store = await JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        inside = 0
        all_in = asyncio.Event()

        async def read() -> None:
            nonlocal inside
            async with store.reading() as conn:
                await conn.execute("SELECT 1")
                inside += 1
                if inside == 5:
                    all_in.set()
                await all_in.wait()

        await asyncio.wait_for(asyncio.gather(*(read() for _ in range(5))), 10)
        # Five at once had five connections; two stay open for the next reads.
        assert len(store._sqlite._idle) == database.SQLITE_IDLE_READERS
    finally:
        await store.close()
    assert _sqlite_threads() == 0


async def test_a_new_database_is_made_run_reported_and_exported_without_sqlalchemy(
    tmp_path: Path, make_file: MakeFile
) -> None:
    """SQLAlchemy, its drivers and alembic are imported to upgrade a schema made before (and
    to make PostgreSQL's, tests/test_postgres.py); a new SQLite database is made
    (`sqlite_schema`), loaded, run, reported on and exported without them (they cost a quarter
    of a second of every command's start-up, and running the migrations another three
    quarters of a new database's)."""
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    await batch_without_importing(
        url, ("sqlalchemy", "aiosqlite", "asyncpg", "alembic"), make_file, tmp_path
    )


async def test_a_database_behind_head_is_upgraded_on_first_use(tmp_path: Path) -> None:
    from batchrunner import db

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine, "0003")
    finally:
        await engine.dispose()
    target = SqliteDatabase(url)
    await target.ensure_schema()
    async with target.read() as conn:
        assert (
            await conn.execute("SELECT version_num FROM alembic_version")
        ).scalar() == database.SCHEMA_HEAD
        # 0004's column is there.
        columns = [r[1] for r in (await conn.execute("PRAGMA table_info(batches)")).all()]
    await target.close()
    assert "meta_keys" in columns


# -- a load without WAL -----------------------------------------------------------------------

_EMPTY = "SELECT 1 FROM t LIMIT 1"


def _file_in_wal(path: Path) -> bool:
    """What the file's header says (bytes 18 and 19: 2 for WAL, 1 for a rollback journal),
    not what a connection of ours would make of it."""
    return path.read_bytes()[18:20] == b"\x02\x02"


@asynccontextmanager
async def _database_with_table(path: Path) -> AsyncIterator[SqliteDatabase]:
    """A database at `path` holding one empty table `t`, closed at the end."""
    db = SqliteDatabase(f"sqlite:///{path}")
    try:
        async with db.write() as conn:
            await conn.execute("CREATE TABLE t (x)")
        yield db
    finally:
        await db.close()


async def _mode(conn: database.Connection) -> str:
    return str((await conn.execute("PRAGMA journal_mode")).scalar())


async def test_a_load_into_an_empty_database_goes_without_wal_and_ends_in_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    async with _database_with_table(path) as db:
        async with db.read() as conn:  # an idle reader of ours is closed for the load
            await conn.execute("SELECT 1")
        async with db.bulk_write(_EMPTY) as conn:
            assert await _mode(conn) == "delete"
            # A rollback journal is safe from a power cut only with synchronous=FULL (2).
            assert (await conn.execute("PRAGMA synchronous")).scalar() == 2
            await conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
        assert _file_in_wal(path)
        async with db.write() as conn:
            assert await _mode(conn) == "wal"
            assert (await conn.execute("PRAGMA synchronous")).scalar() == 1  # NORMAL again
            assert (await conn.execute("SELECT COUNT(*) FROM t")).scalar() == 1000


async def test_a_load_stays_in_wal_when_the_database_holds_rows_or_is_open_elsewhere(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    async with _database_with_table(path) as db:
        other = sqlite3.connect(path)
        try:
            other.execute("SELECT * FROM t").fetchall()
            async with db.bulk_write(_EMPTY) as conn:
                assert await _mode(conn) == "wal"  # another connection has it open
                await conn.execute("INSERT INTO t VALUES (1)")
        finally:
            other.close()
        async with db.bulk_write(_EMPTY) as conn:
            assert await _mode(conn) == "wal"  # it holds a row: others may be reading it
        assert _file_in_wal(path)


async def test_a_failed_load_without_wal_is_rolled_back_and_back_in_wal(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with _database_with_table(path) as db:
        with pytest.raises(ConstraintViolation):
            async with db.bulk_write(_EMPTY) as conn:
                assert await _mode(conn) == "delete"
                await conn.execute("CREATE UNIQUE INDEX one ON t (x)")
                await conn.executemany("INSERT INTO t VALUES (?)", [(1,), (2,), (1,)])
        assert _file_in_wal(path)
        async with db.read() as conn:
            assert (await conn.execute("SELECT COUNT(*) FROM t")).scalar() == 0


async def test_a_connection_opened_during_a_load_without_wal_waits_for_its_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    other = SqliteDatabase(f"sqlite:///{path}")
    try:
        async with _database_with_table(path) as db:
            async with db.bulk_write(_EMPTY) as conn:
                assert await _mode(conn) == "delete"
                # Nothing written to the file yet: a change of journal mode meeting this fails
                # at once instead of waiting, and a new connection retries it.
                await conn.execute("INSERT INTO t VALUES (1)")

                async def count() -> int:
                    async with other.read() as reading:
                        return int((await reading.execute("SELECT COUNT(*) FROM t")).scalar())

                counting = asyncio.create_task(count())
                await asyncio.sleep(0.3)
                assert not counting.done()
            assert await asyncio.wait_for(counting, 30) == 1
    finally:
        await other.close()


_KILLED_MID_LOAD = """
import asyncio, os, signal, sys
from batchrunner.database import SqliteDatabase

async def main():
    db = SqliteDatabase(sys.argv[1])
    async with db.bulk_write("SELECT 1 FROM t LIMIT 1") as conn:
        # A small cache: pages go to the file (and old ones to the journal) as the load goes.
        await conn.execute("PRAGMA cache_size=20")
        await conn.executemany("INSERT INTO t VALUES (?)", [(i * 100,) for i in range(20000)])
        os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_a_load_without_wal_killed_part_way_leaves_nothing_of_it(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"

    async def before() -> None:
        async with _database_with_table(path) as db, db.write() as conn:
            await conn.execute("CREATE INDEX x ON t (x)")  # pages that exist before the load

    async def after() -> tuple[int, str]:
        db = SqliteDatabase(f"sqlite:///{path}")
        try:
            async with db.read() as conn:
                rows = (await conn.execute("SELECT COUNT(*) FROM t")).scalar()
                return rows, (await conn.execute("PRAGMA integrity_check")).scalar()
        finally:
            await db.close()

    asyncio.run(before())
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_LOAD, f"sqlite:///{path}"],
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr.decode()
    assert Path(f"{path}-journal").exists()  # a hot journal: what to undo
    assert asyncio.run(after()) == (0, "ok")
    assert _file_in_wal(path)


async def test_the_first_batch_of_a_database_is_loaded_without_wal(tmp_path: Path) -> None:
    store = await JobStore.open(f"sqlite:///{tmp_path / 'jobs.db'}")
    async with store:
        modes = []
        for n in range(2):
            info = BatchInfo(
                f"b{n}", "b", "f", f"sha{n}", "http://127.0.0.1:9", "K", {}, 0, 0, 0, None
            )
            async with store.loading(info) as loader:
                modes.append(await _mode(loader._conn))
                await loader.add_jobs([(1, "a", "/v1/chat/completions", "{}", None, "m", 0, 1)])
        assert modes == ["delete", "wal"]
        assert _file_in_wal(tmp_path / "jobs.db")


def _grow_wal_behind_a_reader(path: Path, rows: int) -> sqlite3.Connection:
    """A WAL grown by `rows` writes of 10 kB while another connection held a read; returns
    the writer, the read let go."""
    writer = sqlite3.connect(path)
    database.configure_sqlite_connection(writer)
    writer.execute("CREATE TABLE IF NOT EXISTS t (x BLOB)")
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()
    for _ in range(rows):
        writer.execute("INSERT INTO t VALUES (zeroblob(10000))")
    reader.rollback()
    reader.close()
    return writer


def test_a_wal_grown_behind_a_reader_is_cut_back_once_written_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read left open beside an overnight run (a notebook's half-read query) grows the WAL
    by gigabytes; once let go, the file kept that size on disk until the run ended."""
    limit = 256 * 1024
    monkeypatch.setattr(database, "SQLITE_JOURNAL_SIZE_LIMIT", limit)
    path = tmp_path / "grown.db"
    writer = _grow_wal_behind_a_reader(path, rows=300)
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 3_000_000
    # The next checkpoint writes it all back; the write after it starts the log over.
    writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
    writer.execute("INSERT INTO t VALUES (1)")
    assert wal.stat().st_size <= limit
    writer.close()


async def test_a_heartbeat_says_when_the_wal_has_grown_behind_a_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(coordination, "WAL_WARN_BYTES", 1_000_000)
    store, batch_id = await _store_with_a_batch(tmp_path)
    try:
        await store.register_worker("w-1", batch_id, 0.0)
        beating = coordinator(store, batch_id, "w-1")
        with caplog.at_level("WARNING", logger="batchrunner.coordination"):
            await beating.beat()
            assert caplog.messages == []
            # (Only the file's size counts: another process's writes grow it as much.)
            _grow_wal_behind_a_reader(tmp_path / "jobs.db", rows=150).close()
            await beating.beat()
            await beating.beat()  # the same size: said once
            _grow_wal_behind_a_reader(tmp_path / "jobs.db", rows=150).close()
            await beating.beat()  # not yet twice as large
    finally:
        await store.close()
    (message,) = caplog.messages
    assert message.startswith(f"the database's write-ahead log ({tmp_path / 'jobs.db'}-wal) is ")
    assert "most likely another connection keeps a read open" in message


async def test_a_new_database_is_its_owners_alone(tmp_path: Path) -> None:
    """It holds every prompt and answer, and was readable by every user of the machine (the
    answer journal, which holds the same, was its owner's alone)."""
    old = os.umask(0o022)
    try:
        store, _ = await _store_with_a_batch(tmp_path)
        await store.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "jobs.db").stat().st_mode) == 0o600
    # Made by `db upgrade` (through SQLAlchemy), too.
    upgraded = tmp_path / "upgraded.db"
    made = run_cli("db", "upgrade", db=f"sqlite:///{upgraded}", preexec_fn=lambda: os.umask(0o022))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(upgraded.stat().st_mode) == 0o600


async def test_a_write_cancelled_while_it_waits_for_the_lock_leaves_no_transaction_open(
    tmp_path: Path,
) -> None:
    """Cancelled while its BEGIN IMMEDIATE waited for another process's lock (the run's end
    cancels its coordinator mid-heartbeat), the BEGIN went through in the writer's thread all
    the same and stayed open, the write lock held: every later write failed ("cannot start a
    transaction within a transaction"), the run's jobs were not given back, and other
    processes found the database locked."""
    path = tmp_path / "jobs.db"
    db = SqliteDatabase(f"sqlite:///{path}")
    await db.ensure_schema()

    async def write() -> None:
        async with db.write() as conn:
            await conn.execute("UPDATE batches SET name = name")

    try:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(write())
        await asyncio.sleep(0.3)  # its BEGIN waits for the lock in the writer's thread
        task.cancel()
        await asyncio.sleep(0.1)
        blocker.execute("ROLLBACK")  # ... and gets it now
        with pytest.raises(asyncio.CancelledError):
            await task
        await write()  # the writer's connection is in no transaction
        other = sqlite3.connect(path, isolation_level=None, timeout=0.5)
        try:
            other.execute("BEGIN IMMEDIATE")  # and holds no lock
            other.execute("ROLLBACK")
        finally:
            other.close()
        blocker.close()
    finally:
        await db.close()


def test_none_and_bools_bind_through_registered_adapters() -> None:
    """sqlite3 sends any value but an int, float, str or bytearray through its adapters, and one
    of a type without an adapter costs an AttributeError raised and cleared inside sqlite3: None
    and bool, which every recorded request and every submitted line bind, have one (database.py)
    and bind as sqlite3 binds them without it."""
    assert database.SQLITE_BUSY_TIMEOUT_MS  # (imported: its adapters are registered)
    assert (type(None), sqlite3.PrepareProtocol) in sqlite3.adapters
    assert (bool, sqlite3.PrepareProtocol) in sqlite3.adapters
    conn = sqlite3.connect(":memory:")
    try:
        cur = conn.execute("SELECT typeof(?), typeof(?), ?, ?", (None, True, True, False))
        row = cur.fetchone()
    finally:
        conn.close()
    assert row == ("null", "integer", 1, 0)


def test_an_applications_own_sqlite3_adapter_is_kept() -> None:
    """The registry is the process's: importing batchrunner replaced an adapter the embedding
    application had registered (its booleans stored as 'yes' became 1)."""
    code = (
        "import sqlite3\n"
        "sqlite3.register_adapter(bool, lambda b: 'yes' if b else 'no')\n"
        "import batchrunner.store\n"
        "print(sqlite3.connect(':memory:').execute('SELECT ?', (True,)).fetchone()[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "yes"
