"""Goals 3 and 4: pacing against a server that enforces L requests per second.

The in-package fake API (`python -m batchrunner.fakeapi --rpm 60L`) admits L requests per second
the way OpenAI enforces a per-minute limit (a bucket of one second's budget, refilled evenly) and
answers the rest with 429 + Retry-After. The same batch of N requests runs twice:

- configured at 2 x L (`--rpm 120L`): every job must succeed, in at most 1.15 x N / L;
- configured at L (`--rpm 60L`): in at most 1.05 x N / L, with 429s at most 2 % of requests.

Wall time is the child process's whole life; the span from the first to the last success the
server saw is given next to it.

    python bench/bench_pacing.py [--quick] [--no-record]
"""

from __future__ import annotations

from typing import Any

from _common import (
    BenchResult,
    Figure,
    Server,
    batchrunner,
    cpu_sets,
    db_count,
    parse_args,
    report,
    run_measured,
    sqlite_url,
    submit,
    workdir,
    write_requests,
)

LIMIT_RPS = 50
FULL_REQUESTS = 2_000
QUICK_REQUESTS = 300
#: The server answers after this long: a real API is never instant.
LATENCY_MS = 20
CONCURRENCY = 64
OVER_LIMIT_WALL_GOAL = 1.15
AT_LIMIT_WALL_GOAL = 1.05
AT_LIMIT_429_GOAL = 0.02
RUN_TIMEOUT_S = 900.0


def _paced_run(n: int, rpm: float, tag: str) -> dict[str, Any]:
    server_cpus, client_cpus = cpu_sets()
    with (
        workdir() as tmp,
        Server.fake(
            "--rpm", LIMIT_RPS * 60, "--latency-ms", LATENCY_MS, cpus=server_cpus
        ) as server,
    ):
        path = write_requests(tmp / "requests.jsonl", n, tag=tag)
        db_url = sqlite_url(tmp)
        batch_id = submit(db_url, path, server.url)
        server.reset()
        done = run_measured(
            batchrunner(
                db_url, "run", batch_id, "--concurrency", CONCURRENCY, "--rpm", rpm, "--quiet"
            ),
            timeout_s=RUN_TIMEOUT_S,
            cpus=client_cpus,
        )
        stats = server.stats("/_stats?bodies=0")
        succeeded = db_count(db_url, "SELECT count(*) FROM results")
    times = stats["success_times_s"]
    return {
        "rpm": rpm,
        "exit_code": done.returncode,
        "wall_s": done.wall_s,
        "cpu_s": done.cpu_s,
        "succeeded": succeeded,
        "requests_seen_by_server": stats["requests_total"],
        "answers_by_status": stats["answers_by_status"],
        "first_to_last_success_s": times[-1] - times[0] if len(times) > 1 else None,
        "start_up_s": times[0] - done.started_s if times else None,
    }


def main() -> None:
    args = parse_args(__doc__)
    n = QUICK_REQUESTS if args.quick else FULL_REQUESTS
    ideal_s = n / LIMIT_RPS
    over = _paced_run(n, 2 * LIMIT_RPS * 60, "over")
    print(f"2 x L: {over['wall_s']:.1f} s, answers {over['answers_by_status']}", flush=True)
    at = _paced_run(n, LIMIT_RPS * 60, "at")
    print(f"L: {at['wall_s']:.1f} s, answers {at['answers_by_status']}", flush=True)

    over_ratio = over["wall_s"] / ideal_s
    over_ok = over["succeeded"] == n and over["exit_code"] == 0
    at_ratio = at["wall_s"] / ideal_s
    at_429 = at["answers_by_status"].get("429", 0)
    at_429_share = at_429 / n
    figures = [
        Figure(
            "3a",
            "pacing at 2 x L: jobs succeeded",
            "100 %",
            100.0 * over["succeeded"] / n,
            "%",
            over_ok,
            f"exit code {over['exit_code']}; "
            f"{over['answers_by_status'].get('429', 0)} answers were 429",
        ),
        Figure(
            "3b",
            "pacing at 2 x L: wall time",
            f"<= {OVER_LIMIT_WALL_GOAL} x N / L",
            over_ratio,
            "x N / L",
            over_ratio <= OVER_LIMIT_WALL_GOAL,
            f"N = {n}, L = {LIMIT_RPS}/s: {over['wall_s']:.1f} s for an ideal {ideal_s:.0f} s; "
            f"first to last success {over['first_to_last_success_s']:.1f} s",
        ),
        Figure(
            "4a",
            "pacing at L: wall time",
            f"<= {AT_LIMIT_WALL_GOAL} x N / L",
            at_ratio,
            "x N / L",
            at_ratio <= AT_LIMIT_WALL_GOAL,
            f"{at['wall_s']:.1f} s for an ideal {ideal_s:.0f} s; first to last success "
            f"{at['first_to_last_success_s']:.1f} s; {at['succeeded']} of {n} succeeded",
        ),
        Figure(
            "4b",
            "pacing at L: 429 answers",
            f"<= {AT_LIMIT_429_GOAL:.0%} of requests",
            100.0 * at_429_share,
            "%",
            at_429_share <= AT_LIMIT_429_GOAL,
            f"{at_429} of {n}",
        ),
    ]
    report(
        BenchResult(
            name="pacing",
            title="Pacing against a server limit (goals 3, 4)",
            command="python bench/bench_pacing.py" + (" --quick" if args.quick else ""),
            quick=args.quick,
            figures=figures,
            data={
                "requests": n,
                "limit_rps": LIMIT_RPS,
                "latency_ms": LATENCY_MS,
                "concurrency": CONCURRENCY,
                "at_2x_limit": over,
                "at_limit": at,
            },
        ),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
