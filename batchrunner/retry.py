"""The retry policy: which outcomes are tried again, how often, and after how long.

The policy is plain data (`RetryPolicy`) with two questions it answers, `should_retry` and
`delay_s`, so it can be tested without sleeping; `call_with_retries` hands it to tenacity,
which only carries it out.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from batchrunner.outcome import Outcome, OutcomeKind

if TYPE_CHECKING:
    from tenacity import RetryCallState

#: How many rate-limited attempts a job may make for each attempt `max_attempts` allows,
#: when `rate_limit_attempts` is not set.
RATE_LIMIT_ATTEMPTS_FACTOR: Final = 4
#: The most jitter added on top of a server-given delay: enough to spread waiters that were
#: all told the same instant, small enough to keep the server's timing.
RETRY_AFTER_JITTER_S: Final = 0.25
#: Doubling stops here; `max_delay_s` caps the result anyway (this only avoids huge floats).
_MAX_EXPONENT: Final = 62


def is_retryable(outcome: Outcome) -> bool:
    """Whether the outcome is a transient failure worth another attempt at all."""
    return outcome.kind is OutcomeKind.RETRY


def is_rate_limited(outcome: Outcome) -> bool:
    """Whether the server refused the attempt because of its rate limit (a 429 that is not
    about quota: quota outcomes stop the run instead)."""
    return outcome.kind is OutcomeKind.RETRY and is_rate_limit(outcome.status, outcome.error_kind)


def is_rate_limit(status: int | None, error_kind: str | None) -> bool:
    """Whether an answer to try again (an outcome, or a logged attempt that did not stop its
    run) was the server's rate limit."""
    return status == 429 or error_kind == "rate_limit"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a transient failure is tried again."""

    #: Attempts a job may make that end in anything but a rate limit.
    max_attempts: int = 6
    #: Delay after the first failed attempt; it doubles with each further attempt...
    base_delay_s: float = 1.0
    #: ...up to this.
    max_delay_s: float = 60.0
    #: A random 0..jitter_s is added to each delay so that jobs that failed together do not
    #: all come back together.
    jitter_s: float = 1.0
    #: Attempts a job may make that end in a rate limit (429); None = 4 x max_attempts.
    #: A 429 says "slow down", not "this request is bad": it has its own, larger cap, so
    #: that a server limit lower than the configured rate never makes jobs fail.
    rate_limit_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.rate_limit_attempts is not None and self.rate_limit_attempts < 1:
            raise ValueError("rate_limit_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or self.jitter_s < 0:
            raise ValueError("delays must not be negative")

    @property
    def rate_limit_cap(self) -> int:
        """How many rate-limited attempts a job may make."""
        if self.rate_limit_attempts is not None:
            return self.rate_limit_attempts
        return RATE_LIMIT_ATTEMPTS_FACTOR * self.max_attempts

    def should_retry(self, outcome: Outcome, attempt: int, rate_limited_attempts: int) -> bool:
        """Whether to try again after `outcome`, the result of attempt number `attempt`
        (counting from 1); `rate_limited_attempts` of those attempts, this one included,
        ended in a rate limit."""
        if not is_retryable(outcome):
            return False
        if is_rate_limited(outcome):
            return rate_limited_attempts < self.rate_limit_cap
        return attempt - rate_limited_attempts < self.max_attempts

    def delay_s(self, outcome: Outcome, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after attempt number `attempt` (from 1) before the next one.

        The delay doubles with each attempt up to `max_delay_s`, plus 0..jitter_s. A delay the
        server asked for (`retry_after_s`) after a rate limit is honoured as given instead,
        plus a little jitter: the server knows when it will have room, the run's pacer
        already slows everyone down, and rate limits have an allowance of their own. After a
        server error it is the least wait: a 503 with `Retry-After: 1` through an outage had
        every job's attempts spent within seconds, before the run noticed the outage.
        """
        retry_after_s = outcome.retry_after_s
        if retry_after_s is not None and is_rate_limited(outcome):
            jitter_s = min(self.jitter_s, RETRY_AFTER_JITTER_S)
            return retry_after_s + rng.uniform(0.0, jitter_s)
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        backoff_s = min(self.max_delay_s, self.base_delay_s * 2.0**exponent)
        if retry_after_s is not None and retry_after_s > backoff_s:
            jitter_s = min(self.jitter_s, RETRY_AFTER_JITTER_S)
            return retry_after_s + rng.uniform(0.0, jitter_s)
        return backoff_s + rng.uniform(0.0, self.jitter_s)


async def call_with_retries(
    policy: RetryPolicy,
    attempt_fn: Callable[[int], Awaitable[Outcome]],
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    first: Outcome | None = None,
) -> tuple[Outcome, int]:
    """Calls `attempt_fn(attempt)` (attempt counts from 1) until the policy says stop.

    Returns the last outcome, whatever it is, and the number of attempts made. Exceptions
    from `attempt_fn` propagate unchanged. `first`: the outcome of attempt 1, made already.
    """
    # Most requests succeed the first time: answer those without setting up tenacity (which
    # costs more per call than the rest of the dispatcher's bookkeeping) or the counting
    # wrapper below.
    if first is None:
        first = await attempt_fn(1)
    attempts = 1
    rate_limited = 1 if is_rate_limited(first) else 0
    if not policy.should_retry(first, attempts, rate_limited):
        return first, attempts

    async def attempt() -> Outcome:
        nonlocal attempts, rate_limited
        attempts += 1
        outcome = await attempt_fn(attempts)
        if is_rate_limited(outcome):
            rate_limited += 1
        return outcome

    # Imported here: most runs never retry, and start-up is part of every run.
    from tenacity import AsyncRetrying

    pending: list[Outcome] = [first]

    async def next_attempt() -> Outcome:
        # Tenacity's first call is the attempt already made above.
        if pending:
            return pending.pop()
        return await attempt()

    def last(state: RetryCallState) -> Outcome:
        assert state.outcome is not None
        result: Outcome = state.outcome.result()
        return result

    def wants_retry(state: RetryCallState) -> bool:
        assert state.outcome is not None
        return not state.outcome.failed and is_retryable(last(state))

    def stop(state: RetryCallState) -> bool:
        return not policy.should_retry(last(state), attempts, rate_limited)

    chosen_rng = rng if rng is not None else random.Random()

    def wait(state: RetryCallState) -> float:
        return policy.delay_s(last(state), attempts, chosen_rng)

    retrying = AsyncRetrying(
        sleep=sleep,
        retry=wants_retry,
        stop=stop,
        wait=wait,
        reraise=True,
        # When the policy says stop, the last outcome is the answer, not an error.
        retry_error_callback=last,
    )
    outcome: Outcome = await retrying(next_attempt)
    return outcome, attempts
