"""A local, deterministic OpenAI-compatible chat-completions server.

The test-suite, `batchrunner demo` and the benchmarks talk to this instead of a real API. It owns:

- the answers: a `chat.completion` (or an SSE stream of `chat.completion.chunk`s) derived only
  from the request body and the seed: n choices, tool calls, JSON / JSON-schema content,
  logprobs, reasoning tokens, `max_completion_tokens` cut-offs, gateway-style usage extras;
- the failures: a server-side request limit, a wrong key, an empty account, random faults drawn
  per request from `FakeConfig.fault_rates`, and scripted faults written into the last user
  message as `[[fault:KIND]]` (always) or `[[fault:KINDxN]]` (the first N attempts of that exact
  body fail, later ones succeed);
- the counters tests and benchmarks read: `FakeServer.stats`, or `GET /_stats`
  (`POST /_reset` clears them).

Three ways to run it: `async with FakeServer(cfg) as srv`, `with FakeServerThread(cfg) as srv`
for synchronous code, and `python -m batchrunner.fakeapi --port 0 ...`, which prints one line
`listening on http://127.0.0.1:PORT/v1` once it accepts connections.

It is built to be cheap per request (the low-level aiohttp server, orjson, no access log, hashes
instead of random state), so that benchmarks measure the client rather than this server.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, cast

import orjson
from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage

__all__ = [
    "FAULT_KINDS",
    "SCRIPTED_FAULT_KINDS",
    "FakeConfig",
    "FakeServer",
    "FakeServerThread",
    "FakeStats",
    "main",
    "schema_instance",
]

LatencyDist = Literal["fixed", "lognormal"]

#: Faults that `FakeConfig.fault_rates` can draw at random:
#:
#: - "400", "429", "500", "503": OpenAI's JSON error body with that status ("429" is
#:   `rate_limit_exceeded` with a short Retry-After); "502", "504": a gateway's HTML page;
#: - "truncated": 200 whose JSON (or event stream) stops halfway, the response itself complete;
#: - "non_completion": 200 with valid JSON that is not a completion (`{"ok": true}`);
#: - "reset": the connection is dropped with a TCP RST, nothing answered;
#: - "hang": nothing is ever answered; the request is held until the client leaves;
#: - "trickle": headers, then one byte of the answer every TRICKLE_INTERVAL_S;
#: - "stream_cut": a stream stops before `[DONE]` and the connection is dropped (a request
#:   without `stream` gets "truncated" instead).
FAULT_KINDS = frozenset(
    {
        "429",
        "500",
        "502",
        "503",
        "504",
        "400",
        "truncated",
        "non_completion",
        "reset",
        "hang",
        "trickle",
        "stream_cut",
    }
)
#: Faults a `[[fault:KIND]]` marker can ask for: the above, the statuses 401 (invalid_api_key),
#: 402 (no balance), 403, 404 (model_not_found) and 422, and "badjson": content that is not
#: valid JSON, or valid JSON that does not match the request's json_schema.
SCRIPTED_FAULT_KINDS = FAULT_KINDS | {"401", "402", "403", "404", "422", "badjson"}

HOST = "127.0.0.1"
#: Every answer claims this creation time, so that answers are byte-for-byte reproducible.
CREATED_S = 1_735_689_600
#: How much of a minute's request budget the server lets pile up in its short-term bucket.
#: OpenAI enforces per-minute limits in short slices ("quantized"): 600 RPM behaves like
#: 10 requests per second, so a client that fires a minute's budget at once gets 429s even
#: though the per-minute headers still show plenty remaining.
RPM_BURST_S = 1.0
#: Retry-After the random / scripted "429" fault advertises (it is not a real limit).
FAULT_RETRY_AFTER_MS = 100
#: Lognormal latency spread (sigma of the underlying normal); the mean stays `latency_ms`.
LOGNORMAL_SIGMA = 0.5
#: "trickle" sends one byte of the answer this often.
TRICKLE_INTERVAL_S = 0.5
#: Largest request body accepted: OpenAI takes up to 50 MB per request (base64 images and
#: files inline); aiohttp's own default of 1 MiB would refuse a single photo.
MAX_BODY_BYTES = 50 * 1024 * 1024
#: How long closing the server waits for answers in progress before cutting them off.
SHUTDOWN_GRACE_S = 0.1
#: Successful answers whose time is kept for rate measurements (the oldest are dropped).
MAX_SUCCESS_TIMES = 100_000
#: Characters per token: the usual rule of thumb for English text.
CHARS_PER_TOKEN = 4
#: Prompt tokens charged for one image part (OpenAI's low-detail price).
IMAGE_TOKENS = 85
#: OpenAI caches prompt prefixes of at least 1,024 tokens, in steps of 128.
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128
#: Hidden reasoning tokens per choice, by `reasoning_effort` (reasoning models default to medium).
REASONING_TOKENS = {"none": 0, "minimal": 16, "low": 64, "medium": 192, "high": 640}
REASONING_MODEL_PREFIXES = ("o1", "o3", "o4", "gpt-5")
GATEWAY_MODEL_MARKERS = ("claude", "gemini")
#: Characters of the last user text echoed back in the answer.
ECHO_CHARS = 40
#: Tool-call arguments are streamed in pieces of this many characters.
ARGUMENT_PIECE_CHARS = 8
#: Recursive schemas stop growing optional parts past this depth.
SCHEMA_MAX_DEPTH = 6

_FAULT_RE = re.compile(r"\[\[fault:([a-z0-9_]+?)(?:x(\d+))?\]\]")
_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_HTML = "text/html"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class FakeConfig:
    """How the fake server behaves; every answer is a function of this and the request body."""

    #: Changes every id and fingerprint, and every random fault and latency draw.
    seed: int = 0
    #: Mean time an answer takes, before its first byte.
    latency_ms: float = 0.0
    latency_dist: LatencyDist = "fixed"
    #: Requests per minute the server admits (quantized, see RPM_BURST_S); None = no limit.
    rpm_limit: float | None = None
    #: Seconds of the per-minute budget the short-term bucket holds (at least one request).
    rpm_burst_s: float = RPM_BURST_S
    #: Send `Retry-After` / `retry-after-ms` with 429 answers.
    retry_after: bool = True
    #: When set, requests without `Authorization: Bearer <api_key>` get 401 invalid_api_key.
    api_key: str | None = None
    #: Every request gets the "no balance left" answer (429 insufficient_quota, or 402).
    quota_exhausted: bool = False
    quota_status: Literal[429, 402] = 429
    #: Probability per request of each fault kind in FAULT_KINDS (their sum at most 1).
    fault_rates: dict[str, float] = field(default_factory=dict)
    #: How many success times `FakeStats.success_times_s` keeps.
    max_success_times: int = MAX_SUCCESS_TIMES

    def __post_init__(self) -> None:
        unknown = set(self.fault_rates) - FAULT_KINDS
        if unknown:
            raise ValueError(
                f"unknown fault kind(s) {sorted(unknown)}; expected some of {sorted(FAULT_KINDS)}"
            )
        if any(r < 0 for r in self.fault_rates.values()) or sum(self.fault_rates.values()) > 1:
            raise ValueError("fault rates must be >= 0 and add up to at most 1")
        if self.latency_dist not in ("fixed", "lognormal"):
            raise ValueError(
                f"latency_dist must be 'fixed' or 'lognormal', not {self.latency_dist!r}"
            )
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.rpm_limit is not None and self.rpm_limit <= 0:
            raise ValueError("rpm_limit must be > 0")
        if self.quota_status not in (429, 402):
            raise ValueError("quota_status must be 429 or 402")


# --------------------------------------------------------------------------- counters


@dataclass(slots=True)
class FakeStats:
    """What the server has seen since it started or was last reset."""

    #: Every chat-completion request received, answered or not.
    requests_total: int = 0
    #: Requests received per sha256 of the exact body bytes (all attempts).
    requests_by_body: dict[bytes, int] = field(default_factory=dict)
    #: Requests received per URL path ("/v1/chat/completions", "/api/v1/chat/completions", ...).
    requests_by_path: dict[str, int] = field(default_factory=dict)
    #: Answers sent, by HTTP status ("200", "429", ...; a cut 200 counts as "200"); "none" =
    #: connection reset by the "reset" fault. Hung requests are not answers.
    answers_by_status: dict[str, int] = field(default_factory=dict)
    #: Faults injected (random or scripted), by kind.
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    #: Valid completions sent (the whole answer, stream included).
    successes: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    #: `time.monotonic()` of the latest successful answers (system-wide clock on Linux, so
    #: comparable across processes).
    success_times_s: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SUCCESS_TIMES))

    def attempts_for(self, body: bytes) -> int:
        """How many times exactly these body bytes were received."""
        return self.requests_by_body.get(hashlib.sha256(body).digest(), 0)

    def observed_rps(self) -> float | None:
        """Successful answers per second between the first and last kept success."""
        times = self.success_times_s
        if len(times) < 2 or times[-1] <= times[0]:
            return None
        return (len(times) - 1) / (times[-1] - times[0])

    def copy(self) -> FakeStats:
        return FakeStats(
            requests_total=self.requests_total,
            requests_by_body=dict(self.requests_by_body),
            requests_by_path=dict(self.requests_by_path),
            answers_by_status=dict(self.answers_by_status),
            faults_by_kind=dict(self.faults_by_kind),
            successes=self.successes,
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            success_times_s=deque(self.success_times_s, maxlen=self.success_times_s.maxlen),
        )

    def to_dict(self, *, bodies: bool = True) -> dict[str, Any]:
        """The `GET /_stats` document; body hashes as hex."""
        out: dict[str, Any] = {
            "requests_total": self.requests_total,
            "answers_by_status": dict(self.answers_by_status),
            "faults_by_kind": dict(self.faults_by_kind),
            "successes": self.successes,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "success_times_s": list(self.success_times_s),
            "observed_rps": self.observed_rps(),
            "distinct_bodies": len(self.requests_by_body),
            "requests_by_path": dict(self.requests_by_path),
        }
        if bodies:
            out["requests_by_body"] = {d.hex(): n for d, n in self.requests_by_body.items()}
        return out


# --------------------------------------------------------------------------- rate limit


def go_duration(seconds: float) -> str:
    """Format a duration the way OpenAI's `x-ratelimit-reset-*` headers do: 120ms, 1.5s, 6m0s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    sec_text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{sec_text}"
    if minutes:
        return f"{minutes}m{sec_text}"
    return sec_text


class _RequestLimit:
    """Server-side requests-per-minute limit, enforced the way OpenAI does it.

    Two buckets refill at rpm/60 requests per second. The short one holds `burst_s` seconds of
    budget (at least one request) and decides admission; the minute one holds a whole minute
    and is only what the `x-ratelimit-*` headers report, as OpenAI's do.
    """

    def __init__(self, rpm: float, burst_s: float, clock: Callable[[], float]) -> None:
        self.rpm = rpm
        self.rate_per_s = rpm / 60.0
        self.capacity = max(1.0, self.rate_per_s * burst_s)
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.level = self.capacity
        self.minute_level = self.rpm
        self.updated_s = self.clock()

    def take(self) -> float:
        """Admit one request (returns 0.0) or return the seconds until one would be admitted."""
        now = self.clock()
        gained = (now - self.updated_s) * self.rate_per_s
        self.updated_s = now
        self.level = min(self.capacity, self.level + gained)
        self.minute_level = min(self.rpm, self.minute_level + gained)
        if self.level >= 1.0:
            self.level -= 1.0
            self.minute_level = max(0.0, self.minute_level - 1.0)
            return 0.0
        return (1.0 - self.level) / self.rate_per_s

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(int(self.rpm)),
            "x-ratelimit-remaining-requests": str(int(self.minute_level)),
            "x-ratelimit-reset-requests": go_duration(
                (self.rpm - self.minute_level) / self.rate_per_s
            ),
        }


# --------------------------------------------------------------------------- JSON schema


def schema_instance(schema: Any, text: str = "", *, root: Any = None, depth: int = 0) -> Any:
    """A value that validates against `schema` (the subset structured outputs use).

    Handles object (every listed property, plus required ones not listed), string (with
    minLength/maxLength and common formats), number, integer (within minimum/maximum), boolean,
    null, array (minItems/maxItems), enum, const, anyOf/oneOf/allOf and local `$ref`s.
    Strings carry `text`, so answers still echo the request.
    """
    if not isinstance(schema, dict):
        return text  # `true` / missing schema: anything goes
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in ref.lstrip("#").strip("/").split("/"):
            if part:
                target = target[part.replace("~1", "/").replace("~0", "~")]
        return schema_instance(target, text, root=root, depth=depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return schema_instance(schema[key][0], text, root=root, depth=depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            if isinstance(part, dict):
                merged |= part
        return schema_instance(merged, text, root=root, depth=depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        required = list(schema.get("required") or [])
        names = list(props) if depth < SCHEMA_MAX_DEPTH else [n for n in props if n in required]
        obj = {n: schema_instance(props[n], text, root=root, depth=depth + 1) for n in names}
        for name in required:
            obj.setdefault(name, text)
        return obj
    if kind == "array":
        low = int(schema.get("minItems", 0))
        count = max(low, 2 if depth < SCHEMA_MAX_DEPTH else 0)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        items = schema.get("items", {})
        values = [schema_instance(items, text, root=root, depth=depth + 1) for _ in range(count)]
        if schema.get("uniqueItems") and count > 1:
            # Identical generated items would break uniqueness; one item always satisfies it
            # unless minItems forbids, in which case distinct strings are the common case.
            values = values[: max(1, low)]
            if len(values) > 1 and all(isinstance(v, str) for v in values):
                values = [f"{v} {i}" for i, v in enumerate(values)]
        return values
    if kind == "string":
        return _schema_string(schema, text)
    if kind in ("number", "integer"):
        return _schema_number(schema, integer=kind == "integer")
    if kind == "boolean":
        return True
    return None


_FORMAT_STRINGS = {
    "date": "2025-01-01",
    "date-time": "2025-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
}


def _schema_string(schema: Mapping[str, Any], text: str) -> str:
    value = _FORMAT_STRINGS.get(str(schema.get("format")), text)
    low = int(schema.get("minLength", 0))
    if len(value) < low:
        value += "x" * (low - len(value))
    if "maxLength" in schema:
        value = value[: int(schema["maxLength"])]
    return value


def _schema_number(schema: Mapping[str, Any], *, integer: bool) -> float | int:
    value: float = 1.0 if integer else 1.5
    if "minimum" in schema:
        value = max(value, float(schema["minimum"]))
    if "exclusiveMinimum" in schema:
        value = max(value, float(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        value = min(value, float(schema["maximum"]))
    if "exclusiveMaximum" in schema:
        value = min(value, float(schema["exclusiveMaximum"]) - 1)
    if integer:
        return math.ceil(value) if "minimum" in schema else math.floor(value)
    return value


def _schema_violation(schema: Any) -> str:
    """JSON text that does not validate against `schema` (for the badjson fault)."""
    import jsonschema  # only on this rare path: it is slow to import

    candidates: list[Any] = [["not", "an", "object"], {}, {"unexpected": 1}, "x", 0, None, True]
    for candidate in candidates:
        try:
            jsonschema.validate(candidate, schema)
        except jsonschema.ValidationError:
            return orjson.dumps(candidate).decode()
        except jsonschema.SchemaError:
            break
    return '{"echo": '  # the schema accepts everything: not even JSON then


# --------------------------------------------------------------------------- answers


def _text_of(content: Any) -> tuple[str, int]:
    """The text of a message's content and how many image parts it has."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image"):
            images += 1
    return "".join(texts), images


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def _hex(*parts: bytes, seed: bytes, size: int = 12) -> str:
    return hashlib.blake2b(b"".join(parts), digest_size=size, key=seed).hexdigest()


class _BadRequest(Exception):
    """The body is not a chat-completion request."""


@dataclass(slots=True)
class _Request:
    """What the answer is derived from, read once from the body."""

    body: dict[str, Any]
    model: str
    last_user_text: str
    prompt_chars: int
    images: int
    stream: bool


def _parse_request(raw: bytes) -> _Request:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest(f"We could not parse the JSON body of your request. ({exc})") from exc
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty array")
    chars = 0
    images = 0
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise _BadRequest("each message must be an object")
        text, n_images = _text_of(message.get("content"))
        chars += len(text)
        images += n_images
        if message.get("role") == "user":
            last_user = text
    n = body.get("n", 1)
    if n is None:
        body["n"] = n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise _BadRequest("'n' must be an integer from 1 to 128")
    return _Request(body, model, last_user, chars, images, body.get("stream") is True)


def _reasoning_tokens(req: _Request) -> int:
    effort = req.body.get("reasoning_effort")
    if isinstance(effort, str):
        return REASONING_TOKENS.get(effort, REASONING_TOKENS["medium"])
    if req.model.startswith(REASONING_MODEL_PREFIXES):
        return REASONING_TOKENS["medium"]
    return 0


def _chosen_tools(req: _Request) -> list[dict[str, Any]]:
    """The function tools this request's answer calls (empty: answer with text)."""
    tools = [
        t
        for t in req.body.get("tools") or ()
        if isinstance(t, dict)
        and t.get("type", "function") == "function"
        and isinstance(t.get("function"), dict)
    ]
    if not tools:
        return []
    choice = req.body.get("tool_choice", "auto")
    if choice == "none":
        return []
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        return [t for t in tools if t["function"].get("name") == wanted][:1]
    if choice == "required" or (choice == "auto" and "use a tool" in req.last_user_text.lower()):
        parallel = req.body.get("parallel_tool_calls") is True and len(tools) >= 2
        return tools[:2] if parallel else tools[:1]
    return []


def _logprob_entries(content: str, top: int) -> list[dict[str, Any]]:
    entries = []
    for i in range(0, len(content), CHARS_PER_TOKEN):
        token = content[i : i + CHARS_PER_TOKEN]
        logprob = -0.01 * ((i // CHARS_PER_TOKEN) * 7 % 13 + 1)
        alternatives = [
            {"token": token, "logprob": logprob, "bytes": list(token.encode())},
            *(
                {
                    "token": f"{token}{k}",
                    "logprob": logprob - 1.5 * k,
                    "bytes": list(f"{token}{k}".encode()),
                }
                for k in range(1, top)
            ),
        ]
        entries.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": alternatives[:top],
            }
        )
    return entries


class _Answers:
    """Builds completions for one server (its seed and per-model constants)."""

    def __init__(self, seed: int) -> None:
        self.seed_key = hashlib.sha256(str(seed).encode()).digest()[:32]
        self._fingerprints: dict[str, str] = {}

    def fingerprint(self, model: str) -> str:
        fp = self._fingerprints.get(model)
        if fp is None:
            fp = self._fingerprints[model] = "fp_" + _hex(
                model.encode(), seed=self.seed_key, size=5
            )
        return fp

    def completion(self, req: _Request, digest: bytes, *, badjson: bool) -> dict[str, Any]:
        body = req.body
        n: int = body.get("n", 1)
        echo = _FAULT_RE.sub("", req.last_user_text).strip()[:ECHO_CHARS]
        reasoning = _reasoning_tokens(req)
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        want_logprobs = body.get("logprobs") is True
        top_logprobs = int(body.get("top_logprobs") or 0)
        tools = _chosen_tools(req)
        content_base = self._content(req, echo, badjson=badjson)

        choices = []
        completion_tokens = 0
        reasoning_total = 0
        for index in range(n):
            message: dict[str, Any] = {"role": "assistant"}
            used_reasoning = reasoning if limit is None else min(reasoning, int(limit))
            budget = None if limit is None else (int(limit) - used_reasoning) * CHARS_PER_TOKEN
            finish = "stop"
            logprobs: dict[str, Any] | None = None
            if tools:
                calls, visible, cut = self._tool_calls(tools, echo, digest, index, budget)
                message.update(content=None, refusal=None, annotations=[], tool_calls=calls)
                finish = "length" if cut else "tool_calls"
                if want_logprobs:
                    logprobs = {"content": None, "refusal": None}
            else:
                content = content_base
                if n > 1 and not content_base.startswith(("{", "[")):
                    content = f"{content_base} #{index}"
                if budget is not None and _tokens(len(content)) > budget // CHARS_PER_TOKEN:
                    content = content[:budget]
                    finish = "length"
                visible = len(content)
                message.update(content=content, refusal=None, annotations=[])
                if want_logprobs:
                    logprobs = {
                        "content": _logprob_entries(content, top_logprobs),
                        "refusal": None,
                    }
            if limit is not None and reasoning > used_reasoning:
                finish = "length"
            completion_tokens += used_reasoning + _tokens(visible)
            reasoning_total += used_reasoning
            choices.append(
                {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
            )

        prompt_tokens = max(1, _tokens(req.prompt_chars)) + IMAGE_TOKENS * req.images
        cacheable = prompt_tokens - 1  # the last prompt token is never served from cache
        cached = (
            CACHE_MIN_TOKENS
            + (cacheable - CACHE_MIN_TOKENS) // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS
            if cacheable >= CACHE_MIN_TOKENS
            else 0
        )
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning_total,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        if any(marker in req.model.lower() for marker in GATEWAY_MODEL_MARKERS):
            # Gateways add their own counters next to OpenAI's; the numbers deliberately differ
            # so that a client reading the wrong field is caught.
            usage.update(
                input_tokens=prompt_tokens * 2 + 1,
                output_tokens=completion_tokens * 3 + 2,
                text_tokens=prompt_tokens + 5,
                image_tokens=7 + req.images,
            )
        return {
            "id": "chatcmpl-" + _hex(digest, seed=self.seed_key),
            "object": "chat.completion",
            "created": CREATED_S,
            "model": req.model,
            "choices": choices,
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": self.fingerprint(req.model),
        }

    def _content(self, req: _Request, echo: str, *, badjson: bool) -> str:
        fmt = req.body.get("response_format")
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema" and isinstance(fmt, dict):
            schema = (fmt.get("json_schema") or {}).get("schema", {})
            if badjson:
                return _schema_violation(schema)
            return orjson.dumps(schema_instance(schema, f"echo: {echo}")).decode()
        if badjson:
            return '{"echo": '
        if kind == "json_object":
            return orjson.dumps({"echo": echo}).decode()
        return f"echo: {echo}"

    def _tool_calls(
        self, tools: list[dict[str, Any]], echo: str, digest: bytes, index: int, budget: int | None
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """The calls, the characters of arguments they hold, and whether the budget cut them."""
        calls = []
        chars = 0
        cut = False
        for k, tool in enumerate(tools):
            function = tool["function"]
            params = function.get("parameters") or {"type": "object", "properties": {}}
            arguments = orjson.dumps(schema_instance(params, echo)).decode()
            if budget is not None and chars + len(arguments) > budget:
                arguments = arguments[: max(0, budget - chars)]
                cut = True
            chars += len(arguments)
            call_id = "call_" + _hex(digest, bytes((index % 256, k)), seed=self.seed_key)
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": function.get("name", ""), "arguments": arguments},
                }
            )
            if cut:
                break
        return calls, chars, cut


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_events(completion: Mapping[str, Any], *, include_usage: bool) -> list[bytes]:
    """The SSE events OpenAI would send for `completion`, ending with `data: [DONE]`."""
    base = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
        "service_tier": completion.get("service_tier"),
        "system_fingerprint": completion["system_fingerprint"],
    }

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: Any = None) -> bytes:
        event: dict[str, Any] = {
            **base,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            ],
        }
        if include_usage:
            event["usage"] = None
        return _sse(event)

    per_choice: list[list[bytes]] = []
    for choice in completion["choices"]:
        index = choice["index"]
        message = choice["message"]
        calls = message.get("tool_calls")
        events = [
            chunk(index, {"role": "assistant", "content": None if calls else "", "refusal": None})
        ]
        if calls:
            for k, call in enumerate(calls):
                head = {
                    "index": k,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }
                events.append(chunk(index, {"tool_calls": [head]}))
                arguments = call["function"]["arguments"]
                for i in range(0, len(arguments), ARGUMENT_PIECE_CHARS):
                    piece = arguments[i : i + ARGUMENT_PIECE_CHARS]
                    events.append(
                        chunk(
                            index, {"tool_calls": [{"index": k, "function": {"arguments": piece}}]}
                        )
                    )
        else:
            content = message["content"] or ""
            entries = (choice.get("logprobs") or {}).get("content")
            for t, i in enumerate(range(0, len(content), CHARS_PER_TOKEN)):
                logprobs = {"content": [entries[t]], "refusal": None} if entries else None
                events.append(chunk(index, {"content": content[i : i + CHARS_PER_TOKEN]}, logprobs))
        events.append(chunk(index, {}, None, choice["finish_reason"]))
        per_choice.append(events)

    out: list[bytes] = []
    for step in range(max(len(e) for e in per_choice)):
        out.extend(events[step] for events in per_choice if step < len(events))
    if include_usage:
        out.append(_sse({**base, "choices": [], "usage": completion["usage"]}))
    out.append(b"data: [DONE]\n\n")
    return out


# --------------------------------------------------------------------------- errors


def _error(message: str, kind: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


_RATE_LIMIT_BODY = _error(
    "Rate limit reached for requests. Please try again later.", "requests", "rate_limit_exceeded"
)
_QUOTA_429_BODY = _error(
    "You exceeded your current quota, please check your plan and billing details.",
    "insufficient_quota",
    "insufficient_quota",
)
_QUOTA_402_BODY = _error("Insufficient Balance", "unknown_error", "invalid_request_error")
_BAD_KEY_BODY = _error(
    "Incorrect API key provided. You can find your API key at "
    "https://platform.openai.com/account/api-keys.",
    "invalid_request_error",
    "invalid_api_key",
)
#: Canned answers of the status faults: (content type, body).
_FAULT_ANSWERS: dict[str, tuple[str, bytes]] = {
    "400": (
        _JSON,
        _error("Invalid value for 'messages'.", "invalid_request_error", None, "messages"),
    ),
    "401": (_JSON, _BAD_KEY_BODY),
    "402": (_JSON, _QUOTA_402_BODY),
    "403": (
        _JSON,
        _error(
            "Country, region, or territory not supported",
            "request_forbidden",
            "unsupported_country_region_territory",
        ),
    ),
    "404": (
        _JSON,
        _error(
            "The model does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
    ),
    "422": (_JSON, _error("Unprocessable Entity", "invalid_request_error", None)),
    "429": (_JSON, _RATE_LIMIT_BODY),
    "500": (
        _JSON,
        _error(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
    ),
    # Gateways in front of the API answer 502/504 with HTML pages, not JSON.
    "502": (_HTML, b"<html><head><title>502 Bad Gateway</title></head><body>502</body></html>"),
    "503": (
        _JSON,
        _error("The engine is currently overloaded, please try again later.", "server_error", None),
    ),
    "504": (
        _HTML,
        b"<html><head><title>504 Gateway Time-out</title></head><body>504</body></html>",
    ),
}


def _retry_after_headers(wait_s: float) -> dict[str, str]:
    return {
        "Retry-After": str(max(1, math.ceil(wait_s))),
        "retry-after-ms": str(math.ceil(wait_s * 1000)),
    }


# --------------------------------------------------------------------------- the server


class FakeServer:
    """The fake API on 127.0.0.1, inside the running event loop.

    async with FakeServer(FakeConfig(seed=1)) as srv:
        ...  # send requests to srv.url ("http://127.0.0.1:PORT/v1")
    """

    def __init__(self, config: FakeConfig | None = None, *, port: int = 0) -> None:
        self.config = config or FakeConfig()
        self._requested_port = port
        self.port = 0
        self.stats = FakeStats(success_times_s=deque(maxlen=self.config.max_success_times))
        self._answers = _Answers(self.config.seed)
        self._limit = (
            _RequestLimit(self.config.rpm_limit, self.config.rpm_burst_s, time.monotonic)
            if self.config.rpm_limit is not None
            else None
        )
        self._auth = None if self.config.api_key is None else f"Bearer {self.config.api_key}"
        # Cumulative fault probabilities, in a fixed order so that draws are reproducible.
        self._fault_table: list[tuple[float, str]] = []
        total = 0.0
        for kind in sorted(self.config.fault_rates):
            total += self.config.fault_rates[kind]
            self._fault_table.append((total, kind))
        self._runner: web.ServerRunner | None = None

    @property
    def base_url(self) -> str:
        """The server's root, where `/_stats` and `/_reset` live."""
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-style base URL to give a client."""
        return f"{self.base_url}/v1"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def make_request(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            # The low-level server's own factory, with room for requests of several MB.
            return web.BaseRequest(
                message, payload, protocol, writer, task, loop, client_max_size=MAX_BODY_BYTES
            )

        server = web.Server(
            self._handle,
            request_factory=make_request,
            # Cancel the handler when the client leaves: "hang" and "trickle" rely on it.
            handler_cancellation=True,
            access_log=None,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self._requested_port, backlog=1024)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def reset(self) -> None:
        """Forget every counter and attempt, and refill the request limit.

        `stats` becomes a new object; requests still in flight stay counted as in flight.
        """
        in_flight = self.stats.in_flight
        self.stats = FakeStats(success_times_s=deque(maxlen=self.config.max_success_times))
        self.stats.in_flight = self.stats.max_in_flight = in_flight
        if self._limit is not None:
            self._limit.reset()

    # ----------------------------------------------------------------------- routing

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if request.method == "POST" and path.endswith("/chat/completions"):
            return await self._completions(request)
        if path.endswith("/_stats") and request.method == "GET":
            bodies = request.query.get("bodies", "1") != "0"
            return web.Response(
                body=orjson.dumps(self.stats.to_dict(bodies=bodies)), content_type=_JSON
            )
        if path.endswith("/_reset") and request.method == "POST":
            self.reset()
            return web.Response(body=b'{"ok":true}', content_type=_JSON)
        return web.Response(
            status=404,
            body=_error(
                f"Unknown request URL: {request.method} {path}.",
                "invalid_request_error",
                "unknown_url",
            ),
            content_type=_JSON,
        )

    async def _completions(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        digest = hashlib.sha256(raw).digest()
        stats = self.stats
        stats.requests_total += 1
        attempt = stats.requests_by_body.get(digest, 0)
        stats.requests_by_body[digest] = attempt + 1
        stats.requests_by_path[request.path] = stats.requests_by_path.get(request.path, 0) + 1
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        try:
            return await self._answer(request, raw, digest, attempt)
        finally:
            self.stats.in_flight -= 1  # not `stats`: a reset may have replaced it meanwhile

    # ----------------------------------------------------------------------- answering

    def _respond(
        self, status: int, body: bytes, headers: dict[str, str], content_type: str = _JSON
    ) -> web.Response:
        self._count_status(status)
        headers["Content-Type"] = content_type
        return web.Response(status=status, body=body, headers=headers)

    def _succeeded(self) -> None:
        self.stats.successes += 1
        self.stats.success_times_s.append(time.monotonic())

    def _count_fault(self, kind: str) -> None:
        faults = self.stats.faults_by_kind
        faults[kind] = faults.get(kind, 0) + 1

    async def _answer(
        self, request: web.BaseRequest, raw: bytes, digest: bytes, attempt: int
    ) -> web.StreamResponse:
        config = self.config
        headers = {
            "x-request-id": "req_"
            + _hex(digest, attempt.to_bytes(8, "big"), seed=self._answers.seed_key, size=16)
        }
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            return self._respond(401, _BAD_KEY_BODY, headers)
        if config.quota_exhausted:
            if config.quota_status == 402:
                return self._respond(402, _QUOTA_402_BODY, headers)
            return self._respond(429, _QUOTA_429_BODY, headers)
        if self._limit is not None:
            wait_s = self._limit.take()
            headers.update(self._limit.headers())
            if wait_s > 0:
                if config.retry_after:
                    headers.update(_retry_after_headers(wait_s))
                return self._respond(429, _RATE_LIMIT_BODY, headers)
        try:
            req = _parse_request(raw)
        except _BadRequest as exc:
            return self._respond(400, _error(str(exc), "invalid_request_error", None), headers)

        fault = self._scripted_fault(req.last_user_text, attempt)
        if fault is None and self._fault_table and "[[fault:" not in req.last_user_text:
            fault = self._random_fault(digest, attempt)
        if fault == "unknown":
            message = f"unknown fault marker; kinds are {sorted(SCRIPTED_FAULT_KINDS)}"
            return self._respond(400, _error(message, "invalid_request_error", None), headers)
        if fault is not None:
            self._count_fault(fault)

        if config.latency_ms > 0:
            await asyncio.sleep(self._latency_s(digest, attempt))

        if fault in _FAULT_ANSWERS:
            content_type, body = _FAULT_ANSWERS[fault]
            if fault == "429" and config.retry_after:
                headers.update(_retry_after_headers(FAULT_RETRY_AFTER_MS / 1000))
            return self._respond(int(fault), body, headers, content_type)
        if fault == "non_completion":
            return self._respond(200, b'{"ok": true}', headers)
        if fault == "reset":
            return await self._reset_connection(request)
        if fault == "hang":
            return await self._hang()

        try:
            completion = self._answers.completion(req, digest, badjson=fault == "badjson")
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # A field of the wrong shape (max_tokens "abc", a broken schema): the real API
            # rejects such requests with a 400 as well.
            message = f"Invalid request: {type(exc).__name__}: {exc}"
            return self._respond(400, _error(message, "invalid_request_error", None), headers)
        if req.stream:
            options = req.body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            events = stream_events(completion, include_usage=include_usage)
            return await self._send_stream(request, events, headers, fault)
        payload = orjson.dumps(completion)
        if fault in ("truncated", "stream_cut"):
            # A non-stream request cannot be cut mid-stream; cut its JSON instead.
            return self._respond(200, payload[: len(payload) // 2], headers)
        if fault == "trickle":
            return await self._trickle(request, payload, headers, _JSON)
        self._succeeded()
        return self._respond(200, payload, headers)

    def _scripted_fault(self, text: str, attempt: int) -> str | None:
        """The fault a `[[fault:KIND]]` / `[[fault:KINDxN]]` marker asks for on this attempt."""
        if "[[fault:" not in text:
            return None
        match = _FAULT_RE.search(text)
        if match is None:
            return "unknown"
        kind, times = match.group(1), match.group(2)
        if kind not in SCRIPTED_FAULT_KINDS:
            return "unknown"
        if times is not None and attempt >= int(times):
            return None
        return kind

    def _draw(self, digest: bytes, attempt: int, purpose: bytes) -> float:
        """A uniform number in [0, 1) fixed by seed, body and attempt: the same run replays the
        same faults whatever order concurrent requests arrive in."""
        h = hashlib.blake2b(
            digest + attempt.to_bytes(8, "big") + purpose, digest_size=8, key=self._answers.seed_key
        )
        return int.from_bytes(h.digest(), "big") / 2**64

    def _random_fault(self, digest: bytes, attempt: int) -> str | None:
        u = self._draw(digest, attempt, b"fault")
        for bound, kind in self._fault_table:
            if u < bound:
                return kind
        return None

    def _latency_s(self, digest: bytes, attempt: int) -> float:
        mean_s = self.config.latency_ms / 1000
        if self.config.latency_dist == "fixed":
            return mean_s
        rng = random.Random(int(self._draw(digest, attempt, b"latency") * 2**53))
        mu = math.log(mean_s) - LOGNORMAL_SIGMA**2 / 2  # keeps the mean at latency_ms
        return rng.lognormvariate(mu, LOGNORMAL_SIGMA)

    async def _send_stream(
        self,
        request: web.BaseRequest,
        events: list[bytes],
        headers: dict[str, str],
        fault: str | None,
    ) -> web.StreamResponse:
        headers["Cache-Control"] = "no-cache"
        if fault == "trickle":
            return await self._trickle(request, b"".join(events), headers, _SSE)
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = _SSE
        self._count_status(200)
        await response.prepare(request)
        if fault == "truncated":
            # Ends the HTTP response cleanly, in the middle of an event.
            data = b"".join(events)
            await response.write(data[: len(data) // 2])
            await response.write_eof()
            return response
        if fault == "stream_cut":
            for event in events[: max(1, (len(events) - 1) // 2)]:
                await response.write(event)
            self._abort(request)
            return response
        for event in events:
            await response.write(event)
        await response.write_eof()
        self._succeeded()
        return response

    def _count_status(self, status: int | str) -> None:
        answers = self.stats.answers_by_status
        key = str(status)
        answers[key] = answers.get(key, 0) + 1

    async def _trickle(
        self, request: web.BaseRequest, payload: bytes, headers: dict[str, str], content_type: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = content_type
        response.content_length = len(payload)
        self._count_status(200)
        await response.prepare(request)
        for i in range(len(payload)):
            await response.write(payload[i : i + 1])
            await asyncio.sleep(TRICKLE_INTERVAL_S)
        await response.write_eof()
        return response

    def _abort(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: the close sends a TCP RST, which clients see as "connection reset".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _reset_connection(self, request: web.BaseRequest) -> web.StreamResponse:
        self._count_status("none")
        self._abort(request)
        return await self._hang()  # the lost connection cancels this handler

    async def _hang(self) -> web.StreamResponse:
        await asyncio.get_running_loop().create_future()  # until the client leaves
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------- in a thread


class FakeServerThread:
    """The fake API served from a background thread, for synchronous code.

    with FakeServerThread(FakeConfig(rpm_limit=60)) as srv:
        requests.post(srv.url + "/chat/completions", ...)
    """

    #: How long start() waits for the server to accept connections.
    START_TIMEOUT_S = 10.0

    def __init__(self, config: FakeConfig | None = None, *, port: int = 0) -> None:
        self.config = config or FakeConfig()
        self._port = port
        self._server: FakeServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fakeapi", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.START_TIMEOUT_S):
            raise RuntimeError("the fake API did not start")
        if self._error is not None:
            raise RuntimeError("the fake API did not start") from self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(), which runs in the caller's thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with FakeServer(self.config, port=self._port) as server:
            self._server = server
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeServerThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _running(self) -> tuple[FakeServer, asyncio.AbstractEventLoop]:
        if self._server is None or self._loop is None:
            raise RuntimeError("the fake API is not running")
        return self._server, self._loop

    @property
    def url(self) -> str:
        return self._running()[0].url

    @property
    def base_url(self) -> str:
        return self._running()[0].base_url

    @property
    def port(self) -> int:
        return self._running()[0].port

    @property
    def stats(self) -> FakeStats:
        """A copy of the counters, taken inside the server's loop (they change while we read)."""
        server, loop = self._running()

        async def snapshot() -> FakeStats:
            return server.stats.copy()

        return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(self.START_TIMEOUT_S)

    def reset(self) -> None:
        server, loop = self._running()
        loop.call_soon_threadsafe(server.reset)


# --------------------------------------------------------------------------- as a process


def _fault_arg(text: str) -> tuple[str, float]:
    kind, sep, rate = text.partition("=")
    if not sep or kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(
            f"expected KIND=RATE with KIND one of {', '.join(sorted(FAULT_KINDS))}"
        )
    try:
        return kind, float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {rate!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m batchrunner.fakeapi",
        description="Serve a local, deterministic OpenAI-compatible chat-completions API.",
        epilog="example: python -m batchrunner.fakeapi --port 0 --rpm 600 --latency-ms 50 "
        "--fault 500=0.05 --fault reset=0.01",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="mean answer latency")
    parser.add_argument("--latency-dist", choices=["fixed", "lognormal"], default="fixed")
    parser.add_argument("--rpm", type=float, default=None, help="requests per minute admitted")
    parser.add_argument(
        "--burst-s",
        type=float,
        default=RPM_BURST_S,
        help="seconds of the rpm budget that may come at once",
    )
    parser.add_argument(
        "--no-retry-after",
        action="store_true",
        help="send 429s without Retry-After / retry-after-ms",
    )
    parser.add_argument("--api-key", default=None, help="only accept this key")
    parser.add_argument(
        "--quota-exhausted", action="store_true", help="answer every request with 'no balance left'"
    )
    parser.add_argument("--quota-status", type=int, choices=[429, 402], default=429)
    parser.add_argument(
        "--fault",
        type=_fault_arg,
        action="append",
        default=[],
        metavar="KIND=RATE",
        help="random fault probability; repeatable",
    )
    return parser


async def _serve_until_signalled(config: FakeConfig, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with FakeServer(config, port=port) as server:
        print(f"listening on {server.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the fake API until SIGTERM / SIGINT; prints `listening on URL` once it accepts."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = FakeConfig(
            seed=args.seed,
            latency_ms=args.latency_ms,
            latency_dist=cast(LatencyDist, args.latency_dist),
            rpm_limit=args.rpm,
            rpm_burst_s=args.burst_s,
            retry_after=not args.no_retry_after,
            api_key=args.api_key,
            quota_exhausted=args.quota_exhausted,
            quota_status=cast(Literal[429, 402], args.quota_status),
            fault_rates=dict(args.fault),
        )
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(_serve_until_signalled(config, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
