"""The store's PostgreSQL connections (postgres.py): URLs read as SQLAlchemy reads them, named
parameters made positional, connections that die while kept, errors, no SQLAlchemy for a
database at head, and pgbouncer in transaction mode."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]  # no type stubs
import orjson
import pytest
from sqlalchemy.engine import make_url

from batchrunner import db
from batchrunner.database import driver_words
from batchrunner.errors import ConstraintViolation, StoreError, UsageError
from batchrunner.export import _JOB_REQUESTS_POSTGRES
from batchrunner.exportrows import export_page_sql
from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.postgres import PgDatabase, PgUrl, positional
from batchrunner.states import JobState
from batchrunner.store import _BATCH_ID_SPAN, _CLAIM_POSTGRES, BatchInfo, JobStore
from tests.conftest import batch_without_importing, chat, failed

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
        ("postgresql://u:hunter2@h:port/d", "the port is not a number"),
        ("postgresql://u:hunter2@h/d?statement_cache_size=off", "a whole number"),
        # A password that is not percent-encoded: its start was quoted as a port, or (after
        # a '#') asyncpg's traceback quoted it.
        ("postgresql://u:hun/ter2@h/d", "must be percent-encoded (%2F"),
        ("postgresql://u:hun?ter2@h/d", "must be percent-encoded"),
        # ... also where what comes before it reads as a host and port.
        ("postgresql://u:8080?hunter2@h:5432/d", "an '@' after the host"),
        ("postgresql://u:2024/hunter2@h:5432/d", "an '@' after the host"),
        ("postgresql://u:hun#ter2@h/d", "holds no '#'"),
        ("postgresql://u:hun@ter2@h/d", "an '@' in the user or password"),
        ("postgresql://u@h:x/d?password=hunter2", "the port is not a number"),
    ],
)
def test_urls_it_cannot_open_are_refused_without_their_password(url: str, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        PgUrl.parse(url)
    assert words in str(caught.value)
    for part in ("hunter2", "hun", "ter2"):
        assert part not in str(caught.value)


def test_the_statement_cache_size_is_asyncpgs_argument_not_a_server_setting() -> None:
    """asyncpg sends a URL's unknown parameters to the server as settings, which refuses this
    one: it is taken out of the URL and given to asyncpg.connect, and the database's location
    (the key of its answer journals) stays that of the same URL without it."""
    plain = "postgresql://u:p@h/d?sslmode=disable&host=/run/postgresql"
    with_it = PgUrl.parse(plain.replace("?", "?statement_cache_size=0&"))
    without = PgUrl.parse(plain)
    assert with_it.dsn == without.dsn == plain
    assert with_it.location() == without.location()
    assert with_it.connect_kwargs() == {"statement_cache_size": 0}
    assert without.connect_kwargs() == {}
    assert PgUrl.parse("postgresql://u@h/d?statement_cache_size=25").dsn == "postgresql://u@h/d"


def test_migrations_behind_a_pooler_keep_no_statements_under_reused_names() -> None:
    url, args = db._asyncpg_options(
        "postgresql+asyncpg://u@h/d?statement_cache_size=0&sslmode=require"
    )
    assert dict(make_url(url).query) == {}
    assert args["dsn"] == "postgresql://u@h/d?sslmode=require"
    assert args["statement_cache_size"] == 0
    assert args["prepared_statement_cache_size"] == 0
    assert len({args["prepared_statement_name_func"]() for _ in range(3)}) == 3
    assert db._asyncpg_options("postgresql+asyncpg://u@h/d") == ("postgresql+asyncpg://u@h/d", {})


def test_libpqs_connect_timeout_is_asyncpgs_argument() -> None:
    target = PgUrl.parse("postgresql://u@h/d?connect_timeout=7&sslmode=disable")
    assert target.dsn == "postgresql://u@h/d?sslmode=disable"
    assert target.connect_kwargs() == {"timeout": 7.0}
    assert PgUrl.parse("postgresql://u@h/d?connect_timeout=0").connect_kwargs() == {}
    with pytest.raises(UsageError, match="number of seconds"):
        PgUrl.parse("postgresql://u@h/d?connect_timeout=soon")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@h:99999/d",
        "postgresql://u:hunter2@[::1/d",
        "postgresql+psycopg2://u:hunter2@h/d",
        "postgresql://u:hunter2@h:abc/d",
    ],
)
def test_an_engine_is_not_made_for_a_url_it_cannot_open(url: str) -> None:
    # `db upgrade` makes one: these were tracebacks (a port past 65535 or that is no number,
    # an IPv6 address not closed, another driver).
    with pytest.raises(UsageError) as caught:
        db.create_engine(url)
    assert "hunter2" not in str(caught.value)


@pytest.mark.postgres
async def test_a_url_with_libpqs_parameters_creates_its_schema(
    pg_url: str, make_file: MakeFile
) -> None:
    """SQLAlchemy handed each parameter to asyncpg.connect as an argument of that name: a new
    database given with ?sslmode=... (as the README shows) could not have its schema made."""
    url = f"{pg_url}?sslmode=disable&connect_timeout=10"
    for step in [("db", "upgrade"), ("submit", str(make_file([chat("q")])))]:
        code, _, err = await _cli(url, *step)
        assert code == 0, (step, err)


def test_a_statement_cache_broken_by_a_pooler_says_what_to_do() -> None:
    exc = asyncpg.DuplicatePreparedStatementError('prepared statement "__asyncpg_stmt_1__" exists')
    assert "add ?statement_cache_size=0 to the database URL" in driver_words(exc)
    assert driver_words(asyncpg.UniqueViolationError("duplicate key")) == "duplicate key"
    # A connect that timed out has no words of its own.
    assert driver_words(TimeoutError()) == "timed out"
    assert driver_words(ConnectionResetError()) == "ConnectionResetError"


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


def _pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _pgbouncer(pg_url: str) -> Iterator[int]:
    """pgbouncer in transaction mode in front of `pg_url`'s server, with one server connection
    per database (so that whatever a client leaves on it, the next client meets); yields its
    port."""
    binary = _pgbouncer_binary()
    if binary is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    server = urlsplit(pg_url)
    user = server.username or "postgres"
    run_as: list[str] = []
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        try:
            run_as = ["-u", pwd.getpwnam("postgres").pw_name]
        except KeyError:
            pytest.skip("pgbouncer does not run as root, and there is no postgres user")
    port = _free_port()
    directory = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    directory.chmod(0o755)
    (directory / "users.txt").write_text(f'"{user}" ""\n')
    (directory / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={server.hostname} port={server.port or 5432}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = trust\nauth_file = users.txt\npool_mode = transaction\n"
        "default_pool_size = 1\n"
    )
    for path in directory.iterdir():
        path.chmod(0o644)
    log = directory / "pgbouncer.log"
    with log.open("wb") as log_file:  # a file: a pipe nobody reads would fill and stall it
        proc = subprocess.Popen(
            [binary, *run_as, "pgbouncer.ini"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"pgbouncer ended: {log.read_text()}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"pgbouncer is not listening on port {port} after 10 s")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.postgres
async def test_commands_about_what_was_submitted_make_no_tables_in_an_empty_database(
    pg_url: str, tmp_path: Path
) -> None:
    """status and export made batchrunner's tables in any database they were pointed at (a
    typo in its name littered someone else's), and said there was no batch."""
    for args in (
        ("status",),
        ("status", "batch_0123456789abcdef"),
        ("export", "batch_0123456789abcdef", "-o", str(tmp_path / "x.csv")),
        ("cancel", "batch_0123456789abcdef"),
    ):
        code, _, err = await _cli(pg_url, *args)
        assert code == 2, (args, err)
        assert "no batchrunner tables in the database at postgresql://" in err
    with pytest.raises(UsageError, match="no batchrunner tables"):
        await JobStore.open(pg_url, create=False)
    conn = await asyncpg.connect(pg_url)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        )
    finally:
        await conn.close()


async def _cli(db_url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchrunner",
        "--db",
        db_url,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode()


@pytest.mark.postgres
async def test_a_batch_goes_through_pgbouncer_in_transaction_mode(
    pg_url: str, tmp_path: Path, make_file: MakeFile
) -> None:
    """Behind pgbouncer in transaction mode a client's next statement may reach a server
    connection where another client left asyncpg's prepared statements: with
    ?statement_cache_size=0 every command works, the schema's migrations too; without it a
    command fails and says to add it."""
    with _pgbouncer(pg_url) as port:
        location = urlsplit(pg_url)
        pooled = location._replace(netloc=f"{location.username}@127.0.0.1:{port}").geturl()
        url = f"{pooled}?statement_cache_size=0"
        async with FakeServer(FakeConfig()) as srv:
            rows = [chat(f"question {i}") for i in range(30)]
            steps = [
                ("db", "upgrade"),
                ("db", "downgrade", "base"),
                ("submit", str(make_file(rows)), "--base-url", srv.url),
            ]
            for step in steps:
                code, out, err = await _cli(url, *step)
                assert code == 0, (step, err)
            batch_id = out.splitlines()[-1]
            for step in [
                ("run", batch_id, "--quiet", "--concurrency", "8"),
                ("status", batch_id),
                ("export", batch_id, "-o", str(tmp_path / "out.csv")),
                ("status", batch_id, "--json"),
            ]:
                code, out, err = await _cli(url, *step)
                assert code == 0, (step, err)
            assert srv.stats.requests_total == 30
        assert len((tmp_path / "out.csv").read_text().splitlines()) == 31

        # Without it: the first command leaves its statements on the one server connection,
        # where the next one meets them.
        results = [await _cli(pooled, "status", batch_id) for _ in range(2)]
        assert [code for code, _, _ in results] == [0, 1]
        assert "add ?statement_cache_size=0 to the database URL" in results[1][2]


@pytest.mark.postgres
async def test_a_cancel_committed_while_retry_waits_leaves_no_job_pending(
    pg_url: str, make_file: MakeFile
) -> None:
    """retry checked that the batch was not cancelled, then put its failed jobs back in a
    transaction of its own: a cancel that committed in between (retry waiting for the jobs'
    rows, held by a run's record) left a cancelled batch with pending jobs nothing would run."""
    store, other = await JobStore.open(pg_url), await JobStore.open(pg_url)
    holder = await asyncpg.connect(pg_url)
    try:
        rows = [chat(f"q{i}") for i in range(6)]
        batch = (await submit_file(store, make_file(rows), base_url="http://127.0.0.1:9")).batch
        jobs = await store.claim(batch.id, "w-1", "t-1", 3, time.time(), 60.0)
        await store.record(batch.id, "w-1", [failed(job) for job in jobs], [], time.time())
        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT id FROM jobs WHERE state = 'failed' FOR UPDATE")
        retrying = asyncio.ensure_future(store.retry_failed(batch.id))
        await asyncio.sleep(0.5)
        cancelling = asyncio.ensure_future(other.cancel(batch.id))
        await asyncio.sleep(0.5)
        await hold.rollback()
        await asyncio.gather(retrying, cancelling, return_exceptions=True)
        counts = (await store.counts(batch.id)).counts
        assert (await store.get_batch(batch.id)).cancelled_at is not None
        assert counts["pending"] == counts["running"] == 0
        assert counts["cancelled"] == 6
    finally:
        await holder.close()
        await other.close()
        await store.close()


_BATCH_ROW = (
    "INSERT INTO batches (id, name, source_file, content_sha256, base_url, api_key_env, options,"
    " total_jobs, invalid_lines, created_at)"
    " VALUES ($1, 'n', 'f', md5(random()::text), 'http://127.0.0.1', 'K', '{}', 0, 0, 0)"
)
_JOB_ROWS = (
    "INSERT INTO jobs (batch_id, line, custom_id, method, endpoint, body, model, stream,"
    " est_tokens, state, attempts, created_at, updated_at)"
    " SELECT {batch}, g, 'c' || g, 'POST', '/v1/chat/completions', $1, 'm', false, 20,"
    " {state}, 0, 0, 0 FROM generate_series(1, {rows}) g"
)
_BODY = orjson.dumps(chat("hello there, this is some text")).decode()


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def _scans_of(conn: Any, sql: str, params: dict[str, Any], under: str | None) -> list[Any]:
    """The nodes that read `jobs` in the plan of `sql` as it ran (rolled back), those under the
    node named `under` (a CTE) if given."""
    query, names = positional(sql)
    transaction = conn.transaction()
    await transaction.start()
    try:
        plan = orjson.loads(
            await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *(params[n] for n in names)
            )
        )[0]["Plan"]
    finally:
        await transaction.rollback()
    if under is not None:
        (plan,) = [n for n in _nodes(plan) if n.get("Subplan Name") == under]
    return [n for n in _nodes(plan) if "Scan" in n["Node Type"] and "CTE" not in n["Node Type"]]


def _read_through_the_claim_index(scans: list[dict[str, Any]], rows: int) -> None:
    """Each scan of `jobs` goes through ix_jobs_claim and reads `rows` rows, none more."""
    assert {s.get("Index Name") for s in scans if "Index Name" in s} == {"ix_jobs_claim"}, scans
    for scan in scans:
        assert scan["Actual Rows"] <= rows, scans
        assert scan.get("Rows Removed by Filter", 0) == 0, scans
        assert scan.get("Rows Removed by Index Recheck", 0) == 0, scans


@pytest.mark.postgres
async def test_claims_and_spans_read_only_the_batchs_own_rows_in_a_table_of_many(
    pg_url: str,
) -> None:
    """Once PostgreSQL had statistics, a claim walked the primary key from the table's first
    job and filtered: with two million older jobs it took 0.5 s (a tenth of that here), at
    every look back; without them, a new batch's span read all its pending entries."""
    async with await JobStore.open(pg_url):
        pass  # (the schema)
    conn = await asyncpg.connect(pg_url)
    try:
        for batch in [*(f"old{n}" for n in range(24)), "big", "queued", "fresh"]:
            await conn.execute(_BATCH_ROW, batch)
        old = "'old' || ((g - 1) / 5000)"
        await conn.execute(_JOB_ROWS.format(batch=old, state="'succeeded'", rows=120_000), _BODY)
        pending = "CASE WHEN g > 99000 THEN 'pending' ELSE 'succeeded' END"
        await conn.execute(_JOB_ROWS.format(batch="'big'", state=pending, rows=100_000), _BODY)
        queued = _JOB_ROWS.format(batch="'queued'", state="'pending'", rows=20_000)
        await conn.execute(queued, _BODY)
        await conn.execute("ANALYZE jobs")
        # Submitted after the statistics were made: PostgreSQL knows nothing of it.
        fresh = _JOB_ROWS.format(batch="'fresh'", state="'pending'", rows=50_000)
        await conn.execute(fresh, _BODY)
        for batch, pending_jobs in (("big", 1_000), ("fresh", 1_000), ("old3", 0)):
            params = {
                "batch": batch, "after": 0, "now": 1e12, "limit": 1_000, "owner": "w",
                "token": "t", "expires": 2e12,
            }  # fmt: skip
            scans = await _scans_of(conn, _CLAIM_POSTGRES, params, "CTE picked")
            _read_through_the_claim_index(scans, pending_jobs)
            assert max(s["Actual Rows"] for s in scans) == pending_jobs
        for batch in ("big", "fresh"):
            scans = await _scans_of(conn, _BATCH_ID_SPAN, {"b": batch}, None)
            assert len(scans) == 2 * len(JobState)
            _read_through_the_claim_index(scans, 1)
        # Export pages and request pages of the new batch: a range of the primary key each
        # (through ix_jobs_claim, a page of a million-job batch took 0.1-0.9 s).
        first = await conn.fetchval("SELECT min(id) FROM jobs WHERE batch_id = 'fresh'")
        page = {"b": "fresh", "lo": first + 9_999, "hi": first + 14_999}
        for sql, params, rows in (
            (export_page_sql(False, ["pending", "succeeded"]), page, 5_000),
            (_JOB_REQUESTS_POSTGRES, {"b": "fresh", "after": first + 9_999, "last": first + 49_999,
                                      "limit": 2_000}, 2_000),
        ):  # fmt: skip
            scans = [s for s in await _scans_of(conn, sql, params, None) if "Index Name" in s]
            jobs = [s for s in scans if s["Relation Name"] == "jobs"]
            assert [s["Index Name"] for s in jobs] == ["pk_jobs"], scans
            assert jobs[0]["Actual Rows"] == rows
    finally:
        await conn.close()
