"""Goal 5: a latency-bound run keeps its concurrency busy.

`bench/fastserver.py` answers after a lognormal delay with a mean of 200 ms; at concurrency 128
the most any client can do is 128 / 0.2 s = 640 requests per second. `batchrunner run` must reach
at least 90 % of that, counted over the child's whole life (start-up and last commit included).
The bare aiohttp client loop runs the same file in the same run, for reference.

    python bench/bench_latency.py [--quick] [--no-record]
"""

from __future__ import annotations

from typing import Any

from _common import (
    BENCH,
    PYTHON,
    BenchResult,
    Figure,
    Server,
    batchrunner,
    cpu_sets,
    db_count,
    parse_args,
    raise_nofile,
    report,
    run_measured,
    sqlite_url,
    submit,
    workdir,
    write_requests,
)

LATENCY_MS = 200.0
CONCURRENCY = 128
FULL_REQUESTS = 20_000
QUICK_REQUESTS = 3_000
GOAL_FRACTION = 0.9
RUN_TIMEOUT_S = 600.0


def main() -> None:
    args = parse_args(__doc__)
    raise_nofile()
    n = QUICK_REQUESTS if args.quick else FULL_REQUESTS
    ideal_rps = CONCURRENCY / (LATENCY_MS / 1000)
    server_cpus, client_cpus = cpu_sets()
    data: dict[str, Any] = {"requests": n, "concurrency": CONCURRENCY, "ideal_rps": ideal_rps}
    with (
        workdir() as tmp,
        Server.fast(
            "--latency-ms", LATENCY_MS, "--latency-dist", "lognormal", cpus=server_cpus
        ) as server,
    ):
        path = write_requests(tmp / "requests.jsonl", n)
        db_url = sqlite_url(tmp)
        batch_id = submit(db_url, path, server.url)
        server.reset()
        ours = run_measured(
            batchrunner(db_url, "run", batch_id, "--concurrency", CONCURRENCY, "--quiet"),
            timeout_s=RUN_TIMEOUT_S,
            cpus=client_cpus,
        ).check()
        stats = server.stats()
        committed = db_count(db_url, "SELECT count(*) FROM results")
        if committed != n:
            raise RuntimeError(f"expected {n} results committed, found {committed}")
        server.reset()
        bare = run_measured(
            [
                PYTHON,
                BENCH / "bare_client.py",
                server.url + "/chat/completions",
                path,
                "--concurrency",
                CONCURRENCY,
            ],
            timeout_s=RUN_TIMEOUT_S,
            cpus=client_cpus,
        ).check()
    rps = n / ours.wall_s
    bare_rps = n / bare.wall_s
    fraction = rps / ideal_rps
    data["batchrunner"] = {
        "wall_s": ours.wall_s,
        "cpu_s": ours.cpu_s,
        "rps": rps,
        "first_request_to_exit_s": ours.ended_s - stats["first_request_s"],
        "start_up_s": stats["first_request_s"] - ours.started_s,
        "requests_seen_by_server": stats["requests_total"],
    }
    data["bare_aiohttp_loop"] = {"wall_s": bare.wall_s, "cpu_s": bare.cpu_s, "rps": bare_rps}
    figure = Figure(
        "5",
        f"latency-bound throughput, {LATENCY_MS:.0f} ms mean lognormal, concurrency {CONCURRENCY}",
        f">= {GOAL_FRACTION} x {CONCURRENCY} / 0.2 s",
        fraction,
        f"x {ideal_rps:.0f} req/s",
        fraction >= GOAL_FRACTION,
        f"{n} requests: batchrunner {rps:.0f} req/s; bare aiohttp loop {bare_rps:.0f} req/s "
        f"({bare_rps / ideal_rps:.3g} x) in the same run",
    )
    report(
        BenchResult(
            name="latency",
            title="Latency-bound throughput (goal 5)",
            command="python bench/bench_latency.py" + (" --quick" if args.quick else ""),
            quick=args.quick,
            figures=[figure],
            data=data,
        ),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
