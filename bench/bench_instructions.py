"""Goal 2, counted instead of timed: instructions per request under valgrind, against the bare
aiohttp loop of goal 1.

Wall and CPU time on a shared machine move by a quarter from one run to the next; the number
of instructions a process executes moves by a few tenths of a percent. Each side (the bare loop
of `bench/bare_client.py`, and `batchrunner run BATCH` on SQLite) runs twice under
`valgrind --tool=cachegrind --cache-sim=no` against `bench/fastserver.py`: with a small and a
large request file. The difference gives the instructions per request; what is left of the
small run, the start-up. Both threads of the client are counted (valgrind runs them one at a
time); the kernel's work (system calls) is not, and neither is the server's.

A change to the dispatch path shows here as a figure that another run reproduces, where goal 1's
ratio needs many alternated runs to tell 2 % from the noise.

    python bench/bench_instructions.py [--quick] [--no-record]

Without valgrind on the PATH it says so and records nothing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    PYTHON,
    BenchResult,
    Figure,
    Server,
    batchrunner,
    cpu_sets,
    parse_args,
    ratio,
    report,
    run_measured,
    sqlite_url,
    submit,
    workdir,
    write_requests,
)

FULL_REQUESTS = (200, 2_000)
QUICK_REQUESTS = (100, 500)
CONCURRENCY = 64
#: Goal 1's request count, for the ratio the counts alone would give there.
GOAL_1_REQUESTS = 20_000
RUN_TIMEOUT_S = 900.0
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _instructions(valgrind: str, args: list[Any], cpus: set[int] | None) -> int:
    done = run_measured(
        [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *args],
        timeout_s=RUN_TIMEOUT_S,
        cpus=cpus,
    ).check()
    found = _REFS.findall(done.stderr)
    if not found:
        raise RuntimeError(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(found[-1].replace(",", ""))


def _bare(valgrind: str, server: Server, path: Path, cpus: set[int] | None) -> int:
    url = server.url + "/chat/completions"
    args = [PYTHON, BENCH / "bare_client.py", url, path, "--concurrency", CONCURRENCY]
    return _instructions(valgrind, args, cpus)


def _ours(valgrind: str, server: Server, path: Path, db_url: str, cpus: set[int] | None) -> int:
    batch_id = submit(db_url, path, server.url)
    args = batchrunner(db_url, "run", batch_id, "--concurrency", CONCURRENCY, "--quiet")
    return _instructions(valgrind, args, cpus)


def _split(small: int, large: int, sizes: tuple[int, int]) -> tuple[float, float]:
    """Instructions per request and for the start-up, from a small and a large run."""
    per_request = (large - small) / (sizes[1] - sizes[0])
    return per_request, small - sizes[0] * per_request


def main() -> None:
    args = parse_args(__doc__)
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("valgrind is not installed: no instruction counts (apt-get install valgrind)")
        return
    sizes = QUICK_REQUESTS if args.quick else FULL_REQUESTS
    server_cpus, client_cpus = cpu_sets()
    counts: dict[str, list[int]] = {"bare": [], "batchrunner": []}
    with workdir() as tmp, Server.fast(cpus=server_cpus) as server:
        for n in sizes:
            path = write_requests(tmp / f"requests-{n}.jsonl", n)
            counts["bare"].append(_bare(valgrind, server, path, client_cpus))
            db_url = sqlite_url(tmp, f"run-{n}.db")
            counts["batchrunner"].append(_ours(valgrind, server, path, db_url, client_cpus))
            print(
                f"{n} requests: bare loop {counts['bare'][-1]:,}, "
                f"batchrunner {counts['batchrunner'][-1]:,} instructions",
                flush=True,
            )
    bare_per, bare_start = _split(*counts["bare"], sizes)
    ours_per, ours_start = _split(*counts["batchrunner"], sizes)
    per_request = ratio(ours_per, bare_per)
    at_goal_1 = ratio(
        bare_start + GOAL_1_REQUESTS * bare_per, ours_start + GOAL_1_REQUESTS * ours_per
    )
    report(
        BenchResult(
            name="instructions",
            title="Instructions per request (goal 2, counted)",
            command="python bench/bench_instructions.py" + (" --quick" if args.quick else ""),
            quick=args.quick,
            figures=[
                Figure(
                    "2c",
                    "instructions per request (valgrind), SQLite, against the bare loop",
                    "report; lower is better",
                    per_request,
                    "x bare loop",
                    None,
                    f"batchrunner {ours_per / 1e3:.0f} k a request, bare aiohttp loop "
                    f"{bare_per / 1e3:.0f} k; start-up {ours_start / 1e6:.0f} M against "
                    f"{bare_start / 1e6:.0f} M; at goal 1's {GOAL_1_REQUESTS:,} requests the "
                    f"counts alone would give {at_goal_1:.3g} x (system calls, cache misses "
                    "and the second thread's hand-offs are not in them)",
                )
            ],
            data={
                "requests": list(sizes),
                "concurrency": CONCURRENCY,
                "instructions": counts,
                "per_request": {"bare": bare_per, "batchrunner": ours_per},
                "start_up": {"bare": bare_start, "batchrunner": ours_start},
                "goal_1_from_counts": at_goal_1,
            },
        ),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
