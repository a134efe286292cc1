"""Results out of the job store, streaming: CSV for people, JSONL in OpenAI's Batch output format.

Both formats read the batch page by page (`JobStore.iter_export_rows`) and write as they go, so
memory stays flat whatever the batch size. A large CSV export can hand the pages to worker
processes, one per core (`workers=None`, as `batchrunner export` does), and writes their CSV in
order. Only jobs that have ended are exported: an export taken while a run is going shows what
has ended so far, and taking it again later shows more.

CSV (`CSV_COLUMNS`, then one `meta.<key>` column per key of the jobs' metadata):

* One row per job; a completion with `n` > 1 choices gives one row per choice, numbered in the
  `choice` column. Usage and cost are per request, so the token and `cost_usd` cells are filled
  on the row of choice 0 only: summing a column gives the batch's totals.
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
byte for byte. A failed job has `"error": {"code", "message"}`; when the API answered, `response`
holds its status and its error body (null when the body was not JSON), otherwise `response` is
null (timeouts, connection errors). Cancelled jobs: `response` null, code `batch_cancelled`.

`failed_only=True` exports failed jobs only. To send them again, either `batchrunner retry BATCH`
then `batchrunner run BATCH` (same batch, same endpoint), or `export_requests`, which writes the
failed jobs as a new request file (OpenAI Batch input lines with their `custom_id` and
metadata) to submit as a new batch, for instance against another endpoint or model.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Final, Literal, TextIO

import orjson
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from batchrunner import db
from batchrunner.bulk import OrderedWorkers, collector_paused, workers_for
from batchrunner.errors import StoreError
from batchrunner.models import JobState
from batchrunner.pricing import PRICE_PERIOD_S, PriceBook, price_period_time
from batchrunner.store import ExportRow, JobStore, export_page_ranges

ExportFormat = Literal["csv", "jsonl"]

#: The CSV columns before the metadata ones, in order.
CSV_COLUMNS: Final = (
    "custom_id",
    "line",
    "state",
    "choice",
    "model",
    "finish_reason",
    "content",
    "tool_calls",
    "refusal",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
    "latency_ms",
    "attempts",
    "request_id",
    "schema_valid",
    "status_code",
    "error_kind",
    "error",
)
#: Prefix of the metadata columns: `meta.topic` for a job whose metadata has a key `topic`.
META_PREFIX: Final = "meta."
#: More distinct metadata keys than this (ids used as keys, say) would make an unreadable sheet:
#: the whole metadata object goes into one `meta` column instead.
MAX_META_COLUMNS: Final = 200
#: Jobs the store reads per query.
PAGE_ROWS: Final = 5_000
#: CSV exports of batches of this many jobs or more are made by worker processes, one per
#: usable core (on two cores or more): below that, starting them costs more than they save.
PARALLEL_MIN_JOBS: Final = 50_000
#: JSONL lines written in one piece.
WRITE_CHUNK_ROWS: Final = 2_000
#: OpenAI's code and message for a request of a cancelled batch.
CANCELLED_CODE: Final = "batch_cancelled"
CANCELLED_MESSAGE: Final = "This request was not executed because the batch was cancelled."

_UTF8_BOM: Final = "\ufeff"
_EMPTY: Final = ""


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
        url = store.url_for_other_processes()
        # Only an export that may use workers needs the span up front.
        span = await store.export_span(batch_id) if url is not None and workers != 0 else None
        if workers is None:
            jobs = 0 if span is None else span[1] - span[0] + 1
            workers = workers_for(jobs >= PARALLEL_MIN_JOBS)
        prices = prices or PriceBook.load()
        with collector_paused():
            if url is not None and span is not None and workers > 0:
                pool: OrderedWorkers[tuple[int, int], tuple[str, int]] = OrderedWorkers(
                    _open_csv_pages, workers, name="export", error=StoreError
                )
                try:
                    # The workers start up while this process reads the metadata keys
                    # (which reads every job's metadata: a second for a million jobs).
                    pool.start()
                    meta_keys = await batch_meta_keys(store, batch_id)
                    setup = (url, batch_id, failed_only, prices, meta_keys)
                    written = await _write_csv_by_workers(
                        pool.map(setup, export_page_ranges(span, PAGE_ROWS)),
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
    chunk: list[bytes] = []
    async for job in iter_job_requests(store, batch_id, states=states):
        line: dict[str, Any] = {
            "custom_id": job.custom_id,
            "method": "POST",
            "url": job.endpoint,
            "body": orjson.Fragment(_one_line_json(job.body)),
        }
        if job.meta:
            line["metadata"] = orjson.Fragment(_one_line_json(job.meta))
        chunk.append(orjson.dumps(line))
        written += 1
        if len(chunk) >= WRITE_CHUNK_ROWS:
            sink.write_lines(chunk)
            chunk = []
    sink.write_lines(chunk)
    sink.flush()
    return written


def csv_header(meta_keys: Sequence[str]) -> list[str]:
    """The CSV header for a batch whose metadata has these keys (see `batch_meta_keys`)."""
    if len(meta_keys) > MAX_META_COLUMNS:
        return [*CSV_COLUMNS, "meta"]
    return [*CSV_COLUMNS, *(META_PREFIX + key for key in meta_keys)]


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
    add = _CsvLines(prices, meta_keys).add
    written = 0
    async for page in pages:
        text, count = _csv_text(page, add)
        sink.write_text(text)
        written += count
    return written


def _header_text(meta_keys: list[str], *, bom: bool) -> str:
    header = ",".join(map(_cell, csv_header(meta_keys))) + _CRLF
    return _UTF8_BOM + header if bom else header


def _csv_text(
    page: list[ExportRow], add: Callable[[ExportRow, list[str]], None]
) -> tuple[str, int]:
    """A page's CSV text, and how many records (lines) it holds."""
    lines: list[str] = []
    for row in page:
        add(row, lines)
    return "".join(lines), len(lines)


class _CsvPages:
    """In a worker process of a parallel export: pages of the batch in, their CSV text out."""

    def __init__(self, store: JobStore, batch_id: str, failed_only: bool, lines: _CsvLines) -> None:
        self._store = store
        self._batch_id = batch_id
        self._failed_only = failed_only
        self._add = lines.add

    async def handle(self, ids: tuple[int, int]) -> tuple[str, int]:
        """The CSV text of the jobs with ids in (lo, hi], and how many records it holds."""
        lo, hi = ids
        page = await self._store.export_page(self._batch_id, lo, hi, failed_only=self._failed_only)
        return _csv_text(page, self._add)

    async def close(self) -> None:
        await self._store.close()


async def _open_csv_pages(
    url: str, batch_id: str, failed_only: bool, prices: PriceBook, meta_keys: list[str]
) -> _CsvPages:
    store = await JobStore.open(url)
    return _CsvPages(store, batch_id, failed_only, _CsvLines(prices, meta_keys))


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


def _cell(value: object) -> str:
    """One CSV cell, as RFC 4180 and Python's csv module (QUOTE_MINIMAL) write it: None is
    empty, anything else its str(); quoted when it holds a comma, a quote or a line break,
    with its quotes doubled."""
    if value is None:
        return _EMPTY
    cell = value if type(value) is str else str(value)
    if '"' in cell:
        return '"' + cell.replace('"', '""') + '"'
    if "," in cell or "\n" in cell or "\r" in cell:
        return '"' + cell + '"'
    return cell


class _CsvLines:
    """Turns exported jobs into CSV lines (one per choice), cells written by `_cell`.

    `add` runs once per exported job, a million times for a large batch: it reads the row as
    a tuple, prices it from its token counts directly and writes each line with one f-string
    (the csv module's writer took a third of a row's time), each step measured to matter.
    """

    def __init__(self, prices: PriceBook, meta_keys: list[str]) -> None:
        self._prices = prices
        self._price = prices.tokens_cost
        # The usage cells (token counts and cost) of each (model, token counts, price period)
        # already written: a batch's answers repeat the same few counts, and pricing plus
        # formatting a Decimal is a tenth of a row's work. The period is -1 for models whose
        # price does not change in time.
        self._usage: dict[tuple[str, int, int, int, int, int, int], str] = {}
        #: Whether each model's price changes with the date or time of day.
        self._varies: dict[str, bool] = {}
        self._meta_keys = meta_keys
        self._whole_meta = len(meta_keys) > MAX_META_COLUMNS
        # The metadata cells of a job without metadata: empty ones, each after its comma.
        self._no_meta = "," * (1 if self._whole_meta else len(meta_keys))

    def add(self, row: ExportRow, lines: list[str]) -> None:
        """Append the CSV lines of `row` to `lines`."""
        (
            _id,
            line,
            custom_id,
            state,
            job_model,
            meta_text,
            attempts,
            _error_kind,
            _last_status,
            _last_error,
            response,
            status_code,
            request_id,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            reasoning_tokens,
            total_tokens,
            schema_valid,
            latency_ms,
            finished_at,
        ) = row
        meta = self._meta_text(meta_text) if meta_text else self._no_meta
        latency = None if latency_ms is None else round(latency_ms, 1)
        if response is None or state != _SUCCEEDED:
            cells = (
                custom_id,
                line,
                state,
                None,
                job_model,
                None,
                None,
                None,
                None,
                *_NO_USAGE,
                latency,
                attempts,
                request_id,
                None,
                row.last_status,
                row.error_kind,
                _failure(row)[1],
            )
            lines.append(",".join(map(_cell, cells)) + meta + _CRLF)
            return
        completion = _loads_object(response)
        model = completion.get("model")
        if type(model) is not str or not model:
            model = job_model
        if prompt_tokens is not None and type(completion.get("usage")) is dict:
            completion_tokens = completion_tokens or 0
            cached_tokens = cached_tokens or 0
            reasoning_tokens = reasoning_tokens or 0
            total_tokens = total_tokens or 0
            varies = self._varies.get(model)
            if varies is None:
                shape = self._prices.shape(model)
                varies = self._varies[model] = shape is not None and shape.varies_in_time
            period = int(finished_at // PRICE_PERIOD_S) if varies and finished_at else -1
            key = (
                model,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                reasoning_tokens,
                total_tokens,
                period,
            )
            try:
                usage = self._usage[key]
            except KeyError:
                usage = self._usage_cells(key)
        else:
            # No usage in the answer: unknown, which is not zero.
            usage = _NO_USAGE_TEXT
        # The cells after the usage ones, the same on every line of the job.
        tail = (
            f",{_EMPTY if latency is None else latency},{attempts},{_cell(request_id)},"
            f"{_BOOL_CELLS[schema_valid]},{_EMPTY if status_code is None else status_code},,"
            f"{meta}{_CRLF}"
        )
        head = f"{_cell(custom_id)},{line},{_SUCCEEDED},"
        model_cell = _cell(model)
        choices = completion.get("choices")
        if type(choices) is not list or not choices:
            choices = [{}]
        for number, choice in enumerate(choices):
            if type(choice) is not dict:
                choice = {}
            message = choice.get("message")
            if type(message) is not dict:
                message = {}
            content = message.get("content")
            if content is not None and type(content) is not str:
                content = _json_text(content)
            refusal = message.get("refusal")
            if refusal is not None and type(refusal) is not str:
                refusal = _json_text(refusal)
            tool_calls = message.get("tool_calls")
            index = choice.get("index")
            lines.append(
                f"{head}{index if type(index) is int else number},{model_cell},"
                f"{_cell(choice.get('finish_reason'))},"
                f"{_cell(content)},"
                f"{_cell(_json_text(tool_calls)) if tool_calls else _EMPTY},"
                f"{_cell(refusal)},"
                f"{usage if number == 0 else _NO_USAGE_TEXT}{tail}"
            )

    def _usage_cells(self, key: tuple[str, int, int, int, int, int, int]) -> str:
        model, prompt, cached, completion, reasoning, total, period = key
        # Priced as the request ran: within a period the price stays the same.
        at = None if period < 0 else price_period_time(period)
        cost = self._price(model, prompt, cached, completion, reasoning, at=at)
        cost_cell = _EMPTY if cost is None else format(cost, "f")  # str() could say 4.5E-7
        cells = f"{prompt},{cached},{completion},{reasoning},{total},{cost_cell}"
        if len(self._usage) >= _MAX_USAGE:
            self._usage.clear()
        self._usage[key] = cells
        return cells

    def _meta_text(self, meta_text: str) -> str:
        """The job's metadata cells, each after its comma."""
        if self._whole_meta:
            return "," + _cell(meta_text)
        meta = _loads_object(meta_text)
        # Strings and whole numbers as they are (an int's text is its JSON text); anything
        # else as its JSON text.
        return "".join(
            [
                ","
                + (
                    _cell(value)
                    if type(value) is str
                    else str(value)
                    if type(value) is int
                    else _EMPTY
                    if value is None
                    else _cell(_json_text(value))
                )
                for value in map(meta.get, self._meta_keys)
            ]
        )


_NO_USAGE: Final = (None,) * 6
_NO_USAGE_TEXT: Final = ",,,,,"
_CRLF: Final = "\r\n"
#: Usage cells remembered at most (a few MB); past that the memo starts again.
_MAX_USAGE: Final = 50_000


_SUCCEEDED: Final = JobState.SUCCEEDED.value
_CANCELLED: Final = JobState.CANCELLED.value
_BOOL_CELLS: Final[dict[bool | None, str]] = {None: _EMPTY, True: "true", False: "false"}


def _json_text(value: object) -> str:
    return orjson.dumps(value).decode()


# --- JSONL ---------------------------------------------------------------------------------


async def _write_jsonl(rows: AsyncIterator[ExportRow], sink: _Sink, id_prefix: str) -> int:
    written = 0
    chunk: list[bytes] = []
    async for row in rows:
        chunk.append(orjson.dumps(_jsonl_record(row, id_prefix)))
        if len(chunk) >= WRITE_CHUNK_ROWS:
            sink.write_lines(chunk)
            written += len(chunk)
            chunk = []
    sink.write_lines(chunk)
    return written + len(chunk)


def _request_id_prefix(batch_id: str) -> str:
    # Stable ids: the same batch exports the same ids on every database it is loaded into.
    return f"batch_req_{batch_id.removeprefix('batch_')}_"


def _jsonl_record(row: ExportRow, id_prefix: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": f"{id_prefix}{row.line}", "custom_id": row.custom_id}
    if row.state == _SUCCEEDED and row.response is not None:
        record["response"] = {
            "status_code": row.status_code,
            "request_id": row.request_id,
            "body": orjson.Fragment(_one_line_json(row.response)),
        }
        record["error"] = None
        return record
    if row.state == _CANCELLED:
        record["response"] = None
        record["error"] = {"code": CANCELLED_CODE, "message": CANCELLED_MESSAGE}
        return record
    body, (code, message) = _error_body(row.last_error), _failure(row)
    record["response"] = (
        None
        if row.last_status is None
        else {"status_code": row.last_status, "request_id": row.request_id, "body": body}
    )
    record["error"] = {"code": code, "message": message}
    return record


def _one_line_json(text: str) -> bytes:
    """Stored JSON text as it can be embedded in one JSONL line."""
    if "\n" in text or "\r" in text:
        # Pretty-printed by the server: newlines inside JSON strings are always escaped, so
        # these are whitespace between tokens, and a round trip removes them.
        return orjson.dumps(orjson.loads(text))
    return text.encode()


def _error_body(error_text: str | None) -> dict[str, Any] | None:
    if not error_text or not error_text.lstrip().startswith("{"):
        return None
    try:
        body = orjson.loads(error_text)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _failure(row: ExportRow) -> tuple[str, str]:
    """(code, message) of a job that did not succeed, in OpenAI's terms where it gave them."""
    code = row.error_kind or row.state
    message = row.last_error or _EMPTY
    body = _error_body(row.last_error)
    error = body.get("error") if body is not None else None
    if isinstance(error, dict):
        if isinstance(error.get("message"), str):
            message = error["message"]
        api_code = error.get("code") or error.get("type")
        if isinstance(api_code, str) and api_code:
            code = api_code
    elif isinstance(error, str):
        message = error
    return code, message


# --- output --------------------------------------------------------------------------------


def _loads_object(json_text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(json_text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class _Sink:
    """A binary or text stream, written in large pieces."""

    def __init__(self, out: IO[Any]) -> None:
        self._out = out
        self._text = isinstance(out, io.TextIOBase) or "b" not in getattr(out, "mode", "b")

    def write_text(self, chunk: str) -> None:
        if chunk:
            self._out.write(chunk if self._text else chunk.encode())

    def write_lines(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"\n".join(lines) + b"\n"
        self._out.write(data.decode() if self._text else data)

    def flush(self) -> None:
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
_META_KEYS_SQLITE = text(
    "SELECT DISTINCT k.key FROM jobs j, json_each(j.meta) k"
    " WHERE j.batch_id = :b AND j.meta IS NOT NULL AND instr(j.meta, :nul) = 0"
)
_META_KEYS_POSTGRES = text(
    "SELECT DISTINCT k FROM jobs j, json_object_keys(j.meta::json) AS k"
    " WHERE j.batch_id = :b AND j.meta IS NOT NULL AND strpos(j.meta, :nul) = 0"
)
_META_WITH_NUL_SQLITE = text(
    "SELECT meta FROM jobs WHERE batch_id = :b AND meta IS NOT NULL AND instr(meta, :nul) > 0"
)
_META_WITH_NUL_POSTGRES = text(
    "SELECT meta FROM jobs WHERE batch_id = :b AND meta IS NOT NULL AND strpos(meta, :nul) > 0"
)


_LAST_JOB_ID = text("SELECT MAX(id) FROM jobs WHERE batch_id = :b")
_REQUEST_COLUMNS = "id, line, custom_id, state, endpoint, model, body, meta"
# Pages walk the primary key between the batch's first and last ids. On SQLite the unary `+`
# keeps the planner off ix_jobs_claim, through which ORDER BY id would sort every remaining row
# of the batch on each page.
_JOB_REQUESTS_SQLITE = text(
    f"SELECT {_REQUEST_COLUMNS} FROM jobs WHERE id > :after AND id <= :last"
    " AND +batch_id = :b ORDER BY id LIMIT :limit"
)
_JOB_REQUESTS_POSTGRES = text(
    f"SELECT {_REQUEST_COLUMNS} FROM jobs WHERE batch_id = :b AND id > :after AND id <= :last"
    " ORDER BY id LIMIT :limit"
)


async def batch_meta_keys(store: JobStore, batch_id: str) -> list[str]:
    """Every key of the batch's job metadata, sorted (by code point, the same on every
    backend). Metadata is fixed at submit, so the answer holds for the whole export.

    Submit keeps them with the batch; those of a batch loaded before that are read from its
    jobs (a second per million jobs)."""
    params = {"b": batch_id, "nul": _NUL_ESCAPE}
    sqlite = store.is_sqlite
    async with _read(store) as conn:
        kept = (
            await conn.execute(text("SELECT meta_keys FROM batches WHERE id = :b"), params)
        ).scalar()
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
            keys.update(_loads_object(meta))
    return sorted(keys)


async def iter_job_requests(
    store: JobStore,
    batch_id: str,
    *,
    states: Collection[JobState] | None = None,
    chunk_rows: int = 2_000,
) -> AsyncIterator[JobRequest]:
    """The batch's jobs (those in `states`, default all) in line order, with their bodies;
    pages by id, like `JobStore.iter_export_rows`, so that no read transaction stays open."""
    wanted = None if states is None else {JobState(s).value for s in states}
    async with _read(store) as conn:
        last = (await conn.execute(_LAST_JOB_ID, {"b": batch_id})).scalar()
    if last is None:
        return
    sql = _JOB_REQUESTS_SQLITE if store.is_sqlite else _JOB_REQUESTS_POSTGRES
    after = 0
    while True:
        params = {"b": batch_id, "after": after, "last": last, "limit": chunk_rows}
        async with _read(store) as conn:
            rows = (await conn.execute(sql, params)).all()
        for r in rows:
            if wanted is None or r[3] in wanted:
                yield JobRequest(*r)
        if len(rows) < chunk_rows:
            return
        after = rows[-1][0]


@asynccontextmanager
async def _read(store: JobStore) -> AsyncIterator[AsyncConnection]:
    # As JobStore._read: a plain BEGIN, so that reading never takes SQLite's write lock.
    try:
        async with store.engine.connect() as conn:
            await conn.execution_options(**{db.READ_ONLY: True})
            yield conn
    except (OperationalError, DBAPIError) as exc:
        raise StoreError(f"database read failed: {exc.orig or exc}") from exc
