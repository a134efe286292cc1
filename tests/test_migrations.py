"""The migrations and the models describe the same schema, and go both ways."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from batchrunner import db
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
    from sqlalchemy import text

    async with await JobStore.open(sqlite_url) as store, store.engine.connect() as conn:
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        # NORMAL is 1.
        assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 1
        assert (
            await conn.execute(text("PRAGMA busy_timeout"))
        ).scalar() == db.SQLITE_BUSY_TIMEOUT_MS


def test_plain_urls_pick_async_drivers() -> None:
    assert db.async_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert db.async_url("postgresql://u@h/d") == "postgresql+asyncpg://u@h/d"
    assert db.async_url("postgres://u@h/d") == "postgresql+asyncpg://u@h/d"
    assert db.async_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"


def test_schema_head_is_alembic_head() -> None:
    # Start-up compares the database with SCHEMA_HEAD instead of loading alembic.
    assert db.alembic_head() == db.SCHEMA_HEAD
