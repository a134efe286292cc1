"""Request files in, validated jobs out: both input formats, line numbers, bulk load.

A file is read twice, streaming both times so that memory does not grow with its size:
once to hash it (the same content is the same batch), once to validate and load it inside
one transaction. A large file loaded into SQLite is validated by worker processes, a block of
lines each at a time (`batchrunner.lines`, which they import without the database code),
while this process loads what they send back in line order. A duplicate `custom_id` is
caught by the database's unique constraint; only then is the file read a third time, with a
set of ids, to say which lines repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson

from batchrunner.bulk import OrderedWorkers, collector_paused, workers_for
from batchrunner.config import (
    DEFAULT_API_KEY_ENV,
    DEFAULT_BASE_URL,
    DEMO_KEY_ENV,
    check_base_url,
    check_key_env,
)
from batchrunner.errors import InputError, LineError, StoreError, UsageError
from batchrunner.lines import (
    BOM,
    JobRow,
    NewJob,
    ParsedBlock,
    check_request_file,
    open_block_parser,
    read_jobs,
    read_rows,
)
from batchrunner.states import BATCH_NAME_CHARS, cancelled_for_good, kept_text
from batchrunner.store import BatchExists, BatchInfo, DuplicateCustomId, JobStore

#: Jobs handed to the database per INSERT...
CHUNK_ROWS = 5_000
#: ...or fewer, when their request bodies hold this many characters: a file of large lines
#: (images as base64) would otherwise be held in memory thousands of lines at a time, a
#: chunk being parsed and two being inserted.
CHUNK_BODY_CHARS = 8 << 20
#: Chunks handed to the database before the oldest is waited for: the next one is queued on
#: the writer's thread while it inserts one, so that it never waits for this process.
INSERTS_AHEAD = 2
#: Files this large or larger are parsed by worker processes, one per usable core (on two
#: cores or more), while this process loads what they send back into SQLite: parsing and
#: binding the INSERT both need the interpreter, so in one process they take turns. Below
#: it, starting the workers (~0.5 s) costs more than they save.
PARALLEL_MIN_BYTES = 16 << 20
#: A piece of the file handed to a worker: whole lines, about this many bytes.
BLOCK_BYTES = 1 << 20
#: How many bad lines an error message lists before it only counts them.
SHOWN_ERRORS = 20
_HASH_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class SubmitResult:
    batch: BatchInfo
    #: False when the same content had been submitted before and nothing was added.
    created: bool
    jobs: int
    #: The first bad lines (all of them are in the database with --skip-invalid).
    invalid: list[LineError]
    invalid_total: int
    #: Notes for the user that are not errors (a byte order mark that was dropped, ...).
    notices: list[str]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def batch_id_for(sha256: str) -> str:
    return f"batch_{sha256[:16]}"


def _blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """The file in pieces of whole lines of about BLOCK_BYTES: (number of the first line,
    the lines with their newlines; the last piece may end without one)."""
    number = 1
    # The start of a line not ended yet, in the pieces read: a line of hundreds of megabytes
    # is joined once, not at every read (which took 14 s for one of 200 MB).
    rest: list[bytes] = []
    with path.open("rb") as f:
        while chunk := f.read(BLOCK_BYTES):
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                rest.append(chunk)  # a line longer than a block: read on
                continue
            block = b"".join([*rest, chunk[:cut]]) if rest else chunk[:cut]
            rest = [chunk[cut:]] if cut < len(chunk) else []
            yield number, block
            number += block.count(b"\n")
    if rest:
        yield number, b"".join(rest)


#: Where a `JobRow` holds the request body.
_BODY = NewJob._fields.index("body")
_body_of = itemgetter(_BODY)


async def _parsed_in_process(path: Path) -> AsyncGenerator[ParsedBlock, None]:
    jobs: list[JobRow] = []
    errors: list[LineError] = []
    meta_keys: set[str] = set()  # read_rows adds each line's keys to this very set
    chars = 0
    for item in read_rows(path, meta_keys):
        if isinstance(item, LineError):
            errors.append(item)
            continue
        jobs.append(item)
        chars += len(_body_of(item))
        if len(jobs) >= CHUNK_ROWS or chars >= CHUNK_BODY_CHARS:
            yield jobs, errors, meta_keys.copy()
            meta_keys.clear()
            jobs, errors = [], []
            chars = 0
    yield jobs, errors, meta_keys


def _body_chars(jobs: list[JobRow]) -> int:
    return sum(map(len, map(_body_of, jobs)))


def _rows_to_insert(chunk: list[JobRow], chars: int) -> int:
    """How many of the chunk's first jobs go to the database now (0: none yet).

    CHUNK_ROWS at a time; or, once the chunk's bodies hold CHUNK_BODY_CHARS, the largest power
    of two of its jobs. Each size of INSERT is a statement SQLite prepares and keeps (several
    MB for thousands of rows), and blocks vary in size: powers of two keep them few."""
    if len(chunk) >= CHUNK_ROWS:
        return CHUNK_ROWS
    if chars >= CHUNK_BODY_CHARS:
        return 1 << (len(chunk).bit_length() - 1)
    return 0


def _parsed_by_workers(path: Path, workers: int) -> AsyncGenerator[ParsedBlock, None]:
    pool: OrderedWorkers[tuple[int, bytes], ParsedBlock] = OrderedWorkers(
        open_block_parser, workers, name="submit"
    )
    return pool.map((str(path),), _blocks(path))


def _duplicate_ids(
    path: Path, others: list[LineError] | None = None
) -> tuple[list[LineError], int]:
    """The lines whose custom_id an earlier line has, and how many other bad lines there
    are (the first SHOWN_ERRORS of them appended to `others`)."""
    seen: dict[str, int] = {}
    duplicates = []
    other_total = 0
    for item in read_jobs(path):
        if isinstance(item, NewJob):
            first = seen.setdefault(item.custom_id, item.line)
            if first != item.line:
                duplicates.append(LineError(str(path), item.line, _repeated(item, first)))
        else:
            other_total += 1
            if others is not None and len(others) < SHOWN_ERRORS:
                others.append(item)
    return duplicates, other_total


def _repeated(job: NewJob, first: int) -> str:
    if job.custom_id == f"line-{job.line}":
        # (Most likely made from the line number, the line having none.)
        return (
            f"custom_id {job.custom_id!r}, made from the line number where a line has none,"
            f" is line {first}'s custom_id"
        )
    return f"duplicate custom_id {job.custom_id!r} (first on line {first})"


async def submit_file(
    store: JobStore,
    path: Path,
    *,
    name: str | None = None,
    base_url: str | None = None,
    api_key_env: str | None = None,
    skip_invalid: bool = False,
    options: dict[str, Any] | None = None,
    workers: int | None = 0,
    overridden: frozenset[str] = frozenset(),
) -> SubmitResult:
    """Validate and load a request file as a new batch (or find the batch it already is).

    `workers`: processes that parse the file while this one loads it; 0 (the default): this
    process does both; None: one per usable core for a file of `PARALLEL_MIN_BYTES` or more
    into SQLite on a machine with two cores or more, else 0 (what `batchrunner submit` and
    `run FILE` do).
    Worker processes are started with multiprocessing's "spawn": a program that asks for them
    must guard its main module with `if __name__ == "__main__":`.
    `overridden`: the settings ("base_url", "api_key_env") the caller's run overrides, of which
    a batch submitted before says nothing.
    """
    check_request_file(path)
    # What was asked for (None: nothing; a batch submitted before is not told it differs
    # from a default nobody asked for), and what a new batch gets.
    asked_url = check_base_url(base_url) if base_url else None
    asked_key_env = check_key_env(api_key_env) if api_key_env else None
    base_url = asked_url or DEFAULT_BASE_URL
    api_key_env = asked_key_env or DEFAULT_API_KEY_ENV
    name = kept_text(name)
    if name is not None and not name.isprintable():
        raise UsageError("--name is one line of text: no line breaks or control characters")
    if name is not None and len(name) > BATCH_NAME_CHARS:
        raise UsageError(f"--name is longer than {BATCH_NAME_CHARS} characters ({len(name)})")
    before = _identity(path)
    sha = file_sha256(path)
    existing = await store.find_batch_by_content(sha)
    if existing is not None:
        check_demo_apart(existing, path, asked_key_env)
        return _submitted_before(existing, name, asked_url, asked_key_env, overridden)
    notices = []
    with path.open("rb") as f:
        if f.read(len(BOM)) == BOM:
            notices.append(f"{path}:1: UTF-8 byte order mark ignored")
    batch = BatchInfo(
        id=batch_id_for(sha),
        # A file name may be longer than the column (255 bytes): its start names the batch.
        name=name or kept_text(path.stem)[:BATCH_NAME_CHARS],
        source_file=kept_text(str(path)),
        content_sha256=sha,
        base_url=base_url,
        api_key_env=api_key_env,
        options=options or {},
        total_jobs=0,
        invalid_lines=0,
        created_at=time.time(),
        cancelled_at=None,
    )
    if workers is None:
        # PostgreSQL's own process is the bottleneck of its load (COPY into three indexes)
        # and needs the other core: with workers its loads measured 10 % slower.
        large = store.is_sqlite and path.stat().st_size >= PARALLEL_MIN_BYTES
        workers = workers_for(large)
    skip: dict[int, LineError] = {}
    for _ in range(2):
        parsed = _parsed_by_workers(path, workers) if workers else _parsed_in_process(path)
        try:
            with collector_paused():
                return await _load(store, path, parsed, batch, skip_invalid, skip, notices, before)
        except DuplicateCustomId:
            # (Found by an insert while the file was read: bad lines after it were not.)
            others: list[LineError] = []
            duplicates, other_total = _duplicate_ids(path, others)
            if not skip_invalid:
                shown = sorted(others + duplicates[:SHOWN_ERRORS], key=lambda e: e.line)
                total = len(duplicates) + other_total
                raise InputError(shown[:SHOWN_ERRORS], total) from None
            skip = {d.line: d for d in duplicates}
        except BatchExists:
            # Another submit of the same content won the race: it is the same batch.
            existing = await store.find_batch_by_content(sha)
            if existing is None:
                raise StoreError(f"batch {batch.id} was created and is gone again") from None
            return _submitted_before(existing, name, asked_url, asked_key_env, overridden)
    raise AssertionError("unreachable: duplicates were skipped on the second pass")


def check_demo_apart(batch: BatchInfo, path: Path, asked_key_env: str | None) -> None:
    """UsageError unless a batch found for `path` is of the kind asked for: the demo's (its
    key from DEMO_KEY_ENV) or a real one. A batch is known by its file's content alone: the
    demo's and a real one of the same file would be one. A real run of a file the demo ran
    found every job done (the fake API's answers, exported as real ones); the demo sent a
    real batch to its fake API."""
    by_demo = batch.api_key_env == DEMO_KEY_ENV
    if by_demo == (asked_key_env == DEMO_KEY_ENV):
        return
    if by_demo:
        raise UsageError(
            f"{path} is batch {batch.id} in this database, run by `batchrunner demo`: its"
            " answers are the local fake API's. Give real batches a database of their own"
            " (--db)"
        )
    raise UsageError(
        f"{path} is batch {batch.id} in this database, submitted for real (its key from"
        f" ${batch.api_key_env}): the demo would send it to its fake API. Give the demo a"
        " database of its own: batchrunner --db sqlite:///demo.db demo"
    )


def _identity(path: Path) -> tuple[int, ...]:
    """What changes when a file is written to, cut or replaced."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _submitted_before(
    batch: BatchInfo,
    name: str | None,
    base_url: str | None,
    api_key_env: str | None,
    overridden: frozenset[str] = frozenset(),
) -> SubmitResult:
    notices = [
        f"the batch keeps its {what} {kept!r}, not {asked!r} (`run --{flag}` overrides it)"
        for what, flag, kept, asked in (
            ("base URL", "base-url", batch.base_url, base_url),
            ("key variable", "api-key-env", batch.api_key_env, api_key_env),
        )
        if asked is not None and kept != asked and flag.replace("-", "_") not in overridden
    ]
    if name is not None and name != batch.name:
        notices.append(f"the batch keeps its name {batch.name!r}, not {name!r}")
    if batch.cancelled_at is not None:
        notices.append(cancelled_for_good(batch.id))
    if batch.invalid_lines:
        notices.append(
            f"it was loaded with --skip-invalid: {batch.invalid_lines} bad line(s) left out"
            f" (`batchrunner export {batch.id} --invalid` lists them)"
        )
    return SubmitResult(batch, False, batch.total_jobs, [], batch.invalid_lines, notices)


class _Rejected(Exception):
    def __init__(self, errors: list[LineError], total: int) -> None:
        self.errors = errors
        self.total = total


async def _load(
    store: JobStore,
    path: Path,
    parsed: AsyncGenerator[ParsedBlock, None],
    batch: BatchInfo,
    skip_invalid: bool,
    skip: dict[int, LineError],
    notices: list[str],
    before: tuple[int, ...],
) -> SubmitResult:
    errors: list[LineError] = []
    error_total = 0
    jobs = 0
    meta_keys: set[str] = set()
    inserting: deque[asyncio.Future[None]] = deque()
    try:
        async with store.loading(batch) as loader, _finishing(inserting):
            chunk: list[JobRow] = []
            chunk_chars = 0
            bad: list[tuple[int, str]] = []
            async for block_jobs, block_errors, block_keys in parsed:
                if skip:
                    # The second pass after repeated custom_ids: they are bad lines now.
                    block_errors = sorted(
                        [*block_errors, *(skip[j[0]] for j in block_jobs if j[0] in skip)],
                        key=lambda e: e.line,
                    )
                    block_jobs = [j for j in block_jobs if j[0] not in skip]
                    # Only the keys of the jobs kept: a repeated line may have others.
                    block_keys = _meta_keys_of(block_jobs)
                meta_keys |= block_keys
                for error in block_errors:
                    error_total += 1
                    if len(errors) < SHOWN_ERRORS:
                        errors.append(error)
                    if skip_invalid:
                        bad.append((error.line, error.reason))
                if error_total and not skip_invalid:
                    continue  # nothing will be loaded; keep reading only to count errors
                chunk += block_jobs
                chunk_chars += _body_chars(block_jobs)
                while rows := _rows_to_insert(chunk, chunk_chars):
                    ready, chunk = chunk[:rows], chunk[rows:]
                    chunk_chars = _body_chars(chunk)
                    # The database inserts this chunk while the next one is parsed.
                    if len(inserting) >= INSERTS_AHEAD:
                        await inserting.popleft()
                    inserting.append(asyncio.ensure_future(loader.add_jobs(ready)))
                    await asyncio.sleep(0)
                    jobs += len(ready)
                if len(bad) >= CHUNK_ROWS:
                    await loader.add_invalid(bad)
                    bad = []
            while inserting:
                await inserting.popleft()
            if error_total and not skip_invalid:
                # Repeated ids are found by the database, which saw none of this file: count
                # them too, or the user fixes the bad lines only to be told of more.
                repeated, _ = _duplicate_ids(path)
                shown = sorted(errors + repeated[:SHOWN_ERRORS], key=lambda e: e.line)
                raise _Rejected(shown[:SHOWN_ERRORS], error_total + len(repeated))
            await loader.add_jobs(chunk)
            jobs += len(chunk)
            await loader.add_invalid(bad)
            loader.meta_keys = sorted(meta_keys)
            if jobs == 0:
                raise _Rejected(
                    errors[:SHOWN_ERRORS] or [LineError(str(path), 0, "the file has no requests")],
                    max(error_total, 1),
                )
            if _identity(path) != before:
                # The batch's id is its content's digest: the jobs must be that content.
                raise UsageError(
                    f"{path} changed while it was being submitted; nothing was loaded (submit"
                    " it once it is complete)"
                )
    except _Rejected as rejected:
        if rejected.total == 1 and rejected.errors and rejected.errors[0].line == 0:
            raise InputError(rejected.errors, 1, f"{path}: the file has no requests") from None
        raise InputError(rejected.errors[:SHOWN_ERRORS], rejected.total) from None
    finally:
        # Stops the worker processes of a parallel parse left part way (a duplicate id).
        await parsed.aclose()
    loaded = BatchInfo(**{**_as_dict(batch), "total_jobs": jobs, "invalid_lines": error_total})
    return SubmitResult(loaded, True, jobs, errors, error_total, notices)


@contextlib.asynccontextmanager
async def _finishing(inserting: deque[asyncio.Future[None]]) -> AsyncIterator[None]:
    """Inserts left behind by an error or a Ctrl-C are cancelled and waited for before the
    load's transaction ends: one that reached the database after the rollback would have
    been a statement of its own, committed (jobs without their batch)."""
    try:
        yield
    finally:
        for left in inserting:
            left.cancel()
        while inserting:
            with contextlib.suppress(BaseException):
                await inserting.popleft()


def _meta_keys_of(jobs: Iterable[JobRow]) -> set[str]:
    keys: set[str] = set()
    for job in jobs:
        meta = NewJob(*job).meta
        if meta is not None:
            keys.update(orjson.loads(meta))
    return keys


def _as_dict(batch: BatchInfo) -> dict[str, Any]:
    return {f: getattr(batch, f) for f in BatchInfo.__dataclass_fields__}
