"""PostgreSQL for the store: asyncpg's own connections, without SQLAlchemy.

A run, a status or an export of a PostgreSQL database at the current schema imports asyncpg
alone. SQLAlchemy was ~0.17 s of every command's start-up, and a layer of Python (a greenlet
hop, a cursor adapter) around each of a run's claims and records. It is imported to create or
upgrade the schema with alembic (`db.py`), as it is for SQLite.

The store's statements name their parameters (`:name`, bound from a dict) on both backends;
here they become asyncpg's `$1, $2, ...` (`positional`). A statement that already uses `$n`
takes a tuple.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final
from urllib.parse import parse_qsl, quote, quote_plus, unquote

import asyncpg  # type: ignore[import-untyped]  # no type stubs

from batchrunner.config import without_password
from batchrunner.database import (
    SCHEMA_HEAD,
    STATEMENT_CACHE_SIZE,
    Connection,
    Params,
    Result,
    driver_words,
    failed,
    no_tables,
)
from batchrunner.errors import StoreError, UsageError

#: URL schemes that name PostgreSQL (with SQLAlchemy's name of the driver we use, or none).
_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgres+asyncpg")
#: The errors of a statement or a connection that failed: the server's (with an SQLSTATE),
#: asyncpg's own (a closed connection; a statement begun on a connection whose end the event
#: loop has yet to see), the network's, a connect that timed out.
_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class PgUrl:
    """A `postgresql://` URL, read as SQLAlchemy reads one: user and password percent-decoded,
    an IPv6 host in brackets, the database after the first slash."""

    user: str | None
    password: str | None
    host: str | None
    port: int | None
    database: str | None
    #: The URL's other parameters (asyncpg's: sslmode, host=/path for a Unix socket, ...).
    query: tuple[tuple[str, str], ...]
    #: What asyncpg connects with: the URL under the scheme asyncpg knows, without the
    #: parameters that are batchrunner's (asyncpg would send them to the server as settings).
    dsn: str
    #: `?statement_cache_size=N`: asyncpg's cache of prepared statements per connection
    #: (None: asyncpg's default). 0 behind pgbouncer in transaction or statement mode, where
    #: a connection's next statement may reach another server connection than its last.
    statement_cache_size: int | None = None
    #: libpq's `?connect_timeout=S`, which asyncpg takes as an argument, not in the DSN (there
    #: it would be sent to the server as a setting it does not know).
    connect_timeout_s: float | None = None

    @classmethod
    def parse(cls, url: str) -> PgUrl:
        scheme, sep, rest = url.partition("://")
        shown = without_password(url)
        if not sep:
            raise UsageError(f"not a database URL: {shown!r} (try sqlite:///batchrunner.db)")
        if scheme.partition("+")[0] not in ("postgresql", "postgres"):
            raise UsageError(
                f"unsupported database {scheme!r} in {shown!r}: use sqlite:/// or postgresql://"
            )
        if scheme not in _SCHEMES:
            raise UsageError(
                f"batchrunner connects to PostgreSQL through asyncpg, not {scheme!r}: use"
                f" postgresql://USER@HOST:PORT/DATABASE (in {shown!r})"
            )
        if "#" in rest:
            # (asyncpg reads what follows as a fragment, and failed with a traceback that
            # quoted the password's start as a port.)
            raise UsageError(f"a database URL holds no '#': {shown!r}{_ENCODE_HINT}")
        ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
        if ends and rest.rfind("@") > min(ends):
            # A password holding '/' or '?' (not percent-encoded): the host and port were
            # read from the password, and asyncpg's traceback quoted the rest of it.
            raise UsageError(f"an '@' after the host in {shown!r}{_ENCODE_HINT}")
        location, _, query = rest.partition("?")
        authority, slash, path = location.partition("/")
        credentials, at, hostport = authority.rpartition("@")
        if "@" in credentials:
            # (asyncpg takes the host from the first '@': "cannot open the database: Name or
            # service not known", for a host made of the password's end.)
            raise UsageError(f"an '@' in the user or password of {shown!r}{_ENCODE_HINT}")
        user = password = None
        if at:
            name, colon, secret = credentials.partition(":")
            user = unquote(name)
            password = unquote(secret) if colon else None
        host, port = _host_and_port(hostport, shown)
        # batchrunner's own parameters come out of what asyncpg is given; the others stay
        # as they were written.
        cache_size = timeout_s = None
        parts = query.split("&") if query else []
        kept = []
        for part in parts:
            key, _, value = part.partition("=")
            if unquote(key) == STATEMENT_CACHE_SIZE:
                cache_size = _cache_size(unquote(value), shown)
            elif unquote(key) == _CONNECT_TIMEOUT:
                timeout_s = _connect_timeout(unquote(value), shown)
            else:
                kept.append(part)
        if len(kept) < len(parts):
            query = "&".join(kept)
            rest = f"{location}?{query}" if query else location
        return cls(
            user=user,
            password=password,
            host=host,
            port=port,
            database=unquote(path) if slash else None,
            query=tuple(sorted(parse_qsl(query), key=lambda kv: kv[0])),
            dsn=f"postgresql://{rest}",
            statement_cache_size=cache_size,
            connect_timeout_s=timeout_s,
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """asyncpg.connect's keyword arguments besides the DSN."""
        kwargs: dict[str, Any] = {}
        if self.statement_cache_size is not None:
            kwargs["statement_cache_size"] = self.statement_cache_size
        if self.connect_timeout_s is not None:
            kwargs["timeout"] = self.connect_timeout_s
        return kwargs

    def location(self) -> str:
        """The database's address without its password or driver, written as SQLAlchemy
        renders it (`postgresql://user:***@host:port/db`, the stars there when the URL has a
        password): answer journals are kept per location (journal.py), and earlier versions
        named it this way."""
        text = "postgresql://"
        if self.user is not None:
            text += quote(self.user, safe=" +")
            text += "@" if self.password is None else ":***@"
        if self.host is not None:
            text += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            text += f":{self.port}"
        if self.database is not None:
            text += "/" + quote(self.database, safe=" +/")
        if self.query:
            text += "?" + "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in self.query)
        return text


def _cache_size(text: str, shown: str) -> int:
    if not text.isdigit():
        raise UsageError(
            f"{STATEMENT_CACHE_SIZE} must be a whole number of statements (0 turns the cache"
            f" off, as pgbouncer in transaction mode needs), not {text!r} in {shown!r}"
        )
    return int(text)


_CONNECT_TIMEOUT: Final = "connect_timeout"
_ENCODE_HINT: Final = (
    "; a password holding '/', '?', '#' or '@' must be percent-encoded (%2F, %3F, %23, %40),"
    " or given in PGPASSWORD or ~/.pgpass instead"
)


def _connect_timeout(text: str, shown: str) -> float | None:
    """libpq's connect_timeout in seconds; 0 or less: none of our own (asyncpg's, 60 s)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise UsageError(
            f"{_CONNECT_TIMEOUT} must be a number of seconds, not {text!r} in {shown!r}"
        )
    return seconds if seconds > 0 else None


def _host_and_port(hostport: str, shown: str) -> tuple[str | None, int | None]:
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket:
            raise UsageError(f"an IPv6 address without its closing ']' in {shown!r}")
        port = after.removeprefix(":")
    else:
        host, _, port = hostport.partition(":")
    if not port:
        return host or None, None
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        # (Not quoted: with a password holding '/' or '?', it is the password's start.)
        raise UsageError(f"the port is not a number in {shown!r}{_ENCODE_HINT}")
    return host or None, int(port)


# A parameter name after a colon; not the second colon of a cast (`meta::json`), nor a colon
# inside a word.
_NAMED_PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@lru_cache(maxsize=1024)
def positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """`sql` with its `:name` parameters as `$1, $2, ...`, and the names in that order (a name
    used twice is one parameter)."""
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        return f"${names.setdefault(match[1], len(names) + 1)}"

    return _NAMED_PARAMETER.sub(number, sql), tuple(names)


_RETURNS_ROWS = re.compile(r"^\s*(?:SELECT|WITH|VALUES|SHOW|TABLE)\b|\bRETURNING\b", re.I)


@lru_cache(maxsize=1024)
def _returns_rows(sql: str) -> bool:
    """Whether a statement answers with rows (read with `fetch`), or only a status whose count
    is its rowcount (`execute`). A WITH whose last part changes rows without RETURNING counts
    as answering rows: none of the store's statements is one."""
    return _RETURNS_ROWS.search(sql) is not None


def _bound(sql: str, params: Params) -> tuple[str, Sequence[Any]]:
    if isinstance(params, tuple):
        return sql, params
    query, names = positional(sql)
    return query, [params[name] for name in names]


def _rowcount(status: str) -> int:
    """The rows a command changed, from its status ("UPDATE 3", "INSERT 0 5"); -1: unknown."""
    count = status.rpartition(" ")[2]
    return int(count) if count.isdigit() else -1


_BEGIN = {"read": "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", "write": "BEGIN"}


def _failed(exc: BaseException, what: str) -> StoreError:
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    return failed(what, driver_words(exc), constraint=sqlstate.startswith("23"))


class _PgConnection:
    """A transaction's statements on one asyncpg connection."""

    __slots__ = ("_conn", "_what")

    def __init__(self, conn: asyncpg.Connection, what: str) -> None:
        self._conn = conn
        self._what = what

    async def execute(self, sql: str, params: Params = ()) -> Result:
        query, args = _bound(sql, params)
        try:
            if _returns_rows(sql):
                rows = await self._conn.fetch(query, *args)
                return Result([tuple(row) for row in rows], len(rows))
            status = await self._conn.execute(query, *args)
        except _DRIVER_ERRORS as exc:
            raise _failed(exc, self._what) from exc
        return Result([], _rowcount(status))

    async def executemany(self, sql: str, params: Sequence[Params]) -> int:
        """One statement per set of parameters, for the rowcount asyncpg's executemany does
        not give: the store runs it for a few rows (`JobStore.release`); loads go by COPY."""
        changed = 0
        for one in params:
            changed += max((await self.execute(sql, one)).rowcount, 0)
        return changed

    async def copy_records(
        self, table: str, records: Sequence[tuple[Any, ...]], columns: Sequence[str]
    ) -> None:
        """Rows into `table` by COPY, several times faster than an INSERT per row."""
        try:
            await self._conn.copy_records_to_table(table, records=records, columns=columns)
        except _DRIVER_ERRORS as exc:
            raise _failed(exc, self._what) from exc


class PgDatabase:
    """A PostgreSQL database: connections kept for the next transaction, and one of its own,
    in autocommit, for the dispatcher's records."""

    is_sqlite = False

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        self.target = PgUrl.parse(url)
        #: Connections open at once, at most (a transaction waits for one beyond that).
        self._slots = asyncio.Semaphore(2 * pool_size)
        #: Idle connections kept for the next transactions.
        self._keep = pool_size
        self._idle: list[asyncpg.Connection] = []
        self._recorder: asyncpg.Connection | None = None
        #: One statement at a time on it.
        self._recorder_lock = asyncio.Lock()
        self._closed = False

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.target.dsn, **self.target.connect_kwargs())

    @asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        """A connection for one transaction or statement, given back when it ends; a
        connection that failed under it is closed instead (the next opens anew)."""
        async with self._slots:
            conn = None
            while self._idle and conn is None:
                kept = self._idle.pop()
                # A backend that ended (a restart, pg_terminate_backend) closed the socket,
                # which the event loop has seen by now.
                conn = None if kept.is_closed() else kept
            if conn is None:
                try:
                    conn = await self._connect()
                except _DRIVER_ERRORS as exc:
                    raise _failed(exc, what) from exc
            try:
                yield conn
            except BaseException:
                conn.terminate()
                raise
            if self._closed or len(self._idle) >= self._keep:
                await _close(conn)
            else:
                self._idle.append(conn)

    @asynccontextmanager
    async def _transaction(self, what: str) -> AsyncIterator[Connection]:
        async with self._connection(what) as conn:
            try:
                # A read's statements see one snapshot, as SQLite's do; a reader never fails
                # for it (only writers meet serialization failures).
                await conn.execute(_BEGIN[what])
            except _DRIVER_ERRORS as exc:
                raise _failed(exc, what) from exc
            try:
                yield _PgConnection(conn, what)
            except Exception:
                with suppress(*_DRIVER_ERRORS):
                    await conn.execute("ROLLBACK")
                raise
            try:
                await conn.execute("COMMIT" if what == "write" else "ROLLBACK")
            except _DRIVER_ERRORS as exc:
                raise _failed(exc, what) from exc

    def read(self) -> AbstractAsyncContextManager[Connection]:
        return self._transaction("read")

    def write(self) -> AbstractAsyncContextManager[Connection]:
        return self._transaction("write")

    def bulk_write(self, only_if_empty: str) -> AbstractAsyncContextManager[Connection]:
        """`write`: PostgreSQL's log is the same for any load."""
        return self.write()

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """The rows of one read statement in asyncpg's own placeholders ($1, ...), outside a
        transaction: its own snapshot is enough."""
        async with self._connection("read") as conn:
            try:
                return list(await conn.fetch(sql, *args))
            except _DRIVER_ERRORS as exc:
                raise _failed(exc, "read") from exc

    async def record(self, sql: str, params: Sequence[Any]) -> Any:
        """Run one statement that returns one value, in a transaction of its own.

        The statement is a transaction of its own in autocommit, without a BEGIN and a COMMIT
        to wait for, on a connection kept for it. A connection that failed is dropped and the
        next record opens another.
        """
        async with self._recorder_lock:
            try:
                if self._recorder is None:
                    self._recorder = await self._connect()
                return await self._recorder.fetchval(sql, *params)
            except BaseException as exc:
                conn, self._recorder = self._recorder, None
                if conn is not None:
                    conn.terminate()
                if isinstance(exc, _DRIVER_ERRORS):
                    raise _failed(exc, "write") from exc
                raise

    async def ensure_schema(self, *, create: bool = True) -> None:
        """Create or upgrade the database to head on first use (alembic, and with it
        SQLAlchemy, is imported only then); without `create`, one without batchrunner's
        tables is refused (`no_tables`)."""
        try:
            async with self.read() as conn:
                exists = await conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL")
                rows = (
                    (await conn.execute("SELECT version_num FROM alembic_version")).all()
                    if exists.scalar()
                    else []
                )
        except StoreError as exc:
            cause = driver_words(exc.__cause__) if exc.__cause__ else exc.message
            raise StoreError(f"cannot open the database: {cause}") from exc
        # More than one row would be branches: not this project's, alembic sorts it out.
        if len(rows) == 1 and rows[0][0] == SCHEMA_HEAD:
            return
        if not rows and not create:
            raise no_tables(without_password(self.url))
        from batchrunner import db

        await db.upgrade_url(self.url)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        async with self._recorder_lock:
            if self._recorder is not None:
                idle.append(self._recorder)
                self._recorder = None
        for conn in idle:
            await _close(conn)


#: How long a connection's orderly close may take before it is cut.
_CLOSE_TIMEOUT_S = 5.0


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=_CLOSE_TIMEOUT_S)
    except BaseException as exc:
        conn.terminate()  # the server ends the session when the socket closes
        if not isinstance(exc, Exception):
            raise
