"""What one HTTP attempt came to: the value the client returns and the retry policy,
pacer and dispatcher act on."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

#: The longest wait a server may ask for that is taken as asked (a daily quota); a longer one
#: is read as this long. (99999999999999999999999 s broke the pacer's arithmetic and the run.)
MAX_WAIT_S: Final = 86_400.0


class OutcomeKind(enum.Enum):
    #: 200 with a valid chat completion: the job succeeded.
    SUCCESS = "success"
    #: A transient failure (timeout, reset, 408/409/429/5xx, bad JSON): try again.
    RETRY = "retry"
    #: The request itself is wrong (400/404/422, other 4xx): the job fails at once.
    FAIL_JOB = "fail_job"
    #: No request can succeed (401/403 bad key, 402/insufficient_quota): stop the run.
    STOP_RUN = "stop_run"


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What the server said about its limits in `x-ratelimit-*` headers."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    #: Seconds until the request / token windows are full again.
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


# Not frozen: one is made for every request, and a frozen dataclass's __init__ (a call to
# object.__setattr__ per field) costs three times as much. Treat it as read-only all the same.
@dataclass(slots=True)
class Outcome:
    """One HTTP attempt, classified."""

    kind: OutcomeKind
    #: HTTP status, None when no answer came (timeout, reset).
    status: int | None
    #: Short machine-readable reason: "timeout", "connection", "bad_json", "not_completion",
    #: "stream_broken", "rate_limit", "server_error", "http_400", "auth", "quota", ...
    error_kind: str | None = None
    #: Human-readable reason, never containing the API key.
    message: str | None = None
    #: The completion object as text (as received; for streams, the reassembled object),
    #: or the error body for failures.
    body: str | None = None
    #: The parsed completion, for SUCCESS.
    completion: dict[str, Any] | None = None
    request_id: str | None = None
    latency_s: float = 0.0
    #: Server-given delay before the next attempt (Retry-After / retry-after-ms).
    retry_after_s: float | None = None
    ratelimit: RateLimitInfo | None = None
