"""Goal 8: the cost of a crash. `kill -9` a run midway, resume it, count what is sent again.

`bench/fastserver.py` answers after a lognormal 200 ms (so that many requests are in flight at
any moment) and counts, per exact body, every request it receives. The run is killed with
SIGKILL once the server has answered a given share of the batch; the server then tells how many
requests it received from the killed run (some after the kill: the client had written them and
they were on their way) and how many of them it had answered by the instant of the kill: the
difference was in flight at the kill. (Not the requests whose connection the server saw close
unanswered: answers falling due between the kill and the server noticing the closed connections
go to a dead socket, and the server counts them as answered.) A second `batchrunner run` resumes
the batch to the end.
Then:

- re-sent = requests whose exact body the server had received before (every body is distinct);
- goal: re-sent <= in flight at the kill, read two ways: (a) in flight = sent and its result not
  yet committed (sent before the kill minus results in the database after it), the reading under
  which the promise "only the requests in flight at that moment are sent again" can hold;
  (b) the strict reading, in flight = sent and not yet answered at the kill (the server's
  count above; the kill's instant is taken once the signal is sent, so that answers written
  until then count as answered).
  Answers that had arrived and were waiting for their commit are kept by the run's answer
  journal (batchrunner/journal.py) and recorded by the resuming run, which says how many.

    python bench/bench_resume.py [--quick] [--no-record]
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    BenchResult,
    Figure,
    Server,
    batchrunner,
    cpu_sets,
    db_count,
    env_for_runs,
    parse_args,
    pin,
    raise_nofile,
    report,
    run_measured,
    sqlite_url,
    submit,
    workdir,
    write_requests,
)

LATENCY_MS = 200.0
CONCURRENCY = 64
FULL_REQUESTS = 6_000
QUICK_REQUESTS = 1_500
#: Kill when the server has answered this share of the batch.
FULL_KILL_AT = (0.3, 0.5, 0.7)
QUICK_KILL_AT = (0.5,)
POLL_S = 0.01
RUN_TIMEOUT_S = 600.0
SETTLE_TIMEOUT_S = 30.0
#: What the resuming run says of the answers it recorded from the killed run's journal.
RECOVERED = re.compile(r"note: (\d+) answer\(s\) that another run received")


def _once(tmp: Path, n: int, kill_at: float, index: int) -> dict[str, Any]:
    server_cpus, client_cpus = cpu_sets()
    with Server.fast(
        "--latency-ms",
        LATENCY_MS,
        "--latency-dist",
        "lognormal",
        "--seed",
        index,
        cpus=server_cpus,
    ) as server:
        path = write_requests(tmp / f"requests{index}.jsonl", n, tag=f"r{index}-")
        db_url = sqlite_url(tmp, f"resume{index}.db")
        batch_id = submit(db_url, path, server.url)
        server.reset()
        args = batchrunner(db_url, "run", batch_id, "--concurrency", CONCURRENCY, "--quiet")
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=env_for_runs(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=pin(client_cpus),
        )
        target = int(n * kill_at)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while server.stats()["answered"] < target:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the run ended or stalled before the kill point")
            time.sleep(POLL_S)
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()  # system-wide on Linux: the server's clock too
        proc.wait()
        # The dead client's sockets close; the server counts the answers it could not send.
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while (at_kill := server.stats())["in_flight"] > 0:
            if time.monotonic() > deadline:
                raise RuntimeError("requests still in flight long after the kill")
            time.sleep(POLL_S)
        at_kill = server.stats(f"/_stats?at={killed_at!r}")
        committed = db_count(db_url, "SELECT count(*) FROM results")
        resumed = run_measured(
            batchrunner(db_url, "run", batch_id, "--concurrency", CONCURRENCY, "--quiet"),
            timeout_s=RUN_TIMEOUT_S,
            cpus=client_cpus,
        ).check()
        after = server.stats()
        final = db_count(db_url, "SELECT count(*) FROM results")
    if final != n:
        raise RuntimeError(f"expected {n} results after resuming, found {final}")
    re_sent = after["resent"] - at_kill["resent"]
    recovered = RECOVERED.search(resumed.stderr)
    return {
        "kill_at_share_answered": kill_at,
        "sent_before_kill": at_kill["requests_total"],
        # Every request of the killed run was sent before the kill, also those the server
        # read only after it.
        "in_flight_at_kill": at_kill["requests_total"] - at_kill["answered_by_at"],
        "received_after_kill": at_kill["requests_total"] - at_kill["received_by_at"],
        "closed_unanswered": at_kill["lost"],
        "answered_in_10ms_before_kill": at_kill["answered_in_10ms_before_at"],
        "committed_at_kill": committed,
        "sent_not_committed_at_kill": at_kill["requests_total"] - committed,
        "re_sent": re_sent,
        "recorded_from_journal": int(recovered.group(1)) if recovered else 0,
        "resume_wall_s": resumed.wall_s,
        "requests_total": after["requests_total"],
    }


def main() -> None:
    args = parse_args(__doc__)
    raise_nofile()
    n = QUICK_REQUESTS if args.quick else FULL_REQUESTS
    kills = QUICK_KILL_AT if args.quick else FULL_KILL_AT
    runs = []
    with workdir() as tmp:
        for i, kill_at in enumerate(kills):
            runs.append(_once(tmp, n, kill_at, i))
            r = runs[-1]
            print(
                f"kill at {kill_at:.0%}: in flight {r['in_flight_at_kill']}, "
                f"not committed {r['sent_not_committed_at_kill']}, re-sent {r['re_sent']}",
                flush=True,
            )
    re_sent = sum(r["re_sent"] for r in runs)
    in_flight = sum(r["in_flight_at_kill"] for r in runs)
    uncommitted = sum(r["sent_not_committed_at_kill"] for r in runs)
    setting = (
        f"{len(runs)} kill(s) of a {n}-request run at concurrency {CONCURRENCY}, "
        f"{LATENCY_MS:.0f} ms lognormal latency"
    )
    figures = [
        Figure(
            "8a",
            "resume after kill -9: requests re-sent vs requests sent and not yet recorded",
            "<= requests in flight at the kill",
            float(re_sent),
            f"re-sent vs {uncommitted} sent, not recorded",
            all(r["re_sent"] <= r["sent_not_committed_at_kill"] for r in runs),
            f"{setting}; a request is in flight from being sent until its result is committed",
        ),
        Figure(
            "8b",
            "resume after kill -9: requests re-sent vs requests awaiting an answer",
            "<= requests in flight at the kill",
            float(re_sent),
            f"re-sent vs {in_flight} awaiting an answer",
            all(r["re_sent"] <= r["in_flight_at_kill"] for r in runs),
            f"{setting}; the strict reading: only requests the server had not answered "
            f"({sum(r['received_after_kill'] for r in runs)} of them reached it after the kill); "
            f"{uncommitted - in_flight} answered and not yet committed, "
            f"{sum(r['recorded_from_journal'] for r in runs)} of them recorded from the answer "
            "journal (the others were still on their way into the client: "
            f"{sum(r['answered_in_10ms_before_kill'] for r in runs)} answers were written in "
            "the last 10 ms before the kills)",
        ),
    ]
    report(
        BenchResult(
            name="resume",
            title="Resume after kill -9 (goal 8)",
            command="python bench/bench_resume.py" + (" --quick" if args.quick else ""),
            quick=args.quick,
            figures=figures,
            data={"requests": n, "concurrency": CONCURRENCY, "runs": runs},
        ),
        record=not args.no_record,
    )


if __name__ == "__main__":
    main()
