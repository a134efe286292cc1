"""The fake OpenAI-compatible server: its answers parse as OpenAI's own types, and its faults,
limits and counters behave as the rest of the test-suite relies on."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import jsonschema
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from batchrunner.fakeapi import (
    FakeConfig,
    FakeServer,
    FakeServerThread,
    go_duration,
    main,
    schema_instance,
    stream_events,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3, "maxLength": 60},
        "age": {"type": "integer", "minimum": 18},
        "score": {"type": "number", "maximum": 1},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "role": {"enum": ["admin", "user"]},
        "address": {"$ref": "#/$defs/address"},
        "nickname": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "score", "active", "tags", "role", "address", "nickname"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "zip"],
            "additionalProperties": False,
        }
    },
}


def chat(text: str = "hello there", model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    async with FakeServer(FakeConfig(seed=7)) as srv:
        yield srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(f"{url}/chat/completions", data=data, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def complete(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> ChatCompletion:
    status, _, raw = await post(session, url, body)
    assert status == 200, raw
    return ChatCompletion.model_validate(orjson.loads(raw))


async def stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[list[ChatCompletionChunk], list[bytes]]:
    """The chunks of a streamed answer, and its raw `data:` payloads in order."""
    async with session.post(f"{url}/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = await r.read()
    assert text.endswith(b"\n\n")
    payloads = [e.removeprefix(b"data: ") for e in text.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in text.split(b"\n\n") if e)
    chunks = [ChatCompletionChunk.model_validate(orjson.loads(p)) for p in payloads[:-1]]
    return chunks, payloads


def reassemble(chunks: list[ChatCompletionChunk]) -> dict[int, dict[str, Any]]:
    """Choice index -> {role, content, tool_calls, finish_reason}, from stream deltas."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            acc = out.setdefault(
                choice.index, {"role": None, "content": None, "tool_calls": {}, "finish": None}
            )
            delta = choice.delta
            if delta.role:
                acc["role"] = delta.role
            if delta.content:
                acc["content"] = (acc["content"] or "") + delta.content
            for call in delta.tool_calls or []:
                slot = acc["tool_calls"].setdefault(call.index, {"arguments": ""})
                if call.id:
                    slot.update(id=call.id, name=call.function and call.function.name)
                if call.function and call.function.arguments:
                    slot["arguments"] += call.function.arguments
            if choice.finish_reason:
                acc["finish"] = choice.finish_reason
    return out


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for a server-side condition (polled: the server offers no event to wait on)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polling a counter the server owns
            await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- answers


async def test_completion_parses_and_is_deterministic(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    body = orjson.dumps(chat("What is the capital of France? Answer in one word please."))
    status, headers, first = await post(session, server.url, body)
    _, headers2, second = await post(session, server.url, body)
    assert status == 200
    completion = ChatCompletion.model_validate(orjson.loads(first))
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    assert completion.system_fingerprint
    [choice] = completion.choices
    assert choice.message.content == "echo: What is the capital of France? Answer in"
    assert choice.message.refusal is None
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens == 15  # 58 characters / 4, rounded up
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0
    # Same body, same answer, byte for byte; each attempt still has its own request id.
    assert first == second
    assert headers["X-Request-ID"].startswith("req_")
    assert headers["X-Request-ID"] != headers2["X-Request-ID"]
    assert "x-ratelimit-limit-requests" not in {k.lower() for k in headers}


async def test_answers_depend_on_the_seed(session: aiohttp.ClientSession) -> None:
    bodies = []
    for seed in (1, 1, 2):
        async with FakeServer(FakeConfig(seed=seed)) as srv:
            bodies.append((await post(session, srv.url, chat()))[2])
    assert bodies[0] == bodies[1] != bodies[2]


async def test_any_path_ending_in_chat_completions(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    status, _, _ = await post(session, f"{server.base_url}/api/v1", chat())
    assert status == 200
    async with session.post(f"{server.base_url}/v1/embeddings", json={}) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "unknown_url"


async def test_n_choices_are_distinct(server: FakeServer, session: aiohttp.ClientSession) -> None:
    completion = await complete(session, server.url, chat("pick one", n=3))
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert [c.message.content for c in completion.choices] == [
        "echo: pick one #0",
        "echo: pick one #1",
        "echo: pick one #2",
    ]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3 * 5


@pytest.mark.parametrize(
    ("tools", "extra", "text", "expected"),
    [
        ([WEATHER_TOOL], {"tool_choice": "required"}, "hi", ["get_weather"]),
        (
            [WEATHER_TOOL, TIME_TOOL],
            {"tool_choice": "required", "parallel_tool_calls": True},
            "hi",
            ["get_weather", "get_time"],
        ),
        (
            [WEATHER_TOOL, TIME_TOOL],
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            "hi",
            ["get_time"],
        ),
        ([WEATHER_TOOL], {"tool_choice": "auto"}, "Please use a tool now", ["get_weather"]),
        ([WEATHER_TOOL], {}, "Please use a tool now", ["get_weather"]),
        ([WEATHER_TOOL], {"tool_choice": "auto"}, "just talk", []),
        ([WEATHER_TOOL], {"tool_choice": "none"}, "use a tool", []),
    ],
)
async def test_tool_calls(
    server: FakeServer,
    session: aiohttp.ClientSession,
    tools: list[dict[str, Any]],
    extra: dict[str, Any],
    text: str,
    expected: list[str],
) -> None:
    completion = await complete(session, server.url, chat(text, tools=tools, **extra))
    [choice] = completion.choices
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == expected  # type: ignore[union-attr]
    if not expected:
        assert choice.finish_reason == "stop"
        assert choice.message.content
        return
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len({c.id for c in calls}) == len(calls)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.type == "function"
        jsonschema.validate(orjson.loads(call.function.arguments), schemas[call.function.name])


async def test_json_schema_content_validates(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
    }
    good = await complete(session, server.url, chat("a person", response_format=response_format))
    jsonschema.validate(orjson.loads(good.choices[0].message.content or ""), PERSON_SCHEMA)

    bad = await complete(
        session, server.url, chat("a person [[fault:badjson]]", response_format=response_format)
    )
    content = bad.choices[0].message.content or ""
    with pytest.raises((jsonschema.ValidationError, orjson.JSONDecodeError)):
        jsonschema.validate(orjson.loads(content), PERSON_SCHEMA)

    plain = await complete(
        session, server.url, chat("an object", response_format={"type": "json_object"})
    )
    assert orjson.loads(plain.choices[0].message.content or "") == {"echo": "an object"}


@pytest.mark.parametrize(
    "schema",
    [
        PERSON_SCHEMA,
        {"type": "array", "items": {"type": "number", "exclusiveMinimum": 5}, "minItems": 3},
        {"type": "string", "format": "date-time"},
        {"anyOf": [{"type": "integer", "maximum": -3}, {"type": "string"}]},
        {"allOf": [{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}]},
        {"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True},
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "value": {"type": "integer"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["value", "children"],
                }
            },
            "$ref": "#/$defs/node",
        },
    ],
)
def test_schema_instance_validates(schema: dict[str, Any]) -> None:
    jsonschema.validate(schema_instance(schema, "text"), schema)


async def test_logprobs(server: FakeServer, session: aiohttp.ClientSession) -> None:
    completion = await complete(session, server.url, chat("tell me", logprobs=True, top_logprobs=3))
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == completion.choices[0].message.content
    for entry in logprobs.content:
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob < 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token


@pytest.mark.parametrize(
    ("model", "extra", "reasoning"),
    [
        ("o3-mini", {}, 192),
        ("gpt-5", {"reasoning_effort": "high"}, 640),
        ("some-model", {"reasoning_effort": "low"}, 64),
        ("gpt-4o", {}, 0),
    ],
)
async def test_reasoning_tokens(
    server: FakeServer,
    session: aiohttp.ClientSession,
    model: str,
    extra: dict[str, Any],
    reasoning: int,
) -> None:
    completion = await complete(session, server.url, chat("think", model=model, **extra))
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == reasoning
    assert usage.completion_tokens == reasoning + 3  # "echo: think" is 11 characters


@pytest.mark.parametrize("limit_field", ["max_completion_tokens", "max_tokens"])
async def test_token_limit_cuts_the_answer(
    server: FakeServer, session: aiohttp.ClientSession, limit_field: str
) -> None:
    text = "a fairly long question that needs a long answer"
    tight: dict[str, Any] = {limit_field: 3}
    completion = await complete(session, server.url, chat(text, **tight))
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == "echo: a fair"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    loose: dict[str, Any] = {limit_field: 100}
    roomy = await complete(session, server.url, chat(text, **loose))
    assert roomy.choices[0].finish_reason == "stop"


async def test_gateway_usage_has_extra_fields(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    status, _, raw = await post(session, server.url, chat(model="anthropic/claude-sonnet-4"))
    assert status == 200
    usage = orjson.loads(raw)["usage"]
    ChatCompletion.model_validate(orjson.loads(raw))
    assert {"input_tokens", "output_tokens", "text_tokens", "image_tokens"} <= usage.keys()
    assert usage["input_tokens"] != usage["prompt_tokens"]
    assert usage["output_tokens"] != usage["completion_tokens"]


async def test_long_prompt_reports_cached_tokens(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    completion = await complete(session, server.url, chat("x" * 6000))
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens == 1500
    assert usage.prompt_tokens_details.cached_tokens == 1408


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"n": 3},
        {"logprobs": True, "top_logprobs": 2},
        {
            "tools": [WEATHER_TOOL, TIME_TOOL],
            "tool_choice": "required",
            "parallel_tool_calls": True,
        },
        {"tools": [WEATHER_TOOL], "tool_choice": "required", "n": 2},
        {"max_completion_tokens": 2},
    ],
)
@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_matches_the_plain_answer(
    server: FakeServer,
    session: aiohttp.ClientSession,
    extra: dict[str, Any],
    include_usage: bool,
) -> None:
    body = chat("stream this answer to me please", **extra)
    plain = await complete(session, server.url, body)
    chunks, payloads = await stream(
        session,
        server.url,
        {**body, "stream": True, "stream_options": {"include_usage": include_usage}},
    )
    assert payloads[-1] == b"[DONE]"
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    if include_usage:
        *body_chunks, last = chunks
        assert last.choices == []
        assert last.usage == plain.usage
        assert all(c.usage is None for c in body_chunks)
    else:
        body_chunks = chunks
        assert b'"usage"' not in b"".join(payloads)
    # The first delta of every choice carries the role; the content comes in several pieces.
    assert body_chunks[0].choices[0].delta.role == "assistant"
    assert len(body_chunks) > 3 * len(plain.choices)

    rebuilt = reassemble(body_chunks)
    assert sorted(rebuilt) == [c.index for c in plain.choices]
    for choice in plain.choices:
        got = rebuilt[choice.index]
        assert got["role"] == "assistant"
        assert got["finish"] == choice.finish_reason
        assert got["content"] == choice.message.content
        calls = choice.message.tool_calls or []
        streamed_calls = [got["tool_calls"][k] for k in sorted(got["tool_calls"])]
        assert all(c["id"].startswith("call_") for c in streamed_calls)
        assert [(c["name"], c["arguments"]) for c in streamed_calls] == [
            (c.function.name, c.function.arguments)  # type: ignore[union-attr]
            for c in calls
        ]
    if len(plain.choices) > 1:
        # Choices are interleaved, not sent one after the other.
        order = [c.choices[0].index for c in body_chunks]
        assert order[: len(plain.choices)] == list(range(len(plain.choices)))
    if extra.get("logprobs"):
        streamed = [
            entry.token
            for c in body_chunks
            if c.choices[0].logprobs is not None
            for entry in c.choices[0].logprobs.content or []
        ]
        expected = plain.choices[0].logprobs
        assert expected is not None and expected.content
        assert streamed == [entry.token for entry in expected.content]


async def test_tool_call_fragments_follow_openai(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    body = chat("x", tools=[WEATHER_TOOL], tool_choice="required", stream=True)
    _, payloads = await stream(session, server.url, body)
    deltas = [orjson.loads(p)["choices"][0]["delta"] for p in payloads[:-1]]
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None}
    head = deltas[1]["tool_calls"][0]
    assert head.keys() == {"index", "id", "type", "function"}
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [d["tool_calls"][0] for d in deltas[2:] if "tool_calls" in d]
    assert len(pieces) > 2
    assert all(p.keys() == {"index", "function"} for p in pieces)
    assert deltas[-1] == {}


def test_stream_events_end_with_done_and_usage() -> None:
    completion = {
        "id": "chatcmpl-1",
        "created": 1,
        "model": "m",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello world"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    }
    events = stream_events(completion, include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    assert orjson.loads(events[-2].removeprefix(b"data: "))["usage"]["total_tokens"] == 4
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)


async def test_the_openai_sdk_talks_to_it(server: FakeServer) -> None:
    async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "sdk"}], n=2
        )
        assert [c.message.content for c in completion.choices] == ["echo: sdk #0", "echo: sdk #1"]
        events = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "sdk stream"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        async for chunk in events:
            pieces.extend(c.delta.content or "" for c in chunk.choices)
            usage = chunk.usage or usage
        assert "".join(pieces) == "echo: sdk stream"
        assert usage is not None and usage.total_tokens > 0


# --------------------------------------------------------------------------- faults


async def test_scripted_fault_then_success(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    body = orjson.dumps(chat("flaky [[fault:500x2]] question"))
    statuses = [(await post(session, server.url, body))[0] for _ in range(4)]
    assert statuses == [500, 500, 200, 200]
    assert server.stats.attempts_for(body) == 4
    assert server.stats.faults_by_kind == {"500": 2}
    _, _, raw = await post(session, server.url, body)
    assert ChatCompletion.model_validate(orjson.loads(raw)).choices[0].message.content == (
        "echo: flaky  question"
    )


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("400", 400, None),
        ("401", 401, "invalid_api_key"),
        ("402", 402, "invalid_request_error"),
        ("403", 403, "unsupported_country_region_territory"),
        ("404", 404, "model_not_found"),
        ("422", 422, None),
        ("429", 429, "rate_limit_exceeded"),
        ("500", 500, None),
        ("503", 503, None),
    ],
)
async def test_scripted_error_statuses(
    server: FakeServer, session: aiohttp.ClientSession, kind: str, status: int, code: str | None
) -> None:
    body = orjson.dumps(chat(f"[[fault:{kind}]]"))
    for _ in range(2):  # without xN the fault is permanent
        got, headers, raw = await post(session, server.url, body)
        assert got == status
        error = orjson.loads(raw)["error"]
        assert error["code"] == code
        assert error["message"]
    if kind == "429":
        assert headers["retry-after-ms"] == "100"
        assert headers["Retry-After"] == "1"


@pytest.mark.parametrize("kind", ["502", "504"])
async def test_gateway_errors_are_html(
    server: FakeServer, session: aiohttp.ClientSession, kind: str
) -> None:
    status, headers, raw = await post(session, server.url, chat(f"[[fault:{kind}]]"))
    assert status == int(kind)
    assert headers["Content-Type"].startswith("text/html")
    assert raw.startswith(b"<html>")


async def test_unknown_fault_marker_is_a_400(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    status, _, raw = await post(session, server.url, chat("[[fault:explode]]"))
    assert status == 400
    assert b"unknown fault marker" in raw


async def test_broken_200s(server: FakeServer, session: aiohttp.ClientSession) -> None:
    status, _, raw = await post(session, server.url, chat("[[fault:truncated]]"))
    assert status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    status, _, raw = await post(session, server.url, chat("[[fault:non_completion]]"))
    assert (status, orjson.loads(raw)) == (200, {"ok": True})
    assert server.stats.successes == 0


async def test_reset_and_stream_cut_break_the_connection(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await post(session, server.url, chat("[[fault:reset]]"))
    body = chat("long enough answer to cut [[fault:stream_cut]]", stream=True)
    async with session.post(f"{server.url}/chat/completions", json=body) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    body = chat("an answer [[fault:truncated]]", stream=True)
    async with session.post(f"{server.url}/chat/completions", json=body) as r:
        raw = await r.read()
    assert b"[DONE]" not in raw


async def test_hang_and_trickle_hold_until_the_client_leaves(
    server: FakeServer, session: aiohttp.ClientSession
) -> None:
    async def send(kind: str) -> bytes:
        async with session.post(
            f"{server.url}/chat/completions", json=chat(f"{kind} [[fault:{kind}]]")
        ) as r:
            assert r.status == 200  # only "trickle" gets this far
            return await r.content.readexactly(1)

    hang = asyncio.create_task(send("hang"))
    trickle = asyncio.create_task(send("trickle"))
    assert await trickle == b"{"
    await until(lambda: server.stats.in_flight == 2)
    assert server.stats.max_in_flight == 2
    hang.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hang
    await session.close()  # the client leaves; the server lets go of both requests
    await until(lambda: server.stats.in_flight == 0)
    assert server.stats.faults_by_kind == {"hang": 1, "trickle": 1}


async def test_random_faults_are_seeded_per_body(session: aiohttp.ClientSession) -> None:
    bodies = [chat(f"question {i}") for i in range(60)]

    async def statuses(seed: int) -> list[int]:
        config = FakeConfig(seed=seed, fault_rates={"500": 0.3, "503": 0.2})
        async with FakeServer(config) as srv:
            results = await asyncio.gather(*(post(session, srv.url, b) for b in bodies))
        return [status for status, _, _ in results]

    first, again, other = await statuses(1), await statuses(1), await statuses(2)
    assert first == again != other
    assert {200, 500, 503} == set(first)


# --------------------------------------------------------------------------- account and limits


async def test_api_key(session: aiohttp.ClientSession) -> None:
    async with FakeServer(FakeConfig(api_key="sk-right")) as srv:
        status, _, raw = await post(session, srv.url, chat(), Authorization="Bearer sk-wrong")
        assert status == 401
        assert orjson.loads(raw)["error"]["code"] == "invalid_api_key"
        assert b"sk-wrong" not in raw
        assert (await post(session, srv.url, chat()))[0] == 401
        assert (await post(session, srv.url, chat(), Authorization="Bearer sk-right"))[0] == 200


@pytest.mark.parametrize(("quota_status", "code"), [(429, "insufficient_quota"), (402, None)])
async def test_quota_exhausted(
    session: aiohttp.ClientSession, quota_status: int, code: str | None
) -> None:
    config = FakeConfig(quota_exhausted=True, quota_status=quota_status)  # type: ignore[arg-type]
    async with FakeServer(config) as srv:
        status, headers, raw = await post(session, srv.url, chat())
    assert status == quota_status
    assert "Retry-After" not in headers
    if code:
        assert orjson.loads(raw)["error"]["code"] == code


@pytest.mark.parametrize("retry_after", [True, False])
async def test_rate_limit(session: aiohttp.ClientSession, retry_after: bool) -> None:
    # 6 RPM: one request per 10 s, so the second one in a row is always over the limit.
    async with FakeServer(FakeConfig(rpm_limit=6, retry_after=retry_after)) as srv:
        ok, ok_headers, _ = await post(session, srv.url, chat("first"))
        limited, headers, raw = await post(session, srv.url, chat("second"))
        stats = srv.stats
    assert ok == 200
    assert ok_headers["x-ratelimit-limit-requests"] == "6"
    assert ok_headers["x-ratelimit-remaining-requests"] == "5"
    assert ok_headers["x-ratelimit-reset-requests"].endswith("s")
    assert limited == 429
    error = orjson.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    if retry_after:
        assert 1 <= int(headers["Retry-After"]) <= 10
        assert 9_000 < int(headers["retry-after-ms"]) <= 10_000
    else:
        assert "Retry-After" not in headers and "retry-after-ms" not in headers
    assert stats.answers_by_status == {"200": 1, "429": 1}


async def test_rate_limit_is_quantized(session: aiohttp.ClientSession) -> None:
    # 120 RPM is enforced as 2 per second: a burst of 20 gets 2 (and a few more if the burst
    # is slow) through, although the per-minute headers say 118 remain.
    async with FakeServer(FakeConfig(rpm_limit=120)) as srv:
        results = await asyncio.gather(*(post(session, srv.url, chat(str(i))) for i in range(20)))
    admitted = [headers for status, headers, _ in results if status == 200]
    assert 2 <= len(admitted) < 20
    assert sum(status == 429 for status, _, _ in results) == 20 - len(admitted)
    assert all(int(h["x-ratelimit-remaining-requests"]) >= 100 for h in admitted)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.12, "120ms"),
        (0.0004, "1ms"),
        (1.0, "1s"),
        (2.5, "2.5s"),
        (360.0, "6m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fault_rates": {"explode": 0.1}},
        {"fault_rates": {"500": 0.7, "503": 0.7}},
        {"latency_dist": "uniform"},
        {"rpm_limit": 0},
        {"quota_status": 403},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeConfig(**kwargs)


# --------------------------------------------------------------------------- counters


async def test_stats_endpoint_and_reset(server: FakeServer, session: aiohttp.ClientSession) -> None:
    body = orjson.dumps(chat("count me"))
    for _ in range(3):
        await post(session, server.url, body)
    await post(session, server.url, chat("[[fault:503]]"))
    async with session.get(f"{server.base_url}/_stats") as r:
        stats = await r.json()
    assert stats["requests_total"] == 4
    assert stats["requests_by_body"][hashlib.sha256(body).hexdigest()] == 3
    assert stats["answers_by_status"] == {"200": 3, "503": 1}
    assert stats["faults_by_kind"] == {"503": 1}
    assert stats["successes"] == 3
    assert len(stats["success_times_s"]) == 3
    assert stats["success_times_s"] == sorted(stats["success_times_s"])
    assert stats["max_in_flight"] >= 1 and stats["in_flight"] == 0

    async with session.post(f"{server.base_url}/_reset") as r:
        assert r.status == 200
    assert server.stats.requests_total == 0
    assert server.stats.attempts_for(body) == 0


async def test_bad_bodies_are_400(server: FakeServer, session: aiohttp.ClientSession) -> None:
    for body in [
        b"{not json",
        b"[]",
        orjson.dumps({"messages": []}),
        orjson.dumps(chat(n=0)),
        orjson.dumps(chat(max_tokens="many")),
    ]:
        status, _, raw = await post(session, server.url, body)
        assert status == 400, body
        assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- other ways to run


def _sync_post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{url}/chat/completions",
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_thread_mode() -> None:
    with FakeServerThread(FakeConfig(seed=3)) as srv:
        status, raw = _sync_post(srv.url, chat("from a thread"))
        assert status == 200
        assert ChatCompletion.model_validate(orjson.loads(raw)).choices[0].message.content == (
            "echo: from a thread"
        )
        assert _sync_post(srv.url, chat("[[fault:422]]"))[0] == 422
        assert srv.stats.answers_by_status == {"200": 1, "422": 1}
        srv.reset()
        assert srv.stats.requests_total == 0


@pytest.mark.slow
def test_process_mode() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchrunner.fakeapi",
            "--port",
            "0",
            "--rpm",
            "600",
            "--fault",
            "500=0.05",
            "--api-key",
            "K",
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ").strip()
        assert url.endswith("/v1")
        request = urllib.request.Request(
            f"{url}/chat/completions",
            data=orjson.dumps(chat("from a process")),
            headers={"Content-Type": "application/json", "Authorization": "Bearer K"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.headers["x-ratelimit-limit-requests"] == "600"
            assert orjson.loads(r.read())["object"] == "chat.completion"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert proc.stdout is not None


def test_cli_rejects_bad_faults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--fault", "explode=0.5"])
    assert exc.value.code == 2
    assert "KIND=RATE" in capsys.readouterr().err
