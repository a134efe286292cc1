"""SQLAlchemy's side of the database: engines for plain URLs and migrations to head. The
store's own connections go without it: SQLite's through sqlite3 (database.py), PostgreSQL's
through asyncpg (postgres.py)."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from batchrunner.config import without_password
from batchrunner.database import (
    SqliteTarget,
    configure_sqlite_connection,
    create_private,
    driver_words,
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
    except (ArgumentError, ValueError):  # (ValueError: a port that is no number)
        shown = without_password(url)
        raise UsageError(f"not a database URL: {shown!r} (try sqlite:///batchrunner.db)") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "postgres"):
        raise UsageError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
    if "+" in parsed.drivername:
        if parsed.drivername.partition("+")[2] == _DRIVERS[backend].partition("+")[2]:
            # (`postgres+asyncpg://`, which the store takes: SQLAlchemy knows no `postgres`.)
            parsed = parsed.set(drivername=_DRIVERS[backend])
        if parsed.drivername not in _DRIVERS.values():
            raise UsageError(
                f"batchrunner reaches {backend} through {_DRIVERS[backend].partition('+')[2]},"
                f" not {parsed.drivername!r}: use {backend}://..."
            )
        return parsed.render_as_string(hide_password=False)
    return parsed.set(drivername=_DRIVERS[backend]).render_as_string(hide_password=False)


def describe(exc: BaseException) -> str:
    """The driver's own words for a database error, without SQLAlchemy's SQL and help link."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return driver_words(exc.orig)
    return str(exc)


def create_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """An async engine for a plain URL, with the SQLite settings the store's own connections
    have (WAL, the busy timeout, foreign keys)."""
    full = async_url(url)
    kwargs: dict[str, Any] = {}
    if full.startswith("sqlite"):
        create_private(SqliteTarget.parse(url))  # (`db upgrade` of a database not there yet)
        # A small pool: JobStore.close() disposes of it, so no file handle outlives the store.
        kwargs["poolclass"] = AsyncAdaptedQueuePool
        kwargs["pool_size"] = SQLITE_POOL_SIZE
        kwargs["max_overflow"] = SQLITE_POOL_OVERFLOW
    else:
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = pool_size
        kwargs["pool_pre_ping"] = True
        full, kwargs["connect_args"] = _asyncpg_options(full)
    engine = create_async_engine(full, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _asyncpg_options(full: str) -> tuple[str, dict[str, Any]]:
    """The URL without its parameters, and the connect arguments that stand for them: the
    DSN asyncpg reads libpq's parameters from (`sslmode`, `connect_timeout`, `host=/path`),
    as the store's own connections do (postgres.PgUrl). SQLAlchemy handed each parameter to
    asyncpg.connect as an argument of that name, which it has not: `?sslmode=require` made
    every new database fail to be created."""
    from batchrunner.postgres import PgUrl

    pg = PgUrl.parse(full)
    parsed = make_url(full)
    if not parsed.query:
        return full, {}
    args: dict[str, Any] = {"dsn": pg.dsn, **pg.connect_kwargs()}
    if pg.statement_cache_size == 0:
        # SQLAlchemy prepares each statement under a name of its own as well: behind
        # pgbouncer, names that no other client's statement can have (its documentation's
        # recipe), and none kept.
        args["prepared_statement_cache_size"] = 0
        args["prepared_statement_name_func"] = _unique_statement_name
    url = parsed.set(query={})
    return url.render_as_string(hide_password=False), args


def _unique_statement_name() -> str:
    from uuid import uuid4

    return f"__asyncpg_{uuid4()}__"


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


def check_revision(revision: str) -> None:
    """A revision the migration scripts do not know is the caller's mistake, not the
    database's (relative ones, `-1`, `head-1`, `base+2`, are left to the migration: they
    depend on it; the scripts' own revisions are numbers)."""
    if "+" in revision or "-" in revision:
        return
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    scripts = ScriptDirectory.from_config(alembic_config())
    try:
        scripts.get_revisions(revision)
    except CommandError:
        known = ", ".join(reversed([s.revision for s in scripts.walk_revisions()]))
        raise UsageError(f"no revision {revision!r}: base, head or one of {known}") from None


async def current_revision(engine: AsyncEngine) -> str | None:
    def _rev(conn: Connection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_rev)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe to call from several processes at once."""
    await _alembic(engine, "upgrade", revision)


async def upgrade_url(url: str) -> None:
    """Bring the database at a plain URL to head, with an engine of its own for the while."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


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
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Ctrl-C or SIGTERM cancelled the migration (its transaction is not committed);
            # the rollback of a connection the cancel broke fails in turn, and that is no
            # fault of the database (it was reported as one, exit 1).
            raise asyncio.CancelledError() from exc
        raise StoreError(f"could not migrate the database: {_with_hint(describe(exc))}") from exc


#: Where a migration meets tables it did not make: what the user can do about it.
_OWN_PLACE: Final = (
    "give batchrunner a database of its own (on PostgreSQL, or a schema of its own:"
    " postgresql://USER@HOST/DB?options=-csearch_path%3Dbatchrunner, the schema made first)"
)


def _with_hint(words: str) -> str:
    if "Can't locate revision" in words:
        return (
            f"{words}: the database's schema is another application's (its alembic_version"
            f" table), or a newer batchrunner's (upgrade batchrunner then); else {_OWN_PLACE}"
        )
    if "already exists" in words:
        return f"{words}: the database holds another application's tables; {_OWN_PLACE}"
    return words
