"""`run --max-cost`: the cap holds under concurrency, the run stops cleanly and resumes."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from batchrunner import journal, limiter, report
from batchrunner.config import RunConfig
from batchrunner.dispatcher import Budget, Dispatcher, StopReason, worst_case_cost
from batchrunner.errors import BudgetExceeded
from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.pricing import PriceBook, usage_from_completion
from batchrunner.runner import EXIT_ABORTED, EXIT_OK, RunReport, run
from batchrunner.store import AttemptRecord, JobStore
from batchrunner.tokens import estimate_request
from tests.conftest import chat, coordinator, succeeded
from tests.test_client import running
from tests.test_run import _completion

MakeFile = Callable[..., Path]

JOBS = 120
#: Small caps: each answer costs about a quarter of its worst case, so a run near the cap has
#: many requests in flight whose reservations are far above what they will cost.
MAX_OUTPUT_TOKENS = 20
BASE = RunConfig(
    concurrency=16,
    max_attempts=3,
    timeout_s=5.0,
    retry_base_s=0.01,
    retry_max_s=0.05,
    retry_jitter_s=0.01,
    flush_s=0.05,
    grace_s=2.0,
)


def _rows(n: int = JOBS, **extra: Any) -> list[dict[str, Any]]:
    return [
        chat(f"question {i}", max_completion_tokens=MAX_OUTPUT_TOKENS, **extra) for i in range(n)
    ]


def _worst_case(body: dict[str, Any]) -> Decimal:
    est = estimate_request(body)
    cost = PriceBook().worst_case_cost(est.model, est.prompt_tokens, est.worst_case_output_tokens)
    assert cost is not None
    return cost


async def _run(store: JobStore, batch_id: str, cap: Decimal | None) -> RunReport:
    config = replace(BASE, max_cost_usd=None if cap is None else float(cap))
    return await run(
        store, batch_id, config, warn=lambda _: None, progress=False, install_signals=False
    )


async def _cost(store: JobStore, batch_id: str) -> Decimal:
    return (await report.batch_status(store, batch_id, PriceBook())).cost_usd


async def test_the_cap_holds_under_concurrency_and_a_higher_cap_resumes(
    store: JobStore, make_file: MakeFile
) -> None:
    rows = _rows()
    worst = max(_worst_case(r) for r in rows)
    cap = 25 * worst
    async with FakeServer(FakeConfig(latency_ms=30)) as srv:
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        rep = await _run(store, batch_id, cap)
        assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.BUDGET
        assert rep.result.message and "--max-cost" in rep.result.message
        # Six decimals under a dollar: with four, a cap of cents said "spent $0.0000".
        assert re.search(r"\(spent \$0\.\d{6}\b", rep.result.message), rep.result.message
        assert srv.stats.max_in_flight > 1, "requests were in flight together"
        spent = await _cost(store, batch_id)
        assert 0 < spent <= cap
        counts = (await store.counts(batch_id)).counts
        assert counts["succeeded"] > 0 and counts["pending"] > 0
        assert counts["running"] == counts["failed"] == 0, "stopped cleanly, jobs pending"
        assert counts["succeeded"] == srv.stats.successes, "every answer was recorded"

        higher = 100 * worst
        rep = await _run(store, batch_id, higher)
        assert rep.exit_code == EXIT_OK and rep.result.reason is StopReason.DONE
        assert (await store.counts(batch_id)).counts["succeeded"] == JOBS
        assert srv.stats.requests_total == JOBS, "nothing was sent twice"
        assert spent < await _cost(store, batch_id) <= higher


async def test_two_runs_of_a_batch_at_once_keep_to_one_cap(
    store: JobStore, make_file: MakeFile
) -> None:
    """Each run counted the batch's cost when it started and its own spending after: two runs
    sharing a batch (two machines) each spent up to the cap, together twice it."""
    rows = _rows(400)
    worst = max(_worst_case(r) for r in rows)
    cap = 40 * worst
    config = replace(BASE, concurrency=4, max_cost_usd=float(cap))
    async with FakeServer(FakeConfig(latency_ms=200)) as srv:
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        reports = await asyncio.gather(
            *(
                run(store, batch_id, config, warn=lambda _: None, progress=False,
                    install_signals=False)
                for _ in range(2)
            )
        )  # fmt: skip
        assert {r.result.reason for r in reports} == {StopReason.BUDGET}
        assert srv.stats.max_in_flight > 4, "the two runs sent at once"
    spent = await _cost(store, batch_id)
    # Each counts what the other reports once a second: a second's spending may get past.
    assert cap / 2 < spent <= cap * Decimal("1.25")


async def test_the_run_stops_only_when_the_cap_is_used_up(
    sqlite_url: str, make_file: MakeFile
) -> None:
    rows = _rows()
    worst = max(_worst_case(r) for r in rows)
    cap = 25 * worst
    async with await JobStore.open(sqlite_url) as store, FakeServer(FakeConfig()) as srv:
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        rep = await _run(store, batch_id, cap)
        assert rep.result.reason is StopReason.BUDGET
        spent = await _cost(store, batch_id)
    # What is left of the cap could not pay for one more request's worst case.
    assert cap - spent < 2 * worst


async def test_a_model_without_a_price_sends_nothing(store: JobStore, make_file: MakeFile) -> None:
    async with FakeServer(FakeConfig()) as srv:
        rows = _rows(5, model="house-model")
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        rep = await _run(store, batch_id, Decimal(1))
        assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.BUDGET
        assert rep.result.message and "house-model" in rep.result.message
        assert srv.stats.requests_total == 0
    assert (await store.counts(batch_id)).counts["pending"] == 5


async def test_a_request_dearer_than_the_cap_is_not_sent(
    store: JobStore, make_file: MakeFile
) -> None:
    rows = _rows(3)
    async with FakeServer(FakeConfig()) as srv:
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        rep = await _run(store, batch_id, _worst_case(rows[0]) / 2)
        assert rep.result.reason is StopReason.BUDGET and srv.stats.requests_total == 0
    assert (await store.counts(batch_id)).counts["pending"] == 3
    assert await _cost(store, batch_id) == 0


async def test_a_batch_at_its_cap_is_refused(store: JobStore, make_file: MakeFile) -> None:
    async with FakeServer(FakeConfig()) as srv:
        batch_id = (await submit_file(store, make_file(_rows(4)), base_url=srv.url)).batch.id
        assert (await _run(store, batch_id, None)).exit_code == EXIT_OK
        spent = await _cost(store, batch_id)
        with pytest.raises(BudgetExceeded, match="already cost"):
            await _run(store, batch_id, spent)


async def test_what_a_killed_run_kept_in_its_journal_counts_before_anything_is_sent(
    store: JobStore, make_file: MakeFile
) -> None:
    """Answers a killed run had received and not yet written wait in its journal for the next
    run, which recorded them only after it had counted what the batch had cost: it went past
    --max-cost by them (up to a run's concurrency of answers), and said it had spent less."""
    async with FakeServer(FakeConfig()) as srv:
        batch_id = (await submit_file(store, make_file(_rows(4)), base_url=srv.url)).batch.id
        t0 = time.time()
        jobs = await store.claim(batch_id, "w-killed", "w-killed.1", 2, t0, 60.0)
        directory = journal.directory_for(store)
        assert directory is not None and len(jobs) == 2
        killed = journal.Journal(directory, batch_id, "w-killed")
        for job in jobs:
            answer = succeeded(job, "paid for", prompt_tokens=100_000, total_tokens=100_004)
            killed.add(answer, [AttemptRecord(job.id, 200, None, 12.0, "req_1", t0)])
        killed.close(committed=False)  # (as the kernel leaves a dead run's: unlocked, kept)
        kept_cost = PriceBook().cost("gpt-4o-mini", usage_from_completion(_USAGE_OF_TWO))
        assert kept_cost is not None and kept_cost > 0

        with pytest.raises(BudgetExceeded, match="already cost"):
            await _run(store, batch_id, kept_cost / 2)

        assert srv.stats.requests_total == 0
    assert (await store.counts(batch_id)).counts["succeeded"] == 2
    assert await _cost(store, batch_id) == kept_cost


#: The usage of the two answers the killed run kept, together.
_USAGE_OF_TWO = {
    "usage": {"prompt_tokens": 200_000, "completion_tokens": 8, "total_tokens": 200_008}
}


async def test_answers_without_usage_count_their_worst_case_in_the_next_run_too(
    store: JobStore, make_file: MakeFile
) -> None:
    """A stream without include_usage reports no usage. The run that received such answers
    counted their worst case; the next one started from the known cost, $0, and sent the
    cap's worth again (and `status` said the batch had cost $0)."""
    rows = _rows(6)
    worst = _worst_case(rows[0])
    assert all(_worst_case(r) == worst for r in rows)
    received: list[str] = []

    async def no_usage(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        received.append(body["messages"][-1]["content"])
        return web.Response(body=_completion("ok", body["model"]), content_type="application/json")

    config = replace(BASE, concurrency=1, max_cost_usd=float(worst * Decimal("2.5")))
    async with running(no_usage) as base_url:
        batch_id = (await submit_file(store, make_file(rows), base_url=base_url)).batch.id
        for _ in range(2):
            rep = await run(
                store, batch_id, config, warn=lambda _: None, progress=False, install_signals=False
            )
            assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.BUDGET
    assert len(received) == 2, "the second run counted the first's answers at their worst case"

    status = await report.batch_status(store, batch_id, PriceBook())
    assert status.without_usage == 2 and status.known_cost_usd is None
    as_json = status.to_json()
    assert as_json["cost_usd"] is None and as_json["results_without_usage"] == 2
    assert as_json["models"][0]["cost_usd"] is None
    text = report.render_status(status)
    assert "cost      unknown" in text and "2 without usage: tokens and cost unknown" in text


# --- answers paid for and tried again ---------------------------------------------------------

SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"a": {"type": "string"}},
            "required": ["a"],
            "additionalProperties": False,
        },
    },
}


def _schema_rows(*texts: str) -> list[dict[str, Any]]:
    return [
        chat(text, max_completion_tokens=MAX_OUTPUT_TOKENS, response_format=SCHEMA_FORMAT)
        for text in texts
    ]


def _paid_answers(received: list[str]) -> Any:
    """A server whose answers use exactly the request's worst case (its estimated prompt and
    its maximum output), so each costs what the cap reserves for it. A request whose text
    says "matches after N" matches the schema from its N+1th answer on; others never do."""

    async def handler(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        text = body["messages"][-1]["content"]
        received.append(text)
        misses = int(text.rsplit(" ", 1)[1]) if text.startswith("matches after") else 10**6
        content = '{"a": "yes"}' if received.count(text) > misses else '{"b": 1}'
        est = estimate_request(body)
        usage = {
            "prompt_tokens": est.prompt_tokens,
            "completion_tokens": est.worst_case_output_tokens,
            "total_tokens": est.prompt_tokens + est.worst_case_output_tokens,
        }
        completion = _completion(content, body["model"], usage)
        return web.Response(body=completion, content_type="application/json")

    return handler


async def test_answers_tried_again_for_their_schema_count_in_tokens_and_cost(
    store: JobStore, make_file: MakeFile
) -> None:
    """Each answer that missed the schema was paid for. Before, only the job's last answer
    counted: `status` showed a third of the tokens spent here."""
    rows = _schema_rows("matches after 2", "never matches")
    received: list[str] = []
    config = replace(BASE, retry_invalid_json=True, max_attempts=3)
    async with running(_paid_answers(received)) as base_url:
        batch_id = (await submit_file(store, make_file(rows), base_url=base_url)).batch.id
        rep = await run(
            store, batch_id, config, warn=lambda _: None, progress=False, install_signals=False
        )
    assert rep.result.reason is StopReason.DONE and len(received) == 6
    per_answer = [
        estimate_request(r).prompt_tokens + estimate_request(r).worst_case_output_tokens
        for r in rows
    ]
    assert rep.result.stats.tokens == 3 * sum(per_answer)  # the run's own count too
    status = await report.batch_status(store, batch_id, PriceBook())
    assert status.tokens["total_tokens"] == 3 * sum(per_answer)
    assert status.cost_usd == 3 * sum(_worst_case(r) for r in rows)
    (model,) = status.models
    assert model.usage.results == 1, "one result kept; the other answers count as spent"
    assert model.usage.discarded == 5
    assert status.to_json()["models"][0]["discarded_answers"] == 5
    assert "with 5 answer(s) paid for and not kept" in report.render_status(status)


async def test_answers_whose_choice_failed_count_in_tokens_and_cost(
    store: JobStore, make_file: MakeFile
) -> None:
    """A choice that ended in an error (OpenRouter: the model failed part way) is tried again,
    and what it used was billed: status showed 400 tokens where the server billed 20,600."""
    seen: list[str] = []
    usage = {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010}

    async def handler(request: web.Request) -> web.Response:
        text = orjson.loads(await request.read())["messages"][-1]["content"]
        seen.append(text)
        if seen.count(text) == 1:
            failed_part_way = {
                "object": "chat.completion",
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "error",
                        "message": {"role": "assistant", "content": "Hal"},
                        "error": {"code": 502, "message": "Upstream failed"},
                    }
                ],
                "usage": usage,
            }
            return web.json_response(failed_part_way)
        return web.Response(body=_completion("fine", usage=usage), content_type="application/json")

    async with running(handler) as base_url:
        batch_id = (await submit_file(store, make_file(_rows(4)), base_url=base_url)).batch.id
        rep = await _run(store, batch_id, Decimal(1))
    assert rep.exit_code == EXIT_OK and len(seen) == 8
    status = await report.batch_status(store, batch_id, PriceBook())
    assert status.tokens["total_tokens"] == rep.result.stats.tokens == 8 * 1010
    (model,) = status.models
    assert (model.usage.results, model.usage.discarded) == (4, 4)


@pytest.mark.parametrize("billed", ["stream cut after its usage", "no choices", "choices: []"])
async def test_failed_answers_that_report_their_usage_count_in_tokens_and_cost(
    store: JobStore, make_file: MakeFile, billed: str
) -> None:
    """A stream cut after its usage came, a 200 without choices and a prompt the provider
    blocked (`choices: []`) each said what they were billed: counted $0, in status and against
    --max-cost (a run passed its cap 2.4 times over on streams cut so)."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010}
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        text = body["messages"][-1]["content"]
        seen.append(text)
        again = seen.count(text) > 1
        if billed == "stream cut after its usage":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {"object": "chat.completion.chunk", "model": "gpt-4o-mini"}
            delta = {"index": 0, "delta": {"role": "assistant", "content": "Hal"}}
            if again:
                delta["finish_reason"] = "stop"
            await response.write(b"data: " + orjson.dumps({**chunk, "choices": [delta]}) + b"\n\n")
            usage_chunk = {**chunk, "choices": [], "usage": usage}
            await response.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
            if again:
                await response.write(b"data: [DONE]\n\n")
            # (Else cut: the connection ends before a finish_reason or [DONE].)
            return response
        if again:
            return web.Response(
                body=_completion("fine", usage=usage), content_type="application/json"
            )
        answer: dict[str, Any] = {
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "usage": usage,
        }
        if billed == "choices: []":
            answer["choices"] = []
        return web.json_response(answer)

    stream = {"stream": True, "stream_options": {"include_usage": True}}
    rows = _rows(3, **(stream if billed.startswith("stream") else {}))
    async with running(handler) as base_url:
        batch_id = (await submit_file(store, make_file(rows), base_url=base_url)).batch.id
        rep = await _run(store, batch_id, Decimal(1))
    status = await report.batch_status(store, batch_id, PriceBook())
    (model,) = status.models
    if billed == "choices: []":
        # Blocked: the job fails at once, its answer paid for.
        assert len(seen) == 3 and (model.usage.results, model.usage.discarded) == (0, 3)
    else:
        assert rep.exit_code == EXIT_OK and len(seen) == 6
        assert (model.usage.results, model.usage.discarded) == (3, 3)
    assert status.tokens["total_tokens"] == rep.result.stats.tokens == len(seen) * 1010
    one = PriceBook().cost("gpt-4o-mini", usage_from_completion({"usage": usage}))
    assert one is not None and status.cost_usd == len(seen) * one


async def test_the_cap_counts_every_answer_paid_for(store: JobStore, make_file: MakeFile) -> None:
    """A job tried again for its schema reserved its worst case once and settled it once: the
    cap held a third of what three answers cost, and a run under a cap of four answers went
    on sending until every job had failed."""
    rows = _schema_rows(*(f"never matches {i}" for i in range(6)))
    worst = _worst_case(rows[0])
    assert all(_worst_case(r) == worst for r in rows)
    received: list[str] = []
    config = replace(
        BASE,
        concurrency=1,
        retry_invalid_json=True,
        max_attempts=3,
        max_cost_usd=float(worst * Decimal("4.5")),
    )
    async with running(_paid_answers(received)) as base_url:
        batch_id = (await submit_file(store, make_file(rows), base_url=base_url)).batch.id
        rep = await run(
            store, batch_id, config, warn=lambda _: None, progress=False, install_signals=False
        )
    assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.BUDGET
    assert len(received) == 4
    assert await _cost(store, batch_id) == 4 * worst


async def test_an_answer_dearer_than_its_reservation_is_said(
    store: JobStore, make_file: MakeFile, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that ignores max_tokens: answers cost more than their requests could, and a
    run passed its --max-cost without a word (exit 0)."""
    usage = {"prompt_tokens": 20, "completion_tokens": 50_000, "total_tokens": 50_020}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=_completion("long", usage=usage), content_type="application/json")

    async with running(handler) as base_url:
        batch_id = (await submit_file(store, make_file(_rows(3)), base_url=base_url)).batch.id
        with caplog.at_level(logging.WARNING, logger="batchrunner.dispatcher"):
            await _run(store, batch_id, Decimal(1))
    said = [r for r in caplog.records if "--max-cost may be passed" in r.getMessage()]
    assert len(said) == 1, "said once"
    assert said[0].getMessage().startswith("an answer cost $0.030003 where its request")


def test_a_reservation_takes_the_dearest_price_the_request_may_finish_at() -> None:
    """A request is priced when it finishes: one sent off-peak that finished after 00:30 UTC
    (DeepSeek's price four times higher) was reserved at the off-peak price, and a run passed
    its --max-cost 3.5 times over."""
    body = orjson.dumps(chat("q", model="deepseek-chat", max_tokens=8_000))
    book = PriceBook()
    before = datetime(2026, 12, 7, 0, 29, 50, tzinfo=UTC)
    after = before + timedelta(seconds=600)
    off_peak = worst_case_cost(body, book, now=before)
    peak = worst_case_cost(body, book, now=after)
    assert peak > off_peak
    assert worst_case_cost(body, book, within_s=600, now=before) == peak
    assert worst_case_cost(body, book, within_s=5, now=before) == off_peak
    # A price that does not change with the hour is the same whatever the wait.
    plain = orjson.dumps(chat("q", max_tokens=8_000))
    assert worst_case_cost(plain, book, within_s=600, now=before) == worst_case_cost(plain, book)


async def test_other_workers_reservations_are_waited_for_not_taken_as_spent() -> None:
    """A run that joined beside another holding most of the cap in reservations gave up at
    once: exit 1, "spent 98 %" of a cap the batch had spent 1 % of."""
    budget = Budget(Decimal(10), Decimal(0), PriceBook())
    budget.others_spent(Decimal(1), Decimal(8))
    waiting = asyncio.ensure_future(budget.reserve(Decimal(2)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    budget.others_spent(Decimal(3), Decimal(0))  # their requests settled, at 2
    assert await waiting
    assert (budget.spent_usd, budget.reserved_usd) == (3, 2)
    budget.settle(Decimal(2), Decimal(1))
    assert not await budget.reserve(Decimal(7))  # 4 spent: nothing left to wait for


async def test_other_workers_count_from_this_runs_start_and_stopped_ones_hold_nothing(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = (await submit_file(store, make_file(_rows(3)))).batch.id
    now = time.time()
    await store.register_worker("w-before", batch_id, now - 10)
    await store.publish_spending("w-before", 5.0, 2.0)
    budget = Budget(Decimal(100), Decimal(0), PriceBook())
    looker = coordinator(store, batch_id, "w-me", budget=budget)

    async def others() -> tuple[Decimal, Decimal]:
        await looker.look()
        return budget.others_spent_usd, budget.others_reserved_usd

    # What it had spent when this run started is in the batch's cost already.
    assert await others() == (0, 2)
    await store.publish_spending("w-before", 7.0, 1.0)
    assert await others() == (2, 1)
    # One that started since counts in full.
    await store.register_worker("w-after", batch_id, now + 10)
    await store.publish_spending("w-after", 3.0, 0.5)
    assert await others() == (5, Decimal("1.5"))
    # One that stopped keeps what it spent; what it held reserved is no longer held.
    await store.stop_worker("w-before", time.time())
    assert await others() == (5, Decimal("0.5"))


async def test_jobs_waiting_their_turn_or_a_retry_hold_no_reservation(
    sqlite_url: str, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each job reserved its worst case before waiting its turn, and kept it through its
    retries' waits: a run whose API did not answer held them all for as long as the outage
    lasted, and another run of the batch, counting them, stopped sending."""
    monkeypatch.setattr(limiter, "OUTAGE_SILENCE_S", 0.3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    rows = _rows(20)
    worst = max(_worst_case(r) for r in rows)
    config = replace(BASE, concurrency=8, max_attempts=50, retry_base_s=0.2, retry_max_s=0.2)
    config = replace(config, max_cost_usd=float(100 * worst))
    async with await JobStore.open(sqlite_url) as store:
        batch = (await submit_file(store, make_file(rows), base_url=closed)).batch
        dispatcher = Dispatcher(store, batch, config, api_key=None, base_url=closed)
        running = asyncio.create_task(dispatcher.run())
        held = []
        for _ in range(20):
            await asyncio.sleep(0.1)
            assert dispatcher.budget is not None
            held.append(dispatcher.budget.reserved_usd)
        dispatcher.stop()
        await asyncio.wait_for(running, 30)
    # At most the requests out at that moment: one at a time, once the outage is told.
    assert max(held[10:]) <= worst, [h / worst for h in held]
