"""The pacer, driven in virtual time: a fake clock whose sleep moves it forward, so every pacing
decision is exact and a run of many virtual minutes takes milliseconds."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import selectors
from typing import Any

import pytest

from batchrunner import progress
from batchrunner.limiter import (
    BURST_S,
    DECREASE_FLOOR_FRACTION,
    DECREASE_MARGIN,
    DEFAULT_BACKOFF_S,
    OUTAGE_AFTER,
    OUTAGE_BACKOFF_MAX_S,
    OUTAGE_BACKOFF_S,
    OUTAGE_SILENCE_S,
    PROBE_INTERVAL_S,
    PROBE_STEP,
    SPORADIC_REFUSALS,
    Pacer,
    PacerStats,
)
from batchrunner.outcome import Outcome, OutcomeKind, RateLimitInfo

START_S = 1000.0


class VirtualTime:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = START_S
        self.sleeps: list[float] = []
        self.sleeping = 0
        self.most_sleeping = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.sleeping += 1
        self.most_sleeping = max(self.most_sleeping, self.sleeping)
        self.now += max(seconds, 0.0)
        try:
            await asyncio.sleep(0)
        finally:
            self.sleeping -= 1

    def elapsed_s(self) -> float:
        return self.now - START_S


def pacer(vt: VirtualTime, rpm: float | None, tpm: float | None = None) -> Pacer:
    return Pacer(rpm, tpm, clock=vt.clock, sleep=vt.sleep)


def success(total_tokens: int | None = None, ratelimit: RateLimitInfo | None = None) -> Outcome:
    completion: dict[str, object] = {"object": "chat.completion", "choices": []}
    if total_tokens is not None:
        completion["usage"] = {"total_tokens": total_tokens}
    return Outcome(OutcomeKind.SUCCESS, 200, completion=completion, ratelimit=ratelimit)


def rate_limited(retry_after_s: float | None = None) -> Outcome:
    return Outcome(OutcomeKind.RETRY, 429, error_kind="rate_limit", retry_after_s=retry_after_s)


def no_answer(kind: str = "connection") -> Outcome:
    return Outcome(OutcomeKind.RETRY, None, error_kind=kind, message="ConnectionRefusedError")


def fail_in_a_row(p: Pacer, vt: VirtualTime, count: int, over_s: float) -> None:
    """`count` attempts that get no answer, the first `over_s` before the last."""
    first_s = vt.now
    for k in range(count):
        if k:
            vt.now = first_s + over_s * k / (count - 1)
        p.observe(no_answer(), sent_at_s=p.acquire_now())


async def admission_times(p: Pacer, vt: VirtualTime, tokens: list[float]) -> list[float]:
    """Start one acquiring task per entry at once; when each was let go, in virtual seconds."""
    times: list[float] = []

    async def one(amount: float) -> None:
        await p.acquire(amount)
        times.append(vt.elapsed_s())

    await asyncio.gather(*(one(amount) for amount in tokens))
    return times


@pytest.mark.parametrize(
    ("rpm", "count", "burst"),
    [
        (60, 61, 1),  # one a second: 61 requests take exactly one minute
        (600, 120, 1),  # one every 100 ms
        (6000, 300, 10),  # 100 ms worth may go at once, then one every 10 ms
    ],
)
async def test_requests_are_spread_evenly_with_at_most_a_slice_of_burst(
    rpm: float, count: int, burst: int
) -> None:
    vt = VirtualTime()
    times = await admission_times(pacer(vt, rpm), vt, [0.0] * count)

    interval_s = 60.0 / rpm
    assert times[:burst] == [0.0] * burst
    assert times[burst:] == pytest.approx(
        [(k - burst + 1) * interval_s for k in range(burst, count)]
    )
    # N requests at R per minute take N/R minutes, less the one burst.
    assert vt.elapsed_s() == pytest.approx((count - burst) * interval_s)
    assert burst == max(1, round(rpm / 60.0 * BURST_S))


async def test_thousands_of_waiters_leave_one_task_sleeping_on_the_limit() -> None:
    vt = VirtualTime()
    times = await admission_times(pacer(vt, 6000), vt, [0.0] * 2000)

    assert vt.most_sleeping == 1
    # One sleep per request let go at most: nobody polls.
    assert len(vt.sleeps) <= 2000
    assert times == sorted(times)
    assert times[-1] == pytest.approx((2000 - 10) * 0.01)


async def test_tokens_per_minute_weigh_each_job() -> None:
    vt = VirtualTime()
    p = pacer(vt, None, tpm=6000)  # 100 tokens a second
    jobs = [1000.0, 100.0, 100.0, 1000.0, 100.0, 0.0]
    times = []
    for tokens in jobs:
        await p.acquire(tokens)
        times.append(vt.elapsed_s())

    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # The first job went at once; the next waited until only a slice of its debt was left; from
    # then on each job waits exactly as long as the one before it weighed.
    assert times[0] == 0.0
    assert gaps[0] == pytest.approx(10.0 - (BURST_S - 0.01))
    assert gaps[1:] == pytest.approx([1.0, 1.0, 10.0, 1.0])


async def test_the_slower_of_the_two_limits_governs() -> None:
    vt = VirtualTime()
    p = pacer(vt, 600, tpm=6000)  # requests allow 10 a second, tokens 1 job of 100 a second
    times = []
    for _ in range(5):
        await p.acquire(100.0)
        times.append(vt.elapsed_s())
    assert [b - a for a, b in itertools.pairwise(times[1:])] == pytest.approx([1.0] * 3)


async def test_a_job_above_a_minute_of_tokens_goes_and_owes_one_minute() -> None:
    vt = VirtualTime()
    p = pacer(vt, None, tpm=600)  # 10 tokens a second

    await p.acquire(1_000_000)
    assert vt.elapsed_s() == 0.0
    await p.acquire(1)
    assert vt.elapsed_s() == pytest.approx(60.0 - (BURST_S - 0.1 / 1.0))


async def test_acquire_now_goes_only_when_nothing_could_make_it_wait() -> None:
    vt = VirtualTime()
    unlimited = pacer(vt, None, None)
    assert unlimited.acquire_now(100.0) == vt.clock()
    assert unlimited.snapshot().in_flight == 1
    unlimited.observe(rate_limited(retry_after_s=2.0), 100.0)
    # Paused by the 429: not now, and nothing is counted.
    assert unlimited.acquire_now(100.0) is None
    assert unlimited.snapshot().in_flight == 0
    assert await unlimited.acquire(100.0) == pytest.approx(START_S + 2.0)
    for limited in (pacer(vt, 600), pacer(vt, None, tpm=6000)):
        assert limited.acquire_now() is None
        assert limited.snapshot().in_flight == 0
    assert sum(vt.sleeps) == pytest.approx(2.0)


async def test_unlimited_acquire_returns_without_suspending() -> None:
    vt = VirtualTime()
    p = pacer(vt, None, None)
    for _ in range(1000):
        coro = p.acquire(500.0)
        # The coroutine finishes on its first step: no lock, no sleep, no yield to the loop.
        with pytest.raises(StopIteration):
            coro.send(None)
    assert vt.sleeps == []
    assert p.snapshot().in_flight == 1000


@pytest.mark.parametrize("rpm", [None, 6000])
async def test_a_429_pauses_every_acquirer_until_retry_after(rpm: float | None) -> None:
    vt = VirtualTime()
    p = pacer(vt, rpm)
    await p.acquire()
    p.observe(rate_limited(retry_after_s=3.0))

    stats = p.snapshot()
    assert stats.pause_left_s == 3.0
    assert stats.rate_limited_count == 1
    times = await admission_times(p, vt, [0.0] * 20)
    assert min(times) >= 3.0


def test_a_long_pause_the_server_asks_for_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """A Retry-After of a day (a daily quota) held the run that long without a word when it
    ran with --quiet."""
    vt = VirtualTime()
    p = pacer(vt, None)
    with caplog.at_level("WARNING", logger="batchrunner.limiter"):
        p.observe(rate_limited(retry_after_s=30.0))
        assert caplog.messages == []  # short pauses are the progress line's to show
        p.observe(rate_limited(retry_after_s=80_000.0))
        p.observe(rate_limited(retry_after_s=80_000.5))  # the same pause, asked again
        vt.now += 10.0
        p.observe(rate_limited(retry_after_s=3_600.0))  # within the day's pause
    (message,) = caplog.messages
    assert message.startswith("the server asked to wait 22 h 13 min: nothing is sent until ")
    assert p.snapshot().pause_left_s == pytest.approx(79_990.5)


def test_a_pause_is_a_day_at_most_whatever_the_headers_say() -> None:
    """A reset header a server got wrong (a date in a far year) made the pacer's date
    arithmetic overflow: the run stopped with an internal error."""
    vt = VirtualTime()
    p = pacer(vt, None)
    far = RateLimitInfo(remaining_requests=0, reset_requests_s=1e30)
    p.observe(Outcome(OutcomeKind.SUCCESS, 200, completion={"choices": []}, ratelimit=far))
    assert p.snapshot().pause_left_s == 86_400.0


async def test_a_503_with_retry_after_pauses_the_whole_run_and_lowers_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A 503 for an hour's maintenance: each job slept its hour alone and in silence, while
    # the others kept sending into the same 503s.
    vt = VirtualTime()
    p = pacer(vt, 600)
    unavailable = Outcome(OutcomeKind.RETRY, 503, error_kind="server_error", retry_after_s=3600.0)
    with caplog.at_level(logging.WARNING, logger="batchrunner.limiter"):
        await p.acquire()
        p.observe(unavailable)
    assert p.snapshot().pause_left_s == pytest.approx(3600.0)
    assert p.snapshot().effective_rpm == 600 and p.snapshot().rate_limited_count == 0
    (message,) = caplog.messages
    assert message.startswith("the server asked to wait 1 h 0 min")
    # A 502 with a Retry-After is that request's trouble (some gateways put one on every 5xx).
    other = pacer(vt, 600)
    await other.acquire()
    other.observe(Outcome(OutcomeKind.RETRY, 502, error_kind="server_error", retry_after_s=60.0))
    assert other.snapshot().pause_left_s == 0.0


async def test_an_outage_takes_attempts_in_a_row_without_an_answer_over_ten_seconds() -> None:
    vt = VirtualTime()
    quick = pacer(vt, None)
    # A burst of refused connections (a server restarting): each job's backoff is enough.
    fail_in_a_row(quick, vt, 50, over_s=1.0)
    assert quick.acquire_now() is not None
    # Failing for minutes, but with answers between: half the requests failing is no outage.
    answered = pacer(vt, None)
    for _ in range(20):
        fail_in_a_row(answered, vt, OUTAGE_AFTER - 1, over_s=OUTAGE_SILENCE_S)
        answered.observe(rate_limited(), sent_at_s=answered.acquire_now())
        vt.now += 1.0
        answered.observe(success(), sent_at_s=answered.acquire_now())
    assert answered.snapshot().outage_s == 0.0 and answered.acquire_now() is not None
    # Too few attempts, however long without an answer (one job at a time, backing off).
    few = pacer(vt, None)
    fail_in_a_row(few, vt, OUTAGE_AFTER - 1, over_s=300.0)
    assert few.acquire_now() is not None
    few.observe(no_answer("timeout"), sent_at_s=few.acquire_now())
    assert few.acquire_now() is None
    # Attempts given up or never sent say nothing: neither break a run of failures nor add to it.
    given_up = pacer(vt, None)
    fail_in_a_row(given_up, vt, OUTAGE_AFTER - 1, over_s=OUTAGE_SILENCE_S)
    given_up.observe(Outcome(OutcomeKind.RETRY, None, error_kind="cancelled"))
    assert given_up.acquire_now() is not None
    given_up.observe(Outcome(OutcomeKind.RETRY, 502, error_kind="server_error"))
    assert given_up.snapshot().outage_s == OUTAGE_SILENCE_S


async def test_attempts_out_when_the_failures_began_are_waited_for() -> None:
    """A server that fails some requests at once and answers the others after 20 s (a
    reasoning model behind a flaky gateway) was taken for one that does not answer."""
    vt = VirtualTime()
    p = pacer(vt, None)
    slow = [p.acquire_now() for _ in range(3)]
    fail_in_a_row(p, vt, 2 * OUTAGE_AFTER, over_s=2 * OUTAGE_SILENCE_S)
    assert p.snapshot().outage_s == 0.0, "three answers may still come"
    p.observe(no_answer("timeout"), sent_at_s=slow[0])
    p.observe(Outcome(OutcomeKind.RETRY, None, error_kind="cancelled"), sent_at_s=slow[1])
    fail_in_a_row(p, vt, 2, over_s=1.0)
    assert p.snapshot().outage_s == 0.0
    p.observe(success(), sent_at_s=slow[2])  # the API answers: no outage, a new count
    fail_in_a_row(p, vt, OUTAGE_AFTER, over_s=OUTAGE_SILENCE_S)
    assert p.snapshot().outage_s > 0  # (the attempts of the line above went and came back)
    # Nothing was out when they began: the count alone makes it.
    quiet = pacer(vt, None)
    fail_in_a_row(quiet, vt, OUTAGE_AFTER, over_s=OUTAGE_SILENCE_S)
    assert quiet.snapshot().outage_s == OUTAGE_SILENCE_S


async def test_in_an_outage_one_attempt_at_a_time_goes_until_the_api_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run whose API could not be reached (down, or the network lost) retried every job in
    its own backoff: all it could claim failed within a minute, and an outage of an hour
    overnight failed the whole batch."""
    vt = VirtualTime()
    p = pacer(vt, None)
    with caplog.at_level(logging.WARNING, logger="batchrunner.limiter"):
        fail_in_a_row(p, vt, OUTAGE_AFTER - 1, over_s=OUTAGE_SILENCE_S)
        straggler = p.acquire_now()  # sent as the failures went on, failing in the outage
        p.observe(no_answer(), sent_at_s=p.acquire_now())
        began = vt.now
        assert p.acquire_now() is None
        assert p.snapshot().outage_s == pytest.approx(OUTAGE_SILENCE_S)
        first, second = asyncio.ensure_future(p.acquire()), asyncio.ensure_future(p.acquire())
        sent_first = await first
        assert sent_first == pytest.approx(began + OUTAGE_BACKOFF_S)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not second.done()  # not while the first is out, however long it takes
        p.observe(no_answer(), sent_at_s=straggler)  # sent before: changes nothing
        failed_at = vt.now
        p.observe(no_answer("timeout"), sent_at_s=sent_first)
        sent_second = await second
        assert sent_second == pytest.approx(failed_at + 2 * OUTAGE_BACKOFF_S)
        # One given up (the run stopping, the lease lost) lets the next go in its place.
        third = asyncio.ensure_future(p.acquire())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not third.done()
        cancelled_at = vt.now
        p.observe(Outcome(OutcomeKind.RETRY, None, error_kind="cancelled"), sent_at_s=sent_second)
        sent_third = await third
        assert sent_third - cancelled_at <= 0.5
        fourth = asyncio.ensure_future(p.acquire())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not fourth.done()
        # Any answer ends the outage, a refusal as much as a success.
        p.observe(Outcome(OutcomeKind.FAIL_JOB, 400, error_kind="http_400"), sent_at_s=sent_third)
        await fourth
    assert p.snapshot().outage_s == 0.0
    assert p.acquire_now() is not None
    started, ended = caplog.messages
    assert started.startswith(
        "no answer from the API for 10 s (5 attempts in a row; the last: ConnectionRefusedError):"
        " sending one request at a time until one is answered, the next in 1 s"
    )
    assert ended.startswith("the API answers again, after ")


async def test_in_a_long_outage_the_pause_between_attempts_doubles_up_to_a_minute() -> None:
    vt = VirtualTime()
    p = pacer(vt, 600)  # (a request limit as well: the slower of the two governs)
    fail_in_a_row(p, vt, OUTAGE_AFTER, over_s=OUTAGE_SILENCE_S)
    gaps = []
    for _ in range(10):
        before = vt.now
        p.observe(no_answer("server_error"), sent_at_s=await p.acquire())
        gaps.append(vt.now - before)
    assert gaps == pytest.approx([min(2.0**k, OUTAGE_BACKOFF_MAX_S) for k in range(10)])
    p.observe(success(), sent_at_s=await p.acquire())
    # Over: the next outage starts again from the first pause.
    fail_in_a_row(p, vt, OUTAGE_AFTER, over_s=OUTAGE_SILENCE_S)
    before = vt.now
    await p.acquire()
    assert vt.now - before == pytest.approx(OUTAGE_BACKOFF_S)


async def test_tokens_an_answer_does_not_report_are_charged_on_top_of_the_estimate() -> None:
    # A stream without include_usage reports no usage: with no max_tokens in the request, its
    # estimate was the prompt alone, and --tpm ran twenty times over.
    vt = VirtualTime()
    p = pacer(vt, None, tpm=60_000)  # 1,000 tokens a second
    await p.acquire(100.0)
    p.observe(success(), 100.0, unreported_tokens=2_000.0)
    start_s = vt.elapsed_s()
    await p.acquire(100.0)
    # Its 2,100 tokens are paid off before the next goes (less a burst's 100 ms worth).
    assert vt.elapsed_s() - start_s == pytest.approx(2.1 - BURST_S, abs=0.01)
    await p.acquire(100.0)
    p.observe(success(total_tokens=100), 100.0, unreported_tokens=2_000.0)  # reported: exact
    start_s = vt.elapsed_s()
    await p.acquire(100.0)
    assert vt.elapsed_s() - start_s <= 0.2


async def test_a_429_lowers_the_request_rate_of_the_whole_run() -> None:
    vt = VirtualTime()
    p = pacer(vt, 6000)
    for _ in range(10):
        await p.acquire()
        p.observe(success())
    # A first 429 lowers it by a step (module text, 4.); those that follow with nothing
    # accepted in between lower nothing more (5.).
    for _ in range(SPORADIC_REFUSALS + 1):
        await p.acquire()
        p.observe(rate_limited(retry_after_s=1.0))
    assert p.snapshot().effective_rpm == 6000 * DECREASE_MARGIN
    # Accepted again, then more than a few 429s (of attempts sent together): the rate the
    # server accepted.
    for _ in range(10):
        await p.acquire()
        p.observe(success())
    for _ in [await p.acquire() for _ in range(SPORADIC_REFUSALS + 1)]:
        p.observe(rate_limited(retry_after_s=1.0))

    effective = p.snapshot().effective_rpm
    assert effective is not None
    # Ten went through in the first (floored) second: the server is taken at about its word.
    assert effective < 6000 * 0.5
    start_s = vt.elapsed_s()
    # Within the first probe interval, so the rate is still the lowered one (after the pause,
    # what the attempts before it owe at the old rate goes first).
    times = await admission_times(p, vt, [0.0] * 40)
    assert times[0] - start_s == pytest.approx(1.0)
    assert [b - a for a, b in itertools.pairwise(times[-30:])] == pytest.approx(
        [60.0 / effective] * 29
    )


async def test_default_backoff_grows_on_consecutive_429s_and_resets_on_success() -> None:
    vt = VirtualTime()
    p = pacer(vt, 600)
    pauses = []
    for outcome in [rate_limited(), rate_limited(), rate_limited(), success(), rate_limited()]:
        await p.acquire()
        p.observe(outcome)
        pauses.append(p.snapshot().pause_left_s)
    assert pauses == [DEFAULT_BACKOFF_S, 2 * DEFAULT_BACKOFF_S, 4 * DEFAULT_BACKOFF_S, 0.0, 1.0]


@pytest.mark.parametrize("pass_sent_at", [True, False])
async def test_429s_for_attempts_sent_before_a_slowdown_lower_nothing(pass_sent_at: bool) -> None:
    vt = VirtualTime()
    p = pacer(vt, 6000)
    sent = [await p.acquire() for _ in range(10)]

    def observe_429(sent_at_s: float) -> None:
        p.observe(rate_limited(0.5), sent_at_s=sent_at_s if pass_sent_at else None)

    observe_429(sent[0])
    lowered = p.snapshot().effective_rpm
    assert lowered is not None and lowered < 6000
    for sent_at_s in sent[1:]:
        observe_429(sent_at_s)
    assert p.snapshot().effective_rpm == lowered
    assert p.snapshot().rate_limited_count == 10

    # One sent after the slowdown and refused with nothing accepted since lowers nothing:
    # the server refuses whatever the rate (module text, 5.); the pause grows instead.
    observe_429(await p.acquire())
    assert p.snapshot().effective_rpm == lowered
    # Once one sent after the slowdown has been accepted, a refusal slows the run again.
    sent_at_s = await p.acquire()
    p.observe(success(), sent_at_s=sent_at_s if pass_sent_at else None)
    observe_429(await p.acquire())
    again = p.snapshot().effective_rpm
    assert again is not None and again < lowered


async def test_a_server_refusing_everything_for_a_while_lowers_the_rate_once() -> None:
    """An outage answered with short Retry-Afters: each pause ended, the next attempt was
    refused and lowered the rate again, 600 rpm fell to 8 in seconds, and probing took an
    hour to climb back. Now the first 429 lowers the rate, the next ones lengthen the pause,
    and the run goes on at about its rate once the server accepts again."""
    vt = VirtualTime()
    p = pacer(vt, 600)
    storm_s = 15.0
    refused = 0
    while vt.elapsed_s() < storm_s:
        sent_at_s = await p.acquire()
        p.observe(rate_limited(retry_after_s=1.0), sent_at_s=sent_at_s)
        refused += 1
    assert refused <= 8, "the pauses grew: few attempts in a 15 s outage"
    lowered = p.snapshot().effective_rpm
    assert lowered is not None and lowered >= 600 * DECREASE_FLOOR_FRACTION
    times = await admission_times(p, vt, [0.0] * 60)
    assert times[-1] - times[0] <= 1.1 * 59 * 60.0 / lowered


class QuantizedServer:
    """Accepts `limit_per_s` requests per whole second of virtual time, refuses the rest."""

    def __init__(self, vt: VirtualTime, limit_per_s: int, *, retry_after: bool) -> None:
        self.vt = vt
        self.limit_per_s = limit_per_s
        self.retry_after = retry_after
        self.second = -1
        self.count = 0
        self.accepted_at: list[float] = []
        self.refused = 0

    def answer(self) -> Outcome:
        now = self.vt.elapsed_s()
        second = math.floor(now)
        if second != self.second:
            self.second, self.count = second, 0
        self.count += 1
        if self.count <= self.limit_per_s:
            self.accepted_at.append(now)
            return success()
        self.refused += 1
        return rate_limited(second + 1 - now if self.retry_after else None)


@pytest.mark.parametrize("retry_after", [True, False], ids=["retry-after", "no-retry-after"])
@pytest.mark.parametrize("pass_sent_at", [True, False], ids=["sent-at", "no-sent-at"])
async def test_a_run_converges_on_a_server_allowing_half_the_configured_rate(
    retry_after: bool, pass_sent_at: bool
) -> None:
    vt = VirtualTime()
    limit_per_s = 10
    p = pacer(vt, rpm=2 * limit_per_s * 60)
    server = QuantizedServer(vt, limit_per_s, retry_after=retry_after)
    jobs = 3000
    todo = list(range(jobs))

    async def worker() -> None:
        while todo:
            todo.pop()
            while True:  # the dispatcher retries 429s
                sent_at_s = await p.acquire()
                outcome = server.answer()
                p.observe(outcome, sent_at_s=sent_at_s if pass_sent_at else None)
                if outcome.kind is OutcomeKind.SUCCESS:
                    break

    await asyncio.gather(*(worker() for _ in range(100)))

    ideal_s = jobs / limit_per_s
    assert len(server.accepted_at) == jobs
    assert vt.elapsed_s() <= 1.15 * ideal_s
    # Settled: over the last minute the server accepted nearly all it allows.
    last_minute = [t for t in server.accepted_at if t >= vt.elapsed_s() - 60.0]
    assert len(last_minute) >= 0.9 * 60 * limit_per_s
    assert server.refused <= 0.02 * jobs
    effective = p.snapshot().effective_rpm
    assert effective is not None and effective <= 1.05 * limit_per_s * 60


@pytest.mark.parametrize(
    ("per_s", "rpm"),
    [(100, 6000.0), (100, None), (20, 1200.0), (5, 300.0)],
    ids=["100/s", "100/s-no-rpm", "20/s", "5/s"],
)
async def test_a_few_429s_that_do_not_come_from_the_rate_hold_it_near_its_pace(
    per_s: int, rpm: float | None
) -> None:
    """A server that refuses one request in a hundred whatever the rate (a gateway's overloaded
    upstream, say): two slowdowns of 5 %, then the rate holds there; without a configured
    rate, no pacing starts. Before, every 429 after a slowdown slowed the run again: a run at
    200 ms latency took 9 times as long, and here the rate ended at a fortieth."""
    vt = VirtualTime()
    p = pacer(vt, rpm)
    answered = itertools.count(1)
    refused = 0
    jobs = 60 * per_s
    todo = list(range(jobs))

    async def worker() -> None:
        nonlocal refused
        while todo:
            todo.pop()
            while True:
                sent_at_s = await p.acquire()
                await vt.sleep(1 / per_s)  # virtual time runs on per answer
                if next(answered) % 100 == 0:
                    refused += 1
                    p.observe(rate_limited(0.1), sent_at_s=sent_at_s)
                    continue
                p.observe(success(), sent_at_s=sent_at_s)
                break

    await asyncio.gather(*(worker() for _ in range(4)))
    assert refused >= jobs // 100
    effective = p.snapshot().effective_rpm
    if rpm is None:
        assert effective is None  # a few 429s start no pacing
    else:
        assert effective is not None and effective >= 0.95**2 * rpm * 0.999
    # A minute at full pace, the 429s' pauses and the two slowdowns.
    assert vt.elapsed_s() <= 1.3 * 60


async def test_two_429s_among_a_runs_first_thirty_requests_lower_it_a_step_each() -> None:
    """At a run's start a window holds few attempts: two 429s in thirty were 7 %, and the rate
    fell to what the first (floored) second had carried, a twelfth of the configured one."""
    vt = VirtualTime()
    p = pacer(vt, 6000)
    for n in range(30):
        sent_at_s = await p.acquire()
        p.observe(rate_limited(0.1) if n in (9, 19) else success(), sent_at_s=sent_at_s)
    assert p.snapshot().effective_rpm == pytest.approx(6000 * 0.95**2)


async def test_a_few_429s_that_say_a_limit_ran_out_lower_the_rate_each_time() -> None:
    """x-ratelimit-remaining-requests: 0 on the 429: the rate, however few the refusals."""
    vt = VirtualTime()
    p = pacer(vt, 6000)
    exhausted = Outcome(
        OutcomeKind.RETRY,
        429,
        error_kind="rate_limit",
        retry_after_s=0.1,
        ratelimit=RateLimitInfo(remaining_requests=0, reset_requests_s=0.1),
    )
    rates = []
    for _ in range(4):
        for _ in range(99):
            p.observe(success(), sent_at_s=await p.acquire())
        p.observe(exhausted, sent_at_s=await p.acquire())
        rates.append(p.snapshot().effective_rpm)
    assert all(b is not None and a is not None and b < a for a, b in itertools.pairwise(rates))


async def test_pacing_at_the_servers_exact_limit_draws_almost_no_429s() -> None:
    vt = VirtualTime()
    p = pacer(vt, rpm=600)
    server = QuantizedServer(vt, 10, retry_after=True)
    for _ in range(1200):
        await p.acquire()
        p.observe(server.answer())
    # Evenly spread, 10 a second fit the server's seconds exactly; rounding may put one send a
    # hair before a second's edge.
    assert server.refused <= 1
    assert vt.elapsed_s() == pytest.approx(120.0, rel=0.02)


async def test_after_a_slowdown_the_rate_probes_back_up_slowly() -> None:
    vt = VirtualTime()
    p = pacer(vt, 600)
    for _ in range(20):
        await p.acquire()
        p.observe(success())
    await p.acquire()
    p.observe(rate_limited(retry_after_s=0.0))
    lowered = p.snapshot().effective_rpm
    assert lowered is not None and lowered < 600

    seen: list[float] = []
    while vt.elapsed_s() < 600.0:
        await p.acquire()
        p.observe(success())
        effective = p.snapshot().effective_rpm
        assert effective is not None
        if not seen or effective != seen[-1]:
            seen.append(effective)
    assert seen[0] == lowered
    assert seen[1] == pytest.approx(lowered * PROBE_STEP)
    assert all(b <= a * PROBE_STEP + 1e-9 for a, b in itertools.pairwise(seen))
    assert seen[-1] == 600
    # No faster than one step per probe interval.
    assert len(seen) - 1 <= 600.0 / PROBE_INTERVAL_S


class _JumpingSelector(selectors.DefaultSelector):
    """An event loop over this never waits: each wait for the next timer moves the loop's
    clock (`now`) forward instead, so timers run in order of their virtual time at once."""

    def __init__(self, now: list[float]) -> None:
        super().__init__()
        self.now = now

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout:
            self.now[0] += timeout
        return super().select(0)


def test_a_run_slows_down_when_answers_take_far_longer_than_refusals() -> None:
    """A server that accepts one request a second, at --rpm 3000 and 64 workers, whose answers
    take 30 s and whose 429s come back at once. No success sent after a decrease is back
    before the next 429s, and when successes sent before it counted for nothing, every
    429 was taken for an outage: the rate stayed near 3000 and 91 jobs went through in 15
    minutes (the server allows 900)."""
    now = [0.0]
    loop = asyncio.SelectorEventLoop(_JumpingSelector(now))
    loop.time = lambda: now[0]  # type: ignore[method-assign]
    horizon_s, bucket = 900.0, [2.0, 0.0]  # tokens, when last filled

    def server() -> float | None:
        """None: accepted; else the Retry-After of its 429 (whole seconds, as servers send)."""
        t = now[0]
        bucket[0], bucket[1] = min(2.0, bucket[0] + (t - bucket[1])), t
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return None
        return float(math.ceil(1.0 - bucket[0]))

    async def main() -> int:
        p = Pacer(3000, None, clock=loop.time, sleep=asyncio.sleep)
        done = 0

        async def worker() -> None:
            nonlocal done
            while loop.time() < horizon_s:
                sent_at_s = await p.acquire()
                retry_after_s = server()
                if retry_after_s is None:
                    await asyncio.sleep(30.0)
                    p.observe(success(), sent_at_s=sent_at_s)
                    done += 1
                else:
                    await asyncio.sleep(0.05)
                    p.observe(rate_limited(retry_after_s), sent_at_s=sent_at_s)
                    await asyncio.sleep(retry_after_s)

        workers = [asyncio.ensure_future(worker()) for _ in range(64)]
        await asyncio.wait(workers)
        return done

    try:
        done = loop.run_until_complete(main())
    finally:
        loop.close()
    assert done >= 0.8 * horizon_s


async def test_above_the_rate_that_drew_the_last_429_the_rate_probes_up_at_the_usual_pace() -> None:
    """Probing slows to one step per PROBE_NEAR_CEILING_INTERVAL_S only within 2 % of the
    rate that drew the last 429. It stayed that slow above it too, so a run lowered far under
    its limit took four times as long to climb back."""
    vt = VirtualTime()
    p = pacer(vt, 6000)
    for _ in range(2):  # (as in test_a_429_lowers_the_request_rate_of_the_whole_run)
        for _ in range(10):
            await p.acquire()
            p.observe(success())
        for _ in [await p.acquire() for _ in range(SPORADIC_REFUSALS + 1)]:
            p.observe(rate_limited(retry_after_s=1.0))
    lowered = p.snapshot().effective_rpm
    assert lowered is not None and lowered < 3000
    start_s = vt.elapsed_s()
    steps = 0
    effective = lowered
    while vt.elapsed_s() < start_s + 300.0:
        await p.acquire()
        p.observe(success())
        now_rpm = p.snapshot().effective_rpm
        assert now_rpm is not None
        steps += now_rpm != effective
        effective = now_rpm
    # One step per probe interval, but for the few within 2 % of that rate.
    assert steps >= 0.8 * 300.0 / PROBE_INTERVAL_S


@pytest.mark.parametrize(
    ("info", "in_flight", "hold_s"),
    [
        (RateLimitInfo(remaining_requests=0, reset_requests_s=2.5), 0, 2.5),
        (RateLimitInfo(remaining_tokens=0, reset_tokens_s=4.0), 0, 4.0),
        # Two still in flight will use up the two remaining requests.
        (RateLimitInfo(remaining_requests=2, reset_requests_s=1.5), 2, 1.5),
        (RateLimitInfo(remaining_requests=3, reset_requests_s=1.5), 2, 0.0),
        (RateLimitInfo(remaining_tokens=150, reset_tokens_s=6.0), 2, 6.0),  # 200 in flight
        (RateLimitInfo(remaining_tokens=250, reset_tokens_s=6.0), 2, 0.0),
        (RateLimitInfo(remaining_requests=0), 0, 0.0),  # no reset time: nothing to hold until
    ],
)
async def test_exhausted_ratelimit_headers_hold_acquires_until_reset(
    info: RateLimitInfo, in_flight: int, hold_s: float
) -> None:
    vt = VirtualTime()
    p = pacer(vt, None)
    for _ in range(in_flight + 1):
        await p.acquire(100.0)
    p.observe(success(ratelimit=info), 100.0)

    assert p.snapshot().pause_left_s == hold_s
    await p.acquire(100.0)
    assert vt.elapsed_s() == pytest.approx(hold_s)


@pytest.mark.parametrize(
    ("outcome", "owed_s"),
    [
        (success(total_tokens=200), 2.0),  # 800 tokens given back
        (success(total_tokens=3000), 30.0),  # 2000 more charged
        (success(total_tokens=None), 10.0),  # no usage: the estimate stands
        (rate_limited(retry_after_s=0.0), 10.0),
    ],
)
async def test_real_usage_replaces_the_token_estimate(outcome: Outcome, owed_s: float) -> None:
    vt = VirtualTime()
    p = pacer(vt, None, tpm=6000)  # 100 tokens a second
    await p.acquire(1000.0)
    p.observe(outcome, 1000.0)

    await p.acquire(0.0)
    assert vt.elapsed_s() == pytest.approx(owed_s - (BURST_S - 0.01))


async def test_set_limits_changes_the_pace_while_running() -> None:
    vt = VirtualTime()
    p = pacer(vt, 60)
    times = await admission_times(p, vt, [0.0] * 3)
    assert times == pytest.approx([0.0, 1.0, 2.0])

    p.set_limits(600, None)
    start_s = vt.elapsed_s()
    times = await admission_times(p, vt, [0.0] * 3)
    # The debt left at the old rate is rescaled: 1 s at 60/min becomes 0.1 s at 600/min.
    assert [t - start_s for t in times] == pytest.approx([0.1, 0.2, 0.3])

    p.set_limits(None, 60)  # now only tokens: one per second
    start_s = vt.elapsed_s()
    times = await admission_times(p, vt, [1.0] * 3)
    assert [t - start_s for t in times] == pytest.approx([0.0, 1.0, 2.0])
    assert p.snapshot().rpm is None and p.snapshot().tpm == 60


async def test_set_limits_keeps_what_was_learned_as_a_fraction_of_the_share() -> None:
    vt = VirtualTime()
    p = pacer(vt, 1200)
    for _ in range(20):
        await p.acquire()
        p.observe(success())
    await p.acquire()
    p.observe(rate_limited(retry_after_s=0.5))
    lowered = p.snapshot().effective_rpm
    assert lowered is not None and lowered < 1200

    p.set_limits(600, None)  # another worker joined: half the share
    assert p.snapshot().effective_rpm == pytest.approx(lowered / 2)
    p.set_limits(None, None)
    assert p.snapshot().effective_rpm is None


async def test_repeating_the_same_limits_keeps_a_rate_learned_without_an_rpm() -> None:
    vt = VirtualTime()
    p = pacer(vt, None, tpm=1_000_000)
    for _ in range(10):
        await p.acquire(10.0)
        p.observe(success(10), 10.0)
    # More than a few 429s (a few start no pacing).
    for _ in range(SPORADIC_REFUSALS + 1):
        await p.acquire(10.0)
        p.observe(rate_limited(retry_after_s=1.0), 10.0)
    learned = p.snapshot().effective_rpm
    assert learned is not None

    p.set_limits(None, 1_000_000)
    assert p.snapshot().effective_rpm == learned


@pytest.mark.parametrize("rpm", [6000.0, None], ids=["rpm", "no-rpm"])
async def test_progress_says_when_429s_slowed_the_run(rpm: float | None) -> None:
    """With or without --rpm, a rate the 429s set is shown; the rate asked for is not."""
    vt = VirtualTime()
    p = pacer(vt, rpm)
    assert progress.slowed_to(p.snapshot()) is None
    for _ in range(10):
        p.observe(success(), sent_at_s=await p.acquire())
    for _ in range(SPORADIC_REFUSALS + 1):
        p.observe(rate_limited(1.0), sent_at_s=await p.acquire())
    effective = p.snapshot().effective_rpm
    assert effective is not None and effective < 6000
    assert progress.slowed_to(p.snapshot()) == effective


async def test_snapshot_of_a_fresh_pacer() -> None:
    vt = VirtualTime()
    assert pacer(vt, 600, 90_000).snapshot() == PacerStats(
        effective_rpm=600,
        rpm=600,
        tpm=90_000,
        accepted_rpm=0.0,
        pause_left_s=0.0,
        rate_limited_count=0,
        in_flight=0,
    )


@pytest.mark.parametrize("bad", [0, -5, math.inf, math.nan])
async def test_limits_must_be_positive_and_finite(bad: float) -> None:
    vt = VirtualTime()
    with pytest.raises(ValueError, match="rpm"):
        pacer(vt, bad)
    with pytest.raises(ValueError, match="tpm"):
        pacer(vt, None, bad)
    with pytest.raises(ValueError, match="tpm"):
        pacer(vt, 60).set_limits(60, bad)


async def test_a_negative_token_estimate_is_refused() -> None:
    vt = VirtualTime()
    with pytest.raises(ValueError, match="negative"):
        await pacer(vt, 60).acquire(-1.0)


async def test_real_clock_and_sleep_are_the_defaults() -> None:
    p = Pacer(600_000, None)  # 10,000 a second: 100 ms of burst is 1,000 requests
    for _ in range(500):
        await p.acquire()
    assert p.snapshot().in_flight == 500
