"""Crashes: `batchrunner run` killed with SIGKILL at random moments, then resumed.

The promise under test (docs/RELIABILITY.md): each request is sent at least once, its result
is recorded exactly once, and after a crash only what was in flight is sent again.

The local fake server counts the requests it receives per exact body. "In flight at a kill" is
measured, not assumed: the jobs whose request reached the server during the killed run and whose
end the database had not recorded when the process died. That includes answers that had come
back but were waiting for the writer's next batched transaction, so it is checked against the
concurrency as well as against what was re-sent.
Re-sends are only counted in fault-free runs, where a second reception of a body can only be a
re-send after a crash; the run with injected faults checks exactly-once recording alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.store import JobStore
from tests.conftest import chat

MakeFile = Callable[..., Path]

pytestmark = pytest.mark.slow

#: Requests in flight per run: the bound on what one kill can leave open.
CONCURRENCY = 8
#: A run that is not killed must end within this long.
RUN_TIMEOUT_S = 90.0
#: After a kill, time for the server to take in request bytes that were already on the wire.
SETTLE_S = 0.2
#: A kill lands this long (at most) after the run's first request reached the server.
MAX_KILL_DELAY_S = 0.8
#: How often the test looks at the server's counters while it waits.
POLL_S = 0.01


@dataclass(frozen=True, slots=True)
class Kill:
    """What one SIGKILL left behind."""

    #: HTTP requests the server was still answering when the signal went.
    http_in_flight: int
    #: Jobs sent during the killed run whose end was not recorded: the run's "in flight".
    unrecorded: frozenset[int]


def _digest(body: str) -> bytes:
    return hashlib.sha256(body.encode()).digest()


def _run_command(db_url: str, batch_id: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "batchrunner",
        "--db",
        db_url,
        "run",
        batch_id,
        "--concurrency",
        str(CONCURRENCY),
        "--quiet",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHRUNNER_DB", "OPENAI_BASE_URL")}
    env["OPENAI_API_KEY"] = "sk-test-crash"
    return env


async def _spawn(cmd: list[str], cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *cmd,
        cwd=cwd,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _jobs(store: JobStore, batch_id: str) -> dict[int, tuple[bytes, str]]:
    """job id -> (digest of the body as sent, state)."""
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT id, body, state FROM jobs WHERE batch_id = :b"), {"b": batch_id}
            )
        ).all()
    return {r.id: (_digest(r.body), r.state) for r in rows}


async def _scalar(store: JobStore, sql: str, **params: object) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar_one())


ENDED = ("succeeded", "failed")


async def _kill_at_random(
    proc: asyncio.subprocess.Process, srv: FakeServer, rng: random.Random
) -> int | None:
    """SIGKILL `proc` a random while after its first request arrives; returns the number of
    HTTP requests the server was answering at that instant, or None if the run ended first."""
    start = srv.stats.requests_total
    while srv.stats.requests_total == start:
        if proc.returncode is not None:
            return None
        await asyncio.sleep(POLL_S)
    await asyncio.sleep(rng.uniform(0.0, MAX_KILL_DELAY_S))
    if proc.returncode is not None:
        return None
    # Same event-loop step as the kill: nothing the server does can come in between.
    in_flight = srv.stats.in_flight
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    return in_flight


async def _crash_repeatedly(
    store: JobStore,
    srv: FakeServer,
    cmd: list[str],
    cwd: Path,
    batch_id: str,
    kills: int,
    rng: random.Random,
) -> list[Kill]:
    """Start the run, kill it at a random moment, `kills` times over (fewer if it ends first)."""
    done: list[Kill] = []
    for _ in range(kills):
        before = dict(srv.stats.requests_by_body)
        proc = await _spawn(cmd, cwd)
        in_flight = await _kill_at_random(proc, srv, rng)
        if in_flight is None:
            _, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            break
        await asyncio.sleep(SETTLE_S)
        after = srv.stats.requests_by_body
        jobs = await _jobs(store, batch_id)
        unrecorded = frozenset(
            job_id
            for job_id, (digest, state) in jobs.items()
            if after.get(digest, 0) > before.get(digest, 0) and state not in ENDED
        )
        done.append(Kill(in_flight, unrecorded))
    return done


async def _finish(cmd: list[str], cwd: Path) -> str:
    proc = await _spawn(cmd, cwd)
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert out == b""
    return stderr


async def _assert_recorded_exactly_once(store: JobStore, batch_id: str, total: int) -> None:
    counts = await store.counts(batch_id)
    assert counts.total == total
    assert counts.unfinished == 0
    assert counts.counts["succeeded"] == total
    assert await _scalar(store, "SELECT COUNT(*) FROM results WHERE batch_id = :b", b=batch_id) == (
        total
    )
    duplicates = await _scalar(
        store,
        "SELECT COUNT(*) FROM (SELECT job_id FROM results WHERE batch_id = :b"
        " GROUP BY job_id HAVING COUNT(*) > 1) d",
        b=batch_id,
    )
    assert duplicates == 0
    orphans = await _scalar(
        store,
        "SELECT COUNT(*) FROM results r JOIN jobs j ON j.id = r.job_id"
        " WHERE r.batch_id = :b AND j.state <> 'succeeded'",
        b=batch_id,
    )
    assert orphans == 0


async def test_kill_9_then_resume_sends_again_only_what_was_in_flight(
    store: JobStore, db_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    rng = random.Random(7)
    total = 240
    rows = [chat(f"crash question {i}", metadata={"i": i}) for i in range(total)]
    config = FakeConfig(seed=5, latency_ms=60, latency_dist="lognormal")
    async with FakeServer(config) as srv:
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        cmd = _run_command(db_url, batch_id, "--timeout", "10")
        kills = await _crash_repeatedly(store, srv, cmd, tmp_path, batch_id, 4, rng)
        await _finish(cmd, tmp_path)
        received = srv.stats.requests_by_body

    assert kills, "no run was killed: the batch ended before the first kill"
    await _assert_recorded_exactly_once(store, batch_id, total)
    jobs = await _jobs(store, batch_id)
    # At least once: every body reached the server.
    assert all(received.get(digest, 0) >= 1 for digest, _ in jobs.values())
    # Only the in-flight: a job's extra receptions are bounded by the kills it was in flight at.
    for job_id, (digest, _) in jobs.items():
        in_flight_at = sum(job_id in k.unrecorded for k in kills)
        assert received[digest] - 1 <= in_flight_at, (job_id, received[digest], kills)
    resent = sum(n - 1 for n in received.values())
    assert resent <= sum(len(k.unrecorded) for k in kills)
    # And what a kill can leave sent-but-unrecorded is bounded by the concurrency: the HTTP
    # requests open at that instant, and no answers waiting for a later batched write.
    assert all(k.http_in_flight <= CONCURRENCY for k in kills)
    unrecorded = [len(k.unrecorded) for k in kills]
    assert max(unrecorded) <= CONCURRENCY, f"sent and not recorded at each kill: {unrecorded}"
    assert resent <= CONCURRENCY * len(kills)


async def test_kill_9_with_faults_still_records_each_result_exactly_once(
    store: JobStore, db_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    rng = random.Random(17)
    total = 60
    rows = [
        chat(f"faulty crash {i}", stream=True, stream_options={"include_usage": True})
        if i % 3 == 0
        else chat(f"faulty crash {i}")
        for i in range(total)
    ]
    # Every kind but 429, rarely enough that retries (1 s, 2 s, ... apart from the command
    # line) do not drag the runs out. A 429 slows the whole run for a while (test_faults.py
    # covers it); its effect on recording is that of any other retried answer.
    faults = {
        "500": 0.02,
        "502": 0.01,
        "503": 0.01,
        "504": 0.01,
        "truncated": 0.02,
        "non_completion": 0.01,
        "reset": 0.02,
        "hang": 0.01,
        "trickle": 0.01,
        "stream_cut": 0.02,
    }
    config = FakeConfig(seed=11, latency_ms=50, latency_dist="lognormal", fault_rates=faults)
    async with FakeServer(config) as srv:
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        # Enough attempts that no job runs out of them: the check is recording, not failure.
        cmd = _run_command(db_url, batch_id, "--timeout", "1", "--max-attempts", "12")
        kills = await _crash_repeatedly(store, srv, cmd, tmp_path, batch_id, 2, rng)
        await _finish(cmd, tmp_path)
        received = srv.stats.requests_by_body
        injected = sum(srv.stats.faults_by_kind.values())

    assert kills
    assert injected > 0
    await _assert_recorded_exactly_once(store, batch_id, total)
    jobs = await _jobs(store, batch_id)
    assert all(received.get(digest, 0) >= 1 for digest, _ in jobs.values())
    # Attempts recorded for a job never exceed what the server received for its body.
    async with store.engine.connect() as conn:
        found = await conn.execute(
            text("SELECT id, attempts FROM jobs WHERE batch_id = :b"), {"b": batch_id}
        )
        attempts = {int(job_id): int(n) for job_id, n in found}
    for job_id, (digest, _) in jobs.items():
        assert 1 <= attempts[job_id] <= received[digest]
