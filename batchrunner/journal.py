"""The answer journal: every answer kept on disk from the moment it arrives until it is committed.

The dispatcher records ended jobs in batched transactions. An answer that has arrived and waits
for the next commit would be lost by a `kill -9` and its request sent again by the next run.
So each ended job is first appended to a segment file of this run's journal, with one
`write()`: the kernel keeps what was written when the process dies. (Not when the machine does:
an fsync per answer would cost a disk flush on the hot path; a lost machine re-sends what was
not committed, at most `--concurrency` requests, as before.) The writer seals the segment when
it takes its jobs into a transaction and deletes it once that transaction commits.

The next run of the batch on this machine records what the segments of dead runs hold before
it claims anything (`recover`): each answer whose job has not ended since, and the attempts that
led to it, exactly once.

Files: `<directory>/<batch id>.<worker id>.<n>.jnl`, one JSON line per ended job:
`[Ended, [AttemptRecord, ...]]`. A run holds an exclusive `flock` on each segment it has not yet
deleted; a segment whose lock can be taken belongs to a run that has ended or died.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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


def directory_for(store: JobStore) -> Path | None:
    """The journal directory of the store's database; None when it has none (in memory, or no
    flock on this platform)."""
    if fcntl is None:
        return None
    url = store.engine.url
    if store.is_sqlite:
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            return None
        path = Path(database).absolute()
        return path.with_name(path.name + SQLITE_SUFFIX)
    # One directory per database: host, port, database and user (never the password).
    where = url.set(drivername="postgresql", password=None).render_as_string()
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


class Journal:
    """One run's journal: `add` on every ended job, `seal` when the writer takes the jobs
    added so far into a transaction."""

    def __init__(self, directory: Path, batch_id: str, worker_id: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._prefix = f"{batch_id}.{worker_id}."
        self._seq = 0
        self._current: Segment | None = None
        self.failed = False

    def add(self, ended: Ended, attempts: Sequence[AttemptRecord]) -> None:
        if self.failed:
            return
        data = orjson.dumps((ended, attempts), option=orjson.OPT_APPEND_NEWLINE)
        try:
            if self._current is None:
                self._current = self._open_segment()
            view = memoryview(data)
            while view:
                view = view[os.write(self._current.fd, view) :]
        except OSError as exc:
            # A full disk must not stop the run: answers are still committed as they come,
            # a kill just loses (and re-sends) the ones waiting for their commit.
            self.failed = True
            log.warning("the answer journal in %s stopped: %s", self.directory, exc)

    def seal(self) -> Segment | None:
        """The segment holding every job added since the last seal, closed to new ones."""
        segment, self._current = self._current, None
        return segment

    def close(self) -> None:
        """At the end of the run: a segment still open keeps its answers for a later run."""
        segment, self._current = self._current, None
        if segment is not None:
            segment.keep()
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # only when empty

    def _open_segment(self) -> Segment:
        self._seq += 1
        name = f"{self._prefix}{self._seq}{SEGMENT_SUFFIX}"
        # Created and locked under a name `recover` does not look at, then renamed: it never
        # sees a segment of a live run unlocked.
        hidden = self.directory / f".{name}"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(hidden, self.directory / name)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(hidden)
            raise
        return Segment(self.directory / name, fd)


class Kept:
    """What the segments of dead runs hold, by the worker that received it."""

    def __init__(self) -> None:
        self.by_worker: dict[str, list[tuple[Ended, list[AttemptRecord]]]] = {}
        self.unreadable = 0


def _dead_segments(directory: Path, batch_id: str) -> Iterator[Segment]:
    """Segments of the batch whose run has ended or died, locked; the caller closes them."""
    if fcntl is None or not directory.is_dir():
        return
    for path in sorted(directory.glob(f"{batch_id}.*{SEGMENT_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # committed and deleted meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink == 0:
                raise BlockingIOError  # deleted between the open and the lock: committed
        except BlockingIOError:
            os.close(fd)  # a live run's
            continue
        yield Segment(path, fd)


def _read(segment: Segment, kept: Kept) -> None:
    from batchrunner.store import AttemptRecord, Ended

    worker_id = segment.path.name.split(".")[1]
    with os.fdopen(os.dup(segment.fd), "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # A last line without its newline was cut short (the machine went down mid-write).
    kept.unreadable += len(lines[-1]) > 0
    entries = kept.by_worker.setdefault(worker_id, [])
    for line in lines[:-1]:
        try:
            end, attempts = orjson.loads(line)
            end["state"] = JobState(end["state"])
            entries.append((Ended(**end), [AttemptRecord(**a) for a in attempts]))
        except (orjson.JSONDecodeError, TypeError, ValueError, KeyError):
            kept.unreadable += 1


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
