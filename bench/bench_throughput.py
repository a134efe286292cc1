"""Goals 1 and 2: dispatch throughput against a zero-latency server, and CPU per request.

The same request file goes, in turns, through

- the baseline: `bench/bare_client.py`, a bare aiohttp client loop with the same concurrency
  and no database, and
- `batchrunner run BATCH --concurrency C --quiet` (submitted beforehand, untimed), timed until
  the process exits with every result committed, on SQLite and (when it answers) PostgreSQL,

each in its own process pinned to one core, against `bench/fastserver.py` pinned to another.
Each side runs `reps` times, interleaved, and the best wall time of each side is compared (the
machine is shared: the best run is the one least disturbed by others). The server's own CPU use
during the baseline shows the baseline is client-bound (it must stay well under one core).

    python bench/bench_throughput.py [--quick] [--no-pg] [--no-record]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    PYTHON,
    BenchResult,
    Figure,
    Measured,
    Server,
    batchrunner,
    cpu_sets,
    db_count,
    parse_args,
    pg_available,
    pg_database,
    ratio,
    report,
    run_measured,
    sqlite_url,
    submit,
    workdir,
    write_requests,
)

FULL_REQUESTS = 20_000
QUICK_REQUESTS = 2_000
CONCURRENCY = 64
FULL_REPS = 5
QUICK_REPS = 1
THROUGHPUT_GOAL = 0.6
RUN_TIMEOUT_S = 600.0


def _baseline(server: Server, path: Path, cpus: set[int] | None) -> dict[str, Any]:
    server.reset()
    cpu_before = server.cpu_s()
    done = run_measured(
        [
            PYTHON,
            BENCH / "bare_client.py",
            server.url + "/chat/completions",
            path,
            "--concurrency",
            CONCURRENCY,
        ],
        timeout_s=RUN_TIMEOUT_S,
        cpus=cpus,
    ).check()
    server_cpu_s = server.cpu_s() - cpu_before
    return _figures(done, server.stats(), server_cpu_s)


def _ours(server: Server, path: Path, db_url: str, n: int, cpus: set[int] | None) -> dict[str, Any]:
    batch_id = submit(db_url, path, server.url)
    server.reset()
    cpu_before = server.cpu_s()
    done = run_measured(
        batchrunner(db_url, "run", batch_id, "--concurrency", CONCURRENCY, "--quiet"),
        timeout_s=RUN_TIMEOUT_S,
        cpus=cpus,
    ).check()
    server_cpu_s = server.cpu_s() - cpu_before
    committed = db_count(db_url, "SELECT count(*) FROM results")
    if committed != n:
        raise RuntimeError(f"expected {n} results committed, found {committed}")
    out = _figures(done, server.stats(), server_cpu_s)
    out["committed"] = committed
    return out


def _figures(done: Measured, stats: dict[str, Any], server_cpu_s: float) -> dict[str, Any]:
    first = stats["first_request_s"]
    return {
        "wall_s": done.wall_s,
        "cpu_s": done.cpu_s,
        "user_s": done.user_s,
        "sys_s": done.sys_s,
        "maxrss_mb": done.maxrss_mb,
        # From the first request the server saw to the child's exit: start-up left out.
        "first_request_to_exit_s": done.ended_s - first,
        "start_up_s": first - done.started_s,
        "requests_seen_by_server": stats["requests_total"],
        "server_cpu_fraction": server_cpu_s / done.wall_s,
    }


def main() -> None:
    args = parse_args(__doc__)
    n = QUICK_REQUESTS if args.quick else FULL_REQUESTS
    reps = QUICK_REPS if args.quick else FULL_REPS
    server_cpus, client_cpus = cpu_sets()
    use_pg = not args.no_pg and pg_available()
    baseline: list[dict[str, Any]] = []
    sqlite_runs: list[dict[str, Any]] = []
    pg_runs: list[dict[str, Any]] = []
    with workdir() as tmp, Server.fast(cpus=server_cpus) as server:
        path = write_requests(tmp / "requests.jsonl", n)
        for rep in range(reps):
            baseline.append(_baseline(server, path, client_cpus))
            sqlite_runs.append(_ours(server, path, sqlite_url(tmp, f"run{rep}.db"), n, client_cpus))
            line = (
                f"rep {rep + 1}/{reps}: baseline {baseline[-1]['wall_s']:.2f} s, "
                f"sqlite {sqlite_runs[-1]['wall_s']:.2f} s"
            )
            if use_pg:
                with pg_database() as pg_url:
                    pg_runs.append(_ours(server, path, pg_url, n, client_cpus))
                line += f", postgresql {pg_runs[-1]['wall_s']:.2f} s"
            print(line, flush=True)

    best_base = min(baseline, key=lambda r: r["wall_s"])
    best_sqlite = min(sqlite_runs, key=lambda r: r["wall_s"])
    base_rps = n / best_base["wall_s"]
    sqlite_rps = n / best_sqlite["wall_s"]
    tp = ratio(sqlite_rps, base_rps)
    steady = ratio(best_base["first_request_to_exit_s"], best_sqlite["first_request_to_exit_s"])

    def cpu_per_k(runs: list[dict[str, Any]]) -> float:
        return statistics.median(r["cpu_s"] for r in runs) / n * 1000

    figures = [
        Figure(
            "1",
            "dispatch throughput, zero-latency server, SQLite",
            f">= {THROUGHPUT_GOAL} x bare aiohttp loop",
            tp,
            "x baseline",
            tp >= THROUGHPUT_GOAL,
            f"{n} requests, concurrency {CONCURRENCY}: batchrunner {sqlite_rps:.0f} req/s "
            f"(best of {reps}) vs bare aiohttp loop {base_rps:.0f} req/s (best of "
            f"{len(baseline)}); first request to exit only: {steady:.3g} x; server busy "
            f"{best_base['server_cpu_fraction']:.0%} of a core during the baseline",
        ),
        Figure(
            "2",
            "CPU s per 1,000 requests (user + sys), SQLite",
            "report; lower is better",
            cpu_per_k(sqlite_runs),
            "s",
            None,
            f"bare aiohttp loop: {cpu_per_k(baseline):.3g} s per 1,000 "
            f"({ratio(cpu_per_k(sqlite_runs), cpu_per_k(baseline)):.3g} x)",
        ),
    ]
    if pg_runs:
        pg_rps = n / min(r["wall_s"] for r in pg_runs)
        pg_tp = ratio(pg_rps, base_rps)
        figures.insert(
            1,
            Figure(
                "1b",
                "dispatch throughput, zero-latency server, PostgreSQL",
                f">= {THROUGHPUT_GOAL} x bare aiohttp loop",
                pg_tp,
                "x baseline",
                pg_tp >= THROUGHPUT_GOAL,
                f"batchrunner {pg_rps:.0f} req/s (best of {len(pg_runs)}) vs {base_rps:.0f} "
                "req/s; PostgreSQL's own CPU is not counted",
            ),
        )
        figures.append(
            Figure(
                "2b",
                "CPU s per 1,000 requests (user + sys), PostgreSQL",
                "report; lower is better",
                cpu_per_k(pg_runs),
                "s",
                None,
                "client process only",
            )
        )
    report(
        BenchResult(
            name="throughput",
            title="Dispatch throughput and CPU (goals 1, 2)",
            command="python bench/bench_throughput.py" + (" --quick" if args.quick else ""),
            quick=args.quick,
            figures=figures,
            data={
                "requests": n,
                "concurrency": CONCURRENCY,
                "baseline": baseline,
                "sqlite": sqlite_runs,
                "postgresql": pg_runs,
            },
        ),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
