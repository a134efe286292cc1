"""The answer journal: every answer kept on disk from the moment it arrives until it is committed.

The dispatcher records ended jobs in batched transactions. An answer that has arrived and waits
for the next commit would be lost by a `kill -9` and its request sent again by the next run.
So each ended job first goes to a segment file of this run's journal: the kernel keeps what
was written when the process dies (not what the machine does when it goes down: an fsync per
answer would cost a disk flush on the hot path; a lost machine re-sends what was not committed,
at most `--concurrency` requests, as before). The answers of one turn of the event loop go in
one `write()`, at the start of the next turn.

When the writer takes the jobs ended so far into a transaction it takes a `Mark`; once the
transaction commits, a line in the segment says how many of its answers are committed. A
segment that has grown past `SEGMENT_BYTES` is sealed instead, and deleted once committed
(creating and deleting a file per transaction cost more than the writes themselves). After a
write that failed nothing more is marked committed: the answers wait for the next run.

The next run of the batch on this machine records what the segments of dead runs hold past
their last committed mark, before it claims anything (`recover`): each answer whose job has not
ended since, with the attempts that led to it, exactly once. A run already going does the same
when it finds a run of this machine dead (coordination.py), before that run's jobs are released.
A dead run's jobs are not released while its segments are still here: another process holds
them and is recording them.

Files: `<directory>/<batch id>.<worker id>.<n>.jnl`, one JSON value per line: an ended job as
an array, the fields of `Ended` in order, then the job's attempts in this run, each the fields
of `AttemptRecord` in order; or `{"committed": n}`, the first n answers of the segment being
committed. A run holds an exclusive `flock` on each segment it has not yet deleted; a segment
whose lock can be taken belongs to a run that has ended or died.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import orjson

from batchrunner.states import JobState

if TYPE_CHECKING:
    from batchrunner.store import AttemptRecord, Ended, JobStore

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, no journal
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Where the journals of PostgreSQL databases go (one directory per database), when set;
#: otherwise $XDG_STATE_HOME/batchrunner, else ~/.local/state/batchrunner. A SQLite database's
#: journal lives beside it.
STATE_DIR_ENV = "BATCHRUNNER_STATE_DIR"
#: Appended to a SQLite database's file name for its journal directory.
SQLITE_SUFFIX = "-answers"
SEGMENT_SUFFIX = ".jnl"
#: A segment is sealed (and deleted once committed) when it has grown past this: the most a
#: next run reads again that was committed already.
SEGMENT_BYTES = 4 * 1024 * 1024
#: Times a segment is opened in a folder made again before the journal gives up.
_FOLDER_TRIES = 5


def directory_for(store: JobStore) -> Path | None:
    """The journal directory of the store's database; None when it has none (a SQLite
    database given as a URI, or no flock on this platform)."""
    if fcntl is None:
        return None
    target = store.sqlite_target
    if target is not None:
        if target.uri:
            return None
        path = Path(target.database).absolute()
        return path.with_name(path.name + SQLITE_SUFFIX)
    # One directory per database: host, port, database and user (never the password).
    where = store.postgres_location or ""
    key = hashlib.sha256(where.encode()).hexdigest()[:16]
    return _state_dir() / "answers" / key


def _state_dir() -> Path:
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "batchrunner"


class Segment:
    """A segment file and its open, locked descriptor."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def committed(self) -> None:
        """Everything in it is in the database: delete it (then unlock)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)

    def keep(self) -> None:
        """Not committed (the database failed): unlock it for a later run to record."""
        os.close(self.fd)


class Mark(NamedTuple):
    """The answers of a segment handed to one transaction: its first `answers` lines."""

    segment: Segment
    answers: int
    #: Closed to new answers: deleted once the transaction commits.
    sealed: bool


class Journal:
    """One run's journal: `add` on every ended job; `mark` when the writer takes the jobs
    added so far into a transaction, then `committed` or `kept` with that mark."""

    def __init__(self, directory: Path, batch_id: str, worker_id: str) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # (removed meanwhile: `_open_segment`)
            _make_private(directory)
        self.directory = directory
        self._prefix = f"{batch_id}.{worker_id}."
        self._seq = 0
        self._current: Segment | None = None
        self._current_bytes = 0
        self._current_answers = 0
        #: Lines added and not yet written, and whether their write is scheduled.
        self._pending: list[bytes] = []
        self._scheduled = False
        self.failed = False

    def add(self, ended: Ended, attempts: Sequence[AttemptRecord]) -> None:
        if self.failed:
            return
        self._pending.append(_encode(ended, attempts))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.write)

    def write(self) -> None:
        """Append what was added since the last write to the current segment, in one write()."""
        self._scheduled = False
        if not self._pending or self.failed:
            return
        data = b"".join(self._pending)
        try:
            self._append(data)
            self._current_answers += len(self._pending)
        except OSError as exc:
            self._stop(exc)
        self._pending.clear()

    def mark(self, *, seal: bool = False) -> Mark | None:
        """The answers added so far, for the transaction about to be written; None when
        there are none in the current segment. The segment is sealed when it has grown past
        SEGMENT_BYTES (or `seal`)."""
        self.write()
        segment = self._current
        if segment is None:
            return None
        mark = Mark(segment, self._current_answers, seal or self._current_bytes >= SEGMENT_BYTES)
        if mark.sealed:
            self._current = None
            self._current_bytes = self._current_answers = 0
        return mark

    def committed(self, mark: Mark) -> None:
        """The mark's transaction committed."""
        if mark.sealed:
            mark.segment.committed()
        elif mark.segment is self._current and not self.failed:
            try:
                self._append(orjson.dumps({"committed": mark.answers}, option=_NEWLINE))
            except OSError as exc:
                self._stop(exc)

    def kept(self, mark: Mark) -> None:
        """The mark's transaction failed: its answers wait for the next run."""
        if mark.sealed:
            mark.segment.keep()

    def close(self, *, committed: bool) -> None:
        """At the end of the run: its segment is deleted when every job added was
        committed, else kept for a later run to record."""
        mark = self.mark(seal=True)
        if mark is not None and committed:
            self.committed(mark)
        elif mark is not None:
            self.kept(mark)
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # only when empty

    def _append(self, data: bytes) -> None:
        if self._current is None:
            self._current = self._open_segment()
        view = memoryview(data)
        while view:
            view = view[os.write(self._current.fd, view) :]
        self._current_bytes += len(data)

    def _stop(self, exc: OSError) -> None:
        # A full disk must not stop the run: answers are still committed as they come, a
        # kill just loses (and re-sends) the ones waiting for their commit.
        self.failed = True
        log.warning("the answer journal in %s stopped: %s", self.directory, exc)

    def _open_segment(self) -> Segment:
        self._seq += 1
        name = f"{self._prefix}{self._seq}{SEGMENT_SUFFIX}"
        # Created and locked under a name `recover` does not look at, then renamed: it never
        # sees a segment of a live run unlocked.
        hidden = self.directory / f".{name}"
        for tries in itertools.count(1):
            try:
                fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
                break
            except FileNotFoundError:
                # The folder is shared by the database's runs, and one that ended removed it
                # while empty (`close`): made again. Once a segment is in it, it stays.
                if tries == _FOLDER_TRIES:
                    raise
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):  # (removed again: tried again)
                    _make_private(self.directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, self.directory / name)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(hidden)
            raise
        return Segment(self.directory / name, fd)


# Fields by position, not the dataclasses themselves: a third of the time per answer. Taken
# by attrgetter, in C; orjson writes the state (a StrEnum) as its value.
_END_NAMES = (
    "job_id",
    "lease_token",
    "state",
    "attempts",
    "status_code",
    "latency_ms",
    "request_id",
    "response",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "schema_valid",
    "error_kind",
    "error",
)
_END_FIELDS = attrgetter(*_END_NAMES)
_ATTEMPT_FIELDS = attrgetter(
    "job_id", "status_code", "error_kind", "latency_ms", "request_id", "started_at", "spent"
)


def _encode(end: Ended, attempts: Sequence[AttemptRecord]) -> bytes:
    return orjson.dumps((*_END_FIELDS(end), list(map(_ATTEMPT_FIELDS, attempts))), option=_NEWLINE)


_NEWLINE = orjson.OPT_APPEND_NEWLINE


def _decode(line: bytes) -> tuple[Ended, list[AttemptRecord]]:
    from batchrunner.store import AttemptRecord, Ended

    *fields, attempts = orjson.loads(line)
    if len(fields) != _ENDED_FIELDS:
        raise ValueError(f"{len(fields)} fields, not {_ENDED_FIELDS}")
    fields[2] = JobState(fields[2])
    decoded = []
    for job_id, status, kind, latency_ms, request_id, started_at, *rest in attempts:
        # `spent` comes back as a list, or not at all from a line of an earlier version.
        spent = tuple(rest[0]) if rest and rest[0] is not None else None
        decoded.append(
            AttemptRecord(job_id, status, kind, latency_ms, request_id, started_at, spent)
        )
    return Ended(*fields), decoded


#: Fields of an `Ended` in a journal line.
_ENDED_FIELDS = len(_END_NAMES)


class Kept:
    """What the segments of dead runs hold, by the worker that received it."""

    def __init__(self) -> None:
        self.by_worker: dict[str, list[tuple[Ended, list[AttemptRecord]]]] = {}
        self.unreadable = 0


def _make_private(directory: Path) -> set[int]:
    """The journal folder as one no other user can write to, or OSError. A folder beside a
    database in a shared place (or a state folder there) could be another user's, or a link
    they made, and what its segments hold is recorded as answers: another user could plant
    results. Trusted: this user's, root's, and (beside a SQLite database) the database
    owner's, so that root running a user's batch reads what the user's killed run kept.
    Returns the owners trusted, whose segments in it are read."""
    st = os.lstat(directory)
    trusted = _trusted_owners(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in trusted:
        raise OSError(f"{directory} is not a folder of this user's (another user's, or a link)")
    if st.st_mode & 0o022 and st.st_uid != os.geteuid():
        raise OSError(f"{directory} is a folder other users can write to")
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(directory, 0o700)  # (one others could list, too: the names of the runs)
    return trusted


def _trusted_owners(directory: Path) -> set[int]:
    """Whose journal folder and segments are read: this user, root, and the owner of the
    SQLite database the folder is beside."""
    owners = {os.geteuid(), 0}
    if directory.name.endswith(SQLITE_SUFFIX):
        database = directory.with_name(directory.name.removesuffix(SQLITE_SUFFIX))
        with contextlib.suppress(OSError):
            owners.add(database.stat().st_uid)
    return owners


def _dead_segments(directory: Path, batch_id: str) -> Iterator[Segment]:
    """Segments of the batch whose run has ended or died, locked; the caller closes them.
    Only those of a trusted owner, in a folder no one else can write to (`_make_private`)."""
    if fcntl is None or not directory.is_dir():
        return
    try:
        trusted = _make_private(directory)
    except OSError as exc:
        log.warning("answer journals not read: %s", exc)
        return
    for path in sorted(directory.glob(f"{batch_id}.*{SEGMENT_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue  # committed and deleted meanwhile
        except OSError as exc:  # a link
            log.warning("answer journal %s not read: %s", path, exc.strerror or exc)
            continue
        if os.fstat(fd).st_uid not in trusted:
            os.close(fd)
            log.warning("answer journal %s not read: another user's file", path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink == 0:
                raise BlockingIOError  # deleted between the open and the lock: committed
        except BlockingIOError:
            os.close(fd)  # a live run's
            continue
        yield Segment(path, fd)


def _read(segment: Segment, kept: Kept) -> None:
    worker_id = _worker_of(segment.path)
    with os.fdopen(os.dup(segment.fd), "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # A last line without its newline was cut short (the machine went down mid-write).
    kept.unreadable += len(lines[-1]) > 0
    answers: list[tuple[Ended, list[AttemptRecord]]] = []
    committed = 0
    for line in lines[:-1]:
        try:
            if line.startswith(b"{"):
                committed = max(committed, int(orjson.loads(line)["committed"]))
            else:
                answers.append(_decode(line))
        except (orjson.JSONDecodeError, TypeError, ValueError, KeyError):
            kept.unreadable += 1
    kept.by_worker.setdefault(worker_id, []).extend(answers[committed:])


def workers_with_segments(directory: Path | None, batch_id: str) -> set[str]:
    """The workers of the batch that have segments here: live runs, and dead runs whose
    journal another process is recording (their jobs must not be released meanwhile)."""
    if directory is None or not directory.is_dir():
        return set()
    trusted = _trusted_owners(directory)
    return {
        _worker_of(p)
        for p in directory.glob(f"{batch_id}.*{SEGMENT_SUFFIX}")
        if _owner_of(p) in trusted
    }


def _owner_of(path: Path) -> int | None:
    try:
        return path.lstat().st_uid
    except OSError:
        return None


def _worker_of(path: Path) -> str:
    """The worker a segment file belongs to: `<batch id>.<worker id>.<n>.jnl`."""
    return path.name.split(".")[1]


async def recover_dead(store: JobStore, batch_id: str) -> int:
    """`recover` in the store's journal directory, if it has one."""
    directory = directory_for(store)
    return 0 if directory is None else await recover(store, batch_id, directory, time.time())


async def recover(store: JobStore, batch_id: str, directory: Path, now: float) -> int:
    """Record the answers that dead runs of the batch kept in their journals; returns how
    many jobs they ended. Jobs that have ended since are left as they are."""
    segments = list(_dead_segments(directory, batch_id))
    if not segments:
        return 0
    recorded = 0
    try:
        kept = Kept()
        for segment in segments:
            _read(segment, kept)
        if kept.unreadable:
            log.warning("%d unreadable line(s) in the answer journal skipped", kept.unreadable)
        for worker_id, entries in kept.by_worker.items():
            recorded += await store.record_kept(batch_id, worker_id, entries, now)
    except BaseException:
        for segment in segments:
            segment.keep()
        raise
    for segment in segments:
        segment.committed()
    return recorded
