"""The retry policy: what is retried, how often, after how long; and tenacity carrying it out."""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from batchrunner.outcome import Outcome, OutcomeKind
from batchrunner.retry import (
    RetryPolicy,
    call_with_retries,
    is_rate_limited,
    is_retryable,
)

SUCCESS = Outcome(OutcomeKind.SUCCESS, 200)
TIMEOUT = Outcome(OutcomeKind.RETRY, None, error_kind="timeout")
RESET = Outcome(OutcomeKind.RETRY, None, error_kind="connection")
BAD_JSON = Outcome(OutcomeKind.RETRY, 200, error_kind="bad_json")
BROKEN_STREAM = Outcome(OutcomeKind.RETRY, 200, error_kind="stream_broken")
SERVER_ERROR = Outcome(OutcomeKind.RETRY, 503, error_kind="server_error")
CONFLICT = Outcome(OutcomeKind.RETRY, 409, error_kind="http_409")
RATE_LIMIT = Outcome(OutcomeKind.RETRY, 429, error_kind="rate_limit")
RATE_LIMIT_WAIT = Outcome(OutcomeKind.RETRY, 429, error_kind="rate_limit", retry_after_s=7.5)
BAD_REQUEST = Outcome(OutcomeKind.FAIL_JOB, 400, error_kind="http_400")
NOT_FOUND = Outcome(OutcomeKind.FAIL_JOB, 404, error_kind="http_404")
AUTH = Outcome(OutcomeKind.STOP_RUN, 401, error_kind="auth")
QUOTA = Outcome(OutcomeKind.STOP_RUN, 429, error_kind="quota")


class Recorder:
    """An injected sleep: records each delay, sleeps not at all."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays.append(delay_s)


def script(*outcomes: Outcome) -> tuple[Callable[[int], Awaitable[Outcome]], list[int]]:
    """An attempt function answering the outcomes in turn (the last one forever), and the
    attempt numbers it was called with."""
    calls: list[int] = []

    async def attempt(number: int) -> Outcome:
        calls.append(number)
        return outcomes[min(len(calls), len(outcomes)) - 1]

    return attempt, calls


@pytest.mark.parametrize(
    ("outcome", "retried", "rate_limited"),
    [
        (SUCCESS, False, False),
        (TIMEOUT, True, False),
        (RESET, True, False),
        (BAD_JSON, True, False),
        (BROKEN_STREAM, True, False),
        (SERVER_ERROR, True, False),
        (CONFLICT, True, False),
        (RATE_LIMIT, True, True),
        (RATE_LIMIT_WAIT, True, True),
        (BAD_REQUEST, False, False),
        (NOT_FOUND, False, False),
        (AUTH, False, False),
        (QUOTA, False, False),
    ],
)
def test_what_is_retried(outcome: Outcome, retried: bool, rate_limited: bool) -> None:
    assert is_retryable(outcome) is retried
    assert is_rate_limited(outcome) is rate_limited
    assert RetryPolicy().should_retry(outcome, 1, int(rate_limited)) is retried


async def test_never_retried_outcomes_are_returned_after_one_attempt() -> None:
    for outcome in (SUCCESS, BAD_REQUEST, AUTH, QUOTA):
        attempt, calls = script(outcome)
        sleep = Recorder()
        assert await call_with_retries(RetryPolicy(), attempt, sleep=sleep) == (outcome, 1)
        assert calls == [1]
        assert sleep.delays == []


def test_attempts_cap() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry(TIMEOUT, 1, 0)
    assert policy.should_retry(TIMEOUT, 2, 0)
    assert not policy.should_retry(TIMEOUT, 3, 0)
    # Rate-limited attempts do not use up the attempts of other failures...
    assert policy.should_retry(TIMEOUT, 7, 5)
    assert not policy.should_retry(TIMEOUT, 8, 5)


def test_rate_limit_cap() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.rate_limit_cap == 12
    assert policy.should_retry(RATE_LIMIT, 11, 11)
    assert not policy.should_retry(RATE_LIMIT, 12, 12)
    # ...and other failures do not use up the rate-limited ones.
    assert policy.should_retry(RATE_LIMIT, 14, 11)
    explicit = RetryPolicy(max_attempts=3, rate_limit_attempts=2)
    assert explicit.should_retry(RATE_LIMIT, 1, 1)
    assert not explicit.should_retry(RATE_LIMIT, 2, 2)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_attempts": 0},
        {"rate_limit_attempts": 0},
        {"base_delay_s": -1.0},
        {"jitter_s": -0.1},
    ],
)
def test_policy_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**bad)  # type: ignore[arg-type]


def test_delays_grow_exponentially_and_are_capped() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=20.0, jitter_s=0.0)
    rng = random.Random(1)
    delays = [policy.delay_s(TIMEOUT, attempt, rng) for attempt in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0]
    assert policy.delay_s(TIMEOUT, 10_000, rng) == 20.0


def test_jitter_stays_within_its_range_and_varies() -> None:
    policy = RetryPolicy(base_delay_s=2.0, max_delay_s=60.0, jitter_s=1.0)
    rng = random.Random(7)
    delays = [policy.delay_s(SERVER_ERROR, 2, rng) for _ in range(200)]
    assert all(4.0 <= delay <= 5.0 for delay in delays)
    assert len(set(delays)) > 100


def test_retry_after_is_honoured() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=2.0, jitter_s=1.0)
    rng = random.Random(3)
    delays = [policy.delay_s(RATE_LIMIT_WAIT, attempt, rng) for attempt in range(1, 50)]
    # At least what the server asked for, even past max_delay_s; spread a little.
    assert all(7.5 <= delay <= 7.5 + 0.25 for delay in delays)
    assert len(set(delays)) > 40
    no_jitter = RetryPolicy(jitter_s=0.0)
    assert no_jitter.delay_s(RATE_LIMIT_WAIT, 1, rng) == 7.5


def test_a_server_errors_retry_after_is_the_least_wait() -> None:
    """A 503 with `Retry-After: 1` through an outage: honoured as given, every job's attempts
    were spent within seconds, before the run took it for an outage. After a server error the
    backoff still grows; the server's delay holds where it is longer."""
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=60.0, jitter_s=0.0)
    rng = random.Random(5)
    briefly = replace(SERVER_ERROR, retry_after_s=1.0)
    assert [policy.delay_s(briefly, n, rng) for n in range(1, 7)] == [1, 2, 4, 8, 16, 32]
    longer = replace(SERVER_ERROR, retry_after_s=10.0)
    assert [policy.delay_s(longer, n, rng) for n in range(1, 7)] == [10, 10, 10, 10, 16, 32]
    # A rate limit's delay is what the server asked for, whatever the attempt.
    limited = replace(RATE_LIMIT, retry_after_s=1.0)
    assert [policy.delay_s(limited, n, rng) for n in range(1, 7)] == [1.0] * 6


async def test_retries_until_success_with_backoff() -> None:
    attempt, calls = script(TIMEOUT, SERVER_ERROR, RESET, SUCCESS)
    sleep = Recorder()
    policy = RetryPolicy(base_delay_s=0.5, jitter_s=0.0)
    outcome, attempts = await call_with_retries(policy, attempt, sleep=sleep)
    assert (outcome, attempts) == (SUCCESS, 4)
    assert calls == [1, 2, 3, 4]
    assert sleep.delays == [0.5, 1.0, 2.0]


async def test_gives_up_after_max_attempts_with_the_last_outcome() -> None:
    attempt, calls = script(TIMEOUT, TIMEOUT, BAD_JSON)
    sleep = Recorder()
    policy = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=60.0, jitter_s=0.0)
    assert await call_with_retries(policy, attempt, sleep=sleep) == (BAD_JSON, 3)
    assert calls == [1, 2, 3]
    assert sleep.delays == [1.0, 2.0]


async def test_fails_at_once_on_a_bad_request_after_transient_errors() -> None:
    attempt, _ = script(SERVER_ERROR, BAD_REQUEST)
    sleep = Recorder()
    assert await call_with_retries(RetryPolicy(), attempt, sleep=sleep) == (BAD_REQUEST, 2)
    assert len(sleep.delays) == 1


async def test_rate_limits_have_their_own_cap() -> None:
    # More 429s than max_attempts, then success: a slow server must not fail the job.
    attempt, _ = script(*[RATE_LIMIT] * 7, TIMEOUT, SUCCESS)
    sleep = Recorder()
    policy = RetryPolicy(max_attempts=2, jitter_s=0.0, max_delay_s=4.0)
    assert await call_with_retries(policy, attempt, sleep=sleep) == (SUCCESS, 9)
    assert sleep.delays == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]


async def test_rate_limit_cap_reached() -> None:
    attempt, calls = script(RATE_LIMIT)
    sleep = Recorder()
    policy = RetryPolicy(max_attempts=2, rate_limit_attempts=5, jitter_s=0.0)
    assert await call_with_retries(policy, attempt, sleep=sleep) == (RATE_LIMIT, 5)
    assert calls == [1, 2, 3, 4, 5]


async def test_server_delay_reaches_the_sleep() -> None:
    attempt, _ = script(RATE_LIMIT_WAIT, RATE_LIMIT_WAIT, SUCCESS)
    sleep = Recorder()
    policy = RetryPolicy(jitter_s=0.0)
    assert await call_with_retries(policy, attempt, sleep=sleep) == (SUCCESS, 3)
    assert sleep.delays == [7.5, 7.5]


async def test_stop_run_ends_retrying() -> None:
    attempt, _ = script(RATE_LIMIT, QUOTA, SUCCESS)
    assert await call_with_retries(RetryPolicy(), attempt, sleep=Recorder()) == (QUOTA, 2)


async def test_seeded_rng_gives_repeatable_delays() -> None:
    runs = []
    for _ in range(2):
        attempt, _ = script(TIMEOUT, TIMEOUT, TIMEOUT, SUCCESS)
        sleep = Recorder()
        await call_with_retries(RetryPolicy(), attempt, sleep=sleep, rng=random.Random(42))
        runs.append(sleep.delays)
    assert runs[0] == runs[1]
    assert all(0 < a < b for a, b in itertools.pairwise(runs[0]))


async def test_exceptions_from_the_attempt_propagate() -> None:
    calls: list[int] = []

    async def attempt(number: int) -> Outcome:
        calls.append(number)
        if number == 2:
            raise KeyError("store gone")
        return TIMEOUT

    with pytest.raises(KeyError):
        await call_with_retries(RetryPolicy(), attempt, sleep=Recorder())
    assert calls == [1, 2]


async def test_a_first_attempt_made_already_is_not_made_again() -> None:
    # The dispatcher makes the first attempt itself and hands its outcome over only when it
    # is not a success: the count and the caps go on from it.
    attempt, calls = script(TIMEOUT, SUCCESS)
    sleep = Recorder()
    policy = RetryPolicy(base_delay_s=0.5, jitter_s=0.0)
    outcome = await call_with_retries(policy, attempt, sleep=sleep, first=RATE_LIMIT)
    assert outcome == (SUCCESS, 3)
    assert calls == [2, 3]
    assert sleep.delays == [0.5, 1.0]
    attempt, calls = script(RATE_LIMIT)
    policy = RetryPolicy(max_attempts=2, rate_limit_attempts=3, jitter_s=0.0)
    outcome = await call_with_retries(policy, attempt, sleep=Recorder(), first=RATE_LIMIT)
    assert outcome == (RATE_LIMIT, 3)
    assert calls == [2, 3]


async def test_a_first_attempt_that_ends_the_job_is_returned_as_it_is() -> None:
    attempt, calls = script(SUCCESS)
    outcome = await call_with_retries(RetryPolicy(), attempt, sleep=Recorder(), first=BAD_REQUEST)
    assert outcome == (BAD_REQUEST, 1)
    assert calls == []
