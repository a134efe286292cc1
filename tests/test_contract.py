"""What the command line promises off the happy path: exit codes when a run is cut short by a
cancel, Ctrl-C or the budget; endpoints and key variables checked before anything is stored;
a resubmission that keeps its first settings; two submits of one file racing each other."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from batchrunner import coordination
from batchrunner.client import join_url
from batchrunner.config import RunConfig
from batchrunner.dispatcher import Dispatcher, StopReason
from batchrunner.errors import InputError, UsageError
from batchrunner.fakeapi import FakeConfig, FakeServer, FakeServerThread
from batchrunner.ingest import submit_file
from batchrunner.report import batch_status
from batchrunner.runner import EXIT_SOME_FAILED, OTHER_OPEN_FILES, RunReport, run
from batchrunner.states import JobState
from batchrunner.store import Ended, JobStore
from tests.conftest import chat, run_cli, started_cli, write_jsonl

MakeFile = Callable[..., Path]

#: A file that takes seconds to load, so that a Ctrl-C lands while it loads.
SLOW_LOAD_LINES = 300_000


def _has_schema(db_path: Path) -> bool:
    if not db_path.exists():
        return False
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=0.1)
        ) as conn:
            found = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'"
            ).fetchone()
            return bool(found[0]) and bool(
                conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
            )
    except sqlite3.OperationalError:
        return False  # still being created


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_while_a_file_loads_exits_130_and_loads_nothing(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM (`kill`, `timeout`, a service manager's stop) as Ctrl-C."""
    line = orjson.dumps(chat("load me slowly"))
    path = write_jsonl(tmp_path / "big.jsonl", (line for _ in range(SLOW_LOAD_LINES)))
    db_path = tmp_path / "jobs.db"
    with started_cli(
        "run",
        str(path),
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--quiet",
        db=f"sqlite:///{db_path}",
    ) as proc:
        # The load starts right after the schema is in place (how long that takes depends on
        # the machine: waiting for the file alone was not enough on a slow one). A load into a
        # new database goes through a rollback journal, whose locks keep readers out once it
        # spills to the file: a poll that missed the moment between the schema and the load
        # would see nothing until the load had committed. The journal's file says the load is
        # on.
        journal = db_path.with_name(db_path.name + "-journal")
        deadline = time.monotonic() + 30
        while not (journal.exists() or _has_schema(db_path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and "Aborted!" not in stderr
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM batches").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


async def test_a_run_puts_back_the_signal_handlers_it_found(
    store: JobStore, make_file: MakeFile
) -> None:
    """A run takes Ctrl-C and SIGTERM for its graceful stop; the event loop leaves them at
    their defaults after it, and SIGTERM then killed the command outright, where before the
    run it stopped the load as Ctrl-C does (cli.py)."""

    def ours(signum: int, frame: object) -> None:
        raise AssertionError("not called here")

    sigint_before = signal.getsignal(signal.SIGINT)
    sigterm_before = signal.signal(signal.SIGTERM, ours)
    try:
        async with FakeServer(FakeConfig(latency_ms=5)) as srv:
            batch_id = (await submit_file(store, make_file([chat("q")]), base_url=srv.url)).batch.id
            report = await run(
                store, batch_id, RunConfig(flush_s=0.05), warn=lambda _: None, progress=False
            )
        assert report.exit_code == 0
        assert signal.getsignal(signal.SIGTERM) is ours
        assert signal.getsignal(signal.SIGINT) is sigint_before
    finally:
        signal.signal(signal.SIGTERM, sigterm_before)


async def _run_until(
    store: JobStore,
    srv: FakeServer,
    path: Path,
    config: RunConfig,
    *,
    sent: int = 0,
    answered: int = 0,
) -> tuple[str, asyncio.Task[RunReport]]:
    """Submit `path` and run it in a task, until the server has received `sent` requests and
    answered `answered` of them."""
    batch_id = (await submit_file(store, path, base_url=srv.url)).batch.id
    running = asyncio.create_task(
        run(store, batch_id, config, warn=lambda _: None, progress=False, install_signals=False)
    )
    # The counters are the server's: nothing to wait on but time.
    while srv.stats.requests_total < sent or srv.stats.successes < answered:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return batch_id, running


async def test_a_batch_cancelled_while_it_runs_does_not_exit_0(
    store: JobStore, make_file: MakeFile
) -> None:
    """`cancel` from another shell ends the run, which must not then say every job succeeded."""
    rows = [chat(f"slow {i}") for i in range(40)]
    async with FakeServer(FakeConfig(latency_ms=300)) as srv:
        config = RunConfig(concurrency=4, flush_s=0.05, grace_s=2.0)
        batch_id, running = await _run_until(store, srv, make_file(rows), config, sent=4)
        cancelled = await store.cancel(batch_id)
        report = await asyncio.wait_for(running, 30)
    assert cancelled > 0
    assert report.result.cancelled_in_batch == cancelled
    assert report.exit_code == EXIT_SOME_FAILED
    counts = (await store.counts(batch_id)).counts
    assert counts["succeeded"] + counts["cancelled"] == len(rows)


async def test_a_run_stops_sending_within_a_look_of_the_cancel(
    store: JobStore, make_file: MakeFile
) -> None:
    """Jobs claimed ahead wait their turn at --rpm; a cancel must stop them from being sent
    (and paid for, then not recorded), not only the ones not yet claimed."""
    rows = [chat(f"paced {i}") for i in range(300)]
    async with FakeServer(FakeConfig(latency_ms=20)) as srv:
        config = RunConfig(concurrency=64, rpm=600, flush_s=0.05, grace_s=10.0)
        batch_id, running = await _run_until(store, srv, make_file(rows), config, sent=10)
        sent_at_cancel = srv.stats.requests_total
        await store.cancel(batch_id)
        report = await asyncio.wait_for(running, 60)
        sent_after = srv.stats.requests_total - sent_at_cancel
    # 10 a second for the look's second and a little more, against the ~200 jobs the run held.
    assert sent_after <= 25, sent_after
    assert report.result.reason is StopReason.CANCELLED
    assert report.exit_code == EXIT_SOME_FAILED
    counts = (await store.counts(batch_id)).counts
    assert counts["cancelled"] >= len(rows) - sent_at_cancel - sent_after
    assert counts["succeeded"] + counts["cancelled"] == len(rows)


async def test_answers_after_a_cancel_count_as_not_recorded_not_as_succeeded(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the run sees the cancel, its answers are refused by the database (fenced): the
    run's own figures must say so, not count them as succeeded. They were paid for all the
    same: their tokens and cost count in `status` (they were counted nowhere)."""
    monkeypatch.setattr(coordination, "COORDINATE_EVERY_S", 3.0)  # a late look
    rows = [chat(f"paced {i}") for i in range(300)]
    async with FakeServer(FakeConfig(latency_ms=20)) as srv:
        config = RunConfig(concurrency=8, rpm=600, flush_s=0.05)
        batch_id, running = await _run_until(store, srv, make_file(rows), config, answered=10)
        await store.cancel(batch_id)
        report = await asyncio.wait_for(running, 60)
    stats = report.result.stats
    counts = (await store.counts(batch_id)).counts
    assert stats.fenced >= 5  # about 10 a second until the look
    assert stats.succeeded == counts["succeeded"]
    assert stats.succeeded + stats.fenced <= srv.stats.successes
    status = await batch_status(store, batch_id)
    assert stats.tokens == status.tokens["total_tokens"]
    assert sum(m.usage.discarded for m in status.models) == stats.fenced
    assert sum(m.usage.results for m in status.models) == counts["succeeded"]


async def test_the_answers_of_requests_in_flight_at_a_cancel_count_as_paid_for(
    store: JobStore, make_file: MakeFile
) -> None:
    """A run that saw the cancel ended at once, abandoning the requests it had sent: their
    answers were billed all the same, and counted nowhere (status showed $0)."""
    rows = [chat(f"slow {i}") for i in range(100)]
    async with FakeServer(FakeConfig(latency_ms=1500)) as srv:
        batch = (await submit_file(store, make_file(rows), base_url=srv.url)).batch
        config = RunConfig(concurrency=8, flush_s=0.05, grace_s=10.0)
        dispatcher = Dispatcher(store, batch, config, api_key=None, base_url=srv.url)
        running = asyncio.create_task(dispatcher.run())
        while srv.stats.requests_total < 8:  # noqa: ASYNC110 - a counter the server owns
            await asyncio.sleep(0.01)
        await store.cancel(batch.id)
        result = await asyncio.wait_for(running, 60)
        answered = srv.stats.successes
    assert result.reason is StopReason.CANCELLED
    assert result.stats.fenced == answered >= 8
    status = await batch_status(store, batch.id)
    assert sum(m.usage.discarded for m in status.models) == answered
    assert status.tokens["total_tokens"] == result.stats.tokens > 0


async def test_a_stopped_run_does_not_send_what_waits_for_its_turn(
    store: JobStore, make_file: MakeFile
) -> None:
    """At --rpm most workers wait their turn at the pacer, a job in hand; a stop (Ctrl-C)
    lets the requests already sent finish, and sends none of those."""
    rows = [chat(f"paced {i}") for i in range(300)]
    async with FakeServer(FakeConfig(latency_ms=500)) as srv:
        batch = (await submit_file(store, make_file(rows), base_url=srv.url)).batch
        config = RunConfig(concurrency=64, rpm=600, flush_s=0.05, grace_s=10.0)
        dispatcher = Dispatcher(store, batch, config, api_key=None, base_url=srv.url)
        running = asyncio.create_task(dispatcher.run())
        while srv.stats.requests_total < 10:  # noqa: ASYNC110 - a counter the server owns
            await asyncio.sleep(0.01)
        sent_at_stop = srv.stats.requests_total
        in_flight_at_stop = dispatcher.stats.in_flight
        dispatcher.stop()
        result = await asyncio.wait_for(running, 60)
        sent_after = srv.stats.requests_total - sent_at_stop
    assert result.reason is StopReason.INTERRUPTED
    # One sent as the server was read may not have reached it yet.
    assert sent_after <= 1, sent_after
    assert in_flight_at_stop > 0  # the grace period had answers to wait for
    counts = (await store.counts(batch.id)).counts
    assert counts["succeeded"] == srv.stats.successes
    assert counts["pending"] == len(rows) - counts["succeeded"]


async def test_retry_does_not_revive_a_cancelled_batch(
    store: JobStore, make_file: MakeFile
) -> None:
    path = make_file([chat("a"), chat("b")])
    batch_id = (await submit_file(store, path)).batch.id
    await store.cancel(batch_id)
    with pytest.raises(UsageError, match="cancel is for good") as caught:
        await store.retry_failed(batch_id)
    # It says how to send them after all (it said nothing, and a submit of the same file
    # said only "nothing added").
    assert f"export {batch_id} --as-requests" in caught.value.message
    assert (await store.get_batch(batch_id)).cancelled_at is not None
    assert (await store.counts(batch_id)).counts["cancelled"] == 2
    again = await submit_file(store, path)
    assert not again.created and any("--as-requests" in n for n in again.notices)


async def test_a_cancel_of_a_batch_whose_jobs_have_all_ended_changes_nothing(
    store: JobStore, make_file: MakeFile
) -> None:
    """A cancel racing a run's last answer marked a finished batch cancelled: the run exited 3
    with every job succeeded, and its failed jobs could never be retried."""
    batch_id = (await submit_file(store, make_file([chat("a"), chat("b")]))).batch.id
    claimed = await store.claim(batch_id, "w-1", "w-1.1", 10, time.time(), 60.0)
    ended = [
        Ended(j.id, j.lease_token, JobState.FAILED, 1, 400, 1.0, error_kind="http_400", error="x")
        for j in claimed
    ]
    await store.record(batch_id, "w-1", ended, [], time.time())
    assert await store.cancel(batch_id) == 0
    assert (await store.get_batch(batch_id)).cancelled_at is None
    assert await store.retry_failed(batch_id) == 2


def test_a_batch_already_over_its_budget_is_an_abort_not_a_usage_error(
    make_file: MakeFile, sqlite_url: str
) -> None:
    """The budget is one of the reasons a run aborts (exit 1), wherever it is found."""
    path = make_file([chat(f"priced {i}") for i in range(3)])
    with FakeServerThread(FakeConfig()) as srv:
        done = run_cli("run", str(path), "--base-url", srv.url, "--quiet", db=sqlite_url)
        assert done.returncode == 0, done.stderr
        again = run_cli("run", str(path), "--max-cost", "0.000001", "--quiet", db=sqlite_url)
    assert again.returncode == 1, again.stderr
    assert "at or over --max-cost $0.000001" in again.stderr


@pytest.mark.parametrize(
    "base_url",
    [
        "127.0.0.1:8000/v1",
        "localhost:8000/v1",
        "ftp://example.com/v1",
        "http://host:port/v1",
        "http://[not-an-address/v1",
        "http://h\udcf4te.example/v1",  # a byte that is not UTF-8 on the command line
        "",
    ],
)
def test_a_base_url_that_is_not_http_is_refused_at_submit(
    make_file: MakeFile, sqlite_url: str, base_url: str
) -> None:
    path = make_file([chat("a")])
    result = run_cli("submit", str(path), "--base-url", base_url, db=sqlite_url)
    if base_url == "":
        # Empty means "not given": the default endpoint.
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2, result.stderr
    assert "http:// or https://" in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("base_url", "words"),
    [
        # Sent with the key's header, every request broke (a traceback a job); and the URL,
        # password and all, was stored and shown by `status`.
        ("http://user:hunter2@127.0.0.1:8000/v1", "must not hold a user or password"),
        # A key where the user goes was shown in the message refusing it.
        ("https://hunter2hunter2hunter2@api.example.com/v1", "must not hold a user or password"),
        # Another URL in the query: the first "://" is the scheme's.
        ("https://alice:hunter2@gw.example/v1?next=https://x", "must not hold a user or password"),
        ("api.example.com/v1?api_key=hunter2", "http:// or https://"),
        ("https://api.example.com/v1/chat/completions?key=hunter2", "drop /chat/completions"),
        # Every job went to .../chat/completions/chat/completions and failed with a 404.
        ("http://127.0.0.1:8000/v1/chat/completions", "drop /chat/completions"),
    ],
)
def test_a_base_url_that_cannot_be_meant_is_refused_at_submit(
    make_file: MakeFile, sqlite_url: str, base_url: str, words: str
) -> None:
    path = make_file([chat("a")])
    for command in ("submit", "run"):
        result = run_cli(command, str(path), "--base-url", base_url, db=sqlite_url)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "hunter2" not in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "key",
    [
        "sk-proj-ThisLooksLikeARealKey0123456789",
        # Letters, digits and _ only, as a variable's name may be (Groq's keys): it was stored
        # as the batch's key variable and shown in "set the API key in $gsk_...".
        "gsk_R4nd0mS3cr3tK3yV4lu3F0rGr0qAPIx1234567890abcdefgh",
        "c3f9c2a7e41b4d0f9a8b7c6d5e4f3a2b",  # Azure's: 32 hex digits
    ],
)
def test_a_key_given_where_its_variable_name_belongs_is_refused_and_not_echoed(
    make_file: MakeFile, sqlite_url: str, tmp_path: Path, key: str
) -> None:
    path = make_file([chat("a")])
    result = run_cli("submit", str(path), "--api-key-env", key, db=sqlite_url)
    assert result.returncode == 2
    assert "name of the environment variable" in result.stderr
    assert key not in result.stderr + result.stdout
    assert key.encode() not in (tmp_path / "jobs.db").read_bytes()
    # The same name, set: it is a variable's after all.
    named = run_cli("submit", str(path), "--api-key-env", key, db=sqlite_url, env={key: "sk-x"})
    assert named.returncode == (0 if "-" not in key else 2)


def test_a_key_read_from_a_file_keeps_no_line_break(make_file: MakeFile, sqlite_url: str) -> None:
    """A secret read from a file ends with a newline: each job was a traceback (no header
    may hold one), the run an internal error."""
    with FakeServerThread(FakeConfig()) as srv:
        path = make_file([chat("a"), chat("b")])
        ok = run_cli(
            "run", str(path), "--base-url", srv.url, "--quiet",
            db=sqlite_url, env={"OPENAI_API_KEY": "sk-test-key\n"},
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        other = make_file([chat("c")])
        bad = run_cli(
            "run", str(other), "--base-url", srv.url, "--quiet",
            db=sqlite_url, env={"OPENAI_API_KEY": "sk-te\nst"},
        )  # fmt: skip
    assert bad.returncode == 2 and "$OPENAI_API_KEY holds characters" in bad.stderr
    assert "Traceback" not in bad.stderr and "sk-te" not in bad.stderr


def test_a_batch_name_is_one_line(make_file: MakeFile, sqlite_url: str) -> None:
    path = make_file([chat("a")])
    result = run_cli("submit", str(path), "--name", "two\nlines", db=sqlite_url)
    assert result.returncode == 2 and "one line" in result.stderr


def test_a_resubmission_keeps_its_settings_and_says_so(
    make_file: MakeFile, sqlite_url: str
) -> None:
    path = make_file([chat("a")])
    first = run_cli("submit", str(path), "--base-url", "http://127.0.0.1:1/v1", db=sqlite_url)
    again = run_cli("submit", str(path), "--base-url", "http://127.0.0.1:2/v1", db=sqlite_url)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert "keeps its base URL 'http://127.0.0.1:1/v1'" in again.stderr
    assert "run --base-url" in again.stderr
    same = run_cli("submit", str(path), "--base-url", "http://127.0.0.1:1/v1", db=sqlite_url)
    assert "keeps its" not in same.stderr
    # Nothing asked, nothing to say: it said the batch kept its URL, "not" the default
    # https://api.openai.com/v1 that nobody had asked for.
    plain = run_cli("submit", str(path), db=sqlite_url, env={"OPENAI_BASE_URL": ""})
    assert plain.returncode == 0 and plain.stderr.count("note:") == 0, plain.stderr
    # `run FILE` says so too: it sent to the first URL without a word (unless --base-url
    # says where this run sends).
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:2/v1"}
    run = run_cli("run", str(path), db=sqlite_url, env=env)
    assert "note: the batch keeps its base URL 'http://127.0.0.1:1/v1'" in run.stderr
    run = run_cli("run", str(path), "--base-url", "http://127.0.0.1:2/v1", db=sqlite_url)
    assert "keeps its" not in run.stderr


async def test_repeated_ids_are_counted_with_the_other_bad_lines(
    store: JobStore, make_file: MakeFile
) -> None:
    rows: list[object] = [
        chat("a", custom_id="same"),
        chat("b", custom_id="same"),
        b"{not json",
        chat("c", custom_id="same"),
    ]
    with pytest.raises(InputError) as caught:
        await submit_file(store, make_file(rows))
    assert caught.value.total == 3
    assert [e.line for e in caught.value.errors] == [2, 3, 4]
    assert "duplicate custom_id 'same' (first on line 1)" in caught.value.errors[0].reason
    assert await store.list_batches() == []


async def test_two_submits_of_one_file_at_once_give_one_batch(
    db_url: str, make_file: MakeFile
) -> None:
    """Several machines may `run FILE` on one PostgreSQL database at the same moment."""
    path = make_file([chat(f"race {i}") for i in range(2_000)])
    stores = [await JobStore.open(db_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(submit_file(s, path) for s in stores))
        assert len({r.batch.id for r in results}) == 1
        assert sorted(r.created for r in results) == [False, False, True]
        assert all(r.batch.total_jobs == 2_000 for r in results)
        assert (await stores[0].counts(results[0].batch.id)).total == 2_000
    finally:
        for s in stores:
            await s.close()


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("https://gw.example/api/v1", "https://gw.example/api/v1/chat/completions"),
        ("https://gw.example/api/v1/", "https://gw.example/api/v1/chat/completions"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        (
            "https://res.example/openai/deployments/d?api-version=2024-10-21",
            "https://res.example/openai/deployments/d/chat/completions?api-version=2024-10-21",
        ),
    ],
)
def test_the_endpoint_goes_on_the_base_url_s_path(base_url: str, url: str) -> None:
    assert join_url(base_url, "/v1/chat/completions") == url


@pytest.mark.parametrize(("soft", "hard"), [(100, None), (150, 150)])
def test_a_concurrency_past_the_open_file_limit_still_runs(
    make_file: MakeFile, sqlite_url: str, soft: int, hard: int | None
) -> None:
    """A soft limit of open files below --concurrency is raised as far as the hard one allows;
    past the hard one the run goes on with what fits, and says so. Before, request after
    request failed with "Too many open files" and the run stopped with an internal error."""
    path = make_file([chat(f"q{i}") for i in range(600)])
    limits = (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard)
    with FakeServerThread(FakeConfig(latency_ms=200)) as srv:
        done = run_cli(
            *("run", str(path), "--base-url", srv.url, "--concurrency", "200", "--quiet"),
            db=sqlite_url,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits),
        )
    assert done.returncode == 0, done.stderr
    assert "Too many open files" not in done.stderr
    narrowed = f"running with --concurrency {150 - OTHER_OPEN_FILES}"
    assert (narrowed in done.stderr) == (hard is not None), done.stderr


@pytest.mark.parametrize(
    "db",
    [
        "postgres:hunter2@127.0.0.1/db",  # (no "//": shown whole before)
        "postgresql:/user:hunter2@127.0.0.1/db",
        "sqlite://user:hunter2@host/x.db",
        "postgresql://user@127.0.0.1:port/db?password=hunter2",
    ],
)
def test_a_database_url_that_is_no_url_is_refused_without_its_password(db: str) -> None:
    result = run_cli("status", db=db)
    assert result.returncode == 2, result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


async def test_a_run_keeps_no_entry_for_claims_it_is_done_with(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each claim's lease expiry stayed in the run's memory to its end: at claims of a job
    or two (a slow --rpm, large bodies) one entry a job, for a whole night's run."""
    monkeypatch.setattr(Dispatcher, "_claim_rows", lambda self: 1)
    rows = [chat(f"one at a time {i}") for i in range(40)]
    async with FakeServer(FakeConfig()) as srv:
        batch = (await submit_file(store, make_file(rows), base_url=srv.url)).batch
        config = RunConfig(concurrency=4, flush_s=0.05)
        dispatcher = Dispatcher(store, batch, config, api_key=None, base_url=srv.url)
        result = await asyncio.wait_for(dispatcher.run(), 60)
    assert result.reason is StopReason.DONE and result.stats.succeeded == 40
    assert dispatcher._claims == {} and dispatcher._claimed_left == {}
