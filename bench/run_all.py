"""Every benchmark, one after the other, each in its own process; then the summary table.

    python bench/run_all.py [--quick] [--no-pg] [--no-record] [--only throughput,pacing,...]

Each script records its figures in `bench/results/latest.json` and `docs/BENCHMARKS.md` as it
finishes, so a failure in one leaves the others' figures in place. The exit code is 1 when a
script broke (not when a goal was missed: missed goals are figures too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _common import BENCH, LATEST, PYTHON, REPO, fmt, load_json

BENCHES = ("throughput", "instructions", "latency", "pacing", "resume", "submit", "export")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller smoke versions")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL runs")
    parser.add_argument("--no-record", action="store_true", help="print only")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated names")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(BENCHES)}")
    flags = [
        f
        for f, on in (
            ("--quick", args.quick),
            ("--no-pg", args.no_pg),
            ("--no-record", args.no_record),
        )
        if on
    ]
    broken = []
    started = time.monotonic()
    for name in names:
        print(f"\n### bench_{name}.py {' '.join(flags)}", flush=True)
        t0 = time.monotonic()
        done = subprocess.run([PYTHON, BENCH / f"bench_{name}.py", *flags], cwd=REPO, check=False)
        print(f"### bench_{name}.py took {time.monotonic() - t0:.0f} s", flush=True)
        if done.returncode != 0:
            broken.append(name)
    print(f"\nall done in {time.monotonic() - started:.0f} s")
    if not args.no_record:
        print(f"\n{'goal':6} {'met':5} figure")
        for entry in load_json(LATEST).get("benches", {}).values():
            for fig in entry["figures"]:
                met = "-" if fig["passed"] is None else ("yes" if fig["passed"] else "NO")
                value = fmt(fig["value"])
                print(f"#{fig['goal_id']:5} {met:5} {fig['what']}: {value} {fig['unit']}")
    if broken:
        print(f"broken: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
