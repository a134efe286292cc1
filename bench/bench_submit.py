"""Goal 6: `batchrunner submit` of a 1,000,000-line file.

The file is generated on the fly (distinct plain request bodies, ~190 bytes a line) and loaded
with `python -m batchrunner --db sqlite:///... submit FILE` in a child process; lines per second
over the child's whole life, and its peak RSS from `wait4`. For scale, the same run measures how
fast this machine merely reads the file and parses each line with orjson (the reference).
PostgreSQL is measured too unless `--no-pg`.

    python bench/bench_submit.py [--quick] [--no-pg] [--no-record]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from _common import (
    API_KEY_ENV,
    BenchResult,
    Figure,
    batchrunner,
    db_count,
    parse_args,
    pg_available,
    pg_database,
    report,
    run_measured,
    sqlite_url,
    workdir,
    write_requests,
)

FULL_LINES = 1_000_000
QUICK_LINES = 100_000
RATE_GOAL_LINES_PER_S = 100_000
RSS_GOAL_MB = 200.0
SUBMIT_TIMEOUT_S = 900.0
BASE_URL = "http://127.0.0.1:9/v1"


def _reference(path: Path) -> float:
    """Seconds to read the file and orjson-parse every line: the floor of any loader."""
    started = time.perf_counter()
    with path.open("rb") as f:
        for line in f:
            orjson.loads(line)
    return time.perf_counter() - started


def _submit(db_url: str, path: Path, n: int) -> dict[str, Any]:
    done = run_measured(
        batchrunner(db_url, "submit", path, "--base-url", BASE_URL, "--api-key-env", API_KEY_ENV),
        timeout_s=SUBMIT_TIMEOUT_S,
    ).check()
    jobs = db_count(db_url, "SELECT count(*) FROM jobs")
    if jobs != n:
        raise RuntimeError(f"expected {n} jobs loaded, found {jobs}")
    return {
        "wall_s": done.wall_s,
        "cpu_s": done.cpu_s,
        "lines_per_s": n / done.wall_s,
        "peak_rss_mb": done.maxrss_mb,
    }


def main() -> None:
    args = parse_args(__doc__)
    n = QUICK_LINES if args.quick else FULL_LINES
    data: dict[str, Any] = {"lines": n}
    with workdir() as tmp:
        path = write_requests(tmp / "requests.jsonl", n)
        data["file_mb"] = path.stat().st_size / 1e6
        sqlite = _submit(sqlite_url(tmp), path, n)
        data["sqlite"] = sqlite
        print(f"sqlite: {sqlite['wall_s']:.1f} s, {sqlite['peak_rss_mb']:.0f} MB", flush=True)
        reference_s = _reference(path)
        data["reference_read_and_parse"] = {"seconds": reference_s, "lines_per_s": n / reference_s}
        if not args.no_pg and pg_available():
            with pg_database() as pg_url:
                data["postgresql"] = _submit(pg_url, path, n)
            print(f"postgresql: {data['postgresql']['wall_s']:.1f} s", flush=True)
    rate = sqlite["lines_per_s"]
    reference_rate = data["reference_read_and_parse"]["lines_per_s"]
    figures = [
        Figure(
            "6a",
            f"submit {n:,} lines, SQLite: rate",
            f">= {RATE_GOAL_LINES_PER_S:,} lines/s",
            rate,
            "lines/s",
            rate >= RATE_GOAL_LINES_PER_S,
            f"{sqlite['wall_s']:.1f} s; {rate / reference_rate:.3g} x the rate of merely"
            " reading and orjson-parsing the file",
        ),
        Figure(
            "6b",
            f"submit {n:,} lines, SQLite: peak RSS",
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
                "6c",
                f"submit {n:,} lines, PostgreSQL: rate / peak RSS",
                f">= {RATE_GOAL_LINES_PER_S:,} lines/s, <= {RSS_GOAL_MB:.0f} MB",
                pg["lines_per_s"],
                f"lines/s, {pg['peak_rss_mb']:.0f} MB",
                pg["lines_per_s"] >= RATE_GOAL_LINES_PER_S and pg["peak_rss_mb"] <= RSS_GOAL_MB,
            )
        )
    report(
        BenchResult(
            name="submit",
            title="Submit a large file (goal 6)",
            command="python bench/bench_submit.py" + (" --quick" if args.quick else ""),
            quick=args.quick,
            figures=figures,
            data=data,
        ),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
