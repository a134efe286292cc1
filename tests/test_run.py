"""`run` against the local fake API: every row of the HTTP table, pacing, streams, stops."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletion
from sqlalchemy import text

from batchrunner import dispatcher, limiter, report
from batchrunner.config import RunConfig
from batchrunner.dispatcher import Dispatcher, StopReason
from batchrunner.errors import StoreError
from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.lines import parse_line
from batchrunner.outcome import Outcome, OutcomeKind
from batchrunner.pricing import PriceBook
from batchrunner.runner import EXIT_ABORTED, EXIT_OK, EXIT_SOME_FAILED, RunReport, run
from batchrunner.states import MODEL_CHARS, REQUEST_ID_CHARS
from batchrunner.store import ClaimedJob, JobStore
from tests.conftest import chat
from tests.test_client import running

MakeFile = Callable[..., Path]

#: Fast retries: the tests check what is retried, not how long the backoff is.
FAST = RunConfig(
    concurrency=16,
    max_attempts=4,
    timeout_s=5.0,
    retry_base_s=0.01,
    retry_max_s=0.05,
    retry_jitter_s=0.01,
    flush_s=0.05,
    grace_s=2.0,
)


async def _run(store: JobStore, target: str, config: RunConfig = FAST) -> RunReport:
    warnings: list[str] = []
    return await run(
        store, target, config, warn=warnings.append, progress=False, install_signals=False
    )


async def _submit(store: JobStore, path: Path, srv: FakeServer) -> str:
    return (await submit_file(store, path, base_url=srv.url)).batch.id


async def _job_rows(store: JobStore, batch_id: str) -> list[Any]:
    async with store.engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    text(
                        "SELECT j.id, j.line, j.custom_id, j.state, j.attempts, j.error_kind,"
                        " j.last_status, j.last_error, r.response, r.request_id, r.prompt_tokens,"
                        " r.completion_tokens, r.total_tokens, r.attempts AS r_attempts,"
                        " r.latency_ms, r.reasoning_tokens, r.cached_tokens"
                        " FROM jobs j LEFT JOIN results r ON r.job_id = j.id"
                        " WHERE j.batch_id = :b ORDER BY j.line"
                    ),
                    {"b": batch_id},
                )
            ).all()
        )


async def _count(store: JobStore, sql: str, **params: Any) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar_one())


async def _one_row(store: JobStore, sql: str, **params: Any) -> tuple[Any, ...]:
    async with store.engine.connect() as conn:
        return tuple((await conn.execute(text(sql), params)).one())


def _completion(
    content: str = "hi", model: str = "gpt-4o-mini", usage: dict[str, Any] | None = None
) -> bytes:
    """A chat completion's body as a server sends it (without usage when none is given)."""
    completion: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        completion["usage"] = usage
    return orjson.dumps(completion)


async def _run_against(
    store: JobStore, make_file: MakeFile, handler: Any, rows: list[Any]
) -> tuple[RunReport, list[Any]]:
    """Submit `rows`, run them against a local server answering with `handler`: the report and
    the jobs' rows (`_job_rows`)."""
    async with running(handler) as base_url:
        batch_id = (await submit_file(store, make_file(rows), base_url=base_url)).batch.id
        rep = await _run(store, batch_id)
    return rep, await _job_rows(store, batch_id)


async def test_every_job_succeeds_and_everything_is_kept(
    store: JobStore, make_file: MakeFile
) -> None:
    rows = [chat(f"question {i}", metadata={"i": i}) for i in range(150)]
    async with FakeServer(FakeConfig(seed=3)) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        rep = await _run(store, batch_id)
        assert rep.exit_code == EXIT_OK and rep.result.reason is StopReason.DONE
        assert srv.stats.requests_total == 150
        assert len(srv.stats.requests_by_body) == 150
    jobs = await _job_rows(store, batch_id)
    assert {j.state for j in jobs} == {"succeeded"}
    for j in jobs:
        completion = ChatCompletion.model_validate_json(j.response)
        assert completion.usage is not None
        assert j.prompt_tokens == completion.usage.prompt_tokens
        assert j.completion_tokens == completion.usage.completion_tokens
        assert j.total_tokens == completion.usage.total_tokens
        assert j.request_id and j.request_id.startswith("req_")
        assert j.attempts == 1 and j.r_attempts == 1 and j.latency_ms >= 0
        assert f"question {j.line - 1}" in (completion.choices[0].message.content or "")
    assert await _count(store, "SELECT COUNT(*) FROM results") == 150
    assert await _count(store, "SELECT COUNT(*) FROM attempts WHERE error_kind IS NULL") == 150


# 408 and 409 are classified in test_client.py; the fake server does not script them.
TRANSIENT = [
    "500x2",
    "502x1",
    "503x1",
    "504x2",
    "429x2",
    "truncatedx2",
    "non_completionx1",
    "resetx2",
]


@pytest.mark.parametrize("fault", TRANSIENT)
async def test_transient_faults_are_retried_until_success(
    store: JobStore, make_file: MakeFile, fault: str
) -> None:
    times = fault.rsplit("x", 1)[1]
    rows = [chat(f"fine {i}") for i in range(5)] + [chat(f"[[fault:{fault}]] please")]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        rep = await _run(store, batch_id)
        assert rep.exit_code == EXIT_OK
    jobs = await _job_rows(store, batch_id)
    faulty = jobs[-1]
    assert faulty.state == "succeeded"
    assert faulty.attempts == int(times) + 1
    kinds = [a.error_kind for a in await store.attempts_of(faulty.id)]
    assert kinds[-1] is None and all(k for k in kinds[:-1]) and len(kinds) == int(times) + 1


async def test_a_request_that_never_answers_is_cut_at_the_timeout(
    store: JobStore, make_file: MakeFile
) -> None:
    rows = [chat("[[fault:hangx1]] a"), chat("[[fault:tricklex1]] b"), chat("c")]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        rep = await _run(store, batch_id, replace(FAST, timeout_s=0.6))
        assert rep.exit_code == EXIT_OK
    jobs = await _job_rows(store, batch_id)
    assert [j.attempts for j in jobs] == [2, 2, 1]
    for j in jobs[:2]:
        assert [a.error_kind for a in await store.attempts_of(j.id)] == ["timeout", None]


@pytest.mark.parametrize(
    ("status", "kind"), [("400", "http_400"), ("404", "http_404"), ("422", "http_422")]
)
async def test_requests_that_cannot_succeed_fail_at_once(
    store: JobStore, make_file: MakeFile, status: str, kind: str
) -> None:
    rows = [chat("ok"), chat(f"[[fault:{status}]] bad")]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        rep = await _run(store, batch_id)
        assert rep.exit_code == EXIT_SOME_FAILED
    ok, bad = await _job_rows(store, batch_id)
    assert ok.state == "succeeded"
    assert bad.state == "failed" and bad.attempts == 1
    assert bad.error_kind == kind and bad.last_status == int(status)
    assert "error" in orjson.loads(bad.last_error)  # the error body as received
    assert bad.response is None


async def test_an_answer_carrying_a_nul_character_is_recorded(
    store: JobStore, make_file: MakeFile
) -> None:
    # PostgreSQL's text cannot hold NUL: such an answer must not stop the run (nor every
    # run after it, each sending the request again).
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    raw = _completion("a\u0000b", model="gpt\u0000mini", usage=usage)

    async def handler(request: web.Request) -> web.StreamResponse:
        if "error" in (await request.text()):
            return web.Response(status=400, body=b"bad\x00request", content_type="text/plain")
        return web.Response(body=raw, content_type="application/json")

    rep, (bad, good) = await _run_against(
        store, make_file, handler, [chat("error please"), chat("fine")]
    )
    assert rep.exit_code == EXIT_SOME_FAILED and rep.result.reason is StopReason.DONE
    assert bad.state == "failed" and bad.last_error == "bad\ufffdrequest"
    assert good.state == "succeeded"
    assert good.response == raw.decode()  # as received, the escape with it
    assert orjson.loads(good.response)["choices"][0]["message"]["content"] == "a\x00b"
    saved = await _one_row(store, "SELECT model FROM results WHERE job_id = :j", j=good.id)
    assert saved == ("gpt\ufffdmini",)


async def test_names_in_an_answer_longer_than_their_columns_are_cut(
    store: JobStore, make_file: MakeFile
) -> None:
    # A request id or a model longer than its column would fail every record of the run on
    # PostgreSQL: they are cut to fit (on both databases), the completion kept whole.
    raw = _completion(model="m" * (MODEL_CHARS + 50))
    request_id = "r" * (REQUEST_ID_CHARS + 50)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=raw, content_type="application/json", headers={"x-request-id": request_id}
        )

    rep, (job,) = await _run_against(store, make_file, handler, [chat("hello")])
    assert rep.exit_code == 0 and rep.result.reason is StopReason.DONE
    assert job.state == "succeeded" and job.response == raw.decode()
    saved = await _one_row(
        store, "SELECT model, request_id FROM results WHERE job_id = :j", j=job.id
    )
    assert saved == ("m" * MODEL_CHARS, "r" * REQUEST_ID_CHARS)
    logged = await _one_row(store, "SELECT request_id FROM attempts WHERE job_id = :j", j=job.id)
    assert logged == ("r" * REQUEST_ID_CHARS,)


async def test_an_answer_with_an_empty_model_name_is_counted_under_the_requests_model(
    store: JobStore, make_file: MakeFile
) -> None:
    # status listed a model named "" (unpriced, its cost left out of the total) while export
    # priced the row by the request's model; a --max-cost run then refused to start.
    usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=_completion(model="", usage=usage), content_type="application/json"
        )

    rep, _ = await _run_against(store, make_file, handler, [chat("hello", model="gpt-4o")])
    assert rep.exit_code == 0
    status = await report.batch_status(store, rep.batch.id, PriceBook())
    assert [m.usage.model for m in status.models] == ["gpt-4o"]
    assert status.unpriced_models == [] and status.cost_usd > 0


async def test_header_bytes_that_are_not_utf8_are_recorded(
    store: JobStore, make_file: MakeFile
) -> None:
    # aiohttp keeps such bytes as lone surrogates, which neither the answer journal's JSON nor
    # either database can hold: one such request id broke the worker and stopped every run.
    # Here a raw server writes them, as a proxy speaking Latin-1 might: in the request id of a
    # completion, and in the reason phrase and Location of a redirect (which stops the run).
    completion = _completion()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        if b"redirect" in body:
            await asyncio.sleep(0.5)  # (the other answer first)
            status = b"307 Temporary Red\xe9rect\r\nLocation: http://h\xf4te.example/v1"
            payload = b"<html>Moved</html>"
        else:
            status = b"200 OK\r\nx-request-id: req-caf\xe9-\xff\xfe"
            payload = completion
        writer.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nConnection: close"
            b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        path = make_file([chat("hello"), chat("redirect me")])
        batch_id = (await submit_file(store, path, base_url=f"http://127.0.0.1:{port}/v1")).batch.id
        rep = await _run(store, batch_id)
    finally:
        server.close()
        await server.wait_closed()
    assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.AUTH
    assert (rep.result.message or "").startswith(
        "the API redirects to http://h\ufffdte.example/v1 (HTTP 307 Temporary Red\ufffdrect):"
        " fix the base URL (run --base-url)"
    )
    good, moved = await _job_rows(store, batch_id)
    assert good.state == "succeeded" and good.response == completion.decode()
    assert good.request_id == "req-caf\ufffd-\ufffd\ufffd"
    assert moved.state == "pending"


async def test_token_counts_no_column_can_hold_are_not_counts(
    store: JobStore, make_file: MakeFile
) -> None:
    # A gateway's usage with counts past what a results column holds (2**40 overflows
    # PostgreSQL's integer, 1e300 every integer) must not stop the run, nor every run after
    # it: the completion is kept as received, the counts taken for missing (and with them
    # what the answer used: a total alone says nothing of its price).
    raw = _completion(usage={"prompt_tokens": 2**40, "completion_tokens": 1e300, "total_tokens": 7})

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, content_type="application/json")

    rep, (job,) = await _run_against(store, make_file, handler, [chat("hello")])
    assert rep.exit_code == 0 and rep.result.reason is StopReason.DONE
    assert job.state == "succeeded" and job.response == raw.decode()
    counts = await _one_row(
        store,
        "SELECT prompt_tokens, completion_tokens, total_tokens FROM results WHERE job_id = :j",
        j=job.id,
    )
    assert counts == (None, None, None)


async def test_a_bug_in_recording_stops_the_run_and_keeps_its_answers(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write that fails with something other than a database error is a bug: retrying it
    # cannot help, and a writer that died of it left every worker waiting for a commit that
    # never came. The run stops at once; its answers wait in its journal for the next run,
    # which records them without sending anything again.
    real_record = store.record

    async def broken_record(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("a bug in the write")

    monkeypatch.setattr(store, "record", broken_record)
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file([chat(f"q{i}") for i in range(20)]), srv)
        rep = await asyncio.wait_for(_run(store, batch_id), timeout=60)
        assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.ERROR
        assert "a bug in the write" in (rep.result.message or "")
        sent = srv.stats.requests_total
        assert sent >= 1
        assert {row.state for row in await _job_rows(store, batch_id)} <= {"pending", "running"}

        monkeypatch.setattr(store, "record", real_record)
        again = await _run(store, batch_id)
        assert again.exit_code == EXIT_OK
        assert srv.stats.requests_total == sent + (20 - again.result.stats.recovered)
        assert again.result.stats.recovered >= 1
    assert {row.state for row in await _job_rows(store, batch_id)} == {"succeeded"}


async def test_jobs_of_a_claim_whose_answer_was_lost_are_sent(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim committed and the connection dropped before its rows came back: the retry
    # claimed others under a new token, and the lost claim's jobs stayed leased to the run,
    # renewed by its heartbeats, while the run waited for them for ever.
    claim = JobStore.claim
    calls = 0

    async def answer_lost(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        jobs = await claim(self, *args, **kwargs)
        if calls == 2 and jobs:
            raise StoreError("connection was closed in the middle of operation")
        return jobs

    monkeypatch.setattr(JobStore, "claim", answer_lost)
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file([chat(f"q{i}") for i in range(200)]), srv)
        rep = await asyncio.wait_for(_run(store, batch_id, replace(FAST, concurrency=4)), 60)
        assert rep.exit_code == EXIT_OK and rep.result.unfinished == 0
        assert srv.stats.requests_total == 200 and len(srv.stats.requests_by_body) == 200
    assert calls > 2


async def test_ends_written_by_a_record_whose_answer_was_lost_count_as_recorded(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The record committed and the connection dropped before its answer: the record tried
    # again found its jobs ended, and the run reported them as "late answers not recorded"
    # (taken by another worker or cancelled), out of its succeeded count.
    record = store.record
    calls = 0

    async def answer_lost(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        outcome = await record(*args, **kwargs)
        if calls == 2:
            raise StoreError("connection was closed in the middle of operation")
        return outcome

    monkeypatch.setattr(store, "record", answer_lost)
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file([chat(f"q{i}") for i in range(100)]), srv)
        rep = await asyncio.wait_for(_run(store, batch_id, replace(FAST, concurrency=4)), 60)
    assert rep.exit_code == EXIT_OK and calls > 3
    assert (rep.result.stats.succeeded, rep.result.stats.fenced) == (100, 0)


async def test_a_job_dropped_for_its_lapsed_lease_is_sent_when_no_one_else_has_it(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process stopped past its lease (a laptop asleep, a paused machine) drops the jobs it
    # was about to send: another worker may have them. None had: its own heartbeats renewed
    # them, and the run waited for them for ever.
    alive = dispatcher.Dispatcher._lease_alive
    dropped: set[int] = set()

    def lapsed_once(self: dispatcher.Dispatcher, job: ClaimedJob) -> bool:
        if job.line % 50 == 0 and job.id not in dropped:
            dropped.add(job.id)
            return False
        return alive(self, job)

    monkeypatch.setattr(dispatcher.Dispatcher, "_lease_alive", lapsed_once)
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file([chat(f"q{i}") for i in range(200)]), srv)
        rep = await asyncio.wait_for(_run(store, batch_id), 60)
        assert rep.exit_code == EXIT_OK and rep.result.unfinished == 0
        assert rep.result.stats.lost_leases == len(dropped) == 4
        assert srv.stats.requests_total == 200 and len(srv.stats.requests_by_body) == 200


@pytest.mark.parametrize("concurrency", [1, 16])
async def test_a_forced_stop_waits_for_no_database(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    # A second Ctrl-C while the database hangs (another session's lock, a network partition):
    # the run waited for its last write, its give-back and its counts for as long as that
    # lasted. It stops now; its answers wait in its journal, and the next run records them
    # (with one at a time, every answer is in the write cut short: the journal must stay).
    record, counts = store.record, store.counts
    hung = asyncio.Event()

    async def hanging(*args: Any, **kwargs: Any) -> Any:
        hung.set()
        await asyncio.Event().wait()

    async with FakeServer(FakeConfig(latency_ms=20)) as srv:
        batch_id = await _submit(store, make_file([chat(f"q{i}") for i in range(100)]), srv)
        batch = await store.get_batch(batch_id)
        # (A short lease: this process, alive, is not taken for dead, so the next run waits
        # for the forced run's leases to lapse.)
        short = replace(FAST, lease_s=1.0, concurrency=concurrency)
        run = dispatcher.Dispatcher(store, batch, short, api_key=None, base_url=srv.url)
        monkeypatch.setattr(store, "record", hanging)
        task = asyncio.create_task(run.run())
        await asyncio.wait_for(hung.wait(), 30)
        monkeypatch.setattr(store, "counts", hanging)  # (at the end of the run)
        run.stop()
        await asyncio.sleep(0.2)
        run.force_stop()
        result = await asyncio.wait_for(task, 10)
        assert result.reason is StopReason.INTERRUPTED
        sent = srv.stats.requests_total

        monkeypatch.setattr(store, "record", record)
        monkeypatch.setattr(store, "counts", counts)
        again = await _run(store, batch_id)
        assert again.exit_code == EXIT_OK and again.result.stats.recovered > 0
        assert srv.stats.requests_total == sent + 100 - result.stats.succeeded
    assert len(srv.stats.requests_by_body) == 100


INLINE_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 40_000}}


@pytest.mark.parametrize(
    ("extra", "usage", "unreported"),
    [
        ({}, None, 500 / 4),  # no cap, no usage: the answer's characters / 4
        ({"max_tokens": 50}, None, 0.0),  # the cap was charged
        # ...also beside an inline image, whose estimate is counted part by part.
        (
            {
                "model": "gpt-4o",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": [INLINE_IMAGE]}],
            },
            None,
            0.0,
        ),
        ({}, {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}, 0.0),
    ],
)
def test_what_an_answer_without_usage_used_is_charged_to_the_token_pacing(
    extra: dict[str, Any], usage: dict[str, Any] | None, unreported: float
) -> None:
    row = parse_line(orjson.dumps(chat("hi", stream=True, **extra)), 1)
    job = ClaimedJob(1, "c", 1, row.endpoint, row.body, row.model, True, row.est_tokens, 0, "t")
    answer = orjson.loads(_completion("x" * 200, usage=usage))
    body = orjson.dumps(answer).decode().ljust(500)
    outcome = Outcome(OutcomeKind.SUCCESS, 200, body=body, completion=answer)
    assert dispatcher._unreported_tokens(job, outcome) == unreported


async def test_a_bug_in_coordination_stops_the_run(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without its coordinator a run's leases would lapse unseen and other workers take its
    # jobs: it stops instead, and the next run finishes the batch.
    real_view = store.coordination_view
    looks = 0

    async def broken_view(*args: Any, **kwargs: Any) -> Any:
        nonlocal looks
        looks += 1
        if looks == 1:  # the look before the first request (join)
            return await real_view(*args, **kwargs)
        raise TypeError("a bug in coordination")

    monkeypatch.setattr(store, "coordination_view", broken_view)
    async with FakeServer(FakeConfig(latency_ms=50)) as srv:
        batch_id = await _submit(store, make_file([chat(f"q{i}") for i in range(2_000)]), srv)
        slow = replace(FAST, concurrency=4)
        rep = await asyncio.wait_for(_run(store, batch_id, slow), timeout=60)
        assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.ERROR
        assert "internal error in the coordinator" in (rep.result.message or "")
        assert "a bug in coordination" in (rep.result.message or "")
        assert rep.result.unfinished > 0
        monkeypatch.setattr(store, "coordination_view", real_view)
        again = await _run(store, batch_id, replace(FAST, concurrency=64))
    assert again.exit_code == EXIT_OK and again.result.unfinished == 0


async def test_attempts_are_capped(store: JobStore, make_file: MakeFile) -> None:
    rows = [chat("[[fault:500]] always")]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        rep = await _run(store, batch_id, replace(FAST, max_attempts=3))
        assert rep.exit_code == EXIT_SOME_FAILED
        assert srv.stats.requests_total == 3
    (job,) = await _job_rows(store, batch_id)
    assert job.state == "failed" and job.attempts == 3 and job.error_kind == "server_error"


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (FakeConfig(api_key="right-key"), StopReason.AUTH),
        (FakeConfig(quota_exhausted=True), StopReason.QUOTA),
        (FakeConfig(quota_exhausted=True, quota_status=402), StopReason.QUOTA),
    ],
)
async def test_bad_key_or_empty_balance_stops_the_run(
    store: JobStore,
    make_file: MakeFile,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    config: FakeConfig,
    reason: StopReason,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "wrong-key")
    rows = [chat(f"q{i}") for i in range(200)]
    async with FakeServer(config) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        with caplog.at_level(logging.WARNING):
            rep = await _run(store, batch_id, replace(FAST, concurrency=4))
        assert rep.exit_code == EXIT_ABORTED and rep.result.reason is reason
        # The run stopped early: not every job was tried.
        assert srv.stats.requests_total < 50
    counts = await store.counts(batch_id)
    assert counts.counts["pending"] == 200, "jobs stay pending, to be resumed"
    assert rep.result.message and "wrong-key" not in rep.result.message
    assert "lost track" not in caplog.text


async def test_a_stop_that_waits_for_requests_in_flight_says_so(
    store: JobStore,
    make_file: MakeFile,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused key while slow requests were in flight: the run waited the whole grace
    period with nothing on stderr, then said the key was refused."""
    rows = [chat("[[fault:hang]] a"), chat("[[fault:hang]] b"), chat("[[fault:401]] c")]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        with caplog.at_level(logging.WARNING, logger="batchrunner.dispatcher"):
            rep = await _run(store, batch_id, replace(FAST, concurrency=3, grace_s=0.3))
    assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.AUTH
    assert "stopping: waiting up to 0.3s for 2 request(s) in flight" in caplog.text


async def test_a_run_resumes_after_a_bad_key_is_fixed(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [chat(f"q{i}") for i in range(30)]
    async with FakeServer(FakeConfig(api_key="good")) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        monkeypatch.setenv("OPENAI_API_KEY", "bad")
        assert (await _run(store, batch_id)).exit_code == EXIT_ABORTED
        monkeypatch.setenv("OPENAI_API_KEY", "good")
        rep = await _run(store, batch_id)
        assert rep.exit_code == EXIT_OK
    assert (await store.counts(batch_id)).counts["succeeded"] == 30


async def test_attempts_that_stopped_a_run_or_were_rate_limited_leave_the_next_its_retries(
    store: JobStore, make_file: MakeFile
) -> None:
    """A refused key stopped its run, not the job, and a 429 has its own cap: neither uses up
    the --max-attempts of the run that resumes the job. Before, the two 429s and the 401 of
    the first run left the second one attempt, and the job failed on its first 500."""
    script = [429, 429, 401, 401, 500, 500, 200]
    received: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        status = script[len(received)]
        received.append(status)
        if status == 200:
            return web.Response(body=_completion(), content_type="application/json")
        code = "invalid_api_key" if status == 401 else None
        error = {"error": {"message": f"answer {status}", "code": code}}
        return web.json_response(error, status=status, headers={"retry-after-ms": "10"})

    config = replace(FAST, max_attempts=3)
    async with running(handler) as base_url:
        batch_id = (await submit_file(store, make_file([chat("q")]), base_url=base_url)).batch.id
        for sent in (3, 4):
            assert (await _run(store, batch_id, config)).exit_code == EXIT_ABORTED
            (job,) = await _job_rows(store, batch_id)
            assert (job.state, job.attempts, len(received)) == ("pending", sent, sent)
        rep = await _run(store, batch_id, config)
    assert rep.exit_code == EXIT_OK
    (job,) = await _job_rows(store, batch_id)
    assert (job.state, job.attempts, job.r_attempts) == ("succeeded", 7, 7)
    assert received == script


async def test_a_server_limit_below_the_configured_rate_makes_no_job_fail(
    store: JobStore, make_file: MakeFile
) -> None:
    rows = [chat(f"q{i}") for i in range(40)]
    async with FakeServer(FakeConfig(rpm_limit=1200)) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        rep = await _run(store, batch_id, replace(FAST, rpm=2400, max_attempts=2))
        assert rep.exit_code == EXIT_OK
        assert srv.stats.successes == 40
    assert (await store.counts(batch_id)).counts["succeeded"] == 40


async def test_an_api_that_cannot_be_reached_for_a_while_fails_almost_no_job(
    store: JobStore,
    make_file: MakeFile,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused connections (the API down, the network lost) used up every job's --max-attempts
    in its own backoff: here all 30 jobs had failed within a second, before the server came up;
    overnight an outage of an hour failed the whole batch. Now one request at a time goes until
    the API answers."""
    monkeypatch.setattr(limiter, "OUTAGE_SILENCE_S", 0.3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows = [chat(f"q{i}") for i in range(30)]
    base_url = f"http://127.0.0.1:{port}/v1"
    batch_id = (await submit_file(store, make_file(rows), base_url=base_url)).batch.id
    config = replace(
        FAST, concurrency=8, max_attempts=2, retry_base_s=0.5, retry_max_s=0.5, retry_jitter_s=0.05
    )
    with caplog.at_level(logging.WARNING, logger="batchrunner.limiter"):
        going = asyncio.ensure_future(_run(store, batch_id, config))
        await asyncio.sleep(2.5)
        assert not going.done()
        async with FakeServer(FakeConfig(), port=port) as srv:
            rep = await going
    counts = (await store.counts(batch_id)).counts
    assert (
        counts["succeeded"] + counts["failed"] == 30 and srv.stats.successes == counts["succeeded"]
    )
    # Those whose last attempt went before the outage was told, or as one of its single tries.
    assert counts["failed"] <= 6, counts
    assert rep.exit_code == (EXIT_OK if counts["failed"] == 0 else EXIT_SOME_FAILED)
    assert "no answer from the API for " in caplog.text
    assert "the API answers again" in caplog.text


async def test_streams_are_reassembled(store: JobStore, make_file: MakeFile) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    rows = [
        chat("stream text", stream=True, stream_options={"include_usage": True}),
        chat("stream tools", stream=True, tools=[tool], tool_choice="required"),
        chat("stream n", stream=True, n=2, stream_options={"include_usage": True}),
        chat("[[fault:stream_cutx1]] cut", stream=True),
    ]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
    text_job, tools_job, n_job, cut_job = await _job_rows(store, batch_id)
    c = ChatCompletion.model_validate_json(text_job.response)
    assert c.object == "chat.completion" and "stream text" in (c.choices[0].message.content or "")
    assert c.usage is not None and text_job.total_tokens == c.usage.total_tokens
    t = ChatCompletion.model_validate_json(tools_job.response)
    assert t.choices[0].finish_reason == "tool_calls"
    (call,) = t.choices[0].message.tool_calls or []
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    orjson.loads(call.function.arguments)  # type: ignore[union-attr]
    n = ChatCompletion.model_validate_json(n_job.response)
    assert [ch.index for ch in n.choices] == [0, 1]
    assert cut_job.state == "succeeded" and cut_job.attempts == 2
    assert [a.error_kind for a in await store.attempts_of(cut_job.id)] == ["stream_broken", None]


async def test_running_a_finished_batch_again_sends_nothing(
    store: JobStore, make_file: MakeFile
) -> None:
    rows = [chat(f"q{i}") for i in range(10)]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        await _run(store, batch_id)
        before = srv.stats.requests_total
        rep = await _run(store, batch_id)
        assert rep.exit_code == EXIT_OK and srv.stats.requests_total == before
    assert await _count(store, "SELECT COUNT(*) FROM results") == 10


async def test_claims_go_on_after_the_last_and_look_back_for_expired_leases(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = (await submit_file(store, make_file([chat(f"q{i}") for i in range(8)]))).batch.id
    now = time.time()
    # The jobs of one load have consecutive ids, in line order.
    first = [job.id for job in await store.claim(batch_id, "w-a", "t1", 3, now, 1.0)]
    j1 = first[0]
    assert first == [j1, j1 + 1, j1 + 2]
    onward = await store.claim(batch_id, "w-b", "t2", 2, now, 60.0, after=j1 + 3)
    assert [job.id for job in onward] == [j1 + 4, j1 + 5]
    # w-a's leases have run out; only a claim that looks for expired leases takes them.
    later = now + 5
    rest = await store.claim(batch_id, "w-b", "t3", 8, later, 60.0, expire_leases=False)
    assert [job.id for job in rest] == [j1 + 3, j1 + 6, j1 + 7]
    taken = await store.claim(batch_id, "w-b", "t4", 8, later, 60.0)
    assert [job.id for job in taken] == first


def _claimed(job_id: int) -> ClaimedJob:
    return ClaimedJob(
        job_id, f"c{job_id}", job_id, "/v1/chat/completions", "{}", "m", False, 1, 0, "t"
    )


async def test_the_job_queue_hands_each_job_to_one_worker_in_claim_order() -> None:
    queue = dispatcher._JobQueue()
    assert queue.take() is None
    taken: list[int] = []

    async def worker() -> None:
        while True:
            job = queue.take()
            if job is None:
                await queue.wait()
                continue
            taken.append(job.id)
            await asyncio.sleep(0)
            queue.task_done()

    workers = [asyncio.create_task(worker()) for _ in range(3)]
    await asyncio.sleep(0)  # all three wait
    queue.put([_claimed(i) for i in range(1, 6)])
    assert queue.qsize() == 5
    await asyncio.wait_for(queue.join(), 5)
    assert sorted(taken) == [1, 2, 3, 4, 5]
    assert taken[:3] == [1, 2, 3] and queue.qsize() == 0
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


async def test_a_worker_cancelled_after_it_was_woken_passes_the_job_on() -> None:
    queue = dispatcher._JobQueue()
    first = asyncio.create_task(queue.wait())
    second = asyncio.create_task(queue.wait())
    await asyncio.sleep(0)
    queue.put([_claimed(1)])  # wakes the first waiter only
    first.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 5)  # the second is woken in its place
    assert queue.take() == _claimed(1)
    queue.task_done()
    await asyncio.wait_for(queue.join(), 5)


async def test_jobs_given_back_behind_the_claims_are_sent(
    store: JobStore, make_file: MakeFile
) -> None:
    """A run claims on from its last claim; jobs that become pending behind it (here: the
    first three, whose worker's lease runs out while the run goes on) are found when it looks
    back, and every job is sent once by this run."""
    rows = [chat(f"q{i}") for i in range(200)]
    async with FakeServer(FakeConfig(latency_ms=20)) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        held = await store.claim(batch_id, "w-gone", "w-gone.1", 3, time.time(), 1.0)
        rep = await _run(store, batch_id, replace(FAST, concurrency=4))
        assert rep.exit_code == EXIT_OK
        assert srv.stats.requests_total == 200
    states = await _count(
        store,
        "SELECT COUNT(*) FROM jobs WHERE batch_id = :b AND state = 'succeeded'",
        b=batch_id,
    )
    assert states == 200 and len(held) == 3


async def test_a_worker_holds_only_a_short_stretch_of_work(
    store: JobStore, make_file: MakeFile
) -> None:
    """Claims are sized by the run's pace: the first worker on a slow batch does not take it
    all, so that workers joining from other machines find jobs left to take."""
    rows = [chat(f"paced {i}") for i in range(300)]
    async with FakeServer(FakeConfig(latency_ms=200)) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        running = asyncio.create_task(_run(store, batch_id))
        held = []
        while not running.done() and srv.stats.requests_total < 150:
            held.append(
                await _count(
                    store,
                    "SELECT COUNT(*) FROM jobs WHERE batch_id = :b AND state = 'running'",
                    b=batch_id,
                )
            )
            await asyncio.sleep(0.05)
        report = await running
    assert report.exit_code == EXIT_OK
    # 16 in flight, about half a second of work (40 jobs at 80/s) claimed ahead, and the
    # next claim taken while one is still queued.
    assert held and max(held) <= 120, max(held)


async def test_a_cancel_that_comes_as_the_stop_is_set_is_not_dropped() -> None:
    """A worker waiting out a retry's backoff waits on the stop too. asyncio.wait_for on
    Python 3.11 drops a cancel that comes once the event is set and before the waiter
    resumes: the worker went on, and the run's end waited for it for ever (about 2 stops in
    100 under a soak, a second Ctrl-C ignored)."""
    stop = asyncio.Event()
    resumed = []

    async def retrying() -> None:
        await dispatcher._set_within(stop, 5.0)
        resumed.append(True)  # what went on after the cancel

    task = asyncio.create_task(retrying())
    await asyncio.sleep(0)  # waiting on the stop
    stop.set()
    await asyncio.sleep(0)  # the event's waiter has finished; the worker has not resumed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert resumed == []
    assert await dispatcher._set_within(stop, 0.01) is True
    assert await dispatcher._set_within(asyncio.Event(), 0.01) is False


async def test_tasks_that_go_on_after_a_cancel_are_cancelled_again() -> None:
    went_on = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            went_on.set()  # as a dropped cancel would leave it: going on
        await asyncio.sleep(60)

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(dispatcher._cancelled([task]), 10)
    assert went_on.is_set() and task.cancelled()


async def test_a_paced_worker_holds_a_few_seconds_of_sending(
    store: JobStore, make_file: MakeFile
) -> None:
    """At --rpm 300 a worker claimed 2 x --concurrency jobs at a time whatever the pace (128
    at 64, half a minute of sending): a run joining the batch found them all taken, and sat
    idle while its share of the rate went unused. A claim holds PACED_CLAIM_S of sending."""
    rows = [chat(f"paced {i}") for i in range(150)]
    async with FakeServer(FakeConfig(latency_ms=20)) as srv:
        batch = (await submit_file(store, make_file(rows), base_url=srv.url)).batch
        config = RunConfig(concurrency=64, rpm=300, flush_s=0.05)
        run = Dispatcher(store, batch, config, api_key=None, base_url=srv.url)
        running = asyncio.create_task(run.run())
        held = []
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            held.append(
                await _count(
                    store,
                    "SELECT COUNT(*) FROM jobs WHERE batch_id = :b AND state = 'running'",
                    b=batch.id,
                )
            )
            await asyncio.sleep(0.05)
        run.stop()
        await asyncio.wait_for(running, 30)
    # 5 a second: claims of 10, two of them queued at most, and one in flight.
    assert held and max(held) <= 2 * 10 + 2, max(held)


async def test_claims_of_large_bodies_hold_a_bounded_number_of_characters(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests carrying images as base64: a claim takes as many jobs as fit in
    CLAIM_BODY_CHARS (hundreds of them held gigabytes), and MIN_CLAIM_ROWS before a claim has
    shown how large the bodies are."""
    monkeypatch.setattr(dispatcher, "CLAIM_BODY_CHARS", 200_000)
    picture = "data:image/png;base64," + "A" * 40_000
    rows = [
        {
            "model": "gpt-4o-mini",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"what is in picture {i}?"},
                        {"type": "image_url", "image_url": {"url": picture}},
                    ],
                }
            ],
        }
        for i in range(80)
    ]
    claims: list[tuple[int, int]] = []
    claim = JobStore.claim

    async def counted(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        jobs = await claim(self, *args, **kwargs)
        if jobs:
            claims.append((len(jobs), sum(len(job.body) for job in jobs)))
        return jobs

    monkeypatch.setattr(JobStore, "claim", counted)
    async with FakeServer(FakeConfig(latency_ms=10)) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        report = await _run(store, batch_id)
        assert report.exit_code == EXIT_OK
        assert srv.stats.requests_total == 80
    (first_rows, _), *later = claims
    assert first_rows == dispatcher.MIN_CLAIM_ROWS
    body = max(chars // rows for rows, chars in claims)
    assert later and all(chars <= 200_000 for _, chars in later), later
    assert all(rows == 200_000 // body for rows, _ in later[:-1]), later
