"""The answer journal: an answer that has arrived is not sent again after a kill -9, even
while its transaction has yet to commit.

First on the journal and the store, in-process; then with a real `batchrunner run` killed while
the database holds up its writes, so that every answer it has received is still uncommitted.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from batchrunner import coordination, journal, report, runner
from batchrunner.config import RunConfig
from batchrunner.coordination import JOIN_HOLD_S
from batchrunner.dispatcher import Dispatcher, StopReason
from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import submit_file
from batchrunner.models import JobState
from batchrunner.store import AttemptRecord, ClaimedJob, Ended, JobStore
from tests.conftest import chat, coordinator, dead_pid, succeeded

MakeFile = Callable[..., Path]

LEASE_S = 60.0
#: The killed run's requests in flight at once (and, with writes held up, all it sends).
CONCURRENCY = 4
#: Long enough to take the database's write lock between the first request and its answer.
ANSWER_MS = 300
#: After the server has sent its last answer: time for the client to read it.
SETTLE_S = 0.5
RUN_TIMEOUT_S = 60.0


def _success(job: ClaimedJob, answer: str) -> Ended:
    """After a retry, with some of the prompt cached: fields the journal must keep."""
    return succeeded(job, answer, attempts=2, latency_ms=12.5, cached_tokens=1)


def _tries(job: ClaimedJob, t0: float) -> list[AttemptRecord]:
    """A 500, then the answer."""
    return [
        AttemptRecord(job.id, 500, "http_500", 3.0, "req_first", t0),
        AttemptRecord(job.id, 200, None, 12.5, "req_second", t0 + 1.25),
    ]


async def _rows(store: JobStore, sql: str, **params: Any) -> list[Any]:
    async with store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def _claimed(store: JobStore, make_file: MakeFile, n: int) -> tuple[str, list[ClaimedJob]]:
    batch_id = (await submit_file(store, make_file([chat(f"kept {i}") for i in range(n)]))).batch.id
    jobs = await store.claim(batch_id, "w-dead", "w-dead.1", n, time.time(), LEASE_S)
    assert len(jobs) == n
    return batch_id, jobs


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{journal.SEGMENT_SUFFIX}"))


def _kept_in(directory: Path, batch_id: str) -> journal.Kept:
    """What the batch's one dead segment in `directory` holds, the segment left in place."""
    kept = journal.Kept()
    (segment,) = journal._dead_segments(directory, batch_id)
    try:
        journal._read(segment, kept)
    finally:
        segment.keep()
    return kept


async def test_a_dead_runs_journal_is_recorded_once_and_jobs_ended_since_are_left_alone(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    batch_id, (kept, given_back, ended_since, half_logged) = await _claimed(store, make_file, 4)
    t0 = time.time()
    # Before the kill the dead run committed one job's end, and another's first attempt.
    await store.record(
        batch_id,
        "w-dead",
        [_success(ended_since, "committed")],
        [_tries(half_logged, t0)[0]],
        t0,
    )
    # Since then a run on another machine gave one job back as pending.
    assert await store.release("w-dead", [(given_back.id, given_back.lease_token)]) == 1
    directory = tmp_path / "answers"
    dead = journal.Journal(directory, batch_id, "w-dead")
    for job in (kept, given_back, ended_since, half_logged):
        dead.add(_success(job, f"kept {job.id}"), _tries(job, t0))
    dead.close(committed=False)  # as the kernel does for a dead run: unlocked, kept
    assert len(_segments(directory)) == 1

    assert await journal.recover(store, batch_id, directory, time.time()) == 3

    assert _segments(directory) == []
    results = {r.job_id: r for r in await _rows(store, "SELECT * FROM results")}
    assert sorted(results) == sorted([kept.id, given_back.id, ended_since.id, half_logged.id])
    assert results[ended_since.id].response == '{"answer": "committed"}'
    for job in (kept, given_back, half_logged):
        assert results[job.id].response == f'{{"answer": "kept {job.id}"}}'
        assert results[job.id].request_id == f"req_kept {job.id}"
        assert (results[job.id].attempts, results[job.id].cached_tokens) == (2, 1)
    states = await _rows(store, "SELECT state, lease_token, attempts FROM jobs")
    assert {(s.state, s.lease_token, s.attempts) for s in states} == {("succeeded", None, 2)}
    # Each attempt logged once, under the worker that made it; none of the job that had
    # already ended.
    log = await _rows(store, "SELECT job_id, worker_id, status_code, started_at FROM attempts")
    by_job: dict[int, list[Any]] = {}
    for row in log:
        by_job.setdefault(row.job_id, []).append((row.worker_id, row.status_code, row.started_at))
    assert sorted(by_job) == sorted([kept.id, given_back.id, half_logged.id])
    for job in (kept, given_back, half_logged):
        assert sorted(by_job[job.id]) == [("w-dead", 200, t0 + 1.25), ("w-dead", 500, t0)]
    # Nothing left to do the second time.
    assert await journal.recover(store, batch_id, directory, time.time()) == 0


#: A run (`runner.run`, handlers and all) that gets a Ctrl-C while it records a dead run's
#: journal; prints its outcome. argv: the database's URL and the batch's id.
_INTERRUPTED_WHILE_RECOVERING = """
import asyncio, os, signal, sys
from batchrunner import journal, runner
from batchrunner.config import RunConfig
from batchrunner.store import JobStore
recover = journal.recover
async def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.1)  # (the signal is taken meanwhile)
    return await recover(*args, **kwargs)
journal.recover = interrupted
async def main():
    store = await JobStore.open(sys.argv[1])
    try:
        rep = await runner.run(store, sys.argv[2], RunConfig(), warn=lambda _: None, progress=False)
    finally:
        await store.close()
    print(rep.exit_code, rep.result.reason.name, rep.result.stats.recovered, rep.result.stats.sent)
asyncio.run(main())
"""


async def test_a_ctrl_c_while_a_dead_runs_journal_is_recorded_lets_it_finish(
    store: JobStore, db_url: str, make_file: MakeFile
) -> None:
    """Recording a dead run's journal moved before the run's own handlers: a Ctrl-C then
    cancelled it half way (what it had recorded was done again by the next run) and the run
    ended without saying how to resume. Under the handlers, it finishes, and the run stops
    as interrupted, resumable, having sent nothing."""
    async with FakeServer(FakeConfig()) as srv:
        batch_id = (
            await submit_file(store, make_file([chat(f"q{i}") for i in range(3)]), base_url=srv.url)
        ).batch.id
        jobs = await store.claim(batch_id, "w-dead", "w-dead.1", 2, time.time(), LEASE_S)
        directory = journal.directory_for(store)
        assert directory is not None
        dead = journal.Journal(directory, batch_id, "w-dead")
        for job in jobs:
            dead.add(_success(job, f"kept {job.id}"), _tries(job, time.time()))
        dead.close(committed=False)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _INTERRUPTED_WHILE_RECOVERING, db_url, batch_id],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            env={**os.environ, "OPENAI_API_KEY": "sk-test"},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["130", "INTERRUPTED", "2", "0"]
        assert srv.stats.requests_total == 0
    counts = (await store.counts(batch_id)).counts
    assert (counts["succeeded"], counts["pending"]) == (2, 1)


async def test_a_dead_runs_answers_to_jobs_taken_over_since_count_as_paid_for(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    """A run killed with answers in its journal whose jobs another worker took over and
    ended meanwhile: those answers were paid for; `status` counted them nowhere. One the dead
    run had recorded itself (its answer's attempt logged with it) is its job's result, and
    counts once."""
    batch_id, (taken_over, recorded) = await _claimed(store, make_file, 2)
    t0 = time.time()
    # The dead run recorded one job itself, its attempts with it.
    await store.record(
        batch_id, "w-dead", [_success(recorded, "its own")], _tries(recorded, t0), t0
    )
    # The other went to another worker, which ended it (the dead run's lease had run out).
    assert await store.release("w-dead", [(taken_over.id, taken_over.lease_token)]) == 1
    (again,) = await store.claim(batch_id, "w-other", "w-other.1", 1, t0 + 5, LEASE_S)
    other_try = [AttemptRecord(again.id, 200, None, 9.0, "req_other", t0 + 5)]
    await store.record(batch_id, "w-other", [_success(again, "other's")], other_try, t0 + 6)
    directory = tmp_path / "answers"
    dead = journal.Journal(directory, batch_id, "w-dead")
    for job in (taken_over, recorded):
        dead.add(_success(job, f"kept {job.id}"), _tries(job, t0))
    dead.close(committed=False)

    assert await journal.recover(store, batch_id, directory, time.time()) == 0

    paid = await _rows(store, "SELECT job_id, total_tokens FROM discarded_answers")
    assert [(p.job_id, p.total_tokens) for p in paid] == [(taken_over.id, 7)]
    status = await report.batch_status(store, batch_id)
    assert status.tokens["total_tokens"] == 3 * 7  # two results, one answer not kept
    assert await journal.recover(store, batch_id, directory, time.time()) == 0
    assert len(await _rows(store, "SELECT * FROM discarded_answers")) == 1


async def test_cancel_records_the_answers_a_dead_run_kept_first(
    store: JobStore, make_file: MakeFile
) -> None:
    """A cancelled batch has no next run to record what a killed run had received (and paid
    for) but not written: `cancel` records it, then cancels the rest."""
    batch_id, (kept, other) = await _claimed(store, make_file, 2)
    directory = journal.directory_for(store)
    assert directory is not None
    dead = journal.Journal(directory, batch_id, "w-dead")
    dead.add(_success(kept, "paid for"), _tries(kept, time.time()))
    dead.close(committed=False)

    assert await runner.cancel(store, batch_id) == (1, 1)

    states = dict(await _rows(store, "SELECT id, state FROM jobs"))
    assert states == {kept.id: "succeeded", other.id: "cancelled"}
    (result,) = await _rows(store, "SELECT job_id, response FROM results")
    assert (result.job_id, result.response) == (kept.id, '{"answer": "paid for"}')
    assert [p for p in _segments(directory) if batch_id in p.name] == []


async def test_a_dead_runs_last_record_that_runs_after_its_journal_logs_nothing_twice(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    """A run killed with its last record sent but not yet run by the server (PostgreSQL runs
    a statement whose client has gone): the next run records the answers from the journal
    first, and the dead run's statement comes after. Its ends are fenced by the new lease;
    its attempts, already logged from the journal, are not logged again."""
    batch_id, (job,) = await _claimed(store, make_file, 1)
    t0 = time.time()
    directory = tmp_path / "answers"
    dead = journal.Journal(directory, batch_id, "w-dead")
    dead.add(_success(job, "answer"), _tries(job, t0))
    dead.close(committed=False)
    assert await journal.recover(store, batch_id, directory, time.time()) == 1

    late = await store.record(batch_id, "w-dead", [_success(job, "answer")], _tries(job, t0), t0)

    assert (late.recorded, late.fenced) == (0, 1)
    log = await _rows(
        store, "SELECT status_code, started_at FROM attempts WHERE job_id = :j", j=job.id
    )
    assert sorted(log) == [(200, t0 + 1.25), (500, t0)]
    assert len(await _rows(store, "SELECT job_id FROM results")) == 1


async def test_answers_marked_committed_are_not_recorded_again(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    """A job whose failure the dead run committed was sent back to pending by `retry`: the
    journal must not end it again with the old answer. Only answers past the segment's last
    committed mark are recovered."""
    batch_id, (retried, unwritten) = await _claimed(store, make_file, 2)
    directory = tmp_path / "answers"
    dead = journal.Journal(directory, batch_id, "w-dead")
    failure = Ended(retried.id, retried.lease_token, JobState.FAILED, 1, 400, 2.0, error="bad")
    dead.add(failure, [])
    mark = dead.mark()
    assert mark is not None and mark.answers == 1 and not mark.sealed
    await store.record(batch_id, "w-dead", [failure], [], time.time())
    dead.committed(mark)
    dead.add(_success(unwritten, "unwritten"), [])
    dead.close(committed=False)
    assert await store.retry_failed(batch_id) == 1

    assert await journal.recover(store, batch_id, directory, time.time()) == 1

    states = dict(await _rows(store, "SELECT id, state FROM jobs"))
    assert states == {retried.id: "pending", unwritten.id: "succeeded"}
    assert _segments(directory) == []


async def test_a_dead_runs_jobs_wait_while_another_process_records_its_journal(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    """A run that finds a dead run of this machine whose journal another process is recording
    (that process holds the segment's lock) leaves the dead run's jobs alone: released, they
    would be claimed and sent again before that process records their answers."""
    now = time.time()
    batch_id, jobs = await _claimed(store, make_file, 3)
    await store.register_worker("w-me", batch_id, now)
    await store.register_worker("w-dead", batch_id, now)
    async with store.engine.begin() as conn:
        await conn.execute(
            text("UPDATE workers SET pid = :pid WHERE id = 'w-dead'"), {"pid": dead_pid()}
        )
    directory = tmp_path / "answers"
    dead = journal.Journal(directory, batch_id, "w-dead")
    for job in jobs:
        dead.add(_success(job, f"kept {job.id}"), [])
    dead.close(committed=False)
    [segment] = _segments(directory)
    held = os.open(segment, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # the other process, recording it
    looker = coordinator(store, batch_id, "w-me", journal_dir=directory)
    dead_jobs = "SELECT id FROM jobs WHERE state = 'running' AND lease_owner = 'w-dead'"
    try:
        assert (await looker.look()).reaped == 0
        assert looker.recovered == 0
        # Nor does a run that starts meanwhile.
        spare = journal.workers_with_segments(directory, batch_id)
        assert spare == {"w-dead"}
        await store.register_worker("w-new", batch_id, time.time(), spare=spare)
        assert len(await _rows(store, dead_jobs)) == 3
    finally:
        os.close(held)

    # That process died before it recorded anything: the next look records and releases.
    assert (await looker.look()).reaped == 1
    assert looker.recovered == 3
    assert _segments(directory) == []
    counts = await store.counts(batch_id)
    assert counts.counts["succeeded"] == 3 and counts.unfinished == 0


async def test_a_live_runs_journal_is_not_touched(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    batch_id, (job,) = await _claimed(store, make_file, 1)
    directory = tmp_path / "answers"
    live = journal.Journal(directory, batch_id, "w-live")
    live.add(_success(job, "live"), _tries(job, time.time()))
    await asyncio.sleep(0)  # the next turn of the event loop writes it
    try:
        assert len(_segments(directory)) == 1
        assert await journal.recover(store, batch_id, directory, time.time()) == 0
        assert len(_segments(directory)) == 1
        assert await _rows(store, "SELECT job_id FROM results") == []
    finally:
        live.close(committed=True)
    assert not directory.exists()


async def test_a_journal_whose_folder_another_run_removed_makes_it_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The batches of a database share one folder, which a run that ends removes when it is
    empty: a run that had made it and not yet opened its first segment (its first answers
    still on the way) stopped its journal for good, and a kill -9 sent those answers again."""
    directory = tmp_path / "answers"
    ours = journal.Journal(directory, "batch_a", "w-slow")
    journal.Journal(directory, "batch_b", "w-done").close(committed=True)
    assert not directory.exists()
    end = Ended(1, "w-slow.1", JobState.FAILED, 1, 500, 1.0, error_kind="server_error")
    with caplog.at_level(logging.WARNING, logger="batchrunner.journal"):
        ours.add(end, [])
        await asyncio.sleep(0)  # the next turn of the event loop writes it
    assert not ours.failed and caplog.messages == []
    assert len(_segments(directory)) == 1
    ours.close(committed=False)
    assert _kept_in(directory, "batch_a").by_worker == {"w-slow": [(end, [])]}


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
async def test_segments_another_user_planted_are_not_recorded(
    store: JobStore, make_file: MakeFile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Beside a database in a shared folder, another user could make the journal folder (or
    a link in its place) and write a segment into it: the next run recorded its lines as
    answers, sent nothing, and exported them as results."""
    batch_id, (job,) = await _claimed(store, make_file, 1)
    planted = tmp_path / "planted"
    forger = journal.Journal(planted, batch_id, "w-dead")
    forger.add(_success(job, "forged"), [])
    forger.close(committed=False)
    (segment,) = _segments(planted)
    os.chown(segment, NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING, logger="batchrunner.journal"):
        assert await journal.recover(store, batch_id, planted, time.time()) == 0
        assert journal.workers_with_segments(planted, batch_id) == set()
        # A folder of another user's, or a link: neither read nor written.
        os.chown(planted, NOBODY, NOBODY)
        assert await journal.recover(store, batch_id, planted, time.time()) == 0
        with pytest.raises(OSError, match="not a folder of this user's"):
            journal.Journal(planted, batch_id, "w-live")
        linked = tmp_path / "linked"
        linked.symlink_to(planted)
        with pytest.raises(OSError, match="not a folder of this user's"):
            journal.Journal(linked, batch_id, "w-live")
    assert await _rows(store, "SELECT job_id FROM results") == []
    assert "another user's file" in caplog.text and "not read" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="making files another user's needs root")
async def test_root_records_what_the_database_owners_killed_run_kept(
    sqlite_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    """A user's run killed with answers waiting, then the batch run again by root (sudo, a
    container on a mounted folder): its journal is the database owner's, and is read."""
    store = await JobStore.open(sqlite_url)
    try:
        batch_id, (job,) = await _claimed(store, make_file, 1)
        database = tmp_path / "jobs.db"
        directory = journal.directory_for(store)
        assert directory == tmp_path / "jobs.db-answers"
        killed = journal.Journal(directory, batch_id, "w-dead")
        killed.add(_success(job, "kept"), [])
        killed.close(committed=False)
        for path in (database, directory, *_segments(directory)):
            os.chown(path, NOBODY, NOBODY)
        assert await journal.recover(store, batch_id, directory, time.time()) == 1
    finally:
        await store.close()


@pytest.mark.parametrize("mode", [0o777, 0o755])
async def test_a_journal_folder_others_could_write_to_is_made_private(
    tmp_path: Path, mode: int
) -> None:
    """Made under umask 000 (or by hand) the folder was writable by all; one others could
    read (the names of its runs) stayed so, where the README says it is this user's alone."""
    directory = tmp_path / "answers"
    directory.mkdir()
    directory.chmod(mode)
    fresh = tmp_path / "fresh"
    for folder in (directory, fresh):
        ours = journal.Journal(folder, "batch_x", "w-1")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        ours.close(committed=True)


async def test_every_field_comes_back_as_it_was_written(tmp_path: Path) -> None:
    ends = [
        Ended(
            1,
            "w-a.1",
            JobState.SUCCEEDED,
            3,
            200,
            1.5,
            "req_1",
            '{"a": "\u00e9\\n"}',
            "gpt-4o",
            10,
            20,
            5,
            7,
            30,
            True,
        ),
        Ended(
            2,
            "w-a.2",
            JobState.FAILED,
            1,
            400,
            2.25,
            "req_2",
            error_kind="http_400",
            error='{"error": {"message": "bad"}}',
        ),
        Ended(3, "w-a.2", JobState.FAILED, 5, None, 0.0, error_kind="timeout", error=None),
    ]
    tries = [
        [
            AttemptRecord(1, 429, "rate_limited", 1.0, None, 1.5),
            AttemptRecord(1, 200, "invalid_json", 1.0, "r0", 4.5, ("gpt-4o", 10, 2, 20, 7, 30)),
            AttemptRecord(1, 200, None, 2.0, "r", 9.25),
        ],
        [AttemptRecord(2, 400, "http_400", 3.0, "req_2", 7.0)],
        [],
    ]
    directory = tmp_path / "answers"
    dead = journal.Journal(directory, "batch_x", "w-a")
    for end, attempts in zip(ends, tries, strict=True):
        dead.add(end, attempts)
    dead.close(committed=False)
    kept = _kept_in(directory, "batch_x")
    assert kept.unreadable == 0
    assert kept.by_worker == {"w-a": list(zip(ends, tries, strict=True))}


def test_a_line_an_earlier_version_wrote_is_read() -> None:
    """Attempts had six fields before the answers paid for and not kept got a seventh."""
    line = orjson.dumps(
        [2, "w-a.2", "failed", 1, 400, 2.25, "req_2", None, None, None, None, None, None, None,
         None, "http_400", "bad", [[2, 400, "http_400", 3.0, "req_2", 7.0]]]
    )  # fmt: skip
    end, attempts = journal._decode(line)
    assert (end.job_id, end.state, end.error) == (2, JobState.FAILED, "bad")
    assert attempts == [AttemptRecord(2, 400, "http_400", 3.0, "req_2", 7.0)]


async def test_a_line_cut_short_is_skipped_and_the_rest_recorded(
    store: JobStore, make_file: MakeFile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batch_id, (whole, cut) = await _claimed(store, make_file, 2)
    directory = tmp_path / "answers"
    dead = journal.Journal(directory, batch_id, "w-dead")
    dead.add(_success(whole, "whole"), [])
    dead.add(_success(cut, "cut"), [])
    dead.close(committed=False)
    (path,) = _segments(directory)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # the machine went down mid-write

    assert await journal.recover(store, batch_id, directory, time.time()) == 1

    assert [r.job_id for r in await _rows(store, "SELECT job_id FROM results")] == [whole.id]
    assert "1 unreadable line(s)" in caplog.text
    assert _segments(directory) == []


async def test_other_batches_journals_wait_for_their_own_runs(
    store: JobStore, make_file: MakeFile, tmp_path: Path
) -> None:
    batch_id, (job,) = await _claimed(store, make_file, 1)
    directory = tmp_path / "answers"
    dead = journal.Journal(directory, "batch_someother", "w-dead")
    dead.add(_success(job, "other"), [])
    dead.close(committed=False)
    assert await journal.recover(store, batch_id, directory, time.time()) == 0
    assert len(_segments(directory)) == 1


async def test_where_the_journal_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(journal.STATE_DIR_ENV, str(tmp_path / "state"))
    dirs: dict[str, Path | None] = {}
    for url in (
        f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}",
        f"sqlite:///file:{tmp_path / 'jobs.db'}?mode=ro&uri=true",
        f"sqlite:///{tmp_path / 'other.db'}",
        "postgresql+asyncpg://u:secret@db.example:5432/a",
        "postgresql+asyncpg://u:other@db.example:5432/a",
        "postgresql+asyncpg://u@db.example:5432/b",
    ):
        store = JobStore.for_url(url)
        dirs[url] = journal.directory_for(store)
        await store.close()
    urls = list(dirs)
    # SQLite: beside the database file; none for a database given as a URI.
    assert dirs[urls[0]] == tmp_path / "jobs.db-answers"
    assert dirs[urls[1]] is None
    assert dirs[urls[2]] == tmp_path / "other.db-answers"
    # PostgreSQL: one directory per database, whatever the password.
    assert dirs[urls[3]] == dirs[urls[4]] != dirs[urls[5]]
    assert all(dirs[u].parent == tmp_path / "state" / "answers" for u in urls[3:])  # type: ignore[union-attr]


async def test_a_finished_run_leaves_no_journal(
    sqlite_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    async with await JobStore.open(sqlite_url) as store, FakeServer(FakeConfig()) as srv:
        rows = [chat(f"tidy {i}") for i in range(40)]
        batch = (await submit_file(store, make_file(rows), base_url=srv.url)).batch
        config = RunConfig(concurrency=8, lease_s=LEASE_S)
        result = await Dispatcher(store, batch, config, api_key=None, base_url=srv.url).run()
    assert result.reason is StopReason.DONE and result.stats.succeeded == 40
    assert result.stats.recovered == 0
    assert not (tmp_path / "jobs.db-answers").exists()


async def test_a_claim_that_gives_back_a_dead_peers_jobs_records_its_journal_first(
    store: JobStore, make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer of this machine died with answers in its journal, its leases run out since (it
    had given up on a database that refused its writes). A run's claim that gave expired leases
    back came before its coordinator found the peer dead (a run thawed with SIGCONT, whose
    claim was due at once): their requests were sent again, 64 in one test."""
    # Only the claims look: the coordinator's own looks would find the peer first, or not.
    monkeypatch.setattr(coordination, "COORDINATE_EVERY_S", 1e6)
    rows = [chat(f"job {i}") for i in range(400)]
    async with FakeServer(FakeConfig(latency_ms=20)) as srv:
        batch = (await submit_file(store, make_file(rows), base_url=srv.url)).batch
        config = RunConfig(concurrency=2, lease_s=2.0)
        dispatcher = Dispatcher(store, batch, config, api_key=None, base_url=srv.url)
        run = asyncio.create_task(dispatcher.run())
        try:
            while srv.stats.requests_total == 0:
                assert not run.done()
                await asyncio.sleep(0.01)
            now = time.time()
            await store.register_worker("w-dead", batch.id, now)
            peers = await store.claim(batch.id, "w-dead", "w-dead.1", 2, now, 0.2)
            directory = journal.directory_for(store)
            assert directory is not None and len(peers) == 2
            dead = journal.Journal(directory, batch.id, "w-dead")
            for job in peers:
                dead.add(_success(job, f"kept {job.id}"), _tries(job, now))
            dead.close(committed=False)
            async with store.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE workers SET pid = :pid WHERE id = 'w-dead'"), {"pid": dead_pid()}
                )
            # Its leases run out at once; the run looks back every lease_s / 4.
            await asyncio.sleep(1.5)
        finally:
            dispatcher.stop()
            await run
        sent = {job.id: srv.stats.attempts_for(job.body.encode()) for job in peers}
        assert srv.stats.requests_total > 0
    assert sent == {job.id: 0 for job in peers}, "answered already: not sent again"
    kept = await _rows(
        store,
        "SELECT job_id, response FROM results WHERE job_id IN (:a, :b)",
        a=peers[0].id,
        b=peers[1].id,
    )
    assert sorted(kept) == sorted((j.id, f'{{"answer": "kept {j.id}"}}') for j in peers)


# -- a real run, killed while its answers wait for the database -----------------------------


class _HeldWrites:
    """Holds up the run's writes from outside: SQLite's write lock, or PostgreSQL's lock on
    `results` (claims, which do not touch it, go on)."""

    def __init__(self, store: JobStore, db_url: str, *, end_other_sessions: bool = True) -> None:
        self.store = store
        self.db_url = db_url
        #: PostgreSQL: end every other session on release (a killed run's statement, queued
        #: behind the lock, goes at once); otherwise the server ends it once it finds its
        #: client gone.
        self.end_other_sessions = end_other_sessions
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None

    async def __aenter__(self) -> _HeldWrites:
        if self.store.is_sqlite:
            path = self.db_url.removeprefix("sqlite:///")
            self._sqlite = sqlite3.connect(path, isolation_level=None)
            self._sqlite.execute("BEGIN IMMEDIATE")
        else:
            self._pg = await self.store.engine.connect()
            await self._pg.begin()
            await self._pg.execute(text("LOCK TABLE results IN EXCLUSIVE MODE"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sqlite is not None:
            self._sqlite.execute("ROLLBACK")
            self._sqlite.close()
        if self._pg is not None and self.end_other_sessions:
            # The server would run a dead client's queued statement once the lock is free;
            # it goes, as it would once the server noticed its client had gone.
            await self._pg.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        if self._pg is not None:
            await self._pg.rollback()
            await self._pg.close()


async def _start_run(db_url: str, batch_id: str, cwd: Path) -> asyncio.subprocess.Process:
    """`batchrunner run` of the batch at CONCURRENCY, as a user starts it; stderr is piped."""
    env = {k: v for k, v in os.environ.items() if k != "BATCHRUNNER_DB"}
    cmd = [sys.executable, "-m", "batchrunner", "--db", db_url, "run", batch_id]
    cmd += ["--concurrency", str(CONCURRENCY), "--quiet"]
    return await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, env=env, stderr=asyncio.subprocess.PIPE
    )


@pytest.mark.slow
async def test_answers_waiting_for_their_commit_are_not_sent_again_after_kill_9(
    store: JobStore, db_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    total = 12
    rows = [chat(f"journalled {i}") for i in range(total)]
    async with FakeServer(FakeConfig(latency_ms=ANSWER_MS)) as srv:
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        proc = await _start_run(db_url, batch_id, tmp_path)
        try:
            while srv.stats.requests_total == 0:
                assert proc.returncode is None
                await asyncio.sleep(0.005)
            async with _HeldWrites(store, db_url):
                # Every request sent is answered, and none of the answers can be committed:
                # the run's workers wait for their commit, so it sends no more than this.
                while srv.stats.successes < CONCURRENCY or srv.stats.in_flight:
                    assert proc.returncode is None
                    await asyncio.sleep(0.005)
                await asyncio.sleep(SETTLE_S)
                answered = srv.stats.successes
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert answered == srv.stats.requests_total == CONCURRENCY
        assert await _rows(store, "SELECT job_id FROM results") == []

        resumed = await _start_run(db_url, batch_id, tmp_path)
        _, err = await asyncio.wait_for(resumed.communicate(), RUN_TIMEOUT_S)
        received = srv.stats.requests_by_body

    stderr = err.decode()
    assert resumed.returncode == 0, stderr
    # Every request sent exactly once: the killed run's answers came from its journal.
    assert len(received) == total and set(received.values()) == {1}
    assert f"note: {CONCURRENCY} answer(s) that another run received" in stderr
    counts = await store.counts(batch_id)
    assert counts.counts["succeeded"] == total and counts.unfinished == 0
    results = await _rows(store, "SELECT job_id, attempts FROM results")
    assert len(results) == total and {r.attempts for r in results} == {1}
    assert len(await _rows(store, "SELECT job_id FROM attempts")) == total


async def _live_workers(store: JobStore, batch_id: str) -> list[Any]:
    return await _rows(
        store,
        "SELECT id, pid FROM workers WHERE batch_id = :b AND stopped_at IS NULL",
        b=batch_id,
    )


@pytest.mark.slow
async def test_a_peer_records_what_a_run_killed_beside_it_had_received(
    store: JobStore, db_url: str, make_file: MakeFile, tmp_path: Path
) -> None:
    """Two runs share a batch on one machine; one is killed while its answers wait for the
    database. The other, still running, records them from the killed run's journal as soon as
    it finds it gone, before its jobs are claimable again: nothing is sent twice."""
    total = 160
    rows = [chat(f"peer {i}") for i in range(total)]
    async with FakeServer(FakeConfig(latency_ms=ANSWER_MS)) as srv:
        batch_id = (await submit_file(store, make_file(rows), base_url=srv.url)).batch.id
        runs: list[asyncio.subprocess.Process] = []
        try:
            # The run to be killed first, until it sends on its own; then its peer, until it
            # has registered and is past its join hold (it sends too then).
            for _ in range(2):
                runs.append(await _start_run(db_url, batch_id, tmp_path))
                while (
                    len(await _live_workers(store, batch_id)) < len(runs)
                    or srv.stats.requests_total == 0
                ):
                    assert all(run.returncode is None for run in runs)
                    await asyncio.sleep(0.01)
            killed, peer = runs
            await asyncio.sleep(JOIN_HOLD_S + SETTLE_S)
            async with _HeldWrites(store, db_url, end_other_sessions=False):
                # Both runs wait for their commits; every request they sent is answered.
                while srv.stats.in_flight:
                    assert killed.returncode is None and peer.returncode is None
                    await asyncio.sleep(0.005)
                await asyncio.sleep(SETTLE_S)
                killed.send_signal(signal.SIGKILL)
                await killed.wait()
            _, err = await asyncio.wait_for(peer.communicate(), RUN_TIMEOUT_S)
            received = srv.stats.requests_by_body
        finally:
            for proc in runs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    stderr = err.decode()
    assert peer.returncode == 0, stderr
    # Every request sent exactly once: the killed run's answers came from its journal.
    assert len(received) == total and set(received.values()) == {1}
    note = re.search(r"note: (\d+) answer\(s\) that another run received", stderr)
    if store.is_sqlite:
        # A SQLite transaction dies with its process: the journal had them all.
        assert note is not None, stderr
        assert 1 <= int(note.group(1)) <= CONCURRENCY
    else:
        # PostgreSQL runs the killed run's statement once the lock is free and may commit it
        # before it finds the client gone: then those jobs had ended, and only the rest came
        # from the journal.
        assert note is None or 1 <= int(note.group(1)) <= CONCURRENCY
    counts = await store.counts(batch_id)
    assert counts.counts["succeeded"] == total and counts.unfinished == 0
    results = await _rows(store, "SELECT job_id, attempts FROM results")
    assert len(results) == total and {r.attempts for r in results} == {1}
    assert len(await _rows(store, "SELECT job_id FROM attempts")) == total
