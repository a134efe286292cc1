"""Claim -> pace -> send -> record, with leases, batched writes and a graceful stop.

One run is a handful of tasks around an in-memory queue:

    feeder     claims pending jobs from the store in chunks (one transaction per chunk)
    workers    `concurrency` tasks: pace, send, retry (tenacity through retry.py), then hand
               the job's end to the writer and wait for its commit before taking the next
               job, so that no more than `concurrency` requests are ever sent and unrecorded:
               the most a crash can make the next run send again
    writer     records ended jobs and the attempts log in batched transactions, each row
               fenced by the lease token it was claimed with; every end is first appended to
               the run's answer journal (journal.py), which the next run records from should
               this one die before the commit
    coordinator  (coordination.py) extends the leases of the jobs this worker holds, shares
               the batch's rate limits and the server's pauses with the other live workers

A stop (Ctrl-C, a bad key, an empty balance, the budget) stops the feeder, lets requests already
sent finish within a grace period, records what ended and gives every other job back as pending.
A cancel of the batch (`batchrunner cancel`, seen by the coordinator within a second) stops the
run at once: the answers still to come could not be recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import orjson

from batchrunner import journal
from batchrunner.client import ApiClient
from batchrunner.config import RunConfig
from batchrunner.coordination import Coordinator, WorkerCounters, heartbeat_interval_s
from batchrunner.errors import AuthError, BudgetExceeded, QuotaError, RunAborted, StoreError
from batchrunner.limiter import Pacer
from batchrunner.outcome import Outcome, OutcomeKind
from batchrunner.pricing import PriceBook, dollars, usage_from_completion
from batchrunner.retry import RetryPolicy, call_with_retries, is_rate_limit
from batchrunner.schema import SchemaCheck
from batchrunner.states import JobState
from batchrunner.store import AttemptRecord, BatchInfo, ClaimedJob, Ended, JobStore, Spent
from batchrunner.tokens import CHARS_PER_TOKEN, estimate_request, max_output_tokens

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Largest number of jobs claimed in one transaction.
MAX_CLAIM_ROWS = 1_000
#: Jobs claimed at a time per unit of concurrency, at most (and MAX_CLAIM_ROWS)...
CLAIM_ROWS_PER_SLOT = 16
#: ...and at least (and MIN_CLAIM_ROWS), before the pace is known and when it is slow.
MIN_CLAIM_ROWS_PER_SLOT = 2
MIN_CLAIM_ROWS = 16
#: A claim's request bodies hold about this many characters at most (one job at least): with
#: large bodies (images as base64) a claim of hundreds of jobs, and the queue of a claim or two
#: behind the workers, held gigabytes. Until a claim has shown how large the bodies are, a
#: claim takes MIN_CLAIM_ROWS at most.
CLAIM_BODY_CHARS = 16 << 20
#: In between, a claim is this many seconds of work at the run's pace: enough that the next
#: claim lands before the queue runs dry, little enough that workers joining the batch on
#: other machines find jobs left to take.
CLAIM_AHEAD_S = 0.5
#: At a paced rate (--rpm), a claim holds at most this many seconds of sending at it.
PACED_CLAIM_S = 2.0
#: How often a run with nothing to claim looks again (jobs held by other workers, backoffs).
IDLE_POLL_S = 1.0
#: A claim goes on from the job after the last one claimed; this often (or a quarter of the
#: lease, when that is shorter) it first gives expired leases back and claims from the
#: batch's first line, which finds the jobs given back behind it (by a worker that stopped or
#: died, by `retry`). Both at every claim cost PostgreSQL a walk past one dead index entry per
#: job claimed before (store.claim).
LOOK_BACK_S = 5.0
#: A job is not sent when its lease has less than this left (or a quarter of the lease, when
#: that is shorter): the answer could come too late to be recorded.
LEASE_MARGIN_S = 1.0
#: Attempts at writing one batch of ended jobs before the run gives up.
WRITE_ATTEMPTS = 5
WRITE_RETRY_S = 1.0
#: The cyclic GC's youngest-generation threshold while dispatching (CPython's default is 700).
#: Every request allocates a few hundred short-lived containers (aiohttp's, the parsed answer),
#: nearly all freed by reference counting; at 700 the collector ran every few requests and
#: cost ~5 % of a run's CPU at a zero-latency server.
GC_GEN0_THRESHOLD_OBJECTS = 10_000


class StopReason(enum.Enum):
    #: Every job of the batch has ended.
    DONE = "done"
    #: Ctrl-C / SIGTERM.
    INTERRUPTED = "interrupted"
    #: `batchrunner cancel` ended the batch while the run went on.
    CANCELLED = "cancelled"
    AUTH = "auth"
    QUOTA = "quota"
    BUDGET = "budget"
    DATABASE = "database"
    #: A bug: the run stops rather than leave a job unfinished forever.
    ERROR = "error"


@dataclass
class RunStats:
    """Live counters of this worker, for the progress display and `status`."""

    started_s: float = field(default_factory=time.monotonic)
    #: Jobs of the batch that had ended when the run started, and then, as the progress
    #: display reads the batch's counts again, those ended meanwhile by other runs sharing
    #: it (less those `retry` put back).
    ended_before: int = 0
    #: Ends this run's writer has recorded (committed).
    recorded: int = 0
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    in_flight: int = 0
    retrying: int = 0
    sent: int = 0
    tokens: int = 0
    fenced: int = 0
    #: Jobs not sent because their lease ran out first (this worker had stalled).
    lost_leases: int = 0
    #: Ended jobs the writer has not yet committed.
    unwritten: int = 0
    #: Live runs of the batch at the coordinator's last look, this one included.
    runs: int = 1
    #: At the run's end: ends the database did not take (it stopped taking writes) that the
    #: answer journal keeps for the next run, and those it could not keep (sent again).
    kept_in_journal: int = 0
    not_kept: int = 0
    #: Jobs ended by answers that another run of this machine received and had not yet
    #: written (it died, or its database stopped taking writes), recorded from its journal
    #: before this run began, or when this run found it dead.
    recovered: int = 0

    @property
    def ended(self) -> int:
        return self.succeeded + self.failed

    def rate_per_s(self, now_s: float) -> float:
        elapsed = now_s - self.started_s
        return self.ended / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True, slots=True)
class RunResult:
    reason: StopReason
    message: str | None
    stats: RunStats
    #: Jobs of the batch not ended when the run stopped.
    unfinished: int
    failed_in_batch: int
    #: Jobs of the batch cancelled (`batchrunner cancel`, perhaps while this run went on).
    cancelled_in_batch: int


_CANCELLED = Outcome(OutcomeKind.RETRY, None, error_kind="cancelled")
#: Error kinds of attempts that stopped their run (a refused key, an empty balance).
_STOPPED_THE_RUN = frozenset({"auth", "quota", "proxy", "redirect"})
#: Error kinds of complete answers that were paid for and are tried again: a json_schema not
#: met (--retry-invalid-json), a 2xx answer that is not JSON (what it cost is unknown), and a
#: choice that ended in an error (what the model wrote before it failed).
_PAID_FOR = frozenset({"invalid_json", "bad_json", "choice_error"})
#: ...and those counted where the answer reported its usage: a stream cut after it came, a
#: 2xx that is no completion, a prompt the provider blocked (which fails its job).
_PAID_IF_USAGE = frozenset({"stream_broken", "not_completion", "no_choice"})


async def _set_within(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether `event` is set within `timeout_s` seconds. Not asyncio.wait_for: on Python
    3.11 it drops a cancel that comes once the event is set and before the waiter resumes,
    and a worker retrying a job (waiting out its backoff, or the stop) then went on after the
    run's end had cancelled it: the run waited for it for ever, heartbeating, its jobs held,
    a second Ctrl-C ignored (about 2 stops in 100 under a soak)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()


async def _cancelled(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait for them to end, cancelling again those that did not: a cancel
    dropped on the way (see `_set_within`) must not hold the run's end for ever."""
    for task in tasks:
        task.cancel()
    pending = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in pending:
            log.warning("task %s went on after it was cancelled: cancelled again", task.get_name())
            task.cancel()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # (retrieved, as gather(return_exceptions=True) would)


class _Abandon(Exception):
    """A job given back because the run is stopping."""


class _LeaseLost(Exception):
    """A job whose lease ran out before it was sent: it is no longer this worker's."""


class _JobQueue:
    """Claimed jobs waiting for a worker, first claimed first sent.

    asyncio.Queue's put, get and task_done cost a job ten calls of Python; here a worker
    takes a waiting job with one, and waits only when there is none.
    """

    def __init__(self) -> None:
        self._jobs: deque[ClaimedJob] = deque()
        #: Workers waiting for a job, each woken by one job put.
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Jobs put and not yet done (taken and handled).
        self._unfinished = 0
        self._all_done = asyncio.Event()
        self._all_done.set()

    def qsize(self) -> int:
        return len(self._jobs)

    def put(self, jobs: Collection[ClaimedJob]) -> None:
        if not jobs:
            return
        self._jobs.extend(jobs)
        self._unfinished += len(jobs)
        self._all_done.clear()
        self._wake(len(jobs))

    def _wake(self, workers: int) -> None:
        waiters = self._waiters
        while workers and waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # (done: its worker was cancelled)
                waiter.set_result(None)
                workers -= 1

    def take(self) -> ClaimedJob | None:
        """The next job, or None: `wait` for one, then take again (another worker may have
        taken it first)."""
        return self._jobs.popleft() if self._jobs else None

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and self._jobs:
                self._wake(1)  # woken for a job it will not take: another worker takes it
            raise

    def task_done(self) -> None:
        """A job taken has been handled."""
        self._unfinished -= 1
        if self._unfinished <= 0:
            self._unfinished = 0
            self._all_done.set()

    async def join(self) -> None:
        """Until every job put has been taken and handled."""
        await self._all_done.wait()


#: Runs dispatching in this process, and the GC threshold from before the first of them.
_gc_depth = 0
_gc_threshold_before: tuple[int, int, int] = gc.get_threshold()


@contextlib.contextmanager
def _gc_for_dispatch() -> Iterator[None]:
    """Fewer, cheaper cyclic collections while dispatching.

    What exists before the first request (modules, SQLAlchemy's and aiohttp's tables) lives as
    long as the process: frozen, the collector stops walking it on every full collection
    (~0.1 s each with SQLAlchemy loaded). Undone at the end, so that a process running several
    batches (the tests, `demo`) is left as it was; overlapping runs undo it when the last ends.
    """
    global _gc_depth, _gc_threshold_before
    if _gc_depth == 0:
        _gc_threshold_before = gc.get_threshold()
        young, *older = _gc_threshold_before
        gc.freeze()
        gc.set_threshold(max(young, GC_GEN0_THRESHOLD_OBJECTS), *older)
    _gc_depth += 1
    try:
        yield
    finally:
        _gc_depth -= 1
        if _gc_depth == 0:
            gc.set_threshold(*_gc_threshold_before)
            gc.unfreeze()


def _unreported_tokens(job: ClaimedJob, outcome: Outcome) -> float:
    """Tokens a success used beyond the pacer's estimate that its usage does not report: its
    answer's, by characters / 4, when it reports no usage and its request set no output cap
    (the estimate is the prompt alone then; with a cap, the cap times n stands in)."""
    completion = outcome.completion
    if completion is None or type(completion.get("usage")) is dict:
        return 0.0
    if max_output_tokens(orjson.loads(job.body)) is not None:
        return 0.0  # the output cap was charged
    return len(outcome.body or "") / CHARS_PER_TOKEN


def worst_case_cost(
    body: str | bytes, prices: PriceBook, *, within_s: float = 0.0, now: datetime | None = None
) -> Decimal:
    """The most the request with this body can cost if it finishes within `within_s` of `now`
    (default: the present): a request is priced when it finishes, and DeepSeek's price
    quadruples at 00:30 UTC (reserved off-peak, settled at peak, a run passed its cap 3.5
    times over). BudgetExceeded when no price is known for its model."""
    est = estimate_request(orjson.loads(body))
    model, prompt, output = est.model, est.prompt_tokens, est.worst_case_output_tokens
    shape = prices.shape(model)
    if shape is None:
        raise BudgetExceeded(
            f"no price is known for model {model!r}, so --max-cost cannot be kept;"
            " add it to a price file (--prices)"
        )
    if not shape.varies_in_time or within_s <= 0:
        cost = prices.worst_case_cost(model, prompt, output, at=now)
    else:
        start = now or datetime.now(tz=UTC)
        ends = (start, start + timedelta(seconds=within_s))
        cost = max(
            prices.worst_case_cost(model, prompt, output, at=at) or Decimal(0) for at in ends
        )
    assert cost is not None  # (the model has a price: `shape`)
    return cost


class Budget:
    """A cost cap that reserves each request's worst case before it is sent."""

    def __init__(
        self, cap_usd: Decimal, spent_usd: Decimal, prices: PriceBook, within_s: float = 0.0
    ) -> None:
        """`within_s`: how long after it is sent a request may finish (its timeout)."""
        self.cap_usd = cap_usd
        self._within_s = within_s
        #: An answer cost more than its reservation, and the run said so.
        self._said_over = False
        #: The batch's cost when the run started, and then what this run's answers added.
        self.committed_usd = spent_usd
        self._started_from = spent_usd
        self.reserved_usd = Decimal(0)
        #: What the batch's other workers spent since this run started, and hold reserved for
        #: requests in flight, as they last reported it (the coordinator's looks).
        self.others_spent_usd = Decimal(0)
        self.others_reserved_usd = Decimal(0)
        self._prices = prices
        #: Set whenever a reservation settles (or the run stops): waiters look again.
        self._changed = asyncio.Event()
        self._closed = False

    def start_from(self, spent_usd: Decimal) -> None:
        """What the batch has cost when the run starts, known once what dead runs kept in
        their journals is recorded (before anything is reserved)."""
        self.committed_usd = self._started_from = spent_usd

    def worst_case(self, job: ClaimedJob) -> Decimal:
        return worst_case_cost(job.body, self._prices, within_s=self._within_s)

    async def reserve(self, amount: Decimal) -> bool:
        """Reserve `amount` of the cap; False when it cannot fit.

        While other requests hold reservations, a request that does not fit waits for them
        to settle at their actual cost, which is mostly far below the worst case reserved:
        giving up at once would stop a concurrent run long before its cap is used. Only when
        nothing is left to settle (or the run stops) does it give up.
        """
        while self.spent_usd + self.reserved_usd + self.others_reserved_usd + amount > self.cap_usd:
            # (The others' reservations settle too, at their looks: waited for as ours are.)
            if not (self.reserved_usd or self.others_reserved_usd) or self._closed:
                return False
            self._changed.clear()
            await self._changed.wait()
        self.reserved_usd += amount
        return True

    def settle(self, reserved: Decimal, actual: Decimal | None) -> None:
        if actual is not None and actual > reserved > 0 and not self._said_over:
            # (A server that ignores max_tokens, a prompt the count undercounted.) Said once:
            # the cap holds only as far as answers keep within what their requests allow.
            self._said_over = True
            log.warning(
                "an answer cost %s where its request could cost at most %s by its body and"
                " the token count: --max-cost may be passed",
                dollars(actual),
                dollars(reserved),
            )
        self.reserved_usd -= reserved
        # An unknown actual cost keeps the whole reservation: the cap must hold.
        self.committed_usd += reserved if actual is None else actual
        self._changed.set()

    @property
    def spent_usd(self) -> Decimal:
        """The batch's cost as this run knows it: at its start, its own answers since, and
        what the other workers reported."""
        return self.committed_usd + self.others_spent_usd

    def own_spending(self) -> tuple[Decimal, Decimal]:
        """What this run's answers cost, and what it holds reserved (for the others)."""
        return self.committed_usd - self._started_from, self.reserved_usd

    def others_spent(self, spent_usd: Decimal, reserved_usd: Decimal) -> None:
        """The other workers' spending since this run started, and their reservations, as
        they last reported them."""
        if (spent_usd, reserved_usd) != (self.others_spent_usd, self.others_reserved_usd):
            self.others_spent_usd, self.others_reserved_usd = spent_usd, reserved_usd
            self._changed.set()

    def others_reserved_note(self) -> str:
        reserved = self.others_reserved_usd
        return f", {dollars(reserved)} reserved by other workers' requests" if reserved else ""

    def close(self) -> None:
        """No more reservations: the run is stopping. Waiters give up."""
        self._closed = True
        self._changed.set()


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        batch: BatchInfo,
        config: RunConfig,
        *,
        api_key: str | None,
        base_url: str,
        prices: PriceBook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.batch = batch
        self.config = config
        self.api_key = api_key
        self.base_url = base_url
        self.worker_id = f"w-{uuid.uuid4().hex[:12]}"
        self.stats = RunStats()
        self.policy = RetryPolicy(
            max_attempts=config.max_attempts,
            base_delay_s=config.retry_base_s,
            max_delay_s=config.retry_max_s,
            jitter_s=config.retry_jitter_s,
        )
        self.pacer = Pacer(config.rpm, config.tpm)
        self.prices = prices or PriceBook.load(config.prices_path)
        self.budget = (
            # (What the batch has cost is known once dead runs' journals are recorded: the
            # runner gives it, `Budget.start_from`.)
            Budget(Decimal(str(config.max_cost_usd)), Decimal(0), self.prices, config.timeout_s)
            if config.max_cost_usd is not None
            else None
        )
        self._rng = rng or random.Random()
        self._queue = _JobQueue()
        # Claims and records take turns at SQLite's write lock, ~50 ms each at a zero-latency
        # server (every hop to the database thread waits for a turn of the busy event loop):
        # a claim must cover the workers for that long and more, or they stand idle.
        self._ended: list[Ended] = []
        self._attempts: list[AttemptRecord] = []
        self._stopping = asyncio.Event()
        #: `_stopping` is set: read on every request, where the event costs a call.
        self._stopped = False
        self._feeder_done = asyncio.Event()
        self._wake_writer = asyncio.Event()
        #: Resolved when the writer has committed the ends gathered so far (or given up).
        self._next_commit: asyncio.Future[None] | None = None
        self._reason: StopReason | None = None
        self._message: str | None = None
        self._schema = SchemaCheck()
        self._token_seq = 0
        #: The highest job id claimed so far; the next claim goes on after it.
        self._claimed_up_to = 0
        #: Characters in a request body, on average over the last claim (None: none yet).
        self._body_chars: float | None = None
        #: Jobs whose workers wait their turn at the pacer.
        self._waiting_turn = 0
        #: When the next claim looks back: expired leases, and from the first line (monotonic).
        self._look_back_at = 0.0
        #: Lease expiry (Unix) of each claim, as claimed; heartbeats extend them all. With the
        #: number of its jobs no worker has finished with yet: at 0 it goes (one entry a
        #: claim for the whole run grew without end at claims of a job or two).
        self._claims: dict[str, float] = {}
        self._claimed_left: dict[str, int] = {}
        self._forced = False
        #: Set by a second Ctrl-C: nothing more is waited for, the database included.
        self._forced_now = asyncio.Event()
        #: Every ended job goes here first, until its transaction commits (journal.py).
        self._journal: journal.Journal | None = None
        #: Where this machine's journals of the batch are (None: kept nowhere).
        self._journal_dir: Path | None = None
        #: `recover_journal` has recorded what dead runs kept.
        self._journal_recovered = False
        #: A batch of ends could not be written: the journal keeps everything from then on.
        self._lost_write = False

    # -- control ----------------------------------------------------------------------------

    def stop(self, reason: StopReason = StopReason.INTERRUPTED, message: str | None = None) -> None:
        """Stop claiming; requests already sent may finish within the grace period."""
        if self._reason is None:
            self._reason = reason
            self._message = message
        self._stop_sending()
        if self.budget is not None:
            self.budget.close()

    def force_stop(self) -> None:
        """Stop without waiting for requests in flight; they are sent again by the next run.
        Nor for the database: a lock held elsewhere or a network partition held a run after
        its second Ctrl-C for as long as it lasted. Answers not written stay in the journal,
        and the leases lapse (this machine's next run reaps them at once). (SQLite's write
        waiting for another process's lock cannot be cut short: closing the database waits
        for it, up to its busy timeout.)"""
        self._forced = True
        self._forced_now.set()
        self.stop()

    async def _unless_forced(self, aw: Awaitable[T]) -> T | None:
        """`aw`'s result, or None when a forced stop comes first (or came before): it is
        cancelled and not waited for."""
        task = asyncio.ensure_future(aw)
        if not self._forced_now.is_set():
            forced = asyncio.ensure_future(self._forced_now.wait())
            try:
                await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                forced.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return None

    def _on_cancelled(self) -> None:
        """The batch was cancelled: nothing more is sent. The answers of requests sent are
        waited for, as after a stop: their jobs are cancelled and they cannot be recorded,
        but they are paid for, and so counted (abandoned, they were billed and counted
        nowhere)."""
        self.stop(StopReason.CANCELLED, "the batch was cancelled while this run went on")

    @property
    def stopping(self) -> bool:
        return self._stopped

    def _stop_sending(self) -> None:
        self._stopped = True
        self._stopping.set()

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> RunResult:
        await self._open_journal()
        try:
            return await self._run()
        finally:
            if self._journal is not None:
                self._journal.close(committed=not self._ended and not self._lost_write)

    async def recover_journal(self) -> None:
        """Record what dead runs of the batch on this machine kept in their journals: their
        answers, received and paid for. Once; `run` does it first if it has not been done."""
        if self._journal_recovered:
            return
        directory = self._journal_dir = journal.directory_for(self.store)
        if directory is not None:
            self.stats.recovered += await journal.recover(
                self.store, self.batch.id, directory, time.time()
            )
        self._journal_recovered = True

    async def _open_journal(self) -> None:
        """Record what dead runs of the batch kept in their journals (before registering,
        which releases their jobs), then start this run's."""
        await self.recover_journal()
        directory = self._journal_dir
        if directory is None:
            return
        try:
            self._journal = journal.Journal(directory, self.batch.id, self.worker_id)
        except OSError as exc:
            log.warning("running without an answer journal: %s", exc)

    async def _run(self) -> RunResult:
        at_start = await self.store.counts(self.batch.id)
        self.stats.total = at_start.total
        self.stats.ended_before = at_start.total - at_start.unfinished
        now = time.time()
        # Dead runs whose journal another process is recording keep their jobs meanwhile.
        spare = journal.workers_with_segments(self._journal_dir, self.batch.id)
        await self.store.register_worker(self.worker_id, self.batch.id, now, spare=spare)
        self._coordinator = Coordinator(
            self.store,
            self.batch.id,
            self.worker_id,
            self.pacer,
            rpm=self.config.rpm,
            tpm=self.config.tpm,
            lease_s=self.config.lease_s,
            heartbeat_s=heartbeat_interval_s(self.config.lease_s, self.config.lease_renew_s),
            counters=self._counters,
            journal_dir=self._journal_dir,
            on_cancelled=self._on_cancelled,
            on_share=self._on_share,
            budget=self.budget,
        )
        # This worker's share of the batch's limits, before its first request.
        await self._coordinator.join()
        try:
            async with ApiClient(
                self.base_url,
                self.api_key,
                concurrency=self.config.concurrency,
                timeout_s=self.config.timeout_s,
            ) as client:
                with _gc_for_dispatch():
                    await self._run_with(client)
        finally:
            self.stats.recovered += self._coordinator.recovered
            try:
                await self._unless_forced(self.store.stop_worker(self.worker_id, time.time()))
            except StoreError as exc:
                log.warning("could not mark worker %s stopped: %s", self.worker_id, exc)
        counts = await self._unless_forced(self.store.counts(self.batch.id))
        st = self.stats
        if counts is None:
            # Forced: the counts at the start and what this run ended (not other workers').
            counts = at_start
            unfinished = max(0, at_start.unfinished - st.succeeded - st.failed)
            failed = at_start.counts[JobState.FAILED.value] + st.failed
        else:
            unfinished, failed = counts.unfinished, counts.counts[JobState.FAILED.value]
        if (unwritten := st.ended - st.recorded) > 0:
            if self._journal is not None and not self._journal.failed:
                st.kept_in_journal = unwritten
            else:
                st.not_kept = unwritten
        return RunResult(
            reason=self._reason or StopReason.DONE,
            message=self._message,
            stats=st,
            unfinished=unfinished,
            failed_in_batch=failed,
            cancelled_in_batch=counts.counts[JobState.CANCELLED.value],
        )

    async def _run_with(self, client: ApiClient) -> None:
        writer = asyncio.create_task(self._writer(), name="writer")
        coordinator = asyncio.create_task(self._coordinator.run(), name="coordinator")
        # Neither ends before the run does, unless broken: without heartbeats the leases lapse
        # and other workers take the jobs back, so the run stops rather than go on without.
        writer.add_done_callback(self._stop_if_broken)
        coordinator.add_done_callback(self._stop_if_broken)
        feeder = asyncio.create_task(self._feeder(), name="feeder")
        workers = [
            asyncio.create_task(self._worker(client), name=f"worker-{i}")
            for i in range(self.config.concurrency)
        ]
        try:
            await self._wait_until_done(feeder, workers)
        finally:
            self._stop_sending()
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            # Workers idle on the queue or still sending past the grace period.
            await _cancelled(workers)
            await _cancelled([coordinator])
            self._feeder_done.set()
            self._wake_writer.set()
            # A writer that broke has stopped the run already (_stop_if_broken), and the
            # journal keeps what it had not written (also what a forced stop cuts short).
            with contextlib.suppress(Exception):
                await self._unless_forced(writer)
            if not writer.done():
                # Cancelled mid-write by a forced stop: what it held stays in the journal.
                self._lost_write = True
            await self._unless_forced(self._give_back())

    def _stop_if_broken(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("the %s broke", task.get_name(), exc_info=exc)
        self.stop(StopReason.ERROR, f"internal error in the {task.get_name()}: {exc!r}")

    async def _wait_until_done(self, feeder: asyncio.Task[None], workers: list[Any]) -> None:
        stop_wait = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({feeder, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if feeder in done and feeder.exception() is not None:
                raise feeder.exception()  # type: ignore[misc]
            if self.stopping:
                # Grace: requests already sent may finish and be recorded.
                deadline = time.monotonic() + self.config.grace_s
                if self.stats.in_flight and self._reason is not StopReason.INTERRUPTED:
                    # (A signal's stop says so where it is taken.) A refused key with slow
                    # requests in flight left the run silent for the whole grace period.
                    log.warning(
                        "stopping: waiting up to %gs for %d request(s) in flight",
                        self.config.grace_s,
                        self.stats.in_flight,
                    )
                # Polls a counter that every worker changes; an event per change would cost
                # the hot path more than this loop costs once per run.
                while self.stats.in_flight and time.monotonic() < deadline:
                    if self._forced:
                        break
                    await asyncio.sleep(0.05)
                return
            # The feeder found nothing left to claim: wait for the workers to drain.
            await self._queue.join()
        finally:
            stop_wait.cancel()

    async def _feeder(self) -> None:
        """Keep the queue topped up; end when no job of the batch is left unfinished."""
        failures = 0
        while not self.stopping:
            claim_rows = self._claim_rows()
            # Refill while a whole claim is still queued: the next one lands before the queue
            # runs dry, even when the writer holds the lock for a while. Jobs in workers'
            # hands waiting their turn at the pacer count as queued: at --rpm each of
            # --concurrency workers held one (64 jobs at 5 a second).
            if self._queue.qsize() + self._waiting_turn >= claim_rows:
                await asyncio.sleep(0.005)
                continue
            look_back = time.monotonic() >= self._look_back_at
            if look_back:
                # Runs of this machine that died first: their journals hold the answers to
                # jobs whose leases this claim may give back, and recorded they are not sent
                # again. The coordinator looks every second, but a run thawed (SIGCONT) or a
                # database that comes back after refusing writes met its claim first: peers
                # that had given up on the database had their answers sent again.
                try:
                    await self._coordinator.look()
                except StoreError:
                    pass  # (the claim says what became of the database)
                except Exception:
                    # A bug in there is the coordinator's to report: its own looks fail
                    # alike, and stop the run.
                    log.debug("the look before a claim failed", exc_info=True)
            self._token_seq += 1
            token = f"{self.worker_id}.{self._token_seq}"
            claimed_at = time.time()
            after = 0 if look_back else self._claimed_up_to
            try:
                jobs = await self.store.claim(
                    self.batch.id,
                    self.worker_id,
                    token,
                    claim_rows,
                    claimed_at,
                    self.config.lease_s,
                    after=after,
                    expire_leases=look_back,
                )
            except StoreError as exc:
                # A deadlock victim or a dropped connection: the claim rolled back whole.
                failures += 1
                if failures >= WRITE_ATTEMPTS:
                    raise
                log.warning("claiming jobs failed (%s); trying again", exc.message)
                await asyncio.sleep(WRITE_RETRY_S * failures)
                continue
            failures = 0
            if look_back:
                self._look_back_at = time.monotonic() + min(LOOK_BACK_S, self.config.lease_s / 4)
            if jobs:
                self._claims[token] = claimed_at + self.config.lease_s
                self._claimed_left[token] = len(jobs)
                self._claimed_up_to = jobs[-1].id  # in id order
                self._body_chars = sum([len(job.body) for job in jobs]) / len(jobs)
            self._queue.put(jobs)
            if len(jobs) < claim_rows and not look_back:
                # Nothing more after the last claim: the next one looks back at once.
                self._look_back_at = 0.0
                continue
            if jobs:
                continue
            # Nothing claimable: done once our own work is recorded and no other worker
            # holds an unfinished job (its lease may yet expire and come back to us).
            await self._queue.join()
            await self._flushed()
            if self.stopping:
                return  # (the jobs it dropped are given back at the run's end)
            counts = await self.store.counts(self.batch.id)
            if counts.unfinished == 0:
                return
            # Every job this run took has ended or been dropped: one still leased to it was
            # lost on the way (a claim that committed and whose answer the connection lost, a
            # job dropped when the process had been stopped past its lease). Its heartbeats
            # renew every job leased to it, so that one would wait for ever, and the run with
            # it: it is given back, for the next claim.
            if counts.counts["running"] and (lost := await self._give_back()):
                log.warning("%d job(s) this run had lost track of were given back", lost)
                self._look_back_at = 0.0  # they lie behind the last claim
                continue
            await asyncio.sleep(IDLE_POLL_S)

    def _claim_rows(self) -> int:
        """How many jobs to claim now: CLAIM_AHEAD_S of work at the pace so far, within the
        bounds per unit of concurrency, and within CLAIM_BODY_CHARS. At a paced rate, no more
        than PACED_CLAIM_S of sending at it: jobs claimed ahead are this run's until sent, and
        a run that joins the batch found all of them taken (at --rpm 120, 264 of 300 jobs
        were the first run's, the second sent 28 and then waited, its share of the rate lost)."""
        slots = self.config.concurrency
        low = min(MAX_CLAIM_ROWS, max(MIN_CLAIM_ROWS, MIN_CLAIM_ROWS_PER_SLOT * slots))
        rpm = self.pacer.rpm
        if rpm is not None:
            low = min(low, max(1, math.ceil(rpm / 60.0 * PACED_CLAIM_S)))
        high = min(MAX_CLAIM_ROWS, max(low, CLAIM_ROWS_PER_SLOT * slots))
        paced = int(self.stats.rate_per_s(time.monotonic()) * CLAIM_AHEAD_S)
        rows = max(low, min(high, paced))
        if self._body_chars is None:
            return min(rows, MIN_CLAIM_ROWS)
        return max(1, min(rows, int(CLAIM_BODY_CHARS / max(self._body_chars, 1.0))))

    async def _flushed(self) -> None:
        while self._ended or self._attempts:
            self._wake_writer.set()
            await asyncio.sleep(0.01)

    async def _worker(self, client: ApiClient) -> None:
        queue = self._queue
        while True:
            job = queue.take()
            if job is None:
                if self._stopped:
                    return  # (nothing more is sent: the run's end need not cancel it)
                await queue.wait()
                continue
            try:
                if self._stopped:
                    continue  # still leased to us: _give_back releases it
                await self._process(client, job)
            except Exception as exc:
                log.exception("job %s (line %d) broke the worker", job.custom_id, job.line)
                self.stop(StopReason.ERROR, f"internal error on line {job.line}: {exc!r}")
            finally:
                queue.task_done()
                self._done_with(job.lease_token)

    async def _process(self, client: ApiClient, job: ClaimedJob) -> None:
        body = job.body.encode()
        schema_wanted = SchemaCheck.wanted(job.body)
        check_schema = schema_wanted and self.config.retry_invalid_json
        reserved = Decimal(0)
        #: This job's attempts in this run, journalled with its end.
        tried: list[AttemptRecord] = []

        async def attempt(number: int) -> Outcome:
            nonlocal reserved
            if self._stopped:
                raise _Abandon()
            sent_at = self.pacer.acquire_now(job.est_tokens)
            if sent_at is None:
                self._waiting_turn += 1
                try:
                    sent_at = await self.pacer.acquire(job.est_tokens)
                finally:
                    self._waiting_turn -= 1
                if self._stopped:
                    # The run stopped while this attempt waited its turn: not sent.
                    self.pacer.observe(_CANCELLED, job.est_tokens, sent_at_s=sent_at)
                    raise _Abandon()
            if not self._lease_alive(job):
                # Stalled past the lease (a stopped process, a lost database): another
                # worker may have the job by now; its answer would be fenced anyway.
                self.pacer.observe(_CANCELLED, job.est_tokens, sent_at_s=sent_at)
                self.stats.lost_leases += 1
                raise _LeaseLost()
            if self.budget is not None and not reserved:
                # Reserved once its turn has come, not while it waits for it: a run whose
                # API does not answer held its jobs' worst cases for as long as the outage
                # lasted, and the batch's other runs, counting them, stopped sending.
                try:
                    reserved = self.budget.worst_case(job)
                except BudgetExceeded as exc:
                    self.pacer.observe(_CANCELLED, job.est_tokens, sent_at_s=sent_at)
                    self.stop(StopReason.BUDGET, exc.message)
                    raise _Abandon() from None
                if not await self.budget.reserve(reserved):
                    reserved = Decimal(0)
                    self.pacer.observe(_CANCELLED, job.est_tokens, sent_at_s=sent_at)
                    # (Already stopping for another reason: that reason stays.)
                    self.stop(
                        StopReason.BUDGET,
                        f"the next request could take the cost past --max-cost "
                        f"${self.budget.cap_usd:f} (spent {dollars(self.budget.spent_usd)}"
                        f"{self.budget.others_reserved_note()}); "
                        "run again with a higher cap to go on",
                    )
                    raise _Abandon()
            started = time.time()
            self.stats.in_flight += 1
            self.stats.sent += 1
            try:
                outcome = await client.send(job.endpoint, body, stream=job.stream)
            except asyncio.CancelledError:
                # Abandoned after the grace period: the pacer still hears of it.
                self.pacer.observe(_CANCELLED, job.est_tokens, sent_at_s=sent_at)
                raise
            finally:
                self.stats.in_flight -= 1
            unreported = 0.0
            if self.config.tpm is not None and outcome.kind is OutcomeKind.SUCCESS:
                unreported = _unreported_tokens(job, outcome)
            self.pacer.observe(
                outcome, job.est_tokens, sent_at_s=sent_at, unreported_tokens=unreported
            )
            if check_schema and outcome.kind is OutcomeKind.SUCCESS:
                outcome = self._check_schema(job, outcome)
            spent: Spent | None = None
            if outcome.kind is not OutcomeKind.SUCCESS and (
                (outcome.kind is OutcomeKind.RETRY and outcome.error_kind in _PAID_FOR)
                or (outcome.error_kind in _PAID_IF_USAGE and outcome.completion is not None)
            ):
                spent, cost = self._paid_for(job, outcome)
                if spent is not None:
                    self.stats.tokens += spent[-1]  # (the total)
                if self.budget is not None and reserved:
                    # Settled at what it cost (all of the reservation where that is unknown);
                    # the next attempt reserves its worst case again.
                    self.budget.settle(reserved, cost)
                    reserved = Decimal(0)
            record = AttemptRecord(
                job_id=job.id,
                status_code=outcome.status,
                error_kind=None if outcome.kind is OutcomeKind.SUCCESS else outcome.error_kind,
                latency_ms=outcome.latency_s * 1000.0,
                request_id=outcome.request_id,
                started_at=started,
                spent=spent,
            )
            self._attempts.append(record)
            tried.append(record)
            if outcome.kind is OutcomeKind.STOP_RUN:
                reason = StopReason.QUOTA if outcome.error_kind == "quota" else StopReason.AUTH
                error = QuotaError if reason is StopReason.QUOTA else AuthError
                detail = f" ({outcome.status}: {outcome.message})" if outcome.message else ""
                if outcome.error_kind in ("proxy", "redirect") and outcome.message:
                    self.stop(reason, outcome.message)  # (not the API's refusal of the key)
                else:
                    self.stop(reason, f"{error().message}{detail}")
            elif outcome.kind is OutcomeKind.RETRY:
                self.stats.retrying += 1
            return outcome

        async def sleep(delay_s: float) -> None:
            nonlocal reserved
            if self.budget is not None and reserved:
                # The attempt that failed cost nothing that is known: no reservation is held
                # through the wait (the next attempt reserves again).
                self.budget.settle(reserved, Decimal(0))
                reserved = Decimal(0)
            try:
                stopped = await _set_within(self._stopping, delay_s)
            finally:
                self.stats.retrying -= 1
            if stopped:
                raise _Abandon()

        try:
            # Most requests succeed the first time: the retry machinery (a coroutine more to
            # resume at every turn of the request) only for those that do not.
            outcome = await attempt(1)
            attempts = 1
            if outcome.kind is not OutcomeKind.SUCCESS:
                policy = self.policy
                if job.attempts:
                    policy = await self._policy_after_earlier_runs(job, tried)
                outcome, attempts = await call_with_retries(
                    policy, attempt, sleep=sleep, rng=self._rng, first=outcome
                )
        except (_Abandon, _LeaseLost) as stopped:
            if self.budget is not None and reserved:
                self.budget.settle(reserved, Decimal(0))
            if isinstance(stopped, _LeaseLost):
                # Back to the batch now if it is still ours after all (the release is fenced by
                # its token): heartbeats renew what the worker holds, and it waited, leased to
                # a run that would not send it, for the run's end.
                with contextlib.suppress(StoreError):
                    await self.store.release(self.worker_id, [(job.id, job.lease_token)])
            return  # still leased to us (_give_back releases it), or no longer ours
        if outcome.kind is OutcomeKind.RETRY:
            self.stats.retrying -= 1  # the last attempt was not followed by a sleep
        if outcome.kind is OutcomeKind.STOP_RUN:
            if self.budget is not None and reserved:
                self.budget.settle(reserved, Decimal(0))
            return  # the job itself is fine: pending again for the next run
        committed = self._end(job, outcome, attempts, reserved, tried, schema_wanted)
        try:
            # Not shielded (a shield per request costs two more turns of the event loop): the
            # one cancellation there is, at the end of a run, cancels every worker at once.
            await committed
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if committed.cancelled() and task is not None and not task.cancelling():
                return  # another worker's cancellation cancelled the shared wait
            raise

    async def _policy_after_earlier_runs(
        self, job: ClaimedJob, tried: list[AttemptRecord]
    ) -> RetryPolicy:
        """The retry policy of a job that earlier runs tried already: what they spent counts
        against its caps. Attempts refused for the key or the balance stopped those runs,
        not the job, and count against neither cap; rate-limited ones count against the
        rate-limit cap only. Read from the attempts log, which only such jobs need."""
        policy = self.policy
        try:
            logged = await self.store.attempts_of(job.id)
        except StoreError as exc:
            log.warning("attempts of line %d unread (%s): all count", job.line, exc.message)
            return replace(policy, max_attempts=max(1, policy.max_attempts - job.attempts))
        ours = {a.started_at for a in tried}
        # The job's attempts are the last of its log (`retry` starts them again from 0).
        earlier = [a for a in logged if a.started_at not in ours][-job.attempts :]
        counted = limited = 0
        for a in earlier:
            if a.error_kind in _STOPPED_THE_RUN:
                continue
            if is_rate_limit(a.status_code, a.error_kind):
                limited += 1
            else:
                counted += 1
        return replace(
            policy,
            max_attempts=max(1, policy.max_attempts - counted),
            rate_limit_attempts=max(1, policy.rate_limit_cap - limited),
        )

    def _done_with(self, token: str) -> None:
        """A job of the claim `token` is no worker's any more: its lease is not looked at
        again."""
        left = self._claimed_left.get(token, 0) - 1
        if left > 0:
            self._claimed_left[token] = left
        else:
            self._claimed_left.pop(token, None)
            self._claims.pop(token, None)

    def _lease_alive(self, job: ClaimedJob) -> bool:
        """Whether the job's lease is surely still this worker's: its claim's own expiry, or
        the heartbeats' since, unless it ran out before a late heartbeat (a frozen worker,
        thawed, retried jobs others had taken over and finished meanwhile)."""
        claimed_until = self._claims.get(job.lease_token, 0.0)
        coordinator = self._coordinator
        if claimed_until < coordinator.lapsed_at:
            return False
        until = max(claimed_until, coordinator.leases_until)
        return time.time() < until - min(LEASE_MARGIN_S, self.config.lease_s / 4)

    def _paid_for(self, job: ClaimedJob, outcome: Outcome) -> tuple[Spent | None, Decimal | None]:
        """What an answer that was paid for and not kept used, and cost (None: unknown)."""
        completion = outcome.completion
        usage = None if completion is None else usage_from_completion(completion)
        if completion is None or usage is None:
            return None, None  # (unreadable JSON: what it used is not known)
        model = completion.get("model")
        model = model if isinstance(model, str) and model else job.model
        spent = (
            model,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
            usage.reasoning_tokens,
            usage.total_tokens,
        )
        return spent, self.prices.cost(model, usage)

    def _check_schema(self, job: ClaimedJob, outcome: Outcome) -> Outcome:
        """A success whose content does not match the request's json_schema, as an answer to
        try again (--retry-invalid-json)."""
        verdict = self._schema.verdict(job.body, outcome.completion)
        if verdict is False:
            return replace(
                outcome,
                kind=OutcomeKind.RETRY,
                error_kind="invalid_json",
                message="the content does not match the request's json_schema",
            )
        return outcome

    def _end(
        self,
        job: ClaimedJob,
        outcome: Outcome,
        attempts: int,
        reserved: Decimal,
        tried: list[AttemptRecord],
        schema_wanted: bool,
    ) -> asyncio.Future[None]:
        """Hand a job's end to the writer; returns what resolves once it is committed."""
        if outcome.kind is OutcomeKind.SUCCESS and outcome.completion is not None:
            completion = outcome.completion
            # No usage (a stream without include_usage): unknown, never zero.
            usage = usage_from_completion(completion)
            model = completion.get("model")
            if type(model) is not str or not model:
                model = None  # (an empty name too: the request's model is the one priced)
            if self.budget is not None:
                actual = None if usage is None else self.prices.cost(model or job.model, usage)
                self.budget.settle(reserved, actual)
            self.stats.succeeded += 1
            self.stats.tokens += usage.total_tokens if usage else 0
            end = Ended(
                job_id=job.id,
                lease_token=job.lease_token,
                state=JobState.SUCCEEDED,
                attempts=attempts,
                status_code=outcome.status,
                latency_ms=outcome.latency_s * 1000.0,
                request_id=outcome.request_id,
                response=outcome.body,
                model=model,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                cached_tokens=usage.cached_tokens if usage else None,
                reasoning_tokens=usage.reasoning_tokens if usage else None,
                total_tokens=usage.total_tokens if usage else None,
                schema_valid=self._schema.verdict(job.body, completion) if schema_wanted else None,
            )
        else:
            if self.budget is not None and reserved:
                # A failed request may still have been billed for its prompt; keep it reserved.
                self.budget.settle(reserved, None)
            self.stats.failed += 1
            end = Ended(
                job_id=job.id,
                lease_token=job.lease_token,
                state=JobState.FAILED,
                attempts=attempts,
                status_code=outcome.status,
                latency_ms=outcome.latency_s * 1000.0,
                request_id=outcome.request_id,
                error_kind=outcome.error_kind,
                error=outcome.body or outcome.message,
            )
        ended = self._ended
        ended.append(end)
        if len(ended) == 1:
            # The first end since the writer took the last batch (the event is set already
            # for the others): set before anything else that could fail.
            self._wake_writer.set()
        self.stats.unwritten = len(ended)
        if self._journal is not None:
            self._journal.add(end, tried)
        if self._next_commit is None:
            self._next_commit = asyncio.get_running_loop().create_future()
        return self._next_commit

    # -- writing ----------------------------------------------------------------------------

    async def _writer(self) -> None:
        """Group commit: whatever ended while the last transaction was being written goes in
        the next one. Under load the batches grow by themselves; when it is quiet an answer
        is durable within one commit, so a crash loses (and re-sends) next to nothing beyond
        what was in flight."""
        while True:
            # Attempts of jobs still retrying are logged at least this often.
            await _set_within(self._wake_writer, self.config.flush_s)
            self._wake_writer.clear()
            await self._flush()
            if self._feeder_done.is_set() and not self._ended and not self._attempts:
                return

    async def _flush(self) -> None:
        if not self._ended and not self._attempts:
            return
        ended, self._ended = self._ended, []
        attempts, self._attempts = self._attempts, []
        commit, self._next_commit = self._next_commit, None
        journal = self._journal
        mark = journal.mark() if journal is not None else None
        written = False
        try:
            written = await self._record(ended, attempts)
        finally:
            if not written:
                self._lost_write = True
            if journal is not None and mark is not None:
                if self._lost_write:
                    journal.kept(mark)  # its answers wait for the next run
                else:
                    journal.committed(mark)
            # Also when the write failed for good: the run is stopping, nobody may hang.
            if commit is not None and not commit.done():
                commit.set_result(None)

    async def _record(self, ended: list[Ended], attempts: list[AttemptRecord]) -> bool:
        """Write them, trying again a few times; False when the run had to stop instead."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                outcome = await self.store.record(
                    self.batch.id, self.worker_id, ended, attempts, time.time()
                )
            except StoreError as exc:
                if attempt == WRITE_ATTEMPTS:
                    self.stop(
                        StopReason.DATABASE,
                        f"could not record results: {exc.message}; the jobs stay unfinished"
                        " and are sent again by the next run",
                    )
                    return False
                log.warning("recording results failed (%s); trying again", exc.message)
                await asyncio.sleep(WRITE_RETRY_S * attempt)
                continue
            except Exception as exc:
                # A bug, not the database: trying again cannot help. The writer goes on (the
                # workers wait for its commits) and the answers wait in the journal.
                log.exception("recording results broke the writer")
                self.stop(StopReason.ERROR, f"internal error recording results: {exc!r}")
                return False
            self.stats.recorded += outcome.recorded
            fenced = outcome.fenced_ids
            if fenced and attempt > 1:
                fenced = await self._fenced_after_all(fenced, attempts)
                self.stats.recorded += outcome.fenced - len(fenced)  # (written by the try before)
            if fenced:
                self._uncount(ended, fenced)
                await self._keep_paid_for(ended, attempts, fenced)
            self.stats.unwritten = len(self._ended)
            return True
        return False

    async def _keep_paid_for(
        self, ended: list[Ended], attempts: list[AttemptRecord], fenced: frozenset[int]
    ) -> None:
        """The usage of answers the database refused (late after a cancel, or after another
        worker took the job over) still counts in the batch's tokens and cost: it was paid
        for (`JobStore.keep_paid_for`)."""
        late = [
            (end, [a for a in attempts if a.job_id == end.job_id])
            for end in ended
            if end.job_id in fenced and end.state is JobState.SUCCEEDED
        ]
        if not late:
            return
        try:
            await self.store.keep_paid_for(self.batch.id, late)
        except StoreError as exc:
            log.warning("could not keep the usage of %d late answer(s): %s", len(late), exc)

    async def _fenced_after_all(
        self, fenced: frozenset[int], attempts: list[AttemptRecord]
    ) -> frozenset[int]:
        """Of the ends a record tried again refused, those another worker or a cancel took:
        the others were written by the try before, which committed and whose answer the
        connection lost (its attempts log holds this run's attempts of them)."""
        try:
            ours = await self.store.logged_by(
                self.worker_id, [a for a in attempts if a.job_id in fenced]
            )
        except StoreError as exc:
            log.warning("could not tell which ends were written before (%s)", exc.message)
            return fenced
        return fenced - ours

    def _uncount(self, ended: list[Ended], fenced_ids: frozenset[int]) -> None:
        """Ends the database refused (the job was cancelled, or taken over by another worker)
        were counted as they ended: they are counted as fenced instead (their answers' tokens
        stay counted: they were paid for, see `_keep_paid_for`)."""
        st = self.stats
        for end in ended:
            if end.job_id not in fenced_ids:
                continue
            st.fenced += 1
            if end.state is JobState.SUCCEEDED:
                st.succeeded -= 1
            else:
                st.failed -= 1

    async def _give_back(self) -> int:
        """Every job still leased to this run goes back to pending; how many did (0 when the
        database refused: their leases expire)."""
        try:
            return await self.store.release_all(self.worker_id, self.batch.id)
        except StoreError as exc:
            log.warning("could not give back unfinished jobs: %s; their leases expire", exc)
            return 0

    # -- coordination -----------------------------------------------------------------------

    def _on_share(self, workers: int) -> None:
        self.stats.runs = workers

    def _counters(self) -> WorkerCounters:
        st = self.stats
        return WorkerCounters(
            sent=st.sent, succeeded=st.succeeded, failed=st.failed, tokens=st.tokens
        )


def exit_reason_error(result: RunResult) -> RunAborted | None:
    """The error a stopped run reports, or None when it was not aborted."""
    if result.reason in (StopReason.DONE, StopReason.INTERRUPTED, StopReason.CANCELLED):
        return None
    kinds: dict[StopReason, type[RunAborted]] = {
        StopReason.AUTH: AuthError,
        StopReason.QUOTA: QuotaError,
        StopReason.BUDGET: BudgetExceeded,
    }
    return kinds.get(result.reason, RunAborted)(result.message)


Sleep = Callable[[float], Awaitable[None]]
