"""Goal 7: export 1,000,000 results to CSV.

A batch of 1,000,000 succeeded jobs, each with metadata and a stored completion, is written
straight into a fresh database with SQL (the schema made by `JobStore.open`, so it is the real
one; the batch row as submit leaves it, with its jobs' metadata keys), untimed. Then, timed in
a child process with its peak RSS from `wait4`:

    python -m batchrunner --db URL export BATCH --format csv -o OUT

or, while the CLI has no `export` command yet, the same through `batchrunner.export.export_batch`
called by a two-line child. For scale, the same run measures the floor of any exporter: one
plain sqlite3 query over the same rows, parsing each completion with orjson (the reference).

    python bench/bench_export.py [--quick] [--no-pg] [--no-record]
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
from _common import (
    MODEL,
    PYTHON,
    BenchResult,
    Figure,
    batchrunner,
    parse_args,
    pg_available,
    pg_database,
    report,
    run_measured,
    sqlite_url,
    workdir,
)

FULL_ROWS = 1_000_000
QUICK_ROWS = 100_000
RATE_GOAL_ROWS_PER_S = 100_000
RSS_GOAL_MB = 200.0
EXPORT_TIMEOUT_S = 900.0
BATCH_ID = "batch_bench0000000000"

# The completion every job gets; `__N__` becomes the job's line number.
RESPONSE = orjson.dumps(
    {
        "id": "chatcmpl-__N__",
        "object": "chat.completion",
        "created": 1_735_689_600,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Item __N__ is summarised here in one short sentence, as asked.",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 31,
            "completion_tokens": 14,
            "total_tokens": 45,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_bench00000",
    }
).decode()
BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Summarise item __N__ in one sentence."}],
        "max_tokens": 64,
    }
).decode()


def _create_schema(db_url: str) -> None:
    from batchrunner.store import JobStore

    async def create() -> None:
        store = await JobStore.open(db_url)
        await store.close()

    asyncio.run(create())


# As submit leaves it, with the keys of the jobs' metadata below.
_BATCH_SQL = (
    "INSERT INTO batches (id, name, source_file, content_sha256, base_url, api_key_env, options,"
    " total_jobs, invalid_lines, meta_keys, created_at) VALUES ('{batch}', 'bench',"
    " 'bench.jsonl', '{sha}', 'http://127.0.0.1:9/v1', 'OPENAI_API_KEY', '{{}}', {n}, 0,"
    ' \'["row","set"]\', 1735689600)'
)
# `{seq}` is a row source of i = 1..n; `{text}` the cast of i to text.
_JOBS_SQL = (
    "INSERT INTO jobs (batch_id, line, custom_id, method, endpoint, body, meta, model, stream,"
    " est_tokens, state, attempts, created_at, updated_at, finished_at)"
    " SELECT '{batch}', i, 'request-' || {text}, 'POST', '/v1/chat/completions',"
    " replace(:body, '__N__', {text}), '{{\"row\": ' || {text} || ', \"set\": \"bench\"}}',"
    " '{model}', {false}, 95, 'succeeded', 1, 1735689600, 1735689600, 1735689601 FROM {seq}"
)
_RESULTS_SQL = (
    "INSERT INTO results (job_id, batch_id, status_code, response, request_id, model,"
    " prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens,"
    " schema_valid, latency_ms, attempts, finished_at)"
    " SELECT id, batch_id, 200, replace(:response, '__N__', {line}), 'req_' || {line},"
    " 'gpt-4o-mini-2024-07-18', 31, 14, 0, 0, 45, NULL, 312.5, 1, 1735689601 FROM jobs"
)


def _fill_sqlite(db_url: str, n: int) -> None:
    _create_schema(db_url)
    path = db_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        conn.execute(_BATCH_SQL.format(batch=BATCH_ID, sha="0" * 64, n=n))
        seq = f"(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n})"
        seq += " SELECT i FROM s)"
        conn.execute(
            _JOBS_SQL.format(batch=BATCH_ID, text="CAST(i AS TEXT)", model=MODEL, false=0, seq=seq),
            {"body": BODY},
        )
        conn.execute(_RESULTS_SQL.format(line="CAST(line AS TEXT)"), {"response": RESPONSE})
        conn.execute("COMMIT")


def _fill_postgres(db_url: str, n: int) -> None:
    import asyncpg

    _create_schema(db_url)

    async def fill() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            async with conn.transaction():
                await conn.execute(_BATCH_SQL.format(batch=BATCH_ID, sha="0" * 64, n=n))
                await conn.execute(
                    _JOBS_SQL.format(
                        batch=BATCH_ID,
                        text="i::text",
                        model=MODEL,
                        false="false",
                        seq=f"generate_series(1, {n}) AS i",
                    ).replace(":body", "$1"),
                    BODY,
                )
                await conn.execute(
                    _RESULTS_SQL.format(line="line::text").replace(":response", "$1"), RESPONSE
                )
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

    asyncio.run(fill())


def _has_export_command(db_url: str) -> bool:
    done = run_measured(batchrunner(db_url, "export", "--help"), timeout_s=60)
    return done.returncode == 0


_CHILD = (
    "import asyncio, sys\n"
    "from batchrunner.export import export_batch\n"
    "from batchrunner.store import JobStore\n"
    "async def main():\n"
    "    store = await JobStore.open(sys.argv[1])\n"
    "    try:\n"
    "        with open(sys.argv[3], 'wb') as out:\n"
    "            await export_batch(store, sys.argv[2], out, fmt='csv')\n"
    "    finally:\n"
    "        await store.close()\n"
    "asyncio.run(main())\n"
)


def _export(db_url: str, out: Path, n: int) -> dict[str, Any]:
    if _has_export_command(db_url):
        how = "batchrunner export"
        args = batchrunner(db_url, "export", BATCH_ID, "--format", "csv", "-o", out)
    else:
        how = "batchrunner.export.export_batch (no export command in the CLI yet)"
        args = [PYTHON, "-c", _CHILD, db_url, BATCH_ID, out]
    done = run_measured(args, timeout_s=EXPORT_TIMEOUT_S).check()
    with out.open("rb") as f:
        lines = sum(1 for _ in f)
    if lines != n + 1:
        raise RuntimeError(f"expected {n} rows and a header in {out}, found {lines} lines")
    return {
        "how": how,
        "wall_s": done.wall_s,
        "cpu_s": done.cpu_s,
        "rows_per_s": n / done.wall_s,
        "peak_rss_mb": done.maxrss_mb,
        "csv_mb": out.stat().st_size / 1e6,
    }


def _reference(db_url: str) -> float:
    """Seconds for one plain sqlite3 query over the rows, parsing each completion."""
    path = db_url.removeprefix("sqlite:///")
    started = time.perf_counter()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for row in conn.execute(
            "SELECT j.custom_id, j.meta, r.response FROM jobs j JOIN results r"
            " ON r.job_id = j.id ORDER BY j.id"
        ):
            orjson.loads(row[2])
    return time.perf_counter() - started


def main() -> None:
    args = parse_args(__doc__)
    n = QUICK_ROWS if args.quick else FULL_ROWS
    data: dict[str, Any] = {"rows": n}
    with workdir() as tmp:
        db_url = sqlite_url(tmp)
        started = time.perf_counter()
        _fill_sqlite(db_url, n)
        data["build_db_s"] = time.perf_counter() - started
        sqlite = _export(db_url, tmp / "out.csv", n)
        data["sqlite"] = sqlite
        print(f"sqlite: {sqlite['wall_s']:.1f} s, {sqlite['peak_rss_mb']:.0f} MB", flush=True)
        reference_s = _reference(db_url)
        data["reference_query_and_parse"] = {"seconds": reference_s, "rows_per_s": n / reference_s}
        (tmp / "out.csv").unlink()
        if not args.no_pg and pg_available():
            with pg_database() as pg_url:
                _fill_postgres(pg_url, n)
                data["postgresql"] = _export(pg_url, tmp / "out.csv", n)
            print(f"postgresql: {data['postgresql']['wall_s']:.1f} s", flush=True)
    rate = sqlite["rows_per_s"]
    figures = [
        Figure(
            "7a",
            f"export {n:,} results to CSV, SQLite: rate",
            f">= {RATE_GOAL_ROWS_PER_S:,} rows/s",
            rate,
            "rows/s",
            rate >= RATE_GOAL_ROWS_PER_S,
            f"{sqlite['wall_s']:.1f} s via {sqlite['how']}; "
            f"{rate / data['reference_query_and_parse']['rows_per_s']:.3g} x the rate of one "
            "plain sqlite3 query parsing each completion",
        ),
        Figure(
            "7b",
            f"export {n:,} results to CSV, SQLite: peak RSS",
            f"<= {RSS_GOAL_MB:.0f} MB",
            sqlite["peak_rss_mb"],
            "MB",
            sqlite["peak_rss_mb"] <= RSS_GOAL_MB,
        ),
    ]
    if "postgresql" in data:
        pg = data["postgresql"]
        figures.append(
            Figure(
                "7c",
                f"export {n:,} results to CSV, PostgreSQL: rate / peak RSS",
                f">= {RATE_GOAL_ROWS_PER_S:,} rows/s, <= {RSS_GOAL_MB:.0f} MB",
                pg["rows_per_s"],
                f"rows/s, {pg['peak_rss_mb']:.0f} MB",
                pg["rows_per_s"] >= RATE_GOAL_ROWS_PER_S and pg["peak_rss_mb"] <= RSS_GOAL_MB,
            )
        )
    report(
        BenchResult(
            name="export",
            title="Export to CSV (goal 7)",
            command="python bench/bench_export.py" + (" --quick" if args.quick else ""),
            quick=args.quick,
            figures=figures,
            data=data,
        ),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
