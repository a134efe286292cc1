"""Export: CSV and JSONL read back, totals against `status`, costs by hand, exports mid-run."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion
from sqlalchemy import text

from batchrunner import export as export_module
from batchrunner import exportrows, report
from batchrunner import store as store_module
from batchrunner.bulk import OrderedWorkers
from batchrunner.config import RunConfig
from batchrunner.database import SqliteTarget
from batchrunner.errors import BatchNotFound, StoreError
from batchrunner.export import CANCELLED_CODE, export_batch, export_requests
from batchrunner.exportrows import CSV_COLUMNS, MAX_META_COLUMNS
from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.models import JobState
from batchrunner.pricing import PriceBook
from batchrunner.runner import EXIT_OK, EXIT_SOME_FAILED, RunReport, run
from batchrunner.store import AttemptRecord, Ended, JobStore
from tests.conftest import chat, failed, succeeded, write_jsonl

MakeFile = Callable[..., Path]

FAST = RunConfig(
    concurrency=8,
    max_attempts=3,
    timeout_s=5.0,
    retry_base_s=0.01,
    retry_max_s=0.05,
    retry_jitter_s=0.01,
    flush_s=0.05,
    grace_s=2.0,
)

#: Echoed back by the fake server (it repeats the first 40 characters of the last user text):
#: quotes, a comma, both kinds of line end, an emoji and accents must all survive the CSV.
TRICKY = 'say "hi",\nthen\r\n😀 ünï — ok'
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ODD_CUSTOM_ID = 'id,with "quotes"\nand a newline'

#: OpenAI's published prices per million tokens (the figures genai-prices ships):
#: (input, cached input, output). Reasoning tokens are output tokens.
PUBLISHED_PER_MTOK = {
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.075"), Decimal("0.60")),
    "o4-mini": (Decimal("1.10"), Decimal("0.275"), Decimal("4.40")),
}


async def _run(store: JobStore, batch_id: str, config: RunConfig = FAST) -> RunReport:
    return await run(
        store, batch_id, config, warn=lambda _: None, progress=False, install_signals=False
    )


async def _submit(store: JobStore, path: Path, srv: FakeServer | None = None) -> str:
    base_url = srv.url if srv is not None else "http://127.0.0.1:9/v1"
    return (await submit_file(store, path, base_url=base_url)).batch.id


def _read_csv(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


async def _csv(store: JobStore, batch_id: str, **kw: Any) -> tuple[list[str], list[dict[str, str]]]:
    out = io.BytesIO()
    written = await export_batch(store, batch_id, out, fmt="csv", **kw)
    rows = _read_csv(out.getvalue())
    assert written == len(rows)
    header = next(csv.reader(io.StringIO(out.getvalue().decode(), newline="")))
    return header, rows


async def _jsonl(store: JobStore, batch_id: str, **kw: Any) -> list[dict[str, Any]]:
    out = io.BytesIO()
    written = await export_batch(store, batch_id, out, fmt="jsonl", **kw)
    lines = out.getvalue().splitlines()
    assert written == len(lines)
    return [orjson.loads(line) for line in lines]


def _mixed_rows() -> list[Any]:
    return [
        chat("plain", metadata={"topic": "a", "n": 1}),
        chat(TRICKY, metadata={"topic": 'ü,"q"\nx', "nested": {"k": [1, 2]}, "flag": True}),
        chat("three", n=3, metadata={"topic": "c", "ключ": "значение"}),
        chat("tools", tools=[TOOL], tool_choice="required"),
        chat("[[fault:400]] bad", metadata={"topic": "e"}),
        {"custom_id": ODD_CUSTOM_ID, "method": "POST", "url": "/v1/chat/completions",
         "body": chat("batch line")},
    ]  # fmt: skip


async def _mixed_batch(store: JobStore, make_file: MakeFile) -> str:
    async with FakeServer(FakeConfig(seed=7)) as srv:
        batch_id = await _submit(store, make_file(_mixed_rows()), srv)
        assert (await _run(store, batch_id)).exit_code == EXIT_SOME_FAILED
    return batch_id


async def test_csv_reads_back_and_adds_up_to_status(store: JobStore, make_file: MakeFile) -> None:
    batch_id = await _mixed_batch(store, make_file)
    header, rows = await _csv(store, batch_id)
    metas = ["meta.flag", "meta.n", "meta.nested", "meta.topic", "meta.ключ"]
    assert header == [*CSV_COLUMNS, *metas]
    by_id: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_id.setdefault(row["custom_id"], []).append(row)
    assert list(by_id) == ["line-1", "line-2", "line-3", "line-4", "line-5", ODD_CUSTOM_ID]
    assert [r["line"] for r in rows] == ["1", "2", "3", "3", "3", "4", "5", "6"]

    plain, tricky = by_id["line-1"][0], by_id["line-2"][0]
    assert plain["content"] == "echo: plain" and plain["finish_reason"] == "stop"
    assert plain["state"] == "succeeded" and plain["choice"] == "0"
    assert plain["model"] == "gpt-4o-mini" and plain["status_code"] == "200"
    assert plain["request_id"].startswith("req_") and plain["attempts"] == "1"
    assert float(plain["latency_ms"]) >= 0 and plain["error"] == plain["error_kind"] == ""
    assert (plain["meta.topic"], plain["meta.n"], plain["meta.flag"]) == ("a", "1", "")
    assert tricky["content"] == f"echo: {TRICKY}", "quotes, newlines and unicode survive"
    assert tricky["meta.topic"] == 'ü,"q"\nx' and tricky["meta.flag"] == "true"
    assert orjson.loads(tricky["meta.nested"]) == {"k": [1, 2]}
    assert tricky["meta.ключ"] == "" and by_id["line-3"][0]["meta.ключ"] == "значение"

    # n = 3: a row per choice; usage and cost once per request, on choice 0.
    first, *others = by_id["line-3"]
    assert [r["choice"] for r in by_id["line-3"]] == ["0", "1", "2"]
    assert [r["content"] for r in by_id["line-3"]] == [f"echo: three #{i}" for i in range(3)]
    assert int(first["total_tokens"]) > 0 and Decimal(first["cost_usd"]) > 0
    for row in others:
        assert row["meta.topic"] == "c" and row["request_id"] == first["request_id"]
        usage = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
        assert all(row[k] == "" for k in (*usage, "total_tokens", "cost_usd"))

    tools = by_id["line-4"][0]
    assert tools["finish_reason"] == "tool_calls" and tools["content"] == ""
    (call,) = orjson.loads(tools["tool_calls"])
    assert call["type"] == "function" and call["function"]["name"] == "lookup"
    assert "city" in orjson.loads(call["function"]["arguments"])
    assert all(r["tool_calls"] == "" for r in rows if r["custom_id"] != "line-4")

    (failed,) = by_id["line-5"]
    assert failed["state"] == "failed" and failed["error_kind"] == "http_400"
    assert failed["status_code"] == "400" and failed["error"] == "Invalid value for 'messages'."
    assert (
        failed["choice"] == failed["content"] == failed["cost_usd"] == failed["total_tokens"] == ""
    )
    assert failed["meta.topic"] == "e" and failed["attempts"] == "1"
    # The failed answer's own request id and latency, from its last attempt.
    assert failed["request_id"].startswith("req_") and failed["request_id"] != plain["request_id"]
    assert float(failed["latency_ms"]) >= 0

    status = await report.batch_status(store, batch_id)
    for key, total in status.tokens.items():
        assert sum(int(r[key] or 0) for r in rows) == total, key
    assert sum(Decimal(r["cost_usd"] or 0) for r in rows) == status.cost_usd > 0


async def test_a_job_that_failed_after_retries_shows_its_last_attempt(
    store: JobStore, make_file: MakeFile
) -> None:
    async with FakeServer(FakeConfig(seed=7)) as srv:
        batch_id = await _submit(store, make_file([chat("[[fault:500]] down")]), srv)
        config = replace(FAST, max_attempts=3)
        assert (await _run(store, batch_id, config)).exit_code == EXIT_SOME_FAILED
    async with store.reading() as conn:
        tried = (await conn.execute("SELECT request_id FROM attempts ORDER BY started_at")).all()
    assert len(tried) == 3 and len({r for (r,) in tried}) == 3
    _, (row,) = await _csv(store, batch_id)
    assert (row["attempts"], row["request_id"]) == ("3", tried[-1][0])


async def test_jsonl_is_the_openai_batch_output_format(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _mixed_batch(store, make_file)
    records = await _jsonl(store, batch_id)
    assert [r["custom_id"] for r in records] == [
        "line-1", "line-2", "line-3", "line-4", "line-5", ODD_CUSTOM_ID,
    ]  # fmt: skip
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        assert list(record) == ["id", "custom_id", "response", "error"]
        assert record["id"].startswith("batch_req_")
        if record["custom_id"] == "line-5":
            continue
        response = record["response"]
        assert record["error"] is None and response["status_code"] == 200
        assert response["request_id"].startswith("req_")
        completion = ChatCompletion.model_validate(response["body"])
        assert completion.object == "chat.completion" and completion.usage is not None
    assert len(records[2]["response"]["body"]["choices"]) == 3
    failed = records[4]
    # As OpenAI's error files have it: the error answer in `response`, and no `error`
    # (which is for requests that failed without an HTTP error).
    assert failed["error"] is None
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["request_id"].startswith("req_")
    assert failed["response"]["body"]["error"]["param"] == "messages"
    # The same export, again, is the same bytes: ids are stable.
    assert await _jsonl(store, batch_id) == records


async def test_jsonl_lines_stay_one_line_for_readers_that_split_on_unicode_breaks(
    store: JobStore, make_file: MakeFile
) -> None:
    """JSON lets U+2028, U+2029 and U+0085 stand unescaped in strings, and an answer embedded
    as received kept them raw: `Path.read_text().splitlines()` (a common way to read JSONL)
    cut its line in three, none of them JSON. Escaped, the value is the same."""
    batch_id = await _submit(store, make_file([chat("q\u2028one"), chat("q\u0085two")]))
    jobs = await store.claim(batch_id, "w-test", "t-1", 10, time.time(), 60.0)
    content = "a\u2028b\u2029c\u0085d \\\u2028 \u2013"  # (and a backslash, an en dash)
    completion = {"object": "chat.completion", "choices": [{"message": {"content": content}}]}
    raw = orjson.dumps(completion).decode()
    assert "\u2028" in raw  # (orjson leaves them raw, as APIs may send them)
    ended = [succeeded(job, "x", response=raw) for job in jobs]
    assert (await store.record(batch_id, "w-test", ended, [], time.time())).recorded == 2
    out = io.BytesIO()
    assert await export_batch(store, batch_id, out, fmt="jsonl") == 2
    lines = out.getvalue().decode().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert orjson.loads(line)["response"]["body"] == completion
    # The request lines export (`--as-requests`) holds the prompts' breaks escaped too.
    requests = io.BytesIO()
    await export_requests(store, batch_id, requests, states=(JobState.SUCCEEDED,))
    assert len(requests.getvalue().decode().splitlines()) == 2


async def test_jsonl_keeps_the_reason_of_an_error_answer_that_is_not_json(
    store: JobStore, make_file: MakeFile
) -> None:
    """An error page (a proxy's, a CDN's) leaves the response's body null: the reason goes in
    `error`, as for failures without an answer. Left null, the line said nothing of why."""
    batch_id = await _submit(store, make_file([chat("q")]))
    (job,) = await store.claim(batch_id, "w-test", "t-1", 10, time.time(), 60.0)
    page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
    end = failed(job, attempts=3, status_code=502, error_kind="server_error", error=page)
    assert (await store.record(batch_id, "w-test", [end], [], time.time())).recorded == 1
    (record,) = await _jsonl(store, batch_id)
    assert record["response"]["status_code"] == 502 and record["response"]["body"] is None
    assert record["error"] == {"code": "server_error", "message": page}


@pytest.mark.parametrize(
    ("error_kind", "kept"),
    [
        ("bad_json", '{"id": "chatcmpl-1", "choices": [{"ind'),
        ("not_completion", '{"ok": true}'),
        (
            "invalid_json",
            '{"object": "chat.completion", "choices": [{"index": 0, "message": {"role":'
            ' "assistant", "content": "not the schema"}, "finish_reason": "stop"}]}',
        ),
    ],
)
async def test_jsonl_a_2xx_answer_that_failed_is_no_response(
    store: JobStore, make_file: MakeFile, error_kind: str, kept: str
) -> None:
    """A job failed on a 200 (truncated JSON, no completion, a json_schema not met): OpenAI
    writes a 200 only for answers, so such a line has `response` null and says why in `error`.
    With `"status_code": 200` beside the error, a reader that takes 200 for a success broke on
    the null body, or took the schema's miss for an answer."""
    batch_id = await _submit(store, make_file([chat("q")]))
    (job,) = await store.claim(batch_id, "w-test", "t-1", 10, time.time(), 60.0)
    end = failed(job, attempts=3, status_code=200, error_kind=error_kind, error=kept)
    assert (await store.record(batch_id, "w-test", [end], [], time.time())).recorded == 1
    (record,) = await _jsonl(store, batch_id)
    assert record["response"] is None
    assert record["error"] == {"code": error_kind, "message": kept}


async def test_failed_only_and_a_request_file_to_send_them_again(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    batch_id = await _mixed_batch(store, make_file)
    _, rows = await _csv(store, batch_id, failed_only=True)
    assert [(r["custom_id"], r["state"]) for r in rows] == [("line-5", "failed")]
    records = await _jsonl(store, batch_id, failed_only=True)
    assert [r["custom_id"] for r in records] == ["line-5"] and records[0]["response"][
        "status_code"
    ] == 400

    again = tmp_path / "failed.jsonl"
    with again.open("wb") as out:
        assert await export_requests(store, batch_id, out) == 1
    (line,) = (orjson.loads(x) for x in again.read_bytes().splitlines())
    assert line == {
        "custom_id": "line-5",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": chat("[[fault:400]] bad"),
        "metadata": {"topic": "e"},
    }
    resubmitted = await submit_file(store, again)
    assert resubmitted.created and resubmitted.jobs == 1
    with io.BytesIO() as out:
        states = (JobState.SUCCEEDED, JobState.FAILED)
        assert await export_requests(store, batch_id, out, states=states) == 6


async def test_cancelled_jobs_are_exported_as_openai_does(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _submit(store, make_file([chat(f"q{i}") for i in range(3)]))
    assert await _jsonl(store, batch_id) == [], "nothing has ended yet"
    await store.cancel(batch_id)
    records = await _jsonl(store, batch_id)
    assert [r["response"] for r in records] == [None] * 3
    assert {r["error"]["code"] for r in records} == {CANCELLED_CODE}
    _, rows = await _csv(store, batch_id)
    assert [r["state"] for r in rows] == ["cancelled"] * 3
    assert await _jsonl(store, batch_id, failed_only=True) == []


async def test_a_job_sent_before_the_cancel_says_so(store: JobStore, make_file: MakeFile) -> None:
    """A request in flight when the batch was cancelled: its answer came, was paid for (kept
    among the discarded answers) and logged, and the export said "not executed", 0 attempts."""
    batch_id = await _submit(store, make_file([chat("sent"), chat("never")]))
    job, _ = await store.claim(batch_id, "w-test", "t-1", 10, time.time(), 60.0)
    await store.cancel(batch_id)
    started = time.time()
    spent = ("gpt-4o-mini", 9, 0, 3, 0, 12)
    attempt = AttemptRecord(job.id, 200, None, 12.5, "req_late", started, spent=spent)
    answer = replace(failed(job, attempts=1, status_code=200), state=JobState.SUCCEEDED)
    outcome = await store.record(batch_id, "w-test", [answer], [attempt], time.time())
    assert outcome.fenced == 1
    sent, never = await _jsonl(store, batch_id)
    assert sent["error"] == {
        "code": CANCELLED_CODE,
        "message": "This request was sent (1 attempt(s)) before the batch was cancelled;"
        " no answer was kept.",
    }
    assert never["error"]["message"] == export_module.CANCELLED_MESSAGE
    _, rows = await _csv(store, batch_id)
    assert [(r["state"], r["attempts"]) for r in rows] == [("cancelled", "1"), ("cancelled", "0")]
    # Paid for, in status's figures and in no export row: status says how much of them.
    status = await report.batch_status(store, batch_id, PriceBook())
    late = status.to_json()["discarded"]
    assert late["answers"] == 1 and late["total_tokens"] == status.tokens["total_tokens"] == 12
    assert late["prompt_tokens"] == 9 and late["completion_tokens"] == 3
    assert late["cost_usd"] == pytest.approx(float(status.cost_usd)) and late["cost_usd"] > 0
    assert not any(r["total_tokens"] for r in rows)
    shown = report.render_status(status)
    assert f"with 1 answer(s) paid for and not kept, ${late['cost_usd']:.6f} of it" in shown
    # None: nothing of the kind.
    fresh = await _submit(store, make_file([chat("x")], name="fresh.jsonl"))
    none = (await report.batch_status(store, fresh, PriceBook())).to_json()["discarded"]
    assert none == {
        "answers": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": 0,
        "cost_usd": 0.0,
    }


async def test_an_export_during_a_run_holds_what_has_ended(
    store: JobStore, make_file: MakeFile
) -> None:
    total = 40
    rows = [chat(f"slow {i}", metadata={"i": i}) for i in range(total)]
    async with FakeServer(FakeConfig(latency_ms=100)) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        running = asyncio.create_task(_run(store, batch_id, replace(FAST, concurrency=4)))
        deadline = time.monotonic() + 30
        while (await store.counts(batch_id)).counts["succeeded"] < 8:
            assert time.monotonic() < deadline and not running.done()
            await asyncio.sleep(0.02)
        ended_before = (await store.counts(batch_id)).counts["succeeded"]
        _, partial = await _csv(store, batch_id)
        ended_after = (await store.counts(batch_id)).counts["succeeded"]
        records = await _jsonl(store, batch_id)
        assert not running.done(), "the run was still going"
        # Exactly the jobs that had ended when the export read them: no running one.
        assert ended_before <= len(partial) <= ended_after < total
        assert len(partial) <= len(records) < total
        assert {r["state"] for r in partial} == {"succeeded"}
        assert all(r["error"] is None for r in records)
        assert all(int(r["meta.i"]) == int(r["line"]) - 1 for r in partial)
        assert (await running).exit_code == EXIT_OK
    _, complete = await _csv(store, batch_id)
    assert len(complete) == total
    final = {r["custom_id"]: r for r in complete}
    assert all(final[r["custom_id"]] == r for r in partial), "an ended job does not change"


def _cost_by_hand(model: str, row: dict[str, str]) -> Decimal:
    per_input, per_cached, per_output = PUBLISHED_PER_MTOK[model]
    prompt, cached = int(row["prompt_tokens"]), int(row["cached_tokens"])
    output = int(row["completion_tokens"])  # reasoning included, billed as output
    return ((prompt - cached) * per_input + cached * per_cached + output * per_output) / 1_000_000


async def test_cached_and_reasoning_tokens_are_priced_as_published(
    store: JobStore, make_file: MakeFile
) -> None:
    # 6,000 characters: the fake server counts 1,500 prompt tokens and serves 1,408 from cache.
    long_prompt = "word " * 1_200
    rows = [
        chat(long_prompt + "mini"),
        chat(long_prompt + "reasoning", model="o4-mini", reasoning_effort="low"),
        chat("short reasoning", model="o4-mini"),
    ]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
    _, exported = await _csv(store, batch_id, prices=PriceBook())
    mini, cached_reasoning, reasoning = exported
    assert int(mini["cached_tokens"]) == 1_408 and mini["reasoning_tokens"] == "0"
    assert int(cached_reasoning["cached_tokens"]) == 1_408
    assert int(cached_reasoning["reasoning_tokens"]) == 64
    assert int(reasoning["reasoning_tokens"]) == 192 and reasoning["cached_tokens"] == "0"
    for row in exported:
        assert Decimal(row["cost_usd"]) == _cost_by_hand(row["model"], row), row["custom_id"]
    # Cached tokens are cheaper: the same usage without the cache would cost more.
    uncached = {**mini, "cached_tokens": "0"}
    assert _cost_by_hand("gpt-4o-mini", uncached) > Decimal(mini["cost_usd"])


async def test_an_unknown_price_is_empty_never_zero(store: JobStore, make_file: MakeFile) -> None:
    rows = [chat("house", model="house-model-1"), chat("known")]
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file(rows), srv)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
    _, (house, known) = await _csv(store, batch_id, prices=PriceBook())
    assert int(house["total_tokens"]) > 0 and house["cost_usd"] == ""
    assert Decimal(known["cost_usd"]) > 0
    prices = PriceBook.from_toml(
        '[models."house-model-1"]\ninput_per_mtok = 2\noutput_per_mtok = 8'
    )
    _, (house, _) = await _csv(store, batch_id, prices=prices)
    by_hand = (int(house["prompt_tokens"]) * 2 + int(house["completion_tokens"]) * 8) / Decimal(
        1_000_000
    )
    assert Decimal(house["cost_usd"]) == by_hand
    assert "E" not in house["cost_usd"], "plain decimal notation"


# --- without a server: results recorded through the store ------------------------------------


def _completion(content: str, n: int = 1, usage: bool = True) -> dict[str, Any]:
    completion: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_735_689_600,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i in range(n)
        ],
    }
    if usage:
        completion["usage"] = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    return completion


def _mini_usage(line: int) -> tuple[str, int, int]:
    return "gpt-4o-mini", 9, 3


async def _answer_all(
    store: JobStore,
    batch_id: str,
    answer: Callable[[int], dict[str, Any] | str],
    usage: Callable[[int], tuple[str, int, int]] = _mini_usage,
    *,
    limit: int = 10_000,
    started: float | None = None,
) -> None:
    """Claim every job (or `limit` of them) and record `answer(line)` as its completion (a str:
    sent as is), with the model and the prompt and completion tokens `usage(line)` in the
    result's columns; with `started`, each with one attempt started then."""
    jobs = await store.claim(batch_id, "w-test", "t-1", limit, time.time(), 60.0)
    ended = []
    for job in jobs:
        completion = answer(job.line)
        text = completion if isinstance(completion, str) else orjson.dumps(completion).decode()
        model, prompt, completed = usage(job.line)
        ended.append(
            Ended(
                job_id=job.id,
                lease_token=job.lease_token,
                state=JobState.SUCCEEDED,
                attempts=1,
                status_code=200,
                latency_ms=12.5,
                request_id=f"req_{job.line}",
                response=text,
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completed,
                cached_tokens=0,
                reasoning_tokens=0,
                total_tokens=prompt + completed,
            )
        )
    attempts = (
        []
        if started is None
        else [AttemptRecord(j.id, 200, None, 12.5, None, started) for j in jobs]
    )
    outcome = await store.record(batch_id, "w-test", ended, attempts, time.time())
    assert outcome.recorded == len(jobs)


async def test_text_and_binary_streams_and_the_excel_bom(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    batch_id = await _submit(store, make_file([chat("a"), chat("b")]))
    await _answer_all(store, batch_id, lambda line: _completion(f"ünïcode {line}"))
    binary = io.BytesIO()
    await export_batch(store, batch_id, binary, fmt="csv")
    text = io.StringIO(newline="")
    await export_batch(store, batch_id, text, fmt="csv")
    assert text.getvalue().encode() == binary.getvalue()
    assert not binary.getvalue().startswith(b"\xef\xbb\xbf")
    path = tmp_path / "excel.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        await export_batch(store, batch_id, f, fmt="csv", bom=True)
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and data[3:] == binary.getvalue()
    with path.open(encoding="utf-8-sig", newline="") as f:
        assert [r["content"] for r in csv.DictReader(f)] == ["ünïcode 1", "ünïcode 2"]
    lines = io.StringIO()
    await export_batch(store, batch_id, lines, fmt="jsonl")
    jsonl = io.BytesIO()
    await export_batch(store, batch_id, jsonl, fmt="jsonl")
    assert lines.getvalue().encode() == jsonl.getvalue()


async def test_odd_answers_export_cleanly(store: JobStore, make_file: MakeFile) -> None:
    """No usage (tokens and cost unknown, not 0), content as a list of parts, a pretty-printed
    body (JSONL must stay one line per job)."""
    batch_id = await _submit(store, make_file([chat("a"), chat("b"), chat("c")]))
    parts = _completion("x")
    parts["choices"][0]["message"]["content"] = [{"type": "text", "text": "part"}]
    pretty = orjson.dumps(_completion("pretty\nprinted"), option=orjson.OPT_INDENT_2).decode()
    answers: dict[int, dict[str, Any] | str] = {
        1: _completion("no usage", usage=False),
        2: parts,
        3: pretty,
    }
    await _answer_all(store, batch_id, answers.__getitem__)
    _, (no_usage, listed, pretty_row) = await _csv(store, batch_id)
    assert no_usage["content"] == "no usage"
    assert no_usage["total_tokens"] == no_usage["cost_usd"] == no_usage["prompt_tokens"] == ""
    assert orjson.loads(listed["content"]) == [{"type": "text", "text": "part"}]
    assert pretty_row["content"] == "pretty\nprinted" and pretty_row["total_tokens"] == "12"
    out = io.BytesIO()
    assert await export_batch(store, batch_id, out, fmt="jsonl") == 3
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert orjson.loads(lines[2])["response"]["body"] == orjson.loads(pretty)


async def test_usage_goes_on_the_row_of_choice_0_whatever_the_order(
    store: JobStore, make_file: MakeFile
) -> None:
    """Choices sent out of order: the usage went on the first row, numbered 1, and a sum
    over the rows of choice 0 left that answer out."""
    batch_id = await _submit(store, make_file([chat("a", n=3), chat("b", n=2)]))
    reversed_order = _completion("x", n=3)
    reversed_order["choices"].reverse()
    alike = _completion("y", n=2)
    for choice in alike["choices"]:
        choice["index"] = 0
    answers = {1: reversed_order, 2: alike}
    await _answer_all(store, batch_id, answers.__getitem__)
    _, rows = await _csv(store, batch_id)
    assert [(r["custom_id"], r["choice"], r["total_tokens"]) for r in rows] == [
        ("line-1", "2", ""),
        ("line-1", "1", ""),
        ("line-1", "0", "12"),
        ("line-2", "0", "12"),
        ("line-2", "0", ""),
    ]


async def test_too_many_metadata_keys_go_into_one_column(
    store: JobStore, make_file: MakeFile
) -> None:
    many = {f"k{i:03d}": i for i in range(MAX_META_COLUMNS + 1)}
    batch_id = await _submit(store, make_file([chat("a", metadata=many), chat("b")]))
    await store.cancel(batch_id)
    header, rows = await _csv(store, batch_id)
    assert header == [*CSV_COLUMNS, "meta"]
    assert orjson.loads(rows[0]["meta"]) == many and rows[1]["meta"] == ""


async def test_metadata_keys_with_control_characters(store: JobStore, make_file: MakeFile) -> None:
    """A NUL inside a key is cut short by SQLite's JSON functions and refused by PostgreSQL's
    text: such keys must still get their own column."""
    meta = {"a\x00b": 1, "tab\there": "x\x00y", "plain": "p"}
    batch_id = await _submit(store, make_file([chat("a", metadata=meta), chat("b")]))
    await store.cancel(batch_id)
    header, (first, second) = await _csv(store, batch_id)
    assert header == [*CSV_COLUMNS, "meta.a\x00b", "meta.plain", "meta.tab\there"]
    assert (first["meta.a\x00b"], first["meta.tab\there"], first["meta.plain"]) == (
        "1",
        "x\x00y",
        "p",
    )
    assert second["meta.a\x00b"] == second["meta.plain"] == ""


async def test_metadata_keys_kept_at_submit_or_read_from_the_jobs(
    store: JobStore, make_file: MakeFile
) -> None:
    """Submit keeps the keys for the header; a batch loaded before it did (NULL) has them
    read from its jobs, to the same file."""
    rows = [chat("a", metadata={"b": 1, "a": "x"}), chat("b", metadata={"c": None}), chat("c")]
    batch_id = await _submit(store, make_file(rows))
    await store.cancel(batch_id)
    kept_sql = text("SELECT meta_keys FROM batches WHERE id = :b")
    async with store.engine.connect() as conn:
        kept = (await conn.execute(kept_sql, {"b": batch_id})).scalar()
    assert orjson.loads(kept) == ["a", "b", "c"]
    exported = await _csv(store, batch_id)
    assert exported[0] == [*CSV_COLUMNS, "meta.a", "meta.b", "meta.c"]
    async with store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE batches SET meta_keys = NULL WHERE id = :b"), {"b": batch_id}
        )
    assert await _csv(store, batch_id) == exported
    assert [row["meta.b"] for row in exported[1]] == ["1", "", ""]


async def test_an_unknown_batch_is_an_error(store: JobStore) -> None:
    with pytest.raises(BatchNotFound):
        await export_batch(store, "batch_nope", io.BytesIO(), fmt="csv")
    with pytest.raises(BatchNotFound):
        await export_requests(store, "batch_nope", io.BytesIO())


_META_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _expected_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    # NUL is the one character a custom_id may not have (PostgreSQL text cannot hold it); a
    # lone surrogate is not a character a UTF-8 file can hold.
    custom_id=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        min_size=1,
        max_size=30,
    ),
    content=st.text(max_size=80),
    n=st.integers(1, 3),
    meta=st.dictionaries(st.text(max_size=12), _META_VALUES, max_size=4),
)
def test_any_text_survives_the_csv_round_trip(
    tmp_path: Path, custom_id: str, content: str, n: int, meta: dict[str, Any]
) -> None:
    """Whatever the answer, the ids and the metadata hold, the CSV parses back to them."""

    async def check() -> None:
        line = {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            # A new file each time: the same content again would be the same batch.
            "body": chat(f"q {time.monotonic_ns()}"),
            "metadata": meta,
        }
        path = write_jsonl(tmp_path / f"{time.monotonic_ns()}.jsonl", [line])
        async with await JobStore.open(f"sqlite:///{tmp_path / 'round.db'}") as store:
            batch_id = await _submit(store, path)
            await _answer_all(store, batch_id, lambda _: _completion(content, n))
            header, rows = await _csv(store, batch_id)
        assert header == [*CSV_COLUMNS, *(f"meta.{k}" for k in sorted(meta))]
        assert len(rows) == n
        for choice, row in enumerate(rows):
            assert row["custom_id"] == custom_id and row["content"] == content
            assert row["choice"] == str(choice)
            for key, value in meta.items():
                assert row[f"meta.{key}"] == _expected_cell(value)

    asyncio.run(check())


_CELL_VALUES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from(['"', ",", "\r", "\n", "\r\n", 'a"b', ' "x" ', "", " ", "\x00", "é\u2028"])
)


@given(st.lists(_CELL_VALUES, min_size=2, max_size=8))
def test_cells_are_written_as_the_csv_module_writes_them(values: list[Any]) -> None:
    """Export writes its lines itself, for speed: they must be the csv module's, byte for
    byte, and read back to the same cells."""
    expected = io.StringIO()
    csv.writer(expected).writerow(values)
    line = ",".join(map(exportrows.cell, values)) + "\r\n"
    assert line == expected.getvalue()
    (back,) = csv.reader(io.StringIO(line, newline=""))
    assert back == ["" if v is None else str(v) for v in values]


async def test_each_request_is_priced_in_its_tier_and_at_the_time_it_ran(
    store: JobStore, make_file: MakeFile
) -> None:
    """Status and export price every request as it ran: in its own prompt-size tier (one long
    prompt does not move the batch's other requests to the higher rate) and at the price in
    force when it finished (DeepSeek's off-peak hours cost less), whenever the report is made."""
    peak = datetime(2026, 11, 24, 10, 0, tzinfo=UTC).timestamp()
    off_peak = datetime(2026, 11, 24, 20, 0, tzinfo=UTC).timestamp()
    # (model, prompt tokens, completion tokens, finished at)
    cases = [
        ("deepseek-chat", 1_000, 500, peak),
        ("deepseek-chat", 1_000, 500, off_peak),
        ("deepseek-chat", 3_000, 100, off_peak + 600),
        ("gemini-2.5-pro", 1_000, 500, peak),
        ("gemini-2.5-pro", 250_000, 500, peak),
    ]
    batch_id = await _submit(
        store, make_file([chat(str(i), model=m) for i, (m, *_) in enumerate(cases)])
    )

    def answer(line: int) -> dict[str, Any]:
        model, prompt, completion, _ = cases[line - 1]
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        return {**_completion("ok"), "model": model, "usage": usage}

    await _answer_all(store, batch_id, answer, usage=lambda line: cases[line - 1][:3])
    async with store.engine.begin() as conn:
        for line, (*_, finished_at) in enumerate(cases, 1):
            await conn.execute(
                text(
                    "UPDATE results SET finished_at = :t"
                    " WHERE job_id = (SELECT id FROM jobs WHERE batch_id = :b AND line = :line)"
                ),
                {"t": finished_at, "b": batch_id, "line": line},
            )
    prices = PriceBook.load()
    each = [
        prices.tokens_cost(m, p, 0, c, 0, at=datetime.fromtimestamp(t, UTC)) for m, p, c, t in cases
    ]
    assert all(cost is not None and cost > 0 for cost in each)
    # The cases tell the ways of pricing apart: off-peak is cheaper, and the long prompt's
    # tier priced on the batch's sums would have billed every request at the higher rate.
    assert each[1] is not None and each[0] is not None and each[1] < each[0]
    gemini_sums = prices.tokens_cost("gemini-2.5-pro", 251_000, 0, 1_000, 0)
    assert gemini_sums is not None and gemini_sums > (each[3] or 0) + (each[4] or 0)

    _, rows = await _csv(store, batch_id, prices=prices)
    assert [Decimal(row["cost_usd"]) for row in rows] == each
    status = await report.batch_status(store, batch_id, prices)
    by_model = {m.usage.model: m.cost_usd for m in status.models}
    assert by_model == {
        "deepseek-chat": sum(each[:3], Decimal(0)),
        "gemini-2.5-pro": sum(each[3:], Decimal(0)),
    }


async def test_status_figures_of_two_batches_in_one_database_stay_apart(
    store: JobStore, make_file: MakeFile
) -> None:
    """Tokens, attempt errors and finish times are each batch's own, reached through its jobs
    (results and attempts have no batch index of their own)."""
    t0 = time.time()
    figures = {}
    for n, (tokens, errors, started) in enumerate(((7, 1, t0 - 100.0), (30, 2, t0 - 50.0))):
        path = make_file([chat(f"batch {n} question {i}") for i in range(2)], name=f"b{n}.jsonl")
        batch_id = (await submit_file(store, path)).batch.id
        jobs = await store.claim(batch_id, "w", f"token-{n}", 10, t0, 60.0)
        ended = [
            Ended(
                job_id=job.id,
                lease_token=job.lease_token,
                state=JobState.SUCCEEDED,
                attempts=1 + errors,
                status_code=200,
                latency_ms=1000.0,
                request_id=f"req_{n}",
                response=orjson.dumps(_completion(f"answer {n}")).decode(),
                model="gpt-4o-mini",
                prompt_tokens=tokens - 1,
                completion_tokens=1,
                cached_tokens=0,
                reasoning_tokens=0,
                total_tokens=tokens,
            )
            for job in jobs
        ]
        attempts = [
            AttemptRecord(job.id, status, kind, 1000.0, None, started + k)
            for job in jobs
            for k, (status, kind) in enumerate([(500, "http_500")] * errors + [(200, None)])
        ]
        outcome = await store.record(batch_id, "w", ended, attempts, t0)
        assert outcome.recorded == 2
        figures[batch_id] = (tokens, errors, started)

    for batch_id, (tokens, errors, started) in figures.items():
        status = await report.batch_status(store, batch_id)
        assert status.tokens["total_tokens"] == 2 * tokens
        assert status.attempt_errors == [("http_500", 2 * errors)]
        assert f"attempts  with errors: http_500 {2 * errors}" in report.render_status(status)
        assert await store.first_and_last_finish(batch_id) == pytest.approx(
            (started, started + errors + 1.0)
        )


async def test_status_counts_every_kind_of_failure(store: JobStore, make_file: MakeFile) -> None:
    """Only the ten most frequent kinds were listed, with nothing to say others were left
    out: scripts adding up `errors` did not find the failed jobs' count."""
    kinds = [f"http_4{k:02d}" for k in range(12)]
    batch_id = await _submit(store, make_file([chat(f"q{i}") for i in range(13)]))
    jobs = await store.claim(batch_id, "w", "token", 20, time.time(), 60.0)
    ended = [failed(job, error_kind=kinds[min(i, len(kinds) - 1)]) for i, job in enumerate(jobs)]
    assert (await store.record(batch_id, "w", ended, [], time.time())).recorded == 13
    status = await report.batch_status(store, batch_id)
    assert sum(n for _, n in status.errors) == status.counts.counts["failed"] == 13
    assert status.errors[0] == ("http_411", 2)
    assert sum(status.to_json()["errors"].values()) == 13
    text = report.render_status(status)
    assert "http_411 2" in text and ", and 2 other kind(s): 2" in text


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_long_answers_are_exported_a_few_at_a_time(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """The answers of long completions with their logprobs run to hundreds of kB each: a page
    of an export spans fewer jobs, so that it holds about PAGE_CHARS of them."""
    monkeypatch.setattr(store_module, "PAGE_CHARS", 100_000)
    batch_id = await _submit(store, make_file([chat(f"question {i}") for i in range(40)]))
    long = "word " * 4_000
    await _answer_all(store, batch_id, lambda line: _completion(f"answer {line}: {long}"))
    widths: list[int] = []
    export_page = JobStore.export_page

    async def measured(self: JobStore, batch_id: str, lo: int, hi: int, **kw: Any) -> Any:
        widths.append(hi - lo)
        return await export_page(self, batch_id, lo, hi, **kw)

    monkeypatch.setattr(JobStore, "export_page", measured)
    if fmt == "csv":
        _, rows = await _csv(store, batch_id)
        contents = [row["content"] for row in rows]
    else:
        records = await _jsonl(store, batch_id)
        contents = [r["response"]["body"]["choices"][0]["message"]["content"] for r in records]
    assert contents == [f"answer {line}: {long}" for line in range(1, 41)]
    # Answers of some 20,000 characters: no more than 5 of them to a page of 100,000.
    assert max(widths) <= 5 and len(widths) >= 8


@pytest.mark.parametrize(
    ("answered", "first_in_flight", "cancelled"),
    [(20, False, False), (20, False, True), (5, True, False)],
    ids=["pending", "cancelled", "first-in-flight"],
)
async def test_pages_of_a_batch_part_way_through_hold_few_long_answers(
    store: JobStore,
    make_file: MakeFile,
    monkeypatch: pytest.MonkeyPatch,
    answered: int,
    first_in_flight: bool,
    cancelled: bool,
) -> None:
    """Jobs end in id order: while a run goes (or after it stopped on a bad key, or was
    cancelled), the first jobs have their answers and the rest none. Pages sized by the
    average over every job held 4.5 x the memory they were meant to (a batch of 40,000 jobs,
    2,000 answered). Sized by the answered jobs of the sample, or, when the sample holds none
    (the first job still in flight), by the first answers there are."""
    monkeypatch.setattr(store_module, "PAGE_CHARS", 100_000)
    batch_id = await _submit(store, make_file([chat(f"question {i}") for i in range(2_000)]))
    if first_in_flight:
        (job,) = await store.claim(batch_id, "w-slow", "t-0", 1, time.time(), 60.0)
        assert job.line == 1
    long = "word " * 4_000
    await _answer_all(store, batch_id, lambda line: _completion(f"{line}: {long}"), limit=answered)
    if cancelled:
        await store.cancel(batch_id)
    span = await store.export_span(batch_id)
    assert span is not None
    # Answers of some 20,000 characters: no more than 5 of them to a page of 100,000.
    assert await store.ids_per_page(batch_id, span, 5_000) <= 5
    _, rows = await _csv(store, batch_id)
    answers = [row["content"] for row in rows if row["state"] == "succeeded"]
    first = 2 if first_in_flight else 1
    assert answers == [f"{line}: {long}" for line in range(first, first + answered)]


async def test_a_failed_job_shows_its_last_attempt_whatever_the_workers_clocks(
    store: JobStore, make_file: MakeFile
) -> None:
    """Attempts' start times are each worker's clock: the last attempt is the last logged
    (a worker 30 s ahead made a 500; the one that took the job over failed it with a 400)."""
    batch_id = await _submit(store, make_file([chat("q")]))
    now = time.time()
    (first,) = await store.claim(batch_id, "w-ahead", "t-1", 1, now, 60.0)
    ahead = AttemptRecord(first.id, 500, "server_error", 111.0, "req_from_ahead", now + 30)
    assert (await store.record(batch_id, "w-ahead", [], [ahead], now)).recorded == 0
    assert await store.release("w-ahead", [(first.id, first.lease_token)]) == 1
    (again,) = await store.claim(batch_id, "w-behind", "t-2", 1, now + 1, 60.0)
    end = failed(again, attempts=2, latency_ms=222.0)
    behind = AttemptRecord(again.id, 400, "http_400", 222.0, "req_from_behind", now + 1)
    assert (await store.record(batch_id, "w-behind", [end], [behind], now + 2)).recorded == 1
    _, (row,) = await _csv(store, batch_id)
    assert (row["status_code"], row["request_id"], row["latency_ms"]) == (
        "400",
        "req_from_behind",
        "222.0",
    )


async def test_pages_of_short_answers_and_bodies_span_as_many_jobs_as_asked(
    store: JobStore, make_file: MakeFile
) -> None:
    batch_id = await _submit(store, make_file([chat(f"question {i}") for i in range(300)]))
    span = await store.export_span(batch_id)
    assert span is not None
    assert await store.ids_per_page(batch_id, span, 5_000) == 5_000  # no answers yet
    await _answer_all(store, batch_id, lambda line: _completion(f"answer {line}"))
    assert await store.ids_per_page(batch_id, span, 5_000) == 5_000
    assert await store.ids_per_page(batch_id, span, 2_000, bodies=True) == 2_000


async def test_large_request_bodies_are_read_a_few_at_a_time(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies with images as base64 run to megabytes: `export --as-requests` and `estimate`
    read them a few at a time."""
    monkeypatch.setattr(store_module, "PAGE_CHARS", 100_000)
    rows = [chat(f"picture {i}: " + "A" * 20_000) for i in range(30)]
    batch_id = await _submit(store, make_file(rows))
    span = await store.export_span(batch_id)
    assert span is not None
    chars = sum(len(orjson.dumps(row)) for row in rows)
    assert await store.ids_per_page(batch_id, span, 2_000, bodies=True) == 100_000 * 30 // chars
    out = io.BytesIO()
    assert await export_requests(store, batch_id, out, states=(JobState.PENDING,)) == 30
    assert [orjson.loads(line)["body"] for line in out.getvalue().splitlines()] == rows


async def test_status_figures_of_a_running_batch_come_from_one_moment(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run records more results while `status` reads one figure after another: the counts,
    the tokens and the cost all stop at the moment of its first read."""
    batch_id = await _submit(store, make_file([chat(f"question {i}") for i in range(6)]))
    await _answer_all(store, batch_id, lambda line: _completion("answer"), limit=2)
    read_usage = JobStore.usage_groups
    recorded_meanwhile = []

    async def usage_then_a_run_records(view: JobStore, *args: Any, **kwargs: Any) -> Any:
        groups = await read_usage(view, *args, **kwargs)
        if not recorded_meanwhile:
            # Through the store, not the view: another connection, as a run's own.
            await _answer_all(store, batch_id, lambda line: _completion("later"), limit=2)
            recorded_meanwhile.append(True)
        return groups

    monkeypatch.setattr(JobStore, "usage_groups", usage_then_a_run_records)
    status = await report.batch_status(store, batch_id)
    assert recorded_meanwhile
    assert (status.counts.counts["succeeded"], status.counts.counts["pending"]) == (2, 4)
    assert [m.usage.results for m in status.models] == [2]
    assert status.tokens["total_tokens"] == 2 * 12
    monkeypatch.undo()
    status = await report.batch_status(store, batch_id)
    assert (status.counts.counts["succeeded"], status.counts.counts["pending"]) == (4, 2)
    assert [m.usage.results for m in status.models] == [4]
    (line,) = await report.all_batches(store)
    assert (line.counts.counts["succeeded"], line.counts.counts["pending"]) == (4, 2)


async def test_status_pace_of_a_resumed_run_is_the_live_workers(
    store: JobStore, make_file: MakeFile
) -> None:
    """A batch resumed an hour after its first run: the speed and the ETA are the run's own,
    not the batch's ended jobs spread over the hour between."""
    now = time.time()
    path = make_file([chat(f"question {i}") for i in range(6)])
    batch_id = (await submit_file(store, path)).batch.id
    await _answer_all(
        store, batch_id, lambda line: _completion("answer"), limit=2, started=now - 3600
    )
    await store.register_worker("w-live", batch_id, now - 20.0)
    status = await report.batch_status(store, batch_id)
    assert status.requests_per_s is None  # nothing reported yet: not known, not guessed
    assert "speed     -" in report.render_status(status)
    await store.heartbeat(
        "w-live", batch_id, now - 2.0, 60.0,
        sent=40, succeeded=30, failed=6, tokens=1080, paused_until=None,
    )  # fmt: skip
    status = await report.batch_status(store, batch_id)
    assert status.requests_per_s == pytest.approx(36 / 18.0)
    assert status.tokens_per_s == pytest.approx(1080 / 18.0)
    assert status.eta_s == pytest.approx(4 / 2.0)  # the 4 unfinished jobs at 2 a second
    assert "speed     2.0 req/s, 60 tokens/s, ETA 0m02s" in report.render_status(status)


async def test_status_pace_of_an_ended_batch_leaves_out_the_time_between_runs(
    store: JobStore, make_file: MakeFile
) -> None:
    """Three jobs, ended in runs an hour apart: 10 s, then two workers side by side from
    100 s to 50 s ago. The speed is over those 60 s, not over the hour."""
    now = time.time()
    path = make_file([chat(f"question {i}") for i in range(3)])
    batch_id = (await submit_file(store, path)).batch.id
    await _answer_all(store, batch_id, lambda line: _completion("answer"), started=now - 3695)
    for worker_id, started, stopped in (
        ("w-1", now - 3700.0, now - 3690.0),
        ("w-2", now - 100.0, now - 60.0),
        ("w-3", now - 80.0, now - 50.0),
    ):
        await store.register_worker(worker_id, batch_id, started)
        await store.stop_worker(worker_id, stopped)
    status = await report.batch_status(store, batch_id)
    assert not status.workers
    assert status.run_s == pytest.approx(60.0)
    assert status.requests_per_s == pytest.approx(3 / 60.0)
    assert status.tokens_per_s == pytest.approx(3 * 12 / 60.0)  # 12 tokens a job
    assert status.eta_s is None


@pytest.mark.slow
async def test_csv_made_by_worker_processes_is_the_same_file(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of two jobs, so that every worker makes several and their order matters."""
    batch_id = await _mixed_batch(store, make_file)
    monkeypatch.setattr(export_module, "PAGE_ROWS", 2)
    for kw in ({}, {"bom": True}, {"failed_only": True}):
        alone, by_workers = io.BytesIO(), io.BytesIO()
        assert await export_batch(store, batch_id, alone, fmt="csv", **kw) == await export_batch(
            store, batch_id, by_workers, fmt="csv", workers=2, **kw
        )
        assert by_workers.getvalue() == alone.getvalue()
    _header, rows = await _csv(store, batch_id, workers=3)
    assert [r["custom_id"] for r in rows] == [
        "line-1", "line-2", "line-3", "line-3", "line-3", "line-4", "line-5", ODD_CUSTOM_ID,
    ]  # fmt: skip


@pytest.mark.slow
async def test_workers_open_a_database_whose_path_needs_quoting(
    tmp_path: Path, make_file: MakeFile
) -> None:
    """SQLite workers open the file by URI: a space, a hash (a fragment in a URI) and a
    non-ASCII letter in its path must reach the same file."""
    odd = tmp_path / "a b#1 ü"
    odd.mkdir()
    async with await JobStore.open(f"sqlite:///{odd / 'jobs.db'}") as store:
        batch_id = await _mixed_batch(store, make_file)
        alone, by_workers = io.BytesIO(), io.BytesIO()
        await export_batch(store, batch_id, alone, fmt="csv")
        await export_batch(store, batch_id, by_workers, fmt="csv", workers=2)
    assert by_workers.getvalue() == alone.getvalue()
    assert len(_read_csv(alone.getvalue())) == 8


@pytest.mark.slow
async def test_workers_read_a_database_given_as_a_read_only_uri(
    tmp_path: Path, make_file: MakeFile
) -> None:
    """`sqlite:///file:PATH?mode=ro&uri=true` (reading without write access) reaches the
    workers as the same URI, not as a file named after it."""
    path = tmp_path / "jobs.db"
    async with await JobStore.open(f"sqlite:///{path}") as store:
        batch_id = await _mixed_batch(store, make_file)
        alone = io.BytesIO()
        await export_batch(store, batch_id, alone, fmt="csv")
    by_workers = io.BytesIO()
    async with await JobStore.open(f"sqlite:///file:{path}?mode=ro&uri=true") as read_only:
        await export_batch(read_only, batch_id, by_workers, fmt="csv", workers=2)
    assert by_workers.getvalue() == alone.getvalue()


@pytest.mark.slow
async def test_a_worker_that_cannot_read_the_database_fails_the_export(tmp_path: Path) -> None:
    """A SQLite worker opens the file it is given and never creates one where it is gone."""
    workers: OrderedWorkers[tuple[int, int], tuple[str, int]] = OrderedWorkers(
        exportrows.open_csv_pages, 2, name="export", error=StoreError
    )
    gone = tmp_path / "gone.db"
    url = f"sqlite:///{gone}"
    args = (
        url,
        (SqliteTarget.parse(url).uri_for_existing(), 1_000),
        "batch_x",
        False,
        PriceBook(),
        [],
    )
    with pytest.raises(StoreError, match="database"):
        async for _ in workers.map(args, [(0, 10), (10, 20)]):
            pass
    assert not gone.exists()
