"""Shared fixtures: a migrated temporary database (SQLite, and PostgreSQL when configured),
request files, and the local fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import settings

from batchrunner.coordination import Coordinator, WorkerCounters
from batchrunner.journal import STATE_DIR_ENV
from batchrunner.limiter import Pacer
from batchrunner.states import JobState
from batchrunner.store import ClaimedJob, Ended, JobStore

# Property tests check what is computed, not how fast: on a shared machine a slow example is no
# failure (hypothesis' default deadline is 200 ms per example).
settings.register_profile("batchrunner", deadline=None)
settings.load_profile("batchrunner")

#: The PostgreSQL server the tests may use, e.g. postgresql://postgres@127.0.0.1:5432/test.
PG_ENV = "BATCHRUNNER_TEST_PG"


def pg_admin_url() -> str | None:
    url = os.environ.get(PG_ENV)
    if not url and os.environ.get("CI"):
        raise RuntimeError(f"CI is set but {PG_ENV} is not: the PostgreSQL tests must run in CI")
    return url or None


def _pg_url_for(admin_url: str, database: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{database}"


async def _pg_admin(admin_url: str, sql: str) -> None:
    import asyncpg

    dsn = admin_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(autouse=True, scope="session")
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Answer journals of PostgreSQL runs go to a temporary directory, not the user's home;
    the runs the tests start as processes inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(STATE_DIR_ENV, str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    admin = pg_admin_url()
    if admin is None:
        pytest.skip(f"set {PG_ENV} to run the PostgreSQL tests")
    name = f"br_test_{uuid.uuid4().hex[:12]}"
    await _pg_admin(admin, f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url_for(admin, name)
    finally:
        await _pg_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test that takes it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    admin = pg_admin_url()
    if admin is None:
        pytest.skip(f"set {PG_ENV} to run the PostgreSQL tests")
    name = f"br_test_{uuid.uuid4().hex[:12]}"
    await _pg_admin(admin, f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url_for(admin, name)
    finally:
        await _pg_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[JobStore]:
    s = await JobStore.open(db_url)
    try:
        yield s
    finally:
        await s.close()


def chat(text: str, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    """A plain request body."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def write_jsonl(
    path: Path, rows: list[Any] | Iterator[Any], *, newline_at_end: bool = True
) -> Path:
    with path.open("wb") as f:
        for i, row in enumerate(rows):
            if i:
                f.write(b"\n")
            f.write(row if isinstance(row, bytes) else orjson.dumps(row))
        if newline_at_end:
            f.write(b"\n")
    return path


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1_000_000))

    def make(rows: list[Any], name: str | None = None, **kw: Any) -> Path:
        return write_jsonl(tmp_path / (name or f"requests-{next(counter)}.jsonl"), rows, **kw)

    return make


def run_cli(
    *args: str,
    db: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], object] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`batchrunner --db DB ARGS...` as a user runs it: a process of its own (`preexec_fn`
    runs in it before batchrunner starts, to set a limit, say)."""
    return subprocess.run(
        [sys.executable, "-m", "batchrunner", "--db", db, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec_fn,
        cwd=cwd,
    )


@contextlib.contextmanager
def started_cli(
    *args: str, db: str, sigint: Any = signal.SIG_DFL, process_group: int | None = None
) -> Iterator[subprocess.Popen[str]]:
    """`batchrunner --db DB ARGS...` started, for a test to signal it; killed if still running
    when the block ends (a failed test leaves nothing behind; with `process_group=0`, in a
    group of its own, its whole group). SIGINT is set to `sigint` in it: the default, as for
    a shell's foreground job, whatever this process inherited (a background job of a script
    ignores SIGINT, and its children would too)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "--db", db, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=process_group,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            if process_group == 0:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()


_REPO = Path(__file__).resolve().parent.parent
#: A command line that reports, as it exits, which of the modules named after it it imported.
_WATCHING_IMPORTS = (
    "import atexit, sys\n"
    "heavy = tuple(sys.argv.pop(1).split(','))\n"
    "atexit.register(lambda: print('imported:', sorted({m.split('.')[0] for m in"
    " sys.modules if m.startswith(heavy)}), file=sys.stderr))\n"
    "from batchrunner.cli import main\n"
    "main()\n"
)


async def batch_without_importing(
    db: str, unwanted: tuple[str, ...], make_file: Callable[..., Path], out_dir: Path
) -> None:
    """Submit, run, report on and export a small batch with the command line, each command a
    process that must import none of the `unwanted` modules."""
    from batchrunner.fakeapi import FakeConfig, FakeServer

    async def batchrunner(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WATCHING_IMPORTS,
            ",".join(unwanted),
            "--db",
            db,
            *args,
            cwd=_REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "imported: []" in err.decode(), (args, err.decode())
        return out.decode().strip()

    async with FakeServer(FakeConfig()) as srv:
        rows = [chat(f"question {i}") for i in range(20)]
        batch_id = await batchrunner("submit", str(make_file(rows)), "--base-url", srv.url)
        await batchrunner("run", batch_id, "--quiet")
        await batchrunner("status", batch_id)
        await batchrunner("export", batch_id, "-o", str(out_dir / "out.csv"))
        assert srv.stats.requests_total == 20
    assert len((out_dir / "out.csv").read_text().splitlines()) == 21


def succeeded(job: ClaimedJob, answer: str, **fields: Any) -> Ended:
    """A successful end of a claimed job, answered `answer`; `fields` set any others."""
    values: dict[str, Any] = {
        "attempts": 1,
        "status_code": 200,
        "latency_ms": 12.0,
        "request_id": f"req_{answer}",
        "response": f'{{"answer": "{answer}"}}',
        "model": "gpt-4o-mini",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": 7,
    }
    values.update(fields)
    return Ended(job_id=job.id, lease_token=job.lease_token, state=JobState.SUCCEEDED, **values)


def failed(job: ClaimedJob, **fields: Any) -> Ended:
    """A failed end of a claimed job (a 400 by default); `fields` set any others."""
    values: dict[str, Any] = {
        "attempts": 1,
        "status_code": 400,
        "latency_ms": 5.0,
        "error_kind": "http_400",
        "error": '{"error": {"message": "bad"}}',
    }
    values.update(fields)
    return Ended(job_id=job.id, lease_token=job.lease_token, state=JobState.FAILED, **values)


def dead_pid() -> int:
    """The id of a process of this machine that has ended."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        check=True,
        text=True,
    )
    return int(child.stdout)


def coordinator(store: JobStore, batch_id: str, worker_id: str, **options: Any) -> Coordinator:
    """A worker's coordinator with no limits, the default lease, and nothing done; `options`
    are Coordinator's others (a journal folder, a budget)."""
    return Coordinator(
        store,
        batch_id,
        worker_id,
        Pacer(None, None),
        rpm=None,
        tpm=None,
        lease_s=60.0,
        heartbeat_s=15.0,
        counters=lambda: WorkerCounters(sent=0, succeeded=0, failed=0, tokens=0),
        **options,
    )
