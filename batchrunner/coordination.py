"""Several workers on one batch: the coordinator each `batchrunner run` keeps beside its dispatcher.

Any number of `batchrunner run BATCH_ID` processes, on one machine or many, may work on one batch
in one database. The job table keeps them apart (a job is claimed under a lease, results are
fenced by its token); this module keeps them polite to the API they share. It owns:

- this worker's row in `workers`: the heartbeat (every job this worker holds gets its lease
  extended, progress counters for `status`) and the pauses it publishes;
- the share of the batch's limits: the configured RPM / TPM are for the whole batch, so each
  worker paces at limit / live workers, looked up every ``COORDINATE_EVERY_S``. A worker joining
  a batch others are already sending on waits ``JOIN_HOLD_S`` before its first request, so that
  they have lowered their share by then;
- pauses across workers: when the server pauses this worker (a 429 with Retry-After, an exhausted
  `x-ratelimit-*` header), the pause's end goes to its row within ``PAUSE_CHECK_S``; when another
  live worker's published pause lies in the future, this worker's pacer waits until then too;
- dead workers on this machine: a registered worker whose process is gone has the answers its
  journal kept recorded (journal.py: they are not sent again), is marked stopped and its other
  jobs are claimable at once; its share comes back at the next look. A worker on another
  machine that stops heartbeating gives its share back once its heartbeat is ``STALE_HEARTBEATS``
  intervals old, and its jobs once their leases expire;
- a cancel: `batchrunner cancel` ends the batch's jobs in the database, where the run holding
  them would only find out when recording their answers (fenced). The look that finds the batch
  cancelled tells the run (``on_cancelled``), which stops sending within ``COORDINATE_EVERY_S``.

The database load per worker: one small read per ``COORDINATE_EVERY_S``, one write per heartbeat,
and a write only when this worker's own pause changes. Pauses are exchanged as Unix times, so
machines sharing a batch need clocks in step (NTP); a followed pause is capped at
``MAX_FOLLOWED_PAUSE_S`` so that a badly skewed clock cannot stall the others.

Rate decreases stay local: every worker's pacer lowers its own effective rate on the 429s it
receives. Lowering every worker on every other worker's 429 would apply one episode's decrease
once per worker; with equal shares of one server-side bucket, the workers see 429s in proportion
to what they send, so each finds its own rate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from batchrunner import journal
from batchrunner.errors import StoreError
from batchrunner.limiter import Pacer
from batchrunner.store import JobStore, WorkerInfo, pid_alive, this_host

log = logging.getLogger(__name__)

#: How often the batch's live workers and their pauses are looked up (one small read).
COORDINATE_EVERY_S = 1.0
#: How often this worker's pacer is checked for a new pause to publish (in memory, no I/O).
PAUSE_CHECK_S = 0.1
#: A worker joining a batch that others are sending on waits this long before its first request:
#: a little over one look of theirs, after which they pace at their new, smaller share.
JOIN_HOLD_S = 1.5 * COORDINATE_EVERY_S
#: A pause must move by more than this to be published or followed again; the monotonic and the
#: wall clock drift apart by far less over one pause.
PAUSE_EPSILON_S = 0.05
#: Another worker's pause is followed for at most this long from now.
MAX_FOLLOWED_PAUSE_S = 120.0
#: Heartbeats per lease: a job's lease survives two heartbeats that fail or come late.
HEARTBEATS_PER_LEASE = 3
#: Another worker counts as gone (its share comes back) once its heartbeat is this many of our
#: heartbeat intervals old: 60 s with the default 60 s lease and 15 s heartbeat.
STALE_HEARTBEATS = 4
#: After a failed heartbeat, the next try comes this soon rather than a whole interval later.
HEARTBEAT_RETRY_S = 1.0
#: The first heartbeat comes this soon after the start: `status` takes a run's speed from its
#: heartbeats, and showed none for the whole first interval (15 s).
FIRST_HEARTBEAT_S = 2.0
#: A SQLite write-ahead log at least this large at a heartbeat is written to stderr (again each
#: time it doubles): another connection's open read keeps SQLite from writing it back.
WAL_WARN_BYTES = 2**30


class SharedBudget(Protocol):
    """A run's --max-cost cap (`dispatcher.Budget`), as the coordinator shares it."""

    def own_spending(self) -> tuple[Decimal, Decimal]:
        """USD this run's answers cost since it started, and USD it holds reserved."""
        ...

    def others_spent(self, spent_usd: Decimal, reserved_usd: Decimal) -> None:
        """The batch's other workers spent this much since this run started, and hold this
        much reserved."""
        ...


@dataclass(frozen=True, slots=True)
class WorkerCounters:
    """This worker's progress, as its heartbeat reports it for `status`."""

    sent: int
    succeeded: int
    failed: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Look:
    """What one look at the batch's workers found."""

    #: Live workers of the batch, this one included.
    workers: int
    #: The latest pause published by another live worker (Unix time), if any.
    paused_until: float | None
    #: Workers on this machine found dead and marked stopped by this look.
    reaped: int
    #: The batch has been cancelled.
    cancelled: bool = False


def heartbeat_interval_s(lease_s: float, lease_renew_s: float) -> float:
    """How often leases are extended: at most `lease_renew_s`, and often enough for the lease."""
    return min(lease_renew_s, lease_s / HEARTBEATS_PER_LEASE)


class Coordinator:
    """Keeps one worker's row, its share of the batch's limits and the shared pauses.

    `join()` once after the worker registered and before its first request; then `run()` as a
    task until the worker stops. `look()`, `publish_pause()` and `beat()` are the steps `run()`
    repeats, callable on their own.
    """

    def __init__(
        self,
        store: JobStore,
        batch_id: str,
        worker_id: str,
        pacer: Pacer,
        *,
        rpm: float | None,
        tpm: float | None,
        lease_s: float,
        heartbeat_s: float,
        counters: Callable[[], WorkerCounters],
        journal_dir: Path | None = None,
        on_cancelled: Callable[[], None] | None = None,
        on_share: Callable[[int], None] | None = None,
        budget: SharedBudget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.batch_id = batch_id
        self.worker_id = worker_id
        self.pacer = pacer
        self.rpm = rpm
        self.tpm = tpm
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        #: Heartbeats older than this (seconds) no longer make a worker live.
        self.stale_s = STALE_HEARTBEATS * heartbeat_s
        self.host = this_host()
        self._counters = counters
        #: Where the answer journals of the batch's runs on this machine are, if kept.
        self.journal_dir = journal_dir
        #: Called by each look that finds the batch cancelled.
        self._on_cancelled = on_cancelled
        #: Told the live workers of the batch (this one included) when their number changes.
        self._on_share = on_share
        #: Jobs ended from the journals of dead workers found by this coordinator's looks.
        self.recovered = 0
        self._clock = clock
        #: Live workers the limits are divided by now (0: not divided yet).
        self._shared_by = 0
        #: The end of the latest pause published by this worker / followed from another (Unix).
        self._published_until = 0.0
        self._followed_until = 0.0
        #: Until when (Unix) the last successful heartbeat extended this worker's leases;
        #: before the first, when its first claims' own leases (made after this) run out.
        self.leases_until = clock() + lease_s
        #: The latest heartbeat (Unix) that came after the extension before it had run out: a
        #: lease that had run out by then (its claim's own expiry earlier) lapsed, and its job
        #: may be another worker's now, whatever the heartbeats since extended.
        self.lapsed_at = 0.0
        #: When the last successful heartbeat was, and the jobs ended and tokens it reported.
        self._last_beat: tuple[float, int, int] | None = None
        #: The size of the SQLite WAL last written to stderr.
        self._wal_said = 0
        #: The run's --max-cost cap, if any; what this worker last published of it; and each
        #: other worker's spending as first seen, and spent and reserved as last seen. What a
        #: worker that started before this one had spent is in the batch's cost this one
        #: started from; all that a worker started since spends counts.
        self._budget = budget
        self._published_spending: tuple[Decimal, Decimal] | None = None
        self._spending_seen: dict[str, tuple[float, float, float]] = {}
        self._started_at = clock()

    @property
    def workers(self) -> int:
        """Live workers of the batch at the last look, this one included."""
        return max(1, self._shared_by)

    # -- the loop ----------------------------------------------------------------------------

    async def join(self) -> Look | None:
        """The first look: take this worker's share; let workers already sending make room."""
        try:
            seen = await self.look()
        except StoreError as exc:
            # Others may be sending: wait as a joiner would, the next look sets the share.
            log.warning("could not look at the batch's workers: %s", exc.message)
            self.pacer.hold(JOIN_HOLD_S)
            return None
        if seen.workers > 1:
            self.pacer.hold(JOIN_HOLD_S)
        return seen

    async def run(self) -> None:
        """Publish pauses, look and beat on their own schedules until cancelled."""
        next_look = time.monotonic() + COORDINATE_EVERY_S
        next_beat = time.monotonic() + min(FIRST_HEARTBEAT_S, self.heartbeat_s)
        while True:
            await asyncio.sleep(PAUSE_CHECK_S)
            try:
                await self.publish_pause()
            except StoreError as exc:
                log.warning("could not publish a pause: %s", exc.message)
            now = time.monotonic()
            if now >= next_beat:
                try:
                    await self.beat()
                    next_beat = now + self.heartbeat_s
                except StoreError as exc:
                    log.warning("heartbeat failed: %s", exc.message)
                    next_beat = now + min(HEARTBEAT_RETRY_S, self.heartbeat_s)
            if now >= next_look:
                next_look = now + COORDINATE_EVERY_S
                try:
                    await self.publish_spending()
                except StoreError as exc:
                    log.warning("could not publish this run's spending: %s", exc.message)
                try:
                    await self.look()
                except StoreError as exc:
                    log.warning("could not look at the batch's workers: %s", exc.message)

    # -- the steps ---------------------------------------------------------------------------

    async def look(self) -> Look:
        """One read: share the limits by the live workers, follow their pauses, reap the dead,
        and tell the run if the batch has been cancelled."""
        now = self._clock()
        since = now - self.stale_s
        view = await self.store.coordination_view(self.batch_id, since=since, host=self.host)
        if view.cancelled and self._on_cancelled is not None:
            self._on_cancelled()
        others: list[WorkerInfo] = []
        dead: list[str] = []
        for w in view.workers:
            if w.id == self.worker_id:
                continue
            if w.host == self.host and not pid_alive(w.pid):
                dead.append(w.id)
            elif w.heartbeat_at >= since:
                others.append(w)
        self._share(1 + len(others))
        if self._budget is not None:
            self._count_spending(view.workers)
        paused_until = max(
            (w.paused_until for w in others if w.paused_until is not None), default=None
        )
        if paused_until is not None:
            self._follow(paused_until, now)
        if dead:
            # Their answers first: once reaped, the jobs they hold would be claimed and sent
            # again. A dead worker whose journal another process is still recording is
            # reaped at a later look.
            spare = await self._recover(now)
            dead = [w for w in dead if w not in spare]
        if dead:
            released = await self.store.reap_workers(self.batch_id, dead, now)
            log.info(
                "%d worker(s) of this machine are gone; %d of their job(s) are claimable again",
                len(dead),
                released,
            )
        return Look(
            workers=1 + len(others),
            paused_until=paused_until,
            reaped=len(dead),
            cancelled=view.cancelled,
        )

    async def publish_pause(self) -> float | None:
        """Write this worker's own pause to its row if it is new; returns what was written."""
        until = self._own_pause_until(self._clock())
        if until is None or until <= self._published_until + PAUSE_EPSILON_S:
            return None
        await self.store.publish_pause(self.worker_id, until)
        self._published_until = until
        return until

    async def publish_spending(self) -> None:
        """Write what this worker spent of its --max-cost cap, and holds reserved, if that
        changed since the last time."""
        if self._budget is None:
            return
        spending = self._budget.own_spending()
        if spending == self._published_spending:
            return
        await self.store.publish_spending(self.worker_id, float(spending[0]), float(spending[1]))
        self._published_spending = spending

    def _count_spending(self, workers: list[WorkerInfo]) -> None:
        assert self._budget is not None
        seen = self._spending_seen
        live = set()
        for w in workers:
            if w.id == self.worker_id:
                continue
            live.add(w.id)
            spent, reserved = w.spent_usd or 0.0, w.reserved_usd or 0.0
            if w.id in seen:
                first = seen[w.id][0]
            else:
                first = spent if w.started_at <= self._started_at else 0.0
            seen[w.id] = (first, spent, reserved)
        # Workers no longer live count with what they last reported spending; what they held
        # reserved was settled or abandoned as they stopped.
        spent_since = sum(max(0.0, spent - first) for first, spent, _ in seen.values())
        reserved = sum(seen[w][2] for w in live)
        self._budget.others_spent(Decimal(repr(spent_since)), Decimal(repr(reserved)))

    async def beat(self) -> None:
        """Extend the leases of every job this worker holds and report its progress, and
        its pace since the heartbeat before."""
        now = self._clock()
        c = self._counters()
        ended = c.succeeded + c.failed
        recent_rps = recent_tps = None
        if self._last_beat is not None and now > self._last_beat[0]:
            at, ended_then, tokens_then = self._last_beat
            recent_rps = (ended - ended_then) / (now - at)
            recent_tps = (c.tokens - tokens_then) / (now - at)
        await self.store.heartbeat(
            self.worker_id,
            self.batch_id,
            now,
            self.lease_s,
            sent=c.sent,
            succeeded=c.succeeded,
            failed=c.failed,
            tokens=c.tokens,
            # What publish_pause last wrote: the heartbeat must not undo it.
            paused_until=self._published_until if self._published_until > now else None,
            recent_requests_per_s=recent_rps,
            recent_tokens_per_s=recent_tps,
        )
        if self.leases_until < now:
            # (A machine asleep, a process stopped, a database out of reach past the lease;
            # also before the first heartbeat, which extended the first claims' leases as if
            # they had never run out.)
            self.lapsed_at = now
        self.leases_until = now + self.lease_s
        self._last_beat = (now, ended, c.tokens)
        self._check_wal()

    def _check_wal(self) -> None:
        size = self.store.wal_bytes()
        if size is None or size < max(WAL_WARN_BYTES, 2 * self._wal_said):
            if size is not None and size < WAL_WARN_BYTES:
                self._wal_said = 0  # written back: say it again if it grows again
            return
        self._wal_said = size
        target = self.store.sqlite_target
        log.warning(
            "the database's write-ahead log (%s-wal) is %.1f GB and SQLite has not written it"
            " back: most likely another connection keeps a read open on the database (a"
            " transaction or a query not read to its end), and the log grows with every"
            " answer until it is closed (export and status read without holding one)",
            "" if target is None else target.filename,
            size / 1e9,
        )

    # -- helpers -----------------------------------------------------------------------------

    async def _recover(self, now: float) -> set[str]:
        """Record what the journals of the batch's dead runs on this machine kept; returns
        the workers whose segments are still there (live, or being recorded by another
        process)."""
        if self.journal_dir is None:
            return set()
        try:
            recovered = await journal.recover(self.store, self.batch_id, self.journal_dir, now)
            spare = journal.workers_with_segments(self.journal_dir, self.batch_id)
        except OSError as exc:
            # Their jobs are reaped all the same: sent again, as without a journal.
            log.warning("could not read the answer journal of a dead worker: %s", exc)
            return set()
        if recovered:
            self.recovered += recovered
            log.info("%d answer(s) kept by dead worker(s) of this machine recorded", recovered)
        return spare

    def _share(self, workers: int) -> None:
        if workers == self._shared_by:
            return
        self._shared_by = workers
        if self._on_share is not None:
            self._on_share(workers)
        if self.rpm is None and self.tpm is None:
            return
        self.pacer.set_limits(
            None if self.rpm is None else self.rpm / workers,
            None if self.tpm is None else self.tpm / workers,
        )

    def _follow(self, until: float, now: float) -> None:
        if until <= self._followed_until + PAUSE_EPSILON_S:
            return  # followed already
        left_s = min(until - now, MAX_FOLLOWED_PAUSE_S)
        if left_s <= PAUSE_EPSILON_S:
            return
        # The published end, not the capped one: a far-off end is followed once, not again
        # at every look.
        self._followed_until = until
        self.pacer.hold(left_s)

    def _own_pause_until(self, now: float) -> float | None:
        """The end of the pause the server set on this worker, if any (not one it follows)."""
        left_s = self.pacer.snapshot().pause_left_s
        if left_s <= 0:
            return None
        until = now + left_s
        if until <= self._followed_until + PAUSE_EPSILON_S:
            return None  # the pause this worker follows, not its own
        return until
