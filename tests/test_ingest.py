"""`submit`: both input formats, validation with line numbers, idempotence, bulk load."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from batchrunner import bulk, ingest
from batchrunner import lines as lines_module
from batchrunner.errors import InputError, UsageError
from batchrunner.ingest import batch_id_for, file_sha256, submit_file
from batchrunner.lines import parse_line
from batchrunner.states import BATCH_NAME_CHARS, KEY_ENV_CHARS
from batchrunner.store import BatchLoader, JobStore
from batchrunner.tokens import quick_prompt_tokens
from tests.conftest import chat

MakeFile = Callable[..., Path]


def batch_line(custom_id: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body,
        **extra,
    }


async def _jobs(store: JobStore, batch_id: str) -> list[Any]:
    async with store.engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    text(
                        "SELECT line, custom_id, body, meta, model, stream, state, endpoint"
                        " FROM jobs WHERE batch_id = :b ORDER BY id"
                    ),
                    {"b": batch_id},
                )
            ).all()
        )


async def test_both_formats_load_in_order(store: JobStore, make_file: MakeFile) -> None:
    path = make_file(
        [
            batch_line("a", chat("one")),
            chat("two", metadata={"row": 2, "tag": "x"}),
            chat("three", stream=True, custom_id="mine"),
        ]
    )
    result = await submit_file(store, path, name="demo")
    assert result.created and result.jobs == 3
    assert result.batch.id == batch_id_for(file_sha256(path))
    rows = await _jobs(store, result.batch.id)
    assert [(r.line, r.custom_id) for r in rows] == [(1, "a"), (2, "line-2"), (3, "mine")]
    # metadata and custom_id are kept with the job, never sent.
    assert orjson.loads(rows[1].body) == chat("two")
    assert orjson.loads(rows[1].meta) == {"row": 2, "tag": "x"}
    assert orjson.loads(rows[2].body) == chat("three", stream=True)
    assert [r.stream for r in rows] == [False, False, True]
    assert {r.state for r in rows} == {"pending"}
    assert {r.endpoint for r in rows} == {"/v1/chat/completions"}
    counts = await store.counts(result.batch.id)
    assert counts.total == 3 and counts.counts["pending"] == 3
    assert (await store.get_batch(result.batch.id)).name == "demo"


async def test_same_content_same_batch_nothing_added(store: JobStore, make_file: MakeFile) -> None:
    rows = [chat(f"q{i}") for i in range(50)]
    first = await submit_file(store, make_file(rows, name="a.jsonl"), name="first")
    second = await submit_file(store, make_file(rows, name="b.jsonl"), name="second")
    assert second.batch.id == first.batch.id
    assert not second.created
    assert (await store.counts(first.batch.id)).total == 50
    assert len(await store.list_batches()) == 1
    # Another name is said to be ignored, as another base URL is.
    assert second.notices == ["the batch keeps its name 'first', not 'second'"]
    assert (await submit_file(store, make_file(rows, name="c.jsonl"))).notices == []


async def test_null_where_the_api_takes_null_loads_as_sent(
    store: JobStore, make_file: MakeFile
) -> None:
    body = chat("x", stream=None, n=None, max_tokens=None)
    result = await submit_file(store, make_file([body]))
    (row,) = await _jobs(store, result.batch.id)
    assert orjson.loads(row.body) == body
    assert not row.stream


async def test_bodies_are_kept_whole(store: JobStore, make_file: MakeFile) -> None:
    body = chat(
        "x",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="required",
        response_format={"type": "json_object"},
        n=3,
        logprobs=True,
        top_logprobs=2,
        reasoning_effort="low",
        stream_options={"include_usage": True},
        extra_vendor_field={"nested": [1, 2.5, None, "é"]},
    )
    result = await submit_file(store, make_file([body]))
    (row,) = await _jobs(store, result.batch.id)
    assert orjson.loads(row.body) == body


BAD_LINES: list[tuple[bytes, str]] = [
    (b"{not json", "invalid JSON"),
    (b'{"model": "m", "messages": [{"role": "user"}], "temperature": NaN}',
     "invalid JSON: NaN is not a JSON number"),
    (b'{"model": "m", "messages": [{"role": "user"}], "top_p": -Infinity}',
     "invalid JSON: -Infinity is not a JSON number"),
    ('{"model": "m", "messages": [{"role": "user", "content": "\u00e9t\u00e9"}], "x": NaN}'
     .encode(), "invalid JSON: NaN is not a JSON number"),
    (b"[1, 2]", "must be a JSON object, not an array"),
    (b'"text"', "not a string"),
    (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), "missing 'model'"),
    (orjson.dumps({"model": "m"}), "missing 'messages'"),
    (orjson.dumps({"model": "m", "messages": []}), "'messages' is empty"),
    (orjson.dumps({"model": "m", "messages": "hi"}), "'messages' must be an array"),
    (orjson.dumps({"model": "", "messages": [{"role": "user"}]}), "non-empty string"),
    (orjson.dumps({"model": "m", "messages": [{"content": "x"}]}), "has no 'role'"),
    (orjson.dumps({"model": "m", "messages": [{"role": 1}]}),
     "messages[0].role must be a non-empty string, not 1"),
    (orjson.dumps(batch_line("x", chat("q"), method="GET")), "unsupported method 'GET'"),
    (orjson.dumps({**batch_line("x", chat("q")), "url": "/v1/embeddings"}), "unsupported url"),
    (orjson.dumps(batch_line("", chat("q"))), "'custom_id' must be a non-empty string"),
    (orjson.dumps({**batch_line("x", chat("q")), "body": [1]}), "'body' must be a JSON object"),
    (orjson.dumps(chat("q", n=0)), "'n' must be a positive integer"),
    (orjson.dumps(chat("q", stream="yes")), "'stream' must be true, false or null"),
    (orjson.dumps(chat("q", metadata=[1])), "'metadata' must be an object"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    # orjson reads integers outside 64 bits as floats: 2**64 would go out as 1.8446744073709552e+19.
    (b'{"model": "m", "messages": [{"role": "user"}], "seed": 18446744073709551616}', "64 bits"),
    (b'{"model": "m", "messages": [{"role": "user"}], "seed": -9223372036854775809}', "64 bits"),
    (
        b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 1' + b"0" * 30 + b"}",
        "64 bits",
    ),
    (orjson.dumps(chat("q"))[:-1] + b', "metadata": {"n": 99999999999999999999}}', "64 bits"),
    (
        orjson.dumps({"custom_id": "i", "method": "POST", "url": "/v1/chat/completions"}),
        "missing 'body'",
    ),
    (orjson.dumps({"body": chat("q")}), "'custom_id' must be a non-empty string"),
    (orjson.dumps({"url": "/v1/embeddings", "body": chat("q")}), "unsupported url"),
    (b'\xef\xbb\xbf{"model": "m"}', "byte order mark inside the file"),
    # A Batch API line whose body was flattened into it: `method` and `url` were sent.
    (
        orjson.dumps({"custom_id": "z", "method": "POST", "url": "/v1/chat/completions",
                      **chat("q")}),
        "missing 'body'",
    ),
    (orjson.dumps({**chat("q"), "url": "/v1/chat/completions"}), "missing 'body'"),
    # Fields beside a Batch API line's body were dropped: the request went out without them.
    (
        orjson.dumps({**batch_line("t", chat("q")), "temperature": 0, "max_tokens": 5}),
        "'temperature', 'max_tokens' beside 'body'",
    ),
    (
        orjson.dumps({"custom_id": "m", "model": "other", "messages": [], "body": chat("q")}),
        "'model', 'messages' beside 'body'",
    ),
    # Deeper than the standard parser goes (orjson reads 1,024 levels): the integer past 64
    # bits went unchecked, and out as a float.
    (
        b'{"custom_id": "d", "metadata": {"x": ' + b"[" * 1020 + b"]" * 1020 + b"},"
        b' "body": {"model": "m", "messages": [{"role": "user"}], "seed": 18446744073709551616}}',
        "nested too deep for its numbers to be checked",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
async def test_bad_line_in_the_middle_loads_nothing(
    store: JobStore, make_file: MakeFile, line: bytes, reason: str
) -> None:
    path = make_file([chat("a"), chat("b"), line, chat("d")])
    with pytest.raises(InputError) as info:
        await submit_file(store, path)
    assert info.value.total == 1
    (err,) = info.value.errors
    assert err.line == 3 and err.path == str(path)
    assert reason in err.reason
    assert f"{path}:3:" in info.value.message
    assert await store.list_batches() == []


async def test_integers_at_the_edges_of_64_bits_and_large_floats_are_kept(
    store: JobStore, make_file: MakeFile
) -> None:
    line = (
        b'{"model": "m", "messages": [{"role": "user", "content": "5e+10] base64 e+1,"}],'
        b' "seed": 18446744073709551615, "x_low": -9223372036854775808, "x_float": 1e300}'
    )
    result = await submit_file(store, make_file([line]))
    (row,) = await _jobs(store, result.batch.id)
    body = orjson.loads(row.body)
    assert (body["seed"], body["x_low"]) == (2**64 - 1, -(2**63))
    assert body["x_float"] == 1e300


async def test_a_long_wrong_value_is_quoted_short(store: JobStore, make_file: MakeFile) -> None:
    line = orjson.dumps({**batch_line("x", chat("q")), "url": "/" + "u" * 2_000_000})
    with pytest.raises(InputError) as info:
        await submit_file(store, make_file([line]))
    (err,) = info.value.errors
    assert "unsupported url '/uuu" in err.reason and len(err.reason) < 200


async def test_error_message_lists_first_errors_and_the_total(
    store: JobStore, make_file: MakeFile
) -> None:
    path = make_file([b"{bad"] * 30 + [orjson.dumps(chat("ok"))])
    with pytest.raises(InputError) as info:
        await submit_file(store, path)
    assert info.value.total == 30
    assert len(info.value.errors) == 20
    assert "and 10 more" in info.value.message
    assert await store.list_batches() == []


async def test_skip_invalid_loads_good_lines_and_records_bad(
    store: JobStore, make_file: MakeFile
) -> None:
    path = make_file([chat("a"), b"{bad", chat("c"), orjson.dumps({"model": "m"})])
    result = await submit_file(store, path, skip_invalid=True)
    assert result.jobs == 2 and result.invalid_total == 2
    assert [e.line for e in result.invalid] == [2, 4]
    assert await store.invalid_lines(result.batch.id) == [
        (2, result.invalid[0].reason),
        (4, "missing 'messages'"),
    ]
    batch = await store.get_batch(result.batch.id)
    assert (batch.total_jobs, batch.invalid_lines) == (2, 2)


async def test_a_repeated_id_found_early_hides_no_other_bad_line(
    store: JobStore, make_file: MakeFile
) -> None:
    # The repeat is found by an insert (more than a chunk of good lines before the bad one),
    # which ended the read: the bad line at the end went unsaid, to be found only on the
    # next submit of a fixed file.
    rows: list[Any] = [batch_line("dup", chat("1")), batch_line("dup", chat("2"))]
    rows += [batch_line(f"id{i}", chat("q")) for i in range(3, ingest.CHUNK_ROWS + 100)]
    rows.append(b'{"model": "m", "messages": [}')
    path = make_file(rows)
    with pytest.raises(InputError) as info:
        await submit_file(store, path)
    assert info.value.total == 2
    assert [e.line for e in info.value.errors] == [2, len(rows)]
    assert "duplicate custom_id 'dup' (first on line 1)" in info.value.errors[0].reason
    assert "invalid JSON" in info.value.errors[1].reason
    assert await store.list_batches() == []


async def test_an_id_made_from_the_line_number_that_a_line_has_says_so(
    store: JobStore, make_file: MakeFile
) -> None:
    path = make_file([chat("1"), chat("2", custom_id="line-3"), chat("3")])
    with pytest.raises(InputError) as info:
        await submit_file(store, path)
    (err,) = info.value.errors
    assert err.line == 3
    assert "'line-3', made from the line number" in err.reason
    assert "is line 2's custom_id" in err.reason


async def test_a_file_that_changes_while_it_is_submitted_loads_nothing(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch's id is the digest of the content read first; the jobs were what a second
    # read found: a file still being written made a batch of other jobs than its id says,
    # and submitting the whole file later added nothing to it.
    rows = [chat(f"q{i}") for i in range(100)]
    path = make_file(rows[:50])
    digest = ingest.file_sha256

    def then_written_to(file: Path) -> str:
        sha = digest(file)
        with file.open("ab") as f:
            f.writelines(orjson.dumps(row) + b"\n" for row in rows[50:])
        return sha

    monkeypatch.setattr(ingest, "file_sha256", then_written_to)
    with pytest.raises(UsageError, match="changed while it was being submitted"):
        await submit_file(store, path)
    assert await store.list_batches() == []
    monkeypatch.undo()
    result = await submit_file(store, path)
    assert result.created and result.jobs == 100


async def test_duplicate_custom_id(store: JobStore, make_file: MakeFile) -> None:
    rows = [batch_line("a", chat("1")), batch_line("b", chat("2")), batch_line("a", chat("3"))]
    with pytest.raises(InputError) as info:
        await submit_file(store, make_file(rows))
    (err,) = info.value.errors
    assert err.line == 3 and "duplicate custom_id 'a' (first on line 1)" in err.reason
    assert await store.list_batches() == []

    result = await submit_file(store, make_file(rows), skip_invalid=True)
    assert result.jobs == 2
    assert [r.custom_id for r in await _jobs(store, result.batch.id)] == ["a", "b"]
    assert [line for line, _ in await store.invalid_lines(result.batch.id)] == [3]


async def test_blank_lines_skipped_and_bom_accepted(store: JobStore, tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + orjson.dumps(chat("a"))
        + b"\r\n\n   \n"
        + orjson.dumps(chat("b"))
        + b"\n\n"
    )
    result = await submit_file(store, path)
    assert result.jobs == 2
    assert [r.line for r in await _jobs(store, result.batch.id)] == [1, 4]
    assert any("byte order mark" in n for n in result.notices)


async def test_empty_file(store: JobStore, tmp_path: Path) -> None:
    for content in (b"", b"\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        with pytest.raises(InputError, match="no requests"):
            await submit_file(store, path)
    assert await store.list_batches() == []


async def test_truncated_last_line(store: JobStore, make_file: MakeFile) -> None:
    path = make_file([chat("a"), b'{"model": "m", "messa'], newline_at_end=False)
    with pytest.raises(InputError) as info:
        await submit_file(store, path)
    (err,) = info.value.errors
    assert err.line == 2 and "truncated last line" in err.reason


async def test_a_last_line_without_newline_keeps_its_own_reason(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    # It was "truncated last line" whatever was wrong with it.
    line = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    with pytest.raises(InputError) as info:
        await submit_file(store, make_file([chat("a"), line], newline_at_end=False))
    (err,) = info.value.errors
    assert "truncated" not in err.reason and "unexpected character" in err.reason
    lone_cr = tmp_path / "cr.jsonl"
    lone_cr.write_bytes(orjson.dumps(chat("a")) + b"\r" + orjson.dumps(chat("b")) + b"\r")
    with pytest.raises(InputError) as info:
        await submit_file(store, lone_cr)
    (err,) = info.value.errors
    assert "lone CR" in err.reason


async def test_missing_file(store: JobStore, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        await submit_file(store, tmp_path / "nope.jsonl")


async def test_options_stored_with_the_batch(store: JobStore, make_file: MakeFile) -> None:
    result = await submit_file(
        store, make_file([chat("a")]), base_url="http://127.0.0.1:9/api/v1", api_key_env="GW_KEY"
    )
    batch = await store.get_batch(result.batch.id)
    assert (batch.base_url, batch.api_key_env) == ("http://127.0.0.1:9/api/v1", "GW_KEY")


async def test_names_longer_than_their_columns(store: JobStore, make_file: MakeFile) -> None:
    # PostgreSQL refuses a value longer than its column: a name given too long is a usage
    # error before anything is loaded, a file name too long is cut to name the batch.
    path = make_file([chat("a")])
    with pytest.raises(UsageError, match=f"--name is longer than {BATCH_NAME_CHARS}"):
        await submit_file(store, path, name="n" * (BATCH_NAME_CHARS + 1))
    with pytest.raises(UsageError, match=f"at most {KEY_ENV_CHARS} characters"):
        await submit_file(store, path, api_key_env="K" * (KEY_ENV_CHARS + 1))
    assert await store.list_batches() == []
    long_file = path.rename(path.with_name("f" * 240 + ".jsonl"))
    result = await submit_file(store, long_file, api_key_env="K" * KEY_ENV_CHARS)
    batch = await store.get_batch(result.batch.id)
    assert batch.name == "f" * BATCH_NAME_CHARS
    assert batch.api_key_env == "K" * KEY_ENV_CHARS


async def test_a_file_name_that_is_not_utf8_names_the_batch(
    store: JobStore, make_file: MakeFile
) -> None:
    # Python keeps its bytes as lone surrogates, which neither database can hold: the load
    # failed with a traceback (SQLite) or a database error (PostgreSQL).
    path = make_file([chat("a")])
    latin1 = path.rename(path.with_name(os.fsdecode(b"caf\xe9.jsonl")))
    result = await submit_file(store, latin1)
    batch = await store.get_batch(result.batch.id)
    assert batch.name == "caf\ufffd"
    assert batch.source_file == str(latin1.parent / "caf\ufffd.jsonl")
    assert (await store.counts(result.batch.id)).total == 1
    # ... and so does such a --name.
    named = await submit_file(store, make_file([chat("b")]), name=os.fsdecode(b"n\xe9"))
    assert (await store.get_batch(named.batch.id)).name == "n\ufffd"


async def test_large_file_loads_in_chunks(sqlite_url: str, make_file: MakeFile) -> None:
    async with await JobStore.open(sqlite_url) as store:
        result = await submit_file(store, make_file(chat(f"q{i}") for i in range(12_345)))
        assert result.jobs == 12_345
        assert (await store.counts(result.batch.id)).counts["pending"] == 12_345


async def test_a_load_cancelled_as_an_insert_starts_leaves_nothing(
    sqlite_url: str, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C cancels a submit wherever it is, and nothing of the load may stay. The worst
    moment: a chunk's insert has just been handed to a task of its own when the cancel lands.
    The rollback must not overtake it: run after the rollback, the insert would be a statement
    of its own, committed (jobs without their batch, as a Ctrl-C of `run FILE` once left)."""
    path = make_file(chat(f"q{i}") for i in range(4 * ingest.CHUNK_ROWS))
    load: asyncio.Task[Any] | None = None
    cancel_at_chunk = 0
    chunks = 0
    add_jobs = BatchLoader.add_jobs

    async def add_jobs_then_ctrl_c(self: BatchLoader, jobs: Any) -> None:
        nonlocal chunks
        chunks += 1
        if chunks == cancel_at_chunk and load is not None:
            load.cancel()  # the load waits for this task's first step to end
        await add_jobs(self, jobs)

    monkeypatch.setattr(BatchLoader, "add_jobs", add_jobs_then_ctrl_c)
    async with await JobStore.open(sqlite_url) as store:
        for cancel_at_chunk in (1, 2, 3):
            chunks = 0
            load = asyncio.create_task(submit_file(store, path))
            with pytest.raises(asyncio.CancelledError):
                await load
            async with store.reading() as conn:
                jobs = (await conn.execute("SELECT COUNT(*) FROM jobs")).scalar()
                batches = (await conn.execute("SELECT COUNT(*) FROM batches")).scalar()
            assert (batches, jobs) == (0, 0), cancel_at_chunk


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_line_never_crashes(raw: bytes) -> None:
    from batchrunner.lines import BadLine

    try:
        job = parse_line(raw, 7)
    except BadLine as bad:
        assert bad.reason
    else:
        assert job.line == 7 and orjson.loads(job.body)["messages"]


def _awkward_file(tmp_path: Path, *, bad: bool) -> Path:
    """Both formats, metadata, a BOM, CRLF and blank lines, a line longer than a block, repeated
    custom_ids and (with `bad`) bad lines, the last line without a newline."""
    lines = [b"\xef\xbb\xbf" + orjson.dumps(chat("first", metadata={"k": "v"}))]
    for i in range(40):
        # The repeated ids (i >= 37) bring a metadata key of their own, which no job keeps.
        extra = {"metadata": {"repeated": i}} if i >= 37 else {}
        lines.append(orjson.dumps(batch_line(f"id-{i % 37}", chat(f"q{i}"), **extra)))
        lines.append(orjson.dumps(chat("x" * (300 if i % 9 == 0 else 5), metadata={"i": i})))
        lines.append(b"" if i % 5 else b"   ")
        if bad and i % 7 == 3:
            lines.append(b'{"model": "m", "messages": []}' if i % 2 else b"{not json")
    lines.append(orjson.dumps(chat("last")))
    path = tmp_path / ("bad.jsonl" if bad else "awkward.jsonl")
    path.write_bytes(b"\r\n".join(lines))
    return path


async def _loaded(store: JobStore, batch_id: str) -> tuple[list[Any], list[Any], Any]:
    """The batch's jobs, bad lines and metadata keys as the database holds them."""
    async with store.engine.connect() as conn:
        meta_keys = (
            await conn.execute(text("SELECT meta_keys FROM batches WHERE id = :b"), {"b": batch_id})
        ).scalar()
        jobs = (
            await conn.execute(
                text(
                    "SELECT line, custom_id, endpoint, body, meta, model, stream, est_tokens"
                    " FROM jobs WHERE batch_id = :b ORDER BY id"
                ),
                {"b": batch_id},
            )
        ).all()
    return [tuple(j) for j in jobs], await store.invalid_lines(batch_id), meta_keys


@pytest.mark.parametrize("workers", [0, 2])
async def test_metadata_keys_first_seen_late_in_a_file_are_columns(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A key first seen after the first chunk of lines (5,000) was in no CSV column: its
    values were in the jobs' rows, and in no export."""
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 3)
    if workers:
        monkeypatch.setattr(ingest, "BLOCK_BYTES", 200)
    keys = {0: "first", 4: "fifth", 9: "last"}
    path = make_file(
        chat(f"q{i}", **({"metadata": {keys[i]: i}} if i in keys else {})) for i in range(10)
    )
    result = await submit_file(store, path, workers=workers)
    _, _, meta_keys = await _loaded(store, result.batch.id)
    assert orjson.loads(meta_keys) == ["fifth", "first", "last"]


@pytest.mark.slow
@pytest.mark.parametrize("bad", [False, True])
async def test_worker_processes_load_what_one_process_loads(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: bool
) -> None:
    """Blocks of ~200 bytes: most lines are split across workers, one is longer than a block."""
    path = _awkward_file(tmp_path, bad=bad)
    async with await JobStore.open(f"sqlite:///{tmp_path}/alone.db") as alone:
        expected = await submit_file(alone, path, skip_invalid=True)
        expected_rows = await _loaded(alone, expected.batch.id)
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 200)
    result = await submit_file(store, path, skip_invalid=True, workers=2)
    assert (result.jobs, result.invalid, result.invalid_total, result.notices) == (
        expected.jobs,
        expected.invalid,
        expected.invalid_total,
        expected.notices,
    )
    assert await _loaded(store, result.batch.id) == expected_rows
    assert result.invalid_total == (9 if bad else 3)  # the repeated ids, and the bad lines
    assert orjson.loads(expected_rows[2]) == ["i", "k"]


@pytest.mark.slow
async def test_worker_processes_reject_a_bad_file_as_one_process_does(
    store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _awkward_file(tmp_path, bad=True)
    with pytest.raises(InputError) as alone:
        await submit_file(store, path)
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 200)
    with pytest.raises(InputError) as by_workers:
        await submit_file(store, path, workers=2)
    assert (by_workers.value.errors, by_workers.value.total) == (
        alone.value.errors,
        alone.value.total,
    )
    assert await store.list_batches() == []


async def test_large_lines_go_to_the_database_a_few_at_a_time(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines of images as base64 are loaded a bounded number of characters at a time, not
    CHUNK_ROWS lines at a time (which held a file of such lines in memory whole), in
    statements of a few sizes."""
    await _loads_large_lines_a_few_at_a_time(store, make_file, monkeypatch, workers=0)


@pytest.mark.slow
async def test_worker_processes_send_large_lines_a_few_at_a_time(
    sqlite_url: str, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await JobStore.open(sqlite_url) as store:
        await _loads_large_lines_a_few_at_a_time(store, make_file, monkeypatch, workers=2)


async def _loads_large_lines_a_few_at_a_time(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch, *, workers: int
) -> None:
    monkeypatch.setattr(ingest, "CHUNK_BODY_CHARS", 50_000)
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 20_000)
    picture = "x" * 9_000
    rows = [chat(f"picture {i}: {picture[: 1_000 * (i % 10)]}{picture}") for i in range(45)]
    inserted: list[tuple[int, int]] = []
    add_jobs = BatchLoader.add_jobs

    async def counting(loader: BatchLoader, jobs: Any) -> None:
        inserted.append((len(jobs), sum(len(job[3]) for job in jobs)))
        await add_jobs(loader, jobs)

    monkeypatch.setattr(BatchLoader, "add_jobs", counting)
    result = await submit_file(store, make_file(rows), workers=workers)
    assert result.jobs == sum(n for n, _ in inserted) == 45
    assert len(inserted) > 4
    # Under twice the limit, and a block of the file or a line, whatever the file's size.
    assert max(chars for _, chars in inserted) < 2 * 50_000 + 20_000 + 20_000
    # Powers of two (a few sizes of statement to prepare), but for the last.
    assert all(n & (n - 1) == 0 for n, _ in inserted[:-1])
    jobs, _, _ = await _loaded(store, result.batch.id)
    assert [orjson.loads(body) for _, _, _, body, *_ in jobs] == rows


def test_blocks_are_whole_lines_numbered_from_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"a\nbb\r\n" + b"c" * 50 + b"\n\nd")
    monkeypatch.setattr(ingest, "BLOCK_BYTES", 4)
    lines = [line for block in ingest._blocks(path) for line in lines_module.block_lines(*block)]
    assert lines == list(lines_module.numbered_lines(path))
    assert lines == [
        (1, b"a", True),
        (2, b"bb", True),
        (3, b"c" * 50, True),
        (4, b"", True),
        (5, b"d", False),
    ]


@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    final_newline=st.booleans(),
    block=st.integers(1, 16),
)
def test_blocks_cut_any_file_into_its_lines(
    lines: list[bytes], final_newline: bool, block: int
) -> None:
    """Lines shorter and longer than a block, in any mix: the blocks hold the file's lines,
    numbered as a reader of the whole file numbers them."""
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.jsonl"
        path.write_bytes(data)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ingest, "BLOCK_BYTES", block)
            blocks = list(ingest._blocks(path))
        assert b"".join(b for _, b in blocks) == data
        cut = [line for numbered in blocks for line in lines_module.block_lines(*numbered)]
        assert cut == list(lines_module.numbered_lines(path))


async def test_automatic_workers_parse_large_files_into_sqlite_only(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's server is its load's bottleneck and needs the other core."""
    used: list[int] = []
    parsed_by_workers = ingest._parsed_by_workers

    def spy(path: Path, workers: int) -> Any:
        used.append(workers)
        return parsed_by_workers(path, workers)

    monkeypatch.setattr(ingest, "_parsed_by_workers", spy)
    monkeypatch.setattr(bulk, "usable_cores", lambda: 2)
    monkeypatch.setattr(ingest, "PARALLEL_MIN_BYTES", 10_000)
    small = make_file([chat("small")], name="small.jsonl")
    large = make_file([chat(f"large {i}") for i in range(200)], name="large.jsonl")
    for path in (small, large):
        assert (await submit_file(store, path, workers=None)).jobs == path.read_bytes().count(b"\n")
    assert used == ([2] if store.is_sqlite else [])


@pytest.mark.parametrize(
    ("extra", "output"),
    [
        ({}, 0),
        ({"max_tokens": 64}, 64),
        ({"max_tokens": 64, "n": 3}, 192),
        ({"max_completion_tokens": 100, "max_tokens": 64}, 100),
        ({"max_completion_tokens": 100, "n": 2}, 200),
        ({"max_tokens": 64, "n": None}, 64),
    ],
)
def test_a_job_estimates_its_prompt_and_its_output_cap_for_every_choice(
    extra: dict[str, Any], output: int
) -> None:
    body = {**chat("Summarise item 7 in one sentence."), **extra}
    job = parse_line(orjson.dumps({**body, "custom_id": "c", "metadata": {"k": 1}}), 3)
    assert job.body == orjson.dumps(body).decode()  # custom_id and metadata are not sent
    assert job.est_tokens == quick_prompt_tokens(len(job.body)) + output
