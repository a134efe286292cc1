"""Bad request files through `batchrunner submit`: generated lines, huge lines, deep nesting.

tests/test_ingest.py owns the validation list and `parse_line`; here whole files go through the
command line (click's CliRunner, in process) and the checks are what a user relies on:

- no traceback, whatever the bytes: exit 0 (loaded) or 2 (rejected with a message);
- a rejection names the file and the line (`FILE:LINE: reason`);
- without --skip-invalid a file with a bad line loads nothing: no batch appears;
- a file that loads, loads every request line; with --skip-invalid every line is either a job
  or a recorded bad line.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrunner.cli import cli
from batchrunner.errors import InputError
from batchrunner.ingest import submit_file
from batchrunner.lines import MAX_EST_TOKENS, NOT_JSONL
from batchrunner.states import CUSTOM_ID_CHARS, MODEL_CHARS
from batchrunner.store import JobStore
from tests.conftest import chat

MakeFile = Callable[..., Path]

#: Each generated file runs against a fresh copy of one migrated database.
EXAMPLES = 30
HUGE_LINE_BYTES = 8 * 1024 * 1024
#: Deeper than orjson will parse (1024 levels).
TOO_DEEP = 100_000
#: orjson parses up to 1024 levels but writes only up to 254: a line this deep is read, and
#: then cannot be written back as the job's body or metadata.
DEEPER_THAN_ORJSON_WRITES = 300
#: Deep, but within what a JSON library is expected to read and write.
DEEP_OK = 200
_LINE_REF = re.compile(r":(\d+): ")


class Workspace:
    """A migrated template database; each `submit` runs on a fresh copy of it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.template = root / "template.db"
        self._n = 0
        self.file = root / "x.jsonl"
        self.file.write_bytes(orjson.dumps(chat("template")) + b"\n")
        result = CliRunner().invoke(
            cli, ["--db", f"sqlite:///{self.template}", "db", "upgrade"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output

    def submit(self, data: bytes, *flags: str) -> tuple[Result, Path, Path]:
        self._n += 1
        db = self.root / f"jobs-{self._n}.db"
        shutil.copy(self.template, db)
        path = self.root / f"requests-{self._n}.jsonl"
        path.write_bytes(data)
        result = CliRunner().invoke(cli, ["--db", f"sqlite:///{db}", "submit", str(path), *flags])
        return result, path, db


@contextmanager
def workspace() -> Iterator[Workspace]:
    # Not tmp_path: hypothesis runs many examples per test, and a function-scoped fixture
    # would be shared by all of them.
    with tempfile.TemporaryDirectory() as root:
        yield Workspace(Path(root))


def _request_lines(data: bytes) -> list[int]:
    """Numbers of the lines submit reads as requests: not blank (a first-line BOM dropped)."""
    numbers = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.rstrip(b"\r").strip():
            numbers.append(number)
    return numbers


def _loaded(db: Path) -> tuple[int, int, int]:
    """(batches, jobs, recorded bad lines) in a database."""
    with closing(sqlite3.connect(db)) as conn:
        batches, jobs, bad = conn.execute(
            "SELECT (SELECT COUNT(*) FROM batches), (SELECT COUNT(*) FROM jobs),"
            " (SELECT COUNT(*) FROM invalid_lines)"
        ).fetchone()
    return int(batches), int(jobs), int(bad)


def _check(ws: Workspace, data: bytes, *, skip_invalid: bool = False) -> Result:
    flags = ("--skip-invalid",) if skip_invalid else ()
    result, path, db = ws.submit(data, *flags)
    # CliRunner catches what would have been a traceback and keeps it here.
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception,
        result.output,
    )
    assert result.exit_code in (0, 2), result.output
    lines = _request_lines(data)
    batches, jobs, bad = _loaded(db)
    if result.exit_code == 2:
        assert result.stdout == ""
        assert (batches, jobs, bad) == (0, 0, 0), "a rejected file loaded something"
        assert "Traceback" not in result.output
        if data.startswith(tuple(magic for magic, _ in NOT_JSONL)):
            # Compressed or UTF-16 by its first bytes (no JSON line starts so): the file.
            assert f"Error: {path} is " in result.stderr, result.stderr
        elif lines:
            refs = [int(n) for n in _LINE_REF.findall(result.stderr)]
            assert f"{path}:" in result.stderr, result.stderr
            assert refs and set(refs) <= set(lines), (refs, lines, result.stderr)
        else:
            assert "no requests" in result.stderr
    else:
        assert result.stdout.strip().startswith("batch_")
        assert batches == 1
        if skip_invalid:
            assert jobs + bad == len(lines) and jobs > 0
        else:
            assert (jobs, bad) == (len(lines), 0)
    return result


# -- generated files -----------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Keys a request may have, so that generated objects are sometimes close to valid.
_keys = st.sampled_from(
    ["model", "messages", "stream", "n", "max_tokens", "custom_id", "metadata", "body", "url"]
)
_near_request = st.fixed_dictionaries(
    {"model": st.text(max_size=10) | _scalars, "messages": _json | st.just([{"role": "user"}])},
    optional={k: _json for k in ("stream", "n", "max_tokens", "custom_id", "metadata")},
)
_valid = st.builds(
    lambda t, i: chat(t, metadata={"i": i}), st.text(max_size=30), st.integers(-(2**63), 2**63 - 1)
)


def _dumps(value: Any) -> bytes:
    # The standard library, not orjson: it writes integers of any size, which a reader
    # limited to 64 bits has to refuse as a bad line.
    return json.dumps(value, ensure_ascii=False).encode()


_json_line = st.one_of(
    _valid.map(_dumps),
    _near_request.map(_dumps),
    st.dictionaries(_keys, _json, max_size=5).map(_dumps),
    _json.map(_dumps),
)
_any_line = _json_line | st.binary(max_size=60) | st.text(max_size=40).map(str.encode)


def _file(lines: list[bytes], crlf: bool, final_newline: bool) -> bytes:
    newline = b"\r\n" if crlf else b"\n"
    return newline.join(lines) + (newline if final_newline else b"")


_files = st.builds(_file, st.lists(_any_line, min_size=0, max_size=8), st.booleans(), st.booleans())
_json_files = st.builds(
    _file, st.lists(_json_line, min_size=1, max_size=8), st.booleans(), st.booleans()
)
_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_SETTINGS
@given(data=_json_files)
def test_random_json_lines(data: bytes) -> None:
    with workspace() as ws:
        _check(ws, data)


@_SETTINGS
@given(data=_files)
def test_random_bytes_and_lines(data: bytes) -> None:
    with workspace() as ws:
        _check(ws, data)


@_SETTINGS
@given(data=_files)
def test_random_lines_with_skip_invalid(data: bytes) -> None:
    with workspace() as ws:
        _check(ws, data, skip_invalid=True)


@_SETTINGS
@given(good=st.lists(_valid, min_size=1, max_size=5), bad=_any_line, where=st.integers(0, 5))
def test_one_bad_line_anywhere_loads_nothing(
    good: list[dict[str, Any]], bad: bytes, where: int
) -> None:
    lines = [orjson.dumps(g) for g in good]
    lines.insert(min(where, len(lines)), bad)
    with workspace() as ws:
        _check(ws, _file(lines, False, True))


# -- huge and deep -------------------------------------------------------------------------------


def _nested_request(depth: int) -> bytes:
    """A request whose metadata nests `depth` levels."""
    meta = b'{"k":' * depth + b"1" + b"}" * depth
    body = orjson.dumps(chat("deep"))
    return body[:-1] + b',"metadata":' + meta + b"}"


def _nested_body(depth: int) -> bytes:
    """A request whose json_schema nests about `depth` levels (two per schema level)."""
    levels = depth // 2
    schema = b'{"type":"object","properties":{"a":' * levels + b"{}" + b"}}" * levels
    body = orjson.dumps(chat("deep", response_format={"type": "json_schema"}))
    return body[:-2] + b',"json_schema":{"name":"x","schema":' + schema + b"}}}"


def _huge_valid() -> bytes:
    return orjson.dumps(chat("x" * HUGE_LINE_BYTES))


@pytest.mark.parametrize(
    ("name", "lines", "bad_line"),
    [
        ("huge valid line", [orjson.dumps(chat("a")), _huge_valid()], None),
        ("huge line cut short", [orjson.dumps(chat("a")), _huge_valid()[:-2]], 2),
        ("huge line of garbage", [b"\xff" * HUGE_LINE_BYTES, orjson.dumps(chat("b"))], 1),
        ("deep array", [orjson.dumps(chat("a")), b"[" * TOO_DEEP + b"]" * TOO_DEEP], 2),
        ("deep unclosed", [b"{" + b'"a":{' * TOO_DEEP, orjson.dumps(chat("b"))], 1),
        ("deep metadata", [orjson.dumps(chat("a")), _nested_request(DEEPER_THAN_ORJSON_WRITES)], 2),
        ("deep body", [_nested_body(DEEPER_THAN_ORJSON_WRITES), orjson.dumps(chat("b"))], 1),
        ("deep but readable metadata", [_nested_request(DEEP_OK)], None),
        ("deep but readable body", [_nested_body(DEEP_OK)], None),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_huge_and_deep_lines(name: str, lines: list[bytes], bad_line: int | None) -> None:
    with workspace() as ws:
        result = _check(ws, _file(lines, False, True))
    if bad_line is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2
        assert [int(n) for n in _LINE_REF.findall(result.stderr)] == [bad_line]


# -- what the database will not take -------------------------------------------------------------


async def test_text_the_database_cannot_store_is_a_line_error(
    store: JobStore, make_file: MakeFile
) -> None:
    """PostgreSQL text cannot hold NUL characters. Bodies and metadata are stored as JSON text,
    where a NUL is escaped; a model name or custom_id is stored as it is, so the line must be
    refused with its number rather than fail the whole load with a database error."""
    rows = [
        chat("fine"),
        chat("nul in the model", model="gpt-4o\x00mini"),
        chat("nul in the id", custom_id="id\x00"),
        chat("nul in the text \x00 is fine", metadata={"k": "v\x00"}),
    ]
    path = make_file(rows)
    with pytest.raises(InputError) as caught:
        await submit_file(store, path)
    assert [(e.line, e.path) for e in caught.value.errors] == [(2, str(path)), (3, str(path))]
    assert await store.list_batches() == []


async def test_names_longer_than_their_columns_are_line_errors(
    store: JobStore, make_file: MakeFile
) -> None:
    """PostgreSQL refuses a custom_id or model longer than its column: the line is refused
    with its number, on both databases, rather than the whole load with a database error."""
    batch_line = {"custom_id": "c" * (CUSTOM_ID_CHARS + 1), "method": "POST", "body": chat("x")}
    rows = [
        chat("fine", custom_id="c" * CUSTOM_ID_CHARS, model="m" * MODEL_CHARS),
        chat("long id", custom_id="c" * (CUSTOM_ID_CHARS + 1)),
        chat("long model", model="m" * (MODEL_CHARS + 1)),
        batch_line,
    ]
    path = make_file(rows)
    with pytest.raises(InputError) as caught:
        await submit_file(store, path)
    assert [(e.line, e.reason) for e in caught.value.errors] == [
        (2, f"'custom_id' is longer than {CUSTOM_ID_CHARS} characters ({CUSTOM_ID_CHARS + 1})"),
        (3, f"'model' is longer than {MODEL_CHARS} characters ({MODEL_CHARS + 1})"),
        (4, f"'custom_id' is longer than {CUSTOM_ID_CHARS} characters ({CUSTOM_ID_CHARS + 1})"),
    ]
    result = await submit_file(store, path, skip_invalid=True)
    (job,) = await store.claim(result.batch.id, "w", "t", 10, time.time(), 60.0)
    assert (job.custom_id, job.model) == ("c" * CUSTOM_ID_CHARS, "m" * MODEL_CHARS)


async def test_an_output_cap_past_the_estimate_column_still_loads(
    store: JobStore, make_file: MakeFile
) -> None:
    """A token estimate is kept in a 32-bit column on PostgreSQL: an absurd output cap (the
    API's to refuse) must load, its estimate kept at the column's limit, not fail the whole
    load with an overflow."""
    rows = [chat("huge cap", max_tokens=10**12), chat("many choices", max_tokens=10**7, n=10**4)]
    result = await submit_file(store, make_file(rows))
    jobs = await store.claim(result.batch.id, "w", "t", 10, time.time(), 60.0)
    assert [(j.line, j.est_tokens) for j in jobs] == [(1, MAX_EST_TOKENS), (2, MAX_EST_TOKENS)]
