"""JobStore: the only module that speaks SQL.

Every write is one short transaction (SQLite: `BEGIN IMMEDIATE`, see database.py). The dispatcher's
hot path touches the database only in chunks: it claims jobs a few hundred at a time and records
ended jobs in batched transactions, each row fenced by the lease token it was claimed with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias, cast
from urllib.parse import unquote, urlsplit

import orjson

from batchrunner.database import (
    Connection,
    Database,
    SqliteDatabase,
    SqliteTarget,
    is_sqlite_url,
)
from batchrunner.errors import BatchNotFound, ConstraintViolation, UsageError
from batchrunner.exportrows import ENDED_STATES, FAILED_ONLY, ExportRow, export_page_sql
from batchrunner.lines import JobRow, NewJob
from batchrunner.states import MODEL_CHARS, REQUEST_ID_CHARS, JobState, cancelled_for_good

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from batchrunner.postgres import PgDatabase

#: Rows per INSERT round trip when loading a file.
LOAD_CHUNK_ROWS = 5_000
#: A worker whose heartbeat is older than this is taken for dead.
WORKER_STALE_S = 60.0


@dataclass(frozen=True, slots=True)
class BatchInfo:
    id: str
    name: str
    source_file: str
    content_sha256: str
    base_url: str
    api_key_env: str
    options: dict[str, Any]
    total_jobs: int
    invalid_lines: int
    created_at: float
    cancelled_at: float | None


# ClaimedJob, AttemptRecord and Ended are not frozen: one of each is made for every request, and
# a frozen dataclass's __init__ (a call to object.__setattr__ per field) costs three times as
# much. Treat them as read-only all the same.
@dataclass(slots=True)
class ClaimedJob:
    """A job this worker holds the lease of."""

    id: int
    custom_id: str
    line: int
    endpoint: str
    body: str
    model: str
    stream: bool
    est_tokens: int
    attempts: int
    lease_token: str


#: An answer paid for and not kept: its model, then its prompt, cached, completion, reasoning
#: and total tokens (`AttemptRecord.spent`).
Spent: TypeAlias = tuple[str | None, int, int, int, int, int]


@dataclass(slots=True)
class AttemptRecord:
    job_id: int
    status_code: int | None
    error_kind: str | None
    latency_ms: float
    request_id: str | None
    started_at: float
    #: A complete answer paid for and not kept as the result (a json_schema not met, tried
    #: again with --retry-invalid-json): what it used, so that the batch's tokens and cost
    #: count it (`discarded_answers`). None for every other attempt.
    spent: Spent | None = None


@dataclass(slots=True)
class Ended:
    """A job's end as a worker saw it; recorded only if the worker still holds the lease."""

    job_id: int
    lease_token: str
    state: JobState
    #: Attempts made by this worker (added to those of earlier runs).
    attempts: int
    status_code: int | None
    latency_ms: float
    request_id: str | None = None
    # Succeeded jobs:
    response: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    total_tokens: int | None = None
    schema_valid: bool | None = None
    # Failed jobs:
    error_kind: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    recorded: int
    #: Ends refused because the lease had passed to another worker or the job was cancelled
    #: (fencing)...
    fenced: int
    #: ...and their jobs.
    fenced_ids: frozenset[int] = frozenset()


@dataclass(slots=True)
class BatchCounts:
    total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in JobState})

    @property
    def unfinished(self) -> int:
        return self.counts[JobState.PENDING.value] + self.counts[JobState.RUNNING.value]


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str
    results: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int
    #: Answers paid for and tried again, counted in the tokens above (not in `results`).
    discarded: int = 0
    #: Results whose answer reported no usage (a stream without include_usage): their tokens
    #: and cost are unknown, and not in the sums above.
    without_usage: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    paused_until: float | None
    sent: int
    succeeded: int
    failed: int
    tokens: int
    #: Jobs ended and tokens a second between its last two heartbeats (None: one so far).
    recent_requests_per_s: float | None = None
    recent_tokens_per_s: float | None = None
    #: With --max-cost: what it spent since it started, and holds reserved (None: no cap).
    spent_usd: float | None = None
    reserved_usd: float | None = None


@dataclass(frozen=True, slots=True)
class CoordinationView:
    """What a worker's coordinator reads of its batch every second."""

    #: The batch's live workers (`JobStore.coordination_view`).
    workers: list[WorkerInfo]
    #: `batchrunner cancel` ended the batch: its jobs are no longer anyone's to send.
    cancelled: bool


class UsageGroup(NamedTuple):
    """Token sums of the results of one model, price period and prompt-size tier
    (`JobStore.usage_groups`)."""

    model: str
    #: The finish time divided by the period, rounded down.
    period: int
    tier: int
    results: int
    #: Results that reported usage.
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    total_tokens: int
    #: Answers paid for and not kept (`discarded_answers`), whose usage the sums include.
    discarded: int


def _batch_info(row: Sequence[Any]) -> BatchInfo:
    """A row of `_BATCH_COLUMNS`, which are BatchInfo's fields in order."""
    options = row[6]
    if isinstance(options, str):  # SQLite keeps JSON as text
        options = orjson.loads(options)
    id_, name, source_file, sha256, base_url, key_env = row[:6]
    total, invalid, created, cancelled = row[7:]
    return BatchInfo(
        id_,
        name,
        source_file,
        sha256,
        base_url,
        key_env,
        options or {},
        total,
        invalid,
        created,
        cancelled,
    )


_BATCH_COLUMNS = (
    "id, name, source_file, content_sha256, base_url, api_key_env, options, total_jobs,"
    " invalid_lines, created_at, cancelled_at"
)
_CLAIM_COLUMNS = "id, custom_id, line, endpoint, body, model, stream, est_tokens, attempts"

# A running job given back to pending (its run stopped, died or lost its lease) may have been
# retried under that lease, and its holder logged those attempts: they count against
# --max-attempts like those of runs that ended the job, and the job's attempts stay those of
# its log. Its claim set updated_at; heartbeats leave it alone.
_COUNT_LOGGED = (
    "attempts = attempts + (SELECT count(*) FROM attempts a WHERE a.job_id = jobs.id"
    " AND a.worker_id = jobs.lease_owner AND a.started_at >= jobs.updated_at)"
)
#: Running jobs back to pending: every way a job is given back goes through this.
_GIVE_BACK = (
    "UPDATE jobs SET state = 'pending', lease_owner = NULL, lease_token = NULL,"
    f" lease_expires_at = NULL, updated_at = :now, {_COUNT_LOGGED}"
)
_EXPIRE_LEASES_SQL = (
    f"{_GIVE_BACK} WHERE batch_id = :batch AND state = 'running' AND lease_expires_at < :now"
)
#: Every job a worker of the batch holds (`release_all`, and `_reap` for dead workers).
_GIVE_BACK_WORKER_SQL = (
    f"{_GIVE_BACK} WHERE batch_id = :b AND state = 'running' AND lease_owner = :w"
)
# SQLite's claim goes to sqlite3 as it is (see SqliteDatabase.transaction): sqlite3 binds the
# named parameters itself.
_CLAIM_SQLITE = (
    "UPDATE jobs SET state = 'running', lease_owner = :owner, lease_token = :token,"
    " lease_expires_at = :expires, updated_at = :now"
    " WHERE id IN (SELECT id FROM jobs WHERE batch_id = :batch AND state = 'pending'"
    " AND id > :after AND (not_before IS NULL OR not_before <= :now) ORDER BY id LIMIT :limit)"
    f" RETURNING {_CLAIM_COLUMNS}"
)
# On PostgreSQL `state = 'pending' ... ORDER BY id` let the planner, once it had statistics,
# walk the primary key from the first job of the table and filter (it takes rows of a batch and
# rows pending as independent, and the batch's rows as spread over the whole table): 0.5 s a
# claim with 2.2 M other jobs before the batch, 1.2 s with none pending, at every look back.
# Spelled as a range over (state, id), only ix_jobs_claim (batch_id, state, id) gives the
# order: a claim reads its own rows, 1 ms, however many other batches the table holds.
_CLAIM_POSTGRES = (
    "WITH picked AS (SELECT id FROM jobs WHERE batch_id = :batch AND (state, id) > ('pending',"
    " :after) AND state <= 'pending' AND (not_before IS NULL OR not_before <= :now)"
    " ORDER BY state, id LIMIT :limit FOR UPDATE SKIP LOCKED)"
    " UPDATE jobs SET state = 'running', lease_owner = :owner, lease_token = :token,"
    " lease_expires_at = :expires, updated_at = :now FROM picked WHERE jobs.id = picked.id"
    " RETURNING jobs.id, jobs.custom_id, jobs.line, jobs.endpoint, jobs.body, jobs.model,"
    " jobs.stream, jobs.est_tokens, jobs.attempts"
)
# SQLite's `record` statements, with positional parameters: plain tuples, which sqlite3 binds
# faster than a dict per row.
_INSERT_RESULT_SQL = (
    "INSERT INTO results (job_id, batch_id, status_code, response, request_id, model,"
    " prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens,"
    " schema_valid, latency_ms, attempts, finished_at)"
    " SELECT id, batch_id, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, attempts + ?12, ?13"
    " FROM jobs WHERE id = ?14 AND lease_token = ?15 AND state = 'running'"
    " ON CONFLICT (job_id) DO NOTHING"
)
#: Where `_record_rows` puts the job's id in a result's and in an end's parameters.
_RESULT_JOB_ID = 13
_END_JOB_ID = 6
_END_JOB_SQL = (
    "UPDATE jobs SET state = ?1, attempts = attempts + ?2, lease_owner = NULL,"
    " lease_token = NULL, lease_expires_at = NULL, not_before = NULL,"
    " error_kind = ?3, last_status = ?4, last_error = ?5, finished_at = ?6, updated_at = ?6"
    " WHERE id = ?7 AND lease_token = ?8 AND state = 'running'"
)
# An attempt already logged (by a statement of a dead run that ran after the run recording
# its journal, see record_kept) is not logged again.
_INSERT_ATTEMPT_SQL = (
    "INSERT INTO attempts (job_id, batch_id, worker_id, status_code, error_kind, latency_ms,"
    " request_id, started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    " ON CONFLICT (job_id, started_at) DO NOTHING"
)


# Written only when some attempt of a record has `spent` (rarely); an answer already kept (a
# dead run's journal recorded after its own last record) is not kept again. An answer that
# named no model is the request's.
_INSERT_DISCARDED_SQL = (
    "INSERT INTO discarded_answers (job_id, started_at, batch_id, model, prompt_tokens,"
    " cached_tokens, completion_tokens, reasoning_tokens, total_tokens)"
    " VALUES (:j, :s, :b, COALESCE(:m, (SELECT model FROM jobs WHERE id = :j)), :p, :c, :o, :r,"
    " :t) ON CONFLICT (job_id, started_at) DO NOTHING"
)


# PostgreSQL's `record` is this one statement, in a transaction of its own: a single round trip
# where the same three writes, with a transaction and a lock around them, took six, each
# waiting for a turn of an event loop busy with requests. `done` ends the jobs still running
# under the ended jobs' lease tokens; the UPDATE re-checks that condition on a row another
# transaction changed meanwhile, so a lease that passed to another worker records nothing.
# Results go by `done`, and the statement returns the ends it fenced (NULL: none). (Locking
# the rows first with SELECT ... FOR UPDATE, as this did before, wrote each row twice: 11 % of
# the server's CPU in a run.) The ends come sorted by job id, so that rows are locked in the
# order claims and heartbeats lock them.
#
# The rows come as JSON, one array per row ($1, $4, $8, from `_record_params`), and the long
# free text (error bodies, completions) beside them as text arrays ($2, $5), row for row. A
# parameter per column, as before, cost the client 17 us per row: asyncpg checks every element
# of an array against collections.abc. The free text stays out of the JSON: nothing to escape
# and parse again, and a jsonb value holds at most 256 MB where a batch of long completions may
# hold more. `$3` is the time of the record.
_RECORD_PG = """
WITH ended AS (
  SELECT (e.v->>0)::bigint AS id, e.v->>1 AS token, e.v->>2 AS state, (e.v->>3)::int AS attempts,
         e.v->>4 AS error_kind, (e.v->>5)::int AS last_status, e.last_error
  FROM ROWS FROM (jsonb_array_elements($1::jsonb), unnest($2::text[])) AS e(v, last_error)
), done AS (
  UPDATE jobs SET state = e.state, attempts = jobs.attempts + e.attempts, lease_owner = NULL,
                  lease_token = NULL, lease_expires_at = NULL, not_before = NULL,
                  error_kind = e.error_kind, last_status = e.last_status,
                  last_error = e.last_error, finished_at = $3::float8, updated_at = $3::float8
  FROM ended e
  WHERE jobs.id = e.id AND jobs.lease_token = e.token AND jobs.state = 'running'
  RETURNING jobs.id, jobs.batch_id, jobs.attempts
), saved AS (
  INSERT INTO results (job_id, batch_id, status_code, response, request_id, model,
                       prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens,
                       total_tokens, schema_valid, latency_ms, attempts, finished_at)
  SELECT d.id, d.batch_id, (r.v->>1)::int, r.response, r.v->>2, r.v->>3, (r.v->>4)::int,
         (r.v->>5)::int, (r.v->>6)::int, (r.v->>7)::int, (r.v->>8)::int, (r.v->>9)::bool,
         (r.v->>10)::float8, d.attempts, $3::float8
  FROM ROWS FROM (jsonb_array_elements($4::jsonb), unnest($5::text[])) AS r(v, response)
  JOIN done d ON d.id = (r.v->>0)::bigint
  ON CONFLICT (job_id) DO NOTHING
), logged AS (
  INSERT INTO attempts (job_id, batch_id, worker_id, status_code, error_kind, latency_ms,
                        request_id, started_at)
  SELECT (a.v->>0)::bigint, $6::text, $7::text, (a.v->>1)::int, a.v->>2, (a.v->>3)::float8,
         a.v->>4, (a.v->>5)::float8
  FROM jsonb_array_elements($8::jsonb) AS a(v)
  ON CONFLICT (job_id, started_at) DO NOTHING
)
SELECT array_agg(e.id) FROM ended e WHERE e.id NOT IN (SELECT id FROM done)
"""


#: Job ids bound in one IN (...) list: well under SQLite's parameter limit.
_IDS_PER_STATEMENT = 500
#: Characters of answers (or request bodies) a page of an export holds, about
#: (`ids_per_page`)...
PAGE_CHARS = 16 << 20
#: ...as measured on this many jobs.
PAGE_SAMPLE_JOBS = 64
#: Lease of a job taken back for an answer from a journal, until it is recorded a moment later:
#: long enough that no claim takes it meanwhile; should this process die in between, the next
#: run on this host releases it at once (the lease names the dead worker).
KEPT_LEASE_S = 60.0
_TAKE_BACK = (
    "UPDATE jobs SET state = 'running', lease_owner = :w, lease_token = :t,"
    " lease_expires_at = :exp, updated_at = :now"
    " WHERE batch_id = :b AND state IN ('pending', 'running') AND id IN {ids} RETURNING id"
)


def _in_list(values: Sequence[Any], params: dict[str, Any], name: str = "id") -> str:
    """`(:id0, :id1, ...)` for an IN, with the values added to `params`."""
    marks = []
    for i, value in enumerate(values):
        params[f"{name}{i}"] = value
        marks.append(f":{name}{i}")
    return f"({', '.join(marks)})"


class _SomeFenced(Exception):
    """Some ends of a SQLite record were fenced: it is undone and written end by end."""


class BatchExists(Exception):
    """Another submit created a batch of the same content while this one was loading."""


class DuplicateCustomId(Exception):
    """Two jobs of one batch share a custom_id (the database's unique constraint said so)."""


#: How SQLite and PostgreSQL name the unique keys of batches and of jobs' custom_id.
_BATCH_KEYS = ("batches.id", "batches.content_sha256", "pk_batches", "uq_batches_content_sha256")
_CUSTOM_ID_KEYS = ("jobs.custom_id", "uq_jobs_batch_id")


def _violates(exc: ConstraintViolation, *names: str) -> bool:
    """Whether the driver's message names one of these constraints or columns."""
    return any(name in str(exc) for name in names)


class JobStore:
    """Batches, jobs and results in one database (SQLite or PostgreSQL)."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self.is_sqlite = database.is_sqlite
        #: The URL as given: what another process opens the same database with.
        self.url = database.url
        #: An SQLAlchemy engine on the same database, made on first use (`engine`).
        self._engine: AsyncEngine | None = None
        #: In a view made by `snapshot`: the read transaction every read of it goes through.
        self._held: Connection | None = None

    @classmethod
    def for_url(cls, url: str, *, pool_size: int = 5) -> JobStore:
        """A store for the database at a plain URL, without touching it yet."""
        if is_sqlite_url(url):
            return cls(SqliteDatabase(url))
        # asyncpg: imported only for PostgreSQL.
        from batchrunner.postgres import PgDatabase

        return cls(PgDatabase(url, pool_size=pool_size))

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 5, create: bool = True) -> JobStore:
        """Open the database at a plain URL, creating or upgrading it to head; without
        `create`, one without batchrunner's tables is a UsageError."""
        store = cls.for_url(url, pool_size=pool_size)
        try:
            await store._db.ensure_schema(create=create)
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def engine(self) -> AsyncEngine:
        """An SQLAlchemy engine on the store's database, made on first use (the store itself
        goes through sqlite3 or asyncpg), for migrations and inspection."""
        if self._engine is None:
            from batchrunner import db

            self._engine = db.create_engine(self.url)
        return self._engine

    @property
    def _pg(self) -> PgDatabase:
        assert not self.is_sqlite
        return cast("PgDatabase", self._db)

    @property
    def _sqlite(self) -> SqliteDatabase:
        assert isinstance(self._db, SqliteDatabase)
        return self._db

    @property
    def _batch_row_for_update(self) -> str:
        """The batch's `cancelled_at`, its row held until the write transaction ends (SQLite's
        write transactions take the whole database already). NO KEY UPDATE: two of these wait
        for each other, rows that refer to the batch (a worker registering) do not."""
        lock = "" if self.is_sqlite else " FOR NO KEY UPDATE"
        return f"SELECT cancelled_at FROM batches WHERE id = :b{lock}"

    @property
    def sqlite_target(self) -> SqliteTarget | None:
        """What a SQLite database's URL opens; None for PostgreSQL."""
        return self._sqlite.target if self.is_sqlite else None

    def is_database_file(self, path: Path) -> bool:
        """Whether `path` is the SQLite database's file, or one SQLite keeps beside it (the
        write-ahead log, its shared memory, a rollback journal; also one not there now, which
        SQLite would take for its own: a CSV named `jobs.db-journal` was deleted as a hot
        journal), or in its answer journal's folder: no export may be written there."""
        from batchrunner.journal import SQLITE_SUFFIX

        target = self.sqlite_target
        if target is None or target.in_memory:
            return False
        database = target.database
        if target.uri:
            database = unquote(urlsplit(database).path)
        where = os.path.realpath(path)
        own = os.path.realpath(database)
        if where.startswith(own + SQLITE_SUFFIX + os.sep):
            return True
        for suffix in ("", "-wal", "-shm", "-journal"):
            if where == own + suffix:
                return True
            with contextlib.suppress(OSError):
                if os.path.samefile(path, database + suffix):
                    return True
        return False

    def wal_bytes(self) -> int | None:
        """The size of a SQLite database's write-ahead log now (0: none); None for PostgreSQL
        or a database opened through a URI."""
        target = self.sqlite_target
        if target is None or target.uri:
            return None
        try:
            return os.stat(f"{target.filename}-wal").st_size
        except OSError:
            return 0

    @property
    def postgres_location(self) -> str | None:
        """A PostgreSQL database's address without its password (`PgUrl.location`); None for
        SQLite."""
        return None if self.is_sqlite else self._pg.target.location()

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()
        await self._db.close()

    async def __aenter__(self) -> JobStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transactions ---------------------------------------------------------------------

    def _write(self) -> AbstractAsyncContextManager[Connection]:
        """A write transaction: `async with store._write() as conn`, committed at the end."""
        return self._db.write()

    def reading(self) -> AbstractAsyncContextManager[Connection]:
        """A read transaction on the store's database (`async with ... as conn`): the store's
        own queries, and those that belong with another module (export.py). In a view made by
        `snapshot`, the view's one transaction."""
        if self._held is not None:
            return contextlib.nullcontext(self._held)
        return self._db.read()

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[JobStore]:
        """A view of the store whose reads all see the database as it stood at one moment.

        Figures read one after another while a run records (`status`: counts, tokens, cost,
        errors) would each see a later moment: thousands more jobs succeeded than results
        counted. Through the view they come from one read transaction, which is also what holds
        the moment (SQLite's snapshot from its first read, PostgreSQL's REPEATABLE READ). The
        view is for the block only; closing the store closes it."""
        async with self._db.read() as conn:
            view = JobStore(self._db)
            view._held = conn
            yield view

    # -- batches ----------------------------------------------------------------------------

    async def find_batch_by_content(self, sha256: str) -> BatchInfo | None:
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches WHERE content_sha256 = :sha",
                    {"sha": sha256},
                )
            ).first()
        return _batch_info(row) if row else None

    async def get_batch(self, batch_id: str) -> BatchInfo:
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = :id", {"id": batch_id}
                )
            ).first()
        if row is None:
            raise BatchNotFound(f"no batch {batch_id!r} in this database")
        return _batch_info(row)

    async def list_batches(self) -> list[BatchInfo]:
        async with self.reading() as conn:
            rows = (
                await conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches ORDER BY created_at")
            ).all()
        return [_batch_info(r) for r in rows]

    @asynccontextmanager
    async def loading(self, batch: BatchInfo) -> AsyncIterator[BatchLoader]:
        """One transaction that creates `batch` and takes its jobs in chunks.

        Nothing is visible to other connections until the block ends without an error. The
        first batch of a SQLite database is loaded without WAL (`SqliteDatabase.bulk_write`):
        other commands wait for it, and there is nothing for them to read before it.
        """
        async with self._db.bulk_write("SELECT 1 FROM batches LIMIT 1") as conn:
            try:
                await conn.execute(
                    f"INSERT INTO batches ({_BATCH_COLUMNS}) VALUES (:id, :name, :source_file,"
                    " :sha, :base_url, :key_env, :options, 0, 0, :created_at, NULL)",
                    {
                        "id": batch.id,
                        "name": batch.name,
                        "source_file": batch.source_file,
                        "sha": batch.content_sha256,
                        "base_url": batch.base_url,
                        "key_env": batch.api_key_env,
                        # JSON text: SQLite keeps it so, and PostgreSQL's json takes it as is.
                        "options": orjson.dumps(batch.options).decode(),
                        "created_at": batch.created_at,
                    },
                )
            except ConstraintViolation as exc:
                # The batch id and the content hash are both the content's: either one.
                if _violates(exc, *_BATCH_KEYS):
                    raise BatchExists(batch.id) from exc
                raise
            loader = BatchLoader(conn, batch.id, sqlite=self.is_sqlite)
            yield loader
            await loader.finish()

    # -- state ------------------------------------------------------------------------------

    async def counts(self, batch_id: str) -> BatchCounts:
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT state, COUNT(*) FROM jobs WHERE batch_id = :b GROUP BY state",
                    {"b": batch_id},
                )
            ).all()
        result = BatchCounts()
        for state, n in rows:
            result.counts[state] = int(n)
            result.total += int(n)
        return result

    async def usage_groups(
        self,
        batch_id: str,
        period_s: int,
        tier_starts: Mapping[str, Sequence[int]] | None = None,
        *,
        discarded_only: bool = False,
    ) -> list[UsageGroup]:
        """The token sums of the batch's results, and of the answers it paid for and did not
        keep (`discarded_answers`, counted as requests and not as results), by model, by
        `period_s` of their finish time (counted from the epoch) and, for the models in
        `tier_starts` (then only those), by prompt-size tier: a request is in tier k when its
        prompt is past k of the model's starts (ascending). One scan of the batch's results.

        For pricing a sum exactly: within one group every request has the same rates.
        `discarded_only`: the groups of the discarded answers alone."""
        groups = (
            []
            if discarded_only
            else await self._usage_groups(
                "COALESCE(NULLIF(r.model, ''), j.model)",
                "r.finished_at",
                ("COUNT(*)", "0"),
                "jobs j JOIN results r ON r.job_id = j.id WHERE j.batch_id = :b",
                batch_id,
                period_s,
                tier_starts,
            )
        )
        discarded = await self._usage_groups(
            "r.model",
            "r.started_at",
            ("0", "COUNT(*)"),
            "discarded_answers r WHERE r.batch_id = :b",
            batch_id,
            period_s,
            tier_starts,
        )
        if discarded_only:
            return discarded
        if not discarded:
            return groups
        by_key = {g[:3]: g for g in groups}
        for d in discarded:
            g = by_key.get(d[:3])
            if g is not None:
                d = UsageGroup(*d[:3], *(a + b for a, b in zip(g[3:], d[3:], strict=True)))
            by_key[d[:3]] = d
        return [by_key[key] for key in sorted(by_key)]

    async def _usage_groups(
        self,
        model: str,
        finished_at: str,
        counts: tuple[str, str],
        source: str,
        batch_id: str,
        period_s: int,
        tier_starts: Mapping[str, Sequence[int]] | None,
    ) -> list[UsageGroup]:
        """`usage_groups` of one table: `source` the FROM clause and its condition, naming the
        table `r`, `model` and `finished_at` its expressions, `counts` what counts results and
        discarded answers."""
        results, discarded = counts
        params: dict[str, Any] = {"b": batch_id, "p": period_s}
        tier, only = "0", ""
        if tier_starts:
            cases = []
            for i, (name, starts) in enumerate(sorted(tier_starts.items())):
                params[f"m{i}"] = name
                for k in range(len(starts), 0, -1):
                    params[f"s{i}_{k}"] = starts[k - 1]
                    cases.append(f" WHEN {model} = :m{i} AND r.prompt_tokens > :s{i}_{k} THEN {k}")
            tier = f"CASE{''.join(cases)} ELSE 0 END" if cases else "0"
            only = f" AND {model} IN ({', '.join(f':m{i}' for i in range(len(tier_starts)))})"
        period = (
            f"CAST({finished_at} / :p AS INTEGER)"
            if self.is_sqlite
            else f"CAST(FLOOR({finished_at} / :p) AS BIGINT)"
        )
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    f"SELECT {model}, {period}, {tier}, {results}, COUNT(r.prompt_tokens),"
                    " COALESCE(SUM(r.prompt_tokens), 0), COALESCE(SUM(r.cached_tokens), 0),"
                    " COALESCE(SUM(r.completion_tokens), 0),"
                    " COALESCE(SUM(r.reasoning_tokens), 0), COALESCE(SUM(r.total_tokens), 0),"
                    f" {discarded} FROM {source}{only} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                    params,
                )
            ).all()
        return [UsageGroup(str(r[0]), *(int(x) for x in r[1:])) for r in rows]

    async def bodies_without_usage(
        self, batch_id: str, after: int = 0, most: int = 1_000
    ) -> list[tuple[int, str]]:
        """(job id, request body) of up to `most` of the batch's results whose answer reported
        no usage, the job ids past `after`, in order."""
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT j.id, j.body FROM jobs j JOIN results r ON r.job_id = j.id"
                    " WHERE j.batch_id = :b AND j.state = 'succeeded' AND j.id > :after"
                    " AND r.prompt_tokens IS NULL ORDER BY j.id LIMIT :most",
                    {"b": batch_id, "after": after, "most": most},
                )
            ).all()
        return [(int(id_), str(body)) for id_, body in rows]

    async def error_counts(self, batch_id: str) -> list[tuple[str, int]]:
        """Failed jobs by error kind, most frequent first: every kind (a few dozen at most),
        so that they add up to the failed jobs."""
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT COALESCE(error_kind, 'unknown') AS k, COUNT(*) AS n FROM jobs"
                    " WHERE batch_id = :b AND state = 'failed' GROUP BY k ORDER BY n DESC, k",
                    {"b": batch_id},
                )
            ).all()
        return [(str(k), int(n)) for k, n in rows]

    async def attempt_error_counts(self, batch_id: str) -> list[tuple[str, int]]:
        """Every attempt that did not succeed, by kind: retries included."""
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT a.error_kind, COUNT(*) AS n"
                    " FROM jobs j JOIN attempts a ON a.job_id = j.id"
                    " WHERE j.batch_id = :b AND a.error_kind IS NOT NULL"
                    " GROUP BY a.error_kind ORDER BY n DESC, a.error_kind",
                    {"b": batch_id},
                )
            ).all()
        return [(str(k), int(n)) for k, n in rows]

    async def invalid_lines(self, batch_id: str) -> list[tuple[int, str]]:
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT line, reason FROM invalid_lines WHERE batch_id = :b ORDER BY line",
                    {"b": batch_id},
                )
            ).all()
        return [(int(line), str(reason)) for line, reason in rows]

    async def first_and_last_finish(self, batch_id: str) -> tuple[float | None, float | None]:
        async with self.reading() as conn:
            row = (
                await conn.execute(
                    "SELECT MIN(a.started_at), MAX(a.started_at + a.latency_ms / 1000.0)"
                    " FROM jobs j JOIN attempts a ON a.job_id = j.id WHERE j.batch_id = :b",
                    {"b": batch_id},
                )
            ).one()
        return row[0], row[1]

    async def attempts_of(self, job_id: int) -> list[AttemptRecord]:
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT job_id, status_code, error_kind, latency_ms, request_id, started_at"
                    " FROM attempts WHERE job_id = :j ORDER BY id",
                    {"j": job_id},
                )
            ).all()
        return [AttemptRecord(*r) for r in rows]

    # -- workers and leases -----------------------------------------------------------------

    async def register_worker(
        self, worker_id: str, batch_id: str, now: float, *, spare: Collection[str] = ()
    ) -> None:
        """Record this process as a worker of the batch, and release the leases of workers
        on this host whose process is gone, and of stopped workers anywhere (no need to wait
        for their leases to expire). Dead workers in `spare` keep theirs for now (another
        process is recording their answer journal)."""
        host = this_host()
        async with self._write() as conn:
            rows = (
                await conn.execute(
                    "SELECT id, pid FROM workers WHERE batch_id = :b AND host = :h"
                    " AND stopped_at IS NULL",
                    {"b": batch_id, "h": host},
                )
            ).all()
            dead = [wid for wid, pid in rows if wid not in spare and not pid_alive(int(pid))]
            # A worker marked stopped sends nothing more, wherever it ran; jobs it still holds
            # (its give-back failed) need not wait out their leases.
            stopped = (
                await conn.execute(
                    "SELECT DISTINCT lease_owner FROM jobs WHERE batch_id = :b"
                    " AND state = 'running' AND lease_owner IN (SELECT id FROM workers"
                    " WHERE batch_id = :b AND stopped_at IS NOT NULL)",
                    {"b": batch_id},
                )
            ).scalars()
            await _reap(conn, batch_id, [*dead, *stopped], now)
            await conn.execute(
                "INSERT INTO workers (id, batch_id, host, pid, started_at, heartbeat_at,"
                " sent, succeeded, failed, tokens)"
                " VALUES (:id, :b, :h, :pid, :now, :now, 0, 0, 0, 0)",
                {"id": worker_id, "b": batch_id, "h": host, "pid": os.getpid(), "now": now},
            )

    async def heartbeat(
        self,
        worker_id: str,
        batch_id: str,
        now: float,
        lease_s: float,
        *,
        sent: int,
        succeeded: int,
        failed: int,
        tokens: int,
        paused_until: float | None,
        recent_requests_per_s: float | None = None,
        recent_tokens_per_s: float | None = None,
    ) -> None:
        """Extend the leases of every job this worker holds and refresh its heartbeat, its
        counters and its pace since the heartbeat before (None: not known yet)."""
        async with self._write() as conn:
            await conn.execute(
                "UPDATE jobs SET lease_expires_at = :exp WHERE batch_id = :b"
                " AND state = 'running' AND lease_owner = :w",
                {"exp": now + lease_s, "b": batch_id, "w": worker_id},
            )
            await conn.execute(
                "UPDATE workers SET heartbeat_at = :now, sent = :sent, succeeded = :ok,"
                " failed = :failed, tokens = :tokens, paused_until = :paused,"
                " recent_requests_per_s = :rps, recent_tokens_per_s = :tps WHERE id = :w",
                {
                    "now": now,
                    "sent": sent,
                    "ok": succeeded,
                    "failed": failed,
                    "tokens": tokens,
                    "paused": paused_until,
                    "rps": recent_requests_per_s,
                    "tps": recent_tokens_per_s,
                    "w": worker_id,
                },
            )

    async def stop_worker(self, worker_id: str, now: float) -> None:
        async with self._write() as conn:
            await conn.execute(
                "UPDATE workers SET stopped_at = :now WHERE id = :w",
                {"now": now, "w": worker_id},
            )

    async def live_workers(self, batch_id: str, now: float) -> list[WorkerInfo]:
        """The batch's workers that have not stopped and beat within WORKER_STALE_S, but for
        those of this machine whose process is gone (killed: status showed a dead run's pace
        and an ETA for a minute)."""
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT id, host, pid, started_at, heartbeat_at, stopped_at, paused_until,"
                    " sent, succeeded, failed, tokens, recent_requests_per_s, recent_tokens_per_s"
                    " FROM workers WHERE batch_id = :b"
                    " AND stopped_at IS NULL AND heartbeat_at >= :since ORDER BY started_at",
                    {"b": batch_id, "since": now - WORKER_STALE_S},
                )
            ).all()
        host = this_host()
        workers = [WorkerInfo(*r) for r in rows]
        return [w for w in workers if w.host != host or pid_alive(w.pid)]

    async def worker_spans(self, batch_id: str) -> list[tuple[float, float]]:
        """When each of the batch's workers ran: from its start to its stop, or to its last
        heartbeat when it has not stopped (still running, or killed)."""
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT started_at, COALESCE(stopped_at, heartbeat_at) FROM workers"
                    " WHERE batch_id = :b",
                    {"b": batch_id},
                )
            ).all()
        return [(start, end) for start, end in rows]

    async def coordination_view(
        self, batch_id: str, *, since: float, host: str
    ) -> CoordinationView:
        """The batch's workers not marked stopped whose heartbeat is at or after `since`, and
        those on `host` whatever their heartbeat (their process can be looked at); and whether
        the batch has been cancelled.

        The one read a worker's coordinator makes every second: a handful of rows.
        """
        async with self.reading() as conn:
            rows = (
                await conn.execute(
                    "SELECT id, host, pid, started_at, heartbeat_at, stopped_at, paused_until,"
                    " sent, succeeded, failed, tokens, recent_requests_per_s, recent_tokens_per_s,"
                    " spent_usd, reserved_usd FROM workers WHERE batch_id = :b"
                    " AND stopped_at IS NULL AND (heartbeat_at >= :since OR host = :h)"
                    " ORDER BY started_at",
                    {"b": batch_id, "since": since, "h": host},
                )
            ).all()
            cancelled_at = (
                await conn.execute(
                    "SELECT cancelled_at FROM batches WHERE id = :b", {"b": batch_id}
                )
            ).scalar()
        return CoordinationView([WorkerInfo(*r) for r in rows], cancelled_at is not None)

    async def reap_workers(self, batch_id: str, worker_ids: Sequence[str], now: float) -> int:
        """Mark workers known to be dead as stopped and make their jobs claimable at once.

        Returns how many running jobs they held. Only for workers whose process is known to be
        gone: a live worker's late answers would be fenced, but its requests sent again.
        """
        if not worker_ids:
            return 0
        async with self._write() as conn:
            return await _reap(conn, batch_id, worker_ids, now)

    async def publish_pause(self, worker_id: str, paused_until: float | None) -> None:
        """Tell the batch's other workers that the server asked this one to wait until then."""
        async with self._write() as conn:
            await conn.execute(
                "UPDATE workers SET paused_until = :p WHERE id = :w",
                {"p": paused_until, "w": worker_id},
            )

    async def publish_spending(self, worker_id: str, spent_usd: float, reserved_usd: float) -> None:
        """Tell the batch's other workers what this one spent of a --max-cost cap since it
        started, and holds reserved."""
        async with self._write() as conn:
            await conn.execute(
                "UPDATE workers SET spent_usd = :s, reserved_usd = :r WHERE id = :w",
                {"s": spent_usd, "r": reserved_usd, "w": worker_id},
            )

    async def claim(
        self,
        batch_id: str,
        worker_id: str,
        token: str,
        limit: int,
        now: float,
        lease_s: float,
        *,
        after: int = 0,
        expire_leases: bool = True,
    ) -> list[ClaimedJob]:
        """Take up to `limit` pending jobs whose id is above `after`, in line order; with
        `expire_leases`, jobs whose lease has expired are made pending first.

        On PostgreSQL every claim and every end leaves the job's old row version behind, and
        its entry in `ix_jobs_claim` with it, until a vacuum: a claim from the batch's first
        line walks past one dead entry per job claimed before, and so does the search for
        expired leases among the running. 40 % into a million-job run they took 16 and 10 ms
        (0.5 ms at the start), and the run had slowed from 7,800 to 6,100 requests/s. So the
        dispatcher claims on from where its last claim ended (`after`), and looks for expired
        leases and from the first line only now and then (dispatcher.LOOK_BACK_S).
        """
        params = {
            "batch": batch_id,
            "owner": worker_id,
            "token": token,
            "expires": now + lease_s,
            "now": now,
            "limit": limit,
            "after": after,
        }
        rows: Iterable[Sequence[Any]]
        if self.is_sqlite:

            def claim(conn: sqlite3.Connection) -> list[Any]:
                if expire_leases:
                    conn.execute(_EXPIRE_LEASES_SQL, {"batch": batch_id, "now": now})
                return conn.execute(_CLAIM_SQLITE, params).fetchall()

            rows = await self._sqlite.transaction(claim)
        else:
            async with self._write() as conn:
                if expire_leases:
                    await conn.execute(_EXPIRE_LEASES_SQL, {"batch": batch_id, "now": now})
                rows = (await conn.execute(_CLAIM_POSTGRES, params)).all()
        # Columns by position, in _CLAIM_COLUMNS order: hundreds of rows per claim.
        jobs = [
            ClaimedJob(
                id=job_id,
                custom_id=custom_id,
                line=line,
                endpoint=endpoint,
                body=body,
                model=model,
                stream=bool(stream),
                est_tokens=est_tokens,
                attempts=attempts,
                lease_token=token,
            )
            for job_id, custom_id, line, endpoint, body, model, stream, est_tokens, attempts in rows
        ]
        jobs.sort(key=_ID)
        return jobs

    async def release(
        self, worker_id: str, jobs: Iterable[tuple[int, str]], not_before: float | None = None
    ) -> int:
        """Give jobs back as pending (a stopped run); only those whose lease we still hold."""
        params = [
            {"id": job_id, "token": token, "w": worker_id, "nb": not_before, "now": time.time()}
            for job_id, token in jobs
        ]
        if not params:
            return 0
        async with self._write() as conn:
            return await conn.executemany(
                f"{_GIVE_BACK}, not_before = :nb"
                " WHERE id = :id AND lease_token = :token AND lease_owner = :w"
                " AND state = 'running'",
                params,
            )

    async def logged_by(self, worker_id: str, attempts: Sequence[AttemptRecord]) -> set[int]:
        """The jobs of `attempts` whose attempt (known by its start) `worker_id` has logged
        already: a record that committed and whose answer the connection lost wrote it."""
        if not attempts:
            return set()
        ids = sorted({a.job_id for a in attempts})
        logged: set[tuple[int, float]] = set()
        async with self.reading() as conn:
            for lo in range(0, len(ids), _IDS_PER_STATEMENT):
                params: dict[str, Any] = {"w": worker_id}
                among = _in_list(ids[lo : lo + _IDS_PER_STATEMENT], params)
                sql = (
                    "SELECT job_id, started_at FROM attempts"
                    f" WHERE worker_id = :w AND job_id IN {among}"
                )
                rows = (await conn.execute(sql, params)).all()
                logged.update((int(job_id), float(started_at)) for job_id, started_at in rows)
        return {a.job_id for a in attempts if (a.job_id, a.started_at) in logged}

    async def keep_paid_for(
        self, batch_id: str, late: Sequence[tuple[Ended, Sequence[AttemptRecord]]]
    ) -> None:
        """Keep what late answers used, apart from a record: ends the database refused (the
        job was cancelled, or another worker took it over) whose answers were paid for all
        the same (`discarded_answers`, as answers tried again are kept). Each end comes with
        the attempts that led to it; an answer without usage is left out (what it used is
        not known)."""
        rows = _discarded_rows(batch_id, _paid_answers(late))
        if not rows:
            return
        if self.is_sqlite:
            await self._sqlite.transaction(
                lambda conn: conn.executemany(_INSERT_DISCARDED_SQL, rows)
            )
        else:
            async with self._write() as conn:
                await conn.executemany(_INSERT_DISCARDED_SQL, rows)

    async def release_all(self, worker_id: str, batch_id: str) -> int:
        """Give back every job this worker still holds: at the end of a run it holds none
        legitimately, whatever was interrupted on the way (a claim cut short, a write that
        failed)."""
        async with self._write() as conn:
            result = await conn.execute(
                _GIVE_BACK_WORKER_SQL, {"b": batch_id, "w": worker_id, "now": time.time()}
            )
        return max(result.rowcount, 0)

    async def record(
        self,
        batch_id: str,
        worker_id: str,
        ended: Sequence[Ended],
        attempts: Sequence[AttemptRecord],
        now: float,
    ) -> RecordOutcome:
        """Write ended jobs and the attempts log in one transaction.

        A row is recorded only while the job is still running under the same lease token;
        a late answer from a worker whose lease passed to another changes nothing.
        """
        discarded = _discarded_rows(batch_id, attempts)
        if self.is_sqlite:
            fenced = await self._record_sqlite(batch_id, worker_id, ended, attempts, now, discarded)
        else:
            if discarded:
                # Apart from the record's statement, which every record runs: these are rare.
                # Before it, so that a record that fails is retried with them, and a crash in
                # between leaves its ends to the journal, which writes them again (skipped).
                # An answer paid for is kept whatever became of the lease.
                async with self._write() as conn:
                    await conn.executemany(_INSERT_DISCARDED_SQL, discarded)
            fenced = await self._pg.record(
                _RECORD_PG, _record_params(batch_id, worker_id, ended, attempts, now)
            )
        fenced_ids = frozenset(fenced or ())
        return RecordOutcome(
            recorded=len(ended) - len(fenced_ids), fenced=len(fenced_ids), fenced_ids=fenced_ids
        )

    async def _record_sqlite(
        self,
        batch_id: str,
        worker_id: str,
        ended: Sequence[Ended],
        attempts: Sequence[AttemptRecord],
        now: float,
        discarded: Sequence[_NamedParams] = (),
    ) -> list[int]:
        """`record` on SQLite; returns the fenced jobs.

        A statement per kind of row for all the ends at once, which says how many it changed,
        not which: when some were fenced (rarely), the transaction is undone and written again
        end by end.
        """
        results, ends, log = _record_rows(batch_id, worker_id, ended, attempts, now)

        def write(conn: sqlite3.Connection) -> list[int]:
            # Results first: the insert checks the lease while the job is still `running`.
            if results:
                conn.executemany(_INSERT_RESULT_SQL, results)
            if ends and conn.executemany(_END_JOB_SQL, ends).rowcount < len(ends):
                raise _SomeFenced()
            if log:
                conn.executemany(_INSERT_ATTEMPT_SQL, log)
            if discarded:
                conn.executemany(_INSERT_DISCARDED_SQL, discarded)
            return []

        def write_each(conn: sqlite3.Connection) -> list[int]:
            result_of = {row[_RESULT_JOB_ID]: row for row in results}
            fenced = []
            for end in ends:
                job_id = end[_END_JOB_ID]
                if job_id in result_of:
                    conn.execute(_INSERT_RESULT_SQL, result_of[job_id])
                if conn.execute(_END_JOB_SQL, end).rowcount == 0:
                    fenced.append(job_id)
            if log:
                conn.executemany(_INSERT_ATTEMPT_SQL, log)
            if discarded:
                conn.executemany(_INSERT_DISCARDED_SQL, discarded)
            return fenced

        try:
            return await self._sqlite.transaction(write)
        except _SomeFenced:
            return await self._sqlite.transaction(write_each)

    async def record_kept(
        self,
        batch_id: str,
        worker_id: str,
        entries: Sequence[tuple[Ended, Sequence[AttemptRecord]]],
        now: float,
    ) -> int:
        """Record the ends that a dead run of `worker_id` kept in its answer journal
        (journal.py), with the attempts that led to them; returns how many were recorded.

        Only jobs of the batch that have not ended since. They are first taken back under a
        lease token of their own, from whichever worker holds them now (its answer, or a
        statement of the dead run still queued at the server, is then fenced: each job is
        recorded once, whoever sent it), then recorded as `record` does. Attempts that the
        dead run logged already, before or after this, are logged once: attempts are unique by
        job and start time.
        """
        first: dict[int, tuple[Ended, Sequence[AttemptRecord]]] = {}
        for end, attempts in entries:
            first.setdefault(end.job_id, (end, attempts))
        token = f"{worker_id}.kept.{uuid.uuid4().hex[:12]}"
        taken: list[int] = []
        ids = list(first)
        async with self._write() as conn:
            for lo in range(0, len(ids), _IDS_PER_STATEMENT):
                chunk = ids[lo : lo + _IDS_PER_STATEMENT]
                params: dict[str, Any] = {
                    "b": batch_id,
                    # Not the dead worker's own id: releasing its jobs (`reap_workers`) must
                    # not give these back before they are recorded.
                    "w": f"{worker_id}.kept",
                    "t": token,
                    "exp": now + KEPT_LEASE_S,
                    "now": now,
                }
                among = _in_list(chunk, params)
                taken.extend((await conn.execute(_TAKE_BACK.format(ids=among), params)).scalars())
        await self._keep_late(batch_id, worker_id, [first[j] for j in set(first) - set(taken)])
        if not taken:
            return 0
        taken.sort()
        ended = [replace(first[job_id][0], lease_token=token) for job_id in taken]
        attempts = [a for job_id in taken for a in first[job_id][1]]
        return (await self.record(batch_id, worker_id, ended, attempts, now)).recorded

    async def _keep_late(
        self,
        batch_id: str,
        worker_id: str,
        late: Sequence[tuple[Ended, Sequence[AttemptRecord]]],
    ) -> None:
        """`keep_paid_for` for kept ends whose jobs ended since they were kept: those the dead
        run had not recorded itself (its record logs the answer's attempt with the end)."""
        answers = _paid_answers(late)
        if not answers:
            return
        ours = await self.logged_by(worker_id, answers)
        await self.keep_paid_for(batch_id, [entry for entry in late if entry[0].job_id not in ours])

    # -- batch-wide changes -----------------------------------------------------------------

    async def retry_failed(self, batch_id: str) -> int:
        """Failed jobs back to pending; their attempts stay in the log. A cancelled batch
        stays cancelled: cancel is for good."""
        await self.get_batch(batch_id)
        async with self._write() as conn:
            # In the transaction that puts the jobs back, and holding the batch's row as
            # `cancel` does: checked before it, a cancel committed in between left a
            # cancelled batch with pending jobs that nothing would ever run.
            batch_row = (await conn.execute(self._batch_row_for_update, {"b": batch_id})).one()
            if batch_row[0] is not None:  # (cancelled_at)
                raise UsageError(cancelled_for_good(batch_id))
            result = await conn.execute(
                "UPDATE jobs SET state = 'pending', attempts = 0, error_kind = NULL,"
                " last_status = NULL, last_error = NULL, finished_at = NULL,"
                " not_before = NULL, updated_at = :now"
                " WHERE batch_id = :b AND state = 'failed'",
                {"b": batch_id, "now": time.time()},
            )
        return max(result.rowcount, 0)

    async def cancel(self, batch_id: str) -> int:
        """Every unfinished job of the batch to cancelled, for good. A batch whose every job
        has ended is left as it is: there is nothing to stop, and marked cancelled it could
        not have its failed jobs retried (a cancel racing a run's last answer did that)."""
        await self.get_batch(batch_id)
        now = time.time()
        async with self._write() as conn:
            await conn.execute(self._batch_row_for_update, {"b": batch_id})  # (see retry_failed)
            result = await conn.execute(
                "UPDATE jobs SET state = 'cancelled', lease_owner = NULL, lease_token = NULL,"
                " lease_expires_at = NULL, finished_at = :now, updated_at = :now"
                " WHERE batch_id = :b AND state IN ('pending', 'running')",
                {"b": batch_id, "now": now},
            )
            cancelled = max(result.rowcount, 0)
            if cancelled:
                await conn.execute(
                    "UPDATE batches SET cancelled_at = :now WHERE id = :b",
                    {"b": batch_id, "now": now},
                )
        return cancelled

    # -- export -----------------------------------------------------------------------------

    async def export_span(self, batch_id: str) -> tuple[int, int] | None:
        """The first and last job id of the batch (None when it has no jobs): export pages
        cover ids in (first - 1, last], whatever state the jobs are in when a page is read."""
        async with self.reading() as conn:
            ends = (await conn.execute(_BATCH_ID_SPAN, {"b": batch_id})).one()
        if all(end is None for end in ends):
            return None
        return (
            min(end for end in ends if end is not None),
            max(end for end in ends if end is not None),
        )

    async def ids_per_page(
        self, batch_id: str, span: tuple[int, int], most: int, *, bodies: bool = False
    ) -> int:
        """How many job ids a page of the batch's export (or, with `bodies`, of its request
        bodies) should span: `most`, or fewer where pages of `most` would hold much more than
        PAGE_CHARS characters of answers (or of bodies). The answers with logprobs of long
        completions run to hundreds of kB each, bodies with images to megabytes: pages of
        thousands held gigabytes. Measured on up to PAGE_SAMPLE_JOBS jobs spread over `span`;
        for answers, on the ended ones among them, as if every job of a page had ended: the
        jobs of a batch part way through its run end in id order, the first pages full and the
        rest empty (pages sized by every job's average held many times PAGE_CHARS).
        """
        first, last = span
        step = max(1, (last - first + 1) // PAGE_SAMPLE_JOBS)
        ids = range(first, last + 1, step)[:PAGE_SAMPLE_JOBS]
        size = "length" if self.is_sqlite else "octet_length"
        chars = (
            f"{size}(j.body)"
            if bodies
            else f"COALESCE({size}(r.response), 0) + COALESCE({size}(j.last_error), 0)"
        )
        params: dict[str, Any] = {}
        # Looked up by id alone, the batch picked out here: a condition on the batch let the
        # planners go through ix_jobs_claim and read every job of the batch (SQLite always,
        # PostgreSQL before its statistics knew the batch).
        sql = (
            f"SELECT j.batch_id, j.state, {chars} FROM jobs j"
            f"{'' if bodies else ' LEFT JOIN results r ON r.job_id = j.id'}"
            f" WHERE j.id IN {_in_list(ids, params)}"
        )
        async with self.reading() as conn:
            rows = (await conn.execute(sql, params)).all()
            # (A cancelled job without an answer is no answer, as a pending one is not.)
            sizes = [
                int(n or 0)
                for batch, state, n in rows
                if batch == batch_id and (bodies or state in _ANSWERED_STATES or n)
            ]
            if not sizes and not bodies:
                # None of the sample has ended: the first answers there are.
                sql = (
                    f"SELECT {size}(response) FROM results"
                    " WHERE job_id >= :first AND job_id <= :last ORDER BY job_id LIMIT :n"
                )
                found = await conn.execute(
                    sql, {"first": first, "last": last, "n": PAGE_SAMPLE_JOBS}
                )
                sizes = [int(n or 0) for (n,) in found.all()]
        total = sum(sizes)
        if not total:
            return most
        return max(1, min(most, int(PAGE_CHARS * len(sizes) / total)))

    async def export_page(
        self, batch_id: str, lo: int, hi: int, *, failed_only: bool = False
    ) -> list[ExportRow]:
        """The batch's ended jobs (failed only, with `failed_only`) with ids in (lo, hi], in id
        order, with their results."""
        sqlite = self.is_sqlite
        sql = export_page_sql(sqlite, FAILED_ONLY if failed_only else ENDED_STATES)
        # One statement, so no transaction is begun: the statement's own snapshot is the
        # page's, as it was inside a read transaction of one query.
        rows: Sequence[Any]
        if sqlite:
            rows = await self._sqlite.fetch(sql, {"b": batch_id, "lo": lo, "hi": hi})
        else:
            # asyncpg's own placeholders; :b, :lo and :hi are $1, $2 and $3.
            sql = sql.replace(":b", "$1").replace(":lo", "$2").replace(":hi", "$3")
            rows = await self._pg.fetch(sql, batch_id, lo, hi)
        make = ExportRow._make
        return [make(r) for r in rows]

    async def iter_export_rows(
        self, batch_id: str, *, failed_only: bool = False, chunk_rows: int = 2_000
    ) -> AsyncIterator[ExportRow]:
        """Ended jobs of a batch in line order, with their results; memory stays flat."""
        async for page in self.iter_export_pages(
            batch_id, failed_only=failed_only, chunk_rows=chunk_rows
        ):
            for row in page:
                yield row

    async def iter_export_pages(
        self, batch_id: str, *, failed_only: bool = False, chunk_rows: int = 2_000
    ) -> AsyncIterator[list[ExportRow]]:
        """`iter_export_rows` a page at a time (a page may be empty), for callers that handle
        each row in a few microseconds and would spend as much again resuming a generator.

        Pages by ranges of `chunk_rows` ids (fewer where the answers are long: `ids_per_page`)
        between the batch's first and last job rather than holding one cursor open, so that a
        long export never holds a read transaction (SQLite's WAL could not be checkpointed
        behind it). A range, unlike `id > :after LIMIT n`, bounds
        every page's work whatever plan the database picks; the next page is read while the
        caller works through the current one.
        """
        span = await self.export_span(batch_id)
        if span is None:
            return
        ranges = export_page_ranges(span, await self.ids_per_page(batch_id, span, chunk_rows))

        def page(ids: tuple[int, int] | None) -> asyncio.Future[list[ExportRow]] | None:
            if ids is None:
                return None
            lo, hi = ids
            return asyncio.ensure_future(
                self.export_page(batch_id, lo, hi, failed_only=failed_only)
            )

        reading = page(next(ranges, None))
        try:
            while reading is not None:
                rows = await reading
                reading = page(next(ranges, None))
                yield rows
        finally:
            if reading is not None and not reading.done():
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading


def export_page_ranges(span: tuple[int, int], rows: int) -> Iterator[tuple[int, int]]:
    """The pages of `JobStore.export_page` for a batch's `export_span`: ids in (lo, hi], `rows`
    ids a page."""
    first, last = span
    for lo in range(first - 1, last, rows):
        yield lo, min(lo + rows, last)


# The first and last job id of each state: one index seek each on ix_jobs_claim, where a plain
# MIN(id), MAX(id) over the batch reads all its index entries (0.5 s a million on SQLite).
# Each end a seek in ix_jobs_claim. As MIN(id) / MAX(id) of `state = ...`, PostgreSQL
# without statistics of a new batch read all its pending entries (0.65 s for a million), and
# with them could walk the primary key from the table's first job (see _CLAIM_POSTGRES).
_BATCH_ID_SPAN = "SELECT " + ", ".join(
    f"(SELECT id FROM jobs WHERE batch_id = :b AND state >= '{state.value}'"
    f" AND state <= '{state.value}' ORDER BY state{order}, id{order} LIMIT 1)"
    for state in JobState
    for order in ("", " DESC")
)


class BatchLoader:
    """Inserts a batch's jobs inside the transaction `JobStore.loading` opened."""

    #: A `NewJob` is these columns, in order.
    _JOB_COLUMNS = NewJob._fields
    #: The columns every job of a batch starts with the same value in.
    _COMMON_COLUMNS = ("batch_id", "method", "state", "attempts", "created_at", "updated_at")

    def __init__(self, conn: Connection, batch_id: str, *, sqlite: bool) -> None:
        self._conn = conn
        self._batch_id = batch_id
        self._now = time.time()
        self.jobs = 0
        self.invalid = 0
        #: Every key of the jobs' metadata, sorted; None: not known (the export reads them).
        self.meta_keys: list[str] | None = None
        # add_jobs may run as a task beside add_invalid (and beside itself): one statement at a
        # time on PostgreSQL's connection, which asyncpg refuses to run two at once. SQLite's
        # statements queue on its writer's thread, in the order given.
        self._lock = asyncio.Lock()
        self._common = (batch_id, "POST", JobState.PENDING.value, 0, self._now, self._now)
        self._sqlite = sqlite
        # SQLite: statements of many rows, which SQLite runs in one step with the GIL released,
        # so that parsing goes on beside it. An INSERT per row (executemany) takes the GIL
        # back for every row and, with the parser holding it, waits for it each time.
        self._rows_per_insert = _SQLITE_MAX_PARAMS // len(self._JOB_COLUMNS)
        self._inserts: dict[int, str] = {}

    def _insert_sql(self, rows: int) -> str:
        """SQLite: an INSERT of `rows` jobs. The values every row shares go in as literals:
        binding them row by row cost more than a third of the insert."""
        sql = self._inserts.get(rows)
        if sql is None:
            columns = ", ".join(self._JOB_COLUMNS + self._COMMON_COLUMNS)
            marks = ", ".join("?" * len(self._JOB_COLUMNS))
            common = ", ".join(_sql_literal(v) for v in self._common)
            values = ", ".join([f"({marks}, {common})"] * rows)
            sql = self._inserts[rows] = f"INSERT INTO jobs ({columns}) VALUES {values}"
        return sql

    async def add_jobs(self, jobs: Sequence[JobRow]) -> None:
        if not jobs:
            return
        try:
            if not self._sqlite:
                async with self._lock:
                    await self._copy(jobs)
            else:
                # Equal parts, so that a chunk of jobs is one or two statements to prepare.
                parts = -(-len(jobs) // self._rows_per_insert)
                size = -(-len(jobs) // parts)
                # Handed to the writer's thread all at once: it runs them back to back, in
                # order, without waiting for a turn of this event loop between them.
                done = await asyncio.gather(
                    *(
                        self._conn.execute(
                            self._insert_sql(len(part)), tuple(itertools.chain.from_iterable(part))
                        )
                        for start in range(0, len(jobs), size)
                        for part in (jobs[start : start + size],)
                    ),
                    return_exceptions=True,  # every part's, so that none is left unread
                )
                for outcome in done:
                    if isinstance(outcome, BaseException):
                        raise outcome
        except ConstraintViolation as exc:
            if _violates(exc, *_CUSTOM_ID_KEYS):
                raise DuplicateCustomId() from exc
            raise
        self.jobs += len(jobs)

    async def _copy(self, jobs: Sequence[JobRow]) -> None:
        """PostgreSQL: COPY through asyncpg, several times faster than an INSERT per row."""
        common = self._common
        await self._copy_rows(
            "jobs", [(*job, *common) for job in jobs], self._JOB_COLUMNS + self._COMMON_COLUMNS
        )

    async def _copy_rows(
        self, table: str, records: Sequence[tuple[Any, ...]], columns: Sequence[str]
    ) -> None:
        # PostgreSQL's connection (postgres._PgConnection) copies; SQLite's never gets here.
        copy = self._conn.copy_records  # type: ignore[attr-defined]
        await copy(table, records, columns)

    async def add_invalid(self, lines: Sequence[tuple[int, str]]) -> None:
        if not lines:
            return
        rows = [(self._batch_id, n, reason) for n, reason in lines]
        async with self._lock:
            if self._sqlite:
                await self._conn.executemany(
                    "INSERT INTO invalid_lines (batch_id, line, reason) VALUES (?, ?, ?)", rows
                )
            else:
                # A file of many bad lines: COPY, where asyncpg's executemany gives no count
                # and the store's runs a statement per row.
                await self._copy_rows("invalid_lines", rows, ("batch_id", "line", "reason"))
        self.invalid += len(lines)

    async def finish(self) -> None:
        async with self._lock:
            keys = None if self.meta_keys is None else orjson.dumps(self.meta_keys).decode()
            await self._conn.execute(
                "UPDATE batches SET total_jobs = :n, invalid_lines = :bad, meta_keys = :keys"
                " WHERE id = :b",
                {"n": self.jobs, "bad": self.invalid, "keys": keys, "b": self._batch_id},
            )


#: Parameters one SQLite statement may have (SQLITE_MAX_VARIABLE_NUMBER; 999 before 3.32).
_SQLITE_MAX_PARAMS = 32_766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


def _sql_literal(value: str | float) -> str:
    """A SQL literal for a text or number: floats by repr, which reads back to the same
    double; text quoted with its quotes doubled."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


_Params = tuple[Any, ...]
_NamedParams = dict[str, Any]
#: An end's job id.
_JOB_ID = attrgetter("job_id")
#: A claimed job's id.
_ID = attrgetter("id")


def _text(value: str | None) -> str | None:
    """Text as both databases keep it. PostgreSQL's text cannot hold a NUL character: one
    answer carrying it (an error body, a completion's `model` written with `\\u0000`) would
    fail every write of the run, and of every run after it. It becomes U+FFFD, as bytes that
    are not UTF-8 do when an answer is decoded."""
    if value is None or "\x00" not in value:
        return value
    return value.replace("\x00", "\ufffd")


def _name(value: str | None, width: int) -> str | None:
    """A name from an answer (a request id, a model) as its column holds it: `_text`, cut to
    `width` characters. PostgreSQL refuses a longer value, which would fail every record of the
    run; the completion itself keeps the model whole."""
    value = _text(value)
    if value is None or len(value) <= width:
        return value
    return value[:width]


def _result_columns(e: Ended) -> _Params:
    """A result's columns from `request_id` to `latency_ms`, as both databases write them."""
    return (
        _name(e.request_id, REQUEST_ID_CHARS),
        _name(e.model, MODEL_CHARS),
        e.prompt_tokens,
        e.completion_tokens,
        e.cached_tokens,
        e.reasoning_tokens,
        e.total_tokens,
        e.schema_valid,
        e.latency_ms,
    )


def _attempt_columns(a: AttemptRecord) -> _Params:
    """An attempt's columns from `status_code` to `started_at`, as both databases write them."""
    return (
        a.status_code,
        a.error_kind,
        a.latency_ms,
        _name(a.request_id, REQUEST_ID_CHARS),
        a.started_at,
    )


_ANSWERED_STATES: Final = frozenset({JobState.SUCCEEDED.value, JobState.FAILED.value})


def _paid_answers(late: Sequence[tuple[Ended, Sequence[AttemptRecord]]]) -> list[AttemptRecord]:
    """The attempts that brought the answers of succeeded ends (the last without an error),
    each with what its answer used (`spent`); none for an answer without usage."""
    paid = []
    for end, attempts in late:
        if end.state is not JobState.SUCCEEDED or end.total_tokens is None:
            continue
        answer = next((a for a in reversed(attempts) if a.error_kind is None), None)
        if answer is None:
            continue
        spent = (
            end.model,
            end.prompt_tokens or 0,
            end.cached_tokens or 0,
            end.completion_tokens or 0,
            end.reasoning_tokens or 0,
            end.total_tokens,
        )
        paid.append(replace(answer, spent=spent))
    return paid


def _discarded_rows(batch_id: str, attempts: Sequence[AttemptRecord]) -> list[_NamedParams]:
    """`_INSERT_DISCARDED_SQL`'s parameters: the answers of `attempts` paid for and not kept."""
    rows: list[_NamedParams] = []
    for a in attempts:
        if a.spent is not None:
            model, prompt, cached, completion, reasoning, total = a.spent
            rows.append(
                {
                    "j": a.job_id,
                    "s": a.started_at,
                    "b": batch_id,
                    "m": _name(model, MODEL_CHARS),
                    "p": prompt,
                    "c": cached,
                    "o": completion,
                    "r": reasoning,
                    "t": total,
                }
            )
    return rows


def _record_rows(
    batch_id: str,
    worker_id: str,
    ended: Sequence[Ended],
    attempts: Sequence[AttemptRecord],
    now: float,
) -> tuple[list[_Params], list[_Params], list[_Params]]:
    """The parameters of `record`'s three statements, in their order: results, ends, log."""
    succeeded = JobState.SUCCEEDED
    results = [
        # The response is valid JSON, which holds a NUL only as an escape.
        (e.status_code, e.response, *_result_columns(e), e.attempts, now, e.job_id, e.lease_token)
        for e in ended
        if e.state is succeeded
    ]
    ends = [
        (
            e.state._value_,  # (.value is a property: two calls of Python per row)
            e.attempts,
            e.error_kind,
            e.status_code,
            _text(e.error),
            now,
            e.job_id,
            e.lease_token,
        )
        for e in ended
    ]
    log = [(a.job_id, batch_id, worker_id, *_attempt_columns(a)) for a in attempts]
    return results, ends, log


def _record_params(
    batch_id: str,
    worker_id: str,
    ended: Sequence[Ended],
    attempts: Sequence[AttemptRecord],
    now: float,
) -> _Params:
    """`_RECORD_PG`'s parameters: the ends in job id order (see there)."""
    ends: list[_Params] = []
    errors: list[str | None] = []
    results: list[_Params] = []
    responses: list[str | None] = []
    succeeded = JobState.SUCCEEDED
    for e in sorted(ended, key=_JOB_ID):
        ends.append(
            (e.job_id, e.lease_token, e.state._value_, e.attempts, e.error_kind, e.status_code)
        )
        errors.append(_text(e.error))
        if e.state is succeeded:
            results.append((e.job_id, e.status_code, *_result_columns(e)))
            responses.append(e.response)
    log = [(a.job_id, *_attempt_columns(a)) for a in attempts]
    return (
        _json(ends),
        errors,
        now,
        _json(results),
        responses,
        batch_id,
        worker_id,
        _json(log),
    )


def _json(rows: list[_Params]) -> str:
    return orjson.dumps(rows).decode()


async def _reap(conn: Connection, batch_id: str, worker_ids: Sequence[str], now: float) -> int:
    """These workers' running jobs back to pending, and the workers marked stopped (those not
    marked yet)."""
    released = 0
    for wid in worker_ids:
        result = await conn.execute(_GIVE_BACK_WORKER_SQL, {"b": batch_id, "w": wid, "now": now})
        released += max(result.rowcount, 0)
        await conn.execute(
            "UPDATE workers SET stopped_at = :now WHERE id = :w AND stopped_at IS NULL",
            {"now": now, "w": wid},
        )
    return released


#: The kernel's id of this boot (Linux): machines cloned from one image share a host name.
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def this_host() -> str:
    """The name workers of this machine register under: its host name, and where the system
    says so, the first part of the id of its boot (`host (97e70539)`). Workers of one host
    name are taken for this machine's, whose processes can be looked up, and their jobs given
    back when the process is gone: two machines cloned from one image, names and all, would
    each take the other's live workers for dead."""
    host = socket.gethostname()
    try:
        boot = _BOOT_ID_FILE.read_text(encoding="ascii").strip()[:8]
    except (OSError, UnicodeDecodeError):
        return host
    return f"{host} ({boot})" if boot else host


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts). One killed
    and not yet waited for by its parent (a zombie: a script that starts several runs and
    waits for them at the end) is dead: counted alive, its jobs waited out their whole lease
    instead of coming back within a second."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether /proc says the process has ended and waits to be reaped (False without /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state follows the command's name, in parentheses that may hold anything.
    end = stat.rfind(b")")
    return stat[end + 2 : end + 3] in (b"Z", b"X")
