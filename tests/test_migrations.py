"""The migrations and the models describe the same schema, and go both ways."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from batchrunner import database, db, sqlite_schema
from batchrunner.errors import StoreError
from batchrunner.models import Base
from batchrunner.store import JobStore


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def test_upgrade_from_empty_matches_models(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            assert {"batches", "jobs", "results", "attempts", "workers", "invalid_lines"} <= (
                await conn.run_sync(_tables)
            )
    finally:
        await engine.dispose()


async def test_downgrade_to_base_drops_everything(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        await db.upgrade(engine)
        await db.downgrade(engine, "base")
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) <= {"alembic_version"}
        assert await db.current_revision(engine) is None
        await db.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_store_creates_schema_on_first_use(db_url: str) -> None:
    async with await JobStore.open(db_url) as store:
        assert await store.list_batches() == []
        assert await db.current_revision(store.engine) is not None


async def test_sqlite_settings(sqlite_url: str) -> None:
    async with await JobStore.open(sqlite_url) as store:
        for transaction in (store.reading, store._write):
            async with transaction() as conn:
                assert (await conn.execute("PRAGMA journal_mode")).scalar() == "wal"
                # NORMAL is 1.
                assert (await conn.execute("PRAGMA synchronous")).scalar() == 1
                assert (await conn.execute("PRAGMA busy_timeout")).scalar() == (
                    database.SQLITE_BUSY_TIMEOUT_MS
                )
                assert (await conn.execute("PRAGMA foreign_keys")).scalar() == 1


def test_plain_urls_pick_async_drivers() -> None:
    assert db.async_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert db.async_url("postgresql://u@h/d") == "postgresql+asyncpg://u@h/d"
    assert db.async_url("postgres://u@h/d") == "postgresql+asyncpg://u@h/d"
    assert db.async_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    # The store takes it: its migrations refused it ("not 'postgres+asyncpg': use postgres://").
    assert db.async_url("postgres+asyncpg://u@h/d") == "postgresql+asyncpg://u@h/d"


def _sqlite_schema(path: Path) -> tuple[list[tuple[str, ...]], list[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        master = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()
        revision = [r for (r,) in conn.execute("SELECT version_num FROM alembic_version")]
    return master, revision


async def test_a_new_sqlite_database_is_made_as_the_migrations_make_it(tmp_path: Path) -> None:
    """`sqlite_schema` is what the migrations leave, statement for statement; when a new
    migration changes that, the failure shows the statements it should hold."""
    migrated = tmp_path / "migrated.db"
    engine = db.create_engine(f"sqlite:///{migrated}")
    try:
        await db.upgrade(engine)
    finally:
        await engine.dispose()
    made = tmp_path / "made.db"
    async with await JobStore.open(f"sqlite:///{made}"):
        pass
    with contextlib.closing(sqlite3.connect(migrated)) as conn:
        statements = [
            sql
            for (sql,) in conn.execute(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"
            )
        ]
    assert list(sqlite_schema.STATEMENTS) == statements, (
        "batchrunner/sqlite_schema.py should hold:\n" + "\n".join(map(repr, statements))
    )
    assert _sqlite_schema(made) == _sqlite_schema(migrated)
    assert _sqlite_schema(made)[1] == [database.SCHEMA_HEAD]
    # alembic takes it as its own: down to nothing and up again.
    engine = db.create_engine(f"sqlite:///{made}")
    try:
        await db.downgrade(engine, "base")
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) <= {"alembic_version"}
        await db.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


def test_schema_head_is_alembic_head() -> None:
    # Start-up compares the database with SCHEMA_HEAD instead of loading alembic.
    assert db.alembic_head() == database.SCHEMA_HEAD


async def test_dropping_the_hot_foreign_keys_keeps_every_row(db_url: str) -> None:
    """0003 rebuilds jobs, results and attempts on SQLite: with foreign keys on, dropping a
    parent table while a child still points at it would delete the children."""
    from sqlalchemy import text

    tables = ("batches", "jobs", "results", "attempts", "invalid_lines")
    rows = [
        "INSERT INTO batches (id, name, source_file, content_sha256, base_url, api_key_env,"
        " options, total_jobs, invalid_lines, created_at) VALUES ('b', 'n', 'f', 'sha',"
        " 'http://127.0.0.1:9/v1', 'K', '{}', 2, 1, 1.0)",
        *(
            "INSERT INTO jobs (id, batch_id, line, custom_id, method, endpoint, body, model,"
            " stream, est_tokens, state, attempts, created_at, updated_at) VALUES"
            f" ({i}, 'b', {i}, 'c{i}', 'POST', '/v1/chat/completions', '{{}}', 'm', false, 1,"
            " 'succeeded', 1, 1.0, 1.0)"
            for i in (1, 2)
        ),
        "INSERT INTO results (job_id, batch_id, status_code, response, latency_ms, attempts,"
        " finished_at) VALUES (1, 'b', 200, '{}', 1.0, 1, 1.0)",
        "INSERT INTO attempts (job_id, batch_id, worker_id, status_code, latency_ms, started_at)"
        " VALUES (1, 'b', 'w', 200, 1.0, 1.0), (2, 'b', 'w', 500, 1.0, 1.0)",
        "INSERT INTO invalid_lines (batch_id, line, reason) VALUES ('b', 3, 'bad')",
    ]

    async def counts(engine: Any) -> list[int]:
        async with engine.connect() as conn:
            return [
                (await conn.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one() for t in tables
            ]

    engine = db.create_engine(db_url)
    try:
        await db.upgrade(engine, "0002")
        async with engine.begin() as conn:
            for sql in rows:
                await conn.execute(text(sql))
        assert await counts(engine) == [1, 2, 1, 2, 1]
        await db.upgrade(engine)
        assert await counts(engine) == [1, 2, 1, 2, 1]
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        await db.downgrade(engine, "0002")
        assert await counts(engine) == [1, 2, 1, 2, 1]
    finally:
        await engine.dispose()


async def test_attempts_logged_twice_before_0005_are_kept_once(db_url: str) -> None:
    """0005 makes attempts unique by job and start time: an attempt logged twice before it
    (a dead run's late record) keeps its first row; other attempts are left as they were."""
    from sqlalchemy import text

    logged = [
        (1, 500, 1.0),
        (1, 500, 1.0),  # the same attempt again
        (1, 200, 2.5),
        (2, 200, 1.0),  # another job's attempt at the same moment
        (1, 200, 2.5),  # and the first job's second attempt again
    ]
    engine = db.create_engine(db_url)
    try:
        await db.upgrade(engine, "0004")
        async with engine.begin() as conn:
            for job_id, status, started_at in logged:
                await conn.execute(
                    text(
                        "INSERT INTO attempts (job_id, batch_id, worker_id, status_code,"
                        " latency_ms, started_at) VALUES (:j, 'b', 'w', :s, 1.0, :t)"
                    ),
                    {"j": job_id, "s": status, "t": started_at},
                )
        await db.upgrade(engine)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT id, job_id, status_code, started_at FROM attempts ORDER BY id")
                )
            ).all()
            assert await conn.run_sync(_diff) == []
        assert [tuple(r) for r in rows] == [(1, 1, 500, 1.0), (3, 1, 200, 2.5), (4, 2, 200, 1.0)]
        await db.downgrade(engine, "0004")
        await db.upgrade(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("foreign", "words"),
    [
        # Another application's alembic schema, or a newer batchrunner's.
        (
            [
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
                "INSERT INTO alembic_version VALUES ('3f2a9c0d1e4b')",
            ],
            "another application's (its alembic_version table), or a newer batchrunner's",
        ),
        (["CREATE TABLE jobs (id INTEGER PRIMARY KEY, what TEXT)"], "another application's tables"),
    ],
)
async def test_a_database_holding_another_applications_tables_says_what_to_do(
    db_url: str, foreign: list[str], words: str
) -> None:
    """It said only "Can't locate revision identified by '3f2a9c0d1e4b'" or "relation "jobs"
    already exists"; the tables stay as they were."""
    engine = db.create_engine(db_url)
    try:
        async with engine.begin() as conn:
            for statement in foreign:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()
    with pytest.raises(StoreError) as caught:
        await JobStore.open(db_url)
    assert words in str(caught.value) and "a database of its own" in str(caught.value)
