"""The command line as users and scripts see it: output streams, JSON, exit codes, signals."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from batchrunner.cli import _file_aside, cli
from batchrunner.database import SCHEMA_HEAD
from batchrunner.errors import UsageError
from batchrunner.fakeapi import FakeConfig, FakeServerThread
from batchrunner.report import fails_again
from tests.conftest import chat, run_cli, started_cli

MakeFile = Callable[..., Path]


def _commands() -> list[list[str]]:
    out = []
    for name, cmd in cli.commands.items():
        sub = getattr(cmd, "commands", None)
        if sub:
            out.extend([name, s] for s in sub)
        out.append([name])
    return out


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "batchrunner" in result.output.split("Example", 1)[1]


def test_contract_commands_exist() -> None:
    assert {"submit", "run", "status", "export", "retry", "cancel", "estimate"} <= set(cli.commands)


@pytest.fixture
def server() -> Iterator[FakeServerThread]:
    with FakeServerThread(FakeConfig(latency_ms=5)) as srv:
        yield srv


def test_submit_prints_only_the_batch_id(make_file: MakeFile, sqlite_url: str) -> None:
    path = make_file([chat(f"q{i}") for i in range(5)])
    first = run_cli("submit", str(path), "--name", "five", db=sqlite_url)
    assert first.returncode == 0, first.stderr
    (batch_id,) = first.stdout.splitlines()
    assert batch_id.startswith("batch_") and "loaded 5 job(s)" in first.stderr
    again = run_cli("submit", str(path), db=sqlite_url)
    assert again.stdout.strip() == batch_id and "nothing added" in again.stderr

    status = run_cli("status", batch_id, "--json", db=sqlite_url)
    doc = orjson.loads(status.stdout)
    assert doc["batch"] == batch_id and doc["name"] == "five" and doc["total"] == 5
    assert doc["counts"] == {
        "pending": 5,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    listing = run_cli("status", db=sqlite_url)
    assert batch_id in listing.stdout and "five" in listing.stdout


def test_a_bad_line_exits_2_with_its_line_number(make_file: MakeFile, sqlite_url: str) -> None:
    path = make_file([chat("a"), b"{oops", chat("c")])
    result = run_cli("submit", str(path), db=sqlite_url)
    assert result.returncode == 2
    assert f"{path}:2:" in result.stderr and "invalid JSON" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    listing = run_cli("status", db=sqlite_url)
    assert "no batches" in listing.stdout


def test_unknown_batch_is_a_usage_error(make_file: MakeFile, sqlite_url: str) -> None:
    assert run_cli("submit", str(make_file([chat("a")])), db=sqlite_url).returncode == 0
    result = run_cli("status", "batch_nope", db=sqlite_url)
    assert result.returncode == 2 and "no batch 'batch_nope'" in result.stderr


def test_run_exit_codes(make_file: MakeFile, sqlite_url: str, server: FakeServerThread) -> None:
    ok = make_file([chat(f"ok {i}") for i in range(20)])
    result = run_cli("run", str(ok), "--quiet", db=sqlite_url, env={"OPENAI_BASE_URL": server.url})
    assert result.returncode == 0, result.stderr
    assert "20 succeeded and 0 failed" in result.stderr

    some_fail = make_file([chat("fine"), chat("[[fault:400]] bad")])
    result = run_cli(
        "run", str(some_fail), "--quiet", db=sqlite_url, env={"OPENAI_BASE_URL": server.url}
    )
    assert result.returncode == 3, result.stderr


def test_bad_key_exits_1_and_jobs_stay_pending(make_file: MakeFile, sqlite_url: str) -> None:
    with FakeServerThread(FakeConfig(api_key="sk-right")) as srv:
        path = make_file([chat(f"q{i}") for i in range(10)])
        batch_id = run_cli("submit", str(path), "--base-url", srv.url, db=sqlite_url).stdout.strip()
        result = run_cli(
            "run", batch_id, "--quiet", db=sqlite_url, env={"OPENAI_API_KEY": "sk-wrong-key-123"}
        )
    assert result.returncode == 1
    assert "401" in result.stderr and "sk-wrong-key-123" not in result.stderr + result.stdout
    status = orjson.loads(run_cli("status", batch_id, "--json", db=sqlite_url).stdout)
    assert status["counts"]["pending"] == 10


def test_status_prices_a_model_from_the_price_file_as_export_does(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    path = make_file([chat(f"q{i}", model="acme-llm") for i in range(3)])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 0
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."acme-llm"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n')

    unpriced = orjson.loads(run_cli("status", batch_id, "--json", db=sqlite_url).stdout)
    assert unpriced["unpriced_models"] == ["acme-llm"]
    priced = run_cli("status", batch_id, "--json", "--prices", str(prices), db=sqlite_url)
    status = orjson.loads(priced.stdout)
    assert status["unpriced_models"] == []
    exported = run_cli("export", batch_id, "--prices", str(prices), db=sqlite_url).stdout
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert len(rows) == 3
    assert status["cost_usd"] == pytest.approx(sum(float(r["cost_usd"]) for r in rows))
    assert status["cost_usd"] > 0


@pytest.mark.parametrize("command", ["estimate", "status", "export", "run"])
def test_a_bad_price_file_is_a_usage_error_for_every_command(
    command: str, make_file: MakeFile, sqlite_url: str, tmp_path: Path
) -> None:
    path = make_file([chat("q")])
    batch_id = run_cli("submit", str(path), db=sqlite_url).stdout.strip()
    prices = tmp_path / "prices.toml"
    prices.write_text("[gpt-4o]\ninput_per_mtok = 1\n")
    env = {"OPENAI_API_KEY": "sk-test"}
    result = run_cli(command, batch_id, "--prices", str(prices), db=sqlite_url, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"Error: {prices}: unknown key 'gpt-4o'; prices go under [models.\"NAME\"]"
    )


@pytest.mark.parametrize("flag", ["--rpm", "--tpm", "--timeout", "--max-cost", "--lease"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e400"])
def test_a_number_flag_that_is_no_number_is_a_usage_error(
    flag: str, value: str, sqlite_url: str
) -> None:
    result = run_cli("run", "batch_0123456789abcdef", flag, value, db=sqlite_url)
    assert result.returncode == 2, result.stderr
    assert f"Invalid value for '{flag}'" in result.stderr
    assert "finite" in result.stderr or "not in the range" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_request_file_that_cannot_be_read_says_why(tmp_path: Path, sqlite_url: str) -> None:
    folder = tmp_path / "requests.jsonl"
    folder.mkdir()
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    gzipped = tmp_path / "requests.jsonl.gz"
    gzipped.write_bytes(gzip.compress(orjson.dumps(chat("q")) + b"\n"))
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes((orjson.dumps(chat("q")).decode() + "\n").encode("utf-16"))
    for target, reason in [
        (folder, "is a directory"),
        (pipe, "is not a regular file"),
        (tmp_path / "missing.jsonl", "no such file"),
        (gzipped, "is gzip-compressed"),
        (utf16, "is UTF-16 text"),
    ]:
        for command in ["submit", "run", "estimate"]:
            result = run_cli(command, str(target), db=sqlite_url)
            assert result.returncode == 2, (command, result.stderr)
            assert reason in result.stderr, (command, result.stderr)
            assert "Traceback" not in result.stderr
    # A folder named without a path ("no batch 'requests' in this database" before), and
    # standard input ("no such file: -").
    (tmp_path / "requests").mkdir()
    for target, reason in [("requests", "is a directory"), ("-", "not standard input")]:
        for command in ["submit", "run", "estimate"]:
            result = run_cli(command, target, db=sqlite_url, cwd=tmp_path)
            assert result.returncode == 2, (command, result.stderr)
            assert reason in result.stderr, (command, result.stderr)
    # `estimate` of a file opens no database: none is made for it.
    unused = tmp_path / "unused.db"
    assert run_cli("estimate", str(folder), db=f"sqlite:///{unused}").returncode == 2
    assert not unused.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "batch_0123456789abcdef"],
        ["export", "batch_0123456789abcdef"],
        ["estimate", "batch_0123456789abcdef"],
        ["retry", "batch_0123456789abcdef"],
        ["cancel", "batch_0123456789abcdef"],
        ["run", "batch_0123456789abcdef"],
    ],
)
def test_a_command_about_what_was_submitted_makes_no_database(
    command: list[str], tmp_path: Path
) -> None:
    """A mistyped --db made an empty database there, and the command reported that it held
    no batch; it now says there is no database, and leaves none."""
    typo = tmp_path / "jbos.db"
    result = run_cli(*command, db=f"sqlite:///{typo}")
    assert result.returncode == 2, result.stderr
    assert f"no database at {typo}" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_path_it_cannot_write_says_why_and_leaves_nothing(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    path = make_file([chat(f"q{i}") for i in range(3)])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 0
    before = sorted(tmp_path.iterdir())

    result = run_cli("export", batch_id, "-o", str(tmp_path / "nowhere" / "out.csv"), db=sqlite_url)
    assert result.returncode == 2 and "cannot write" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

    unknown = run_cli("export", "batch_nope", "-o", str(tmp_path / "out.csv"), db=sqlite_url)
    assert unknown.returncode == 2 and "no batch 'batch_nope'" in unknown.stderr
    assert sorted(tmp_path.iterdir()) == before  # no file, no partial one


def test_export_over_the_job_database_is_refused(
    make_file: MakeFile, server: FakeServerThread, tmp_path: Path
) -> None:
    """`-o jobs.db` for `--db sqlite:///jobs.db` (a slip between two flags) replaced the
    database with the CSV, "exported 3 row(s)", exit 0: every prompt and answer gone."""
    path = make_file([chat(f"q{i}") for i in range(3)])
    database = tmp_path / "jobs.db"
    url = f"sqlite:///{database}"
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=url).returncode == 0
    (tmp_path / "link.db").symlink_to(database)
    os.link(database, tmp_path / "hard.db")
    uri = f"sqlite:///file:{database}?uri=true"
    for output, db in (
        (str(database), url),
        ("jobs.db", url),
        # Not there now: SQLite would take it for its own (a CSV named as the rollback
        # journal was deleted as a hot one by the next command).
        ("jobs.db-journal", url),
        (str(tmp_path / "jobs.db-answers" / "x.csv"), url),
        (str(tmp_path / "link.db"), url),
        (str(tmp_path / "hard.db"), url),
        (str(database) + "-wal", url),
        (str(database), uri),
    ):
        result = run_cli("export", batch_id, "-o", output, db=db, cwd=tmp_path)
        assert (result.returncode, result.stderr.strip()) == (
            2,
            f"Error: cannot write {output}: it is the job database's own file",
        )
    status = run_cli("status", batch_id, "--json", db=url)
    assert orjson.loads(status.stdout)["counts"]["succeeded"] == 3, status.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # Another file beside it is written as ever.
    assert run_cli("export", batch_id, "-o", "jobs.csv", db=url, cwd=tmp_path).returncode == 0


def test_skip_invalid_is_for_a_file(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread
) -> None:
    """`run BATCH_ID --skip-invalid` was accepted and meant nothing."""
    path = make_file([chat("a")])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    result = run_cli("run", batch_id, "--skip-invalid", "--quiet", db=sqlite_url)
    assert result.returncode == 2
    assert "--skip-invalid is for a request FILE" in result.stderr, result.stderr
    assert (
        orjson.loads(run_cli("status", batch_id, "--json", db=sqlite_url).stdout)["counts"][
            "pending"
        ]
        == 1
    ), "nothing was sent"


def test_bom_is_for_csv_files(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """--bom with --format jsonl (or --as-requests) was silently ignored, and with --invalid
    the CSV had none."""
    path = make_file([chat("a"), {"oops": 1}])
    batch_id = run_cli(
        "submit", str(path), "--skip-invalid", "--base-url", server.url, db=sqlite_url
    ).stdout.strip()
    for extra in (["--format", "jsonl"], ["--as-requests"]):
        result = run_cli("export", batch_id, "--bom", *extra, db=sqlite_url)
        assert result.returncode == 2
        assert "--bom starts a CSV file" in result.stderr, result.stderr
    out = tmp_path / "bad.csv"
    assert (
        run_cli("export", batch_id, "--invalid", "--bom", "-o", str(out), db=sqlite_url).returncode
        == 0
    )
    assert out.read_bytes().startswith(b"\xef\xbb\xbfline,reason\r\n2,")


def test_export_to_a_jsonl_file_writes_json_lines_unless_told_otherwise(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """`-o results.jsonl` without --format wrote CSV into it, exit 0, and a JSON reader failed
    on its first line. The name chooses JSONL now; --format still decides when given."""
    path = make_file([chat(f"q{i}") for i in range(2)])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 0
    for name in ("results.jsonl", "RESULTS.NDJSON"):
        out = tmp_path / name
        assert run_cli("export", batch_id, "-o", str(out), db=sqlite_url).returncode == 0
        records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert [r["custom_id"] for r in records] == ["line-1", "line-2"]
    told = tmp_path / "told.jsonl"
    given = run_cli("export", batch_id, "--format", "csv", "-o", str(told), db=sqlite_url)
    assert given.returncode == 0
    assert told.read_text().startswith("custom_id,")
    plain = tmp_path / "results.csv"
    assert run_cli("export", batch_id, "-o", str(plain), db=sqlite_url).returncode == 0
    assert plain.read_text().startswith("custom_id,")
    bom = run_cli("export", batch_id, "--bom", "-o", str(tmp_path / "b.jsonl"), db=sqlite_url)
    assert bom.returncode == 2 and "--bom starts a CSV file" in bom.stderr


def test_export_to_a_pipe_writes_into_the_pipe(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """A pipe or a device is written as it is: an export written aside and renamed over it
    replaced it with a file (as root, `-o /dev/null` replaced /dev/null)."""
    path = make_file([chat(f"q{i}") for i in range(3)])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 0
    pipe = tmp_path / "results.pipe"
    os.mkfifo(pipe)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    result = run_cli("export", batch_id, "-o", str(pipe), db=sqlite_url)
    reader.join(timeout=30)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert received and received[0].decode().count("\n") == 4  # the header and three rows


def test_export_to_dev_stdout_writes_through_the_descriptor(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """`export B -o /dev/stdout >> all.csv` replaced all.csv (its earlier lines lost), and to a
    pipe failed on its name (/proc/PID/fd/pipe:[N]); with stdout closed, a traceback."""
    path = make_file([chat(f"q{i}") for i in range(3)])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 0
    alone = run_cli("export", batch_id, db=sqlite_url).stdout
    assert alone.count("\n") == 4  # the header and three rows

    command = [sys.executable, "-m", "batchrunner", "--db", sqlite_url, "export", batch_id]
    for name in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1", "//dev/stdout"):
        combined = tmp_path / "all.csv"
        combined.write_text("EARLIER\n")
        inode = combined.stat().st_ino
        with combined.open("a") as out:
            done = subprocess.run([*command, "-o", name], stdout=out, timeout=60)
        assert done.returncode == 0
        assert combined.stat().st_ino == inode
        assert combined.read_text() == "EARLIER\n" + alone
        piped = subprocess.run([*command, "-o", name], capture_output=True, text=True, timeout=60)
        assert (piped.returncode, piped.stdout) == (0, alone), piped.stderr

    closed = run_cli("export", batch_id, db=sqlite_url, preexec_fn=lambda: os.close(1))
    assert closed.returncode == 2
    assert closed.stderr.strip() == "Error: standard output is closed: name a file with -o FILE"
    # A number nobody opened was, by the time it was written, the database's own file: the
    # CSV went over SQLite's first page ("exported 0 row(s)", exit 0; then no command worked).
    for fd in range(3, 9):
        unopened = run_cli("export", batch_id, "-o", f"/dev/fd/{fd}", db=sqlite_url)
        assert unopened.returncode == 2
        assert "no such open file descriptor" in unopened.stderr
    assert run_cli("export", batch_id, db=sqlite_url).stdout == alone
    (tmp_path / "input").write_text("")
    with (tmp_path / "input").open() as reading:
        done = subprocess.run([*command, "-o", "/dev/fd/0"], stdin=reading.fileno(),
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (done.returncode, done.stderr.strip()) == (
        2,
        "Error: cannot write /dev/fd/0: it is open for reading only",
    )
    # The commands whose output is their point say so too, before doing anything (submit
    # loaded the batch, exit 0, its id lost).
    again = make_file([chat("new")])
    for args, why in (
        (["submit", str(again)], "the batch id could not be printed"),
        (["status", batch_id], "nothing could be shown"),
        (["estimate", batch_id], "nothing could be shown"),
    ):
        closed = run_cli(*args, db=sqlite_url, preexec_fn=lambda: os.close(1))
        assert (closed.returncode, closed.stderr.strip()) == (
            2,
            f"Error: standard output is closed: {why}",
        )
    assert run_cli("status", db=sqlite_url).stdout.count("batch_") == 1, "nothing was loaded"


def test_export_to_a_symbolic_link_writes_where_it_points(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """Before, the export was renamed over the link: the link became a file, and the file
    it pointed to kept its old content."""
    path = make_file([chat(f"q{i}") for i in range(3)])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 0
    (tmp_path / "real").mkdir()
    existing, dangling = tmp_path / "real" / "results.csv", tmp_path / "real" / "new.csv"
    existing.write_text("old\n")
    for real in (existing, dangling):
        link = tmp_path / f"link-to-{real.name}"
        link.symlink_to(real)
        result = run_cli("export", batch_id, "-o", str(link), db=sqlite_url)
        assert result.returncode == 0, result.stderr
        assert link.is_symlink() and link.resolve() == real
        assert real.read_text().count("\n") == 4  # the header and three rows
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["new.csv", "results.csv"]
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    result = run_cli("export", batch_id, "-o", str(loop), db=sqlite_url)
    assert result.returncode == 2 and "cannot write" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and loop.is_symlink()


def test_a_run_stopped_by_a_bad_key_says_nothing_of_lost_jobs(
    make_file: MakeFile, sqlite_url: str
) -> None:
    """The jobs claimed and not sent go back at the run's end; the feeder, waiting for the
    last jobs to end, took them for jobs it had lost track of and said so."""
    with FakeServerThread(FakeConfig(api_key="right-key")) as srv:
        path = make_file([chat(f"q{i}") for i in range(3)])
        env = {"OPENAI_API_KEY": "wrong-key"}
        for _ in range(5):  # (it said so in about two runs of three)
            result = run_cli("run", str(path), "--base-url", srv.url, db=sqlite_url, env=env)
            assert result.returncode == 1 and "rejected the key" in result.stderr
            assert "lost track" not in result.stderr, result.stderr


def test_the_jobs_that_did_not_succeed_come_out_as_a_request_file(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """Failed jobs, and cancelled ones (which `retry` does not take back): before, only the
    failed came out, and a cancelled batch's requests could not be had to send again."""
    rows = [chat("ok"), chat("[[fault:400]] bad", metadata={"k": 1}), chat("later")]
    path = make_file(rows)
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 3
    again = make_file([chat("never sent 1"), chat("never sent 2")])
    cancelled = run_cli("submit", str(again), db=sqlite_url).stdout.strip()
    assert run_cli("cancel", cancelled, db=sqlite_url).returncode == 0

    lines = []
    for batch in (batch_id, cancelled):
        out = run_cli("export", batch, "--as-requests", db=sqlite_url)
        assert out.returncode == 0, out.stderr
        lines.append([orjson.loads(line) for line in out.stdout.splitlines()])
    assert lines[0] == [
        {"custom_id": "line-2", "method": "POST", "url": "/v1/chat/completions",
         "body": chat("[[fault:400]] bad"), "metadata": {"k": 1}},
    ]  # fmt: skip
    assert [line["body"] for line in lines[1]] == [chat("never sent 1"), chat("never sent 2")]
    resubmit = tmp_path / "again.jsonl"
    assert (
        run_cli("export", cancelled, "--as-requests", "-o", str(resubmit), db=sqlite_url).returncode
        == 0
    )
    assert run_cli("submit", str(resubmit), db=sqlite_url).returncode == 0

    csv_asked = run_cli("export", batch_id, "--as-requests", "--format", "csv", db=sqlite_url)
    assert csv_asked.returncode == 2 and "not --format csv" in csv_asked.stderr
    # What it writes, asked for; and the failed only, asked for.
    both = run_cli(
        "export", cancelled, "--as-requests", "--format", "jsonl", "--failed", db=sqlite_url
    )
    assert both.returncode == 0 and both.stdout == ""


def test_retry_says_which_failures_will_fail_again(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread
) -> None:
    """It put a 400 back beside a 500 without a word: the 400 was sent (and paid for) again,
    and failed again."""
    rows = [chat("[[fault:400]] bad"), chat("[[fault:500]] down"), chat("fine")]
    path = make_file(rows)
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    ran = run_cli("run", batch_id, "--quiet", "--max-attempts", "1", db=sqlite_url)
    assert ran.returncode == 3, ran.stderr
    result = run_cli("retry", batch_id, db=sqlite_url)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == (
        f"2 failed job(s) of {batch_id} are pending again (http_400 1, server_error 1)"
    )
    assert lines[1].startswith("note: 1 of them failed for what sending the same request again")
    assert "(http_400 1)" in lines[1]
    again = run_cli("retry", batch_id, db=sqlite_url)
    assert again.stderr.strip() == f"0 failed job(s) of {batch_id} are pending again"


@pytest.mark.parametrize(
    ("kind", "again"),
    [
        ("http_400", True),
        ("flagged", True),  # the input moderation refused
        ("request_too_large", True),
        ("http_429", False),
        ("server_error", False),
        ("choice_error", False),  # the model failed part way
    ],
)
def test_which_failures_fail_again(kind: str, again: bool) -> None:
    assert fails_again(kind) is again


def test_a_folder_named_as_a_batch_is_not_taken_for_a_request_file(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """A folder of a batch's exports, named as the batch: `run` and `estimate` of the batch
    said it was a folder, not a request file."""
    path = make_file([chat("q")])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    (tmp_path / batch_id).mkdir()
    for command in ("run", "estimate"):
        result = run_cli(command, batch_id, "--quiet" if command == "run" else "--json",
                         db=sqlite_url, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, (command, result.stderr)


def test_export_over_a_file_keeps_its_mode_and_two_at_once_keep_apart(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """A file kept private (0600) became readable by others (0644): the export was a new
    file renamed over it. And every export to one PATH wrote the same hidden file: two at
    once wrote into each other's, and one said it had succeeded."""
    path = make_file([chat(f"q{i}") for i in range(3)])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 0
    out = tmp_path / "private.csv"
    out.write_text("old\n")
    out.chmod(0o600)
    result = run_cli("export", batch_id, "-o", str(out), db=sqlite_url)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().count("\n") == 4  # the header and three rows

    first, f1 = _file_aside(out)
    second, f2 = _file_aside(out)
    with f1, f2:
        assert first != second and first.parent == second.parent == tmp_path
        assert first.name.startswith(".private.csv.") and first.name.endswith(".partial")
        assert stat.S_IMODE(first.stat().st_mode) == 0o600
    new = tmp_path / "new.csv"
    made, f3 = _file_aside(new)
    with f3:
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(made.stat().st_mode) == 0o666 & ~umask


def _usual_umask() -> None:
    os.umask(0o022)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a link another user's needs root")
def test_export_replaces_no_link_or_file_another_user_made_in_a_shared_folder(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread, tmp_path: Path
) -> None:
    """In /tmp, another user's link named as the export replaced the file it pointed to (the
    export renames over the target: the kernel's protected_symlinks never saw a link)."""
    path = make_file([chat("q")])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    planted = shared / "results.csv"
    planted.symlink_to(victim)
    os.lchown(planted, 65534, 65534)
    result = run_cli("export", batch_id, "-o", str(planted), db=sqlite_url)
    assert result.returncode == 2 and "another user made" in result.stderr
    assert victim.read_text() == "mine\n"
    # One's own link there is followed, as before.
    os.lchown(planted, os.geteuid(), os.getegid())
    assert run_cli("export", batch_id, "-o", str(planted), db=sqlite_url).returncode == 0
    assert victim.read_text().startswith("custom_id")
    # Another user's file there is not replaced: the export took its mode, 0666, and that
    # user could read every prompt and answer.
    open_to_all = shared / "open.csv"
    open_to_all.write_text("theirs\n")
    open_to_all.chmod(0o666)
    os.chown(open_to_all, 65534, 65534)
    result = run_cli("export", batch_id, "-o", str(open_to_all), db=sqlite_url)
    assert result.returncode == 2 and "another user made" in result.stderr
    assert open_to_all.read_text() == "theirs\n"
    # Elsewhere another user's file is replaced, no wider than it was nor than a new one:
    # kept private it stays so (it became 0644), open to all it does not stay so.
    for before, after in ((0o600, 0o600), (0o666, 0o644)):
        colleague = tmp_path / f"colleague-{before:o}.csv"
        colleague.write_text("theirs\n")
        colleague.chmod(before)
        os.chown(colleague, 4242, 4242)
        done = run_cli(
            "export", batch_id, "-o", str(colleague), db=sqlite_url, preexec_fn=_usual_umask
        )
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(colleague.stat().st_mode) == after


@pytest.mark.skipif(
    not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
    reason="needs Linux's /dev/full",
)
def test_a_full_disk_under_an_export_is_an_error_not_a_traceback(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread
) -> None:
    path = make_file([chat(f"q{i}") for i in range(3)])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=sqlite_url).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=sqlite_url).returncode == 0
    result = run_cli("export", batch_id, "-o", "/dev/full", db=sqlite_url)
    assert result.returncode == 1
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def _grow(db_file: Path, batch_id: str, jobs: int) -> None:
    """The batch's one succeeded job copied until it has `jobs`, each with its result."""
    with contextlib.closing(sqlite3.connect(db_file, isolation_level=None)) as conn:
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO jobs (batch_id, line, custom_id, method, endpoint, body, meta, model,"
            " stream, est_tokens, state, attempts, created_at, updated_at, finished_at)"
            " WITH RECURSIVE s(i) AS (SELECT 2 UNION ALL SELECT i + 1 FROM s WHERE i < :n)"
            " SELECT batch_id, i, 'copy-' || i, method, endpoint, body, meta, model, stream,"
            " est_tokens, state, attempts, created_at, updated_at, finished_at"
            " FROM s, jobs WHERE batch_id = :b",
            {"n": jobs, "b": batch_id},
        )
        conn.execute(
            "INSERT INTO results (job_id, batch_id, status_code, response, request_id, model,"
            " prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens,"
            " schema_valid, latency_ms, attempts, finished_at)"
            " SELECT j.id, r.batch_id, r.status_code, r.response, r.request_id, r.model,"
            " r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.reasoning_tokens,"
            " r.total_tokens, r.schema_valid, r.latency_ms, r.attempts, r.finished_at"
            " FROM jobs j JOIN results r ON r.batch_id = j.batch_id AND r.job_id <> j.id"
            " WHERE j.batch_id = :b",
            {"b": batch_id},
        )
        conn.execute("UPDATE batches SET total_jobs = :n WHERE id = :b", {"n": jobs, "b": batch_id})
        conn.execute("COMMIT")


@pytest.mark.slow
@pytest.mark.parametrize(
    "sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["foreground", "background-job"]
)
def test_sigterm_stops_an_export_as_ctrl_c_does_and_leaves_no_file(
    make_file: MakeFile, tmp_path: Path, server: FakeServerThread, sigint: Any
) -> None:
    """`kill`, `timeout` or a service manager's stop (SIGTERM to the whole process group, the
    export's worker processes too): the export is written aside, and its hidden file was left
    behind as large as it had grown. Also from a background job of a script, which has Ctrl-C
    ignored."""
    db_file = tmp_path / "jobs.db"
    db = f"sqlite:///{db_file}"
    path = make_file([chat("q")])
    batch_id = run_cli("submit", str(path), "--base-url", server.url, db=db).stdout.strip()
    assert run_cli("run", batch_id, "--quiet", db=db).returncode == 0
    _grow(db_file, batch_id, 300_000)
    out = tmp_path / "exports" / "results.csv"
    out.parent.mkdir()
    export = ("export", batch_id, "-o", str(out))
    with started_cli(*export, db=db, sigint=sigint, process_group=0) as proc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(out.parent.glob(f".{out.name}.*.partial"))
            if partial and partial[0].stat().st_size > 0:
                break
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted"
    assert list(out.parent.iterdir()) == []


#: A command started as the `batchrunner` script starts it, with a signal (if named) sent to it
#: while it imports its command line (a few tenths of a second, before the command line's own
#: handlers); at exit it says which SIGTERM handler was in place, and which signals blocked.
_SIGNALLED_WHILE_IMPORTING = """
import atexit, builtins, os, signal, sys, time
from batchrunner.__main__ import main
signum = getattr(signal, sys.argv[1], None)
real_import = builtins.__import__
def importing(name, *args, **kwargs):
    if name == "click" and signum is not None:
        os.kill(os.getpid(), signum)
        time.sleep(0.2)
    return real_import(name, *args, **kwargs)
builtins.__import__ = importing
def said():
    handler = signal.getsignal(signal.SIGTERM)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    print(getattr(handler, "__qualname__", handler), sorted(s.name for s in blocked))
atexit.register(said)
sys.argv = ["batchrunner", "--help"]
main()
"""


def _started_as_the_script(signame: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SIGNALLED_WHILE_IMPORTING, signame],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_command_line_imports_is_an_interruption(signame: str) -> None:
    """Ctrl-C in a command's first tenths of a second printed a traceback, and SIGTERM ended
    it without a word (exit -15, not the 130 of an interrupted command). They wait for the
    command line's handlers: an exception raised inside an import could kill the interpreter
    (in an extension's set-up)."""
    done = _started_as_the_script(signame)
    assert (done.returncode, done.stderr.strip()) == (130, "interrupted")


def test_the_command_line_takes_sigterm_with_its_own_handler() -> None:
    """Started as the script starts it, a command has the command line's SIGTERM handler
    (which cancels the command's task, so that its cleanups run) and blocks no signal."""
    done = _started_as_the_script("none")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "_on_sigterm []"


def test_lines_skipped_at_submit_can_be_listed_again(
    make_file: MakeFile, sqlite_url: str, server: FakeServerThread
) -> None:
    """--skip-invalid records the bad lines; the run of a file takes it too, a second submit
    says the batch has them, and `export --invalid` lists every one (the first 20 only were
    shown, once)."""
    bad = [b"{bad", orjson.dumps({"model": "m"})] * 15
    path = make_file([chat("good 1"), *bad, chat("good 2")])
    done = run_cli(
        "run", str(path), "--skip-invalid", "--base-url", server.url, "--quiet", db=sqlite_url
    )
    assert done.returncode == 0, done.stderr
    assert "skipped 30 bad line(s)" in done.stderr
    again = run_cli("submit", str(path), db=sqlite_url)
    batch_id = again.stdout.strip()
    assert "loaded with --skip-invalid: 30 bad line(s) left out" in again.stderr

    listed = run_cli("export", batch_id, "--invalid", db=sqlite_url)
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0] == "line,reason" and len(rows) == 31
    assert rows[1].startswith('2,"invalid JSON') and rows[2] == "3,missing 'messages'"
    as_jsonl = run_cli("export", batch_id, "--invalid", "--format", "jsonl", db=sqlite_url)
    lines = [orjson.loads(line) for line in as_jsonl.stdout.splitlines()]
    assert [line["line"] for line in lines] == list(range(2, 32))
    assert lines[1] == {"line": 3, "reason": "missing 'messages'"}


def _results(db_file: Path) -> int:
    with sqlite3.connect(db_file) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def _wait_for_results(db_file: Path, at_least: int) -> int:
    deadline = time.monotonic() + 60
    while (done := _results(db_file)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return done


@contextlib.contextmanager
def _slow_batch(
    make_file: MakeFile, tmp_path: Path, jobs: int
) -> Iterator[tuple[Path, str, FakeServerThread, str]]:
    """A batch of `jobs` submitted to a new SQLite database, each answered in 100 ms by the
    fake API while the block runs: (database file, its URL, the server, the batch's id)."""
    db_file = tmp_path / "jobs.db"
    db = f"sqlite:///{db_file}"
    with FakeServerThread(FakeConfig(latency_ms=100)) as srv:
        path = make_file([chat(f"slow {i}") for i in range(jobs)])
        batch_id = run_cli("submit", str(path), "--base-url", srv.url, db=db).stdout.strip()
        yield db_file, db, srv, batch_id


@pytest.mark.slow
def test_the_demo_runs_its_examples_from_any_folder(tmp_path: Path) -> None:
    examples = sorted(p.name for p in (Path(__file__).parent.parent / "jobs").glob("*.jsonl"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("demo", db=f"sqlite:///{tmp_path / 'demo.db'}", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == examples
    assert all(" failed   0 " in line for line in lines), result.stdout
    assert "next: batchrunner --db sqlite:///" in result.stderr


def test_the_demo_and_real_batches_of_the_same_file_are_kept_apart(tmp_path: Path) -> None:
    """A batch is its file's content: the demo sent a user's batch of the same file to its
    fake API (and stopped on its 401 without saying so), and a real run of a file the demo ran
    found every job done, exit 0, its export the fake API's answers."""
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "a-first.jsonl").write_bytes(orjson.dumps(chat("first")) + b"\n")
    request_file = examples / "ask.jsonl"
    request_file.write_bytes(orjson.dumps(chat("hi")) + b"\n")
    real = f"sqlite:///{tmp_path / 'real.db'}"
    batch_id = run_cli("submit", str(request_file), db=real).stdout.strip()
    refused = run_cli("demo", "--jobs", str(examples), db=real)
    assert refused.returncode == 2, refused.stderr
    assert f"is batch {batch_id} in this database, submitted for real" in refused.stderr
    assert "--db sqlite:///demo.db demo" in refused.stderr
    status = orjson.loads(run_cli("status", batch_id, "--json", db=real).stdout)
    assert status["counts"]["pending"] == 1 and not status["attempt_errors"]
    # Every file is looked at before any runs: the first was not run either.
    assert [b["batch"] for b in orjson.loads(run_cli("status", "--json", db=real).stdout)] == [
        batch_id
    ]

    demo_db = f"sqlite:///{tmp_path / 'demo.db'}"
    assert run_cli("demo", "--jobs", str(examples), db=demo_db).returncode == 0
    for command in (["run", str(request_file)], ["submit", str(request_file)]):
        refused = run_cli(*command, db=demo_db, env={"OPENAI_API_KEY": "sk-real"})
        assert refused.returncode == 2, refused.stderr
        assert f"is batch {batch_id} in this database, run by `batchrunner demo`" in (
            refused.stderr
        )
    # The demo itself runs it again, as before.
    assert run_cli("demo", "--jobs", str(examples), db=demo_db).returncode == 0


def test_db_downgrade_names_its_revision(make_file: MakeFile, tmp_path: Path) -> None:
    """A bare `db downgrade` went down to base: every table dropped, every batch gone."""
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    batch_id = run_cli("submit", str(make_file([chat("q")])), db=db).stdout.strip()
    bare = run_cli("db", "downgrade", db=db)
    assert bare.returncode == 2 and "Missing argument 'REVISION'" in bare.stderr
    assert batch_id in run_cli("status", db=db).stdout
    for verb in ("upgrade", "downgrade"):
        unknown = run_cli("db", verb, "0099", db=db)
        assert unknown.returncode == 2, unknown.stderr
        assert "no revision '0099': base, head or one of 0001, 0002" in unknown.stderr
    # One step down, as alembic counts them (`-1` was taken for an option); and back.
    head = int(SCHEMA_HEAD)
    for step, at in ((("downgrade", "-1"), head - 1), (("downgrade", "head-2"), head - 2)):
        moved = run_cli("db", *step, db=db)
        assert (moved.returncode, moved.stderr) == (0, f"database at revision {at:04d}\n")
    assert run_cli("db", "upgrade", db=db).returncode == 0
    assert batch_id in run_cli("status", db=db).stdout
    assert run_cli("db", "downgrade", "base", db=db).returncode == 0
    # What is left is no batchrunner database: read, it is not made one again.
    left = run_cli("status", db=db)
    assert left.returncode == 2 and "no batchrunner tables in the database at" in left.stderr


def test_commands_about_what_was_submitted_make_no_tables_in_another_applications_file(
    tmp_path: Path,
) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    for args in (("status",), ("export", "batch_0123456789abcdef")):
        refused = run_cli(*args, db=f"sqlite:///{other}")
        assert refused.returncode == 2 and "no batchrunner tables" in refused.stderr
    with sqlite3.connect(other) as conn:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master")]
    assert tables == ["users"]


def test_an_installed_demo_finds_the_examples_beside_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchrunner import demo

    package = tmp_path / "site-packages" / "batchrunner"
    (package / "examples").mkdir(parents=True)
    (package / "examples" / "01-chat.jsonl").write_text(orjson.dumps(chat("hi")).decode() + "\n")
    monkeypatch.setattr(demo, "__file__", str(package / "demo.py"))
    assert demo.example_files() == package / "examples"
    (package / "examples" / "01-chat.jsonl").unlink()
    with pytest.raises(UsageError, match="example request files are missing"):
        demo.example_files()


@pytest.mark.slow
def test_a_stderr_nobody_reads_changes_neither_the_stop_nor_the_exit_code(
    make_file: MakeFile, tmp_path: Path
) -> None:
    """`run B 2>&1 | tee log` and a Ctrl-C, which ends tee too: the message of the first
    Ctrl-C could not be written, so the run did not stop, and the second Ctrl-C abandoned
    what was in flight (exit 1, jobs leased). A run whose stderr broke ended 1 after every job
    succeeded."""
    jobs = 300
    with _slow_batch(make_file, tmp_path, jobs) as (db_file, db, srv, batch_id):
        with started_cli("run", batch_id, "--concurrency", "8", db=db) as proc:
            assert proc.stderr is not None
            proc.stderr.close()  # (its reader gone: each write to it fails)
            proc.stderr = None
            _wait_for_results(db_file, 20)
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        assert proc.returncode == 130
        done = _results(db_file)
        assert done < jobs
        assert srv.stats.requests_total == done, "what was in flight was waited for"

        with started_cli("run", batch_id, "--concurrency", "8", db=db) as proc:
            assert proc.stderr is not None
            proc.stderr.close()
            proc.stderr = None
            proc.communicate(timeout=60)
        assert proc.returncode == 0
    assert _results(db_file) == jobs


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_next_run_resumes(make_file: MakeFile, tmp_path: Path) -> None:
    jobs = 300
    with _slow_batch(make_file, tmp_path, jobs) as (db_file, db, srv, batch_id):
        with started_cli("run", batch_id, "--concurrency", "8", "--quiet", db=db) as proc:
            _wait_for_results(db_file, 20)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert f"batchrunner run {batch_id}" in stderr
        done = _results(db_file)
        assert 20 <= done < jobs
        sent_before = srv.stats.requests_total
        # Requests in flight at Ctrl-C finished within the grace period and were recorded.
        assert sent_before == done

        resumed = run_cli("run", batch_id, "--quiet", db=db)
        assert resumed.returncode == 0, resumed.stderr
        stats = srv.stats
    assert _results(db_file) == jobs
    assert stats.requests_total == jobs, "nothing was sent twice"
    assert max(stats.requests_by_body.values()) == 1


@pytest.mark.slow
def test_a_run_started_with_sigint_ignored_leaves_it_ignored(
    make_file: MakeFile, tmp_path: Path
) -> None:
    """A background job of a script ignores SIGINT (the script's Ctrl-C is the script's), and
    Python leaves it so through the load: the run keeps it so too. SIGTERM still stops it."""
    jobs = 300
    with _slow_batch(make_file, tmp_path, jobs) as (db_file, db, srv, batch_id):
        run = ("run", batch_id, "--concurrency", "8", "--quiet")
        with started_cli(*run, db=db, sigint=signal.SIG_IGN) as proc:
            at_sigint = _wait_for_results(db_file, 20)
            proc.send_signal(signal.SIGINT)
            # Stopped, it would have recorded the 8 requests in flight and no more.
            assert _wait_for_results(db_file, at_sigint + 40) >= at_sigint + 40
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert stderr.count("stopping: waiting") == 1, stderr
        assert srv.stats.requests_total == _results(db_file) < jobs
