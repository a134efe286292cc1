"""What every benchmark shares: servers and commands in child processes, measured with the
child's own resource usage; request files; fresh databases; and recording the figures in
`bench/results/latest.json` and `docs/BENCHMARKS.md`.

Every figure is a ratio against a baseline measured in the same run, or a count: the machines
this runs on are small and shared, so absolute rates mean little from one run to the next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS_DIR = BENCH / "results"
LATEST = RESULTS_DIR / "latest.json"
#: Figures of an earlier run kept for comparison (copy latest.json here before applying a fix).
BEFORE = RESULTS_DIR / "before.json"
DOCS = REPO / "docs" / "BENCHMARKS.md"
PYTHON = sys.executable
#: PostgreSQL server for the runs that also measure it; a fresh database is made per run.
PG_ADMIN_URL = os.environ.get(
    "BATCHRUNNER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: How long a server may take to print its `listening on` line.
SERVER_START_S = 30.0
#: The key every benchmark run sends (the local servers do not check it).
API_KEY_ENV = "BENCH_API_KEY"
MODEL = "gpt-4o-mini"
KIB = 1024


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import aiohttp
    import sqlalchemy

    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "sqlite": sqlite3.sqlite_version,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    """One core for the server, another for the client, when there are two to give."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


# --------------------------------------------------------------------------- child processes


@dataclass(frozen=True, slots=True)
class Measured:
    """One child process: its exit, wall time and its own resource usage."""

    args: list[str]
    returncode: int
    #: From starting the child to reaping it.
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    stdout: str
    stderr: str
    started_s: float
    ended_s: float

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def check(self, *ok: int) -> Measured:
        if self.returncode not in (ok or (0,)):
            raise RuntimeError(
                f"{' '.join(self.args[:6])} ... exited {self.returncode}:\n{self.stderr[-3000:]}"
            )
        return self


def pin(cpus: set[int] | None) -> Any:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def env_for_runs() -> dict[str, str]:
    env = dict(os.environ)
    env[API_KEY_ENV] = "sk-bench-not-a-real-key"
    env.pop("BATCHRUNNER_DB", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_measured(
    args: Sequence[str],
    *,
    timeout_s: float,
    cpus: set[int] | None = None,
    env: dict[str, str] | None = None,
) -> Measured:
    """Run a child to its end; its CPU time and peak RSS come from `wait4`, its own figures."""
    args = [str(a) for a in args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=err,
            cwd=REPO,
            env=env or env_for_runs(),
            preexec_fn=pin(cpus),
        )
        reaped: list[tuple[int, int, Any]] = []
        waiter = threading.Thread(target=lambda: reaped.append(os.wait4(proc.pid, 0)))
        waiter.start()
        waiter.join(timeout_s)
        if waiter.is_alive():
            proc.kill()
            waiter.join()
        ended = time.monotonic()
        _, status, usage = reaped[0]
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(
            args=args,
            returncode=proc.returncode,
            wall_s=ended - started,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
            maxrss_mb=usage.ru_maxrss / KIB,  # KiB on Linux
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            started_s=started,
            ended_s=ended,
        )


class Server:
    """A server in its own process that prints `listening on URL` once it accepts."""

    def __init__(self, args: Sequence[str], *, cpus: set[int] | None = None) -> None:
        self.args = [str(a) for a in args]
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env_for_runs(),
            preexec_fn=pin(cpus),
        )
        self.url = self._wait_listening()
        self.root = self.url.rsplit("/v1", 1)[0]

    def _wait_listening(self) -> str:
        assert self.proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.append(self.proc.stdout.readline().decode())  # type: ignore[union-attr]
        )
        reader.start()
        reader.join(SERVER_START_S)
        if not lines or not lines[0].startswith("listening on "):
            self.stop()
            raise RuntimeError(f"server {self.args} did not start: {lines}")
        return lines[0].split("listening on ", 1)[1].strip()

    @classmethod
    def fast(cls, *extra: str, cpus: set[int] | None = None) -> Server:
        return cls([PYTHON, BENCH / "fastserver.py", "--port", "0", *extra], cpus=cpus)

    @classmethod
    def fake(cls, *extra: str, cpus: set[int] | None = None) -> Server:
        return cls([PYTHON, "-m", "batchrunner.fakeapi", "--port", "0", *extra], cpus=cpus)

    def stats(self, path: str = "/_stats") -> dict[str, Any]:
        with urllib.request.urlopen(self.root + path, timeout=30) as response:
            result: dict[str, Any] = orjson.loads(response.read())
        return result

    def reset(self) -> None:
        request = urllib.request.Request(self.root + "/_reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def cpu_s(self) -> float:
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- batchrunner


def batchrunner(db_url: str, *args: object) -> list[str]:
    return [PYTHON, "-P", "-m", "batchrunner", "--db", db_url, *(str(a) for a in args)]


def write_requests(path: Path, n: int, *, tag: str = "") -> Path:
    """`n` distinct plain chat-completion bodies, one per line, like a real job file."""
    head = b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"system","content":"'
    head += b'You are a concise assistant."},{"role":"user","content":"Summarise item '
    tail = b' in one sentence."}],"max_tokens":64,"temperature":0}\n'
    tag_bytes = tag.encode()
    chunk_lines = 50_000
    with path.open("wb") as f:
        for start in range(0, n, chunk_lines):
            f.write(
                b"".join(
                    head + tag_bytes + str(i).encode() + tail
                    for i in range(start, min(n, start + chunk_lines))
                )
            )
    return path


def submit(db_url: str, path: Path, base_url: str, *, timeout_s: float = 600.0) -> str:
    done = run_measured(
        batchrunner(db_url, "submit", path, "--base-url", base_url, "--api-key-env", API_KEY_ENV),
        timeout_s=timeout_s,
    ).check()
    return done.stdout.strip().splitlines()[-1]


def status(db_url: str, batch_id: str) -> dict[str, Any]:
    done = run_measured(batchrunner(db_url, "status", batch_id, "--json"), timeout_s=120).check()
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def sqlite_url(directory: Path, name: str = "bench.db") -> str:
    return f"sqlite:///{directory / name}"


def sqlite_count(db_url: str, sql: str) -> int:
    path = db_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute(sql).fetchone()[0])


def pg_available() -> bool:
    async def probe() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception:
        return False
    return True


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards; yields its plain URL."""
    import asyncpg

    name = f"bench_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def pg_count(db_url: str, sql: str) -> int:
    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(db_url, timeout=10)
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    return asyncio.run(count())


def db_count(db_url: str, sql: str) -> int:
    return sqlite_count(db_url, sql) if db_url.startswith("sqlite") else pg_count(db_url, sql)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="batchrunner-bench-") as d:
        yield Path(d)


# --------------------------------------------------------------------------- figures


@dataclass(slots=True)
class Figure:
    """One line of the table: a goal and what this run measured for it."""

    goal_id: str
    what: str
    goal: str
    value: float | None
    unit: str
    #: None: a figure to report, without a pass mark.
    passed: bool | None
    detail: str = ""


@dataclass(slots=True)
class BenchResult:
    name: str
    title: str
    command: str
    quick: bool
    figures: list[Figure]
    data: dict[str, Any] = field(default_factory=dict)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def parse_args(doc: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller smoke version")
    parser.add_argument(
        "--no-record", action="store_true", help="print only; leave results and docs as they are"
    )
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL runs")
    return parser.parse_args()


def load_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def report(result: BenchResult, *, record: bool = True) -> None:
    """Print the figures; unless told not to, merge them into latest.json and the docs."""
    mode = "quick" if result.quick else "full"
    print(f"\n== {result.title} ({mode}) ==")
    for fig in result.figures:
        mark = "" if fig.passed is None else ("  PASS" if fig.passed else "  FAIL")
        value = fmt(fig.value)
        print(f"#{fig.goal_id} {fig.what}: {value} {fig.unit} (goal: {fig.goal}){mark}")
        if fig.detail:
            print(f"    {fig.detail}")
    if not record:
        return
    latest = load_json(LATEST)
    latest.setdefault("benches", {})
    entry = asdict(result)
    entry["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    entry["machine"] = machine()
    latest["benches"][result.name] = entry
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    LATEST.write_bytes(
        orjson.dumps(latest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )
    render_docs()


# --------------------------------------------------------------------------- the docs page

_FINDINGS_START = "<!-- findings:start -->"
_FINDINGS_END = "<!-- findings:end -->"

_INTRO = """\
# Benchmarks

Performance is a feature of a batch runner. The scripts in `bench/` measure it against the goals
below and record the figures here and in `bench/results/latest.json`. The machines these run on
are small and shared, so every figure is a **ratio against a baseline measured in the same run,
or a count**; absolute rates are given for context only. (Goals 6 and 7 are set as rates; the
rate at which the same machine, in the same run, merely reads the input is given beside them.)

Each script starts its own servers on 127.0.0.1 in separate processes (on a machine with two
cores or more the server gets one core and the client another), runs `batchrunner` as a
subprocess as a user would (`python -P -m batchrunner --db URL run BATCH --quiet`: `-P` keeps
the working directory off the import path, as the installed `batchrunner` command does), reads
the child's own CPU time and peak RSS from `wait4`. Wall times are the child process's whole
life, from start to exit (interpreter start-up and the last commit included).

## How to run

    python bench/run_all.py            # everything, about 9 minutes
    python bench/run_all.py --quick    # smaller smoke versions, about 2 minutes
    python bench/bench_throughput.py   # goals 1 and 2
    python bench/bench_instructions.py # goal 2 counted: instructions per request (valgrind)
    python bench/bench_pacing.py       # goals 3 and 4
    python bench/bench_latency.py      # goal 5
    python bench/bench_submit.py       # goal 6
    python bench/bench_export.py       # goal 7
    python bench/bench_resume.py       # goal 8

Every script takes `--quick`, `--no-record` (print only) and `--no-pg` (skip the PostgreSQL
runs; they also need `BATCHRUNNER_BENCH_PG`, default
`postgresql://postgres@127.0.0.1:5432/postgres`, to reach a server that may create databases).
`bench_instructions.py` needs valgrind (it says so and records nothing without it).
The quick versions check that everything runs; their figures are not the goals' (with a
tenth of the work, start-up weighs ten times as much). To compare before and after a change:
`cp bench/results/latest.json bench/results/before.json`, apply the change, run again; the
table then has a "before" column.
"""


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _details(data: dict[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}- {key}:")
            lines.extend(_details(value, indent + "  "))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{indent}- {key}:")
            for i, item in enumerate(value):
                lines.append(f"{indent}  - [{i}]")
                lines.extend(_details(item, indent + "    "))
        elif isinstance(value, list):
            lines.append(f"{indent}- {key}: {', '.join(fmt(v) for v in value)}")
        else:
            lines.append(f"{indent}- {key}: {fmt(value)}")
    return lines


def render_docs() -> None:
    latest = load_json(LATEST).get("benches", {})
    before = load_json(BEFORE).get("benches", {})
    old_findings = ""
    if DOCS.exists():
        text = DOCS.read_text()
        if _FINDINGS_START in text and _FINDINGS_END in text:
            old_findings = text.split(_FINDINGS_START, 1)[1].split(_FINDINGS_END, 1)[0]
    figures: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    before_by_goal: dict[str, dict[str, Any]] = {}
    for entry in before.values():
        for fig in entry.get("figures", []):
            before_by_goal[fig["goal_id"] + fig["what"]] = fig
    for entry in latest.values():
        for fig in entry.get("figures", []):
            figures.append((fig["goal_id"], fig, entry))
    figures.sort(key=lambda t: (float(t[0].split(".")[0].rstrip("abcdefgh")), t[0]))

    out = [_INTRO, "## Latest figures\n"]
    has_before = bool(before_by_goal)
    head = "| # | what | goal | figure | met | " + ("before | " if has_before else "") + "run |"
    out.append(head)
    out.append("|" + "---|" * (head.count("|") - 1))
    for goal_id, fig, entry in figures:
        met = "-" if fig["passed"] is None else ("yes" if fig["passed"] else "**no**")
        value = f"{fmt(fig['value'])} {fig['unit']}".strip()
        row = f"| {goal_id} | {fig['what']} | {fig['goal']} | {value} | {met} | "
        if has_before:
            old = before_by_goal.get(fig["goal_id"] + fig["what"])
            row += (f"{fmt(old['value'])} {old['unit']}" if old else "-") + " | "
        mode = "quick" if entry["quick"] else "full"
        row += f"{entry['date']}, {mode} |"
        out.append(row)
    machines = {orjson.dumps(e["machine"]["cpu_model"]): e["machine"] for e in latest.values()}
    out.append("\n## Machine\n")
    for m in machines.values():
        out.append(
            f"- nproc {m['nproc']} ({m['cpus_usable']} usable), {m['cpu_model']}, "
            f"Python {m['python']}, {m['platform']}; aiohttp {m['aiohttp']}, "
            f"SQLAlchemy {m['sqlalchemy']}, SQLite {m['sqlite']}"
        )
    out.append("\n## Findings\n")
    out.append(_FINDINGS_START + (old_findings or "\n(none yet)\n") + _FINDINGS_END)
    out.append("\n## Details of the latest runs\n")
    for name in sorted(latest):
        entry = latest[name]
        mode = "quick" if entry["quick"] else "full"
        out.append(f"### {entry['title']}\n")
        out.append(
            f"`{entry['command']}` ({mode}, {entry['date']}; load average at start "
            f"{', '.join(str(x) for x in entry['machine']['loadavg_at_start'])})\n"
        )
        for fig in entry["figures"]:
            if fig["detail"]:
                out.append(f"- #{fig['goal_id']}: {fig['detail']}")
        out.extend(_details(entry["data"]))
        out.append("")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text("\n".join(out).rstrip() + "\n")


def raise_nofile() -> None:
    """High concurrency needs more sockets than the common soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 65_536):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65_536), hard))
