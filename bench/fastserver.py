"""A minimal, fast OpenAI-style chat-completions server for the benchmarks.

The throughput benchmark must measure the client, not the server: this one speaks just enough
HTTP/1.1 (keep-alive, Content-Length bodies) on a raw asyncio protocol to answer every
`POST .../chat/completions` with one fixed `chat.completion` object, at a cost per request far
below what any Python HTTP client spends. It runs in its own process (its own core).

It also counts what the benchmarks need to know about the client:

- `requests_total`, `answered`, `in_flight`, `distinct_bodies`, `resent` (requests whose exact
  body had been received before);
- `lost`: requests whose connection closed before their answer was written;
- with `?at=T` (a `time.monotonic()`, e.g. the instant a client was killed): `received_by_at`
  and `answered_by_at`, the requests received and answered up to then, and
  `answered_in_10ms_before_at`. Their difference is what
  was in flight at T. (`lost` undercounts that: an answer falling due between the client's death
  and the server noticing its closed connection is written to a dead socket and counted as
  answered.)
- `first_request_s` / `last_request_s`: `time.monotonic()` (system-wide on Linux) of the first
  and last request since the last reset.

`GET /_stats[?at=T]` returns them as JSON, `POST /_reset` clears them.

    python bench/fastserver.py --port 0 [--latency-ms 200 --latency-dist lognormal]

prints `listening on http://127.0.0.1:PORT/v1` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import random
import signal
import time
from collections import deque

import orjson

HOST = "127.0.0.1"
#: Lognormal latency spread (sigma of the underlying normal); the mean stays `latency_ms`.
LOGNORMAL_SIGMA = 0.5
#: Largest request head accepted; a client sending more is cut off.
MAX_HEAD_BYTES = 64 * 1024

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion",
        "created": 1_735_689_600,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! This is a fixed answer from the benchmark server.",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 12,
            "total_tokens": 31,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_bench00000",
    }
)
_OK_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json\r\n"
    b"x-request-id: req_bench\r\n"
    b"Content-Length: " + str(len(COMPLETION)).encode() + b"\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
OK_RESPONSE = _OK_HEAD + COMPLETION


def _plain(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: keep-alive\r\n\r\n"
    ) + body


NOT_FOUND = _plain(b"404 Not Found", b'{"error":{"message":"unknown URL"}}')


class Counters:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests_total = 0
        self.answered = 0
        self.in_flight = 0
        self.lost = 0
        self.resent = 0
        self.bodies: set[int] = set()
        self.first_request_s: float | None = None
        self.last_request_s: float | None = None
        #: `time.monotonic()` of each completion request received and answered, in order.
        self.received_at: list[float] = []
        self.answered_at: list[float] = []

    def to_json(self, at: float | None = None) -> bytes:
        upto = {}
        if at is not None:
            answered = bisect.bisect_right(self.answered_at, at)
            upto = {
                "received_by_at": bisect.bisect_right(self.received_at, at),
                "answered_by_at": answered,
                # Answers that may still have been on their way into the client at T.
                "answered_in_10ms_before_at": answered
                - bisect.bisect_right(self.answered_at, at - 0.01),
            }
        return orjson.dumps(
            {
                **upto,
                "requests_total": self.requests_total,
                "answered": self.answered,
                "in_flight": self.in_flight,
                "lost": self.lost,
                "resent": self.resent,
                "distinct_bodies": len(self.bodies),
                "first_request_s": self.first_request_s,
                "last_request_s": self.last_request_s,
            }
        )


class Latency:
    """Answer delays: fixed, or lognormal with the given mean."""

    def __init__(self, mean_ms: float, dist: str, seed: int) -> None:
        self.mean_s = mean_ms / 1000.0
        self.dist = dist
        self.rng = random.Random(seed)
        self.mu = math.log(self.mean_s) - LOGNORMAL_SIGMA**2 / 2 if self.mean_s > 0 else 0.0

    def draw(self) -> float:
        if self.mean_s <= 0:
            return 0.0
        if self.dist == "fixed":
            return self.mean_s
        return self.rng.lognormvariate(self.mu, LOGNORMAL_SIGMA)


class HttpProtocol(asyncio.Protocol):
    """One keep-alive connection; requests are answered one at a time, in order."""

    def __init__(self, counters: Counters, latency: Latency) -> None:
        self.counters = counters
        self.latency = latency
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        #: Completion requests received on this connection and not yet answered.
        self.pending: deque[bytes] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        counters = self.counters
        counters.lost += len(self.pending)
        counters.in_flight -= len(self.pending)
        self.pending.clear()
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._parse_one():
            pass
        if len(self.buffer) > MAX_HEAD_BYTES and self.transport is not None:
            self.transport.close()

    def _parse_one(self) -> bool:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buf[:end])
        length = 0
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = lower.find(b"\r\n", at + 2)
            length = int(lower[at + 17 : stop if stop >= 0 else len(lower)].strip())
        total = end + 4 + length
        if len(buf) < total:
            return False
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self._on_request(head, body)
        return True

    def _on_request(self, head: bytes, body: bytes) -> None:
        line_end = head.find(b"\r\n")
        request_line = head[: line_end if line_end >= 0 else len(head)]
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        transport = self.transport
        if transport is None:
            return
        if method == b"POST" and path.endswith(b"/chat/completions"):
            counters = self.counters
            now = time.monotonic()
            if counters.first_request_s is None:
                counters.first_request_s = now
            counters.last_request_s = now
            counters.received_at.append(now)
            counters.requests_total += 1
            counters.in_flight += 1
            key = hash(body)
            if key in counters.bodies:
                counters.resent += 1
            else:
                counters.bodies.add(key)
            self.pending.append(body)
            if len(self.pending) == 1:
                self._schedule()
            return
        if self.pending:
            # Another request behind an unanswered one: only completions are pipelined here.
            transport.close()
            return
        if method == b"GET" and path.endswith(b"/_stats"):
            query = rest.partition(b" ")[0].partition(b"?")[2]
            at = float(query[3:]) if query.startswith(b"at=") else None
            transport.write(_plain(b"200 OK", self.counters.to_json(at)))
        elif method == b"POST" and path.endswith(b"/_reset"):
            self.counters.reset()
            transport.write(_plain(b"200 OK", b'{"ok":true}'))
        else:
            transport.write(NOT_FOUND)

    def _schedule(self) -> None:
        delay_s = self.latency.draw()
        if delay_s <= 0:
            self._answer()
        else:
            self.timer = asyncio.get_running_loop().call_later(delay_s, self._answer)

    def _answer(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or not self.pending:
            return
        self.pending.popleft()
        counters = self.counters
        counters.in_flight -= 1
        counters.answered += 1
        counters.answered_at.append(time.monotonic())
        transport.write(OK_RESPONSE)
        if self.pending:
            self._schedule()


async def serve(port: int, latency: Latency) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters()
    server = await loop.create_server(
        lambda: HttpProtocol(counters, latency), HOST, port, backlog=4096
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    actual = server.sockets[0].getsockname()[1]
    print(f"listening on http://{HOST}:{actual}/v1", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--latency-dist", choices=["fixed", "lognormal"], default="fixed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, Latency(args.latency_ms, args.latency_dist, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
