"""Request and token pacing for one run: the single `Pacer` that every dispatcher task awaits
before each HTTP attempt, and that every outcome is reported back to.

What it owns
------------
- Requests per minute and tokens per minute, spread evenly over the minute. Providers enforce
  per-minute limits in short slices (60 RPM may mean one request per second), so the pacer never
  hands out a minute's budget at once: at most ``BURST_S`` (100 ms) of budget goes in a burst,
  and at least one request. A job whose token estimate is above a whole minute's capacity is
  charged one minute's capacity, so it goes instead of waiting forever.
- Pauses: a 429 stops every acquirer until its Retry-After has passed (or a default backoff,
  doubled for each rate-limit episode that follows another without a success in between), so
  does a 503 or 529 that comes with a Retry-After (maintenance, an overload), and
  ``x-ratelimit-remaining-*`` headers at or below what is already in flight hold new acquires
  until the header's reset time.
- Token correction: when a response reports its real usage, the difference from the estimate
  charged at acquire is given back to (or taken from) the token budget.
- Adaptation to the rate the server really accepts, for the whole run:

  1. Attempts are counted when they are sent and 429s when they come back. Over the last
     ``ACCEPTED_WINDOW_S`` (longer at slow rates), up to the send time of the refused attempt
     (what went later may still be refused), per second not paused (at least
     ``ACCEPTED_MIN_SPAN_S``), that gives the rate sent and the rate accepted (sent minus 429s).
     Counting at send time matters: a 429 comes back at once, a success only after the model has
     written its answer, so counting answers would see the refusals long before the successes.
  2. On the first 429 of an episode the effective request rate becomes the accepted rate, held
     between ``DECREASE_FLOOR_FRACTION`` (50 %) and ``DECREASE_MARGIN`` (95 %) of the rate really
     being sent: at least a 5 % step, because a server that counts in fixed windows hands out a
     fresh quota after each pause and so looks more generous than it is; at most a halving, so
     one noisy window cannot collapse the run. 429s for attempts sent before that decrease belong
     to the same episode: they may extend the pause but lower nothing.
  3. Every ``PROBE_INTERVAL_S`` without a 429 (and not paused) the effective rate grows by
     ``PROBE_STEP`` (2 %) up to the configured limit, to find capacity the server gives back;
     while a step would come within 2 % of the rate that drew the last 429 (either side),
     only every ``PROBE_NEAR_CEILING_INTERVAL_S``, since each 429 up there pauses the whole
     run again.

  With no configured request limit, a 429 starts request pacing at the accepted rate (once that
  rests on enough attempts), and probing then raises it without a ceiling.

  4. A few 429s (under ``SPORADIC_FRACTION``, 5 %, of what was sent in the window, or no more
     than ``SPORADIC_REFUSALS``, 3, in it) lower the pace set by one ``DECREASE_MARGIN`` step
     each, at most ``SPORADIC_DECREASES`` (2) times in a row, and never start pacing a run that
     has none. A rate just over the server's limit draws few 429s, and a step takes it under;
     but a server that refuses one request in a hundred whatever the rate (an overloaded
     upstream behind a gateway) refuses as many at any rate, and every slowdown drew the next
     one: 1 % of such 429s made a run at 200 ms latency take 9 times as long. After those two
     steps, a few 429s take a rate that probing raised back to the pace the steps left, no
     lower. Their pauses still hold every acquirer, and probing still starts over at each of
     them. A 429 among more refusals, or one whose ``x-ratelimit-remaining-*`` header is 0,
     lowers the rate as in 2. and starts over.

  5. A 429 for an attempt sent after the last decrease, with no success since, lowers
     nothing: the server is refusing whatever the rate (an outage, a fixed window spent),
     and rates measured while the run mostly waits are noise. Its pause is at least the
     default backoff, doubled for each such pause in a row, whatever shorter Retry-After it
     came with. (Lowering at each of them, a 15-second outage answered with
     ``Retry-After: 1`` took a run from 600 requests per minute to 8, and probing took an
     hour to climb back.)

- Outages: ``OUTAGE_AFTER`` (5) attempts in a row that got no answer (a connection refused,
  reset or never made, a timeout) or a server error, over at least ``OUTAGE_SILENCE_S`` (10 s)
  with no other answer, and none of the attempts out when they began still to come back, say
  that the API cannot be reached, not that those requests are bad (a server that fails half
  its requests at once answers the other half, however slowly). From then
  on one attempt at a time goes: ``OUTAGE_BACKOFF_S`` after the outage began, then after each
  one that fails again a pause doubled up to ``OUTAGE_BACKOFF_MAX_S``, until any answer comes
  back. The jobs waiting here make no attempts, so an outage of hours fails a few jobs (those
  whose turn came up often enough) instead of every job the run could claim in a few minutes
  (retrying each in its backoff: a minute for the defaults). An outage is this process's own
  (its own network may be what failed): it is not published to the batch's other workers, as
  a pause the server asks for is.

Contract: every ``acquire`` is followed by exactly one ``observe`` with the same token estimate,
whatever happened to the attempt; the in-flight counts the header checks rely on come from that.
Passing the time ``acquire`` returned as ``observe(..., sent_at_s=...)`` tells exactly which 429s
answer attempts sent before the last decrease; without it the pacer assumes the next outcomes,
as many as were in flight at that decrease, are those.

Why asyncio-throttle and aiolimiter are not used
------------------------------------------------
Neither can be driven by an injectable clock without patching its internals. asyncio-throttle
reads ``time.monotonic`` and calls ``asyncio.sleep`` through module globals, polls every 10 ms
per waiter, has no weights and allows a whole window in one burst. aiolimiter reads the event
loop's clock and schedules its wake-ups with ``loop.call_at``; with a capacity of one burst slice
it rejects any amount above the slice (``ValueError``), so a 4,000-token job under a 100 ms slice
of tokens could not be charged in full, and it has no way to give tokens back. The arithmetic
both would provide is the generic cell rate algorithm (a token bucket kept as one timestamp),
implemented in `_Gcra` below in the debt form, which charges a job in full once no more than one
slice of debt is outstanding. Waiting goes through one ``asyncio.Lock``: however many jobs wait,
one task sleeps on the limits and the others wait on the lock, in arrival order, without polling.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batchrunner.outcome import MAX_WAIT_S, Outcome, OutcomeKind, RateLimitInfo

log = logging.getLogger(__name__)

SECONDS_PER_MINUTE = 60.0
#: Largest burst: this many seconds' worth of the per-minute budget may go at once (at least one
#: request).
BURST_S = 0.1
#: Pause after a 429 without Retry-After (or with a shorter one, when nothing was accepted since
#: the last decrease: module text, 5.); doubled for each episode that follows another without
#: a success in between, up to DEFAULT_BACKOFF_MAX_S.
DEFAULT_BACKOFF_S = 1.0
DEFAULT_BACKOFF_MAX_S = 30.0
#: Answers that say the whole server is unavailable (503; Anthropic's 529, overloaded): their
#: Retry-After pauses the whole run.
_UNAVAILABLE = frozenset({503, 529})
#: A pause the server asks for that is at least this long is written to stderr when it starts.
LONG_PAUSE_S = 60.0
#: Attempts in a row with no answer (or a server error), over at least this long, that make
#: an outage (module text)...
OUTAGE_AFTER = 5
OUTAGE_SILENCE_S = 10.0
#: ...during which one attempt at a time goes, this long after the last one failed, doubled
#: for each that fails again up to OUTAGE_BACKOFF_MAX_S.
OUTAGE_BACKOFF_S = 1.0
OUTAGE_BACKOFF_MAX_S = 60.0
#: Error kinds of attempts the API did not answer, or answered with a server error.
_NO_ANSWER = frozenset({"connection", "timeout", "server_error"})
#: The outcome of an attempt given up or never sent: it says nothing about the API.
_NOT_SENT = "cancelled"
#: How far back the sent and accepted rates look: this long, or long enough to hold
#: ACCEPTED_WINDOW_REQUESTS at the effective rate when that is slow.
ACCEPTED_WINDOW_S = 10.0
ACCEPTED_WINDOW_REQUESTS = 20
#: The rates never divide by less time than this: providers quantize limits to one second at the
#: finest, so a first half second at full speed says nothing about what the server sustains.
ACCEPTED_MIN_SPAN_S = 1.0
#: Without a configured request limit, pacing starts only from at least this many accepted
#: attempts: a 429 on the first few would otherwise set a crawl.
UNLIMITED_MIN_SAMPLES = 5
#: One rate-limit episode sets the effective rate to at most this fraction of the rate sent...
DECREASE_MARGIN = 0.95
#: ...and to at least this fraction of it.
DECREASE_FLOOR_FRACTION = 0.5
#: After this long without a 429 the effective rate grows by PROBE_STEP (2 %)...
PROBE_INTERVAL_S = 5.0
PROBE_STEP = 1.02
#: ...or after this long, once a step would pass CEILING_FRACTION of the rate that last drew a
#: 429: the limit is likely just above, and each 429 costs a pause of the whole run.
PROBE_NEAR_CEILING_INTERVAL_S = 20.0
CEILING_FRACTION = 0.98
#: 429s under this fraction of the attempts sent in the window are "a few", and so are this
#: many or fewer in the window (at a run's start, two in thirty say nothing yet)...
SPORADIC_FRACTION = 0.05
SPORADIC_REFUSALS = 3
#: ...and lower the rate at most this many times in a row (see the module's text, 4.).
SPORADIC_DECREASES = 2
#: The effective request rate never falls below this (or the configured rate, if lower).
MIN_EFFECTIVE_RPM = 1.0
#: The task waiting on the limits rechecks at least this often, so a raised limit or tokens
#: given back shorten its wait.
WAIT_STEP_MAX_S = 0.5
#: Waits shorter than this count as none; float rounding would otherwise loop on tiny sleeps.
WAIT_EPSILON_S = 1e-6

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PacerStats:
    """What the progress display shows about pacing."""

    #: Requests per minute the pacer allows now (lowered after 429s); None = no request limit.
    effective_rpm: float | None
    #: The configured limits (this process's share); None = no limit of that kind.
    rpm: float | None
    tpm: float | None
    #: Requests per minute the server accepted over the recent window, pauses left out.
    accepted_rpm: float
    #: Seconds until acquires go again after a 429 or an exhausted x-ratelimit header; 0 if none.
    pause_left_s: float
    #: 429 rate-limit answers observed so far.
    rate_limited_count: int
    #: Attempts acquired and not yet observed.
    in_flight: int
    #: Seconds without an answer from the API, during an outage (module text); 0 if none.
    outage_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _Rates:
    #: Attempts sent in the window that did not come back as 429s.
    accepted: int
    accepted_rpm: float
    sent_rpm: float


class _Gcra:
    """Generic cell rate algorithm: a token bucket kept as one theoretical arrival time (TAT).

    The bucket is empty when TAT <= now; each unit charged pushes TAT one interval later. An
    amount may go once no more than `tolerance_s` of debt is outstanding, and is then charged in
    full: the debt form, which never refuses an amount for being larger than the burst.
    """

    __slots__ = ("_interval_s", "_tat_s", "_tolerance_s")

    def __init__(self, now: float, rate_per_s: float) -> None:
        self._tat_s = now
        self._interval_s = 1.0 / rate_per_s
        # BURST_S worth of units may go at once; one unit always may.
        self._tolerance_s = max(0.0, BURST_S - self._interval_s)

    def wait_s(self, now: float) -> float:
        """Seconds until the next amount may go (<= 0: now)."""
        return self._tat_s - self._tolerance_s - now

    def charge(self, now: float, amount: float) -> None:
        # max(): time spent idle is not saved up beyond the burst tolerance.
        self._tat_s = max(self._tat_s, now) + amount * self._interval_s

    def adjust(self, amount: float) -> None:
        """Charge `amount` more (negative: give it back) on top of what was charged already."""
        self._tat_s += amount * self._interval_s

    def set_rate(self, now: float, rate_per_s: float) -> None:
        """Change the rate, keeping outstanding debt in units, not in seconds."""
        old_interval_s = self._interval_s
        self._interval_s = 1.0 / rate_per_s
        self._tolerance_s = max(0.0, BURST_S - self._interval_s)
        debt_s = self._tat_s - now
        if debt_s > 0:
            self._tat_s = now + debt_s * self._interval_s / old_interval_s


def _check_limit(name: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number or None, not {value!r}")


def _exhausted(info: RateLimitInfo | None) -> bool:
    """Whether a 429's own headers say a limit of ours ran out: a rate limit, however few."""
    return info is not None and (info.remaining_requests == 0 or info.remaining_tokens == 0)


def _total_tokens(outcome: Outcome) -> float | None:
    """The server's count of tokens used by a successful attempt, if it sent one."""
    if outcome.kind is not OutcomeKind.SUCCESS or outcome.completion is None:
        return None
    usage = outcome.completion.get("usage")
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, bool) or not isinstance(total, int | float) or total < 0:
        return None
    return float(total)


class Pacer:
    """Paces the attempts of one run within requests and tokens per minute.

    `acquire(tokens)` before each attempt; `observe(outcome, tokens)` after it.
    `rpm=None` / `tpm=None`: no limit of that kind.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        self._clock = clock
        self._sleep = sleep
        # Whoever holds the lock is the only task waiting on the limits; the rest queue here.
        self._lock = asyncio.Lock()
        now = clock()
        self._rpm = rpm
        self._tpm = tpm
        self._effective_rpm = rpm
        self._requests = None if rpm is None else _Gcra(now, rpm / SECONDS_PER_MINUTE)
        self._tokens = None if tpm is None else _Gcra(now, tpm / SECONDS_PER_MINUTE)
        self._paused_until_s = -math.inf
        #: Recent pauses as (start, end), left out of the time the rates divide by.
        self._pauses: deque[tuple[float, float]] = deque()
        #: When recent attempts were sent, and when recent 429s came back.
        self._sent: deque[float] = deque()
        self._refused: deque[float] = deque()
        #: When the first attempt went: the time before it says nothing about the server.
        self._started_s: float | None = None
        self._last_rate_change_s = now
        self._decreased_at_s = -math.inf
        #: Whether a success has come since the last decrease: until one has, the server
        #: refuses whatever the rate, and further 429s lower nothing (module text, 5.).
        self._accepted_since_decrease = True
        #: The rate being sent when the last 429 episode began.
        self._ceiling_rpm = math.inf
        #: Slowdowns in a row for a few 429s (SPORADIC_FRACTION), and the pace they left.
        self._sporadic_decreases = 0
        self._sporadic_floor_rpm = 0.0
        self._backoff_s = DEFAULT_BACKOFF_S
        self._rate_limited_count = 0
        self._in_flight = 0
        self._tokens_in_flight = 0.0
        #: Outcomes still to come from attempts in flight at the last decrease, for observers
        #: that do not pass `sent_at_s`.
        self._stale_outcomes = 0
        #: Attempts in a row that got no answer, when the first of them came back, and how
        #: many attempts out then are still to come back; during an outage, when it began,
        #: when the next attempt may go, and when the one attempt out (if any) was sent.
        self._no_answers = 0
        self._no_answer_since_s = -math.inf
        self._streak_waiting = 0
        self._outage_since_s: float | None = None
        self._outage_until_s = -math.inf
        self._outage_backoff_s = OUTAGE_BACKOFF_S
        self._outage_probe_s: float | None = None

    # -- acquiring -------------------------------------------------------------------------

    async def acquire(self, tokens: float = 0.0) -> float:
        """Wait until one attempt estimated at `tokens` tokens may be sent.

        Returns the time it was let go, on the pacer's clock, for `observe(sent_at_s=...)`.
        """
        if tokens < 0:
            raise ValueError(f"a token estimate cannot be negative: {tokens!r}")
        sent_at = self.acquire_now(tokens)
        if sent_at is not None:
            return sent_at
        async with self._lock:
            while True:
                now = self._clock()
                self._probe(now)
                wait_s = self._paused_until_s - now
                if self._outage_since_s is not None:
                    wait_s = max(wait_s, self._outage_wait_s(now))
                if self._requests is not None:
                    wait_s = max(wait_s, self._requests.wait_s(now))
                if self._tokens is not None:
                    wait_s = max(wait_s, self._tokens.wait_s(now))
                if wait_s <= WAIT_EPSILON_S:
                    break
                await self._sleep(min(wait_s, WAIT_STEP_MAX_S))
            if self._requests is not None:
                self._requests.charge(now, 1.0)
            if self._tokens is not None:
                self._tokens.charge(now, self._token_cost(tokens))
            if self._outage_since_s is not None:
                self._outage_probe_s = now
            self._admit(now, tokens)
            return now

    def acquire_now(self, tokens: float = 0.0) -> float | None:
        """`acquire` when it would not wait: with no limits and no pause, the attempt goes
        with no lock and no coroutine (the dispatcher's hot path). None: call `acquire`."""
        if (
            self._requests is None
            and self._tokens is None
            and self._outage_since_s is None
            and tokens >= 0
        ):
            now = self._clock()
            if now >= self._paused_until_s:
                self._admit(now, tokens)
                return now
        return None

    def _admit(self, now: float, tokens: float) -> None:
        if self._started_s is None:
            self._started_s = now
        self._sent.append(now)
        self._in_flight += 1
        self._tokens_in_flight += tokens

    def _token_cost(self, tokens: float) -> float:
        # More than a minute's capacity could never fit; one minute's worth is the most a job owes.
        return tokens if self._tpm is None else min(tokens, self._tpm)

    # -- observing -------------------------------------------------------------------------

    def observe(
        self,
        outcome: Outcome,
        estimated_tokens: float = 0.0,
        *,
        sent_at_s: float | None = None,
        unreported_tokens: float = 0.0,
    ) -> None:
        """Learn from one attempt's outcome.

        `estimated_tokens` as given to `acquire`; `sent_at_s` as `acquire` returned, if known;
        `unreported_tokens`: for a success that reports no usage, tokens it used beyond the
        estimate (its answer, where the estimate held no output cap).
        """
        now = self._clock()
        self._in_flight = max(0, self._in_flight - 1)
        self._tokens_in_flight = max(0.0, self._tokens_in_flight - estimated_tokens)
        if sent_at_s is not None:
            # <=: a coarse clock can give a send and the decrease that answered it one reading.
            stale = sent_at_s <= self._decreased_at_s
        else:
            stale = self._stale_outcomes > 0
            self._stale_outcomes = max(0, self._stale_outcomes - 1)
        if (
            outcome.kind is not OutcomeKind.SUCCESS
            or self._no_answers
            or self._outage_since_s is not None
        ):
            self._follow_outage(now, outcome, sent_at_s)
        if outcome.error_kind == "rate_limit":
            self._refused.append(now)
            self._on_rate_limited(
                now,
                outcome.retry_after_s,
                stale=stale,
                sent_at_s=sent_at_s,
                exhausted=_exhausted(outcome.ratelimit),
            )
        elif outcome.status in _UNAVAILABLE and outcome.retry_after_s is not None:
            # A server unavailable for that long (maintenance, an overload) is so for every
            # request: the whole run waits, and says so when long. (Other 5xx are one request's
            # trouble: a gateway that puts a Retry-After on each would halt the run at each.)
            self._pause(now, now + outcome.retry_after_s)
        elif outcome.kind is OutcomeKind.SUCCESS:
            self._backoff_s = DEFAULT_BACKOFF_S
            # Whenever it was sent: the server is accepting (its answers may take much longer
            # than its refusals, and none sent after the decrease may be back yet).
            self._accepted_since_decrease = True
            self._correct_tokens(outcome, estimated_tokens, unreported_tokens)
        if outcome.ratelimit is not None:
            self._apply_headers(now, outcome.ratelimit)
        self._forget_before(now - self._window_s())

    def _follow_outage(self, now: float, outcome: Outcome, sent_at_s: float | None) -> None:
        """Counts attempts the API did not answer; starts, paces and ends outages."""
        probe_s = self._outage_probe_s
        # The one attempt let go during an outage (an observer without `sent_at_s`: whatever
        # comes back while it is out).
        is_probe = probe_s is not None and (sent_at_s is None or sent_at_s == probe_s)
        if self._streak_waiting and (sent_at_s is None or sent_at_s <= self._no_answer_since_s):
            self._streak_waiting -= 1  # sent before the failures began: one less to wait for
        if outcome.error_kind == _NOT_SENT and outcome.kind is OutcomeKind.RETRY:
            if is_probe:
                self._outage_probe_s = None  # not sent after all: the next one goes instead
            return
        if outcome.kind is not OutcomeKind.RETRY or outcome.error_kind not in _NO_ANSWER:
            # An answer, whatever it says: the API can be reached.
            self._no_answers = self._streak_waiting = 0
            if self._outage_since_s is not None:
                log.warning(
                    "the API answers again, after %s without an answer",
                    _duration(now - self._no_answer_since_s),
                )
                self._outage_since_s = None
                self._outage_probe_s = None
                self._outage_backoff_s = OUTAGE_BACKOFF_S
            return
        self._no_answers += 1
        if self._no_answers == 1:
            self._no_answer_since_s = now
            # Attempts out when the failures began may still be answered (a server that fails
            # some requests at once and answers others after 20 s): none is given up on.
            self._streak_waiting = self._in_flight
        if self._outage_since_s is None:
            if (
                self._no_answers >= OUTAGE_AFTER
                and now - self._no_answer_since_s >= OUTAGE_SILENCE_S
                and not self._streak_waiting
            ):
                self._outage_since_s = now
                self._outage_until_s = now + self._outage_backoff_s
                log.warning(
                    "no answer from the API for %s (%d attempts in a row; the last: %s):"
                    " sending one request at a time until one is answered, the next in %s"
                    " (Ctrl-C stops the run; running it again resumes)",
                    _duration(now - self._no_answer_since_s),
                    self._no_answers,
                    outcome.message or outcome.error_kind,
                    _duration(self._outage_backoff_s),
                )
        elif is_probe:
            # (Attempts sent before the outage began, failing now, change nothing.)
            self._outage_probe_s = None
            self._outage_backoff_s = min(self._outage_backoff_s * 2, OUTAGE_BACKOFF_MAX_S)
            self._outage_until_s = now + self._outage_backoff_s

    def _outage_wait_s(self, now: float) -> float:
        if self._outage_probe_s is not None:
            return WAIT_STEP_MAX_S  # until the attempt out comes back
        return self._outage_until_s - now

    def _on_rate_limited(
        self,
        now: float,
        retry_after_s: float | None,
        *,
        stale: bool,
        sent_at_s: float | None,
        exhausted: bool = False,
    ) -> None:
        self._rate_limited_count += 1
        # Probing starts over: the server just said the current rate is too much.
        self._last_rate_change_s = now
        # Refused again with nothing accepted since the last decrease: an outage or a spent
        # window, which no rate fixes. The pause grows instead (module text, 5.).
        outage = not stale and not self._accepted_since_decrease
        if retry_after_s is not None and not outage:
            self._pause(now, now + max(0.0, retry_after_s))
        elif not stale and now >= self._paused_until_s:
            self._pause(now, now + max(retry_after_s or 0.0, self._backoff_s))
            self._backoff_s = min(self._backoff_s * 2, DEFAULT_BACKOFF_MAX_S)
        elif retry_after_s is not None:
            # Refusals of a burst that come back during its pause: one doubling per pause.
            self._pause(now, now + max(0.0, retry_after_s))
        if not stale and not outage:
            self._slow_down(now, now if sent_at_s is None else sent_at_s, exhausted=exhausted)

    def _slow_down(self, now: float, known_until_s: float, *, exhausted: bool = False) -> None:
        rates = self._rates(now, known_until_s)
        current = self._effective_rpm
        few = len(self._refused) <= SPORADIC_REFUSALS or (
            rates.sent_rpm - rates.accepted_rpm < SPORADIC_FRACTION * rates.sent_rpm
        )
        if few and not exhausted:
            self._slow_down_for_a_few(now, current)
            return
        self._sporadic_decreases = 0
        if current is None and rates.accepted < UNLIMITED_MIN_SAMPLES:
            return  # too little to start pacing from: the pause alone has to do
        # What was really being sent: less than the effective rate when the run sends less.
        sending_rpm = rates.sent_rpm if current is None else min(current, rates.sent_rpm)
        new_rpm = min(
            max(rates.accepted_rpm, sending_rpm * DECREASE_FLOOR_FRACTION),
            sending_rpm * DECREASE_MARGIN,
        )
        lowest_rpm = MIN_EFFECTIVE_RPM if current is None else min(MIN_EFFECTIVE_RPM, current)
        self._decrease(now, max(new_rpm, lowest_rpm), sending_rpm)

    def _slow_down_for_a_few(self, now: float, current: float | None) -> None:
        """A few 429s (module text, 4.): one step down from the pace set, SPORADIC_DECREASES
        times in a row, then no lower than the pace those steps left; they never start pacing
        a run that has none."""
        if current is None:
            return
        lowest_rpm = min(MIN_EFFECTIVE_RPM, current)
        new_rpm = max(current * DECREASE_MARGIN, lowest_rpm)
        if self._sporadic_decreases < SPORADIC_DECREASES:
            self._sporadic_decreases += 1
            self._sporadic_floor_rpm = new_rpm
        elif current > self._sporadic_floor_rpm:
            # Probing took the rate above that pace, and 429s came again: back towards it.
            new_rpm = max(new_rpm, self._sporadic_floor_rpm)
        else:
            return
        self._decrease(now, new_rpm, current)

    def _decrease(self, now: float, rpm: float, ceiling_rpm: float) -> None:
        self._set_effective(now, rpm)
        self._ceiling_rpm = ceiling_rpm
        self._decreased_at_s = now
        self._accepted_since_decrease = False
        self._stale_outcomes = self._in_flight

    def _probe(self, now: float) -> None:
        current = self._effective_rpm
        if current is None or (self._rpm is not None and current >= self._rpm):
            return
        if now < self._paused_until_s:
            return
        # Within 2 % of it either way: above it, nothing says where the limit is.
        step_rpm, ceiling = current * PROBE_STEP, self._ceiling_rpm
        near_ceiling = ceiling * CEILING_FRACTION < step_rpm <= ceiling / CEILING_FRACTION
        interval_s = PROBE_NEAR_CEILING_INTERVAL_S if near_ceiling else PROBE_INTERVAL_S
        if now - self._last_rate_change_s < interval_s:
            return
        new_rpm = current * PROBE_STEP
        if self._rpm is not None:
            new_rpm = min(new_rpm, self._rpm)
        self._set_effective(now, new_rpm)
        self._last_rate_change_s = now

    def _set_effective(self, now: float, rpm: float) -> None:
        self._effective_rpm = rpm
        if self._requests is None:
            self._requests = _Gcra(now, rpm / SECONDS_PER_MINUTE)
        else:
            self._requests.set_rate(now, rpm / SECONDS_PER_MINUTE)

    def _apply_headers(self, now: float, info: RateLimitInfo) -> None:
        # What is in flight spends the remaining budget first: a new attempt would be refused.
        if (
            info.remaining_requests is not None
            and info.reset_requests_s is not None
            and info.remaining_requests <= self._in_flight
        ):
            self._pause(now, now + info.reset_requests_s)
        if (
            info.remaining_tokens is not None
            and info.reset_tokens_s is not None
            and info.remaining_tokens <= self._tokens_in_flight
        ):
            self._pause(now, now + info.reset_tokens_s)

    def _correct_tokens(
        self, outcome: Outcome, estimated_tokens: float, unreported_tokens: float = 0.0
    ) -> None:
        if self._tokens is None:
            return
        actual = _total_tokens(outcome)
        if actual is None:
            # No usage to go on: the estimate stands, and what it left out is charged on top
            # (a stream without include_usage and no max_tokens ran --tpm 20 times over).
            if unreported_tokens > 0:
                self._tokens.adjust(self._token_cost(unreported_tokens))
            return
        self._tokens.adjust(self._token_cost(actual) - self._token_cost(estimated_tokens))

    # -- pauses and the recent rates --------------------------------------------------------

    def _pause(self, now: float, until_s: float) -> None:
        until_s = min(until_s, now + MAX_WAIT_S)
        if until_s <= now or until_s <= self._paused_until_s:
            return
        if until_s - max(now, self._paused_until_s) >= LONG_PAUSE_S:
            # A daily or hourly quota: the run waits as asked, and says so (also with --quiet).
            wait_s = until_s - now
            at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=wait_s)
            log.warning(
                "the server asked to wait %s: nothing is sent until %s UTC"
                " (Ctrl-C stops the run; running it again resumes)",
                _duration(wait_s),
                at.strftime("%Y-%m-%d %H:%M:%S"),
            )
        if self._paused_until_s > now and self._pauses:
            start_s, _ = self._pauses[-1]
            self._pauses[-1] = (start_s, until_s)
        else:
            self._pauses.append((now, until_s))
        self._paused_until_s = until_s

    def _window_s(self) -> float:
        if self._effective_rpm is None:
            return ACCEPTED_WINDOW_S
        interval_s = SECONDS_PER_MINUTE / self._effective_rpm
        return max(ACCEPTED_WINDOW_S, ACCEPTED_WINDOW_REQUESTS * interval_s)

    def _forget_before(self, horizon_s: float) -> None:
        for times in (self._sent, self._refused):
            while times and times[0] < horizon_s:
                times.popleft()
        while self._pauses and self._pauses[0][1] < horizon_s:
            self._pauses.popleft()

    def _rates(self, now: float, known_until_s: float | None = None) -> _Rates:
        """What was sent and accepted in the recent window, per minute of time not paused.

        Attempts sent after `known_until_s` are left out: their 429s may still be on the way.
        """
        horizon_s = now - self._window_s()
        self._forget_before(horizon_s)
        end_s = now if known_until_s is None else min(now, max(known_until_s, horizon_s))
        start_s = horizon_s if self._started_s is None else max(horizon_s, self._started_s)
        paused_s = sum(
            max(0.0, min(until_s, end_s) - max(begin_s, start_s))
            for begin_s, until_s in self._pauses
        )
        per_minute = SECONDS_PER_MINUTE / max(end_s - start_s - paused_s, ACCEPTED_MIN_SPAN_S)
        sent = bisect.bisect_right(self._sent, end_s)
        accepted = max(0, sent - len(self._refused))
        return _Rates(
            accepted=accepted,
            accepted_rpm=accepted * per_minute,
            sent_rpm=sent * per_minute,
        )

    # -- run-time control and display -------------------------------------------------------

    def hold(self, seconds: float) -> None:
        """Pause acquires for `seconds` from now, as a 429 with that Retry-After would (another
        worker of the batch was told to wait); extends a pause, never shortens one."""
        if seconds > 0:
            now = self._clock()
            self._pause(now, now + seconds)

    def set_limits(self, rpm: float | None, tpm: float | None) -> None:
        """Change the limits while running (this process's share of the batch's limits).

        Calling it again with the same limits changes nothing. An effective rate lowered by 429s
        keeps its fraction of a new limit; dropping a configured request limit (`rpm=None`)
        drops request pacing along with what was learned under it.
        """
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        now = self._clock()
        old_rpm, old_effective = self._rpm, self._effective_rpm
        self._rpm = rpm
        if rpm is None:
            if old_rpm is not None:
                self._effective_rpm = None
                self._requests = None
        else:
            if old_rpm is None or old_effective is None:
                effective = rpm
            else:
                effective = min(rpm, old_effective * rpm / old_rpm)
            self._set_effective(now, max(effective, min(MIN_EFFECTIVE_RPM, rpm)))
        self._tpm = tpm
        if tpm is None:
            self._tokens = None
        elif self._tokens is None:
            self._tokens = _Gcra(now, tpm / SECONDS_PER_MINUTE)
        else:
            self._tokens.set_rate(now, tpm / SECONDS_PER_MINUTE)

    @property
    def rpm(self) -> float | None:
        """The request limit (this process's share of the batch's); None: none."""
        return self._rpm

    def snapshot(self) -> PacerStats:
        now = self._clock()
        return PacerStats(
            effective_rpm=self._effective_rpm,
            rpm=self._rpm,
            tpm=self._tpm,
            accepted_rpm=self._rates(now).accepted_rpm,
            pause_left_s=max(0.0, self._paused_until_s - now),
            rate_limited_count=self._rate_limited_count,
            in_flight=self._in_flight,
            outage_s=0.0 if self._outage_since_s is None else now - self._no_answer_since_s,
        )


def _duration(seconds: float) -> str:
    """`seconds` as a person reads it: "45 s", "12 min 5 s", "24 h 0 min"."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"
