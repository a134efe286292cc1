"""SQLAlchemy's side of the database: engines for plain URLs, migrations to head, and
PostgreSQL's connections for the store (SQLite's are in database.py, without SQLAlchemy)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from sqlalchemy import TextClause, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from batchrunner.database import (
    SCHEMA_HEAD,
    Params,
    Result,
    configure_sqlite_connection,
    failed,
)
from batchrunner.errors import StoreError, UsageError

if TYPE_CHECKING:
    # alembic costs ~0.1 s to import and is needed only to migrate: imported where used.
    from alembic.config import Config

#: Execution option: read in a deferred transaction instead of taking the write lock.
READ_ONLY = "batchrunner_read_only"
#: SQLite connections kept open by an engine (migrations, tests).
SQLITE_POOL_SIZE = 2
#: Further SQLite connections opened when the pool is busy, closed again when returned.
SQLITE_POOL_OVERFLOW = 8

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def async_url(url: str) -> str:
    """`sqlite:///x.db` -> `sqlite+aiosqlite:///x.db`; `postgresql://` -> `postgresql+asyncpg://`."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise UsageError(f"not a database URL: {url!r} (try sqlite:///batchrunner.db)") from exc
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "postgres"):
        raise UsageError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
    if "+" in parsed.drivername:
        return parsed.render_as_string(hide_password=False)
    return parsed.set(drivername=_DRIVERS[backend]).render_as_string(hide_password=False)


def describe(exc: BaseException) -> str:
    """The driver's own words for a database error, without SQLAlchemy's SQL and help link."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return str(exc.orig)
    return str(exc)


def create_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """An async engine for a plain URL, with the SQLite settings from DESIGN.md."""
    full = async_url(url)
    kwargs: dict[str, Any] = {}
    if full.startswith("sqlite"):
        # A small pool: JobStore.close() disposes of it, so no file handle outlives the store.
        kwargs["poolclass"] = AsyncAdaptedQueuePool
        kwargs["pool_size"] = SQLITE_POOL_SIZE
        kwargs["max_overflow"] = SQLITE_POOL_OVERFLOW
    else:
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = pool_size
        kwargs["pool_pre_ping"] = True
    engine = create_async_engine(full, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        configure_sqlite_connection(dbapi_conn)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(url: str | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("batchrunner.migrations")))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def alembic_head() -> str | None:
    """The head revision of the migration scripts (what SCHEMA_HEAD must equal)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    def _rev(conn: Connection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_rev)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe to call from several processes at once."""
    await _alembic(engine, "upgrade", revision)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    await _alembic(engine, "downgrade", revision)


async def _alembic(engine: AsyncEngine, verb: str, revision: str) -> None:
    from alembic import command

    cfg = alembic_config()

    def _run(conn: Connection) -> None:
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, revision)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    except Exception as exc:
        raise StoreError(f"could not migrate the database: {describe(exc)}") from exc


async def _schema_revision(engine: AsyncEngine) -> str | None:
    """The database's revision read with plain SQL (alembic is not imported for this);
    None for a database without the `alembic_version` table or with no row in it."""
    async with engine.connect() as conn:
        await conn.execution_options(**{READ_ONLY: True})
        exists = await conn.run_sync(lambda sync: sync.dialect.has_table(sync, "alembic_version"))
        if not exists:
            return None
        rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    # More than one row would be branches: not this project's, alembic sorts it out.
    return str(rows[0][0]) if len(rows) == 1 else None


async def ensure_schema(engine: AsyncEngine) -> None:
    """Create or upgrade the database to head on first use."""
    try:
        current = await _schema_revision(engine)
    except Exception as exc:
        raise StoreError(f"cannot open the database: {describe(exc)}") from exc
    if current != SCHEMA_HEAD:
        await upgrade(engine)


# -- PostgreSQL -----------------------------------------------------------------------------


#: Statements as SQLAlchemy clauses, made once each.
_clause = lru_cache(maxsize=1024)(text)


def _failed(exc: DBAPIError, what: str) -> StoreError:
    return failed(what, describe(exc), constraint=isinstance(exc, IntegrityError))


class _PgConnection:
    """A transaction's statements through SQLAlchemy, as `database.Connection` has them."""

    __slots__ = ("_conn", "_what")

    def __init__(self, conn: AsyncConnection, what: str) -> None:
        self._conn = conn
        self._what = what

    async def execute(self, sql: str, params: Params = ()) -> Result:
        clause: TextClause = _clause(sql)
        try:
            result = await self._conn.execute(clause, dict(params) if params else None)
        except DBAPIError as exc:
            raise _failed(exc, self._what) from exc
        rows = list(result.all()) if result.returns_rows else []
        return Result(rows, result.rowcount)

    async def executemany(self, sql: str, params: Sequence[Params]) -> int:
        try:
            result = await self._conn.execute(_clause(sql), [dict(p) for p in params])
        except DBAPIError as exc:
            raise _failed(exc, self._what) from exc
        return max(result.rowcount, 0)

    async def driver(self) -> Any:
        """asyncpg's own connection under this one (COPY)."""
        raw = await self._conn.get_raw_connection()
        return raw.driver_connection


class PgDatabase:
    """A PostgreSQL database through an SQLAlchemy engine on asyncpg."""

    is_sqlite = False

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.engine = create_engine(url, pool_size=pool_size)
        self.url = self.engine.url.render_as_string(hide_password=False)
        #: The dispatcher's records: a connection of their own, in autocommit.
        self._recorder: AsyncConnection | None = None
        #: One statement at a time on it.
        self._recorder_lock = asyncio.Lock()

    def read(self) -> AbstractAsyncContextManager[_PgConnection]:
        return self._transaction(self.engine.connect(), "read")

    def write(self) -> AbstractAsyncContextManager[_PgConnection]:
        return self._transaction(self.engine.begin(), "write")

    def bulk_write(self, only_if_empty: str) -> AbstractAsyncContextManager[_PgConnection]:
        """`write`: PostgreSQL's log is the same for any load."""
        return self.write()

    @asynccontextmanager
    async def _transaction(
        self, opening: AbstractAsyncContextManager[AsyncConnection], what: str
    ) -> AsyncIterator[_PgConnection]:
        try:
            async with opening as conn:
                yield _PgConnection(conn, what)
        except DBAPIError as exc:
            raise _failed(exc, what) from exc

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """The rows of one statement in asyncpg's own placeholders ($1, ...), straight from
        the driver: SQLAlchemy's result rows would cost a third of an export's read."""
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                return list(await raw.driver_connection.fetch(sql, *args))  # type: ignore[union-attr]
            except Exception as exc:
                if hasattr(exc, "sqlstate"):
                    raise failed("read", exc) from exc
                raise

    async def record(self, sql: str, params: Sequence[Any]) -> int:
        """Run one statement that returns a count, in a transaction of its own.

        The statement is a transaction of its own in autocommit, without a BEGIN and a COMMIT
        to wait for; kept checked out, the connection is not pinged before each record as the
        pool's are. A connection that failed is dropped and the next record opens another.
        """
        async with self._recorder_lock:
            if self._recorder is None:
                conn = await self.engine.connect()
                try:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                except BaseException:
                    await conn.close()
                    raise
                self._recorder = conn
            try:
                return int((await self._recorder.exec_driver_sql(sql, tuple(params))).scalar_one())
            except BaseException as exc:
                conn, self._recorder = self._recorder, None
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                if isinstance(exc, DBAPIError):
                    raise _failed(exc, "write") from exc
                raise

    async def ensure_schema(self) -> None:
        await ensure_schema(self.engine)

    async def close(self) -> None:
        async with self._recorder_lock:
            if self._recorder is not None:
                conn, self._recorder = self._recorder, None
                with contextlib.suppress(Exception):
                    await conn.close()
        await self.engine.dispose()
