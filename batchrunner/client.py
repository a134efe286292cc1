"""The HTTP client: one request in, one `Outcome` out.

Owns the aiohttp session, the classification of every answer (or lack of one) into an
`Outcome` as the README's table of answers draws it, the parsing of `Retry-After` and
`x-ratelimit-*` headers, and the reassembly of a streamed answer (server-sent events) into
one `chat.completion` object (`StreamAssembler`, pure and usable without a server).

This is the dispatcher's hot path: one session for the whole run, headers built once,
orjson for parsing, and no work on a successful answer beyond what it needs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import email.utils
import io
import ipaddress
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, TypeAlias, cast, overload
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from batchrunner import __version__
from batchrunner.config import without_credentials
from batchrunner.errors import UsageError
from batchrunner.outcome import MAX_WAIT_S, Outcome, OutcomeKind, RateLimitInfo
from batchrunner.states import kept_text

#: Larger request bodies (base64 images, files) go to aiohttp as a stream, which it writes in
#: pieces; raw bytes above 1 MiB make it warn (ResourceWarning) and copy them whole.
STREAMED_BODY_BYTES: Final = 1 << 20
#: How long what a stream sends after `data: [DONE]` is read for (its end, as a rule).
AFTER_DONE_S: Final = 1.0

#: The longest response header line read: aiohttp's default (8190 bytes) turned answers with
#: a long debug or trace header into connection errors, retried and paid for again.
MAX_HEADER_BYTES: Final = 64 * 1024

#: Response headers: a case-insensitive mapping such as aiohttp's `response.headers`.
Headers: TypeAlias = Mapping[str, str]

USER_AGENT: Final = f"batchrunner/{__version__}"

#: glibc's malloc settings for a run (`keep_read_buffers_on_the_heap`): blocks up to 1 MiB come
#: from the heap, and up to 8 MiB of free heap is kept for the next ones.
MALLOC_MMAP_THRESHOLD_BYTES: Final = 1 << 20
MALLOC_TRIM_THRESHOLD_BYTES: Final = 8 << 20
_M_TRIM_THRESHOLD: Final = -1  # mallopt(3)'s parameter numbers (malloc.h)
_M_MMAP_THRESHOLD: Final = -3

#: How much of an unparsable error body goes into an Outcome message.
MESSAGE_BODY_CHARS: Final = 300

_SCRUBBED: Final = "***"
_QUOTA: Final = "insufficient_quota"
#: Codes and types of an error that says the account cannot pay, whatever its status: OpenAI's,
#: DeepSeek's, LiteLLM's proxy budget (400), OpenAI's billing limit and inactive billing (a
#: 429, for weeks), Moonshot's (a 429 for a suspended balance), one-api gateways' quota.
_NO_BALANCE: Final = frozenset(
    {
        _QUOTA,
        "insufficient_balance",
        "budget_exceeded",
        "billing_hard_limit_reached",
        "billing_not_active",
        "exceeded_current_quota_error",
        "insufficient_user_quota",
    }
)
#: ...and the words of one that has no such code: Anthropic's (a 400 invalid_request_error),
#: OpenRouter's (a 402, which a proxy may send with a Retry-After), xAI's (a 429: "has either
#: used all available credits or reached its monthly spending limit"), Gemini's (a 429: "has
#: exceeded its monthly spending cap").
_NO_BALANCE_WORDS: Final = (
    "credit balance is too low",
    "insufficient credits",
    "used all available credits",
    "monthly spending limit",
    "monthly spending cap",
)
#: Google's error details name a key refused, whatever the status (Gemini answers a bad key
#: with a 400: "API key not valid", reason API_KEY_INVALID).
_KEY_REASON_PREFIX: Final = "API_KEY_"
#: A Google RetryInfo delay: a protobuf duration, "39043s", "45.8s".
_PROTO_DURATION = re.compile(r"(\d+(?:\.\d*)?)s")
#: A delay given only in an error's message, as a duration with its units: Gemini's ("Please
#: retry in 10h50m43.6s."), and OpenAI's for its token and daily limits, which send no
#: Retry-After ("Please try again in 6m0s."). ("in 1 minute" is none: read as 1 s, a job spent
#: its attempts within seconds.)
_RETRY_IN = re.compile(
    r"[Pp]lease (retry|try again) in ((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|us|µs|ns|h|m|s))+)"
    r"\.?(?=[\s,;)]|$)"
)
#: OpenAI's delay is honoured from this long. Under its per-minute limits it says "20ms" or
#: "1.2s", its guess for this request alone: taken as given, a run hammered the limit (4,777
#: requests and 199 of 200 jobs failed where the run's own backoff sent 409 and failed none).
#: Longer (a daily limit), the backoff would spend every job's attempts before the reset.
_TRY_AGAIN_MIN_S: Final = 60.0
#: 4xx answers that say "not now" rather than "never": request timeout, conflict, too early
#: (RFC 8470 asks for the request again), Groq's flex tier out of capacity (498), and 499, a
#: request cancelled on the way (Gemini's `CANCELLED`, nginx's client closed request): this
#: client cancelled nothing.
_RETRY_4XX: Final = frozenset({408, 409, 425, 498, 499})
#: 5xx answers that say "never": not implemented (a gateway without the endpoint or the
#: feature asked for), HTTP version not supported. Sending the same request again cannot help.
_NEVER_5XX: Final = frozenset({501, 505})
#: "v1", "v1beta", ... as the first segment of an endpoint.
_VERSION_PREFIX = re.compile(r"v\d+[a-z0-9]*(?=/|$)")
#: A Go-style duration as OpenAI writes reset times: "1s", "6m0s", "20ms", "2h3m4.5s".
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|us|µs|ns|h|m|s))+")
_DURATION_UNIT_S: Final = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


# --- URLs -------------------------------------------------------------------------------


def join_url(base_url: str, endpoint: str) -> str:
    """The URL an `endpoint` such as `/v1/chat/completions` has under `base_url`.

    The endpoint's version prefix is dropped, because the base URL carries its own
    (`https://gw.example/api/v1` + `/v1/chat/completions` ->
    `https://gw.example/api/v1/chat/completions`), as the OpenAI SDKs do.
    """
    path = endpoint.strip().lstrip("/")
    match = _VERSION_PREFIX.match(path)
    if match is not None:
        path = path[match.end() :]
    path = path.strip("/")
    # On the base URL's path, so that a query it carries (`?api-version=...`) stays a query.
    try:
        parts = urlsplit(base_url.strip())
    except ValueError:
        # Not a URL at all: sending to it fails the job with the client's own words.
        return f"{base_url.strip().rstrip('/')}/{path}"
    base_path = parts.path.rstrip("/")
    return urlunsplit(parts._replace(path=f"{base_path}/{path}" if path else base_path))


def is_loopback(base_url: str) -> bool:
    """True when `base_url` names this machine (localhost or a loopback address)."""
    host = (urlsplit(base_url.strip()).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_for(base_url: str) -> tuple[str | None, dict[str, str] | None]:
    """The proxy the environment names for `base_url` (`HTTPS_PROXY` / `HTTP_PROXY`, else
    `ALL_PROXY`, upper or lower case, unless `NO_PROXY` leaves the host out), and its
    credentials as the header that carries them to it; none for this machine's own addresses.
    Read once per run, not per request (aiohttp's trust_env would look it up, and the netrc
    file, on every request)."""
    try:
        if is_loopback(base_url):
            return None, None
        parts = urlsplit(base_url.strip())
        port = parts.port
    except ValueError:  # an unclosed [IPv6 bracket: each request fails on it (invalid_url)
        return None, None
    proxies = urllib.request.getproxies_environment()
    scheme = parts.scheme.lower()
    if not parts.hostname or _no_proxy(parts.hostname, port or _PORTS.get(scheme), proxies):
        return None, None
    named = wanted = "HTTPS_PROXY" if scheme == "https" else "HTTP_PROXY"
    proxy = proxies.get(scheme)
    if not proxy and proxies.get("all"):
        named, proxy = "ALL_PROXY", proxies["all"]
    if not proxy:
        return None, None
    try:
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        p.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        p = None
    if p is None or p.scheme.lower() not in ("http", "https") or not p.hostname:
        raise UsageError(
            f"the proxy {named} names is not an http:// or https:// URL (SOCKS proxies are not"
            f" supported): {without_credentials(proxy)!r}; name an http proxy in {wanted}, or"
            f" leave the API's host out with NO_PROXY"
        )
    headers = None
    if p.username is not None:
        user, password = urllib.parse.unquote(p.username), urllib.parse.unquote(p.password or "")
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers = {"Proxy-Authorization": f"Basic {credentials}"}
    netloc = p.netloc.rpartition("@")[2]
    return urlunsplit((p.scheme, netloc, p.path, "", "")), headers


_PORTS: Final = {"http": 80, "https": 443}
#: A proxy password shorter than this is a word of error pages too: its user and password
#: together, and their header, are taken out of errors all the same.
_PROXY_PASSWORD_MIN_CHARS: Final = 8


def _proxy_secrets(headers: dict[str, str] | None) -> list[str]:
    """The proxy's credentials as `proxy_for` made them a header: the header's value, and
    `user:password` and the password it encodes."""
    if not headers or "Proxy-Authorization" not in headers:
        return []
    encoded = headers["Proxy-Authorization"].removeprefix("Basic ")
    user_password = base64.b64decode(encoded).decode()
    password = user_password.partition(":")[2]
    if not password:
        return [encoded]
    secrets = [encoded, user_password]
    if len(password) >= _PROXY_PASSWORD_MIN_CHARS:
        secrets.append(password)
    return secrets


def _no_proxy(host: str, port: int | None, proxies: Mapping[str, str]) -> bool:
    """Whether `NO_PROXY` leaves `host` out: by name or domain (`.example.com`, `*`), by name
    and port (`example.com:8443`), or by address range (`10.0.0.0/8`) for an address."""
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # untyped
    if bypass(host, proxies) or (port and bypass(f"{host}:{port}", proxies)):
        return True
    if ":" in host and port and bypass(f"[{host}]:{port}", proxies):
        return True  # (`[2001:db8::5]:8443`)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in proxies.get("no", "").split(","):
        try:
            network = ipaddress.ip_network(entry.strip().strip("[]"), strict=False)
        except ValueError:
            continue
        if address in network:
            return True
    return False


_PROXY_NAMED: Final = " (HTTPS_PROXY / HTTP_PROXY / ALL_PROXY name it, with its user and password)"


def is_insecure(base_url: str) -> bool:
    """True when a key sent to `base_url` would cross the network in clear text:
    plain http to a host that is not this machine's loopback."""
    return urlsplit(base_url.strip()).scheme.lower() == "http" and not is_loopback(base_url)


# --- headers ----------------------------------------------------------------------------


def parse_duration_s(text: str) -> float | None:
    """Seconds in a reset header: plain seconds ("2", "0.5") or a Go-style duration
    ("1s", "6m0s", "20ms", "2h3m4.5s") as OpenAI sends; None when unreadable."""
    text = text.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        if _DURATION.fullmatch(text) is None:
            return None
        seconds = sum(
            float(number) * _DURATION_UNIT_S[unit] for number, unit in _DURATION_PART.findall(text)
        )
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def parse_retry_after_s(headers: Headers) -> float | None:
    """The server's requested delay: `retry-after-ms` (finer, preferred) or `Retry-After`
    as seconds or an HTTP-date; None when absent or unreadable, and when it asks for no wait
    at all (0, a date already past): a server that refuses and says "now" has said nothing
    about when, and taken at its word it drew a storm of attempts that failed their jobs."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000.0
        except ValueError:
            pass
        else:
            if math.isfinite(value) and value > 0:
                return min(value, MAX_WAIT_S)
    text = headers.get("retry-after")
    if text is None:
        return None
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            # HTTP-dates are always GMT, even when a server leaves the zone out.
            when = when.replace(tzinfo=datetime.UTC)
        # An HTTP-date is wall-clock time by definition.
        wait_s = when.timestamp() - time.time()
        return min(wait_s, MAX_WAIT_S) if wait_s > 0 else None
    if not math.isfinite(value) or value <= 0:
        return None
    return min(value, MAX_WAIT_S)


#: Keys shorter than this are scrubbed only as sent: a short derived form (base64 of a few
#: bytes) could stand for other text.
_MIN_DERIVED_FORM_CHARS: Final = 8
#: Keys at least this long are taken out of answers and request ids too (`_Scrubber.answer`).
_KEYLIKE_CHARS: Final = 16


def _request_id(headers: Headers) -> str | None:
    return kept_text(headers.get("x-request-id") or headers.get("request-id"))


def _int_header(headers: Headers, name: str) -> int | None:
    text = headers.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if math.isfinite(value) else None


def _duration_header(headers: Headers, name: str) -> float | None:
    text = headers.get(name)
    return None if text is None else parse_duration_s(text)


#: A reset header's number past these is a point in time, not a duration: Unix epoch
#: milliseconds (OpenRouter's `X-RateLimit-Reset`), else epoch seconds.
_EPOCH_MS_FROM: Final = 1e12
_EPOCH_S_FROM: Final = 1e9
#: Below the epochs, a duration in seconds of at most a day (the longest limit's window);
#: a number between says nothing sure (milliseconds until? a pause of weeks for a minute's).
_LONGEST_RESET_S: Final = 86_400.0


def _reset_header(headers: Headers, name: str) -> float | None:
    """Seconds until the time a generic reset header names: a duration, or a Unix time in
    seconds or milliseconds (one already past: 0); None when it is neither for sure."""
    seconds = _duration_header(headers, name)
    if seconds is None or seconds <= _LONGEST_RESET_S:
        return seconds
    if seconds < _EPOCH_S_FROM:
        return None
    at_s = seconds / 1000.0 if seconds >= _EPOCH_MS_FROM else seconds
    return max(0.0, at_s - time.time())


def parse_ratelimit(headers: Headers) -> RateLimitInfo | None:
    """The `x-ratelimit-*` headers, or None when the server sent none of them."""
    for name in _RATELIMIT_HEADERS:
        if name in headers:
            break
    else:
        # Local servers and many gateways send none: no parsing, no object, on every answer.
        return None
    remaining_requests = _int_header(headers, "x-ratelimit-remaining-requests")
    reset_requests_s = _duration_header(headers, "x-ratelimit-reset-requests")
    if remaining_requests is None and reset_requests_s is None:
        # Without the kind in the name (OpenRouter's daily cap of free requests): requests.
        remaining_requests = _int_header(headers, "x-ratelimit-remaining")
        reset_requests_s = _reset_header(headers, "x-ratelimit-reset")
    info = RateLimitInfo(
        limit_requests=_int_header(headers, "x-ratelimit-limit-requests"),
        limit_tokens=_int_header(headers, "x-ratelimit-limit-tokens"),
        remaining_requests=remaining_requests,
        remaining_tokens=_int_header(headers, "x-ratelimit-remaining-tokens"),
        reset_requests_s=reset_requests_s,
        reset_tokens_s=_duration_header(headers, "x-ratelimit-reset-tokens"),
    )
    return None if info == _NO_RATELIMIT else info


_NO_RATELIMIT: Final = RateLimitInfo()
_RATELIMIT_HEADERS: Final = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)


# --- answers ----------------------------------------------------------------------------


def is_completion(value: object) -> bool:
    """Whether a parsed answer is a chat completion (and not an error or another object):
    one choice at least, each an object with its message or its finish_reason (`"choices":
    []`, or `[null]`, is no answer)."""
    if type(value) is not dict:
        return False
    choices = value.get("choices")
    if type(choices) is not list or not choices:
        return False
    # (A loop, not all() over a generator: this runs for every answer.)
    for choice in choices:
        if type(choice) is not dict or (
            type(choice.get("message")) is not dict and type(choice.get("finish_reason")) is not str
        ):
            return False
    return value.get("object", "chat.completion") in ("chat.completion", None)


def _refused_whole(value: object) -> bool:
    """An answer with no choice at all that says it was processed: usage counted, or the
    prompt's feedback (Gemini's blockReason) given."""
    if type(value) is not dict or value.get("choices") != []:
        return False
    return any(value.get(key) for key in ("usage", "prompt_feedback", "promptFeedback"))


def _error_of(value: object) -> dict[str, Any] | None:
    """The `error` object of an error answer, in the shapes gateways send it."""
    if isinstance(value, list) and value:
        # Some gateways wrap the error object in a one-element list.
        value = value[0]
    if not isinstance(value, dict):
        return None
    error = value.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    if "message" in value and ("code" in value or "type" in value):
        return value
    return None


def _says_quota(error: dict[str, Any] | None) -> bool:
    """Whether an error says the account cannot pay: the run stops, the jobs stay pending
    (failing them all at full speed would fail the whole batch)."""
    if error is None:
        return False
    code, kind = error.get("code"), error.get("type")
    # (isinstance: a server may send an object as the code, which no set can look up.)
    if (isinstance(code, str) and code in _NO_BALANCE) or (
        isinstance(kind, str) and kind in _NO_BALANCE
    ):
        return True
    message = error.get("message")
    return isinstance(message, str) and any(w in message.lower() for w in _NO_BALANCE_WORDS)


def _says_bad_key(error: dict[str, Any] | None) -> bool:
    """Whether an error's details say the key was refused (Google's ErrorInfo reason)."""
    details = None if error is None else error.get("details")
    return isinstance(details, list) and any(
        isinstance(d, dict)
        and isinstance(d.get("reason"), str)
        and d["reason"].startswith(_KEY_REASON_PREFIX)
        for d in details
    )


def _says_flagged(error: dict[str, Any] | None) -> bool:
    """Whether a 403 refused this request's content, not the key: OpenRouter's moderation
    ("your input was flagged", with the reasons and the flagged input in `metadata`)."""
    if error is None:
        return False
    metadata = error.get("metadata")
    if isinstance(metadata, dict) and "flagged_input" in metadata:
        return True
    message = error.get("message")
    return isinstance(message, str) and "input was flagged" in message


def _retry_delay_s(error: dict[str, Any] | None) -> float | None:
    """A delay asked for in the error body, where no header gives one: Gemini's RetryInfo
    (`details[].retryDelay`), or its message's "Please retry in 20.5s."."""
    if error is None:
        return None
    details = error.get("details")
    if isinstance(details, list):
        for detail in details:
            delay = detail.get("retryDelay") if isinstance(detail, dict) else None
            if isinstance(delay, str) and (match := _PROTO_DURATION.fullmatch(delay.strip())):
                seconds = float(match[1])
                return min(seconds, MAX_WAIT_S) if seconds > 0 and math.isfinite(seconds) else None
    message = error.get("message")
    if isinstance(message, str) and (match := _RETRY_IN.search(message)):
        said = parse_duration_s(match[2])
        if not said or (match[1] == "try again" and said < _TRY_AGAIN_MIN_S):
            return None
        return min(said, MAX_WAIT_S)
    return None


def _choice_error(error: object, finish_reason: object) -> dict[str, Any] | None:
    """The error a choice of a 2xx completion ended with, given its `error` and
    `finish_reason`: OpenRouter ends a choice whose generation failed with `finish_reason:
    "error"` and the error beside it."""
    if isinstance(error, dict):
        return error
    if finish_reason == "error":
        return {"message": "a choice ended in an error"}
    return None


def _choice_outcome(
    error: dict[str, Any],
    status: int,
    body: str,
    completion: dict[str, Any],
    request_id: str | None,
    latency_s: float,
    ratelimit: RateLimitInfo | None,
    scrub: _Scrubber,
) -> Outcome:
    """The outcome of an answer a choice of which ended in `error` (`_by_choice_error`)."""
    kind, error_kind = _by_choice_error(error)
    return Outcome(
        kind,
        status,
        error_kind=error_kind,
        message=scrub(_error_message(error) or "a choice failed"),
        body=body,
        # What it used was paid for (dispatcher._PAID_FOR).
        completion=completion,
        request_id=request_id,
        latency_s=latency_s,
        ratelimit=ratelimit,
    )


def _by_choice_error(error: dict[str, Any]) -> tuple[OutcomeKind, str]:
    """What a choice that ended in an error does: failed at once where its code says the
    request cannot succeed (a 400), else retried. Its code is the upstream provider's, not
    about this run's key or balance: it never stops the run."""
    kind, error_kind = _in_band(error, "choice_error")
    if kind is OutcomeKind.STOP_RUN or error_kind == "rate_limit":
        return OutcomeKind.RETRY, "choice_error"
    return kind, error_kind


def _says_rate_limit(error: dict[str, Any] | None) -> bool:
    """Whether an error inside a 2xx answer or a stream is a rate limit (OpenRouter sends
    429s there once a stream has begun)."""
    if error is None:
        return False
    code = error.get("code")
    return code == 429 or code == "429" or code == "rate_limit_exceeded"


def _says_too_large(error: dict[str, Any] | None) -> bool:
    """Whether a 429 says this request is larger than the whole limit (OpenAI: "Request too
    large for gpt-4o ... on tokens per min (TPM): Limit 30000, Requested 31538"): waiting
    cannot help."""
    message = None if error is None else error.get("message")
    return isinstance(message, str) and message.startswith("Request too large")


def _error_message(error: dict[str, Any] | None) -> str | None:
    if error is None:
        return None
    message = error.get("message")
    if isinstance(message, str) and message:
        return message
    return None


class _Scrubber:
    """Removes the API key from text that may end up in a database or a log: as sent, and in
    the forms a server that echoes it may give it back in (`_forms_of`); and `others`, a
    proxy's credentials, from errors (a proxy's page that echoes the request it refused)."""

    __slots__ = ("_answer_forms", "_forms")

    def __init__(self, secret: str | None, others: Iterable[str] = ()) -> None:
        key_forms = _forms_of(secret) if secret else ()
        forms = {*key_forms}
        for other in others:
            forms.update(_forms_of(other))
        self._forms = _Forms(forms)
        # A key like `ollama`, `EMPTY` or `x` (local servers take any) is a word of answers
        # too: scrubbed from answers, it made "Use *** to run llama3" and field names such
        # as "inde***".
        keylike = secret is not None and len(secret) >= _KEYLIKE_CHARS
        self._answer_forms = _Forms(key_forms if keylike else ())

    def answer(self, text: str) -> str:
        """`text`, an answer's or a request id, with a key-like key taken out."""
        return self._answer_forms.out_of(text)

    @overload
    def __call__(self, text: str) -> str: ...
    @overload
    def __call__(self, text: None) -> None: ...
    def __call__(self, text: str | None) -> str | None:
        return None if text is None else self._forms.out_of(text)


class _Forms:
    """Forms of secrets, longest first, so that no form is left half replaced; those written
    with `\\u` escapes are looked for only in text that holds a backslash (looked for on
    every answer, they doubled the time the look took; a backslash is found at once, where
    looking for `\\u` took as long as for a whole form)."""

    __slots__ = ("_escaped", "_plain")

    def __init__(self, forms: Iterable[str]) -> None:
        ordered = sorted(set(forms), key=len, reverse=True)
        self._escaped = tuple(f for f in ordered if "\\u" in f)
        self._plain = tuple(f for f in ordered if "\\u" not in f)

    def out_of(self, text: str) -> str:
        if self._escaped and "\\" in text:
            text = _without(text, self._escaped)
        return _without(text, self._plain)


def _without(text: str, forms: tuple[str, ...]) -> str:
    for form in forms:
        if form in text:
            text = text.replace(form, _SCRUBBED)
    return text


#: What Gson escapes in a JSON string beyond what JSON needs (the `"` and `\\` are escaped
#: already), and a percent-encoded byte.
_GSON_ESCAPED: Final = re.compile(r"[<>&='\u2028\u2029]")
_PERCENT_HEX: Final = re.compile(r"%[0-9A-F]{2}")


def _forms_of(secret: str) -> tuple[str, ...]:
    """The key as sent, and as text that quotes it: in a JSON string (a key with `/` or `"`
    comes back escaped: `\\/`; every character as `\\u` and four hex digits; `=` and `<>&'`
    so, as Gson writes them), percent-encoded (with either case of hex digits, `/` left or
    encoded), and in base64 wherever it sits in what was encoded (the "Bearer ..." header, a
    JSON of the request's headers): its encoding from each of the three byte offsets, less the
    characters that hang on the bytes around it. Longest first, so that no form is left half
    replaced."""
    forms = {secret}
    if len(secret) >= _MIN_DERIVED_FORM_CHARS:
        in_json = orjson.dumps(secret).decode()[1:-1]
        percent = urllib.parse.quote(secret, safe="")
        forms |= {
            in_json,
            in_json.replace("/", "\\/"),
            _GSON_ESCAPED.sub(lambda m: f"\\u{ord(m[0]):04x}", in_json),
            "".join(f"\\u{ord(c):04x}" for c in secret),
            "".join(f"\\u{ord(c):04X}" for c in secret),
            percent,
            _PERCENT_HEX.sub(lambda m: m[0].lower(), percent),
            urllib.parse.quote(secret),
        }
        raw = secret.encode()
        for offset, hanging in ((0, 0), (1, 2), (2, 3)):
            total = offset + len(raw)
            decided = total // 3 * 4 + total % 3  # the characters no byte after changes
            forms.add(base64.b64encode(b"\0" * offset + raw).decode()[hanging:decided])
    return tuple(sorted(forms, key=len, reverse=True))


def _classify(
    status: int,
    reason: str | None,
    headers: Headers,
    raw: bytes,
    latency_s: float,
    scrub: _Scrubber | None = None,
) -> Outcome:
    """The Outcome of a complete, non-streamed answer."""
    scrub = scrub or _NO_SCRUB
    request_id = _scrubbed_id(headers, scrub)
    ratelimit = parse_ratelimit(headers)
    parsed: object = None
    parse_error: str | None = None
    #: The answer's text where it is not `raw` as received (see `loads_lenient`).
    mended: str | None = None
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        lenient = loads_lenient(raw)
        if lenient is None:
            parse_error = str(exc)
        else:
            parsed, mended = lenient

    if 200 <= status < 300:
        if parse_error is None and is_completion(parsed):
            assert isinstance(parsed, dict)
            # orjson has already checked that `raw` is valid UTF-8
            text = raw.decode() if mended is None else mended
            body = scrub.answer(text)
            if body is not text:
                # What is kept, and what the run reads of it (the model's name), alike.
                parsed = orjson.loads(body)
                assert isinstance(parsed, dict)
            for choice in parsed["choices"]:
                if type(choice) is dict and (
                    choice_error := _choice_error(choice.get("error"), choice.get("finish_reason"))
                ):
                    return _choice_outcome(
                        choice_error, status, body, parsed, request_id, latency_s, ratelimit, scrub
                    )
            return Outcome(
                OutcomeKind.SUCCESS,
                status,
                body=body,
                completion=parsed,
                request_id=request_id,
                latency_s=latency_s,
                ratelimit=ratelimit,
            )
        text = raw.decode(errors="replace")
        if parse_error is not None:
            return Outcome(
                OutcomeKind.RETRY,
                status,
                error_kind="bad_json",
                message=f"answer is not valid JSON ({parse_error})",
                body=scrub(text),
                request_id=request_id,
                latency_s=latency_s,
                ratelimit=ratelimit,
            )
        error = _error_of(parsed)
        if _says_quota(error) or (error is not None and _status_of(error) == 402):
            return _quota(status, error, text, request_id, latency_s, ratelimit, scrub)
        message = _error_message(error) or (
            "the answer holds no choice with a message"
            if type(parsed) is dict and type(parsed.get("choices")) is list
            else "answer is not a chat completion"
        )
        kind, error_kind = _in_band(error, "not_completion")
        if error is None and _refused_whole(parsed):
            # Billed and answered with nothing (a prompt the provider blocks): the same again
            # on every attempt, each paid for.
            kind, error_kind = OutcomeKind.FAIL_JOB, "no_choice"
        return Outcome(
            kind,
            status,
            error_kind=error_kind,
            message=scrub(message),
            body=scrub(text),
            # Its usage, where it says what it was billed (the run counts it as spent).
            completion=_with_usage(parsed),
            request_id=request_id,
            latency_s=latency_s,
            retry_after_s=parse_retry_after_s(headers) if kind is OutcomeKind.RETRY else None,
            ratelimit=ratelimit,
        )

    text = raw.decode(errors="replace")
    error = _error_of(parsed)
    retry_after_s = parse_retry_after_s(headers)
    if retry_after_s is None and status in (429, 503):
        retry_after_s = _retry_delay_s(error)
    if _says_quota(error) or (status == 402 and retry_after_s is None):
        return _quota(status, error, text, request_id, latency_s, ratelimit, scrub)
    # (The key out before the fallback cuts the text: a key across the cut kept all but its
    # last characters, which no form of it matched.)
    text = scrub(text)
    message = _error_message(error) or _fallback_message(status, reason, text)
    kind, error_kind = _by_status(status, error)
    if error_kind == "proxy":
        message = f"a proxy refused the way to the API: {message}{_PROXY_NAMED}"
    if error_kind == "redirect":
        # The same for every request: the base URL is wrong (http for https, a path
        # missing). The page a redirect carries says nothing; where it points does.
        head = _status_line(status, reason)
        location = headers.get("location")
        to = f" to {kept_text(location)}" if location else ""
        message = (
            f"the API redirects{to} ({head}): fix the base URL (run --base-url);"
            " redirects are not followed, so that the request stays a POST and the key goes"
            " to no other host"
        )
    return Outcome(
        kind,
        status,
        error_kind=error_kind,
        message=scrub(message),
        body=None if error_kind == "redirect" else text,
        request_id=request_id,
        latency_s=latency_s,
        retry_after_s=retry_after_s if kind is OutcomeKind.RETRY else None,
        ratelimit=ratelimit,
    )


def _by_status(status: int, error: dict[str, Any] | None) -> tuple[OutcomeKind, str]:
    """What an error answer with HTTP status `status` does (a 402 or an error saying the
    account cannot pay is told apart before: see `_quota`), and its error kind."""
    if status == 407:
        # Only a proxy asks for its credentials (for a plain-http API it answers as the API
        # would; for https, its refused CONNECT: ApiClient.send): no request gets through.
        return OutcomeKind.STOP_RUN, "proxy"
    if status == 403 and _says_flagged(error):
        return OutcomeKind.FAIL_JOB, "flagged"
    if status in (401, 403) or _says_bad_key(error):
        return OutcomeKind.STOP_RUN, "auth"
    if status == 429 and _says_too_large(error):
        return OutcomeKind.FAIL_JOB, "request_too_large"
    if status in (429, 402):
        # (A 402 with a Retry-After: OpenRouter's budget for requests in flight, for now.)
        return OutcomeKind.RETRY, "rate_limit"
    if status >= 500 and status not in _NEVER_5XX:
        return OutcomeKind.RETRY, "server_error"
    if status in _RETRY_4XX:
        return OutcomeKind.RETRY, f"http_{status}"
    if status in _REDIRECTS:
        # Not followed (a POST must not turn into a GET, nor the key travel to another host),
        # and the same for every request: no job of the run can succeed.
        return OutcomeKind.STOP_RUN, "redirect"
    # Other 4xx: sending the same request again cannot help.
    return OutcomeKind.FAIL_JOB, f"http_{status}"


_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


def _status_of(error: dict[str, Any]) -> int | None:
    """The HTTP status an error inside a 2xx answer or a stream gives as its code (LiteLLM's
    proxy sends an error raised once a stream has begun so: `"code": "400"`), or None."""
    code = error.get("code")
    if isinstance(code, str) and len(code) == 3 and code.isascii() and code.isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return code
    return None


def _in_band(error: dict[str, Any] | None, retried_as: str) -> tuple[OutcomeKind, str]:
    """What an error that came inside a 2xx answer or a stream does: what an answer with
    the HTTP status its code gives would do (a 400 fails the job at once, a 401 stops the
    run), else it is retried (error kind `retried_as`), as a rate limit where it says so."""
    status = None if error is None else _status_of(error)
    if status is None:
        return OutcomeKind.RETRY, "rate_limit" if _says_rate_limit(error) else retried_as
    kind, error_kind = _by_status(status, error)
    if kind is OutcomeKind.RETRY and error_kind != "rate_limit":
        error_kind = retried_as
    return kind, error_kind


def loads_lenient(raw: bytes) -> tuple[object, str] | None:
    """JSON that orjson refuses but is no fault of the answer's content, parsed, with its
    text as it is stored; None where it is not JSON after all.

    Three such things come from real servers: a byte-order mark before the JSON, an
    escaped lone surrogate (`"\\ud83d"`, half an emoji, where a gateway cut a string in
    two), and `NaN` / `Infinity` / `-Infinity` (a log probability of a Python server's
    `json.dumps`). Retrying would pay for the same answer again. The text is written anew,
    with each lone surrogate as U+FFFD and each of those numbers as null (as JavaScript
    writes them), so that every reader of the database can parse it.
    """

    value = _parsed_leniently(raw)
    return None if value is None else _mended(value)


def _parsed_leniently(raw: bytes) -> object | None:
    """`raw` parsed by the standard library, lone surrogates kept and `NaN`, `Infinity` and
    `-Infinity` as None; None if it is not JSON."""
    try:
        value: object = json.loads(raw, parse_constant=_no_number)
    except (ValueError, RecursionError):
        return None
    return value


def _no_number(name: str) -> None:
    return None


def _mended(value: object) -> tuple[object, str] | None:
    """`value` with each lone surrogate as U+FFFD (halves that meet again make their
    character), and its JSON text; None if orjson cannot hold it (an integer past 64 bits)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    try:
        return orjson.loads(text), text
    except orjson.JSONDecodeError:
        return None


#: What of an event is read for its excerpt: the key is taken out of it before it is cut to
#: MESSAGE_BODY_CHARS (a fragment at this end goes with the cut).
_EXCERPT_READ_BYTES: Final = 16 << 10


def _excerpt(data: bytes, scrub: Callable[[str], str] | None) -> str:
    """The start of `data` as text, cut after the key is taken out: cut before, a key across
    the cut kept all but its last characters, which no form of it matched."""
    text = data[:_EXCERPT_READ_BYTES].decode(errors="replace")
    return (text if scrub is None else scrub(text))[:MESSAGE_BODY_CHARS]


def _status_line(status: int, reason: str | None) -> str:
    return f"HTTP {status}" + (f" {kept_text(reason)}" if reason else "")


def _fallback_message(status: int, reason: str | None, text: str) -> str:
    head = _status_line(status, reason)
    snippet = " ".join(text.split())[:MESSAGE_BODY_CHARS]
    # An HTML error page says nothing a person wants to read in a status line.
    if snippet and not snippet.startswith("<"):
        return f"{head}: {snippet}"
    return head


def _quota(
    status: int | None,
    error: dict[str, Any] | None,
    text: str | None,
    request_id: str | None,
    latency_s: float,
    ratelimit: RateLimitInfo | None,
    scrub: _Scrubber,
) -> Outcome:
    message = _error_message(error) or "the account has no balance left"
    return Outcome(
        OutcomeKind.STOP_RUN,
        status,
        error_kind="quota",
        message=scrub(message),
        body=scrub(text),
        request_id=request_id,
        latency_s=latency_s,
        ratelimit=ratelimit,
    )


_NO_SCRUB: Final = _Scrubber(None)
_BOM: Final = b"\xef\xbb\xbf"
_NO_DONE: Final = "the stream ended before data: [DONE]"


# --- streams ----------------------------------------------------------------------------


#: Fields of a chunk, and of a choice in it, that the assembler reads itself (OpenAI's
#: `obfuscation` pads each chunk to a random length and means nothing); others are kept.
_CHUNK_FIELDS: Final = frozenset(
    {
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
        "usage",
        "choices",
        "obfuscation",
    }
)
_CHOICE_FIELDS: Final = frozenset({"index", "delta", "logprobs", "finish_reason"})


class _Choice:
    """One choice (`index`) of a streamed answer, as its fragments arrive."""

    __slots__ = (
        "_last_call",
        "_last_call_at",
        "audio_data",
        "content",
        "extra",
        "finish_reason",
        "function_call",
        "logprobs_content",
        "logprobs_refusal",
        "logprobs_seen",
        "other",
        "refusal",
        "role",
        "tool_calls",
    )

    def __init__(self) -> None:
        self.role: str | None = None
        #: Text pieces, and the parts of content sent as a list (Mistral's thinking).
        self.content: list[Any] | None = None
        self.refusal: list[str] | None = None
        #: Each call by its place: (its index in the stream, the order it began in).
        self.tool_calls: dict[tuple[int, int], dict[str, Any]] = {}
        #: The call each stream index last began, and the last call to begin.
        self._last_call_at: dict[int, tuple[int, int]] = {}
        self._last_call: tuple[int, int] | None = None
        self.function_call: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}
        #: The base64 pieces of `audio.data`, in order.
        self.audio_data: list[str] | None = None
        self.logprobs_seen = False
        self.logprobs_content: list[Any] | None = None
        self.logprobs_refusal: list[Any] | None = None
        self.finish_reason: str | None = None
        #: The choice's other fields (OpenRouter's native_finish_reason, vLLM's stop_reason):
        #: the last value each came with (objects: each of their fields' last value; Azure's
        #: content_filter_results come with each piece and as {} with the finish).
        self.other: dict[str, Any] = {}

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key, value in delta.items():
                if value is None:
                    continue
                if key == "content" and isinstance(value, str):
                    if self.content is None:
                        self.content = []
                    self.content.append(value)
                elif key == "content" and isinstance(value, list):
                    if self.content is None:
                        self.content = []
                    self.content.extend(value)
                elif key == "role":
                    self.role = self.role or value
                elif key == "refusal" and isinstance(value, str):
                    if self.refusal is None:
                        self.refusal = []
                    self.refusal.append(value)
                elif key == "tool_calls":
                    self._add_tool_calls(value)
                elif key == "function_call":
                    if isinstance(value, dict):
                        self.function_call = _merge_function(self.function_call, value)
                else:
                    self._add_extra(key, value)
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            self.logprobs_seen = True
            content = logprobs.get("content")
            if isinstance(content, list):
                if self.logprobs_content is None:
                    self.logprobs_content = []
                self.logprobs_content.extend(content)
            refusal = logprobs.get("refusal")
            if isinstance(refusal, list):
                if self.logprobs_refusal is None:
                    self.logprobs_refusal = []
                self.logprobs_refusal.extend(refusal)
        finish_reason = choice.get("finish_reason")
        if finish_reason:  # (some servers send "" until the end)
            self.finish_reason = finish_reason
        other = self.other
        for key, value in choice.items():
            if key in _CHOICE_FIELDS or value is None:
                continue
            old = other.get(key)
            if isinstance(old, dict) and isinstance(value, dict):
                other[key] = {**old, **value}
            else:
                other[key] = value

    def _add_tool_calls(self, fragments: object) -> None:
        if not isinstance(fragments, list):
            return
        for fragment in fragments:
            if not isinstance(fragment, dict):
                continue
            place = self._call_of(fragment)
            self.tool_calls[place] = _merge_tool_call(self.tool_calls.get(place), fragment)

    def _call_of(self, fragment: dict[str, Any]) -> tuple[int, int]:
        """The place of the call a fragment adds to, a new one if it begins a call.

        A fragment continues the call its `index` names, unless it begins another there
        (`_begins_another`): Ollama sends every parallel call at index 0, each whole. Some
        gateways leave out `index` (and send ids as ""): a known id continues its call, and
        another fragment continues the last call unless it begins another.
        """
        calls = self.tool_calls
        index = fragment.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            place = self._last_call_at.get(index)
            if place is not None and not self._begins_another(place, fragment):
                return place
        else:
            call_id = fragment.get("id") or None
            if call_id is not None:
                for place, call in calls.items():
                    if call.get("id") == call_id:
                        return place
            last = self._last_call
            if last is not None and not self._begins_another(last, fragment):
                return last
            index = max((i for i, _ in calls), default=-1) + 1
        place = (index, len(calls))
        self._last_call_at[index] = place
        self._last_call = place
        return place

    def _begins_another(self, place: tuple[int, int], fragment: dict[str, Any]) -> bool:
        """Whether a fragment begins a call other than the one at `place`: it names a
        function when that call has its name and its whole arguments already. Not by its id:
        some servers change a call's id from one fragment to the next (Poolside), while
        Ollama gives every parallel call at index 0 its own; each sends a call's name once,
        first, or (a proxy in front of Gemini) each call whole."""
        function, earlier = fragment.get("function"), self.tool_calls[place]["function"]
        if not (isinstance(function, dict) and function.get("name") and earlier is not None):
            return False
        # A new call's arguments begin anew ("" or a whole object); the earlier call's end as
        # an object or an array does. Most fragments of a call that repeats its name fail one
        # of these, and are not parsed with all the arguments so far.
        begun = function.get("arguments")
        if isinstance(begun, str) and begun.lstrip()[:1] not in ("", "{"):
            return False
        pieces: list[str] = earlier["arguments"]
        last = next((piece for piece in reversed(pieces) if piece.strip()), "")
        if earlier["name"] is None or not last.rstrip().endswith(("}", "]")):
            return False
        try:
            orjson.loads("".join(pieces))
        except orjson.JSONDecodeError:
            return False
        return True

    def _add_extra(self, key: str, value: Any) -> None:
        # Fields some providers add (DeepSeek's `reasoning_content`, `reasoning`, `audio`,
        # ...): see `_merged`.
        if key == "audio" and isinstance(value, dict) and isinstance(value.get("data"), str):
            if self.audio_data is None:
                self.audio_data = []
            self.audio_data.append(value["data"])
            value = {field: part for field, part in value.items() if field != "data"}
        elif key == "reasoning_details" and isinstance(value, list):
            old = self.extra.get(key)
            if old is None or isinstance(old, list):
                self.extra[key] = _merged_details(old, value)
                return
        self.extra[key] = _merged(key, self.extra.get(key), value)

    def _content(self) -> str | list[Any] | None:
        content = self.content
        if content is None or all(isinstance(piece, str) for piece in content):
            return None if content is None else "".join(content)
        return _joined_parts(content)

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role or "assistant",
            "content": self._content(),
            "refusal": None if self.refusal is None else "".join(self.refusal),
        }
        if self.tool_calls:
            message["tool_calls"] = [
                _finish_tool_call(self.tool_calls[i]) for i in sorted(self.tool_calls)
            ]
        if self.function_call is not None:
            message["function_call"] = _function_of(self.function_call)
        message.update(self.extra)
        if self.audio_data is not None:
            audio = message.get("audio")
            message["audio"] = {
                **(audio if isinstance(audio, dict) else {}),
                "data": _joined_base64(self.audio_data),
            }
        return message

    def logprobs(self) -> dict[str, Any] | None:
        if not self.logprobs_seen:
            return None
        return {"content": self.logprobs_content, "refusal": self.logprobs_refusal}


#: Fields of a streamed object that come whole (and unchanged if repeated), not in pieces.
_WHOLE_FIELDS: Final = frozenset(
    {
        "id",
        "type",
        "name",
        "index",
        "object",
        "role",
        "model",
        "created",
        "expires_at",
        "format",
        "signature",
    }
)


def _merged_details(old: list[Any] | None, new: list[Any]) -> list[Any]:
    """OpenRouter's `reasoning_details` once a delta's are added: a detail comes in pieces
    that carry its `index` (its text in several, its signature in the last), and is one
    object again, as the same request without a stream has it."""
    details = [] if old is None else old
    for item in new:
        index = item.get("index") if isinstance(item, dict) else None
        if isinstance(index, int):
            for at, earlier in enumerate(details):
                if (
                    isinstance(earlier, dict)
                    and earlier.get("index") == index
                    and item.get("type", earlier.get("type")) == earlier.get("type")
                ):
                    details[at] = _merged("reasoning_details", earlier, item)
                    break
            else:
                details.append(item)
        else:
            details.append(item)
    return details


def _joined_base64(pieces: list[str]) -> str:
    """Base64 text sent in pieces, as one: pieces that each end whole (OpenAI's audio deltas,
    each with its own padding) are decoded and encoded again; others are one text cut up."""
    if all(len(piece) % 4 == 0 for piece in pieces):
        try:
            data = b"".join(base64.b64decode(piece, validate=True) for piece in pieces)
        except binascii.Error:
            pass
        else:
            return base64.b64encode(data).decode()
    return "".join(pieces)


def _merged(key: str, old: Any, new: Any) -> Any:
    """The value of field `key` once a fragment's `new` is added to `old`: text arrives in
    pieces, lists grow, objects merge field by field; ids, types and names come whole;
    anything else replaces what was there."""
    if old is None or (old == "" and key in _WHOLE_FIELDS):
        return new
    if key in _WHOLE_FIELDS:
        return old
    if isinstance(old, str) and isinstance(new, str):
        return old + new
    if isinstance(old, list) and isinstance(new, list):
        return [*old, *new]
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        for field, value in new.items():
            if value is not None:
                merged[field] = _merged(field, merged.get(field), value)
        return merged
    return new


def _joined_parts(pieces: list[Any]) -> list[Any]:
    """Content sent as a list of parts (Mistral streams its thinking so) and text pieces, as
    one list of parts: text becomes text parts, and neighbouring pieces of one part (same
    type, same fields) are joined."""
    parts: list[Any] = []
    for piece in pieces:
        if piece == "":
            continue  # (streams open with an empty content)
        part = {"type": "text", "text": piece} if isinstance(piece, str) else piece
        joined = _joined_part(parts[-1], part) if parts else None
        if joined is None:
            parts.append(part)
        else:
            parts[-1] = joined
    return parts


def _joined_part(first: Any, second: Any) -> dict[str, Any] | None:
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    if first.get("type") != second.get("type") or first.keys() != second.keys():
        return None
    joined: dict[str, Any] = {}
    for key, value in first.items():
        other = second[key]
        if key == "type":
            joined[key] = value
        elif isinstance(value, str) and isinstance(other, str):
            joined[key] = value + other
        elif isinstance(value, list) and isinstance(other, list):
            joined[key] = _joined_parts([*value, *other])
        elif value == other:
            joined[key] = value  # (Mistral's `closed` on every piece of its thinking)
        else:
            return None
    return joined


def _merge_function(function: dict[str, Any] | None, fragment: dict[str, Any]) -> dict[str, Any]:
    """Adds one fragment of a function call: the name comes whole, the arguments in pieces
    (kept as a list until `_function_of` joins them: a long call's arguments were copied
    whole at each of its thousands of fragments)."""
    if function is None:
        function = {"name": None, "arguments": []}
    name = fragment.get("name")
    if name is not None and function["name"] is None:
        function["name"] = name
    arguments = fragment.get("arguments")
    if isinstance(arguments, str):
        function["arguments"].append(arguments)
    return function


def _function_of(function: dict[str, Any]) -> dict[str, Any]:
    """A function call assembled by `_merge_function`, its arguments one text."""
    return {**function, "arguments": "".join(function["arguments"])}


def _merge_tool_call(call: dict[str, Any] | None, fragment: dict[str, Any]) -> dict[str, Any]:
    """Adds one fragment of a tool call: id and type come whole in the first fragment, the
    function in pieces; other fields (Gemini's `extra_content` with its thought signature)
    are kept as `_merged` adds them up."""
    if call is None:
        call = {"id": None, "type": None, "function": None}
    for key, value in fragment.items():
        if value is None or key == "index":
            continue
        if key == "function":
            if isinstance(value, dict):
                call["function"] = _merge_function(call["function"], value)
        else:
            call[key] = _merged(key, call.get(key), value)
    return call


def _finish_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    return {
        **call,
        "id": call["id"],
        "type": call["type"] or "function",
        "function": (
            {"name": None, "arguments": ""}
            if call["function"] is None
            else _function_of(call["function"])
        ),
    }


class StreamAssembler:
    """Reassembles a streamed chat completion from the raw bytes of its server-sent events.

    Feed it the bytes as they arrive, split anywhere; call `close()` at the end of the
    stream; then `done` says whether `data: [DONE]` came, `error` holds an `error` event if
    one came, `bad_event` an event that was not JSON, and `result()` is the completion
    object as a non-streamed request would have returned it.
    """

    __slots__ = (
        "_choices",
        "_data",
        "_error_event",
        "_extra",
        "_held_cr",
        "_lenient",
        "_line",
        "_meta",
        "_scrub",
        "_usage",
        "bad_event",
        "chunks",
        "done",
        "error",
    )

    def __init__(self, scrub: Callable[[str], str] | None = None) -> None:
        #: Takes the key out of the excerpts kept of events that are not JSON.
        self._scrub = scrub
        self._line = bytearray()
        self._held_cr = False
        self._data: list[bytes] = []
        #: The event being read is named `error` (`event: error`).
        self._error_event = False
        self._meta: dict[str, Any] = {}
        #: The chunks' other fields (Perplexity's citations, OpenRouter's provider): the first
        #: value each came with (objects: each of their fields' first value).
        self._extra: dict[str, Any] = {}
        #: Some event was JSON only the standard library reads (see `loads_lenient`).
        self._lenient = False
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        #: How many events were JSON objects.
        self.chunks = 0
        #: `data: [DONE]` arrived: the stream is complete.
        self.done = False
        #: The first `error` event's error object.
        self.error: dict[str, Any] | None = None
        #: The first event whose data was not JSON (a short excerpt).
        self.bad_event: str | None = None

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if data.startswith(_BOM) and not self._line and self.chunks == 0 and not self.done:
            data = data[len(_BOM) :]  # (a stream may begin with one, as SSE allows)
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if b"\r" in data:
            # A CR at the end may be the first half of a CRLF split between two reads.
            if data.endswith(b"\r"):
                data = data[:-1]
                self._held_cr = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._line += data[start:]
                return
            if self._line:
                self._line += data[start:end]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = data[start:end]
            self._on_line(line)
            start = end + 1

    def close(self) -> None:
        """The stream has ended: a last complete event counts even without its blank line."""
        if self._held_cr:
            self._held_cr = False
            self._on_line(bytes(self._line))
            self._line.clear()
        # An unterminated last line may have been cut short: it is dropped, as SSE says.
        self._line.clear()
        self._dispatch()

    def _on_line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            self._error_event = line[6:].strip() == b"error"
        # Comments (": keep-alive") and the other fields (id, retry) carry nothing a
        # completion needs.

    def _dispatch(self) -> None:
        error_event, self._error_event = self._error_event, False
        if not self._data:
            return
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data.clear()
        if self.done:
            return  # (what a server sends after `[DONE]` is no part of the answer)
        if error_event:
            self._on_error_event(payload)
        else:
            self._on_event(payload)

    def _on_error_event(self, payload: bytes) -> None:
        """An event named `error`: its data is the error, in whatever shape it comes."""
        if self.error is None:
            try:
                value = orjson.loads(payload)
            except orjson.JSONDecodeError:
                value = None
            text = _excerpt(payload, self._scrub).strip()
            self.error = _error_of(value) or (
                value if isinstance(value, dict) and value else {"message": text or "error"}
            )

    def _on_event(self, payload: bytes) -> None:
        if payload.strip() == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            # Lone surrogates are kept until `result`: an emoji cut between two events is
            # whole again once its halves are joined.
            chunk = _parsed_leniently(payload)
            if chunk is None or _mended(chunk) is None:
                if self.bad_event is None:
                    self.bad_event = _excerpt(payload, self._scrub)
                return
            self._lenient = True
        if not isinstance(chunk, dict):
            return
        self.chunks += 1
        error = chunk.get("error")
        if error is not None or ("choices" not in chunk and "message" in chunk):
            # (`{"message": ..., "code": 500}` with no choices: an error in the shape of an
            # error answer's body, as some servers send one mid-stream.)
            found = _error_of(chunk)
            if found is not None or error is not None:
                if self.error is None:
                    self.error = found or {"message": str(error)}
                return
        meta = self._meta
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            value = chunk.get(key)
            # (Azure's first chunk, its prompt's content filter results, has "", 0 and "".)
            if value is not None and value != "" and value != 0 and key not in meta:
                meta[key] = value
        extra = self._extra
        for key, value in chunk.items():
            if key in _CHUNK_FIELDS or value is None:
                continue
            old = extra.get(key)
            if old is None:
                extra[key] = value
            elif isinstance(old, dict) and isinstance(value, dict):
                # Fields added by later chunks (Groq's x_groq gains its usage at the end).
                extra[key] = {**value, **old}
        usage = chunk.get("usage")
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                index = choice.get("index", 0)
                if not isinstance(index, int):
                    index = 0
                state = self._choices.get(index)
                if state is None:
                    state = self._choices[index] = _Choice()
                state.add(choice)

    @property
    def finished(self) -> bool:
        """Every choice has its `finish_reason`."""
        choices = self._choices
        return bool(choices) and all(c.finish_reason for c in choices.values())

    @property
    def has_choices(self) -> bool:
        return bool(self._choices)

    @property
    def has_usage(self) -> bool:
        return self._usage_or_groqs() is not None

    def _usage_or_groqs(self) -> Any:
        # Groq puts the usage of a stream that did not ask for it in its final chunk's
        # x_groq, where the same request without a stream has it as `usage`.
        if self._usage is not None:
            return self._usage
        groq = self._extra.get("x_groq")
        return groq.get("usage") if isinstance(groq, dict) else None

    def choice_error(self) -> dict[str, Any] | None:
        """The error a choice ended with, if one did (see `_choice_error`)."""
        for choice in self._choices.values():
            error = _choice_error(choice.other.get("error"), choice.finish_reason)
            if error is not None:
                return error
        return None

    def result(self) -> dict[str, Any]:
        """The completion object reassembled from the events so far."""
        meta = self._meta
        completion: dict[str, Any] = {
            "id": meta.get("id"),
            "object": "chat.completion",
            "created": meta.get("created"),
            "model": meta.get("model"),
            "choices": [
                {
                    **choice.other,
                    "index": index,
                    "message": choice.message(),
                    "logprobs": choice.logprobs(),
                    "finish_reason": choice.finish_reason,
                }
                for index, choice in sorted(self._choices.items())
            ],
        }
        if "system_fingerprint" in meta:
            completion["system_fingerprint"] = meta["system_fingerprint"]
        if "service_tier" in meta:
            completion["service_tier"] = meta["service_tier"]
        usage = self._usage_or_groqs()
        if usage is not None:
            completion["usage"] = usage
        for key, value in self._extra.items():
            completion.setdefault(key, value)
        if self._lenient:
            mended = _mended(completion)
            if mended is not None:
                completion = cast(dict[str, Any], mended[0])
        return completion


def _with_usage(parsed: object) -> dict[str, Any] | None:
    """An answer that failed, where it reports the usage it was billed for."""
    if type(parsed) is dict and type(parsed.get("usage")) is dict:
        return parsed
    return None


def _kept_answer(completion: dict[str, Any], scrub: _Scrubber) -> tuple[str, dict[str, Any]]:
    """A reassembled answer's text as it is kept, and the answer as the run reads it: both
    without the key, where a server put it in."""
    text = orjson.dumps(completion).decode()
    body = scrub.answer(text)
    return body, (completion if body is text else orjson.loads(body))


def _scrubbed_id(headers: Headers, scrub: _Scrubber) -> str | None:
    request_id = _request_id(headers)
    return None if request_id is None else scrub.answer(request_id)


def _stream_outcome(
    assembler: StreamAssembler,
    status: int,
    headers: Headers,
    latency_s: float,
    scrub: _Scrubber,
    broken: str | None,
    wants_usage: bool = False,
) -> Outcome:
    request_id = _scrubbed_id(headers, scrub)
    ratelimit = parse_ratelimit(headers)
    error = assembler.error
    if error is None and assembler.bad_event is None:
        choice_error = assembler.choice_error()
        if choice_error is not None:
            body, completion = _kept_answer(assembler.result(), scrub)
            return _choice_outcome(
                choice_error, status, body, completion, request_id, latency_s, ratelimit, scrub
            )
    if error is not None:
        if _says_quota(error) or _status_of(error) == 402:
            return _quota(status, error, None, request_id, latency_s, ratelimit, scrub)
        kind, error_kind = _in_band(error, "stream_error")
        return Outcome(
            kind,
            status,
            error_kind=error_kind,
            message=scrub(_error_message(error) or "the stream carried an error event"),
            # As an error answer carries it, so that exports find the API's code and message.
            body=scrub(orjson.dumps({"error": error}).decode()),
            request_id=request_id,
            latency_s=latency_s,
            ratelimit=ratelimit,
        )
    if assembler.bad_event is not None:
        return Outcome(
            OutcomeKind.RETRY,
            status,
            error_kind="bad_json",
            message="a stream event is not valid JSON",
            body=scrub(assembler.bad_event),
            request_id=request_id,
            latency_s=latency_s,
            ratelimit=ratelimit,
        )
    if not assembler.has_choices or (
        not assembler.done
        and (
            broken is not None
            or not assembler.finished
            or (wants_usage and not assembler.has_usage)
        )
    ):
        # (Some servers end a complete stream without `[DONE]`: every choice had finished,
        # the usage asked for had come, and the connection ended cleanly: nothing was cut.
        # A `[DONE]` with no choice before it is no answer: a gateway's upstream failed.)
        if broken is None:
            broken = "the stream held no choice" if assembler.done else _NO_DONE
        return Outcome(
            OutcomeKind.RETRY,
            status,
            error_kind="stream_broken",
            message=scrub(broken),
            # Cut after its usage came: billed for that (counted $0, a run passed its
            # --max-cost 2.4 times over on streams cut so).
            completion=_kept_answer(assembler.result(), scrub)[1] if assembler.has_usage else None,
            request_id=request_id,
            latency_s=latency_s,
            ratelimit=ratelimit,
        )
    body, completion = _kept_answer(assembler.result(), scrub)
    return Outcome(
        OutcomeKind.SUCCESS,
        status,
        body=body,
        completion=completion,
        request_id=request_id,
        latency_s=latency_s,
        ratelimit=ratelimit,
    )


# --- the client -------------------------------------------------------------------------


_malloc_tuned = False


def keep_read_buffers_on_the_heap() -> None:
    """Make glibc serve asyncio's socket read buffers from the heap, not from mmap.

    asyncio reads each socket into a new 256 KiB buffer (its transports' `max_size`) and
    shrinks it to what arrived. glibc gives a block that large its own mapping when the heap
    has no room for it, and only learns to stop doing that when such a block is freed at its
    full size (its dynamic threshold, mallopt(3)); a shrunk one never is. A run then paid an
    mmap, an mremap, a munmap and a page fault for every answer it read: 60,000 system calls
    for 20,000 answers. Fixed thresholds keep those buffers on the heap, and the heap's top
    in place between them. Once per process; nothing on other C libraries (musl's mallopt
    does nothing) or platforms.
    """
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return
    _malloc_tuned = True
    import ctypes  # 2 ms, against a run's 250 ms of imports

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)


class ApiClient:
    """Sends requests to one OpenAI-compatible API over one connection pool.

    Use as `async with ApiClient(...) as client: outcome = await client.send(...)`.
    `send` never raises for network or HTTP trouble: everything becomes an `Outcome`.
    """

    def __init__(
        self, base_url: str, api_key: str | None, *, concurrency: int, timeout_s: float
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = base_url
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._proxy, proxy_headers = proxy_for(base_url)
        self._scrub = _Scrubber(api_key, _proxy_secrets(proxy_headers))
        #: What each request adds to the session's headers (None: nothing), and what goes to
        #: the proxy alone.
        self._request_headers: dict[str, str] | None = None
        self._proxy_headers: dict[str, str] | None = None
        if self._proxy is None:
            if api_key:
                self._headers["Authorization"] = f"Bearer {api_key}"
        else:
            # aiohttp gives a proxy the session's headers, and its Authorization as the
            # Proxy-Authorization of the CONNECT: the key would go to the proxy, in clear,
            # in place of the proxy's own credentials. It goes with each request instead.
            self._request_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            if urlsplit(base_url).scheme.lower() == "https":
                self._proxy_headers = proxy_headers or {}  # on the CONNECT
            else:
                # (Plain http goes to the proxy as it is: its credentials with the request.)
                self._request_headers |= proxy_headers or {}
                self._proxy_headers = {}
        self._urls: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        # Spelled out so that the key can never show up in a log through a repr.
        return f"ApiClient({self.base_url!r}, concurrency={self.concurrency})"

    async def __aenter__(self) -> ApiClient:
        keep_read_buffers_on_the_heap()
        connector = aiohttp.TCPConnector(
            limit=self.concurrency,
            # One API host: the per-host limit would only be a second, smaller cap.
            limit_per_host=0,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            max_field_size=MAX_HEADER_BYTES,
            # `total` covers connecting, sending and reading the last byte of the answer, so
            # a server that trickles bytes cannot hold a request forever.
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            proxy=self._proxy,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the connection pool; `async with` does this on exit."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def url_for(self, endpoint: str) -> str:
        """The full URL of `endpoint` (such as `/v1/chat/completions`) on this API."""
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = join_url(self.base_url, endpoint)
        return url

    async def send(self, endpoint: str, body: bytes, *, stream: bool) -> Outcome:
        """Sends one request body (as given) and classifies what came back."""
        session = self._session
        if session is None:
            raise RuntimeError("ApiClient is used outside `async with`")
        url = self.url_for(endpoint)
        started = time.monotonic()
        try:
            data = body if len(body) <= STREAMED_BODY_BYTES else io.BytesIO(body)
            async with session.post(
                url,
                data=data,
                allow_redirects=False,
                headers=self._request_headers,
                proxy_headers=self._proxy_headers,
            ) as response:
                status = response.status
                if stream and status == 200 and response.content_type != "application/json":
                    return await self._read_stream(response, started, _asks_for_usage(body))
                raw = await response.read()
                if status == 200 and raw[:1] != b"{" and _is_event_stream(response, raw):
                    # (An event stream labelled as JSON, or sent for a request that asked for
                    # none: it is the answer all the same, paid for.)
                    assembler = StreamAssembler(self._scrub)
                    assembler.feed(raw)
                    assembler.close()
                    return _stream_outcome(
                        assembler,
                        status,
                        response.headers,
                        time.monotonic() - started,
                        self._scrub,
                        None,
                        _asks_for_usage(body),
                    )
        except TimeoutError:
            return self._no_answer(
                "timeout", f"no complete answer within {self.timeout_s:g} s", started
            )
        except aiohttp.InvalidURL as exc:
            return Outcome(
                OutcomeKind.FAIL_JOB,
                None,
                error_kind="invalid_url",
                message=self._scrub(f"invalid URL: {exc}"),
                latency_s=time.monotonic() - started,
            )
        except aiohttp.ClientHttpProxyError as exc:
            if not 400 <= exc.status < 500:  # (its way to the API failed: as the API down)
                return self._no_answer("connection", _describe(exc), started)
            # Wrong credentials (407), a host it does not allow: no request can get through.
            return Outcome(
                OutcomeKind.STOP_RUN,
                exc.status,
                error_kind="proxy",
                message=self._scrub(
                    f"the proxy {self._proxy} refused the way to the API:"
                    f" {exc.status} {kept_text(exc.message)}{_PROXY_NAMED}"
                ),
                latency_s=time.monotonic() - started,
            )
        except (aiohttp.ClientError, OSError) as exc:
            return self._no_answer("connection", _describe(exc), started)
        return _classify(
            status, response.reason, response.headers, raw, time.monotonic() - started, self._scrub
        )

    async def _read_stream(
        self, response: aiohttp.ClientResponse, started: float, wants_usage: bool
    ) -> Outcome:
        assembler = StreamAssembler(self._scrub)
        broken: str | None = None
        answered: float | None = None
        sniffed = False
        try:
            async for data in response.content.iter_any():
                if not sniffed:
                    # An answer that is JSON, not events (a complete completion or an error
                    # under another content type), is read as the answer it is.
                    head = data.lstrip(_BOM + b" \t\r\n")
                    if head[:1] in (b"{", b"["):
                        raw = data + await response.content.read()
                        return _classify(
                            response.status,
                            response.reason,
                            response.headers,
                            raw,
                            time.monotonic() - started,
                            self._scrub,
                        )
                    sniffed = bool(head)
                assembler.feed(data)
                if assembler.done:
                    # The answer is complete: its time is now, whatever follows.
                    answered = time.monotonic()
                    await self._drain(response)
                    break
        except TimeoutError:
            # (`--timeout` is the whole request's, however steadily the stream came.)
            broken = f"the stream did not end within {self.timeout_s:g} s"
            if not assembler.done:
                return self._no_answer("timeout", broken, started, response)
        except (aiohttp.ClientError, OSError) as exc:
            broken = f"the stream broke off: {_describe(exc)}"
        assembler.close()
        return _stream_outcome(
            assembler,
            response.status,
            response.headers,
            (time.monotonic() if answered is None else answered) - started,
            self._scrub,
            broken,
            wants_usage,
        )

    @staticmethod
    async def _drain(response: aiohttp.ClientResponse) -> None:
        """Read what a stream sends after `[DONE]` (its end, as a rule) for a moment, so that
        its connection can serve the next request; one still open after that is closed."""
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
            async with asyncio.timeout(AFTER_DONE_S):
                while await response.content.readany():
                    pass

    def _no_answer(
        self,
        error_kind: str,
        message: str,
        started: float,
        response: aiohttp.ClientResponse | None = None,
    ) -> Outcome:
        headers = response.headers if response is not None else None
        return Outcome(
            OutcomeKind.RETRY,
            None if response is None else response.status,
            error_kind=error_kind,
            message=self._scrub(message),
            request_id=None if headers is None else _scrubbed_id(headers, self._scrub),
            latency_s=time.monotonic() - started,
        )


#: How an event stream's first line may begin: a field, or a comment (OpenRouter's
#: ": OPENROUTER PROCESSING"). No JSON begins so.
_EVENT_STREAM_STARTS: Final = (b"data:", b"event:", b"id:", b"retry:", b":")


def _is_event_stream(response: aiohttp.ClientResponse, raw: bytes) -> bool:
    """Whether a whole answer is an event stream: its first line is one, or it is labelled
    one and is not JSON."""
    head = raw.lstrip(_BOM + b" \t\r\n")[:6]
    return head.startswith(_EVENT_STREAM_STARTS) or (
        response.content_type == "text/event-stream" and head[:1] not in (b"{", b"[")
    )


def _asks_for_usage(body: bytes) -> bool:
    """Whether a stream request asks for its usage (`stream_options.include_usage`)."""
    if b"include_usage" not in body:
        return False
    try:
        options = orjson.loads(body).get("stream_options")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    return isinstance(options, dict) and options.get("include_usage") is True


def _describe(exc: BaseException) -> str:
    # An exception's text may quote what came over the wire, as aiohttp decoded it.
    if isinstance(exc, aiohttp.ClientResponseError) and not isinstance(
        exc, aiohttp.ClientHttpProxyError
    ):
        # aiohttp's own status for an answer it could not read (an unknown content-encoding,
        # a malformed header), not the server's: "400, message=..." read as an HTTP 400.
        text = kept_text(exc.message)
    else:
        text = kept_text(str(exc))
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
