"""The `batchrunner` command line: each command parses, calls one core function, renders."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import gc
import logging
import math
import os
import re
import secrets
import signal
import stat
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, TypeVar

import click
import orjson
from click.core import ParameterSource

from batchrunner import __version__
from batchrunner.config import (
    DEFAULT_DB_URL,
    LEASE_ENV,
    LEASE_S,
    db_url_from_env,
    without_password,
)
from batchrunner.errors import BatchrunnerError, UsageError
from batchrunner.lines import names_a_file
from batchrunner.states import JobState, shown
from batchrunner.store import JobStore

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

EXIT_OK = 0
EXIT_SOME_FAILED = 3
EXIT_ABORTED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Aborted(click.ClickException):
    exit_code = EXIT_ABORTED


class _Unusable(click.ClickException):
    exit_code = EXIT_USAGE


def _stdout_needed(why: str) -> None:
    """Refuse to begin a command whose output is its point when standard output is closed
    (`>&-`): click would drop what it prints, and the command exit 0."""
    if sys.stdout is None:
        raise _fail(UsageError(f"standard output is closed: {why}"))


def _fail(exc: BatchrunnerError) -> click.ClickException:
    """Core errors become click errors here only: usage errors exit 2, the rest 1."""
    return (_Unusable if isinstance(exc, UsageError) else _Aborted)(shown(exc.message))


#: The task of the command that `_run` runs, while it runs: SIGTERM cancels it.
_command_task: asyncio.Task[Any] | None = None
#: A SIGTERM has cancelled it: its cancellation is the command's interruption.
_terminated = False


def _run(coro: Coroutine[Any, Any, T]) -> T:
    global _terminated
    _terminated = False  # (`main` may run several commands in one process: the tests)
    try:
        return asyncio.run(_as_command(coro))
    except asyncio.CancelledError:
        if _terminated:
            raise KeyboardInterrupt from None
        raise
    except BatchrunnerError as exc:
        raise _fail(exc) from exc


async def _as_command(coro: Coroutine[Any, Any, T]) -> T:
    global _command_task
    _command_task = asyncio.current_task()
    try:
        return await coro
    finally:
        _command_task = None


async def _with_store(
    db_url: str, fn: Callable[[JobStore], Awaitable[T]], *, existing: bool = False
) -> T:
    if existing:
        _must_exist(db_url)
    store = await JobStore.open(db_url, create=not existing)
    try:
        return await fn(store)
    finally:
        await store.close()


def _must_exist(db_url: str) -> None:
    """A command that reads what was submitted finds no SQLite file at the URL: say so, rather
    than make an empty database there and report that it holds no batch."""
    from batchrunner.database import SqliteTarget, is_sqlite_url

    if not is_sqlite_url(db_url):
        return
    target = SqliteTarget.parse(db_url)
    if target.uri or target.in_memory or Path(target.filename).exists():
        return
    raise UsageError(
        f"no database at {target.filename}: nothing was submitted there"
        " (give the database submit used: --db URL or BATCHRUNNER_DB)"
    )


def _err(message: str) -> None:
    """A message for the person at the terminal. A stderr nobody reads any more (`2>&1 | tee`
    whose tee was stopped by the same Ctrl-C, `2>/dev/full`) changes nothing of what the
    command does nor of its exit code: a run stopped by a first Ctrl-C drains as ever."""
    with contextlib.suppress(OSError):
        click.echo(shown(message), err=True)


class _ShownFormatter(logging.Formatter):
    """Warnings as `_err` writes messages: control characters written out (`shown`)."""

    def format(self, record: logging.LogRecord) -> str:
        return shown(super().format(record))


class _Context:
    def __init__(self, db_url: str) -> None:
        self.db_url = db_url

    def with_store(self, fn: Callable[[JobStore], Awaitable[T]], *, existing: bool = False) -> T:
        """Run `fn` with the store open; `existing`: for commands about what was submitted,
        which make no database where there is none."""
        return _run(_with_store(self.db_url, fn, existing=existing))


pass_ctx = click.make_pass_decorator(_Context)
#: The price file of every command that prices tokens (run, status, export, estimate).
_prices_option = click.option(
    "--prices",
    "prices_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="BATCHRUNNER_PRICES",
    help="TOML price file overriding or adding model prices.",
)


class _FiniteRange(click.FloatRange):
    """A FloatRange of numbers only: FloatRange lets "nan" through (every comparison with it is
    false) and "inf" past an open end, and the pacer, the budget or the clock broke on them."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "db_url",
    default=None,
    metavar="URL",
    help=f"Job database: sqlite:///FILE or postgresql://USER@HOST/DB "
    f"(env BATCHRUNNER_DB; default {DEFAULT_DB_URL}).",
)
@click.version_option(__version__, prog_name="batchrunner")
@click.pass_context
def cli(ctx: click.Context, db_url: str | None) -> None:
    """Run large batches of chat-completion requests against OpenAI-compatible APIs.

    \b
    Example:
        batchrunner submit requests.jsonl      # prints the batch id
        batchrunner run batch_0123456789abcdef --rpm 500
        batchrunner export batch_0123456789abcdef -o results.csv
    """
    ctx.obj = _Context(db_url or db_url_from_env())


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--name", help="A name for the batch (default: the file name without its extension).")
@click.option(
    "--base-url",
    envvar="OPENAI_BASE_URL",
    help="API base URL stored with the batch (env OPENAI_BASE_URL; default https://api.openai.com/v1).",
)
@click.option(
    "--api-key-env",
    metavar="VAR",
    help="Environment variable that holds the API key at run time (default OPENAI_API_KEY).",
)
@click.option("--skip-invalid", is_flag=True, help="Load the good lines and record the bad ones.")
@pass_ctx
def submit(
    ctx: _Context,
    file: Path,
    name: str | None,
    base_url: str | None,
    api_key_env: str | None,
    skip_invalid: bool,
) -> None:
    """Validate FILE and load it as a new batch; prints the batch id.

    Submitting the same content again prints the same id and adds nothing.

    \b
    Example:
        batchrunner submit jobs/01-chat.jsonl --name first-try
    """
    from batchrunner.ingest import submit_file

    _stdout_needed("the batch id could not be printed")
    result = ctx.with_store(
        lambda store: submit_file(
            store,
            file,
            name=name,
            base_url=base_url,
            api_key_env=api_key_env,
            skip_invalid=skip_invalid,
            # A large file is parsed by worker processes, one per core.
            workers=None,
        )
    )
    for notice in result.notices:
        _err(f"note: {notice}")
    if result.created:
        _err(f"loaded {result.jobs} job(s) from {file} as batch {result.batch.id}")
        if result.invalid_total:
            _err(f"skipped {result.invalid_total} bad line(s):")
            for e in result.invalid:
                _err(f"  {e}")
            if result.invalid_total > len(result.invalid):
                _err(f"  ... and {result.invalid_total - len(result.invalid)} more")
    else:
        _err(f"{file} was submitted before as batch {result.batch.id}; nothing added")
    click.echo(result.batch.id)


@cli.command()
@click.argument("target", metavar="BATCH_ID|FILE")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10_000),
    default=64,
    show_default=True,
    help="Requests in flight at once.",
)
@click.option(
    "--rpm",
    type=_FiniteRange(min=0, min_open=True),
    help="Requests per minute for the whole batch (spread evenly).",
)
@click.option(
    "--tpm",
    type=_FiniteRange(min=0, min_open=True),
    help="Tokens per minute for the whole batch (prompt estimate + max output).",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 100),
    default=6,
    show_default=True,
    help="HTTP attempts per job before it fails on transient errors. 429 rate-limit answers "
    "have an allowance of their own, 4 x this: they say 'slow down', not 'fail'.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=_FiniteRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds one request may take.",
)
@click.option(
    "--max-cost",
    "max_cost_usd",
    type=_FiniteRange(min=0, min_open=True),
    help="Stop before the batch could cost more than this many US dollars.",
)
@click.option("--base-url", help="Override the base URL stored with the batch.")
@click.option(
    "--api-key-env", metavar="VAR", help="Override the key variable stored with the batch."
)
@click.option(
    "--retry-invalid-json",
    is_flag=True,
    help="Retry answers whose content does not match the request's json_schema.",
)
@_prices_option
@click.option(
    "--lease",
    "lease_s",
    type=_FiniteRange(min=0.5, max=86_400),
    default=LEASE_S,
    show_default=True,
    envvar=LEASE_ENV,
    help=f"Seconds a claimed job stays this worker's without a heartbeat (env {LEASE_ENV}); "
    "a dead worker's jobs go to the others after it.",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="With FILE: load the good lines and record the bad ones, as submit does.",
)
@click.option("--quiet", is_flag=True, help="No progress display.")
@pass_ctx
def run(
    ctx: _Context,
    target: str,
    concurrency: int,
    rpm: float | None,
    tpm: float | None,
    max_attempts: int,
    timeout_s: float,
    max_cost_usd: float | None,
    base_url: str | None,
    api_key_env: str | None,
    retry_invalid_json: bool,
    prices_path: Path | None,
    lease_s: float,
    skip_invalid: bool,
    quiet: bool,
) -> None:
    """Send a batch's unfinished jobs until every job has ended; running it again resumes.

    TARGET is a batch id, or a request file (submitted first, as `submit` would).
    Exit codes: 0 every job succeeded; 3 finished, some jobs failed (or the batch was
    cancelled while it ran); 1 aborted (bad key, no balance, budget, database); 2 usage
    error (also a batch cancelled before); 130 interrupted (run again to resume).

    \b
    Example:
        batchrunner run jobs/01-chat.jsonl --concurrency 32 --rpm 3000 --tpm 1000000
        batchrunner run batch_0123456789abcdef --max-cost 5
    """
    from batchrunner import runner
    from batchrunner.config import RunConfig
    from batchrunner.dispatcher import StopReason

    if skip_invalid and not names_a_file(target):
        raise click.UsageError(
            "--skip-invalid is for a request FILE, submitted first: a batch's lines were"
            " loaded at its submit"
        )
    config = RunConfig(
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        max_attempts=max_attempts,
        timeout_s=timeout_s,
        max_cost_usd=max_cost_usd,
        base_url=base_url,
        api_key_env=api_key_env,
        retry_invalid_json=retry_invalid_json,
        prices_path=prices_path,
        lease_s=lease_s,
    )
    rep = ctx.with_store(
        lambda store: runner.run(
            store, target, config, warn=_err, progress=not quiet, skip_invalid=skip_invalid
        ),
        existing=not names_a_file(target),
    )
    res = rep.result
    st = res.stats
    _err(
        f"{rep.batch.id}: {st.succeeded} succeeded and {st.failed} failed in this run "
        f"({st.sent} request(s) sent); {res.unfinished} job(s) unfinished, "
        f"{res.failed_in_batch} failed in the batch"
        + (f", {res.cancelled_in_batch} cancelled" if res.cancelled_in_batch else "")
    )
    if st.recovered:
        _err(
            f"note: {st.recovered} answer(s) that another run received and had not yet"
            " written were recorded from its journal, not sent again"
        )
    if st.fenced:
        _err(
            f"note: {st.fenced} late answer(s) were not recorded: the job had been cancelled"
            " or taken over by another worker"
        )
    # (Counted above as they ended: the database shows none of them yet.)
    if st.kept_in_journal:
        _err(
            f"note: {st.kept_in_journal} of these answer(s) are not in the database yet: its"
            " answer journal keeps them, and the next run records them before sending anything"
        )
    if st.not_kept:
        _err(
            f"note: {st.not_kept} of these answer(s) could not be written to the database nor"
            " kept in the answer journal: the next run sends them again"
        )
    code = rep.exit_code
    if code == runner.EXIT_ABORTED:
        _err(f"error: {res.message or res.reason.value}")
    elif code == runner.EXIT_INTERRUPTED:
        _err(f"interrupted: run `batchrunner run {rep.batch.id}` to resume")
    elif res.reason is StopReason.CANCELLED:
        _err(f"stopped: {res.message}")
    elif code == runner.EXIT_SOME_FAILED:
        _err(f"finished with failures: see `batchrunner status {rep.batch.id}`")
    sys.exit(code)


@cli.command()
@click.argument("batch_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_prices_option
@pass_ctx
def status(ctx: _Context, batch_id: str | None, as_json: bool, prices_path: Path | None) -> None:
    """Counts by state, tokens, cost, throughput and top errors of a batch.

    Without BATCH_ID: every batch, one line each.

    \b
    Example:
        batchrunner status batch_0123456789abcdef --json
    """
    from batchrunner import report
    from batchrunner.pricing import PriceBook

    _stdout_needed("nothing could be shown")
    if batch_id is None:
        rows = ctx.with_store(report.all_batches, existing=True)
        if as_json:
            click.echo(orjson.dumps([r.to_json() for r in rows]).decode())
        else:
            click.echo(shown(report.render_batch_list(rows)))
        return
    prices = PriceBook.load(prices_path)
    st = ctx.with_store(lambda store: report.batch_status(store, batch_id, prices), existing=True)
    if as_json:
        click.echo(orjson.dumps(st.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(shown(report.render_status(st)))


#: The names of files of JSON lines: `export -o` writes JSONL into one unless told otherwise.
_JSONL_SUFFIXES: Final = (".jsonl", ".ndjson")


@cli.command()
@click.argument("batch_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    help="csv: one row per job (per choice); jsonl: the OpenAI Batch output format"
    " (the default for -o NAME.jsonl or NAME.ndjson).",
)
@click.option("-o", "--output", default="-", metavar="PATH", help="Where to write; - is stdout.")
@click.option("--failed", "failed_only", is_flag=True, help="Only the failed jobs.")
@click.option(
    "--as-requests",
    is_flag=True,
    help="Write the jobs that did not succeed (failed, cancelled; with --failed, the failed"
    " only) as a request file to submit again.",
)
@click.option(
    "--invalid",
    "invalid_lines",
    is_flag=True,
    help="Write the numbers of the lines `submit --skip-invalid` left out, each with its reason.",
)
@click.option("--bom", is_flag=True, help="Start a CSV with a UTF-8 byte order mark (for Excel).")
@_prices_option
@pass_ctx
def export(
    ctx: _Context,
    batch_id: str,
    fmt: str,
    output: str,
    failed_only: bool,
    as_requests: bool,
    invalid_lines: bool,
    bom: bool,
    prices_path: Path | None,
) -> None:
    """Stream a batch's ended jobs out, while it runs or after; tokens and cost per row.

    \b
    Example:
        batchrunner export batch_0123456789abcdef -o results.csv
        batchrunner export batch_0123456789abcdef --format jsonl --failed -o failed.jsonl
        batchrunner export batch_0123456789abcdef --as-requests -o again.jsonl
        batchrunner export batch_0123456789abcdef --invalid -o bad-lines.csv
    """
    from batchrunner.export import export_batch, export_invalid_lines, export_requests
    from batchrunner.pricing import PriceBook

    if invalid_lines and (as_requests or failed_only):
        raise click.UsageError("--invalid writes the lines left out at submit: no jobs with them")
    format_given = (
        click.get_current_context().get_parameter_source("fmt") is not ParameterSource.DEFAULT
    )
    if not format_given and output.lower().endswith(_JSONL_SUFFIXES):
        # `-o results.jsonl` wrote CSV into it, and a JSON reader failed on its first line.
        fmt = "jsonl"
    if bom and (fmt == "jsonl" or as_requests):
        raise click.UsageError("--bom starts a CSV file: JSON lines have none")
    if as_requests and fmt == "csv" and format_given:
        raise click.UsageError("--as-requests writes a request file, JSON lines: not --format csv")

    async def write(store: JobStore, out: BinaryIO) -> int:
        if invalid_lines:
            return await export_invalid_lines(
                store, batch_id, out, fmt="jsonl" if fmt == "jsonl" else "csv", bom=bom
            )
        if as_requests:
            # (A cancelled job may never have been sent: its request is there to send again.)
            states = (JobState.FAILED,) if failed_only else (JobState.FAILED, JobState.CANCELLED)
            return await export_requests(store, batch_id, out, states=states)
        return await export_batch(
            store,
            batch_id,
            out,
            fmt="jsonl" if fmt == "jsonl" else "csv",
            failed_only=failed_only,
            prices=PriceBook.load(prices_path),
            bom=bom,
            # A large CSV export uses every core (worker processes).
            workers=None,
        )

    async def to_file(store: JobStore, target: Path, aside: bool) -> int:
        await store.get_batch(batch_id)  # no batch: say so before making a file
        if store.is_database_file(target):
            # (`-o jobs.db` for `--db sqlite:///jobs.db`: every prompt and answer replaced.)
            raise UsageError(f"cannot write {output}: it is the job database's own file")
        partial = target
        try:
            if aside:
                partial, f = _file_aside(target)
            else:
                f = partial.open("wb")
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from None
        try:
            with f:
                n = await write(store, f)
                if aside:
                    # On disk before it takes the name: after a power cut PATH holds the
                    # old export or the new one, never a new one cut short.
                    f.flush()
                    os.fsync(f.fileno())
            if aside:
                partial.replace(target)
        finally:
            if aside:
                partial.unlink(missing_ok=True)
        return n

    async def to_descriptor(store: JobStore, fd: int) -> int:
        await store.get_batch(batch_id)
        # (An open descriptor, our own copy of it: nothing to wait for.)
        with open(fd, "wb") as f:  # noqa: ASYNC230
            return await write(store, f)

    fd = 1 if output == "-" else _descriptor(output)
    if fd is not None:
        # Standard output (`-`, /dev/stdout) or another open descriptor (/dev/fd/3): written
        # through as it is. Opened by its name, `>> all.csv` would be truncated (or, renamed
        # over, replaced), and a pipe's name (/proc/PID/fd/pipe:[N]) opens nothing.
        if fd == 1:
            _stdout_needed("name a file with -o FILE")
            sys.stdout.flush()
        # Taken now, before the command opens anything: a number the shell did not open
        # would be the database's own file by the time it was written (/dev/fd/6 wrote the
        # CSV over SQLite's first page).
        mine = _writable_copy(fd, output)
        n = ctx.with_store(lambda store: to_descriptor(store, mine), existing=True)
    else:
        target = Path(output)
        # A file is written aside and renamed at the end: a file at PATH is always a whole
        # export. A pipe or a device (/dev/stdout, /dev/null) is written as it is: renamed
        # over, it would be replaced by a file. So would a symbolic link: the export goes
        # to where it points, as any program writing to it would put it.
        if target.is_symlink():
            if not _may_replace(target):
                raise _fail(
                    UsageError(
                        f"cannot write {output}: a symbolic link another user made in a folder"
                        " anyone may write to (not followed)"
                    )
                )
            try:
                target = target.resolve(strict=False)
            except (OSError, RuntimeError) as exc:  # a loop of links
                raise _fail(UsageError(f"cannot write {output}: {exc}")) from None
        if target.is_file() and not _may_replace(target):
            # (Replaced, it kept its mode: another user's 0666 file would have let them read
            # every prompt and answer.)
            raise _fail(
                UsageError(
                    f"cannot write {output}: a file another user made in a folder anyone may"
                    " write to (not replaced)"
                )
            )
        aside = not target.exists() or target.is_file()
        n = ctx.with_store(lambda store: to_file(store, target, aside), existing=True)
    _err(f"exported {n} row(s) of {batch_id}" + ("" if output == "-" else f" to {output}"))


#: Names of this process's open file descriptors.
_DESCRIPTOR_NAME = re.compile(
    r"/dev/(?:fd/(\d+)|(stdout)|(stderr))|/proc/(?:self|thread-self|(\d+))/fd/(\d+)"
)


def _descriptor(output: str) -> int | None:
    """The file descriptor `output` names (/dev/stdout, /dev/fd/N, /proc/self/fd/N), if any."""
    path = os.path.normpath(output)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")  # (POSIX leaves a leading `//` to the system: not Linux)
    match = _DESCRIPTOR_NAME.fullmatch(path)
    if match is None:
        return None
    fd, stdout, stderr, pid, proc_fd = match.groups()
    if pid is not None and int(pid) != os.getpid():
        return None  # (another process's: a file like any other)
    return 1 if stdout else 2 if stderr else int(fd or proc_fd)


def _writable_copy(fd: int, output: str) -> int:
    """A descriptor of our own for the open descriptor `fd`, which the command may write."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise _fail(UsageError(f"cannot write {output}: no such open file descriptor")) from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise _fail(UsageError(f"cannot write {output}: it is open for reading only"))
    return os.dup(fd)


def _may_replace(path: Path) -> bool:
    """Whether a link may be followed, or a file replaced, by the rule of Linux's
    protected_symlinks and protected_regular (which do not hold here: the export is renamed
    over its target): not a link or file another user made in a sticky folder anyone may
    write to (/tmp), unless the folder is theirs."""
    st, folder = os.lstat(path), os.stat(path.parent)
    shared = folder.st_mode & stat.S_ISVTX and folder.st_mode & stat.S_IWOTH
    return not shared or st.st_uid in (os.geteuid(), folder.st_uid)


def _file_aside(target: Path) -> tuple[Path, BinaryIO]:
    """A new file beside `target`, to be renamed over it once written: a name of its own (two
    exports to one PATH at once each write theirs; with one name they wrote into each other's
    and one said it had succeeded), and the mode `target` has (a file kept private stays so)
    or, for a new one, what the umask gives."""
    st = target.stat() if target.exists() else None
    mode = None if st is None else stat.S_IMODE(st.st_mode)
    if st is not None and st.st_uid != os.geteuid():
        # Another user's file: no wider than it was, nor than a new file of ours would be
        # (theirs may be open to all; kept private, it stays so).
        umask = os.umask(0)
        os.umask(umask)
        mode = stat.S_IMODE(st.st_mode) & 0o666 & ~umask
    for _ in range(100):
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        try:
            # Made with the mode it is to have, not made wider and narrowed after: another user
            # could open it in between.
            fd = os.open(
                partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode
            )
        except FileExistsError:
            continue
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            return partial, os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            partial.unlink(missing_ok=True)
            raise
    raise FileExistsError(f"no free name beside {target}")


@cli.command()
@click.argument("target", metavar="FILE|BATCH_ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@_prices_option
@pass_ctx
def estimate(ctx: _Context, target: str, as_json: bool, prices_path: Path | None) -> None:
    """Prompt tokens, maximum output tokens and the cost range, before anything is sent.

    Prompt tokens are counted with OpenAI's tokenizers (offline); the cost range runs from the
    prompt alone to the prompt plus every request's maximum output.

    \b
    Example:
        batchrunner estimate jobs/01-chat.jsonl
        batchrunner estimate batch_0123456789abcdef --json
    """
    from batchrunner import estimate as est
    from batchrunner.pricing import PriceBook

    _stdout_needed("nothing could be shown")
    prices = PriceBook.load(prices_path)
    if names_a_file(target):
        result = _run(est.estimate_file(target, prices))
    else:
        result = ctx.with_store(
            lambda store: est.estimate_batch(store, target, prices), existing=True
        )
    if as_json:
        click.echo(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(shown(est.render(result)))


@cli.command()
@click.argument("batch_id")
@pass_ctx
def retry(ctx: _Context, batch_id: str) -> None:
    """Put a batch's failed jobs back to pending (their attempts stay in the log).

    \b
    Example:
        batchrunner retry batch_0123456789abcdef && batchrunner run batch_0123456789abcdef
    """
    from batchrunner.report import fails_again

    async def go(store: JobStore) -> tuple[int, list[tuple[str, int]]]:
        kinds = await store.error_counts(batch_id)
        return await store.retry_failed(batch_id), kinds

    n, kinds = ctx.with_store(go, existing=True)
    said = ", ".join(f"{kind} {count}" for kind, count in kinds)
    _err(f"{n} failed job(s) of {batch_id} are pending again" + (f" ({said})" if n else ""))
    again = [(kind, count) for kind, count in kinds if fails_again(kind)]
    if n and again:
        # (Each is paid for again, where the API bills refusals.)
        _err(
            f"note: {sum(c for _, c in again)} of them failed for what sending the same request"
            f" again does not change ({', '.join(f'{k} {c}' for k, c in again)}): expect them"
            " to fail again, unless what they were refused for has changed"
        )


@cli.command()
@click.argument("batch_id")
@pass_ctx
def cancel(ctx: _Context, batch_id: str) -> None:
    """Stop a batch for good: its unfinished jobs become cancelled.

    \b
    Example:
        batchrunner cancel batch_0123456789abcdef
    """
    from batchrunner import runner

    recorded, n = ctx.with_store(lambda store: runner.cancel(store, batch_id), existing=True)
    if recorded:
        _err(
            f"recorded {recorded} answer(s) that a run of this machine had received and not"
            " yet written"
        )
    if n:
        _err(f"cancelled {n} unfinished job(s) of {batch_id}")
    else:
        _err(f"nothing to cancel: every job of {batch_id} has ended")


@cli.command()
@click.option(
    "--jobs",
    "jobs_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Folder of request files to run (default: the examples that come with batchrunner).",
)
@click.option("--concurrency", type=click.IntRange(1, 1_000), default=16, show_default=True)
@pass_ctx
def demo(ctx: _Context, jobs_dir: Path | None, concurrency: int) -> None:
    """Run the example request files end to end against a local fake API (no key, no network).

    Every `*.jsonl` in the folder is submitted, run and summed up; export the results with
    `batchrunner export BATCH_ID`.

    \b
    Example:
        batchrunner --db sqlite:///demo.db demo
    """
    from batchrunner.config import RunConfig
    from batchrunner.demo import example_files, run_demo
    from batchrunner.dispatcher import StopReason

    batches = ctx.with_store(
        lambda store: run_demo(
            store,
            jobs_dir or example_files(),
            warn=_err,
            config=RunConfig(concurrency=concurrency),
        )
    )
    stopped = []
    for b in batches:
        st = b.status
        c = st.counts.counts
        click.echo(
            f"{b.path.name:<28} {st.batch.id}  succeeded {c['succeeded']:>4}  "
            f"failed {c['failed']:>3}  tokens {st.tokens['total_tokens']:>7}  "
            f"cost ${st.cost_usd:.6f}"
            + (f" (+ unpriced: {', '.join(st.unpriced_models)})" if st.unpriced_models else "")
        )
        result = b.report.result
        if result.reason is not StopReason.DONE:
            stopped.append(f"{b.path.name} ({result.message or result.reason.value})")
    if stopped:
        raise click.ClickException(f"the demo stopped early on {'; '.join(stopped)}")
    if batches:
        db = without_password(ctx.db_url)
        _err(f"next: batchrunner --db {db} export {batches[0].status.batch.id} -o out.csv")


@cli.group("db")
def db_group() -> None:
    """Explicit control of the job database's schema (it is upgraded on first use anyway).

    \b
    Example:
        batchrunner --db postgresql://postgres@127.0.0.1/test db upgrade
    """


#: `db downgrade -1` (one step): the revision, not an option click knows nothing of.
_REVISION_SETTINGS: Final = {"ignore_unknown_options": True}


@db_group.command("upgrade", context_settings=_REVISION_SETTINGS)
@click.argument("revision", default="head")
@pass_ctx
def db_upgrade(ctx: _Context, revision: str) -> None:
    """Migrate the database to REVISION (default: head).

    \b
    Example:
        batchrunner db upgrade
    """
    from batchrunner import db

    _err(f"database at revision {_migrate(ctx, db.upgrade, revision)}")


@db_group.command("downgrade", context_settings=_REVISION_SETTINGS)
@click.argument("revision")
@pass_ctx
def db_downgrade(ctx: _Context, revision: str) -> None:
    """Migrate the database down to REVISION: a number, `-1` for one step, or `base`, which
    drops every table and every batch with them. (No default: a bare `db downgrade`, typed
    to undo one step, dropped them all.)

    \b
    Example:
        batchrunner db downgrade -1
    """
    from batchrunner import db

    _err(f"database at revision {_migrate(ctx, db.downgrade, revision) or 'base'}")


def _migrate(
    ctx: _Context, step: Callable[[AsyncEngine, str], Awaitable[None]], revision: str
) -> str | None:
    """Run a migration `step` to `revision`; the revision the database is at after it."""
    from batchrunner import db

    db.check_revision(revision)

    async def go() -> str | None:
        engine = db.create_engine(ctx.db_url)
        try:
            await step(engine, revision)
            return await db.current_revision(engine)
        finally:
            await engine.dispose()

    return _run(go())


def main(argv: list[str] | None = None) -> None:
    _quick_exit()
    sigterm_as_ctrl_c()
    # Warnings go where Python's last resort puts them (stderr, the message alone), written
    # as `_err` writes: a server's text in them reaches a terminal.
    last_resort = logging.StreamHandler()
    last_resort.setLevel(logging.WARNING)
    last_resort.setFormatter(_ShownFormatter())
    logging.lastResort = last_resort
    # Not click's standalone mode: it turns Ctrl-C into "Aborted!" and exit 1, and an
    # interrupted command must exit 130 wherever it was (loading a file, checking prices).
    try:
        code = cli.main(args=argv, prog_name="batchrunner", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _err("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BatchrunnerError as exc:
        # Raised outside `_run` (reading a price file before anything starts): the same
        # message and exit code as inside.
        err = _fail(exc)
        err.show()
        sys.exit(err.exit_code)
    except OSError as exc:
        # A file or pipe the command reads or writes failed on the way (a full disk under an
        # export, a closed pipe): the reason, not a traceback.
        where = f": {exc.filename}" if exc.filename else ""
        _err(f"error: {exc.strerror or exc}{where}")
        sys.exit(EXIT_ABORTED)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def sigterm_as_ctrl_c() -> None:
    """SIGTERM (`kill`, `timeout`, a service manager, a container's stop) stops every command as
    Ctrl-C does: a load is rolled back, an export's file written aside is removed, and the
    command says "interrupted" and exits 130. Killed outright, the export left its hidden
    `.NAME.partial` file behind, as large as the export had grown. A run stops gracefully under
    its own handler (runner.py). A SIGTERM ignored by whoever started us stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    """As asyncio.run's handler of Ctrl-C: the command's task is cancelled, so that its
    cleanups run; a second SIGTERM, or one outside the task, interrupts at once. (Not by
    calling that handler: a background job of a script has SIGINT ignored, and none.)"""
    global _terminated
    task = _command_task
    if task is not None and not _terminated and not task.done():
        _terminated = True
        task.cancel()
        task.get_loop().call_soon_threadsafe(lambda: None)  # for a loop asleep in select
        return
    raise KeyboardInterrupt


_quick_exit_registered = False


def _quick_exit() -> None:
    """Freeze the collector's objects when the interpreter exits, before it tears the
    modules down: its exit runs several full collections, each a walk over every object that
    SQLAlchemy and aiohttp made at import (~0.2 s of a command's ~0.9 s on a small machine).
    Objects are still freed as their last reference goes; only cyclic garbage left at the very
    end stays for the operating system to reclaim. Everything of ours is closed before then
    (databases, journals, worker processes), so nothing waits on a collection to be written."""
    global _quick_exit_registered
    if not _quick_exit_registered:
        _quick_exit_registered = True
        atexit.register(gc.freeze)
