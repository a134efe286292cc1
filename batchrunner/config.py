"""Settings of a run, frozen once the command line has been read."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from batchrunner.errors import UsageError
from batchrunner.states import KEY_ENV_CHARS, kept_text

DEFAULT_DB_URL = "sqlite:///batchrunner.db"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
#: `batchrunner demo`'s batches read their key from here, and are told apart by it: their
#: answers are the local fake API's.
DEMO_KEY_ENV = "BATCHRUNNER_DEMO_KEY"

#: How long a claimed job stays ours without a heartbeat; extended while the request is alive.
LEASE_S = 60.0
#: Environment variable behind `run --lease`: a shorter lease hands a dead worker's jobs to the
#: others sooner, at the cost of more heartbeats.
LEASE_ENV = "BATCHRUNNER_LEASE_S"
#: How often the leases of jobs in flight are extended.
LEASE_RENEW_S = 15.0
#: After Ctrl-C, how long requests already sent may take to finish before they are abandoned.
GRACE_S = 10.0
#: The attempts log of jobs still retrying is written at least this often (ended jobs are
#: written at once: see the dispatcher's writer).
FLUSH_S = 1.0


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def db_url_from_env() -> str:
    return os.environ.get("BATCHRUNNER_DB") or DEFAULT_DB_URL


def without_password(url: str) -> str:
    """A URL as it may be shown: its password, if it has one, as *** (also one given as a
    `password=` parameter, as libpq and asyncpg read it, or a key's); also in a URL that
    misses its `://` (`postgres:PW@host/db`, shown whole before)."""
    url = _SECRET_PARAMETER.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    credentials, at, after = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.partition(':')[0]}:***@{after}"


def without_credentials(url: str) -> str:
    """A URL as it may be shown where even a user is a secret (a key put where a user goes:
    `https://sk-...@host/v1`): its whole user part, and its password or key parameters, as
    ***."""
    url = _SECRET_PARAMETER.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    # The user part ends at the last '@' before the query or fragment (a password may hold
    # a '/'; a query may hold an address, or another URL).
    end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    head, tail = rest[:end], rest[end:]
    if "@" not in head:
        return url
    return f"{scheme}{sep}***@{head.rpartition('@')[2]}{tail}"


_SECRET_PARAMETER = re.compile(
    r"([?&](?:password|key|api[_-]?key|access[_-]?token|token|secret)=)[^&#]*", re.IGNORECASE
)


def check_base_url(base_url: str) -> str:
    """`base_url` without surrounding blanks, if it is an absolute http(s) URL."""
    url = base_url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        usable = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        # Bytes that are not UTF-8 (in an argument or OPENAI_BASE_URL) name no host.
        usable = usable and kept_text(url) == url
    except ValueError:  # an unclosed [IPv6 bracket, a port that is not a number
        usable = False
    if not usable:
        raise UsageError(
            f"the base URL must be an http:// or https:// URL such as {DEFAULT_BASE_URL},"
            f" not {without_credentials(base_url)!r}"
        )
    if parts.username is not None or parts.password is not None:
        # Sent with the key's Authorization header, it broke every request; and the URL is
        # stored with the batch and shown by `status`.
        raise UsageError(
            f"the base URL must not hold a user or password ({without_credentials(url)!r}): the"
            " key goes in the variable --api-key-env names"
        )
    if parts.path.rstrip("/").endswith("/chat/completions"):
        raise UsageError(
            f"the base URL is the API's root, such as {DEFAULT_BASE_URL}, not its endpoint"
            f" ({without_credentials(url)!r}): drop /chat/completions"
        )
    return url


def check_key_env(name: str) -> str:
    """`name` if it can name an environment variable. The value is never echoed: a key
    pasted here by mistake must not end up in a message or the database."""
    if not _ENV_NAME.fullmatch(name):
        raise UsageError(
            "--api-key-env takes the name of the environment variable that holds the key"
            " (such as OPENAI_API_KEY), not the key itself"
        )
    if len(name) > KEY_ENV_CHARS:
        raise UsageError(f"--api-key-env takes a name of at most {KEY_ENV_CHARS} characters")
    if _looks_like_a_key(name) and name not in os.environ:
        raise UsageError(
            "--api-key-env takes the name of the environment variable that holds the key, and"
            " this looks like a key itself (if it is a variable's name, set the variable first)"
        )
    return name


def _looks_like_a_key(name: str) -> bool:
    """Keys made of letters, digits and _ pass for names (Groq's gsk_..., Mistral's, Azure's
    32 hex digits): long, with digits among the letters, and either of both cases or without
    the _ that joins the words of a variable's name."""
    letters = any(c.isalpha() for c in name)
    mixed_case = any(c.isupper() for c in name) and any(c.islower() for c in name)
    return (
        len(name) >= 24
        and letters
        and any(c.isdigit() for c in name)
        and (mixed_case or "_" not in name)
    )


def check_api_key(key: str, key_env: str) -> str:
    """The key without blanks around it (a secret read from a file ends with a newline),
    if it can go in a header."""
    key = key.strip()
    if not (key.isascii() and key.isprintable()):
        raise UsageError(
            f"${key_env} holds characters no API key has (a line break, a control character or"
            " a letter outside ASCII)"
        )
    return key


@dataclass(frozen=True, slots=True)
class RunConfig:
    """How one `batchrunner run` sends a batch."""

    #: Requests in flight at once.
    concurrency: int = 64
    #: Requests per minute for the whole batch; None = no limit.
    rpm: float | None = None
    #: Tokens per minute for the whole batch (prompt estimate + max output); None = no limit.
    tpm: float | None = None
    #: HTTP attempts per job before it fails (transient errors only).
    max_attempts: int = 6
    #: Seconds one request may take, first byte to last.
    timeout_s: float = 600.0
    #: Stop before a request could take the batch's cost past this many US dollars.
    max_cost_usd: float | None = None
    #: Overrides of what the batch stored at submit.
    base_url: str | None = None
    api_key_env: str | None = None
    #: Retry answers whose content does not match the request's json_schema.
    retry_invalid_json: bool = False
    #: A price file (TOML) overriding or adding model prices.
    prices_path: Path | None = None
    #: Backoff before the second attempt (doubling after that, up to retry_max_s), plus a
    #: random 0..retry_jitter_s.
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    retry_jitter_s: float = 1.0
    lease_s: float = LEASE_S
    lease_renew_s: float = LEASE_RENEW_S
    grace_s: float = GRACE_S
    flush_s: float = FLUSH_S
