"""Every request feature of the supported APIs, end to end (one test group per example file).

Each example in `jobs/` is submitted, run against the local fake API and checked field by field:
the body the server received (by its exact bytes), the job and result rows, the completion as
stored (parsed with the `openai` package's types and, for requests not streamed, compared byte
for byte with the server's answer), the cost, then the CSV and JSONL export.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import struct
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
from openai.types.chat import ChatCompletion
from sqlalchemy import text

from batchrunner import report
from batchrunner.config import RunConfig
from batchrunner.dispatcher import StopReason
from batchrunner.export import export_batch
from batchrunner.fakeapi import REASONING_TOKENS, FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.pricing import PriceBook
from batchrunner.runner import EXIT_ABORTED, EXIT_OK, EXIT_SOME_FAILED, RunReport, run
from batchrunner.store import JobStore
from batchrunner.tokens import count_prompt_tokens

MakeFile = Callable[..., Path]

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
EXAMPLES = sorted(JOBS_DIR.glob("*.jsonl"))
CHAT_PATH = "/v1/chat/completions"
GATEWAY_PATH = "/api/v1/chat/completions"

#: Fast retries: the tests check what is retried, not how long the backoff is.
FAST = RunConfig(
    concurrency=8,
    max_attempts=4,
    timeout_s=10.0,
    retry_base_s=0.01,
    retry_max_s=0.05,
    retry_jitter_s=0.01,
    flush_s=0.05,
    grace_s=2.0,
)

#: Public list prices in US dollars per million tokens (input, output), to check costs by hand.
LIST_PRICES_PER_MTOK = {
    "o3-mini": ("1.10", "4.40"),
    "o4-mini": ("1.10", "4.40"),
    "gpt-5-mini": ("0.25", "2.00"),
    "claude-3-7-sonnet-20250219": ("3.00", "15.00"),
    "gemini-2.5-flash": ("0.30", "2.50"),
    "deepseek-chat": ("0.27", "1.10"),
}
#: DeepSeek's off-peak hours, 16:30 to 00:30 UTC: half the list price.
OFF_PEAK_MODELS = {"deepseek-chat"}
OFF_PEAK_STARTS = dt_time(16, 30)
OFF_PEAK_ENDS = dt_time(0, 30)
OFF_PEAK_FACTOR = Decimal("0.5")

# --------------------------------------------------------------------------- helpers


def _lines(name: str) -> list[dict[str, Any]]:
    """The lines of an example file, parsed."""
    return [orjson.loads(raw) for raw in (JOBS_DIR / name).read_bytes().splitlines() if raw]


def _is_batch_line(line: dict[str, Any]) -> bool:
    return "body" in line and "custom_id" in line


def _request(line: dict[str, Any]) -> dict[str, Any]:
    """The body a line asks to send: the Batch API `body`, or a plain body less `metadata`
    and `custom_id` (kept with the job, never sent)."""
    if _is_batch_line(line):
        body: dict[str, Any] = line["body"]
        return body
    return {k: v for k, v in line.items() if k not in ("metadata", "custom_id")}


def _custom_id(line: dict[str, Any], number: int) -> str:
    custom_id = line.get("custom_id")
    return custom_id if isinstance(custom_id, str) else f"line-{number}"


def _with_marker(line: dict[str, Any], marker: str) -> dict[str, Any]:
    """A copy of a line whose last user message starts with a `[[fault:...]]` marker."""
    line = orjson.loads(orjson.dumps(line))
    messages = _request(line)["messages"]
    last = next(m for m in reversed(messages) if m["role"] == "user")
    if isinstance(last["content"], str):
        last["content"] = f"{marker} {last['content']}"
    else:
        last["content"].insert(0, {"type": "text", "text": f"{marker} "})
    return line


async def _run(store: JobStore, batch_id: str, config: RunConfig = FAST) -> RunReport:
    warnings: list[str] = []
    return await run(
        store, batch_id, config, warn=warnings.append, progress=False, install_signals=False
    )


async def _submit(store: JobStore, path: Path, base_url: str) -> str:
    return (await submit_file(store, path, base_url=base_url)).batch.id


async def _jobs(store: JobStore, batch_id: str) -> list[Any]:
    async with store.engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    text(
                        "SELECT j.id, j.line, j.custom_id, j.state, j.attempts, j.error_kind,"
                        " j.last_status, j.last_error, j.body, j.meta, j.model AS job_model,"
                        " r.response, r.status_code, r.request_id, r.model, r.prompt_tokens,"
                        " r.completion_tokens, r.cached_tokens, r.reasoning_tokens,"
                        " r.total_tokens, r.schema_valid, r.attempts AS r_attempts, r.finished_at"
                        " FROM jobs j LEFT JOIN results r ON r.job_id = j.id"
                        " WHERE j.batch_id = :b ORDER BY j.line"
                    ),
                    {"b": batch_id},
                )
            ).all()
        )


async def _answers(srv: FakeServer, bodies: list[bytes]) -> list[bytes]:
    """What the server answers these bodies when asked directly (it answers from the body
    alone, so this is what a run received for a request that succeeded at once)."""
    out = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(
                f"{srv.url}/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.status == 200
                out.append(await response.read())
    return out


def _completion(job: Any) -> ChatCompletion:
    assert job.state == "succeeded", (job.custom_id, job.state, job.last_error)
    return ChatCompletion.model_validate_json(job.response)


def _raw(job: Any) -> dict[str, Any]:
    """The stored completion as plain JSON (fields the typed model would hide or default)."""
    value: dict[str, Any] = orjson.loads(job.response)
    return value


def _verdict(job: Any) -> bool | None:
    """`results.schema_valid` (SQLite hands booleans to raw SQL as 0 / 1)."""
    return None if job.schema_valid is None else bool(job.schema_valid)


def _check_usage_columns(job: Any) -> None:
    """The usage columns are OpenAI's fields of the stored usage object."""
    usage = _raw(job)["usage"]
    assert job.prompt_tokens == usage["prompt_tokens"]
    assert job.completion_tokens == usage["completion_tokens"]
    assert job.total_tokens == usage["total_tokens"]
    assert job.cached_tokens == usage["prompt_tokens_details"]["cached_tokens"]
    assert job.reasoning_tokens == usage["completion_tokens_details"]["reasoning_tokens"]


async def _export(store: JobStore, batch_id: str) -> tuple[list[dict[str, str]], list[bytes]]:
    """The batch exported as CSV (rows as dicts) and as JSONL (lines as bytes)."""
    out = io.BytesIO()
    await export_batch(store, batch_id, out, fmt="csv")
    rows = list(csv.DictReader(io.StringIO(out.getvalue().decode(), newline="")))
    out = io.BytesIO()
    await export_batch(store, batch_id, out, fmt="jsonl")
    return rows, out.getvalue().splitlines()


def _rows_of(rows: list[dict[str, str]], custom_id: str) -> list[dict[str, str]]:
    return [r for r in rows if r["custom_id"] == custom_id]


def _check_export(jobs: list[Any], rows: list[dict[str, str]], lines: list[bytes]) -> None:
    """What every export of succeeded jobs holds: in JSONL each job once, its completion
    embedded byte for byte; in CSV one row per choice, usage once per request."""
    assert len(lines) == len(jobs)
    for job, line in zip(jobs, lines, strict=True):
        record = orjson.loads(line)
        assert record["custom_id"] == job.custom_id and record["error"] is None
        response = record["response"]
        assert response["status_code"] == 200 and response["request_id"] == job.request_id
        assert b'"body":' + job.response.encode() in line, "the body as received"
        ChatCompletion.model_validate(response["body"])
        completion = _raw(job)
        mine = _rows_of(rows, job.custom_id)
        assert [int(r["choice"]) for r in mine] == [c["index"] for c in completion["choices"]]
        for row, choice in zip(mine, completion["choices"], strict=True):
            message = choice["message"]
            assert row["state"] == "succeeded" and row["model"] == job.model
            assert row["finish_reason"] == choice["finish_reason"]
            assert row["content"] == (message["content"] or "")
            calls = message.get("tool_calls")
            assert (orjson.loads(row["tool_calls"]) if row["tool_calls"] else None) == (
                calls or None
            )
            verdict = _verdict(job)
            assert row["schema_valid"] == ("" if verdict is None else str(verdict).lower())
        first, *others = mine
        assert int(first["prompt_tokens"]) == job.prompt_tokens
        assert int(first["completion_tokens"]) == job.completion_tokens
        assert int(first["reasoning_tokens"]) == job.reasoning_tokens
        assert int(first["total_tokens"]) == job.total_tokens
        assert all(r["total_tokens"] == "" and r["cost_usd"] == "" for r in others)
    assert sum(int(r["total_tokens"] or 0) for r in rows) == sum(j.total_tokens for j in jobs)


def _cost_by_hand(
    model: str, prompt_tokens: int, completion_tokens: int, finished_at: float
) -> Decimal:
    per_input, per_output = (Decimal(p) for p in LIST_PRICES_PER_MTOK[model])
    cost = (prompt_tokens * per_input + completion_tokens * per_output) / 1_000_000
    at = datetime.fromtimestamp(finished_at, UTC).time()
    if model in OFF_PEAK_MODELS and not OFF_PEAK_ENDS <= at < OFF_PEAK_STARTS:
        cost *= OFF_PEAK_FACTOR
    return cost


def _png_data_url_of_size(target_bytes: int) -> str:
    """A base64 PNG data URL of about `target_bytes` characters: a real PNG header (4032 x 3024,
    a phone photo) followed by incompressible bytes, as a photo would be."""
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR"
    header += struct.pack(">IIBBBBB", 4032, 3024, 8, 2, 0, 0, 0) + b"\x00" * 4
    payload = header + os.urandom(target_bytes * 3 // 4)
    return "data:image/png;base64," + base64.b64encode(payload).decode()


# --------------------------------------------------------------------------- all examples


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
async def test_every_example_goes_through_unchanged_and_comes_back_as_received(
    store: JobStore, path: Path
) -> None:
    lines = _lines(path.name)
    assert 3 <= len(lines) <= 10
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, path, srv.url)
        rep = await _run(store, batch_id)
        assert rep.exit_code == EXIT_OK and rep.result.reason is StopReason.DONE
        jobs = await _jobs(store, batch_id)
        assert len(jobs) == len(lines) == srv.stats.requests_total
        assert srv.stats.requests_by_path == {CHAT_PATH: len(lines)}
        for job, line in zip(jobs, lines, strict=True):
            # Stored as asked, and those exact bytes were sent, once.
            assert orjson.loads(job.body) == _request(line)
            assert srv.stats.attempts_for(job.body.encode()) == 1
            assert job.custom_id == _custom_id(line, job.line)
            assert job.job_model == _request(line)["model"]
            meta = None if _is_batch_line(line) else line.get("metadata")
            assert (orjson.loads(job.meta) if job.meta else None) == meta
            if meta:
                assert "metadata" not in orjson.loads(job.body), "metadata is never sent"
            completion = _completion(job)
            assert job.attempts == job.r_attempts == 1 and job.status_code == 200
            assert job.model == completion.model == _request(line)["model"]
            (attempt,) = await store.attempts_of(job.id)
            assert job.request_id == attempt.request_id and job.request_id.startswith("req_")
            _check_usage_columns(job)
        not_streamed = [j for j in jobs if not orjson.loads(j.body).get("stream")]
        answers = await _answers(srv, [j.body.encode() for j in not_streamed])
    for job, answer in zip(not_streamed, answers, strict=True):
        assert job.response == answer.decode(), "the completion is stored exactly as received"
    rows, exported = await _export(store, batch_id)
    _check_export(jobs, rows, exported)
    status = await report.batch_status(store, batch_id)
    assert sum(int(r["total_tokens"] or 0) for r in rows) == status.tokens["total_tokens"]
    metas = [line.get("metadata") for line in lines if not _is_batch_line(line)]
    for key in sorted({k for m in metas if m for k in m}):
        assert f"meta.{key}" in rows[0]


# --------------------------------------------------------------------------- 1. chat


async def test_chat_roles_and_conversations(store: JobStore) -> None:
    lines = _lines("01-chat.jsonl")
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "01-chat.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
    jobs = await _jobs(store, batch_id)
    assert [j.custom_id for j in jobs] == ["line-1", "line-2", "support-7", "line-4", "line-5"]
    for job, line in zip(jobs, lines, strict=True):
        sent = orjson.loads(job.body)
        assert [m["role"] for m in sent["messages"]] == [m["role"] for m in line["messages"]]
        assert sent["messages"] == line["messages"]
        c = _completion(job)
        (choice,) = c.choices
        assert choice.message.role == "assistant" and choice.finish_reason == "stop"
        assert choice.message.tool_calls is None and choice.message.refusal is None
        # The fake answers with the last user message: the whole conversation arrived in order.
        last_user = next(m for m in reversed(line["messages"]) if m["role"] == "user")
        content = last_user["content"]
        said = content if isinstance(content, str) else "".join(p["text"] for p in content)
        assert choice.message.content == f"echo: {said[:40]}"
    developer = orjson.loads(jobs[1].body)["messages"][0]
    assert developer == lines[1]["messages"][0] and developer["role"] == "developer"
    assistant, tool = orjson.loads(jobs[3].body)["messages"][2:]
    assert assistant["content"] is None and assistant["tool_calls"][0]["id"] == "call_Q1x9"
    assert tool == lines[3]["messages"][3] and tool["tool_call_id"] == "call_Q1x9"
    assert orjson.loads(jobs[4].body)["messages"][1]["name"] == "reviewer_42"
    assert "großartig" in jobs[4].body  # UTF-8 text as written, not re-escaped


# --------------------------------------------------------------------------- 2. tools


def _calls(job: Any) -> list[tuple[str, dict[str, Any]]]:
    (choice,) = _completion(job).choices
    calls = choice.message.tool_calls or []
    ids = [call.id for call in calls]
    assert len(set(ids)) == len(ids) and all(i.startswith("call_") for i in ids)
    out = []
    for call in calls:
        assert call.type == "function"
        out.append((call.function.name, orjson.loads(call.function.arguments)))
    return out


async def test_function_calling(store: JobStore) -> None:
    lines = {line["custom_id"]: line["body"] for line in _lines("02-tools.jsonl")}
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "02-tools.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
    jobs = {j.custom_id: j for j in await _jobs(store, batch_id)}
    schemas = {
        t["function"]["name"]: t["function"].get("parameters")
        for t in lines["trip-parallel"]["tools"]
    }

    expected = {
        "weather-auto": ["get_weather"],
        "trip-parallel": ["get_weather", "get_local_time"],
        "time-named": ["get_local_time"],
        "weather-serial": ["get_weather"],
    }
    for custom_id, names in expected.items():
        job = jobs[custom_id]
        raw_message = _raw(job)["choices"][0]["message"]
        assert "content" in raw_message and raw_message["content"] is None
        assert _raw(job)["choices"][0]["finish_reason"] == "tool_calls"
        calls = _calls(job)
        assert [name for name, _ in calls] == names
        for name, arguments in calls:
            jsonschema.validate(arguments, schemas[name])
        body = orjson.loads(job.body)
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            assert body.get(key) == lines[custom_id].get(key)

    (choice,) = _completion(jobs["packing-none"]).choices
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content == "echo: Without checking anything, what should I"

    rows, _ = await _export(store, batch_id)
    (trip,) = _rows_of(rows, "trip-parallel")
    assert trip["finish_reason"] == "tool_calls" and trip["content"] == ""
    exported_calls = orjson.loads(trip["tool_calls"])
    assert exported_calls == _raw(jobs["trip-parallel"])["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in exported_calls] == ["get_weather", "get_local_time"]
    (packing,) = _rows_of(rows, "packing-none")
    assert packing["tool_calls"] == "" and packing["content"] == choice.message.content


async def test_provider_side_tools_pass_through_untouched(
    store: JobStore, make_file: MakeFile
) -> None:
    line = next(x for x in _lines("02-tools.jsonl") if x["custom_id"] == "gemini-code-execution")
    written = make_file([line])
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, written, srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
        (job,) = await _jobs(store, batch_id)
        # The exact bytes stored are the bytes the server received, once...
        assert srv.stats.attempts_for(job.body.encode()) == 1
        assert srv.stats.requests_total == 1
    # ...and they hold the tools exactly as written: no parameters, strict or type added.
    assert orjson.loads(job.body)["tools"] == line["body"]["tools"]
    assert '{"type":"function","function":{"name":"codeExecution"}}' in job.body
    assert '{"type":"function","function":{"name":"googleSearch"}}' in job.body
    assert job.body == orjson.dumps(line["body"]).decode()
    assert _completion(job).choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- 3. structured


def _schema_of(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format") or {}
    if fmt.get("type") != "json_schema":
        return None
    schema: dict[str, Any] = fmt["json_schema"]["schema"]
    return schema


async def test_structured_output_is_validated_and_the_verdict_kept(store: JobStore) -> None:
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "03-structured-output.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
    jobs = await _jobs(store, batch_id)
    for job in jobs:
        body = orjson.loads(job.body)
        (choice,) = _completion(job).choices
        value = orjson.loads(choice.message.content or "")
        schema = _schema_of(body)
        if schema is None:
            assert body["response_format"] == {"type": "json_object"}
            # json_object asks for any JSON object: judged too.
            assert isinstance(value, dict) and _verdict(job) is True
        else:
            assert body["response_format"]["json_schema"]["strict"] is True
            jsonschema.Draft202012Validator(schema).validate(value)
            assert _verdict(job) is True
    assert [_verdict(j) for j in jobs] == [True, True, True, True]
    rows, _ = await _export(store, batch_id)
    assert [r["schema_valid"] for r in rows] == ["true", "true", "true", "true"]


async def test_answers_that_miss_the_schema_are_flagged_or_retried(
    store: JobStore, make_file: MakeFile
) -> None:
    receipt, invoice, review, contact = _lines("03-structured-output.jsonl")
    rows = [
        receipt,
        _with_marker(invoice, "[[fault:badjsonx2]]"),
        _with_marker(review, "[[fault:badjsonx1]]"),
        _with_marker(contact, "[[fault:badjson]]"),  # never matches
    ]
    async with FakeServer(FakeConfig()) as srv:
        # Without --retry-invalid-json: every answer is kept, with its verdict.
        flagged = await _submit(store, make_file(rows), srv.url)
        assert (await _run(store, flagged)).exit_code == EXIT_OK
        assert [_verdict(j) for j in await _jobs(store, flagged)] == [True, False, False, False]
        assert [j.attempts for j in await _jobs(store, flagged)] == [1, 1, 1, 1]
        exported, _ = await _export(store, flagged)
        assert [r["schema_valid"] for r in exported] == ["true", "false", "false", "false"]

        # With it: retried until the content matches, up to the attempt limit.
        srv.reset()
        retried = await _submit(
            store, make_file([*rows, {**receipt, "custom_id": "again"}]), srv.url
        )
        config = replace(FAST, retry_invalid_json=True, max_attempts=3)
        rep = await _run(store, retried, config)
        assert rep.exit_code == EXIT_SOME_FAILED
        jobs = await _jobs(store, retried)
        assert srv.stats.attempts_for(jobs[3].body.encode()) == 3
    ok_receipt, ok_invoice, ok_review, bad_contact, _ = jobs
    assert ok_receipt.attempts == 1 and _verdict(ok_receipt) is True
    for job, bad_answers in ((ok_invoice, 2), (ok_review, 1)):
        assert job.state == "succeeded" and _verdict(job) is True
        assert job.attempts == job.r_attempts == bad_answers + 1
        kinds = [a.error_kind for a in await store.attempts_of(job.id)]
        assert kinds == ["invalid_json"] * bad_answers + [None]
        content = _completion(job).choices[0].message.content or ""
        jsonschema.validate(orjson.loads(content), _schema_of(orjson.loads(job.body)))
    assert bad_contact.state == "failed" and bad_contact.attempts == 3
    assert bad_contact.error_kind == "invalid_json" and bad_contact.response is None
    rows, _ = await _export(store, retried)
    # The failed job has no answer to judge.
    assert [r["schema_valid"] for r in rows] == ["true", "true", "true", "", "true"]
    assert [r["state"] for r in rows] == [
        "succeeded",
        "succeeded",
        "succeeded",
        "failed",
        "succeeded",
    ]
    assert rows[3]["error_kind"] == "invalid_json"


async def test_a_tool_call_answer_is_not_judged_against_the_response_schema(
    store: JobStore, make_file: MakeFile
) -> None:
    """Tools and a json_schema in one request: the schema is for the final text answer; an
    answer that calls a tool has no content to judge and must not be retried as invalid."""
    lookup = {
        "type": "function",
        "function": {
            "name": "lookup_customer",
            "parameters": {
                "type": "object",
                "properties": {"customer_id": {"type": "string"}},
                "required": ["customer_id"],
                "additionalProperties": False,
            },
        },
    }
    summary = {
        "type": "object",
        "properties": {"summary": {"type": "string"}, "risk": {"enum": ["low", "high"]}},
        "required": ["summary", "risk"],
        "additionalProperties": False,
    }
    body = {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": "Summarise the account of customer 5531."}],
        "tools": [lookup],
        "tool_choice": "required",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "account_summary", "strict": True, "schema": summary},
        },
    }
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file([body]), srv.url)
        await _run(store, batch_id, replace(FAST, retry_invalid_json=True, max_attempts=3))
        (job,) = await _jobs(store, batch_id)
        assert srv.stats.requests_total == 1, "a tool call was retried as invalid JSON"
    assert job.state == "succeeded" and job.attempts == 1
    assert _completion(job).choices[0].finish_reason == "tool_calls"
    assert _verdict(job) is None


# --------------------------------------------------------------------------- 4. n > 1


async def test_every_choice_is_kept_and_usage_counted_once(store: JobStore) -> None:
    lines = _lines("04-n-choices.jsonl")
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "04-n-choices.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
        jobs = await _jobs(store, batch_id)
        # The same requests asking for one choice: the prompt is billed once whatever n is.
        singles = await _answers(
            srv, [orjson.dumps({**orjson.loads(j.body), "n": 1}) for j in jobs]
        )
    for job, line, single in zip(jobs, lines, singles, strict=True):
        completion = _completion(job)
        assert [c.index for c in completion.choices] == list(range(line["n"]))
        assert all(c.finish_reason == "stop" for c in completion.choices)
        contents = [c.message.content for c in completion.choices]
        if "response_format" not in line:
            assert len(set(contents)) == line["n"], "each choice is its own answer"
        one = orjson.loads(single)["usage"]
        assert job.prompt_tokens == one["prompt_tokens"]
        assert completion.usage is not None
        assert job.completion_tokens == completion.usage.completion_tokens
        assert job.total_tokens == completion.usage.total_tokens
    async with store.engine.connect() as conn:
        results = (
            await conn.execute(
                text("SELECT COUNT(*) FROM results WHERE batch_id = :b"), {"b": batch_id}
            )
        ).scalar_one()
    assert results == 3, "one result per request, not per choice"
    status = await report.batch_status(store, batch_id)
    assert status.tokens["total_tokens"] == sum(j.total_tokens for j in jobs)
    assert status.tokens["prompt_tokens"] == sum(j.prompt_tokens for j in jobs)

    rows, _ = await _export(store, batch_id)
    assert [(r["custom_id"], r["choice"]) for r in rows] == [
        (job.custom_id, str(i))
        for job, line in zip(jobs, lines, strict=True)
        for i in range(line["n"])
    ]
    for job in jobs:
        mine = _rows_of(rows, job.custom_id)
        contents = [c["message"]["content"] for c in _raw(job)["choices"]]
        assert [r["content"] for r in mine] == contents
        assert [r["meta.brief"] for r in mine] == [orjson.loads(job.meta)["brief"]] * len(mine)
    # Summing the columns gives the batch's totals: usage and cost sit on one row per request.
    assert sum(int(r["prompt_tokens"] or 0) for r in rows) == status.tokens["prompt_tokens"]
    assert sum(Decimal(r["cost_usd"] or 0) for r in rows) == status.cost_usd


# --------------------------------------------------------------------------- 5. images


async def test_images_audio_and_files_pass_through(store: JobStore) -> None:
    lines = _lines("05-images-audio-files.jsonl")
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "05-images-audio-files.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
    jobs = await _jobs(store, batch_id)
    for job, line in zip(jobs, lines, strict=True):
        sent_parts = orjson.loads(job.body)["messages"][0]["content"]
        assert sent_parts == line["messages"][0]["content"]
        images = [p for p in sent_parts if p["type"] == "image_url"]
        # The fake bills 85 tokens per image part: each one arrived as an image.
        assert job.prompt_tokens >= 85 * len(images)
        _completion(job)
    details = [
        p["image_url"].get("detail")
        for line in lines
        for p in line["messages"][0]["content"]
        if p["type"] == "image_url"
    ]
    assert details == ["low", "high", "auto", None]
    data_url = lines[2]["messages"][0]["content"][1]["image_url"]["url"]
    assert data_url.startswith("data:image/png;base64,") and data_url in jobs[2].body
    audio = orjson.loads(jobs[3].body)["messages"][0]["content"][1]
    assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
    assert base64.b64decode(audio["input_audio"]["data"]).startswith(b"RIFF")
    file_part = orjson.loads(jobs[4].body)["messages"][0]["content"][0]
    assert file_part["file"]["filename"] == "receipt.pdf"
    pdf = file_part["file"]["file_data"].removeprefix("data:application/pdf;base64,")
    assert base64.b64decode(pdf).startswith(b"%PDF-")


async def test_a_line_of_several_megabytes_submits_and_runs(
    store: JobStore, make_file: MakeFile
) -> None:
    photo = _png_data_url_of_size(3 * 1024 * 1024)
    big = {
        "custom_id": "photo-4032x3024",
        "method": "POST",
        "url": CHAT_PATH,
        "body": {
            "model": "gpt-4.1",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this photo for an alt text."},
                        {"type": "image_url", "image_url": {"url": photo, "detail": "high"}},
                    ],
                }
            ],
            "max_tokens": 120,
        },
    }
    small = {
        "custom_id": "small",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    }
    path = make_file([big, small])
    assert path.stat().st_size > 3 * 1024 * 1024
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, path, srv.url)
        rep = await _run(store, batch_id)
        assert rep.exit_code == EXIT_OK
        job, other = await _jobs(store, batch_id)
        assert srv.stats.attempts_for(job.body.encode()) == 1 and srv.stats.requests_total == 2
    assert len(job.body) > 3 * 1024 * 1024
    assert orjson.loads(job.body)["messages"][0]["content"][1]["image_url"]["url"] == photo
    assert job.attempts == 1 and other.state == "succeeded"
    assert (
        _completion(job).choices[0].message.content == "echo: Describe this photo for an alt text."
    )


async def test_an_inline_photo_is_paced_by_its_tokens_not_its_characters(
    store: JobStore, make_file: MakeFile
) -> None:
    """`--tpm` paces each job on the estimate stored at submit (prompt + max output tokens).
    A 3 MB base64 photo is about a thousand prompt tokens for gpt-4.1; counted as characters / 4
    it would be 800,000, and under `--tpm 2000000` every such photo would hold the whole run
    for about 24 s until its answer corrects the count."""
    max_tokens = 120
    body: dict[str, Any] = {
        "model": "gpt-4.1",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this photo for an alt text."},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": _png_data_url_of_size(3 * 1024 * 1024),
                            "detail": "high",
                        },
                    },
                ],
            }
        ],
        "max_tokens": max_tokens,
    }
    batch_id = await _submit(store, make_file([body]), "http://127.0.0.1:9/v1")
    async with store.engine.connect() as conn:
        estimate = (
            await conn.execute(
                text("SELECT est_tokens FROM jobs WHERE batch_id = :b"), {"b": batch_id}
            )
        ).scalar_one()
    billed = count_prompt_tokens(body) + max_tokens
    assert billed < 2_000
    assert estimate <= 2 * billed, f"{estimate} tokens estimated for a {billed}-token request"


# --------------------------------------------------------------------------- 6. logprobs


async def test_logprobs_are_stored_as_received(store: JobStore) -> None:
    lines = _lines("06-logprobs.jsonl")
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "06-logprobs.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
        jobs = await _jobs(store, batch_id)
        answers = await _answers(srv, [j.body.encode() for j in jobs])
    for job, line, answer in zip(jobs, lines, answers, strict=True):
        assert job.response == answer.decode()
        top = line["body"].get("top_logprobs", 0)
        completion = _completion(job)
        assert len(completion.choices) == line["body"].get("n", 1)
        for choice in completion.choices:
            assert choice.logprobs is not None and choice.logprobs.content
            tokens = choice.logprobs.content
            assert "".join(t.token for t in tokens) == choice.message.content
            for t in tokens:
                assert t.logprob <= 0 and t.bytes == list(t.token.encode())
                assert len(t.top_logprobs) == top
                assert [a.logprob for a in t.top_logprobs] == sorted(
                    (a.logprob for a in t.top_logprobs), reverse=True
                )


# --------------------------------------------------------------------------- 7. streaming


async def test_streams_are_reassembled_into_the_answer_a_plain_request_gets(
    store: JobStore,
) -> None:
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "07-streaming.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
        jobs = await _jobs(store, batch_id)
        plain_bodies = []
        for job in jobs:
            body = orjson.loads(job.body)
            assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
            plain_bodies.append(
                orjson.dumps({k: v for k, v in body.items() if not k.startswith("stream")})
            )
        answers = await _answers(srv, plain_bodies)
    for job, answer in zip(jobs, answers, strict=True):
        got, want = _raw(job), orjson.loads(answer)
        assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
        for key in ("model", "created", "system_fingerprint", "service_tier", "usage"):
            assert got[key] == want[key], key
        assert len(got["choices"]) == len(want["choices"])
        for g, w in zip(got["choices"], want["choices"], strict=True):
            assert g["index"] == w["index"] and g["finish_reason"] == w["finish_reason"]
            assert g["message"]["role"] == "assistant"
            assert g["message"]["content"] == w["message"]["content"]
            assert g["logprobs"] == w["logprobs"]
            calls = [
                (c["type"], c["function"]["name"], c["function"]["arguments"])
                for c in g["message"].get("tool_calls") or []
            ]
            assert calls == [
                (c["type"], c["function"]["name"], c["function"]["arguments"])
                for c in w["message"].get("tool_calls") or []
            ]
        completion = _completion(job)
        _check_usage_columns(job)
        assert completion.usage is not None
    kinds = [orjson.loads(j.meta)["kind"] for j in jobs]
    assert kinds == ["text", "tools", "n", "logprobs", "gateway"]
    assert len(_calls(jobs[1])) == 2
    assert len(_completion(jobs[2]).choices) == 3


# --------------------------------------------------------------------------- 8. reasoning


async def test_reasoning_tokens_are_counted_and_priced(store: JobStore) -> None:
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "08-reasoning.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
    jobs = {j.custom_id: j for j in await _jobs(store, batch_id)}
    expected_reasoning = {
        "trip-duration-low": REASONING_TOKENS["low"],
        "proof-high-capped": 300,  # the cap cut the reasoning short
        "refactor-default": REASONING_TOKENS["medium"],
        "label-minimal": REASONING_TOKENS["minimal"],
    }
    for custom_id, reasoning in expected_reasoning.items():
        job = jobs[custom_id]
        body = orjson.loads(job.body)
        assert body["max_completion_tokens"] > 0 and "max_tokens" not in body
        assert (
            body.get("reasoning_effort")
            == {
                "trip-duration-low": "low",
                "proof-high-capped": "high",
                "refactor-default": None,
                "label-minimal": "minimal",
            }[custom_id]
        )
        completion = _completion(job)
        assert completion.usage is not None and completion.usage.completion_tokens_details
        assert completion.usage.completion_tokens_details.reasoning_tokens == reasoning
        assert job.reasoning_tokens == reasoning
        assert reasoning <= job.completion_tokens <= body["max_completion_tokens"]
        _check_usage_columns(job)
    capped = _completion(jobs["proof-high-capped"]).choices[0]
    assert capped.finish_reason == "length" and capped.message.content == ""

    status = await report.batch_status(store, batch_id, PriceBook.load())
    assert status.tokens["reasoning_tokens"] == sum(expected_reasoning.values())
    by_model: dict[str, Decimal] = {}
    for job in jobs.values():
        # Reasoning is part of the completion tokens and billed as output.
        cost = _cost_by_hand(job.model, job.prompt_tokens, job.completion_tokens, job.finished_at)
        by_model[job.model] = by_model.get(job.model, Decimal(0)) + cost
    assert {m.usage.model for m in status.models} == set(by_model)
    for m in status.models:
        assert m.cost_usd is not None
        assert abs(m.cost_usd - by_model[m.usage.model]) < Decimal("1e-9"), m.usage.model
        assert m.usage.reasoning_tokens == sum(
            j.reasoning_tokens for j in jobs.values() if j.model == m.usage.model
        )
    assert abs(status.cost_usd - sum(by_model.values())) < Decimal("1e-9")

    rows, _ = await _export(store, batch_id)
    for row in rows:
        job = jobs[row["custom_id"]]
        assert int(row["reasoning_tokens"]) == expected_reasoning[row["custom_id"]]
        assert int(row["completion_tokens"]) == job.completion_tokens
        want = _cost_by_hand(job.model, job.prompt_tokens, job.completion_tokens, job.finished_at)
        assert abs(Decimal(row["cost_usd"]) - want) < Decimal("1e-9")


# --------------------------------------------------------------------------- 9. gateways


async def test_gateway_usage_extras_are_kept_and_ignored_by_the_columns(store: JobStore) -> None:
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "09-gateway-models.jsonl", srv.url)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
        jobs = await _jobs(store, batch_id)
        answers = await _answers(srv, [j.body.encode() for j in jobs])
    assert [j.model for j in jobs] == [
        "claude-3-7-sonnet-20250219",
        "gemini-2.5-flash",
        "deepseek-chat",
        "claude-3-7-sonnet-20250219",
    ]
    for job, answer in zip(jobs, answers, strict=True):
        assert job.response == answer.decode()
        usage = _raw(job)["usage"]
        if job.model != "deepseek-chat":
            # Kept as received, extras and all...
            assert set(usage) >= {"input_tokens", "output_tokens", "text_tokens", "image_tokens"}
            # ...and the columns read OpenAI's fields, which the extras deliberately contradict.
            assert usage["input_tokens"] != usage["prompt_tokens"]
            assert usage["output_tokens"] != usage["completion_tokens"]
        _check_usage_columns(job)
        assert job.total_tokens == job.prompt_tokens + job.completion_tokens
        assert ChatCompletion.model_validate_json(job.response).usage is not None
    status = await report.batch_status(store, batch_id, PriceBook.load())
    assert not status.unpriced_models
    for m in status.models:
        want = sum(
            (
                _cost_by_hand(j.model, j.prompt_tokens, j.completion_tokens, j.finished_at)
                for j in jobs
                if j.model == m.usage.model
            ),
            Decimal(0),
        )
        assert m.cost_usd is not None and abs(m.cost_usd - want) < Decimal("1e-9"), m.usage.model
        assert m.usage.prompt_tokens == sum(
            j.prompt_tokens for j in jobs if j.model == m.usage.model
        )
    rows, exported = await _export(store, batch_id)
    for job, row, line in zip(jobs, rows, exported, strict=True):
        usage = _raw(job)["usage"]
        assert int(row["prompt_tokens"]) == usage["prompt_tokens"]
        assert int(row["completion_tokens"]) == usage["completion_tokens"]
        want = _cost_by_hand(job.model, job.prompt_tokens, job.completion_tokens, job.finished_at)
        assert abs(Decimal(row["cost_usd"]) - want) < Decimal("1e-9")
        assert orjson.loads(line)["response"]["body"]["usage"] == usage


# --------------------------------------------------------------------------- 10. other paths


def _gateway_url(srv: FakeServer) -> str:
    return f"{srv.base_url}/api/v1"


async def test_a_gateway_at_api_v1(store: JobStore) -> None:
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, JOBS_DIR / "10-gateway-api-v1.jsonl", _gateway_url(srv))
        assert (await store.get_batch(batch_id)).base_url == _gateway_url(srv)
        assert (await _run(store, batch_id)).exit_code == EXIT_OK
        assert srv.stats.requests_by_path == {GATEWAY_PATH: 4}
    assert {j.state for j in await _jobs(store, batch_id)} == {"succeeded"}


@pytest.mark.parametrize(
    ("fault", "state", "attempt_kinds", "status"),
    [
        ("400", "failed", ["http_400"], 400),
        ("422", "failed", ["http_422"], 422),
        ("429x2", "succeeded", ["rate_limit", "rate_limit", None], 200),
        ("500x2", "succeeded", ["server_error", "server_error", None], 200),
        ("503x2", "succeeded", ["server_error", "server_error", None], 200),
        ("503", "failed", ["server_error"] * 3, 503),
    ],
)
async def test_gateway_error_answers(
    store: JobStore,
    make_file: MakeFile,
    fault: str,
    state: str,
    attempt_kinds: list[str | None],
    status: int,
) -> None:
    lines = _lines("10-gateway-api-v1.jsonl")
    faulty = _with_marker(lines[0], f"[[fault:{fault}]]") | {"custom_id": "gw-fault"}
    async with FakeServer(FakeConfig()) as srv:
        batch_id = await _submit(store, make_file([*lines, faulty]), _gateway_url(srv))
        rep = await _run(store, batch_id, replace(FAST, max_attempts=3))
        assert rep.result.reason is StopReason.DONE
        assert rep.exit_code == (EXIT_OK if state == "succeeded" else EXIT_SOME_FAILED)
        assert set(srv.stats.requests_by_path) == {GATEWAY_PATH}
    *fine, job = await _jobs(store, batch_id)
    assert {j.state for j in fine} == {"succeeded"}
    assert job.state == state and job.attempts == len(attempt_kinds)
    assert [a.error_kind for a in await store.attempts_of(job.id)] == attempt_kinds
    assert [a.status_code for a in await store.attempts_of(job.id)][-1] == status
    if state == "failed":
        assert job.last_status == status and job.error_kind == attempt_kinds[-1]
        error = orjson.loads(job.last_error)["error"]  # the error body as received
        assert error["message"]
        if status == 503:
            assert "overloaded" in error["message"]
        assert job.response is None
        # Exported as the Batch API's error files have it: the answer, and no `error`.
        rows, exported = await _export(store, batch_id)
        record = orjson.loads(exported[-1])
        assert record["custom_id"] == "gw-fault"
        assert record["response"]["status_code"] == status
        assert record["response"]["body"] == orjson.loads(job.last_error)
        assert record["error"] is None
        assert rows[-1]["state"] == "failed" and rows[-1]["error"] == error["message"]
    else:
        _completion(job)


async def test_a_gateway_that_rejects_the_key_stops_the_run(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-gw-wrong-0000")
    async with FakeServer(FakeConfig(api_key="sk-gw-right-1111")) as srv:
        batch_id = await _submit(store, JOBS_DIR / "10-gateway-api-v1.jsonl", _gateway_url(srv))
        rep = await _run(store, batch_id, replace(FAST, concurrency=1))
        assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.AUTH
        assert srv.stats.requests_by_path == {GATEWAY_PATH: 1}
        assert srv.stats.answers_by_status == {"401": 1}
    assert rep.result.message and "sk-gw-wrong-0000" not in rep.result.message
    assert "Incorrect API key" in rep.result.message
    assert (await store.counts(batch_id)).counts["pending"] == 4


async def test_a_gateway_with_no_balance_stops_the_run_until_topped_up(
    store: JobStore, make_file: MakeFile
) -> None:
    async with FakeServer(FakeConfig(quota_exhausted=True, quota_status=402)) as srv:
        batch_id = await _submit(store, JOBS_DIR / "10-gateway-api-v1.jsonl", _gateway_url(srv))
        rep = await _run(store, batch_id, replace(FAST, concurrency=1))
        assert rep.exit_code == EXIT_ABORTED and rep.result.reason is StopReason.QUOTA
        assert srv.stats.answers_by_status == {"402": 1}
        assert srv.stats.requests_by_path == {GATEWAY_PATH: 1}
    assert rep.result.message and "Insufficient Balance" in rep.result.message
    assert "balance" in rep.result.message.split("(")[0].lower()
    assert (await store.counts(batch_id)).counts["pending"] == 4
    # Topped up: the same batch resumes (here at another port of the same gateway path).
    async with FakeServer(FakeConfig()) as srv:
        rep = await _run(store, batch_id, replace(FAST, base_url=_gateway_url(srv)))
        assert rep.exit_code == EXIT_OK and srv.stats.requests_by_path == {GATEWAY_PATH: 4}
    jobs = await _jobs(store, batch_id)
    assert {j.state for j in jobs} == {"succeeded"}
    assert [a.error_kind for a in await store.attempts_of(jobs[0].id)] == ["quota", None]
