"""Exported jobs: the rows the export query reads, and their CSV text.

What the worker processes of a parallel CSV export run, kept apart from the database code: a
worker imports this module (orjson, the price book) and, on SQLite, reads its pages with the
standard library's sqlite3, so it starts without importing SQLAlchemy (0.6 s of CPU each).
`batchrunner.export` has the rest: the formats, the order of the pages, the output.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, Protocol

import orjson

from batchrunner.errors import StoreError
from batchrunner.pricing import PRICE_PERIOD_S, PriceBook, price_period_time
from batchrunner.states import JobState

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

_EMPTY: Final = ""


def csv_header(meta_keys: Sequence[str]) -> list[str]:
    """The CSV header for a batch whose metadata has these keys (`export.batch_meta_keys`)."""
    if len(meta_keys) > MAX_META_COLUMNS:
        return [*CSV_COLUMNS, "meta"]
    return [*CSV_COLUMNS, *(META_PREFIX + key for key in meta_keys)]


class ExportRow(NamedTuple):
    """A job and, when it succeeded, its result: what export writes. A failed job's
    `request_id` and `latency_ms` are those of its last attempt.

    A named tuple, not a dataclass: export makes one per row, a million of them for a large
    batch, and a tuple is several times cheaper to build.
    """

    id: int
    line: int
    custom_id: str
    state: str
    model: str
    meta: str | None
    attempts: int
    error_kind: str | None
    last_status: int | None
    last_error: str | None
    response: str | None
    status_code: int | None
    request_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    total_tokens: int | None
    schema_valid: bool | None
    latency_ms: float | None
    #: When the result was recorded (Unix time): prices may depend on it.
    finished_at: float | None


ENDED_STATES = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
FAILED_ONLY = (JobState.FAILED.value,)


def _last_attempt(column: str) -> str:
    """A failed job's answer lives in its last attempt (written with its end, so the last
    by id; not by start time, which is each worker's clock): only failed rows look it up,
    their attempts found through uq_attempts_job_started (job_id, started_at). Ordered by
    `a.id` itself, PostgreSQL without statistics yet (a fresh database, autovacuum not yet by)
    walked the whole table's primary key backwards for each failed job instead: 36 s for an
    export of 60,000 jobs of which 6,000 failed, under 1 s so; `a.id + 0` is no key of an
    index, so the planners find the job's few attempts first and sort them."""
    return (
        f"CASE WHEN j.state = 'failed' THEN (SELECT a.{column} FROM attempts a"
        " WHERE a.job_id = j.id ORDER BY a.id + 0 DESC LIMIT 1) END"
    )


#: A cancelled job's attempts are those of its log: one in flight when the batch was cancelled
#: was logged (its answer kept among those paid for) when it came, but its job had ended
#: already, and said 0.
_ATTEMPTS = (
    "CASE WHEN j.state = 'cancelled' THEN (SELECT count(*) FROM attempts a"
    " WHERE a.job_id = j.id) ELSE j.attempts END"
)


def export_page_sql(sqlite: bool, states: Sequence[str]) -> str:
    """The export query for the jobs in `states` with ids in (:lo, :hi].

    The unary `+` (SQLite) and `|| ''` (PostgreSQL, which has no unary `+` for text) keep the
    planners off ix_jobs_claim (batch_id, state, id): through it, each page would read every
    state's rows and sort them; on the primary key a page is a plain range scan (on
    PostgreSQL a merge join of both primary keys; the results' range is spelled out for that).
    PostgreSQL took that way by itself once it had statistics of the batch, but before (a
    batch submitted into a table ten times its size is not analyzed for hours) a page of a
    million-job batch took 0.1-0.2 s instead of 3 ms.
    """
    in_states = ", ".join(f"'{state}'" for state in states)
    batch = "+j.batch_id" if sqlite else "j.batch_id || ''"
    state = "+j.state" if sqlite else "j.state"
    return (
        f"SELECT j.id, j.line, j.custom_id, j.state, j.model, j.meta, {_ATTEMPTS},"
        " j.error_kind, j.last_status, j.last_error, r.response, r.status_code,"
        f" COALESCE(r.request_id, {_last_attempt('request_id')}),"
        " r.prompt_tokens, r.completion_tokens, r.cached_tokens,"
        " r.reasoning_tokens, r.total_tokens, r.schema_valid,"
        f" COALESCE(r.latency_ms, {_last_attempt('latency_ms')}), r.finished_at"
        " FROM jobs j LEFT JOIN results r"
        " ON r.job_id = j.id AND r.job_id > :lo AND r.job_id <= :hi"
        f" WHERE {batch} = :b AND {state} IN ({in_states})"
        " AND j.id > :lo AND j.id <= :hi ORDER BY j.id"
    )


# --- CSV -----------------------------------------------------------------------------------


def csv_text(page: list[ExportRow], add: Callable[[ExportRow, list[str]], None]) -> tuple[str, int]:
    """A page's CSV text, and how many records (lines) it holds."""
    lines: list[str] = []
    for row in page:
        add(row, lines)
    return "".join(lines), len(lines)


def cell(value: object) -> str:
    """One CSV cell, as RFC 4180 and Python's csv module (QUOTE_MINIMAL) write it: None is
    empty, anything else its str(); quoted when it holds a comma, a quote or a line break,
    with its quotes doubled."""
    if value is None:
        return _EMPTY
    text = value if type(value) is str else str(value)
    if '"' in text:
        return '"' + text.replace('"', '""') + '"'
    if "," in text or "\n" in text or "\r" in text:
        return '"' + text + '"'
    return text


class CsvLines:
    """Turns exported jobs into CSV lines (one per choice), cells written by `cell`.

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
        if response is None or state != SUCCEEDED:
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
                failure(row)[1],
            )
            lines.append(",".join(map(cell, cells)) + meta + CRLF)
            return
        completion = loads_object(response)
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
            f",{_EMPTY if latency is None else latency},{attempts},{cell(request_id)},"
            f"{_BOOL_CELLS[schema_valid]},{_EMPTY if status_code is None else status_code},,"
            f"{meta}{CRLF}"
        )
        head = f"{cell(custom_id)},{line},{SUCCEEDED},"
        model_cell = cell(model)
        choices = completion.get("choices")
        if type(choices) is not list or not choices:
            choices = [{}]
        usage_at = _lowest_choice(choices) if len(choices) > 1 else 0
        for number, choice in enumerate(choices):
            if type(choice) is not dict:
                choice = {}
            message = choice.get("message")
            if type(message) is not dict:
                message = {}
            content = message.get("content")
            if content is not None and type(content) is not str:
                content = json_text(content)
            refusal = message.get("refusal")
            if refusal is not None and type(refusal) is not str:
                refusal = json_text(refusal)
            tool_calls = message.get("tool_calls")
            index = choice.get("index")
            lines.append(
                f"{head}{index if type(index) is int else number},{model_cell},"
                f"{cell(choice.get('finish_reason'))},"
                f"{cell(content)},"
                f"{cell(json_text(tool_calls)) if tool_calls else _EMPTY},"
                f"{cell(refusal)},"
                f"{usage if number == usage_at else _NO_USAGE_TEXT}{tail}"
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
            return "," + cell(meta_text)
        meta = loads_object(meta_text)
        # Strings and whole numbers as they are (an int's text is its JSON text); anything
        # else as its JSON text.
        return "".join(
            [
                ","
                + (
                    cell(value)
                    if type(value) is str
                    else str(value)
                    if type(value) is int
                    else _EMPTY
                    if value is None
                    else cell(json_text(value))
                )
                for value in map(meta.get, self._meta_keys)
            ]
        )


_NO_USAGE: Final = (None,) * 6
_NO_USAGE_TEXT: Final = ",,,,,"
CRLF: Final = "\r\n"
#: Usage cells remembered at most (a few MB); past that the memo starts again.
_MAX_USAGE: Final = 50_000


SUCCEEDED: Final = JobState.SUCCEEDED.value
CANCELLED: Final = JobState.CANCELLED.value
_BOOL_CELLS: Final[dict[bool | None, str]] = {None: _EMPTY, True: "true", False: "false"}


def _lowest_choice(choices: list[Any]) -> int:
    """Where in `choices` the choice numbered lowest is, whose row gets the answer's usage:
    the first, unless the API sent its choices out of order (the first of those numbered
    alike)."""
    lowest: int | None = None
    at = 0
    for position, choice in enumerate(choices):
        index = choice.get("index") if type(choice) is dict else None
        if type(index) is int and (lowest is None or index < lowest):
            lowest, at = index, position
    return at


def json_text(value: object) -> str:
    return orjson.dumps(value).decode()


def error_body(error_text: str | None) -> dict[str, Any] | None:
    if not error_text or not error_text.lstrip().startswith("{"):
        return None
    try:
        body = orjson.loads(error_text)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def failure(row: ExportRow) -> tuple[str, str]:
    """(code, message) of a job that did not succeed, in OpenAI's terms where it gave them."""
    return failure_in(row, error_body(row.last_error))


def failure_in(row: ExportRow, body: dict[str, Any] | None) -> tuple[str, str]:
    """`failure` of a row whose error body (`error_body(row.last_error)`) is parsed already."""
    code = row.error_kind or row.state
    message = row.last_error or _EMPTY
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


def loads_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# --- the pages of a worker process ---------------------------------------------------------


class _PageSource(Protocol):
    """Where a worker reads its pages: `JobStore` itself, or `_SqliteReader`."""

    async def export_page(
        self, batch_id: str, lo: int, hi: int, *, failed_only: bool = False
    ) -> list[ExportRow]: ...

    async def close(self) -> None: ...


class _SqliteReader:
    """SQLite: `JobStore.export_page`'s query, through the standard library's sqlite3.
    Blocking is fine: the worker's event loop runs nothing else meanwhile."""

    def __init__(self, uri: str, busy_timeout_ms: int) -> None:
        try:
            # A URI that never creates an empty database where the batch's was
            # (SqliteTarget.uri_for_existing).
            self._conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=busy_timeout_ms / 1000,
                # Each query is its own read transaction, as JobStore.export_page's is.
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {uri}: {exc}") from exc

    async def export_page(
        self, batch_id: str, lo: int, hi: int, *, failed_only: bool = False
    ) -> list[ExportRow]:
        sql = export_page_sql(True, FAILED_ONLY if failed_only else ENDED_STATES)
        try:
            rows = self._conn.execute(sql, {"b": batch_id, "lo": lo, "hi": hi}).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"database read failed: {exc}") from exc
        make = ExportRow._make
        return [make(r) for r in rows]

    async def close(self) -> None:
        self._conn.close()


class _Pages:
    """In a worker process of a parallel export: pages of the batch in, their CSV text out."""

    def __init__(
        self, source: _PageSource, batch_id: str, failed_only: bool, lines: CsvLines
    ) -> None:
        self._source = source
        self._batch_id = batch_id
        self._failed_only = failed_only
        self._add = lines.add

    async def handle(self, ids: tuple[int, int]) -> tuple[str, int]:
        """The CSV text of the jobs with ids in (lo, hi], and how many records it holds."""
        lo, hi = ids
        page = await self._source.export_page(self._batch_id, lo, hi, failed_only=self._failed_only)
        return csv_text(page, self._add)

    async def close(self) -> None:
        await self._source.close()


async def open_csv_pages(
    url: str,
    sqlite_file: tuple[str, int] | None,
    batch_id: str,
    failed_only: bool,
    prices: PriceBook,
    meta_keys: list[str],
) -> _Pages:
    """The setup of an export's worker process (see `OrderedWorkers`): `sqlite_file` is the
    SQLite database's URI (see SqliteTarget.uri_for_existing) and busy timeout (ms), None for
    another database, opened by `url`."""
    lines = CsvLines(prices, meta_keys)
    if sqlite_file is not None:
        return _Pages(_SqliteReader(*sqlite_file), batch_id, failed_only, lines)
    from batchrunner.store import JobStore  # and with it asyncpg: only for PostgreSQL

    return _Pages(await JobStore.open(url), batch_id, failed_only, lines)
