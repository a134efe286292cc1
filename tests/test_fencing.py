"""Fencing: a worker whose lease expired and whose job was taken over cannot record its answer.

First on the store itself, where the lease clock is a parameter and nothing has to sleep; then
with a real `batchrunner run` process frozen mid-request while another worker takes over.
And what a record writes when nothing is fenced, field by field.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from batchrunner.config import LEASE_ENV, RunConfig
from batchrunner.dispatcher import Dispatcher, StopReason
from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.store import AttemptRecord, ClaimedJob, Ended, JobStore
from tests.conftest import chat, failed, succeeded

MakeFile = Callable[..., Path]

#: A lease that has surely run out by the time the second worker claims at now + TAKEOVER_S.
SHORT_LEASE_S = 0.5
TAKEOVER_S = 1.0
LONG_LEASE_S = 60.0


def _failure(job: ClaimedJob) -> Ended:
    return failed(job)


def _attempt(job: ClaimedJob, now: float) -> AttemptRecord:
    return AttemptRecord(job.id, 200, None, 12.0, None, now)


async def _rows(store: JobStore, sql: str, **params: Any) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def _one_job_batch(store: JobStore, make_file: MakeFile) -> str:
    return (await submit_file(store, make_file([chat("fenced question")]))).batch.id


async def _take_over(store: JobStore, batch_id: str) -> tuple[ClaimedJob, ClaimedJob, float]:
    """Worker A claims with a short lease; worker B claims the same job once it has expired."""
    t0 = time.time()
    (a,) = await store.claim(batch_id, "worker-a", "token-a", 10, t0, SHORT_LEASE_S)
    # Before the lease runs out the job is A's alone.
    assert await store.claim(batch_id, "worker-b", "token-b0", 10, t0 + 0.1, LONG_LEASE_S) == []
    (b,) = await store.claim(batch_id, "worker-b", "token-b", 10, t0 + TAKEOVER_S, LONG_LEASE_S)
    assert (a.id, a.lease_token, b.id, b.lease_token) == (b.id, "token-a", a.id, "token-b")
    return a, b, t0


async def test_the_late_answer_of_an_expired_lease_is_fenced(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _one_job_batch(store, make_file)
    a, b, t0 = await _take_over(store, batch_id)
    now = t0 + TAKEOVER_S + 0.5

    late = await store.record(batch_id, "worker-a", [succeeded(a, "A")], [_attempt(a, now)], now)
    assert (late.recorded, late.fenced) == (0, 1)
    assert await _rows(store, "SELECT job_id FROM results") == []
    (job,) = await _rows(store, "SELECT state, lease_token, attempts FROM jobs")
    assert (job.state, job.lease_token, job.attempts) == ("running", "token-b", 0)

    current = await store.record(batch_id, "worker-b", [succeeded(b, "B")], [], now + 0.1)
    assert (current.recorded, current.fenced) == (1, 0)
    # A tries again after B's end is in: still nothing.
    again = await store.record(batch_id, "worker-a", [succeeded(a, "A")], [], now + 0.2)
    assert (again.recorded, again.fenced) == (0, 1)

    (result,) = await _rows(store, "SELECT job_id, response, request_id FROM results")
    assert (result.job_id, result.response, result.request_id) == (b.id, '{"answer": "B"}', "req_B")
    (job,) = await _rows(store, "SELECT state, lease_token, attempts FROM jobs")
    assert (job.state, job.lease_token, job.attempts) == ("succeeded", None, 1)


async def test_fenced_and_recorded_ends_are_counted_right_in_one_transaction(
    store: JobStore, make_file: MakeFile
) -> None:
    """The run reports late answers it could not record; the counts must hold for a batched
    write of many rows, not only for one."""
    rows = [chat(f"fenced question {i}") for i in range(3)]
    batch_id = (await submit_file(store, make_file(rows))).batch.id
    t0 = time.time()
    old = await store.claim(batch_id, "worker-a", "token-a", 10, t0, SHORT_LEASE_S)
    new = await store.claim(batch_id, "worker-b", "token-b", 10, t0 + TAKEOVER_S, LONG_LEASE_S)
    assert len(old) == len(new) == 3
    now = t0 + TAKEOVER_S + 0.5
    late = await store.record(batch_id, "worker-a", [succeeded(j, "A") for j in old], [], now)
    assert (late.recorded, late.fenced) == (0, 3)
    assert late.fenced_ids == {j.id for j in old}
    mixed = [succeeded(new[0], "B"), succeeded(old[1], "A"), _failure(new[2])]
    current = await store.record(batch_id, "worker-b", mixed, [], now + 0.1)
    assert (current.recorded, current.fenced) == (2, 1)
    assert current.fenced_ids == {old[1].id}
    assert await _rows(store, "SELECT job_id FROM results") == [(new[0].id,)]
    states = dict(await _rows(store, "SELECT id, state FROM jobs"))
    assert states == {new[0].id: "succeeded", new[1].id: "running", new[2].id: "failed"}


async def test_a_late_failure_cannot_overwrite_the_current_result(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _one_job_batch(store, make_file)
    a, b, t0 = await _take_over(store, batch_id)
    now = t0 + TAKEOVER_S + 0.5
    assert (await store.record(batch_id, "worker-b", [succeeded(b, "B")], [], now)).recorded == 1
    late = await store.record(batch_id, "worker-a", [_failure(a)], [], now + 0.1)
    assert (late.recorded, late.fenced) == (0, 1)
    (job,) = await _rows(store, "SELECT state, error_kind FROM jobs")
    assert (job.state, job.error_kind) == ("succeeded", None)
    assert len(await _rows(store, "SELECT job_id FROM results")) == 1


async def test_a_late_success_cannot_revive_a_job_the_new_holder_failed(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _one_job_batch(store, make_file)
    a, b, t0 = await _take_over(store, batch_id)
    now = t0 + TAKEOVER_S + 0.5
    assert (await store.record(batch_id, "worker-b", [_failure(b)], [], now)).recorded == 1
    late = await store.record(batch_id, "worker-a", [succeeded(a, "A")], [], now + 0.1)
    assert (late.recorded, late.fenced) == (0, 1)
    assert await _rows(store, "SELECT job_id FROM results") == []
    (job,) = await _rows(store, "SELECT state, error_kind FROM jobs")
    assert (job.state, job.error_kind) == ("failed", "http_400")


async def test_the_old_holder_can_neither_renew_nor_give_back_the_job(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _one_job_batch(store, make_file)
    a, _, t0 = await _take_over(store, batch_id)
    (before,) = await _rows(store, "SELECT lease_owner, lease_expires_at FROM jobs")
    await store.heartbeat(
        "worker-a",
        batch_id,
        t0 + 5.0,
        LONG_LEASE_S * 10,
        sent=1,
        succeeded=0,
        failed=0,
        tokens=0,
        paused_until=None,
    )
    assert await store.release("worker-a", [(a.id, a.lease_token)]) == 0
    (after,) = await _rows(store, "SELECT state, lease_owner, lease_expires_at FROM jobs")
    assert (after.state, after.lease_owner) == ("running", "worker-b")
    assert after.lease_expires_at == pytest.approx(before.lease_expires_at)


async def test_an_expired_lease_nobody_took_over_still_records(
    store: JobStore, make_file: MakeFile
) -> None:
    """Expiry alone fences nothing: the answer is lost only if someone else holds the job."""
    batch_id = await _one_job_batch(store, make_file)
    t0 = time.time()
    (a,) = await store.claim(batch_id, "worker-a", "token-a", 10, t0, SHORT_LEASE_S)
    now = t0 + TAKEOVER_S
    done = await store.record(batch_id, "worker-a", [succeeded(a, "A")], [], now)
    assert (done.recorded, done.fenced) == (1, 0)
    # ...and a claim after that finds nothing to take.
    assert await store.claim(batch_id, "worker-b", "token-b", 10, now + 1, LONG_LEASE_S) == []


@pytest.mark.parametrize("given_back", ["release", "release_all", "reap", "expiry"])
async def test_attempts_logged_under_a_lease_given_back_count_for_the_job(
    store: JobStore, make_file: MakeFile, given_back: str
) -> None:
    """A run stopped, dead or out of its lease while it retried a job had logged those
    attempts: they count for the job when it goes back to pending (against --max-attempts,
    and in its attempts), and its final count is its log's. Before, they were in the log only."""
    batch_id = await _one_job_batch(store, make_file)
    t0 = time.time()
    lease_s = SHORT_LEASE_S if given_back == "expiry" else LONG_LEASE_S
    (a,) = await store.claim(batch_id, "worker-a", "token-a", 10, t0, lease_s)
    # What the writer logs every flush for a job still being retried: attempts, no end.
    tried = [AttemptRecord(a.id, 500, "http_500", 5.0, None, t0 + k * 0.1) for k in (1, 2)]
    assert (await store.record(batch_id, "worker-a", [], tried, t0 + 0.3)).recorded == 0
    if given_back == "release":
        assert await store.release("worker-a", [(a.id, a.lease_token)]) == 1
    elif given_back == "release_all":
        assert await store.release_all("worker-a", batch_id) == 1
    elif given_back == "reap":
        assert await store.reap_workers(batch_id, ["worker-a"], t0 + 0.4) == 1
    (b,) = await store.claim(batch_id, "worker-b", "token-b", 10, t0 + TAKEOVER_S, LONG_LEASE_S)
    assert b.attempts == 2
    last = AttemptRecord(b.id, 200, None, 5.0, None, t0 + TAKEOVER_S + 0.1)
    done = await store.record(batch_id, "worker-b", [succeeded(b, "B")], [last], t0 + 2.0)
    assert done.recorded == 1
    (job,) = await _rows(store, "SELECT attempts FROM jobs")
    (logged,) = await _rows(store, "SELECT count(*) AS n FROM attempts")
    assert job.attempts == logged.n == 3


async def test_attempts_before_a_retry_do_not_count_again_when_its_run_stops(
    store: JobStore, make_file: MakeFile
) -> None:
    """`retry` gives a failed job a fresh allowance and keeps its log; a run stopped while it
    retried the job adds only its own attempts."""
    batch_id = await _one_job_batch(store, make_file)
    t0 = time.time()
    (a,) = await store.claim(batch_id, "worker-a", "token-a", 10, t0, LONG_LEASE_S)
    first = [AttemptRecord(a.id, 500, "http_500", 5.0, None, t0 + k * 0.1) for k in (1, 2)]
    failed = replace(_failure(a), attempts=2)
    assert (await store.record(batch_id, "worker-a", [failed], first, t0 + 0.3)).recorded == 1
    assert await store.retry_failed(batch_id) == 1
    (b,) = await store.claim(batch_id, "worker-a", "token-b", 10, t0 + 1.0, LONG_LEASE_S)
    assert b.attempts == 0
    again = [AttemptRecord(b.id, 500, "http_500", 5.0, None, t0 + 1.1)]
    await store.record(batch_id, "worker-a", [], again, t0 + 1.2)
    assert await store.release_all("worker-a", batch_id) == 1
    (job,) = await _rows(store, "SELECT attempts FROM jobs")
    assert job.attempts == 1


async def test_a_record_keeps_every_field_exactly(store: JobStore, make_file: MakeFile) -> None:
    """Not fencing: what a record writes, field by field, in both jobs' order and out of it."""
    rows = [chat(f"field {i}") for i in range(3)]
    batch_id = (await submit_file(store, make_file(rows))).batch.id
    now = 1_733_260_000.1234567
    jobs = await store.claim(batch_id, "worker-a", "token-a", 10, now, LONG_LEASE_S)
    first, second, third = jobs
    long_answer = '{"choices": [{"message": {"content": "' + "é\\\"'\\n" * 20_000 + '"}}]}'
    ends = [
        _failure(third),
        succeeded(
            first,
            "x",
            response=long_answer,
            request_id="req-ü",
            model="gpt-4o-2024-08-06",
            prompt_tokens=2**31 - 1,
            cached_tokens=None,
            reasoning_tokens=17,
            schema_valid=False,
            latency_ms=1e-7,
        ),
        succeeded(second, "y", schema_valid=True, attempts=3, latency_ms=123456.789012345),
    ]
    log = [
        AttemptRecord(second.id, 503, "server_error", 0.1 + 0.2, "req-1", now + 1e-6),
        AttemptRecord(second.id, None, "timeout", 30000.0, None, now + 2 / 3),
    ]
    done = await store.record(batch_id, "worker-a", ends, log, now + 1)
    assert (done.recorded, done.fenced) == (3, 0)

    results = await _rows(
        store,
        "SELECT job_id, status_code, response, request_id, model, prompt_tokens,"
        " completion_tokens, cached_tokens, reasoning_tokens, total_tokens, schema_valid,"
        " latency_ms, attempts, finished_at FROM results ORDER BY job_id",
    )
    first_row = (first.id, 200, long_answer, "req-ü", "gpt-4o-2024-08-06", 2**31 - 1, 4, None)
    second_row = (second.id, 200, '{"answer": "y"}', "req_y", "gpt-4o-mini", 3, 4, 0)
    assert [tuple(r) for r in results] == [
        (*first_row, 17, 7, False, 1e-7, 1, now + 1),
        (*second_row, 0, 7, True, 123456.789012345, 3, now + 1),
    ]
    (failed,) = await _rows(
        store,
        "SELECT state, attempts, error_kind, last_status, last_error, finished_at FROM jobs"
        " WHERE id = :j",
        j=third.id,
    )
    assert tuple(failed) == ("failed", 1, "http_400", 400, '{"error": {"message": "bad"}}', now + 1)
    logged = await _rows(
        store,
        "SELECT job_id, batch_id, worker_id, status_code, error_kind, latency_ms, request_id,"
        " started_at FROM attempts ORDER BY started_at",
    )
    assert [tuple(a) for a in logged] == [
        (second.id, batch_id, "worker-a", 503, "server_error", 0.1 + 0.2, "req-1", now + 1e-6),
        (second.id, batch_id, "worker-a", None, "timeout", 30000.0, None, now + 2 / 3),
    ]
    # The same attempts again (a dead run's journal) are not logged twice.
    again = await store.record(batch_id, "worker-a", [], log, now + 2)
    assert (again.recorded, again.fenced) == (0, 0)
    assert len(await _rows(store, "SELECT id FROM attempts")) == 2


#: Fast retries and writes for the worker that takes over.
FAST = RunConfig(
    concurrency=8,
    max_attempts=3,
    timeout_s=30.0,
    retry_base_s=0.01,
    retry_max_s=0.05,
    retry_jitter_s=0.01,
    flush_s=0.05,
    grace_s=2.0,
)
#: The fake server holds every answer this long: room to freeze the first worker in between.
SLOW_ANSWER_MS = 1_500.0
#: The lease of the worker that gets frozen (BATCHRUNNER_LEASE_S).
FROZEN_LEASE_S = 1.0
#: Attempts at freezing the worker outside a database transaction.
FREEZE_TRIES = 50


async def _database_is_free(store: JobStore, batch_id: str) -> bool:
    """True when no other connection holds a write lock on the batch's jobs.

    A worker frozen inside a transaction would hold its lock until it is thawed, and the
    worker taking over would wait on it instead of showing fencing.
    """
    if store.is_sqlite:
        # A plain connection: the store's own would wait out the product's busy timeout.
        conn = sqlite3.connect(str(store.engine.url.database), timeout=0.1, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()
        return True
    try:
        async with store.engine.connect() as pg:
            await pg.exec_driver_sql("SET lock_timeout = '100ms'")
            await pg.execute(
                text("SELECT id FROM jobs WHERE batch_id = :b FOR UPDATE"), {"b": batch_id}
            )
            await pg.rollback()
    except DBAPIError:
        return False
    return True


async def _freeze(proc: asyncio.subprocess.Process, store: JobStore, batch_id: str) -> None:
    for _ in range(FREEZE_TRIES):
        proc.send_signal(signal.SIGSTOP)
        if await _database_is_free(store, batch_id):
            return
        proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.02)
    raise AssertionError("could not freeze the worker outside a transaction")


@pytest.mark.slow
async def test_a_frozen_worker_cannot_record_its_answers_after_a_takeover(
    store: JobStore, db_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    """A `batchrunner run` process is frozen (SIGSTOP, as a long GC pause or a suspended VM
    would) while its requests are at the server; its leases expire and another worker takes the
    jobs over. Thawed while the taker's requests are out, the first gets its answers and
    records none of them; the taker records every one."""
    jobs = 6
    rows = [chat(f"slow {i}") for i in range(jobs)]
    async with FakeServer(FakeConfig(latency_ms=SLOW_ANSWER_MS)) as srv:
        batch = (await submit_file(store, make_file(rows), base_url=srv.url)).batch
        env = {k: v for k, v in os.environ.items() if k != "BATCHRUNNER_DB"}
        env[LEASE_ENV] = str(FROZEN_LEASE_S)
        frozen = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "batchrunner", "--db", db_url, "run", batch.id],
            *["--concurrency", str(jobs), "--timeout", "30", "--quiet"],
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            while srv.stats.requests_total < jobs:
                assert frozen.returncode is None
                await asyncio.sleep(0.005)
            await _freeze(frozen, store, batch.id)
            await asyncio.sleep(FROZEN_LEASE_S + 0.3)
            taker = Dispatcher(store, batch, FAST, api_key=None, base_url=srv.url)
            taking = asyncio.create_task(taker.run())
            # Thawed once the taker's requests are out: the frozen worker's answers are waiting
            # for it and reach its writer while the jobs are running under the taker's leases.
            while srv.stats.requests_total < 2 * jobs:
                assert not taking.done()
                await asyncio.sleep(0.005)
        finally:
            frozen.send_signal(signal.SIGCONT)
        _, err = await asyncio.wait_for(frozen.communicate(), 60)
        taken = await taking
        received = srv.stats.requests_by_body

    stderr = err.decode()
    assert frozen.returncode == 0, stderr
    assert taken.reason is StopReason.DONE and taken.stats.succeeded == jobs
    assert sorted(received.values()) == [2] * jobs
    # One result per job, the taker's: had a late answer been recorded, the taker's ends
    # would have been fenced in turn.
    assert taken.stats.fenced == 0
    results = await _rows(store, "SELECT job_id, attempts FROM results")
    assert len(results) == jobs
    assert {r.attempts for r in results} == {1}
    states = await _rows(store, "SELECT state, attempts FROM jobs")
    assert {(s.state, s.attempts) for s in states} == {("succeeded", 1)}
    # ...and the frozen worker says so rather than claiming the jobs as its own.
    assert f"{jobs} late answer(s) were not recorded" in stderr
