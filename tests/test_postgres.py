"""The store's PostgreSQL connections (postgres.py): URLs read as SQLAlchemy reads them, named
parameters made positional, connections that die while kept, errors, and no SQLAlchemy for a
database at head."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]  # no type stubs
import pytest
from sqlalchemy.engine import make_url

from batchrunner.errors import ConstraintViolation, StoreError, UsageError
from batchrunner.postgres import PgDatabase, PgUrl, positional
from batchrunner.store import BatchInfo, JobStore
from tests.conftest import batch_without_importing

MakeFile = Callable[..., Path]


@pytest.mark.parametrize(
    ("sql", "query", "names"),
    [
        ("SELECT 1", "SELECT 1", ()),
        (
            "SELECT * FROM t WHERE a = :a AND b = :b",
            "SELECT * FROM t WHERE a = $1 AND b = $2",
            ("a", "b"),
        ),
        # A name used twice is one parameter.
        (
            "UPDATE t SET x = :now WHERE y < :now AND z = :batch",
            "UPDATE t SET x = $1 WHERE y < $1 AND z = $2",
            ("now", "batch"),
        ),
        # Casts are not parameters.
        (
            "SELECT k FROM json_object_keys(:m::json) AS k",
            "SELECT k FROM json_object_keys($1::json) AS k",
            ("m",),
        ),
        ("SELECT a::text FROM t WHERE b = :b_2", "SELECT a::text FROM t WHERE b = $1", ("b_2",)),
        ("SELECT $1::bigint", "SELECT $1::bigint", ()),
    ],
)
def test_named_parameters_become_positional(sql: str, query: str, names: tuple[str, ...]) -> None:
    assert positional(sql) == (query, names)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/test",
        "postgresql://u:secret@db.example.com/jobs",
        "postgres://u@h/d",
        "postgresql+asyncpg://u:p@h:6543/d",
        "postgresql://us%40er:p%3Ass@h/d%20b",
        "postgresql://u@[::1]:5432/d",
        "postgresql://u@h/d?sslmode=require&application_name=batch%20runner",
        "postgresql://h/d",
        "postgresql:///d",
        "postgresql://u@h",
    ],
)
def test_a_database_is_located_as_sqlalchemy_renders_it(url: str) -> None:
    """The answer journals of a PostgreSQL database are kept under a key of its location
    (journal.py), which earlier versions took from SQLAlchemy: the same URL must give the
    same key."""
    expected = make_url(url).set(drivername="postgresql", password=None).render_as_string()
    assert PgUrl.parse(url).location() == expected


def test_the_url_is_what_asyncpg_connects_with() -> None:
    target = PgUrl.parse("postgresql+asyncpg://u:p%40ss@h:6543/d?sslmode=disable")
    assert target.dsn == "postgresql://u:p%40ss@h:6543/d?sslmode=disable"
    assert (target.user, target.password, target.host, target.port, target.database) == (
        "u",
        "p@ss",
        "h",
        6543,
        "d",
    )


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("postgresql+psycopg2://u:hunter2@h/d", "through asyncpg"),
        ("mysql://u:hunter2@h/d", "unsupported database 'mysql'"),
        ("jobs.db", "not a database URL"),
        ("postgresql://u:hunter2@h:port/d", "not a port number"),
    ],
)
def test_urls_it_cannot_open_are_refused_without_their_password(url: str, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        PgUrl.parse(url)
    assert words in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.postgres
async def test_connections_ended_while_kept_are_opened_anew(pg_url: str) -> None:
    """A kept connection whose backend ended (a server restart, pg_terminate_backend) is not
    handed to the next transaction."""
    async with await JobStore.open(pg_url) as store:
        await store.list_batches()
        async with store.reading() as conn:
            pid = (await conn.execute("SELECT pg_backend_pid()")).scalar()
        await _terminate(pg_url, pid)
        for _ in range(100):  # the event loop sees the socket close
            await asyncio.sleep(0.01)
            async with store.reading() as conn:
                now = (await conn.execute("SELECT pg_backend_pid()")).scalar()
            if now != pid:
                break
        assert now != pid
        assert await store.list_batches() == []


@pytest.mark.postgres
async def test_errors_are_the_stores_own(pg_url: str) -> None:
    database = PgDatabase(pg_url)
    try:
        async with database.write() as conn:
            await conn.execute("CREATE TABLE t (k int PRIMARY KEY, v text)")
            inserted = await conn.executemany(
                "INSERT INTO t (k, v) VALUES (:k, :v)", [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}]
            )
            changed = await conn.execute("UPDATE t SET v = :v", {"v": "c"})
        assert (inserted, changed.rowcount) == (2, 2)
        with pytest.raises(ConstraintViolation, match="duplicate key"):
            async with database.write() as conn:
                await conn.execute("INSERT INTO t (k, v) VALUES (:k, :v)", {"k": 3, "v": "d"})
                await conn.execute("INSERT INTO t (k, v) VALUES (:k, :v)", {"k": 1, "v": "e"})
        with pytest.raises(StoreError, match=r"database read failed: .*no_such_table"):
            async with database.read() as conn:
                await conn.execute("SELECT * FROM no_such_table")
        async with database.read() as conn:
            rows = (await conn.execute("SELECT k, v FROM t ORDER BY k")).all()
        assert rows == [(1, "c"), (2, "c")]  # the failed write left nothing
    finally:
        await database.close()


@pytest.mark.postgres
async def test_a_load_whose_connection_is_cut_fails_with_the_stores_error(pg_url: str) -> None:
    """A connection cut under a load's COPY (the server restarted) is the store's error, which
    the command line reports in one line, and the load leaves nothing behind."""
    job = (1, "a", "/v1/chat/completions", "{}", None, "m", False, 1)
    async with await JobStore.open(pg_url) as store:
        batch = BatchInfo("b", "b", "f", "sha", "http://127.0.0.1:9", "K", {}, 0, 0, 0, None)
        with pytest.raises(StoreError, match="database write failed"):
            async with store.loading(batch) as loader:
                await loader.add_jobs([job])
                pid = (await loader._conn.execute("SELECT pg_backend_pid()")).scalar()
                await _terminate(pg_url, pid)
                await loader.add_jobs([(2, "b", *job[2:])])
        assert await store.list_batches() == []


async def _terminate(pg_url: str, pid: int) -> None:
    admin = await asyncpg.connect(PgUrl.parse(pg_url).dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_an_unreachable_server_is_a_store_error() -> None:
    # A port on loopback that nothing listens on: the connection is refused at once.
    with pytest.raises(StoreError, match="cannot open the database"):
        await JobStore.open("postgresql://postgres@127.0.0.1:9/none")


@pytest.mark.postgres
async def test_a_database_at_head_is_loaded_run_reported_and_exported_without_sqlalchemy(
    pg_url: str, tmp_path: Path, make_file: MakeFile
) -> None:
    """SQLAlchemy and alembic make or upgrade the schema; a database at head is loaded, run,
    reported on and exported with asyncpg alone (SQLAlchemy was ~0.17 s of every command's
    start-up and a layer around every statement of a run)."""
    async with await JobStore.open(pg_url):
        pass  # the schema, made by alembic
    await batch_without_importing(
        pg_url, ("sqlalchemy", "aiosqlite", "alembic"), make_file, tmp_path
    )
