"""The baseline of the throughput benchmark: a bare aiohttp client loop, no database.

`concurrency` tasks share one `ClientSession` (a connector of the same size as batchrunner's)
and post the request file's bodies, each answer read whole and parsed with orjson: the least
any Python client built on aiohttp has to do for the same requests.

    python bench/bare_client.py URL FILE --concurrency C

prints one JSON line: requests, ok, seconds from the first request to the last parsed answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import orjson


async def run(url: str, bodies: list[bytes], concurrency: int) -> dict[str, float | int]:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    ok = 0
    errors = 0
    next_index = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok, errors, next_index
        while next_index < len(bodies):
            body = bodies[next_index]
            next_index += 1
            async with session.post(url, data=body) as response:
                raw = await response.read()
                status = response.status
            completion = orjson.loads(raw)
            if status == 200 and isinstance(completion, dict) and completion.get("choices"):
                ok += 1
            else:
                errors += 1

    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"requests": len(bodies), "ok": ok, "errors": errors, "elapsed_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the full chat-completions URL")
    parser.add_argument("file", type=Path, help="JSONL of plain request bodies")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    bodies = [line for line in args.file.read_bytes().splitlines() if line.strip()]
    result = asyncio.run(run(args.url, bodies, args.concurrency))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
