"""The fault matrix: each fault the fake server can inject, alone and all mixed, drawn at random.

tests/test_run.py scripts one fault into one request and checks what happens to that job. Here
the server draws faults at random (reproducibly: a draw is a function of the seed, the body and
how many times that body came before) across many jobs, plain and streamed, and the checks are
global invariants of the run:

- every job has ended, succeeded or failed;
- no job took more attempts than the caps (--max-attempts, and the larger one for 429s), and a
  job that failed on a transient error used them all;
- the attempts log and each job's attempt count agree, and the server received each body exactly
  as many times as the job says it was attempted;
- results exist for succeeded jobs only, one each;
- every failed attempt and every failed job carries the error kind the README's table gives for
  the injected fault;
- no attempt took longer than the timeout, give or take a scheduling slack: a server that
  hangs or trickles holds a request no longer than that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from batchrunner.config import RunConfig
from batchrunner.dispatcher import StopReason
from batchrunner.fakeapi import FakeConfig, FakeServer, FakeStats
from batchrunner.ingest import submit_file
from batchrunner.retry import RATE_LIMIT_ATTEMPTS_FACTOR
from batchrunner.runner import EXIT_OK, EXIT_SOME_FAILED, run
from batchrunner.store import JobStore
from tests.conftest import chat

MakeFile = Callable[..., Path]

TIMEOUT_S = 0.5
#: How far past the timeout an attempt may be measured on a busy two-core machine. A request
#: that the timeout did not cut would last as long as the server holds it: for ever ("hang"), or
#: one byte per 0.5 s of a several-hundred-byte answer ("trickle").
LATENCY_SLACK_S = 3.0
MAX_ATTEMPTS = 4
#: A 429 says "slow down", not "this request is bad": retry.py gives rate-limited attempts a
#: cap of their own, RATE_LIMIT_ATTEMPTS_FACTOR times --max-attempts.
RATE_LIMIT_CAP = RATE_LIMIT_ATTEMPTS_FACTOR * MAX_ATTEMPTS
CONFIG = RunConfig(
    concurrency=16,
    max_attempts=MAX_ATTEMPTS,
    timeout_s=TIMEOUT_S,
    retry_base_s=0.01,
    retry_max_s=0.05,
    retry_jitter_s=0.01,
    flush_s=0.05,
    grace_s=2.0,
)

#: What the README's table of answers makes of each injected fault: the error kind of the failed
#: attempt, for a plain request and for a streamed one. All of them are retried.
TRANSIENT_KINDS: dict[str, tuple[str, str]] = {
    "429": ("rate_limit", "rate_limit"),
    "500": ("server_error", "server_error"),
    "502": ("server_error", "server_error"),
    "503": ("server_error", "server_error"),
    "504": ("server_error", "server_error"),
    # A 200 whose JSON stops halfway; a stream that ends cleanly in the middle of an event.
    "truncated": ("bad_json", "stream_broken"),
    "non_completion": ("not_completion", "not_completion"),
    "reset": ("connection", "connection"),
    "hang": ("timeout", "timeout"),
    "trickle": ("timeout", "timeout"),
    # A plain request cannot be cut mid-stream: the server cuts its JSON instead.
    "stream_cut": ("bad_json", "stream_broken"),
}
#: Fails the job at once, whatever attempt it comes on.
FATAL_KINDS = {"400": "http_400"}


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    faults: dict[str, float]
    retry_after: bool = True


#: Each 429 also slows the whole run (the pacer backs off), so they come less often.
SINGLE = [Case(kind, {kind: 0.2 if kind == "429" else 0.35}) for kind in TRANSIENT_KINDS] + [
    Case("429-without-retry-after", {"429": 0.2}, retry_after=False)
]
MIXED = Case("mixed", {kind: 0.04 for kind in TRANSIENT_KINDS} | {"400": 0.03})
MIXED_JOBS = 40


def _rows(total: int) -> list[dict[str, Any]]:
    """Plain and streamed requests, every third one a stream (with usage)."""
    return [
        chat(f"fault matrix {i}", stream=True, stream_options={"include_usage": True})
        if i % 3 == 0
        else chat(f"fault matrix {i}")
        for i in range(total)
    ]


async def _fetch(store: JobStore, sql: str, **params: Any) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


def _allowed(faults: dict[str, float], stream: bool) -> set[str]:
    kinds = {TRANSIENT_KINDS[k][stream] for k in faults if k in TRANSIENT_KINDS}
    return kinds | {FATAL_KINDS[k] for k in faults if k in FATAL_KINDS}


async def _run_and_check(
    store: JobStore, make_file: MakeFile, case: Case, *, total: int, seed: int
) -> FakeStats:
    server_config = FakeConfig(seed=seed, fault_rates=case.faults, retry_after=case.retry_after)
    async with FakeServer(server_config) as srv:
        batch_id = (await submit_file(store, make_file(_rows(total)), base_url=srv.url)).batch.id
        warnings: list[str] = []
        rep = await run(
            store, batch_id, CONFIG, warn=warnings.append, progress=False, install_signals=False
        )
        stats = srv.stats.copy()

    assert rep.result.reason is StopReason.DONE, rep.result.message
    assert rep.exit_code in (EXIT_OK, EXIT_SOME_FAILED)
    # The fault was injected, not just configured.
    assert set(stats.faults_by_kind) <= set(case.faults)
    assert sum(stats.faults_by_kind.values()) > 0

    jobs = await _fetch(
        store,
        "SELECT j.id, j.body, j.stream, j.state, j.attempts, j.error_kind,"
        " r.job_id AS result_of, r.attempts AS result_attempts"
        " FROM jobs j LEFT JOIN results r ON r.job_id = j.id WHERE j.batch_id = :b",
        b=batch_id,
    )
    attempts: dict[int, list[Any]] = {j.id: [] for j in jobs}
    for a in await _fetch(
        store,
        "SELECT job_id, status_code, error_kind, latency_ms FROM attempts"
        " WHERE batch_id = :b ORDER BY id",
        b=batch_id,
    ):
        attempts[a.job_id].append(a)

    assert len(jobs) == total
    for job in jobs:
        allowed = _allowed(case.faults, bool(job.stream))
        log = attempts[job.id]
        kinds = [a.error_kind for a in log]
        limited = kinds.count("rate_limit")
        assert job.state in ("succeeded", "failed"), job
        assert len(log) == job.attempts >= 1, (job, kinds)
        assert job.attempts - limited <= MAX_ATTEMPTS, (job, kinds)
        assert limited <= RATE_LIMIT_CAP, (job, kinds)
        assert stats.attempts_for(job.body.encode()) == job.attempts, (job, kinds)
        # Every attempt but the last failed for a reason the injected faults explain, and
        # was one that is retried.
        assert set(kinds[:-1]) <= allowed - set(FATAL_KINDS.values()), (job, kinds)
        for a in log:
            assert a.latency_ms <= (TIMEOUT_S + LATENCY_SLACK_S) * 1000, (job, a)
        if job.state == "succeeded":
            assert kinds[-1] is None, (job, kinds)
            assert job.result_of == job.id and job.result_attempts == job.attempts
            assert job.error_kind is None
        else:
            assert job.result_of is None, job
            assert job.error_kind == kinds[-1] and job.error_kind in allowed, (job, kinds)
            if job.error_kind == "rate_limit":
                assert limited == RATE_LIMIT_CAP, (job, kinds)
            elif job.error_kind not in FATAL_KINDS.values():
                assert job.attempts - limited == MAX_ATTEMPTS, (job, kinds)
    results = await _fetch(
        store, "SELECT COUNT(*) AS n FROM results WHERE batch_id = :b", b=batch_id
    )
    assert results[0].n == sum(j.state == "succeeded" for j in jobs)
    return stats


@pytest.mark.parametrize("case", SINGLE, ids=lambda c: c.id)
async def test_each_fault_alone(sqlite_url: str, make_file: MakeFile, case: Case) -> None:
    async with await JobStore.open(sqlite_url) as store:
        stats = await _run_and_check(store, make_file, case, total=24, seed=1)
    (kind,) = case.faults
    assert stats.faults_by_kind.get(kind, 0) > 0


@pytest.mark.slow
async def test_every_fault_mixed(store: JobStore, make_file: MakeFile) -> None:
    stats = await _run_and_check(store, make_file, MIXED, total=MIXED_JOBS, seed=2)
    # A good share of the kinds turned up in one run (the draws are fixed by the seed).
    assert len(stats.faults_by_kind) >= 8


async def test_a_hang_is_cut_at_the_timeout_on_every_attempt(
    sqlite_url: str, make_file: MakeFile
) -> None:
    """A server that never answers: each job fails after the capped attempts, each cut at the
    timeout, and the run ends."""
    case = Case("always-hang", {"hang": 1.0})
    async with await JobStore.open(sqlite_url) as store:
        await _run_and_check(store, make_file, case, total=4, seed=3)
        kinds = await _fetch(store, "SELECT DISTINCT error_kind FROM jobs")
        assert [k.error_kind for k in kinds] == ["timeout"]


def test_the_cases_cover_the_issue_list() -> None:
    wanted = {"429", "500", "502", "503", "504", "truncated", "non_completion", "reset", "hang"}
    wanted |= {"trickle", "stream_cut"}
    assert wanted <= {k for c in SINGLE for k in c.faults}
    assert any(not c.retry_after for c in SINGLE)
    assert replace(MIXED, id="x").faults.keys() >= wanted
