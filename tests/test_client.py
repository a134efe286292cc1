"""The HTTP client against real local servers, and stream reassembly on its own."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import itertools
import platform
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrunner import __version__
from batchrunner.client import (
    ApiClient,
    StreamAssembler,
    _Scrubber,
    is_insecure,
    join_url,
    parse_duration_s,
    parse_retry_after_s,
    proxy_for,
)
from batchrunner.errors import UsageError
from batchrunner.outcome import Outcome, OutcomeKind, RateLimitInfo
from batchrunner.schema import SchemaCheck
from batchrunner.states import kept_text

ENDPOINT = "/v1/chat/completions"
KEY = "sk-test-3f9a1c77e2b84d0c9d1e"
REQUEST = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[str]]


@contextlib.asynccontextmanager
async def running(handler: Handler) -> AsyncIterator[str]:
    """A local server answering POST /v1/chat/completions with `handler`; yields its base
    URL (ending in /v1, as users write it)."""
    app = web.Application()
    app.router.add_post(ENDPOINT, handler)
    # Cancelling handlers when the client goes away lets hanging handlers end with the
    # test instead of holding up the server's shutdown.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts servers (see `running`) that stop at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(handler: Handler) -> str:
            return await stack.enter_async_context(running(handler))

        yield start


async def send(
    base_url: str,
    body: bytes = REQUEST,
    *,
    stream: bool = False,
    api_key: str | None = KEY,
    timeout_s: float = 10.0,
) -> Outcome:
    async with ApiClient(base_url, api_key, concurrency=4, timeout_s=timeout_s) as client:
        return await client.send(ENDPOINT, body, stream=stream)


def answer(
    status: int, payload: object, headers: dict[str, str] | None = None, content_type: str = ""
) -> Handler:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(
            status=status,
            body=body,
            headers=headers,
            content_type=content_type or "application/json",
        )

    return handler


def sse(*events: object, done: bool = True) -> bytes:
    """The bytes of a stream: one `data:` event per object, then [DONE]."""
    out = b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def stream_answer(data: bytes, *, piece_bytes: int = 0, cut: bool = False) -> Handler:
    """Streams `data` as an event stream, in pieces of `piece_bytes` when given; with
    `cut`, the connection is dropped after the data instead of ending the response."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-request-id": "req_stream"}
        )
        await response.prepare(request)
        size = piece_bytes or len(data) or 1
        for start in range(0, len(data), size):
            await response.write(data[start : start + size])
        if cut:
            assert request.transport is not None
            request.transport.abort()
            await asyncio.Event().wait()  # cancelled once the server sees the drop
        await response.write_eof()
        return response

    return handler


def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1700000009,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_9",
        "choices": choices,
        **extra,
    }


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish_reason}


# --- the HTTP table ---------------------------------------------------------------------

ERROR_400 = {"error": {"message": "Invalid model", "type": "invalid_request_error"}}
QUOTA = {"error": {"message": "You exceeded your quota", "type": "x", "code": "insufficient_quota"}}
QUOTA_BY_TYPE = {"error": {"message": "No credit", "type": "insufficient_quota", "code": None}}
RATE_LIMIT = {"error": {"message": "Slow down", "type": "requests", "code": "rate_limit_exceeded"}}
#: OpenAI's 429 for a request larger than the whole tokens-per-minute limit.
TOO_LARGE = {
    "error": {
        "message": "Request too large for gpt-4o in organization org-x on tokens per min (TPM):"
        " Limit 30000, Requested 31538. The input or output tokens must be reduced in order to"
        " run successfully.",
        "type": "tokens",
        "code": "rate_limit_exceeded",
    }
}
#: Anthropic's account without credit, as a 400; a LiteLLM proxy's budget.
NO_CREDIT = {
    "error": {
        "message": "Your credit balance is too low to access the Anthropic API.",
        "type": "invalid_request_error",
    }
}
BUDGET = {"error": {"message": "Budget has been exceeded!", "type": "budget_exceeded"}}
#: OpenRouter's rate limit inside a 200 answer.
LIMITED_IN_200 = {"error": {"message": "Rate limit exceeded", "code": 429}}
#: xAI's account out of credit, as a 429 (the body as xAI sends it: `error` a string).
XAI_NO_CREDIT = {
    "code": "Some resource has been exhausted",
    "error": "Your team t-1 has either used all available credits or reached its monthly"
    " spending limit. To continue making API requests, please purchase more credits or raise"
    " your spending limit.",
}
#: OpenAI's account whose billing is not active: a 429, on every call, for as long as it lasts.
OPENAI_BILLING_NOT_ACTIVE = {
    "error": {
        "message": "Your account is not active, please check your billing details on our website.",
        "type": "billing_not_active",
        "param": None,
        "code": "billing_not_active",
    }
}
#: Moonshot's (Kimi's) account suspended for its balance: a 429.
MOONSHOT_SUSPENDED = {
    "error": {
        "message": "Your account org-1 is suspended, please check your plan and billing details",
        "type": "exceeded_current_quota_error",
    }
}
#: Gemini's OpenAI-compatible endpoint: a bad key is a 400, in a list.
GEMINI_BAD_KEY = [
    {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ],
        }
    }
]
#: OpenRouter's moderation refusing one request's input.
FLAGGED = {
    "error": {
        "code": 403,
        "message": "openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for"
        ' "harassment". No credits were charged.',
        "metadata": {"reasons": ["harassment"], "flagged_input": "...", "provider_name": "x"},
    }
}
#: OpenRouter: a choice whose generation failed, in a 200 answer.
CHOICE_FAILED = {
    "id": "gen-1",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "finish_reason": "error",
            "message": {"role": "assistant", "content": ""},
            "error": {"code": 502, "message": "Upstream provider returned an error"},
        }
    ],
}
CHOICE_REFUSED = {
    "object": "chat.completion",
    "choices": [{"index": 0, "finish_reason": "error", "error": {"code": 400, "message": "bad"}}],
}


@pytest.mark.parametrize(
    ("status", "payload", "kind", "error_kind", "message"),
    [
        (200, COMPLETION, OutcomeKind.SUCCESS, None, None),
        (200, {"choices": []}, OutcomeKind.RETRY, "not_completion",
         "the answer holds no choice with a message"),
        (200, b'{"id": "chatcmpl-1", "choices": [{"ind', OutcomeKind.RETRY, "bad_json", None),
        (200, b"", OutcomeKind.RETRY, "bad_json", None),
        (200, b"\xff\xfe{}", OutcomeKind.RETRY, "bad_json", None),
        (200, {"object": "list", "data": []}, OutcomeKind.RETRY, "not_completion", None),
        (200, {"object": "chat.completion.chunk", "choices": []}, OutcomeKind.RETRY,
         "not_completion", None),
        (200, [1, 2], OutcomeKind.RETRY, "not_completion", None),
        (200, {"error": {"message": "upstream died"}}, OutcomeKind.RETRY, "not_completion",
         "upstream died"),
        (200, QUOTA, OutcomeKind.STOP_RUN, "quota", "You exceeded your quota"),
        (408, b"", OutcomeKind.RETRY, "http_408", "HTTP 408 Request Timeout"),
        (409, b"conflict", OutcomeKind.RETRY, "http_409", "HTTP 409 Conflict: conflict"),
        (429, RATE_LIMIT, OutcomeKind.RETRY, "rate_limit", "Slow down"),
        (500, b"<html>oops</html>", OutcomeKind.RETRY, "server_error",
         "HTTP 500 Internal Server Error"),
        (502, b"", OutcomeKind.RETRY, "server_error", None),
        (503, b"", OutcomeKind.RETRY, "server_error", None),
        (504, b"", OutcomeKind.RETRY, "server_error", None),
        (529, {"error": {"message": "Overloaded"}}, OutcomeKind.RETRY, "server_error",
         "Overloaded"),
        (501, {"error": {"message": "n > 1 is not supported"}}, OutcomeKind.FAIL_JOB,
         "http_501", "n > 1 is not supported"),
        (505, b"", OutcomeKind.FAIL_JOB, "http_505", None),
        (400, ERROR_400, OutcomeKind.FAIL_JOB, "http_400", "Invalid model"),
        (404, {"error": {"message": "No such model"}}, OutcomeKind.FAIL_JOB, "http_404",
         "No such model"),
        (422, {"error": "unprocessable"}, OutcomeKind.FAIL_JOB, "http_422", "unprocessable"),
        (413, b"too big", OutcomeKind.FAIL_JOB, "http_413", None),
        (400, [{"error": {"message": "wrapped", "code": 400}}], OutcomeKind.FAIL_JOB,
         "http_400", "wrapped"),
        (401, {"error": {"message": "Bad key"}}, OutcomeKind.STOP_RUN, "auth", "Bad key"),
        (403, b"", OutcomeKind.STOP_RUN, "auth", None),
        # A proxy asking for its credentials, in front of a plain-http API: every job failed.
        (407, b"", OutcomeKind.STOP_RUN, "proxy",
         "a proxy refused the way to the API: HTTP 407 Proxy Authentication Required"
         " (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY name it, with its user and password)"),
        (402, b"", OutcomeKind.STOP_RUN, "quota", None),
        (429, QUOTA, OutcomeKind.STOP_RUN, "quota", "You exceeded your quota"),
        (400, QUOTA_BY_TYPE, OutcomeKind.STOP_RUN, "quota", "No credit"),
        (400, NO_CREDIT, OutcomeKind.STOP_RUN, "quota", NO_CREDIT["error"]["message"]),
        (400, BUDGET, OutcomeKind.STOP_RUN, "quota", "Budget has been exceeded!"),
        (429, TOO_LARGE, OutcomeKind.FAIL_JOB, "request_too_large", None),
        (400, {"error": {"message": "odd", "code": {"reason": "x"}, "type": ["y"]}},
         OutcomeKind.FAIL_JOB, "http_400", "odd"),
        (200, LIMITED_IN_200, OutcomeKind.RETRY, "rate_limit", "Rate limit exceeded"),
        (498, {"error": {"message": "Capacity exceeded", "code": "capacity_exceeded"}},
         OutcomeKind.RETRY, "http_498", "Capacity exceeded"),
        # "Not now", failed at once before.
        (425, b"", OutcomeKind.RETRY, "http_425", None),
        (499, {"error": {"code": 499, "message": "The operation was cancelled.",
                         "status": "CANCELLED"}},
         OutcomeKind.RETRY, "http_499", "The operation was cancelled."),
        (429, XAI_NO_CREDIT, OutcomeKind.STOP_RUN, "quota", XAI_NO_CREDIT["error"]),
        # Retried as rate limits, these failed every job of the batch instead of stopping.
        (429, OPENAI_BILLING_NOT_ACTIVE, OutcomeKind.STOP_RUN, "quota", None),
        (429, MOONSHOT_SUSPENDED, OutcomeKind.STOP_RUN, "quota", None),
        # The words alone, in a 400 that echoes the request: a bad line, not the account.
        (400, {"error": {"message": "1 validation error: messages.1.content: field required;"
                         " input: {'role': 'user', 'contnet': 'Insufficient balance'}"}},
         OutcomeKind.FAIL_JOB, "http_400", None),
        (400, GEMINI_BAD_KEY, OutcomeKind.STOP_RUN, "auth",
         "API key not valid. Please pass a valid API key."),
        (403, FLAGGED, OutcomeKind.FAIL_JOB, "flagged", FLAGGED["error"]["message"]),
        (403, {"error": {"message": "Your input was flagged"}}, OutcomeKind.FAIL_JOB, "flagged",
         None),
        (403, {"error": {"message": "Key disabled", "metadata": {}}}, OutcomeKind.STOP_RUN,
         "auth", "Key disabled"),
        # Moderation's own fields, not any 403 with reasons: that is the key's, and stops.
        (403, {"error": {"message": "Forbidden", "metadata": {"reasons": ["region"]}}},
         OutcomeKind.STOP_RUN, "auth", "Forbidden"),
    ],
)  # fmt: skip
async def test_http_table(
    serve: Serve,
    status: int,
    payload: object,
    kind: OutcomeKind,
    error_kind: str | None,
    message: str | None,
) -> None:
    base_url = await serve(answer(status, payload, {"x-request-id": "req_123"}))
    outcome = await send(base_url)
    assert (outcome.kind, outcome.status, outcome.error_kind) == (kind, status, error_kind)
    if message is not None:
        assert outcome.message == message
    assert outcome.request_id == "req_123"
    assert outcome.latency_s > 0
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    if kind is OutcomeKind.SUCCESS:
        assert outcome.body == raw.decode()
        assert outcome.completion == orjson.loads(raw)
    else:
        assert outcome.completion is None
        assert outcome.message
        assert outcome.body == raw.decode(errors="replace")


@pytest.mark.parametrize(
    ("payload", "kind", "error_kind", "message"),
    [
        (CHOICE_FAILED, OutcomeKind.RETRY, "choice_error", "Upstream provider returned an error"),
        (CHOICE_REFUSED, OutcomeKind.FAIL_JOB, "http_400", "bad"),
        ({"choices": [{"index": 0, "finish_reason": "error", "message": {}}]},
         OutcomeKind.RETRY, "choice_error", "a choice ended in an error"),
        # The upstream provider's key or balance, not this run's: retried, the run goes on.
        ({"choices": [{"finish_reason": "error", "error": {"code": 401, "message": "upstream"}}]},
         OutcomeKind.RETRY, "choice_error", "upstream"),
        ({"choices": [{"finish_reason": "error", "error": {"code": 429, "message": "busy"}}]},
         OutcomeKind.RETRY, "choice_error", "busy"),
    ],
)  # fmt: skip
async def test_a_choice_that_ended_in_an_error_is_no_success_and_keeps_its_answer(
    serve: Serve, payload: dict[str, Any], kind: OutcomeKind, error_kind: str, message: str
) -> None:
    """OpenRouter ends a choice whose generation failed with finish_reason "error" and the
    error beside it: it was stored as a success. What it used was paid for: the answer stays
    with the outcome (the dispatcher counts it)."""
    payload = payload | {"usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
    outcome = await send(await serve(answer(200, payload)))
    assert (outcome.kind, outcome.error_kind, outcome.message) == (kind, error_kind, message)
    assert outcome.completion == payload
    assert outcome.body == orjson.dumps(payload).decode()


async def test_a_402_that_says_when_to_come_back_is_waited_for_not_the_end(serve: Serve) -> None:
    # OpenRouter's 402 for its budget of requests in flight comes with a Retry-After: the
    # account is fine, and stopping the run for it stopped an overnight batch for nothing.
    base_url = await serve(answer(402, {"error": {"message": "busy"}}, {"Retry-After": "2"}))
    outcome = await send(base_url)
    assert (outcome.kind, outcome.error_kind, outcome.retry_after_s) == (
        OutcomeKind.RETRY,
        "rate_limit",
        2.0,
    )


async def test_success_body_is_kept_byte_for_byte(serve: Serve) -> None:
    text = (
        '{ "choices" : [ {"message": {"content": "\\u00e9"}} ],\n  "object": "chat.completion",'
        ' "note": "caf\u00e9 \\u00e9" }'
    )
    base_url = await serve(answer(200, text.encode()))
    outcome = await send(base_url)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.body == text
    assert outcome.completion is not None and outcome.completion["note"] == "café é"


async def test_a_redirect_is_not_followed_and_stops_the_run(serve: Serve) -> None:
    """A redirect failed every job of the batch one by one (exit 3), and where it pointed was
    lost when it came with a page (nginx's): the page was stored as the error."""
    page = b"<html><body><center>301 Moved Permanently</center><hr>nginx</body></html>"
    base_url = await serve(answer(301, page, {"Location": "https://elsewhere.example/v1"}))
    outcome = await send(base_url)
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.STOP_RUN, "redirect")
    assert outcome.body is None
    assert outcome.message == (
        "the API redirects to https://elsewhere.example/v1 (HTTP 301 Moved Permanently): fix the"
        " base URL (run --base-url); redirects are not followed, so that the request stays a"
        " POST and the key goes to no other host"
    )


async def test_request_is_sent_as_given(serve: Serve) -> None:
    seen: list[tuple[dict[str, str], bytes, str]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append((dict(request.headers), await request.read(), request.path))
        return web.json_response(COMPLETION)

    base_url = await serve(record)
    body = b'{"model":"m","messages":[],"x":  "\xc3\xa9"}'
    assert (await send(base_url, body)).kind is OutcomeKind.SUCCESS
    assert (await send(base_url, body, api_key=None)).kind is OutcomeKind.SUCCESS
    (headers, received, path), (anonymous, _, _) = seen
    assert received == body
    assert path == ENDPOINT
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["User-Agent"] == f"batchrunner/{__version__}"
    assert "Authorization" not in anonymous


async def test_one_client_sends_many_requests_concurrently(serve: Serve) -> None:
    base_url = await serve(answer(200, COMPLETION))
    async with ApiClient(base_url, KEY, concurrency=8, timeout_s=10.0) as client:
        outcomes = await asyncio.gather(
            *(client.send(ENDPOINT, REQUEST, stream=False) for _ in range(50))
        )
    assert {outcome.kind for outcome in outcomes} == {OutcomeKind.SUCCESS}


# --- headers ----------------------------------------------------------------------------


def http_date(offset_s: float) -> str:
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=offset_s), True)


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ({"Retry-After": "2"}, 2.0, 2.0),
        ({"Retry-After": "0.5"}, 0.5, 0.5),
        ({"retry-after-ms": "150"}, 0.15, 0.15),
        ({"retry-after-ms": "150", "Retry-After": "5"}, 0.15, 0.15),
        ({"retry-after-ms": "soon", "Retry-After": "5"}, 5.0, 5.0),
        # HTTP-dates have whole seconds and the wall clock moves on: a range, not a value.
        ({"Retry-After": "DATE+30"}, 25.0, 31.0),
        # "Now" says nothing about when: the pacer's own backoff holds instead (taken at its
        # word, a refusing server drew a storm of attempts that used up their jobs' allowance).
        ({"Retry-After": "DATE-30"}, None, None),
        ({"Retry-After": "0"}, None, None),
        ({"retry-after-ms": "0", "Retry-After": "3"}, 3.0, 3.0),
        ({"Retry-After": "whenever"}, None, None),
        # A day at most: more broke the pacer's arithmetic, and the run with it.
        ({"Retry-After": "99999999999999999999999"}, 86_400.0, 86_400.0),
        ({"retry-after-ms": "1e300"}, 86_400.0, 86_400.0),
        ({"Retry-After": "-3"}, None, None),
        ({}, None, None),
    ],
)
async def test_retry_after(
    serve: Serve, headers: dict[str, str], low: float | None, high: float | None
) -> None:
    sent = {
        name: http_date(float(value[4:])) if value.startswith("DATE") else value
        for name, value in headers.items()
    }
    base_url = await serve(answer(429, RATE_LIMIT, sent))
    outcome = await send(base_url)
    assert outcome.error_kind == "rate_limit"
    if low is None or high is None:
        assert outcome.retry_after_s is None
    else:
        assert outcome.retry_after_s is not None
        assert low - 1e-9 <= outcome.retry_after_s <= high + 1e-9


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (None, None),
        ("req-123", "req-123"),
        ("req-café", "req-café"),  # UTF-8 as sent
        ("req-caf\udce9", "req-caf\ufffd"),  # a Latin-1 byte, as aiohttp keeps it
        ("\udcff\udcfe", "\ufffd\ufffd"),
        ("a\ud800b", "a\ufffd\ufffd\ufffdb"),  # a surrogate that stands for no byte
    ],
)
def test_text_from_the_wire_is_text_a_database_can_hold(
    value: str | None, kept: str | None
) -> None:
    assert kept_text(value) == kept
    if kept is not None:
        kept.encode("utf-8")  # what JSON and both databases need


@pytest.mark.parametrize(
    ("status", "error", "delay_s"),
    [
        # Gemini's daily quota: the delay is only in the body, as a RetryInfo detail.
        (429, {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Quota exceeded.",
               "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": "39043s"}]}, 39043.0),
        (503, {"message": "x", "details": [{"retryDelay": "45.8s"}]}, 45.8),
        (429, {"message": "Quota exceeded for metric. Please retry in 10h50m43.6s."}, 39043.6),
        (429, {"message": "Please retry in 20.5s"}, 20.5),
        (429, {"message": "Please retry in 43.6s, or raise your quota."}, 43.6),
        # OpenAI's token and daily limits: no Retry-After, the delay in the message alone.
        (429, {"message": "Rate limit reached for gpt-4o-mini in organization org-1 on tokens"
               " per day (TPD): Limit 200000, Used 199990, Requested 30. Please try again in"
               " 6m0s. Visit https://platform.openai.com/account/rate-limits to learn more.",
               "type": "tokens", "code": "rate_limit_exceeded"}, 360.0),
        (429, {"message": "... Please try again in 1m9.696s. Visit ..."}, 69.696),
        # Shorter ones, under per-minute limits, are one request's guess: the run's backoff.
        (429, {"message": "... Please try again in 20ms. Visit ..."}, None),
        (429, {"message": "... Please try again in 59.9s. Visit ..."}, None),
        # A duration has its units: "1 minute" is none (it was read as 1 s).
        (429, {"message": "Too many requests. Please try again in 1 minute."}, None),
        (429, {"message": "Please retry in 3 days."}, None),
        (429, {"message": "x", "details": [{"retryDelay": "0s"}, "odd", {"retryDelay": 5}]}, None),
        (429, {"message": "Please retry in a while."}, None),
        # Other statuses' bodies say nothing about the run's pace.
        (500, {"message": "Please retry in 20s."}, None),
    ],
)  # fmt: skip
async def test_a_delay_given_only_in_the_error_body_is_honoured(
    serve: Serve, status: int, error: dict[str, Any], delay_s: float | None
) -> None:
    """Gemini's 429s carry no Retry-After: its default backoff hammered a daily quota (1, 2,
    4, 8 s against 10 h 50 min asked for) until every job had failed."""
    base_url = await serve(answer(status, [{"error": error}]))
    outcome = await send(base_url)
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.retry_after_s == (None if delay_s is None else pytest.approx(delay_s))
    # A header, where there is one, is what the server means.
    base_url = await serve(answer(status, [{"error": error}], {"Retry-After": "7"}))
    assert (await send(base_url)).retry_after_s == 7.0


def test_retry_after_parser_takes_plain_mappings() -> None:
    assert parse_retry_after_s({"retry-after": "3"}) == 3.0
    assert parse_retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert parse_retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00"}) is None
    in_an_hour = parse_retry_after_s({"retry-after": http_date(3600).replace("GMT", "")})
    assert in_an_hour is not None and in_an_hour > 3000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("2h3m4.5s", 7384.5),
        ("0s", 0.0),
        ("17", 17.0),
        ("0.25", 0.25),
        (" 3s ", 3.0),
        ("1m30s", 90.0),
        ("500us", 0.0005),
        ("", None),
        ("s", None),
        ("1x", None),
        ("fast", None),
        ("-1", None),
        ("nan", None),
        ("1s2", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    result = parse_duration_s(text)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


async def test_ratelimit_headers(serve: Serve) -> None:
    headers = {
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-limit-tokens": "2000000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-remaining-tokens": "1999000",
        "x-ratelimit-reset-requests": "6m0s",
        "x-ratelimit-reset-tokens": "20ms",
    }
    base_url = await serve(answer(200, COMPLETION, headers))
    outcome = await send(base_url)
    assert outcome.ratelimit == RateLimitInfo(
        limit_requests=10000,
        limit_tokens=2000000,
        remaining_requests=9999,
        remaining_tokens=1999000,
        reset_requests_s=360.0,
        reset_tokens_s=0.02,
    )


async def test_ratelimit_headers_partly_present_or_absent(serve: Serve) -> None:
    headers = {
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1.5s",
        "x-ratelimit-limit-requests": "lots",
    }
    base_url = await serve(answer(429, RATE_LIMIT, headers))
    outcome = await send(base_url)
    assert outcome.ratelimit == RateLimitInfo(remaining_tokens=0, reset_tokens_s=1.5)
    base_url = await serve(answer(200, COMPLETION))
    assert (await send(base_url)).ratelimit is None


@pytest.mark.parametrize(
    ("reset", "low", "high"),
    [
        ("EPOCH_MS+3600", 3590.0, 3600.0),  # OpenRouter's: Unix time in milliseconds
        ("EPOCH_S+120", 115.0, 120.0),
        ("30", 30.0, 30.0),
        ("EPOCH_MS-60", 0.0, 0.0),
        ("5000000", None, None),  # 58 days, or milliseconds until? Neither for sure.
    ],
)
async def test_a_limit_without_its_kind_in_the_header_names_is_the_request_limit(
    serve: Serve, reset: str, low: float | None, high: float | None
) -> None:
    # OpenRouter's daily cap of free requests: X-RateLimit-Remaining and X-RateLimit-Reset,
    # without Retry-After. Unread, jobs went through their 429 allowance and failed, with
    # no word of a wait until the reset.
    now = time.time()
    if reset.startswith("EPOCH_MS"):
        reset = str(int((now + float(reset[8:])) * 1000))
    elif reset.startswith("EPOCH_S"):
        reset = str(int(now + float(reset[7:])))
    headers = {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}
    base_url = await serve(answer(429, RATE_LIMIT, headers))
    info = (await send(base_url)).ratelimit
    assert info is not None and info.remaining_requests == 0
    if low is None or high is None:
        assert info.reset_requests_s is None
    else:
        assert info.reset_requests_s is not None and low - 1 <= info.reset_requests_s <= high + 1


async def test_request_id_from_either_header(serve: Serve) -> None:
    base_url = await serve(answer(500, b"", {"request-id": "req_alt"}))
    assert (await send(base_url)).request_id == "req_alt"


# --- no answer --------------------------------------------------------------------------


async def test_timeout_when_the_server_hangs(serve: Serve) -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    base_url = await serve(hang)
    outcome = await send(base_url, timeout_s=0.5)
    assert (outcome.kind, outcome.status, outcome.error_kind) == (
        OutcomeKind.RETRY,
        None,
        "timeout",
    )
    assert 0.4 < outcome.latency_s < 10.0


@pytest.mark.parametrize("stream", [False, True])
async def test_timeout_when_the_server_trickles(serve: Serve, stream: bool) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        await request.read()
        content_type = "text/event-stream" if stream else "application/json"
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        # A byte every 50 ms: never silent long enough for a read timeout to fire.
        for _ in range(1000):
            await response.write(b": still here\n" if stream else b" ")
            await asyncio.sleep(0.05)
        raise AssertionError("the client should have given up")

    base_url = await serve(trickle)
    outcome = await send(base_url, stream=stream, timeout_s=0.5)
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "timeout")
    assert 0.4 < outcome.latency_s < 10.0
    # --timeout is the whole request's: a stream that never paused did not "stall".
    assert outcome.message is not None and "within 0.5 s" in outcome.message


@contextlib.asynccontextmanager
async def raw_server(answer: bytes, heads: list[bytes] | None = None) -> AsyncIterator[int]:
    """A server on 127.0.0.1 that reads a request's head (kept in `heads`), writes `answer`
    as it is and closes: for answers aiohttp's server would not write, and for proxies.
    Yields its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if heads is not None:
            heads.append(head)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    "head",
    [b"Content-Length: 2\r\nContent-Length: 3", b"Content-Encoding: br\r\nContent-Length: 5"],
)
async def test_an_answer_the_client_cannot_read_is_not_called_an_http_400(head: bytes) -> None:
    """aiohttp's own status for an answer it cannot parse or decode went into the error as
    "ClientResponseError: 400, message=...", beside no status at all: read as the server's."""

    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + head
    async with raw_server(answer + b"\r\n\r\n\x8b\x00\x80xyz") as port:
        outcome = await send(f"http://127.0.0.1:{port}/v1")
    assert (outcome.kind, outcome.status) == (OutcomeKind.RETRY, None)
    assert outcome.message is not None and "400" not in outcome.message, outcome.message


async def test_connection_reset(serve: Serve) -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.abort()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    base_url = await serve(reset)
    outcome = await send(base_url)
    assert (outcome.kind, outcome.status, outcome.error_kind) == (
        OutcomeKind.RETRY,
        None,
        "connection",
    )
    assert outcome.message


async def test_body_cut_short(serve: Serve) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"choices": [')
        assert request.transport is not None
        request.transport.abort()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    base_url = await serve(cut)
    outcome = await send(base_url)
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "connection")


async def test_nothing_listening() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The port was free a moment ago and nothing listens on it now.
    outcome = await send(f"http://127.0.0.1:{port}/v1", timeout_s=5.0)
    assert (outcome.kind, outcome.status, outcome.error_kind) == (
        OutcomeKind.RETRY,
        None,
        "connection",
    )


async def test_invalid_base_url_fails_the_job() -> None:
    outcome = await send("http://[not-an-address/v1")
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.FAIL_JOB, "invalid_url")


# --- the key ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 401, 429, 500])
async def test_key_never_in_outcome(serve: Serve, status: int) -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}.", "code": "invalid"}}
    base_url = await serve(answer(status, echo))
    outcome = await send(base_url)
    assert outcome.kind is not OutcomeKind.SUCCESS
    assert outcome.message is not None and "Incorrect API key" in outcome.message
    assert KEY not in repr(outcome)


async def test_key_never_in_stream_error() -> None:
    data = sse({"error": {"message": f"bad key {KEY}"}}, done=False)
    outcome = await stream_outcome(data)
    assert outcome.error_kind == "stream_error"
    assert KEY not in repr(outcome)


def test_key_never_in_client_repr() -> None:
    assert KEY not in repr(ApiClient("https://x.example/v1", KEY, concurrency=1, timeout_s=1))


# --- streams ----------------------------------------------------------------------------

TEXT_STREAM = sse(
    chunk([delta(role="assistant", content="", refusal=None)], usage=None),
    chunk([delta(content="Hel")], usage=None),
    chunk([delta(content="lo, ")], usage=None),
    chunk([delta(content="wörld")], usage=None),
    chunk([delta(finish_reason="stop")], usage=None),
    chunk([], usage={"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}),
)

TOOL_STREAM = sse(
    chunk([delta(role="assistant", content=None, tool_calls=[
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}])]),
    chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": '{"ci'}}])]),
    chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}])]),
    chunk([delta(tool_calls=[
        {"index": 1, "id": "call_b", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz"'}}])]),
    chunk([delta(tool_calls=[{"index": 1, "function": {"arguments": ': "CET"}'}}])]),
    chunk([delta(finish_reason="tool_calls")]),
)  # fmt: skip

N2_STREAM = sse(
    chunk([delta(0, role="assistant", content=""), delta(1, role="assistant", content="")]),
    chunk([delta(1, content="B1 ")]),
    chunk([delta(0, content="A1 ")]),
    chunk([delta(0, content="A2"), delta(1, content="B2")]),
    chunk([delta(1, finish_reason="length")]),
    chunk([delta(0, finish_reason="stop")]),
    chunk([], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
)


async def stream_outcome(data: bytes, **options: Any) -> Outcome:
    """Serves `data` as an event stream from a fresh server and sends one stream request."""
    async with running(stream_answer(data, **options)) as base_url:
        return await send(base_url, stream=True)


async def test_stream_text() -> None:
    outcome = await stream_outcome(TEXT_STREAM, piece_bytes=7)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.request_id == "req_stream"
    assert outcome.completion == {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 1700000009,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_9",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, wörld", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }
    assert outcome.body is not None and orjson.loads(outcome.body) == outcome.completion


async def test_stream_tool_calls() -> None:
    outcome = await stream_outcome(TOOL_STREAM, piece_bytes=13)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.completion is not None
    (choice,) = outcome.completion["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
            },
        ],
    }
    assert "usage" not in outcome.completion


async def test_stream_content_sent_as_parts_keeps_every_part_and_the_text() -> None:
    """Mistral's Magistral streams its thinking as a list of parts, then the answer as text.
    Before, the list replaced the joined text, and the answer was lost."""

    def thinking(text: str) -> list[dict[str, Any]]:
        return [{"type": "thinking", "thinking": [{"type": "text", "text": text}]}]

    data = sse(
        chunk([delta(role="assistant", content="")]),  # as Mistral's streams open
        chunk([delta(content=thinking("Okay, "))]),
        chunk([delta(content=thinking("a greeting."))]),
        chunk([delta(content="Hello! ")]),
        chunk([delta(content="How can I help?", finish_reason="stop")]),
    )
    outcome = await stream_outcome(data, piece_bytes=11)
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"] == [
        {"type": "thinking", "thinking": [{"type": "text", "text": "Okay, a greeting."}]},
        {"type": "text", "text": "Hello! How can I help?"},
    ]
    # Mistral may mark each piece of its thinking open (`closed`): still one part.
    closed = data.replace(b'"type":"thinking",', b'"type":"thinking","closed":false,')
    assert closed.count(b'"closed":false') == 2
    outcome = await stream_outcome(closed)
    assert outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"][0] == {
        "type": "thinking",
        "closed": False,
        "thinking": [{"type": "text", "text": "Okay, a greeting."}],
    }


async def test_stream_tool_calls_keep_their_other_fields() -> None:
    """Gemini sends a thought signature with each tool call (`extra_content`), which the
    next turn must send back; before, a streamed call kept only id, type and function."""
    signature = {"google": {"thought_signature": "c2lnbmF0dXJl"}}
    data = sse(
        chunk([delta(role="assistant", tool_calls=[
            {"index": 0, "id": "call_a", "type": "function", "extra_content": signature,
             "function": {"name": "get_weather", "arguments": '{"city"'}}])]),
        chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": ': "Oslo"}'}}])]),
        chunk([delta(finish_reason="tool_calls")]),
    )  # fmt: skip
    outcome = await stream_outcome(data)
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    (call,) = outcome.completion["choices"][0]["message"]["tool_calls"]
    assert call == {
        "id": "call_a",
        "type": "function",
        "extra_content": signature,
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }


async def test_stream_objects_in_pieces_are_merged_not_replaced() -> None:
    """Audio output arrives as an object per chunk: its data and transcript in pieces, its
    id and expiry once. Before, each chunk's object replaced the last."""
    data = sse(
        chunk([delta(role="assistant", audio={
            "id": "audio_1", "data": "AAAA", "transcript": "Hel", "expires_at": 1700000100})]),
        chunk([delta(audio={"id": "audio_1", "data": "BBBB", "transcript": "lo"})]),
        chunk([delta(audio={"data": "CCCC"}, finish_reason="stop")]),
    )  # fmt: skip
    outcome = await stream_outcome(data)
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["audio"] == {
        "id": "audio_1",
        "data": "AAAABBBBCCCC",
        "transcript": "Hello",
        "expires_at": 1700000100,
    }


@pytest.mark.parametrize(
    ("raw", "content"),
    [
        # A gateway cut a string between the halves of a surrogate pair.
        (orjson.dumps(COMPLETION).replace(b'"Hello"', b'"cut \\ud83d"'), "cut \ufffd"),
        (b"\xef\xbb\xbf" + orjson.dumps(COMPLETION), "Hello"),  # a byte-order mark first
    ],
    ids=["lone-surrogate", "bom"],
)
async def test_json_only_orjson_refuses_is_kept_not_retried(
    serve: Serve, raw: bytes, content: str
) -> None:
    """Before, these answers were retried as bad JSON (and paid for) until the job failed.
    The text kept is one every reader of the database can parse."""
    outcome = await send(await serve(answer(200, raw)))
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"] == content
    assert outcome.body is not None and orjson.loads(outcome.body) == outcome.completion
    streamed = sse(chunk([delta(content="x")]), chunk([delta(finish_reason="stop")]))
    mended = streamed.replace(b'"content":"x"', b'"content":"x \\ud83d"')
    assert mended != streamed
    outcome = await stream_outcome(mended)
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"] == "x \ufffd"


async def test_an_emoji_cut_between_two_stream_events_is_whole_again() -> None:
    """Each half of a surrogate pair, alone in its event, was mended to U+FFFD on its own."""
    data = sse(
        chunk([delta(role="assistant", content="hi ")]),
        chunk([delta(content="HIGH")]),
        chunk([delta(content="LOW there", finish_reason="stop")]),
    )
    data = data.replace(b'"HIGH"', b'"\\ud83d"').replace(b'"LOW', b'"\\ude00')
    outcome = await stream_outcome(data)
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"] == "hi \U0001f600 there"
    assert outcome.body is not None and orjson.loads(outcome.body) == outcome.completion


async def test_a_stream_keeps_the_fields_vendors_add_to_chunks_and_choices() -> None:
    """Perplexity's citations and OpenRouter's provider ride on every chunk, OpenRouter's
    native_finish_reason on the last choice; OpenAI's `obfuscation` is padding."""
    extra = {"citations": ["https://a.example/1"], "provider": "Mistral"}
    last = {**delta(finish_reason="stop"), "native_finish_reason": "end_turn"}
    data = sse(
        chunk([delta(role="assistant", content="Paris.")], **extra, x_groq={"id": "req_1"}),
        chunk([last], **extra, obfuscation="Qwe1", x_groq={"id": "req_1", "usage": {"q": 1}}),
    )
    outcome = await stream_outcome(data)
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    completion = outcome.completion
    assert (completion["citations"], completion["provider"]) == (extra["citations"], "Mistral")
    assert completion["x_groq"] == {"id": "req_1", "usage": {"q": 1}}
    assert "obfuscation" not in completion
    (choice,) = completion["choices"]
    assert (choice["finish_reason"], choice["native_finish_reason"]) == ("stop", "end_turn")
    # A field of a choice never takes the place of what the assembler builds.
    whole = {**delta(finish_reason="stop"), "message": {"content": "raw"}}
    outcome = await stream_outcome(sse(chunk([delta(content="built")]), chunk([whole])))
    assert outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"] == "built"


async def test_a_stream_without_done_is_unfinished_without_the_usage_it_asked_for() -> None:
    """The usage comes after the last finish_reason: a stream cut cleanly between the two
    lacks it, and a request that asked for it is sent again. An empty finish_reason on
    every chunk (some servers) is no finish."""
    data = TEXT_STREAM[: TEXT_STREAM.index(b"data: [DONE]")]
    cut = data[: data.rindex(b"data:")]
    assert b'usage":{' not in cut
    asking = orjson.dumps(
        {**orjson.loads(REQUEST), "stream": True, "stream_options": {"include_usage": True}}
    )
    async with running(stream_answer(cut)) as base_url:
        asked = await send(base_url, asking, stream=True)
        plain = await send(base_url, REQUEST, stream=True)
    assert (asked.kind, asked.error_kind) == (OutcomeKind.RETRY, "stream_broken")
    assert plain.kind is OutcomeKind.SUCCESS
    empty = sse(
        chunk([delta(role="assistant", content="Hel", finish_reason="")]),
        chunk([delta(content="lo", finish_reason="")]),
        done=False,
    )
    outcome = await stream_outcome(empty)
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "stream_broken")
    # An empty finish_reason after the real one does not take its place.
    late = sse(chunk([delta(content="Hi", finish_reason="stop")]), chunk([delta(finish_reason="")]))
    outcome = await stream_outcome(late)
    assert outcome.completion is not None
    assert outcome.completion["choices"][0]["finish_reason"] == "stop"


def test_content_sent_as_parts_is_judged_by_its_text() -> None:
    """Magistral answers with its thinking and its text as parts: every such answer failed
    the check, and with --retry-invalid-json was paid for again until its job failed."""
    body = orjson.dumps(
        {
            "model": "magistral-medium-latest",
            "messages": [{"role": "user", "content": "yes or no?"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "a",
                    "schema": {"type": "object", "required": ["a"]},
                },
            },
        }
    ).decode()

    def answer(*texts: str) -> dict[str, Any]:
        thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}
        parts = [thinking, *({"type": "text", "text": t} for t in texts)]
        return {"choices": [{"message": {"role": "assistant", "content": parts}}]}

    check = SchemaCheck()
    assert check.verdict(body, answer('{"a": ', '"yes"}')) is True
    assert check.verdict(body, answer('{"b": 1}')) is False
    assert check.verdict(body, answer()) is False


async def test_json_no_parser_should_accept_is_still_bad_json(serve: Serve) -> None:
    raw = b'{"choices": [{"message": {}}], "x": "\xff"}'
    outcome = await send(await serve(answer(200, raw)))
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "bad_json")


async def test_a_long_response_header_does_not_lose_the_answer(serve: Serve) -> None:
    """aiohttp's default limit (8190 bytes a header line) turned such answers into
    connection errors: retried, paid for again, and failed."""
    headers = {"x-debug-trace": "t" * 20_000, "x-request-id": "req_long"}
    outcome = await send(await serve(answer(200, COMPLETION, headers)))
    assert (outcome.kind, outcome.request_id) == (OutcomeKind.SUCCESS, "req_long")


async def test_stream_n2_interleaved_with_usage() -> None:
    outcome = await stream_outcome(N2_STREAM)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.completion is not None
    assert [
        (c["index"], c["message"]["content"], c["finish_reason"])
        for c in outcome.completion["choices"]
    ] == [(0, "A1 A2", "stop"), (1, "B1 B2", "length")]
    assert outcome.completion["usage"]["total_tokens"] == 7


async def test_a_finished_stream_that_ends_without_done_is_kept() -> None:
    """Some servers (older TGI, some llama.cpp forks) end a complete stream without
    `[DONE]`: every choice has finished and the connection ended cleanly, so nothing is
    missing. Before, such answers were retried, paid for each time, and failed."""
    data = TEXT_STREAM[: TEXT_STREAM.index(b"data: [DONE]")]
    outcome = await stream_outcome(data)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"] == "Hello, wörld"
    assert outcome.completion["usage"]["total_tokens"] == 13


@pytest.mark.parametrize("ending", ["cut", "unfinished"])
async def test_stream_without_done_is_retried_when_cut_or_unfinished(ending: str) -> None:
    if ending == "cut":
        data, cut = TEXT_STREAM[: TEXT_STREAM.index(b"data: [DONE]")], True
    else:  # a clean end before the last choice finished
        data, cut = TEXT_STREAM[: TEXT_STREAM.index(b'data: {"id"', 200)], False
        assert b'finish_reason":"stop' not in data
    outcome = await stream_outcome(data, cut=cut)
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "stream_broken")
    if ending == "cut":
        # Cut after its usage came: what was billed goes with it, for the run to count.
        assert outcome.completion is not None
        assert outcome.completion["usage"]["total_tokens"] == 13
    else:
        assert outcome.completion is None


async def test_a_stream_of_n_choices_is_unfinished_until_each_has_finished() -> None:
    data = N2_STREAM[: N2_STREAM.index(b"data: [DONE]")]
    last_finish = data.index(b'"finish_reason":"stop"')
    outcome = await stream_outcome(data[: data.rindex(b"data:", 0, last_finish)])
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "stream_broken")


async def test_stream_cut_mid_event_is_retried() -> None:
    outcome = await stream_outcome(TEXT_STREAM[:100], cut=True)
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "stream_broken")


async def test_stream_error_event() -> None:
    error = {"message": "overloaded", "type": "server_error", "code": "upstream_overloaded"}
    data = sse(chunk([delta(content="Hi")]), {"error": error}, done=False)
    outcome = await stream_outcome(data)
    assert (outcome.kind, outcome.error_kind, outcome.message) == (
        OutcomeKind.RETRY,
        "stream_error",
        "overloaded",
    )
    # Kept as an error answer carries it, so that exports find the API's code and message.
    assert outcome.body is not None and orjson.loads(outcome.body) == {"error": error}


async def test_a_rate_limit_in_a_stream_is_a_rate_limit() -> None:
    # OpenRouter's 429 once a stream has begun: a chunk with the error beside a choice that
    # finished with "error". As a plain stream error it used up the job's --max-attempts and
    # neither paused nor slowed the run.
    limited = {
        "id": "gen-1",
        "object": "chat.completion.chunk",
        "error": {"code": 429, "message": "Rate limit exceeded"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    outcome = await stream_outcome(sse(chunk([delta(content="Hi")]), limited, done=False))
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "rate_limit")


async def test_stream_quota_error_event_stops_the_run() -> None:
    outcome = await stream_outcome(sse(QUOTA, done=False))
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.STOP_RUN, "quota")


@pytest.mark.parametrize(
    ("error", "kind", "error_kind"),
    [
        ({"code": 502, "message": "Upstream failed"}, OutcomeKind.RETRY, "choice_error"),
        ({"code": 400, "message": "bad"}, OutcomeKind.FAIL_JOB, "http_400"),
        (None, OutcomeKind.RETRY, "choice_error"),
    ],
)
async def test_stream_choice_that_ends_in_an_error_is_no_success(
    error: dict[str, Any] | None, kind: OutcomeKind, error_kind: str
) -> None:
    """OpenRouter ends a streamed choice whose generation failed with finish_reason "error"
    (and the error beside it): it was stored as a success with whatever text had come."""
    last = delta(finish_reason="error") | ({} if error is None else {"error": error})
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    events = [
        chunk([delta(role="assistant", content="Hal")]),
        chunk([last]),
        chunk([], usage=usage),
    ]
    outcome = await stream_outcome(sse(*events))
    assert (outcome.kind, outcome.error_kind) == (kind, error_kind)
    # What it used was paid for: the answer, its usage with it, stays with the outcome.
    assert outcome.completion is not None and outcome.completion["usage"] == usage
    assert outcome.completion["choices"][0]["message"]["content"] == "Hal"
    if error is not None:
        assert outcome.message == error["message"]


async def test_stream_garbled_event_is_retried() -> None:
    outcome = await stream_outcome(b"data: {not json\n\n" + TEXT_STREAM)
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "bad_json")


async def test_stream_request_answered_with_an_error(serve: Serve) -> None:
    base_url = await serve(answer(429, RATE_LIMIT, {"retry-after-ms": "250"}))
    outcome = await send(base_url, stream=True)
    assert (outcome.kind, outcome.error_kind, outcome.retry_after_s) == (
        OutcomeKind.RETRY,
        "rate_limit",
        0.25,
    )


async def test_stream_request_answered_without_a_stream(serve: Serve) -> None:
    base_url = await serve(answer(200, COMPLETION))
    outcome = await send(base_url, stream=True)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.completion == COMPLETION


@pytest.mark.parametrize(
    ("code", "kind", "error_kind"),
    [
        ("400", OutcomeKind.FAIL_JOB, "http_400"),
        (422, OutcomeKind.FAIL_JOB, "http_422"),
        ("401", OutcomeKind.STOP_RUN, "auth"),
        ("402", OutcomeKind.STOP_RUN, "quota"),
        ("500", OutcomeKind.RETRY, "stream_error"),
        ("4000", OutcomeKind.RETRY, "stream_error"),
        (True, OutcomeKind.RETRY, "stream_error"),
    ],
)
async def test_an_error_event_does_what_its_status_code_says(
    code: object, kind: OutcomeKind, error_kind: str
) -> None:
    # LiteLLM's proxy sends an error raised once a stream has begun (a content policy, a
    # guardrail) with the HTTP status as its code: a 400 was retried, paying for the answer
    # each time, and a 401 failed the job instead of stopping the run.
    error = {"message": "filtered", "type": "None", "param": "None", "code": code}
    outcome = await stream_outcome(sse(chunk([delta(content="Hi")]), {"error": error}))
    assert (outcome.kind, outcome.error_kind) == (kind, error_kind)


@pytest.mark.parametrize(
    ("code", "kind", "error_kind"),
    [
        ("400", OutcomeKind.FAIL_JOB, "http_400"),
        ("401", OutcomeKind.STOP_RUN, "auth"),
        ("503", OutcomeKind.RETRY, "not_completion"),
        ("server_error", OutcomeKind.RETRY, "not_completion"),
    ],
)
async def test_an_error_in_a_200_answer_does_what_its_status_code_says(
    serve: Serve, code: str, kind: OutcomeKind, error_kind: str
) -> None:
    error = {"error": {"message": "no", "code": code}}
    outcome = await send(await serve(answer(200, error)))
    assert (outcome.kind, outcome.error_kind) == (kind, error_kind)


async def test_a_stream_of_nothing_but_done_is_no_answer() -> None:
    outcome = await stream_outcome(b"data: [DONE]\n\n")
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "stream_broken")
    assert outcome.message == "the stream held no choice"
    # Chunks, but not one choice in them (only a usage chunk; an empty list): no answer either.
    usage = {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}
    outcome = await stream_outcome(sse(chunk([]), chunk([], usage=usage)))
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "stream_broken")
    assert outcome.message == "the stream held no choice"


@pytest.mark.parametrize(
    ("events", "kind", "error_kind", "message"),
    [
        # After a finished choice: a moderation stop, its code a 400.
        (
            sse(chunk([delta(content="hello", finish_reason="stop")]), done=False)
            + b'event: error\ndata: {"message": "output blocked", "code": 400}\n\n'
            + b"data: [DONE]\n\n",
            OutcomeKind.FAIL_JOB,
            "http_400",
            "output blocked",
        ),
        # The only event, with no `error` key, its code a 500.
        (
            b'event: error\ndata: {"message": "Internal server error", "code": 500}\n\n'
            b"data: [DONE]\n\n",
            OutcomeKind.RETRY,
            "stream_error",
            "Internal server error",
        ),
        # Not named, but an error answer's body in shape, mid-stream.
        (
            sse(chunk([delta(content="hel")]), {"message": "upstream died", "code": 502}),
            OutcomeKind.RETRY,
            "stream_error",
            "upstream died",
        ),
        # Named, its data not JSON.
        (
            sse(chunk([delta(content="hel")]), done=False) + b"event: error\ndata: overloaded\n\n",
            OutcomeKind.RETRY,
            "stream_error",
            "overloaded",
        ),
    ],
)
async def test_an_error_event_without_an_error_key_is_an_error(
    events: bytes, kind: OutcomeKind, error_kind: str, message: str
) -> None:
    """`event: error` with `{"message", "code"}` was merged into the completion as two top-level
    fields, and the job stored as succeeded."""
    outcome = await stream_outcome(events)
    assert (outcome.kind, outcome.error_kind, outcome.message) == (kind, error_kind, message)


async def test_what_a_stream_sends_after_done_is_no_part_of_it(serve: Serve) -> None:
    """Events after `[DONE]` were merged into the answer, and a server that kept the stream
    open after it held the request (and its slot) until the timeout."""
    after = sse(chunk([delta(content=" EXTRA")]), done=False)

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(TEXT_STREAM + after)
        await asyncio.Event().wait()  # never ends the response
        return response

    outcome = await send(await serve(handler), stream=True, timeout_s=30.0)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"] == "Hello, wörld"
    assert outcome.latency_s < 15.0  # (not the 30 s of the timeout)


@pytest.mark.parametrize(
    "choices",
    [[], [1, "x", None], [{"index": 0, "logprobs": None}], "none"],
    ids=["empty", "not-objects", "no-message", "not-a-list"],
)
async def test_a_200_without_a_choice_is_no_completion(serve: Serve, choices: object) -> None:
    """`"choices": []` (or choices that are not objects, or one with neither message nor
    finish_reason) was stored as a success with nothing in it."""
    no_usage = {k: v for k, v in COMPLETION.items() if k != "usage"}
    outcome = await send(await serve(answer(200, {**no_usage, "choices": choices})))
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.RETRY, "not_completion")
    # A choice stopped by a content filter, with no message, is an answer all the same.
    filtered = [{"index": 0, "finish_reason": "content_filter"}]
    outcome = await send(await serve(answer(200, {**COMPLETION, "choices": filtered})))
    assert outcome.kind is OutcomeKind.SUCCESS


@pytest.mark.parametrize(
    "said", [{"usage": COMPLETION["usage"]}, {"prompt_feedback": {"blockReason": "SAFETY"}}]
)
async def test_no_choice_in_an_answer_that_was_processed_fails_the_job(
    serve: Serve, said: dict[str, Any]
) -> None:
    """A prompt the provider blocks comes back billed and empty, the same on every attempt:
    retried, each attempt was paid for."""
    empty = {"id": "x", "object": "chat.completion", "choices": [], **said}
    outcome = await send(await serve(answer(200, empty)))
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.FAIL_JOB, "no_choice")
    assert outcome.body is not None and orjson.loads(outcome.body) == empty


async def test_redirects_stop_the_run_and_other_3xx_fail_the_job(serve: Serve) -> None:
    for status in (301, 302, 303, 307, 308):
        outcome = await send(await serve(answer(status, b"", {"Location": "https://x.example"})))
        assert (outcome.kind, outcome.error_kind) == (OutcomeKind.STOP_RUN, "redirect")
    outcome = await send(await serve(answer(304, b"")))
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.FAIL_JOB, "http_304")


async def test_an_event_stream_that_opens_with_a_comment_for_a_plain_request(serve: Serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        body = b": OPENROUTER PROCESSING\n\n" + TEXT_STREAM
        return web.Response(body=body, content_type="text/event-stream")

    outcome = await send(await serve(handler))
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    assert outcome.completion["usage"]["total_tokens"] == 13


async def test_nan_and_infinity_in_an_answer_are_kept_as_null(serve: Serve) -> None:
    """A log probability of -Infinity (Python's json.dumps writes it) made the answer
    bad_json: paid for on every attempt, then the job failed."""
    text = orjson.dumps(COMPLETION).replace(
        b'"logprobs":null', b'"logprobs":{"content":[{"token":"Hi","logprob":-Infinity}]}'
    )
    text = text.replace(b'"total_tokens":6', b'"total_tokens":6,"x_score":NaN')
    outcome = await send(await serve(answer(200, text)))
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.completion is not None and outcome.body is not None
    assert outcome.completion["choices"][0]["logprobs"]["content"][0]["logprob"] is None
    assert outcome.completion["usage"]["x_score"] is None
    assert orjson.loads(outcome.body) == outcome.completion
    stream = sse(chunk([delta(content="Hi", finish_reason="stop")]), done=False).replace(
        b'"logprobs":null', b'"logprobs":{"content":[{"token":"Hi","logprob":-Infinity}]}'
    )
    outcome = await stream_outcome(stream + b"data: [DONE]\n\n")
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    assert outcome.completion["choices"][0]["logprobs"]["content"][0]["logprob"] is None


async def test_an_event_stream_for_a_plain_request_is_the_answer(serve: Serve) -> None:
    """A server that streamed its answer to a request that asked for none: the complete,
    paid-for stream was bad_json, paid for again on each attempt, then the job failed."""
    outcome = await send(await serve(stream_answer(TEXT_STREAM)))
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.completion is not None
    assert outcome.completion["choices"][0]["message"]["content"] == "Hello, wörld"
    assert outcome.completion["usage"]["total_tokens"] == 13


@pytest.mark.parametrize("content_type", ["text/plain", "text/event-stream", ""])
async def test_a_stream_request_answered_with_json_under_another_type_is_read_as_json(
    serve: Serve, content_type: str
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.Response(status=200, body=b"\n" + orjson.dumps(COMPLETION))
        if content_type:
            response.content_type = content_type
        else:
            response.headers.popall("Content-Type", None)
        return response

    base_url = await serve(handler)
    for stream in (True, False):
        outcome = await send(base_url, stream=stream)
        assert (outcome.kind, outcome.completion) == (OutcomeKind.SUCCESS, COMPLETION)


async def test_an_error_under_the_event_stream_type_is_read_as_the_error_it_is(
    serve: Serve,
) -> None:
    # Retried as a broken stream before: an account without money failed every job.
    base_url = await serve(answer(200, QUOTA, content_type="text/event-stream"))
    outcome = await send(base_url, stream=True)
    assert (outcome.kind, outcome.error_kind) == (OutcomeKind.STOP_RUN, "quota")


@pytest.mark.parametrize(
    "opening", [b"", b": OPENROUTER PROCESSING\n\n", b"event: message\n", b"id: 1\n", b"retry: 5\n"]
)
async def test_an_event_stream_labelled_as_json_is_read_as_a_stream(
    serve: Serve, opening: bytes
) -> None:
    # Retried as bad JSON before, each try paid for (also when it did not begin with `data:`).
    base_url = await serve(answer(200, opening + TEXT_STREAM))
    for stream in (True, False):
        outcome = await send(base_url, stream=stream)
        assert outcome.kind is OutcomeKind.SUCCESS
        assert outcome.completion is not None
        assert outcome.completion["choices"][0]["message"]["content"] == "Hello, wörld"


# --- StreamAssembler without a server ---------------------------------------------------


def assemble(pieces: list[bytes]) -> tuple[dict[str, Any], bool, object, object]:
    assembler = StreamAssembler()
    for piece in pieces:
        assembler.feed(piece)
    assembler.close()
    return assembler.result(), assembler.done, assembler.error, assembler.bad_event


def split(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({0, len(data), *(min(p, len(data)) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


LOGPROB_STREAM = sse(
    chunk([{"index": 0, "delta": {"role": "assistant", "content": "a"},
            "logprobs": {"content": [{"token": "a", "logprob": -0.1}], "refusal": None},
            "finish_reason": None}]),
    chunk([{"index": 0, "delta": {"content": "b", "reasoning_content": "r1"},
            "logprobs": {"content": [{"token": "b", "logprob": -0.2}], "refusal": None},
            "finish_reason": None}]),
    chunk([{"index": 0, "delta": {"reasoning_content": "r2"}, "logprobs": None,
            "finish_reason": "stop"}], service_tier="default"),
)  # fmt: skip

STREAMS = [TEXT_STREAM, TOOL_STREAM, N2_STREAM, LOGPROB_STREAM]


def test_assembler_logprobs_and_provider_fields() -> None:
    completion, done, _, _ = assemble([LOGPROB_STREAM])
    assert done
    assert completion["service_tier"] == "default"
    (choice,) = completion["choices"]
    assert choice["message"]["content"] == "ab"
    assert choice["message"]["reasoning_content"] == "r1r2"
    assert choice["logprobs"] == {
        "content": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.2}],
        "refusal": None,
    }


def test_assembler_ignores_comments_and_other_fields() -> None:
    noisy = b": keep-alive\n\nevent: message\nid: 7\nretry: 100\n" + TEXT_STREAM.replace(
        b"\n\n", b"\n\n: ping\n\n"
    )
    assert assemble([noisy]) == assemble([TEXT_STREAM])


def test_assembler_multiline_data_and_missing_final_blank_line() -> None:
    event = orjson.dumps(chunk([delta(content="x")]))
    half = event.index(b",") + 1
    # One event's data may span several `data:` lines (joined with a newline, which JSON
    # reads as whitespace); a last [DONE] whose blank line never came still counts.
    data = b"data: " + event[:half] + b"\ndata: " + event[half:] + b"\n\ndata: [DONE]\n"
    completion, done, _, bad = assemble([data])
    assert done and bad is None
    assert completion["choices"][0]["message"]["content"] == "x"


def test_assembler_drops_an_unterminated_last_line() -> None:
    _, done, _, _ = assemble([TEXT_STREAM + b"data: [DONE]"[:-1]])
    assert done  # from the complete [DONE] before it
    cut = TEXT_STREAM[: TEXT_STREAM.index(b"data: [DONE]")]
    _, done, _, _ = assemble([cut + b"data: [DONE]"])
    assert not done


def test_assembler_tool_calls_without_index() -> None:
    data = sse(
        chunk([delta(tool_calls=[{"id": "c1", "type": "function",
                                  "function": {"name": "f", "arguments": '{"a":'}}])]),
        chunk([delta(tool_calls=[{"function": {"arguments": " 1}"}}])]),
        chunk([delta(tool_calls=[{"id": "c2", "type": "function",
                                  "function": {"name": "g", "arguments": "{}"}}])]),
    )  # fmt: skip
    completion, _, _, _ = assemble([data])
    calls = completion["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("c1", "f", '{"a": 1}'),
        ("c2", "g", "{}"),
    ]


def tool_calls_of(data: bytes) -> list[tuple[object, object, object]]:
    completion, _, _, _ = assemble([data])
    calls = completion["choices"][0]["message"]["tool_calls"]
    return [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_assembler_parallel_calls_that_share_an_index_stay_apart() -> None:
    # Ollama sends every parallel call at index 0, each whole with its own id: they were
    # one call, its arguments two JSON objects run together.
    data = sse(
        chunk([delta(tool_calls=[{"id": "call_a1", "index": 0, "type": "function",
                                  "function": {"name": "write", "arguments": '{"f":"a"}'}}])]),
        chunk([delta(tool_calls=[{"id": "call_b2", "index": 0, "type": "function",
                                  "function": {"name": "write", "arguments": '{"f":"b"}'}}])]),
        chunk([delta(finish_reason="tool_calls")]),
    )  # fmt: skip
    assert tool_calls_of(data) == [
        ("call_a1", "write", '{"f":"a"}'),
        ("call_b2", "write", '{"f":"b"}'),
    ]


def test_assembler_a_call_whose_id_changes_between_its_fragments_is_one_call() -> None:
    # Poolside (and vLLM's harmony streaming, once) keep the index and change the id from
    # one fragment of a call to the next: taken for new calls, one call became three, two
    # of them without a name.
    data = sse(
        chunk([delta(tool_calls=[{"index": 0, "id": "call_A", "type": "function",
                                  "function": {"name": "get_weather", "arguments": ""}}])]),
        chunk([delta(tool_calls=[{"index": 0, "id": "call_B",
                                  "function": {"arguments": '{"city":'}}])]),
        chunk([delta(tool_calls=[{"index": 0, "id": "call_C",
                                  "function": {"arguments": ' "Paris"}'}}])]),
        chunk([delta(finish_reason="tool_calls")]),
    )  # fmt: skip
    assert tool_calls_of(data) == [("call_A", "get_weather", '{"city": "Paris"}')]


def test_assembler_a_long_call_that_repeats_its_name_is_not_read_again_at_each_piece() -> None:
    # Its arguments were copied whole at each fragment (and, with the name repeated, parsed):
    # 1.3 MB in 82,000 fragments took 2 s, on the event loop every request shares.
    arguments = orjson.dumps({"rows": [{"k": i, "v": "x" * 20} for i in range(5_000)]}).decode()
    pieces = [arguments[i : i + 16] for i in range(0, len(arguments), 16)]
    data = sse(
        *(
            chunk([delta(tool_calls=[{"index": 0, "function": {"name": "save", "arguments": p}}])])
            for p in pieces
        ),
        chunk([delta(finish_reason="tool_calls")]),
    )
    loads = 0
    real_loads = orjson.loads

    def counted(text: Any) -> Any:
        nonlocal loads
        loads += 1
        return real_loads(text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("batchrunner.client.orjson.loads", counted)
        completion, _, _, _ = assemble([data])
    (call,) = completion["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "save", "arguments": arguments}
    # One parse an event, and a few of the whole arguments at most.
    assert loads <= len(pieces) + 1 + 10


def test_assembler_reasoning_details_that_begin_as_no_list_do_not_break_the_answer() -> None:
    data = sse(
        chunk([delta(reasoning_details={"type": "reasoning.summary", "summary": "x"})]),
        chunk([delta(reasoning_details=[{"type": "reasoning.text", "text": "a", "index": 0}])]),
        chunk([delta(content="Hi", finish_reason="stop")]),
    )
    completion, done, _, _ = assemble([data])
    assert done and completion["choices"][0]["message"]["content"] == "Hi"


def test_assembler_whole_calls_without_index_or_id_stay_apart() -> None:
    # A proxy in front of Gemini: no index, "" as every id and type, each call whole.
    data = sse(
        chunk([delta(tool_calls=[{"id": "", "type": "", "function": {
            "name": "get_weather", "arguments": '{"city":"Paris"}'}}])]),
        chunk([delta(tool_calls=[{"id": "", "type": "", "function": {
            "name": "get_time", "arguments": '{"tz":"CET"}'}}])]),
        chunk([delta(finish_reason="tool_calls")]),
    )  # fmt: skip
    assert tool_calls_of(data) == [
        ("", "get_weather", '{"city":"Paris"}'),
        ("", "get_time", '{"tz":"CET"}'),
    ]
    completion, _, _, _ = assemble([data])
    calls = completion["choices"][0]["message"]["tool_calls"]
    assert [c["type"] for c in calls] == ["function", "function"]


def test_assembler_a_name_repeated_in_each_fragment_of_one_call_is_one_call() -> None:
    data = sse(
        chunk([delta(tool_calls=[{"index": 0, "id": "c1", "type": "function",
                                  "function": {"name": "f", "arguments": '{"a":'}}])]),
        chunk([delta(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": " 1"}}])]),
        chunk([delta(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "}"}}])]),
        chunk([delta(finish_reason="tool_calls")]),
    )  # fmt: skip
    assert tool_calls_of(data) == [("c1", "f", '{"a": 1}')]


def test_assembler_keeps_the_first_real_id_model_and_time() -> None:
    # Azure's first chunk holds its prompt's content filter results, with "", 0 and "" as
    # id, created and model: the answer was stored without them, and its cost unknown.
    # Each piece's content filter results come again with the finish, as {}.
    results = {"hate": {"filtered": False, "severity": "safe"}}
    data = sse(
        {"id": "", "object": "", "created": 0, "model": "", "choices": [],
         "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": results}]},
        chunk([{**delta(content="Hi"), "content_filter_results": results}],
              id="chatcmpl-AZ1", model="gpt-4o-2024-11-20"),
        chunk([{**delta(finish_reason="stop"), "content_filter_results": {}}],
              id="chatcmpl-AZ1", model="gpt-4o-2024-11-20"),
    )  # fmt: skip
    completion, _, _, _ = assemble([data])
    assert (completion["id"], completion["created"], completion["model"]) == (
        "chatcmpl-AZ1",
        1700000009,
        "gpt-4o-2024-11-20",
    )
    assert completion["choices"][0]["content_filter_results"] == results
    assert completion["prompt_filter_results"][0]["content_filter_results"] == results


def test_assembler_skips_a_byte_order_mark_before_the_first_event() -> None:
    # The first event, its data behind the mark, was dropped, and with it "Hel".
    data = TEXT_STREAM[TEXT_STREAM.index(b"\n\n") + 2 :]
    assert assemble([b"\xef\xbb\xbf" + data]) == assemble([data])
    assert assemble([data])[0]["choices"][0]["message"]["content"] == "Hello, wörld"


def test_assembler_takes_groqs_usage_where_the_stream_did_not_ask_for_it() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    data = sse(
        chunk([delta(content="Hi")], x_groq={"id": "req_1"}),
        chunk([delta(finish_reason="stop")], x_groq={"id": "req_1", "usage": usage}),
    )
    completion, _, _, _ = assemble([data])
    assert completion["usage"] == usage


def test_assembler_joins_reasoning_details_sent_in_pieces() -> None:
    # OpenRouter: one detail in pieces carrying its index, the signature in the last;
    # without a stream the same answer has one object.
    piece = {"type": "reasoning.text", "format": "anthropic-claude-v1", "index": 0}
    data = sse(
        chunk([delta(reasoning_details=[{**piece, "text": "Let me "}])]),
        chunk([delta(reasoning_details=[{**piece, "text": "think"}])]),
        chunk([delta(reasoning_details=[{**piece, "text": "", "signature": "SIG"}])]),
        chunk([delta(reasoning_details=[{"type": "reasoning.encrypted", "data": "xyz",
                                         "index": 1}])]),
        chunk([delta(finish_reason="stop")]),
    )  # fmt: skip
    completion, _, _, _ = assemble([data])
    assert completion["choices"][0]["message"]["reasoning_details"] == [
        {**piece, "text": "Let me think", "signature": "SIG"},
        {"type": "reasoning.encrypted", "data": "xyz", "index": 1},
    ]


@pytest.mark.parametrize("sizes", [[5, 7, 1, 300], [3, 6, 9]])
def test_assembler_joins_audio_sent_in_pieces_into_its_bytes(sizes: list[int]) -> None:
    audio = bytes(range(256)) * 2
    pieces, at = [], 0
    for size in sizes:
        pieces.append(audio[at : at + size])
        at += size
    data = sse(
        chunk([delta(audio={"id": "audio_1", "expires_at": 1, "transcript": "hi"})]),
        *(chunk([delta(audio={"data": base64.b64encode(p).decode()})]) for p in pieces),
        chunk([delta(audio={"transcript": " there"}, finish_reason="stop")]),
    )
    completion, _, _, _ = assemble([data])
    got = completion["choices"][0]["message"]["audio"]
    assert base64.b64decode(got["data"], validate=True) == b"".join(pieces)
    assert (got["id"], got["transcript"]) == ("audio_1", "hi there")


def test_assembler_joins_one_base64_text_cut_anywhere() -> None:
    text = base64.b64encode(bytes(range(100))).decode()
    data = sse(
        chunk([delta(audio={"id": "a", "data": text[:10]})]),
        chunk([delta(audio={"data": text[10:33]})]),
        chunk([delta(audio={"data": text[33:]}, finish_reason="stop")]),
    )
    completion, _, _, _ = assemble([data])
    assert completion["choices"][0]["message"]["audio"]["data"] == text


@settings(max_examples=150, deadline=None, database=None)
@given(
    index=st.integers(0, len(STREAMS) - 1),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    points=st.lists(st.integers(0, 4000), max_size=40),
)
def test_assembler_split_anywhere_gives_the_same_result(
    index: int, newline: bytes, points: list[int]
) -> None:
    data = STREAMS[index].replace(b"\n", newline)
    whole = assemble([data])
    assert whole[1] is True
    assert assemble(split(data, points)) == whole


@settings(max_examples=100, deadline=None, database=None)
@given(
    pieces=st.lists(st.text(), max_size=8),
    points=st.lists(st.integers(0, 2000), max_size=20),
)
def test_assembler_concatenates_any_text(pieces: list[str], points: list[int]) -> None:
    data = sse(*(chunk([delta(content=piece)]) for piece in pieces))
    completion, done, _, _ = assemble(split(data, points))
    assert done
    content = completion["choices"][0]["message"]["content"] if pieces else None
    assert content == ("".join(pieces) if pieces else None)


_JSON_KEYS = st.sampled_from(
    [
        "index",
        "delta",
        "content",
        "role",
        "tool_calls",
        "function",
        "arguments",
        "name",
        "id",
        "type",
        "logprobs",
        "refusal",
        "finish_reason",
        "choices",
        "usage",
        "error",
        "model",
    ]
)
_ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_JSON_KEYS, inner, max_size=4),
    max_leaves=15,
)
_ANY_CHOICE = st.fixed_dictionaries(
    {},
    optional={
        "index": _ANY_JSON,
        "delta": st.dictionaries(
            st.sampled_from(["content", "role", "tool_calls", "function_call", "reasoning"]),
            _ANY_JSON,
            max_size=3,
        )
        | _ANY_JSON,
        "logprobs": _ANY_JSON,
        "finish_reason": _ANY_JSON,
    },
)
_ANY_EVENT = st.fixed_dictionaries(
    {},
    optional={
        "id": _ANY_JSON,
        "model": _ANY_JSON,
        "choices": st.lists(_ANY_CHOICE, max_size=3) | _ANY_JSON,
        "usage": _ANY_JSON,
        "error": _ANY_JSON,
    },
)


@settings(max_examples=300, deadline=None, database=None)
@given(events=st.lists(_ANY_EVENT | _ANY_JSON, max_size=5))
def test_any_stream_of_json_events_assembles_into_json(events: list[Any]) -> None:
    """Whatever shape a gateway's events take, assembling them raises nothing and gives a
    completion that can be written as JSON (the journal and both databases keep it so)."""
    completion, done, _, _ = assemble([sse(*events)])
    assert done
    assert orjson.loads(orjson.dumps(completion)) == completion


def test_assembler_every_byte_apart() -> None:
    data = N2_STREAM.replace(b"\n", b"\r\n")
    assert assemble([data[i : i + 1] for i in range(len(data))]) == assemble([data])


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "endpoint", "url"),
    [
        ("https://api.openai.com/v1", "/v1/chat/completions",
         "https://api.openai.com/v1/chat/completions"),
        ("https://api.openai.com/v1/", "/v1/chat/completions",
         "https://api.openai.com/v1/chat/completions"),
        ("https://gw.example/api/v1", "/v1/chat/completions",
         "https://gw.example/api/v1/chat/completions"),
        ("https://gw.example/api/v1//", "v1/chat/completions/",
         "https://gw.example/api/v1/chat/completions"),
        ("https://gw.example/openai", "/v1/chat/completions",
         "https://gw.example/openai/chat/completions"),
        ("https://gw.example/v1beta/openai", "/v1/chat/completions",
         "https://gw.example/v1beta/openai/chat/completions"),
        ("http://localhost:8000/v1", "/chat/completions",
         "http://localhost:8000/v1/chat/completions"),
        ("https://api.openai.com/v1", "/v1/vision/x", "https://api.openai.com/v1/vision/x"),
    ],
)  # fmt: skip
def test_join_url(base_url: str, endpoint: str, url: str) -> None:
    assert join_url(base_url, endpoint) == url


@pytest.mark.parametrize(
    ("base_url", "insecure"),
    [
        ("https://api.openai.com/v1", False),
        ("http://api.openai.com/v1", True),
        ("HTTP://gw.example/v1", True),
        ("http://10.0.0.5:8000/v1", True),
        ("http://[2001:db8::1]/v1", True),
        ("http://localhost:8000/v1", False),
        ("http://LOCALHOST/v1", False),
        ("http://127.0.0.1:8000/v1", False),
        ("http://127.5.6.7/v1", False),
        ("http://[::1]:8000/v1", False),
        ("http://localhost.evil.example/v1", True),
        ("http://127.0.0.1.nip.io/v1", True),
        ("https://127.0.0.1/v1", False),
    ],
)
def test_is_insecure(base_url: str, insecure: bool) -> None:
    assert is_insecure(base_url) is insecure


# Reads in a new interpreter how many of twenty 256 KiB blocks (asyncio's read buffer size)
# glibc gives mappings of their own, with or without an ApiClient having been opened first.
_MAPPED_BLOCKS = """
import asyncio, ctypes, sys
from batchrunner.client import ApiClient

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

async def main():
    if sys.argv[1] == "client":
        async with ApiClient("http://127.0.0.1:9/v1", None, concurrency=1, timeout_s=1):
            pass
    before = mallinfo2().hblks
    kept = [bytes(256 * 1024) for _ in range(20)]
    print(mallinfo2().hblks - before)

asyncio.run(main())
"""


def _glibc_version() -> tuple[int, ...]:
    libc, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")[:2]) if libc == "glibc" else ()


@pytest.mark.skipif(_glibc_version() < (2, 33), reason="reads glibc's mallinfo2 (2.33 and later)")
def test_an_open_client_keeps_socket_read_buffers_off_mmap() -> None:
    def mapped(variant: str) -> int:
        child = subprocess.run(
            [sys.executable, "-c", _MAPPED_BLOCKS, variant],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(child.stdout)

    # Without the client's settings each block is a mapping (an mmap and a munmap per read),
    # but for one or two a free chunk the imports left in the heap may hold; with them, none
    # is.
    assert mapped("plain") >= 15
    assert mapped("client") == 0


# --- the key in what comes back -----------------------------------------------------------

#: A key as some providers issue them (AWS Bedrock's API keys are base64): `/`, `+` and `=`.
SLASHED_KEY = "ABSKQmVkcm9ja0FQSUtleS1/ab+c=Zx9"


def _echoes(key: str) -> dict[str, str]:
    """The key in the forms a server that echoes what it was sent may give it back in."""
    bearer = base64.b64encode(f"Bearer {key}".encode()).decode()
    return {
        "as sent": key,
        "in JSON": orjson.dumps(key).decode()[1:-1].replace("/", "\\/"),
        "percent-encoded": urllib.parse.quote(key, safe=""),
        "base64 of the header": bearer,
    }


@pytest.mark.parametrize("form", list(_echoes(SLASHED_KEY)))
@pytest.mark.parametrize("status", [200, 400, 500])
async def test_a_key_echoed_in_another_form_is_not_kept(
    serve: Serve, form: str, status: int
) -> None:
    """Only the key as sent was taken out: a server that gave it back JSON-escaped (a key
    with "/" comes back as "\\/"), percent-encoded or in base64 had it stored, and exports
    decoded the JSON form back to the key itself. A request id echoing it was stored as is."""
    echoed = _echoes(SLASHED_KEY)[form]
    text = f'{{"debug": "got {echoed}", "error": {{"message": "refused {echoed}"}}}}'
    if status == 200:  # a gateway that adds what it was sent to its answers
        text = orjson.dumps(
            {"choices": [], "object": "chat.completion", "debug": f"got {echoed}"}
        ).decode()
        text = text.replace(orjson.dumps(echoed).decode()[1:-1], echoed)
    handler = answer(status, text.encode(), {"x-request-id": f"req {echoed}"})
    async with ApiClient(await serve(handler), SLASHED_KEY, concurrency=1, timeout_s=10) as c:
        outcome = await c.send(ENDPOINT, REQUEST, stream=False)
    kept = f"{outcome.body} {outcome.message} {outcome.request_id}"
    assert "***" in kept
    for shown in _echoes(SLASHED_KEY).values():
        assert shown not in kept
    assert SLASHED_KEY not in orjson.dumps(orjson.loads(outcome.body or "{}")).decode()


async def test_a_key_with_a_quote_in_a_stream_error_is_not_kept() -> None:
    """The error of a stream was written out anew and then scrubbed: a key that JSON escapes
    (a quote, a backslash) was stored as the new text wrote it."""
    key = 'sk-"quoted"\\key-12345'
    error = {"error": {"message": f"refused {key}"}}
    async with (
        running(stream_answer(sse(error, done=False))) as base_url,
        ApiClient(base_url, key, concurrency=1, timeout_s=10) as client,
    ):
        outcome = await client.send(ENDPOINT, REQUEST, stream=True)
    assert outcome.error_kind == "stream_error"
    assert outcome.body is not None and "quoted" not in outcome.body
    assert outcome.message == "refused ***"


# --- proxies ------------------------------------------------------------------------------


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


async def test_requests_go_through_the_proxy_the_environment_names(
    serve: Serve, no_proxy_env: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY were not read: behind a proxy, not one request could go out."""
    seen: list[tuple[str, str | None]] = []

    async def proxy(request: web.Request) -> web.StreamResponse:
        await request.read()
        seen.append((str(request.url), request.headers.get("Proxy-Authorization")))
        return web.json_response(COMPLETION)

    proxy_url = (await serve(proxy)).removesuffix("/v1")
    no_proxy_env.setenv("http_proxy", proxy_url.replace("http://", "http://me:p%40ss@"))
    # (A name that resolves nowhere: only the proxy can take the request.)
    outcome = await send("http://api.invalid/v1")
    assert outcome.kind is OutcomeKind.SUCCESS
    credentials = base64.b64encode(b"me:p@ss").decode()
    assert seen == [("http://api.invalid/v1/chat/completions", f"Basic {credentials}")]


def test_which_proxy_an_api_goes_through(no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert proxy_for("https://api.openai.com/v1") == ("http://proxy.corp:3128", None)
    assert proxy_for("http://gateway.example/v1") == (None, None)  # no HTTP_PROXY
    assert proxy_for("https://127.0.0.1:8443/v1") == (None, None)  # this machine's
    assert proxy_for("https://localhost/v1") == (None, None)
    no_proxy_env.setenv("NO_PROXY", ".openai.com,internal")
    assert proxy_for("https://api.openai.com/v1") == (None, None)
    assert proxy_for("https://api.mistral.ai/v1")[0] == "http://proxy.corp:3128"
    no_proxy_env.setenv("HTTPS_PROXY", "socks5://me:secret@proxy.corp:1080")
    with pytest.raises(UsageError, match="not an http:// or https:// URL") as caught:
        proxy_for("https://api.mistral.ai/v1")
    assert "secret" not in str(caught.value)


def test_no_proxy_ports_and_address_ranges_and_all_proxy(no_proxy_env: pytest.MonkeyPatch) -> None:
    """NO_PROXY's `host:port` and address ranges were taken for names (the API went through the
    proxy), and ALL_PROXY was not read (the run went straight out past the proxy)."""
    proxy = "http://proxy.corp:3128"
    no_proxy_env.setenv("HTTPS_PROXY", proxy)
    no_proxy_env.setenv(
        "NO_PROXY", "gw.example:8443, 10.0.0.0/8,2001:db8::/32,[2001:db9::1],[2001:dba::5]:8443"
    )
    assert proxy_for("https://gw.example:8443/v1") == (None, None)
    assert proxy_for("https://gw.example/v1")[0] == proxy  # another port
    assert proxy_for("https://10.2.3.4/v1") == (None, None)
    assert proxy_for("https://11.2.3.4/v1")[0] == proxy
    assert proxy_for("https://[2001:db8::5]/v1") == (None, None)
    assert proxy_for("https://[2001:db9::1]:444/v1") == (None, None)
    assert proxy_for("https://[2001:db9::2]/v1")[0] == proxy
    assert proxy_for("https://[2001:dba::5]:8443/v1") == (None, None)
    assert proxy_for("https://[2001:dba::5]/v1")[0] == proxy
    no_proxy_env.setenv("NO_PROXY", "gw.example:443")  # the scheme's own port, left unsaid
    assert proxy_for("https://gw.example/v1") == (None, None)

    no_proxy_env.delenv("HTTPS_PROXY")
    no_proxy_env.setenv("all_proxy", "http://all.corp:8080")
    assert proxy_for("https://api.openai.com/v1")[0] == "http://all.corp:8080"
    assert proxy_for("http://gateway.example/v1")[0] == "http://all.corp:8080"
    no_proxy_env.setenv("HTTP_PROXY", proxy)  # the scheme's own comes first
    assert proxy_for("http://gateway.example/v1")[0] == proxy
    no_proxy_env.setenv("all_proxy", "socks5h://me:secret@all.corp:1080")
    with pytest.raises(UsageError, match=r"ALL_PROXY .*SOCKS.*HTTPS_PROXY") as caught:
        proxy_for("https://api.openai.com/v1")
    assert "secret" not in str(caught.value)


async def test_a_proxy_tunnelling_to_an_https_api_never_sees_the_key(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    """aiohttp gives a proxy the session's headers, and its Authorization as the CONNECT's
    Proxy-Authorization: the key, sent in clear to the proxy, in place of its own
    credentials."""
    connects: list[bytes] = []
    forbidden = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(forbidden, connects) as port:
        no_proxy_env.setenv("HTTPS_PROXY", f"http://me:p%40ss@127.0.0.1:{port}")
        outcome = await send("https://api.invalid/v1")
    assert outcome.kind is OutcomeKind.STOP_RUN and outcome.error_kind == "proxy"  # (its 403)
    (connect,) = connects
    assert connect.startswith(b"CONNECT api.invalid:443 ")
    credentials = base64.b64encode(b"me:p@ss")
    assert b"Proxy-Authorization: Basic " + credentials in connect
    assert KEY.encode() not in connect and b"Bearer" not in connect


def _choice(content: str) -> dict[str, Any]:
    return {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
    }


@pytest.mark.parametrize("key", ["ollama", "EMPTY", "x", "1"])
async def test_a_placeholder_key_leaves_answers_as_they_are(serve: Serve, key: str) -> None:
    """Local servers take any key (`ollama`, `EMPTY`): taken out of answers, it made "Use ***
    to run llama3", field names such as "inde***", and JSON that no longer parsed."""
    text = "Use ollama to run llama3 (EMPTY means none): x = 1"
    payload = {"id": "1", "object": "chat.completion", "choices": [_choice(text)], "n": 1}
    handler = answer(200, payload, {"x-request-id": "req_1x"})
    async with ApiClient(await serve(handler), key, concurrency=1, timeout_s=10) as client:
        outcome = await client.send(ENDPOINT, REQUEST, stream=False)
    assert outcome.kind is OutcomeKind.SUCCESS
    assert outcome.body == orjson.dumps(payload).decode() and outcome.request_id == "req_1x"


async def test_a_key_an_answer_echoes_is_out_of_what_the_run_reads_of_it_too(
    serve: Serve,
) -> None:
    """The stored answer was scrubbed, but the model's name the run records (a column of
    its own, and status) was read from the answer as it came."""
    payload = {"object": "chat.completion", "model": f"echo {KEY}", "choices": [_choice("a")]}
    outcome = await send(await serve(answer(200, payload)))
    assert outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None
    assert outcome.completion["model"] == "echo ***"
    assert KEY not in (outcome.body or "")


@pytest.mark.parametrize("before", ["", "a", "ab", '{"authorization": "Bearer '])
@pytest.mark.parametrize("after", ["", "z", '", "x": 1}'])
def test_the_key_in_base64_is_found_wherever_it_sits(before: str, after: str) -> None:
    scrub = _Scrubber(SLASHED_KEY)
    encoded = base64.b64encode(f"{before}{SLASHED_KEY}{after}".encode()).decode()
    kept = scrub(f"debug: {encoded}")
    assert "***" in kept
    # What is left decodes, at any alignment, to no more than a few of the key's characters.
    for piece in kept.removeprefix("debug: ").split("***"):
        for start in range(4):
            whole = piece[start:][: len(piece[start:]) // 4 * 4]
            assert SLASHED_KEY[4:-4].encode() not in base64.b64decode(whole)


#: A key as base64-style keys are: `+`, `/` and `=` among its characters.
PADDED_KEY = "sk-Ab3+De/Fg=Hi_jk-0123456789QWERTYUIOPasdfg=="


@pytest.mark.parametrize(
    "form",
    [
        "".join(f"\\u{ord(c):04x}" for c in PADDED_KEY),  # every character escaped
        "".join(f"\\u{ord(c):04X}" for c in PADDED_KEY),
        PADDED_KEY.replace("=", "\\u003d"),  # Gson
        re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), urllib.parse.quote(PADDED_KEY, safe="")),
        urllib.parse.quote(PADDED_KEY),  # `/` left as it is
    ],
)
def test_the_key_in_other_escapes_is_found(form: str) -> None:
    """A body echoing the key in these forms was stored as it came; an export (which reads
    the JSON) then wrote the key out plain."""
    kept = _Scrubber(PADDED_KEY)(f'{{"error": {{"message": "bad key {form}"}}}}')
    assert kept == '{"error": {"message": "bad key ***"}}'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("shape", ["plain", "json_event", "error_event"])
async def test_a_key_across_the_cut_of_an_excerpt_is_taken_out_whole(
    serve: Serve, stream: bool, shape: str
) -> None:
    """The excerpt of an error was cut to 300 characters before the key was taken out: a key
    across the cut no longer matched, and all but its last character were stored and shown."""
    echoed = ("x" * 290 + KEY).encode()
    if shape == "plain":
        handler = answer(500 if not stream else 401, echoed, content_type="text/plain")
    elif shape == "json_event":
        handler = stream_answer(b"data: " + echoed + b"\n\n")
    else:
        handler = stream_answer(b"event: error\ndata: " + echoed + b"\n\n")
    outcome = await send(await serve(handler), stream=stream)
    assert outcome.kind is not OutcomeKind.SUCCESS
    for text in (outcome.message, outcome.body):
        assert KEY[:8] not in (text or ""), text
    assert "***" in (outcome.message or "") + (outcome.body or "")


async def test_a_proxy_echoing_its_credentials_has_them_taken_out(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    """A proxy's refusal, and its error page echoing the request's headers, were stored and
    shown with its user and password (as sent, and as their Basic header)."""
    password = "Pr0xyPassw0rd"
    basic = base64.b64encode(f"alice:{password}".encode()).decode()

    page = f"refused: Proxy-Authorization: Basic {basic} (alice:{password}; {password})"
    answer = b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: "
    async with raw_server(answer + str(len(page)).encode() + b"\r\n\r\n" + page.encode()) as port:
        no_proxy_env.setenv("HTTP_PROXY", f"http://alice:{password}@127.0.0.1:{port}")
        outcome = await send("http://api.invalid/v1")
    assert (outcome.kind, outcome.status) == (OutcomeKind.RETRY, 502)
    for text in (outcome.message or "", outcome.body or ""):
        assert password not in text and basic not in text, text
    assert "refused: Proxy-Authorization: Basic *** (***; ***)" in (outcome.body or "")


@pytest.mark.parametrize(
    ("answer_line", "kind", "error_kind"),
    [
        (b"407 Proxy Authentication Required", OutcomeKind.STOP_RUN, "proxy"),
        (b"403 Forbidden", OutcomeKind.STOP_RUN, "proxy"),
        (b"502 Bad Gateway", OutcomeKind.RETRY, "connection"),
    ],
)
async def test_a_proxy_that_refuses_the_way_stops_the_run(
    no_proxy_env: pytest.MonkeyPatch, answer_line: bytes, kind: OutcomeKind, error_kind: str
) -> None:
    """Wrong credentials for the proxy (407) were taken for the API being down: one request
    at a time went on for ever, and no job was done."""

    answer = b"HTTP/1.1 " + answer_line + b"\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(answer) as port:
        no_proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        outcome = await send("https://api.invalid/v1")
    assert (outcome.kind, outcome.error_kind) == (kind, error_kind)
    if kind is OutcomeKind.STOP_RUN:
        assert outcome.message is not None
        assert outcome.message.startswith("the proxy http://127.0.0.1:")
        assert "refused the way to the API: " + answer_line.decode() in outcome.message
