"""The store's way to its database: SQL text in, rows out.

SQLite goes through the standard library's `sqlite3`, each connection on a thread of its own;
PostgreSQL through asyncpg (`postgres.PgDatabase`). Neither imports SQLAlchemy: it is a
quarter of a second of start-up, which a run, a status or an export of a database at the
current schema does not pay, nor does a new SQLite database (made from `sqlite_schema`). It is
imported to create a PostgreSQL schema or upgrade one made before (alembic).

Statements name their parameters (`:name`, bound from a dict) on both backends; SQLite's own
hot statements may use `?N` with tuples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode

from batchrunner.config import without_password
from batchrunner.errors import ConstraintViolation, StoreError, UsageError

T = TypeVar("T")
#: A statement's parameters: by name, or (SQLite's `?N`) by position.
Params = Mapping[str, Any] | tuple[Any, ...]

#: The newest migration (migrations/versions); a test checks it is alembic's head. Opening a
#: database compares its revision with this instead of loading alembic's script directory.
SCHEMA_HEAD = "0008"
#: How long SQLite waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: SQLite's page cache per connection. The default 2 MB makes bulk inserts spill index pages
#: and run at half speed; 64 MB keeps a million-row load's indexes in memory.
SQLITE_CACHE_KIB = 65_536
#: The size a WAL file is cut back to when a checkpoint starts it over. A run's WAL stays near
#: 4 MB (the automatic checkpoint every 1,000 pages), but one that another connection's open
#: read let grow (to gigabytes overnight) would otherwise keep its size on disk for good.
SQLITE_JOURNAL_SIZE_LIMIT = 64 * 2**20
#: Read connections kept open for the next read: opening one costs ~1.5 ms (a thread, the
#: file and the PRAGMAs). More are opened while these are busy, and closed when returned.
SQLITE_IDLE_READERS = 2
#: How often a change into WAL mode that met a writer is tried again.
_MODE_RETRY_S = 0.05


def _null(_: None) -> None:
    return None


def _adapt(type_: type[T], adapter: Callable[[T], Any]) -> None:
    """`adapter` for `type_` in sqlite3's registry (the process's), unless one is there."""
    if (type_, sqlite3.PrepareProtocol) not in sqlite3.adapters:
        sqlite3.register_adapter(type_, adapter)


# sqlite3 binds an int, float, str or bytearray as it is and sends any other value (None, a
# bool) through its adapters first. For a type without one it looks up `__adapt__` on its own
# protocol class, and the AttributeError that lookup raises and clears costs more than the
# binding: about 0.5 us a value here, against a dict lookup and a call for a registered
# adapter. A recorded request binds four such values (a success's empty error columns), a
# submitted line two (its metadata, its stream flag). These bind what sqlite3 binds without
# them (NULL, an integer); an application that embeds batchrunner and registered its own
# adapter for either type keeps it.
_adapt(type(None), _null)
_adapt(bool, int)


class Result:
    """The rows of a statement (tuples) and the rows it changed."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Any:
        return iter(self.rows)

    def all(self) -> list[Any]:
        return self.rows

    def first(self) -> Any | None:
        return self.rows[0] if self.rows else None

    def one(self) -> Any:
        if len(self.rows) != 1:
            raise StoreError(f"expected one row from the database, got {len(self.rows)}")
        return self.rows[0]

    def scalar(self) -> Any:
        """The first column of the first row; None without rows."""
        return self.rows[0][0] if self.rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self.rows]


class Connection(Protocol):
    """A connection inside one of the database's transactions."""

    async def execute(self, sql: str, params: Params = ()) -> Result: ...

    async def executemany(self, sql: str, params: Sequence[Params]) -> int:
        """Run `sql` once for each set of parameters; returns the rows changed."""
        ...


class Database(Protocol):
    is_sqlite: bool
    #: The URL as given: what another process opens the same database with.
    url: str

    def read(self) -> AbstractAsyncContextManager[Connection]:
        """A read transaction."""
        ...

    def write(self) -> AbstractAsyncContextManager[Connection]:
        """A write transaction, committed when the block ends without an error."""
        ...

    def bulk_write(self, only_if_empty: str) -> AbstractAsyncContextManager[Connection]:
        """`write`, for a load of many rows; SQLite writes it without WAL when the query
        `only_if_empty` finds nothing (`SqliteDatabase.bulk_write`)."""
        ...

    async def ensure_schema(self, *, create: bool = True) -> None: ...

    async def close(self) -> None: ...


# -- SQLite ---------------------------------------------------------------------------------


def no_tables(where: str) -> UsageError:
    """What a command about what was submitted says of a database without batchrunner's
    tables: it would have made them there (a typo in a PostgreSQL database's name littered
    someone else's) and reported no batch."""
    return UsageError(
        f"no batchrunner tables in the database at {where}: nothing was submitted there"
        " (give the database submit used: --db URL or BATCHRUNNER_DB)"
    )


def is_sqlite_url(url: str) -> bool:
    scheme = url.partition(":")[0]
    return scheme == "sqlite" or scheme.startswith("sqlite+")


@dataclass(frozen=True, slots=True)
class SqliteTarget:
    """What `sqlite3.connect` is given for a `sqlite:///` URL, read as SQLAlchemy reads it:
    the path after the third slash (percent-escapes decoded; a fourth slash makes it
    absolute), `:memory:` when there is none, and with `uri=true` the path as a SQLite URI
    with the URL's other query parameters."""

    #: The URL's database part: a path, `:memory:`, or (`uri`) a `file:` URI's path.
    database: str
    #: What sqlite3 opens: `database` made absolute, or with `uri` the URI with its parameters.
    filename: str
    uri: bool

    @classmethod
    def parse(cls, url: str) -> SqliteTarget:
        _, sep, rest = url.partition("://")
        if not sep:
            shown = without_password(url)
            raise UsageError(f"not a database URL: {shown!r} (try sqlite:///batchrunner.db)")
        location, _, query = rest.partition("?")
        host, slash, path = location.partition("/")
        if host:
            raise UsageError(
                f"a SQLite URL names no host: {without_password(url)!r}"
                " (try sqlite:///batchrunner.db)"
            )
        database = unquote(path) if slash and path else ":memory:"
        options = dict(parse_qsl(query, keep_blank_values=True))
        uri = options.pop("uri", "false").lower() in ("true", "1", "yes")
        if not uri:
            if options:
                raise UsageError(
                    f"unsupported SQLite URL option(s) {', '.join(sorted(options))} in {url!r}:"
                    " batchrunner sets its own connection options (it waits"
                    f" {SQLITE_BUSY_TIMEOUT_MS // 1000} s for a locked database), and SQLite URI"
                    " parameters such as mode=ro need uri=true"
                )
            # Absolute, as SQLAlchemy opens it: the same file whatever the working directory
            # is by the time a connection opens.
            filename = database if database == ":memory:" else os.path.abspath(database)
            return cls(database, filename, uri=False)
        filename = f"{database}?{urlencode(options)}" if options else database
        return cls(database, filename, uri=True)

    @property
    def in_memory(self) -> bool:
        if self.uri:
            return self.database.startswith(("file::memory:", ":memory:")) or (
                "mode=memory" in self.filename
            )
        return self.database == ":memory:"

    def uri_for_existing(self) -> str:
        """A URI (for `sqlite3.connect(uri, uri=True)`) that opens this database and never
        creates an empty one in its place: `mode=rw`, unless the URL gives a mode."""
        if not self.uri:
            return f"file:{quote(self.filename)}?mode=rw"
        if "mode=" in self.filename.partition("?")[2]:
            return self.filename
        return f"{self.filename}{'&' if '?' in self.filename else '?'}mode=rw"


def configure_sqlite_connection(conn: Any) -> None:
    """The settings every SQLite connection of ours gets (sqlite3's, or SQLAlchemy's when it
    migrates)."""
    # Take transactions into our own hands: pysqlite's implicit BEGIN is deferred, and a
    # deferred transaction that reads then writes fails at once with "database is locked"
    # when another process writes.
    conn.isolation_level = None
    cur = conn.cursor()
    # First, so that the journal mode's change below waits for a writer too.
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _into_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cur.execute(f"PRAGMA journal_size_limit={SQLITE_JOURNAL_SIZE_LIMIT}")
    cur.close()


def _into_wal(cur: Any) -> None:
    """The database into WAL mode (a no-op when it is), waiting as long as for a writer.

    SQLite's busy handler waits for a writer that holds the database's exclusive lock, but a
    mode change that meets a writer still before its first write to the file (a rollback
    journal's load, see `SqliteDatabase.bulk_write`) fails at once: it is retried here.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(_MODE_RETRY_S)


def _out_of_wal(conn: sqlite3.Connection, only_if_empty: str) -> bool:
    """`bulk_write`'s rollback journal, when `only_if_empty` finds nothing and no other
    connection has the database open; False: WAL it stays."""
    if conn.execute(only_if_empty).fetchone() is not None:
        return False
    # Another connection makes the change fail at once; the busy handler is off all the same,
    # in case it ever waits instead.
    conn.execute("PRAGMA busy_timeout=0")
    try:
        mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    except sqlite3.OperationalError:
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    if mode != "delete":
        return False
    # A rollback journal is safe from a power cut only with FULL; NORMAL is enough for WAL.
    conn.execute("PRAGMA synchronous=FULL")
    return True


def _back_into_wal(conn: sqlite3.Connection) -> None:
    try:
        _into_wal(conn)
    except sqlite3.OperationalError:
        # Still held by a connection of some other program after the busy timeout: the load
        # is committed all the same, and the next connection of ours tries again. This one
        # keeps FULL, which its rollback journal needs.
        return
    conn.execute("PRAGMA synchronous=NORMAL")


def _create_at_head(conn: sqlite3.Connection) -> bool:
    """The head schema in a database with no table, in one transaction, stamped as alembic
    stamps it; False when a table was there by the time the transaction began."""
    from batchrunner.sqlite_schema import STATEMENTS

    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchone():
            conn.execute("ROLLBACK")
            return False
        for statement in STATEMENTS:
            conn.execute(statement)
        conn.execute("INSERT INTO alembic_version (version_num) VALUES (?)", (SCHEMA_HEAD,))
        conn.execute("COMMIT")
    except BaseException:
        _end(conn, "ROLLBACK")
        raise
    return True


def _execute(sql: str, params: Params, conn: sqlite3.Connection) -> Result:
    cur = conn.execute(sql, params)
    try:
        return Result(cur.fetchall(), cur.rowcount)
    finally:
        cur.close()


def _executemany(sql: str, params: Sequence[Params], conn: sqlite3.Connection) -> int:
    cur = conn.executemany(sql, params)
    try:
        return max(cur.rowcount, 0)
    finally:
        cur.close()


def _end(conn: sqlite3.Connection, sql: str) -> None:
    if conn.in_transaction:
        conn.execute(sql)


#: The PostgreSQL URL parameter that sets asyncpg's prepared-statement cache (postgres.PgUrl).
STATEMENT_CACHE_SIZE = "statement_cache_size"
#: SQLSTATEs of a prepared statement that exists already (42P05) or no longer (26000): what a
#: pooler in transaction or statement mode does to the statements a connection keeps.
_POOLER_SQLSTATES = frozenset({"42P05", "26000"})


def driver_words(exc: BaseException) -> str:
    """The driver's message for a database error; for a statement cache that a pooler broke,
    its first line and what to do (the driver's own hint names its API, not our URL)."""
    words = str(exc)
    if not words:
        # (A connect that timed out says nothing: "cannot open the database: " was all.)
        words = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
    if str(getattr(exc, "sqlstate", "") or "") in _POOLER_SQLSTATES:
        first_line = words.partition("\n")[0]
        return (
            f"{first_line}; a pooler in transaction or statement mode (pgbouncer) is in front"
            f" of PostgreSQL: add ?{STATEMENT_CACHE_SIZE}=0 to the database URL"
        )
    return words


def failed(what: str, message: object, *, constraint: bool = False) -> StoreError:
    """The error for a database `what` ("read" or "write") that failed with the driver's
    `message`; a ConstraintViolation when it broke a constraint. Both backends' words."""
    if constraint:
        return ConstraintViolation(f"database write failed: {message}")
    return StoreError(f"database {what} failed: {message}")


def create_private(target: SqliteTarget) -> None:
    """A database file not there yet made as its owner's alone (it holds every prompt and
    answer; its -wal and -shm files take its mode), as the answer journal is: sqlite3 and
    SQLAlchemy make it as the umask says, readable by all. (On any error, sqlite3's says.)"""
    if target.uri or target.in_memory:
        return
    with contextlib.suppress(OSError):
        os.close(os.open(target.filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class _Link:
    """One sqlite3 connection and the thread its statements run on: sqlite3 releases the GIL
    while SQLite works, so the event loop goes on meanwhile."""

    def __init__(self, target: SqliteTarget) -> None:
        self._target = target
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrunner-sqlite")
        self._conn: sqlite3.Connection | None = None
        #: Transactions begun by `begin`, counted on the connection's thread.
        self.begun = 0

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            target = self._target
            create_private(target)
            conn = sqlite3.connect(target.filename, uri=target.uri, check_same_thread=False)
            try:
                configure_sqlite_connection(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return work(conn)

    async def call(self, work: Callable[[sqlite3.Connection], T], what: str) -> T:
        """`work` on the connection, in its thread; SQLite's errors come out as `failed`'s
        for a database `what`."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._call, work)
        except sqlite3.Error as exc:
            raise failed(what, exc, constraint=isinstance(exc, sqlite3.IntegrityError)) from exc

    async def begin(self, sql: str, what: str) -> int:
        """Begin a transaction (`sql`: BEGIN or BEGIN IMMEDIATE); returns its number, which
        its statements carry (`_SqliteConnection`)."""

        def begin(conn: sqlite3.Connection) -> int:
            conn.execute(sql)
            self.begun += 1
            return self.begun

        return await self.call(begin, what)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with suppress(sqlite3.Error):
                await asyncio.get_running_loop().run_in_executor(self._thread, conn.close)
        self._thread.shutdown()


class _SqliteConnection:
    """A transaction's statements, each a hop to its connection's thread.

    A statement that reaches the thread after its transaction ended (a task left running past
    a rollback) is refused there: run, it would have been a transaction of its own, committed
    at once, or a part of the next one.
    """

    __slots__ = ("_link", "_number", "_what")

    def __init__(self, link: _Link, what: str, number: int) -> None:
        self._link = link
        self._what = what
        #: The transaction's number (`_Link.begin`).
        self._number = number

    async def execute(self, sql: str, params: Params = ()) -> Result:
        return await self._link.call(
            lambda conn: _execute(sql, params, self._open(conn)), self._what
        )

    async def executemany(self, sql: str, params: Sequence[Params]) -> int:
        return await self._link.call(
            lambda conn: _executemany(sql, params, self._open(conn)), self._what
        )

    def _open(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        """The connection, while this transaction is still the one open on it."""
        if not conn.in_transaction or self._link.begun != self._number:
            raise StoreError(
                f"database {self._what} failed: a statement of a transaction that had ended"
                " was refused"
            )
        return conn


class SqliteDatabase:
    """A SQLite file: one connection for this process's writes, one at a time, and more for
    reads, which WAL lets run beside a write."""

    is_sqlite = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.target = SqliteTarget.parse(url)
        if self.target.in_memory:
            raise UsageError(
                f"{url!r} is a SQLite database in memory, which ends with the connection that"
                " made it (and every command is a process of its own): give a file, such as"
                " sqlite:///batchrunner.db"
            )
        self._writer = _Link(self.target)
        #: This process's write transactions, one at a time. A writer waiting here is let in
        #: as soon as the previous one commits; waiting on SQLite's lock instead, it would
        #: poll in the busy handler with sleeps of up to 100 ms.
        self._write_lock = asyncio.Lock()
        self._idle: list[_Link] = []
        self._closed = False

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Connection]:
        async with self._write_lock, self._immediate() as conn:
            yield conn

    @asynccontextmanager
    async def bulk_write(self, only_if_empty: str) -> AsyncIterator[Connection]:
        """`write`, for a load of many rows. When the query `only_if_empty` finds no row and
        no other connection has the database open, the transaction is written with a rollback
        journal instead of WAL, and the database is back in WAL when the block ends.

        WAL writes every page twice: into the log as the transaction goes, and into the
        database when the checkpoint after the commit copies it back. A rollback journal
        keeps the old content of the pages a transaction changes, and the pages a load adds
        to the end of the file have none: they are written once. A plain sqlite3 load of a
        million jobs into a new database: 13.2 -> 8.1 s (docs/BENCHMARKS.md, goal 6). The price:
        while it loads, other connections wait for it (up to the busy timeout) where WAL
        would let them read, so the store asks for it only where there is nothing to read.
        """
        async with self._write_lock:
            await self._close_idle()  # our own readers would keep the database in WAL
            journal = await self._writer.call(
                lambda conn: _out_of_wal(conn, only_if_empty), "write"
            )
            try:
                async with self._immediate() as conn:
                    yield conn
            finally:
                if journal:
                    # Whatever this says, the load is committed or rolled back by now; the
                    # next connection of ours puts the database into WAL in any case.
                    with suppress(StoreError):
                        await self._writer.call(_back_into_wal, "write")

    @asynccontextmanager
    async def _immediate(self) -> AsyncIterator[Connection]:
        link = self._writer
        try:
            # (In the try: cancelled while it waits for the lock in the writer's thread, the
            # BEGIN goes through there all the same, and was left open, the write lock held:
            # every later write of the run failed, and other processes' too.)
            number = await link.begin("BEGIN IMMEDIATE", "write")
            yield _SqliteConnection(link, "write", number)
            await link.call(lambda conn: conn.execute("COMMIT"), "write")
        except BaseException:
            with suppress(StoreError):
                await link.call(lambda conn: _end(conn, "ROLLBACK"), "write")
            raise

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction in a single hop to the writer's thread, for
        the dispatcher's claims and records: a hop per statement waits each time for a turn
        of an event loop busy with requests (~10 ms at a zero-latency server)."""

        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                _end(conn, "ROLLBACK")
                raise
            return result

        async with self._write_lock:
            return await self._writer.call(run, "write")

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[_Link]:
        link = self._idle.pop() if self._idle else _Link(self.target)
        try:
            yield link
        except BaseException:
            await link.close()
            raise
        if self._closed or len(self._idle) >= SQLITE_IDLE_READERS:
            await link.close()
        else:
            self._idle.append(link)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Connection]:
        # A plain (deferred) BEGIN: reading never takes the write lock, and the statements of
        # one read see one snapshot.
        async with self._reader() as link:
            number = await link.begin("BEGIN", "read")
            try:
                yield _SqliteConnection(link, "read", number)
            finally:
                with suppress(StoreError):
                    await link.call(lambda conn: _end(conn, "ROLLBACK"), "read")

    async def fetch(self, sql: str, params: Params) -> list[Any]:
        """The rows of one read statement, outside a transaction: its own snapshot is enough,
        and a page of an export needs no BEGIN and ROLLBACK around it."""
        async with self._reader() as link:
            return await link.call(lambda conn: conn.execute(sql, params).fetchall(), "read")

    async def ensure_schema(self, *, create: bool = True) -> None:
        """Create or upgrade the database to head on first use (without `create`, one without
        batchrunner's tables is refused: see `no_tables`). A new database is made from the
        head schema's statements (`sqlite_schema`); SQLAlchemy and alembic are imported only
        to upgrade one made before."""
        current, empty = await self._revision()
        if current is None and not create:
            # (No table, or only others': another application's, or what `db downgrade base`
            # left.)
            raise no_tables(self.target.filename)
        if empty:
            if await self._writer.call(_create_at_head, "write"):
                return
            current, _ = await self._revision()  # made meanwhile by another process
        if current != SCHEMA_HEAD:
            from batchrunner import db

            await db.upgrade_url(self.url)

    async def _revision(self) -> tuple[str | None, bool]:
        """The database's alembic revision (None: none or several), and whether it has no
        table at all."""
        try:
            async with self.read() as conn:
                tables = (
                    await conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                ).scalars()
                rows = (
                    (await conn.execute("SELECT version_num FROM alembic_version")).all()
                    if "alembic_version" in tables
                    else []
                )
        except StoreError as exc:
            where = self.target.database
            folder = os.path.dirname(self.target.filename)
            if not self.target.uri and not os.path.isdir(folder):  # noqa: ASYNC240 - once, failing
                where += f" (there is no folder {folder})"
            raise StoreError(f"cannot open the database {where}: {exc.__cause__ or exc}") from exc
        # More than one row would be branches: not this project's, alembic sorts it out.
        return (str(rows[0][0]) if len(rows) == 1 else None), not tables

    async def _close_idle(self) -> None:
        """Close the read connections kept for the next reads."""
        idle, self._idle = self._idle, []
        for link in idle:
            await link.close()

    async def close(self) -> None:
        self._closed = True
        await self._close_idle()
        await self._writer.close()
