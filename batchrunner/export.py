"""Results out of the job store, streaming: CSV for people, JSONL in OpenAI's Batch output format.

Both formats read the batch page by page (`JobStore.iter_export_rows`) and write as they go, so
memory stays flat whatever the batch size. A large CSV export can hand the pages to worker
processes, one per core (`workers=None`, as `batchrunner export` does), and writes their CSV in
order. Only jobs that have ended are exported: an export taken while a run is going shows what
has ended so far, and taking it again later shows more.

CSV (`exportrows.CSV_COLUMNS`, then one `meta.<key>` column per key of the jobs' metadata):

* One row per job; a completion with `n` > 1 choices gives one row per choice, numbered in the
  `choice` column. Usage and cost are per request, so the token and `cost_usd` cells are filled
  on the row of choice 0 only (the lowest-numbered, should an API number them otherwise; the
  first of those numbered alike): summing a column gives the batch's totals.
* `cost_usd` is in US dollars, written in plain decimal notation; it is empty when the model's
  price is unknown or the answer reported no usage, never 0 for "unknown".
* `tool_calls` is the JSON text of the message's `tool_calls`; content that is not a string
  (some gateways answer with a list of parts) is written as its JSON text too.
* The metadata columns: metadata is fixed at submit, which keeps its keys with the batch (the
  header must come first and a streamed export cannot go back; a batch loaded by an earlier
  version has its keys read from its jobs before the first row). Keys are sorted; a value that
  is not a string is written as its JSON text. A batch whose metadata has more than
  `MAX_META_COLUMNS` distinct keys gets a single `meta` column holding the whole metadata
  object as JSON instead.
* UTF-8, RFC 4180 quoting exactly as Python's csv module does it (newlines and quotes inside
  content survive), CRLF line ends. No byte order mark by default: most programs that read CSV
  take the BOM for part of the first column name. `bom=True` writes one for Excel, which
  otherwise reads UTF-8 CSV as the local code page. Cells are written as they are: content
  that starts with `=` is not defused, so a spreadsheet may take it for a formula.

JSONL: one line per job, `{"id", "custom_id", "response", "error"}` as OpenAI's Batch API writes
its output and error files. A succeeded job's `response.body` is the stored completion object,
byte for byte. A job that failed on the API's JSON error answer (400, 500, ...) has it in
`response` (its status, request id and error body) and `"error": null`, as OpenAI writes those;
any other failure has `"error": {"code", "message"}`: `response` null after timeouts and
connection errors and for a 2xx answer that was no completion (bad JSON, a json_schema not met:
the answer as received is the message; a 200 beside an error would read as a success), and the
answer's status and request id with its body null for an error page that is not JSON.
Cancelled jobs: `response` null, code `batch_cancelled`, with OpenAI's message, or for a job
sent before the cancel (an answer that came after it is paid for, not kept) how many times.

`failed_only=True` exports failed jobs only. To send them again, either `batchrunner retry BATCH`
then `batchrunner run BATCH` (same batch, same endpoint), or `export_requests`, which writes the
failed jobs as a new request file (OpenAI Batch input lines with their `custom_id` and
metadata) to submit as a new batch, for instance against another endpoint or model.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Final, Literal, TextIO

import orjson

from batchrunner.bulk import OrderedWorkers, collector_paused, workers_for
from batchrunner.database import SQLITE_BUSY_TIMEOUT_MS
from batchrunner.errors import StoreError
from batchrunner.exportrows import (
    CANCELLED,
    CRLF,
    SUCCEEDED,
    CsvLines,
    ExportRow,
    cell,
    csv_header,
    csv_text,
    error_body,
    failure_in,
    loads_object,
    open_csv_pages,
)
from batchrunner.pricing import PriceBook
from batchrunner.states import JobState
from batchrunner.store import JobStore, export_page_ranges

ExportFormat = Literal["csv", "jsonl"]

#: Jobs the store reads per query.
PAGE_ROWS: Final = 5_000
#: CSV exports of batches of this many jobs or more are made by worker processes, one per
#: usable core (on two cores or more): below that, starting them costs more than they save.
PARALLEL_MIN_JOBS: Final = 50_000
#: JSONL lines written in one piece, or fewer when they hold this many bytes.
WRITE_CHUNK_ROWS: Final = 2_000
WRITE_CHUNK_BYTES: Final = 4 << 20
#: OpenAI's code and message for a request of a cancelled batch...
CANCELLED_CODE: Final = "batch_cancelled"
CANCELLED_MESSAGE: Final = "This request was not executed because the batch was cancelled."
#: ...and ours for one that was sent (and may have been paid for) before the cancel.
CANCELLED_SENT_MESSAGE: Final = (
    "This request was sent ({attempts} attempt(s)) before the batch was cancelled;"
    " no answer was kept."
)

_UTF8_BOM: Final = "\ufeff"


async def export_batch(
    store: JobStore,
    batch_id: str,
    out: BinaryIO | TextIO,
    *,
    fmt: ExportFormat,
    failed_only: bool = False,
    prices: PriceBook | None = None,
    bom: bool = False,
    workers: int | None = 0,
) -> int:
    """Write the batch's ended jobs to `out` as CSV or JSONL; returns the rows written.

    `out` may be a binary stream (bytes are UTF-8) or a text stream (open files with
    `newline=""`, as for any CSV). `prices` defaults to `PriceBook.load()` (the user's price
    file, then genai-prices). `bom` (CSV only) starts the file with a UTF-8 byte order mark.
    `workers` (CSV only): processes that read pages and turn them into CSV while this one
    writes them out in order; 0 (the default): this process does it all, as it does for an
    in-memory SQLite database; None: one per usable core for a batch of `PARALLEL_MIN_JOBS`
    jobs or more on a machine with two cores or more, else 0 (what `batchrunner export`
    does). Worker processes are started with multiprocessing's "spawn": a program that asks
    for them must guard its main module with `if __name__ == "__main__":`.
    Raises `BatchNotFound` for an unknown batch.
    """
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"unknown export format {fmt!r}: csv or jsonl")
    batch = await store.get_batch(batch_id)
    sink = _Sink(out)
    if fmt == "jsonl":
        rows = store.iter_export_rows(batch_id, failed_only=failed_only, chunk_rows=PAGE_ROWS)
        with collector_paused():
            written = await _write_jsonl(rows, sink, _request_id_prefix(batch.id))
    else:
        # Only an export that may use workers needs the span up front.
        span = await store.export_span(batch_id) if workers != 0 else None
        if workers is None:
            jobs = 0 if span is None else span[1] - span[0] + 1
            workers = workers_for(jobs >= PARALLEL_MIN_JOBS)
        prices = prices or PriceBook.load()
        with collector_paused():
            if span is not None and workers > 0:
                pool: OrderedWorkers[tuple[int, int], tuple[str, int]] = OrderedWorkers(
                    open_csv_pages, workers, name="export", error=StoreError
                )
                try:
                    # The workers start up while this process reads the metadata keys
                    # (for a batch loaded before submit kept them, that reads every job's
                    # metadata: a second for a million jobs).
                    pool.start()
                    meta_keys = await batch_meta_keys(store, batch_id)
                    # SQLite workers read with sqlite3 alone (see batchrunner.exportrows).
                    target = store.sqlite_target
                    sqlite_file = (
                        None
                        if target is None
                        else (target.uri_for_existing(), SQLITE_BUSY_TIMEOUT_MS)
                    )
                    setup = (store.url, sqlite_file, batch_id, failed_only, prices, meta_keys)
                    ids_per_page = await store.ids_per_page(batch_id, span, PAGE_ROWS)
                    written = await _write_csv_by_workers(
                        pool.map(setup, export_page_ranges(span, ids_per_page)),
                        sink,
                        meta_keys,
                        bom=bom,
                    )
                finally:
                    await pool.close()
            else:
                meta_keys = await batch_meta_keys(store, batch_id)
                pages = store.iter_export_pages(
                    batch_id, failed_only=failed_only, chunk_rows=PAGE_ROWS
                )
                written = await _write_csv(pages, sink, prices, meta_keys, bom=bom)
    sink.flush()
    return written


async def export_requests(
    store: JobStore,
    batch_id: str,
    out: BinaryIO | TextIO,
    *,
    states: Collection[JobState] = (JobState.FAILED,),
) -> int:
    """Write the batch's jobs in `states` (default: the failed ones) as a request file that
    `batchrunner submit` takes: OpenAI Batch input lines with the original `custom_id`, body and
    metadata, in line order. Returns the lines written."""
    await store.get_batch(batch_id)
    sink = _Sink(out)
    written = 0
    async for job in iter_job_requests(store, batch_id, states=states):
        line: dict[str, Any] = {
            "custom_id": job.custom_id,
            "method": "POST",
            "url": job.endpoint,
            "body": orjson.Fragment(_one_line_json(job.body)),
        }
        if job.meta:
            line["metadata"] = orjson.Fragment(_one_line_json(job.meta))
        sink.write_line(orjson.dumps(line))
        written += 1
    sink.flush()
    return written


async def export_invalid_lines(
    store: JobStore,
    batch_id: str,
    out: BinaryIO | TextIO,
    *,
    fmt: Literal["csv", "jsonl"],
    bom: bool = False,
) -> int:
    """Write the numbers of the lines that `submit --skip-invalid` left out of the batch,
    each with its reason, in line order: CSV `line,reason`, or JSONL `{"line": N, "reason": "..."}`.
    `bom` as for `export_batch`. Returns how many."""
    await store.get_batch(batch_id)
    sink = _Sink(out)
    invalid = await store.invalid_lines(batch_id)
    if fmt == "csv":
        sink.write_text(f"{_UTF8_BOM if bom else ''}line,reason{CRLF}")
        sink.write_text("".join(f"{line},{cell(reason)}{CRLF}" for line, reason in invalid))
    else:
        for line, reason in invalid:
            sink.write_line(orjson.dumps({"line": line, "reason": reason}))
    sink.flush()
    return len(invalid)


# --- CSV -----------------------------------------------------------------------------------


async def _write_csv(
    pages: AsyncIterator[list[ExportRow]],
    sink: _Sink,
    prices: PriceBook,
    meta_keys: list[str],
    *,
    bom: bool,
) -> int:
    sink.write_text(_header_text(meta_keys, bom=bom))
    add = CsvLines(prices, meta_keys).add
    written = 0
    async for page in pages:
        text, count = csv_text(page, add)
        sink.write_text(text)
        written += count
    return written


def _header_text(meta_keys: list[str], *, bom: bool) -> str:
    header = ",".join(map(cell, csv_header(meta_keys))) + CRLF
    return _UTF8_BOM + header if bom else header


async def _write_csv_by_workers(
    pages: AsyncGenerator[tuple[str, int], None],
    sink: _Sink,
    meta_keys: list[str],
    *,
    bom: bool,
) -> int:
    sink.write_text(_header_text(meta_keys, bom=bom))
    written = 0
    # Closed here, so that the workers stop even when writing fails.
    async with contextlib.aclosing(pages):
        async for page_text, count in pages:
            sink.write_text(page_text)
            written += count
    return written


# --- JSONL ---------------------------------------------------------------------------------


async def _write_jsonl(rows: AsyncIterator[ExportRow], sink: _Sink, id_prefix: str) -> int:
    written = 0
    async for row in rows:
        sink.write_line(orjson.dumps(_jsonl_record(row, id_prefix)))
        written += 1
    return written


def _request_id_prefix(batch_id: str) -> str:
    # Stable ids: the same batch exports the same ids on every database it is loaded into.
    return f"batch_req_{batch_id.removeprefix('batch_')}_"


def _jsonl_record(row: ExportRow, id_prefix: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": f"{id_prefix}{row.line}", "custom_id": row.custom_id}
    if row.state == SUCCEEDED and row.response is not None:
        record["response"] = {
            "status_code": row.status_code,
            "request_id": row.request_id,
            "body": orjson.Fragment(_one_line_json(row.response)),
        }
        record["error"] = None
        return record
    if row.state == CANCELLED:
        record["response"] = None
        message = (
            CANCELLED_SENT_MESSAGE.format(attempts=row.attempts)
            if row.attempts
            else CANCELLED_MESSAGE
        )
        record["error"] = {"code": CANCELLED_CODE, "message": message}
        return record
    body = error_body(row.last_error)
    status = row.last_status
    if status is None or 200 <= status < 300:
        # No answer (a timeout), or a 2xx that was no completion (bad JSON, a json_schema not
        # met): not an HTTP error, and OpenAI writes those with `response` null. A reader
        # that takes status 200 for a success took these for successes, or broke on them.
        record["response"] = None
    else:
        record["response"] = {"status_code": status, "request_id": row.request_id, "body": body}
        if body is not None:
            # The API answered with an error: OpenAI's error files carry it in `response`
            # alone. (An error page that is not JSON leaves the body null: the reason goes in
            # `error`.)
            record["error"] = None
            return record
    code, message = failure_in(row, body)
    record["error"] = {"code": code, "message": message}
    return record


def _one_line_json(text: str) -> bytes:
    """Stored JSON text as it can be embedded in one JSONL line."""
    if "\n" in text or "\r" in text:
        # Pretty-printed by the server: newlines inside JSON strings are always escaped, so
        # these are whitespace between tokens, and a round trip removes them.
        return orjson.dumps(orjson.loads(text))
    return text.encode()


# --- output --------------------------------------------------------------------------------


#: Characters that end a line for Python's `str.splitlines()` (and other readers) and may stand
#: unescaped in a JSON string, as an API's answer or orjson writes them (JSON escapes the other
#: ones, control characters). Each of these byte sequences is only ever that character.
_LINE_BREAKS: Final = (
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
    (b"\xc2\x85", b"\\u0085"),
)


def _escaped_line_breaks(line: bytes) -> bytes:
    """A JSONL line whose unescaped U+2028, U+2029 and U+0085 (inside its strings: nowhere
    else in JSON) are escaped: the same JSON, read as one line by `splitlines()` too, which
    took one answer holding them for several lines, none of them JSON."""
    for raw, escaped in _LINE_BREAKS:
        line = line.replace(raw, escaped)
    return line


class _Sink:
    """A binary or text stream, written in large pieces."""

    def __init__(self, out: IO[Any]) -> None:
        self._out = out
        self._text = isinstance(out, io.TextIOBase) or "b" not in getattr(out, "mode", "b")
        #: JSONL lines not yet written, and how many bytes they hold.
        self._lines: list[bytes] = []
        self._line_bytes = 0

    def write_text(self, chunk: str) -> None:
        if chunk:
            self._out.write(chunk if self._text else chunk.encode())

    def write_line(self, line: bytes) -> None:
        """One JSONL line (without its newline); they go out WRITE_CHUNK_ROWS at a time, or
        fewer once they hold WRITE_CHUNK_BYTES."""
        if b"\xe2\x80" in line or b"\xc2\x85" in line:
            line = _escaped_line_breaks(line)
        self._lines.append(line)
        self._line_bytes += len(line)
        if len(self._lines) >= WRITE_CHUNK_ROWS or self._line_bytes >= WRITE_CHUNK_BYTES:
            self._write_lines()

    def _write_lines(self) -> None:
        if not self._lines:
            return
        data = b"\n".join(self._lines) + b"\n"
        self._lines = []
        self._line_bytes = 0
        self._out.write(data.decode() if self._text else data)

    def flush(self) -> None:
        """Write out the lines still held, and flush the stream."""
        self._write_lines()
        self._out.flush()


# --- queries for JobStore ------------------------------------------------------------------
# These two belong in store.py, the only module that should speak SQL; they are written as
# the JobStore methods they are meant to become (`JobStore.meta_keys`, `JobStore.iter_requests`).


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A job's request as it was submitted, and its state."""

    id: int
    line: int
    custom_id: str
    state: str
    endpoint: str
    model: str
    body: str
    meta: str | None


# Metadata holding a NUL character (written `\u0000` in its JSON) is read in Python: SQLite's
# json_each cuts a key at a NUL, and PostgreSQL's text cannot hold one.
_NUL_ESCAPE = "\\u0000"
_META_KEYS_SQLITE = (
    "SELECT DISTINCT k.key FROM jobs j, json_each(j.meta) k"
    " WHERE j.batch_id = :b AND j.meta IS NOT NULL AND instr(j.meta, :nul) = 0"
)
_META_KEYS_POSTGRES = (
    "SELECT DISTINCT k FROM jobs j, json_object_keys(j.meta::json) AS k"
    " WHERE j.batch_id = :b AND j.meta IS NOT NULL AND strpos(j.meta, :nul) = 0"
)
_META_WITH_NUL_SQLITE = (
    "SELECT meta FROM jobs WHERE batch_id = :b AND meta IS NOT NULL AND instr(meta, :nul) > 0"
)
_META_WITH_NUL_POSTGRES = (
    "SELECT meta FROM jobs WHERE batch_id = :b AND meta IS NOT NULL AND strpos(meta, :nul) > 0"
)


_REQUEST_COLUMNS = "id, line, custom_id, state, endpoint, model, body, meta"
# Pages walk the primary key between the batch's first and last ids. The unary `+` (SQLite)
# and `|| ''` (PostgreSQL) keep the planners off ix_jobs_claim, through which ORDER BY id would
# sort every remaining row of the batch on each page (PostgreSQL: 0.5-0.9 s a page for a
# million jobs).
_JOB_REQUESTS_SQLITE = (
    f"SELECT {_REQUEST_COLUMNS} FROM jobs WHERE id > :after AND id <= :last"
    " AND +batch_id = :b ORDER BY id LIMIT :limit"
)
_JOB_REQUESTS_POSTGRES = (
    f"SELECT {_REQUEST_COLUMNS} FROM jobs WHERE id > :after AND id <= :last"
    " AND batch_id || '' = :b ORDER BY id LIMIT :limit"
)


async def batch_meta_keys(store: JobStore, batch_id: str) -> list[str]:
    """Every key of the batch's job metadata, sorted (by code point, the same on every
    backend). Metadata is fixed at submit, so the answer holds for the whole export.

    Submit keeps them with the batch; those of a batch loaded before that are read from its
    jobs (a second per million jobs)."""
    params = {"b": batch_id, "nul": _NUL_ESCAPE}
    sqlite = store.is_sqlite
    async with store.reading() as conn:
        kept = (await conn.execute("SELECT meta_keys FROM batches WHERE id = :b", params)).scalar()
        if kept is not None:
            return [str(key) for key in orjson.loads(kept)]
        keys = {
            str(r[0])
            for r in await conn.execute(
                _META_KEYS_SQLITE if sqlite else _META_KEYS_POSTGRES, params
            )
        }
        for (meta,) in await conn.execute(
            _META_WITH_NUL_SQLITE if sqlite else _META_WITH_NUL_POSTGRES, params
        ):
            keys.update(loads_object(meta))
    return sorted(keys)


async def iter_job_requests(
    store: JobStore,
    batch_id: str,
    *,
    states: Collection[JobState] | None = None,
    chunk_rows: int = 2_000,
) -> AsyncIterator[JobRequest]:
    """The batch's jobs (those in `states`, default all) in line order, with their bodies;
    pages by id, like `JobStore.iter_export_rows`, so that no read transaction stays open: of
    `chunk_rows` jobs, or fewer where the bodies are large (images as base64, see
    `JobStore.ids_per_page`)."""
    wanted = None if states is None else {JobState(s).value for s in states}
    span = await store.export_span(batch_id)
    if span is None:
        return
    last = span[1]
    chunk_rows = await store.ids_per_page(batch_id, span, chunk_rows, bodies=True)
    sql = _JOB_REQUESTS_SQLITE if store.is_sqlite else _JOB_REQUESTS_POSTGRES
    # (From the batch's first job: from 0, the first page walked every older batch's rows.)
    after = span[0] - 1
    while True:
        params = {"b": batch_id, "after": after, "last": last, "limit": chunk_rows}
        async with store.reading() as conn:
            rows = (await conn.execute(sql, params)).all()
        for r in rows:
            if wanted is None or r[3] in wanted:
                yield JobRequest(*r)
        if len(rows) < chunk_rows:
            return
        after = rows[-1][0]
