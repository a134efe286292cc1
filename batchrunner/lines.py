"""Request lines: both input formats parsed and validated, one line or a block of lines.

What a submit's worker processes run, kept apart from the database code: a worker imports
this module and what it needs (orjson, the token estimates), not SQLAlchemy, and so starts in
a fraction of the time.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson

from batchrunner.errors import LineError, UsageError
from batchrunner.states import CUSTOM_ID_CHARS, MODEL_CHARS
from batchrunner.tokens import count_prompt_tokens, quick_prompt_tokens

T = TypeVar("T")

#: The only endpoint a line may name, in either spelling.
CHAT_ENDPOINT = "/v1/chat/completions"
_CHAT_ENDPOINTS = frozenset({"/v1/chat/completions", "/chat/completions"})
#: The fields of an OpenAI Batch API line (and `metadata`, kept with the job).
_BATCH_LINE_FIELDS = frozenset({"custom_id", "method", "url", "body", "metadata"})
BOM = b"\xef\xbb\xbf"
#: Inline data (`data:image/png;base64,...`, audio and file parts) is marked by this.
_INLINE_DATA = ";base64,"
#: A value quoted in a line's error is cut to this many characters.
SHOWN_VALUE_CHARS = 80
#: How deep orjson nests when it writes: it reads deeper documents than it can write back.
MAX_WRITE_DEPTH = 255
#: A job's token estimate is kept at most this (what the jobs table's integer column holds):
#: an output cap of 10**12 is the API's to refuse, not a reason for the load to fail. It is
#: past any tokens-per-minute limit either way.
MAX_EST_TOKENS = 2**31 - 1


class NewJob(NamedTuple):
    """A validated request line, ready to insert.

    A named tuple whose fields are in `BatchLoader`'s column order: submit makes one per line,
    and the tuple goes to the driver as it is.
    """

    line: int
    custom_id: str
    endpoint: str
    body: str
    meta: str | None
    model: str
    stream: bool
    est_tokens: int


#: A `NewJob` as a plain tuple, as a parallel submit's worker processes send it back.
JobRow = tuple[int, str, str, str, str | None, str, bool, int]


class BadLine(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: What a request file that is not JSON lines starts with, and what it is then: each of its
#: lines would be refused as "not valid UTF-8", with no word of why.
NOT_JSONL = (
    (b"\x1f\x8b", "gzip-compressed (gunzip -k it first)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed (unzstd it first)"),
    (b"BZh", "bzip2-compressed (bunzip2 -k it first)"),
    (b"\xfd7zXZ\x00", "xz-compressed (unxz -k it first)"),
    (b"PK\x03\x04", "a zip archive (unzip it first)"),
    (b"\xff\xfe", "UTF-16 text (save it as UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (save it as UTF-8)"),
)
_LONGEST_MAGIC = max(len(magic) for magic, _ in NOT_JSONL)


def names_a_file(target: str) -> bool:
    """Whether a FILE|BATCH_ID argument is a file, or names one all the same (a batch id has
    neither a path separator nor a file's extension): what reading it as a file should say
    why it cannot be."""
    path = Path(target)
    return (
        os.sep in target
        or target == "-"
        or target.endswith((".jsonl", ".json"))
        or path.is_file()
        # (A folder named as a batch, for its exports say, is not what is meant.)
        or (path.is_dir() and not _BATCH_ID.fullmatch(target))
    )


_BATCH_ID = re.compile(r"batch_[0-9a-f]{16}")


def check_request_file(path: Path) -> None:
    """Raise a UsageError that says why `path` cannot be read as a request file, if it cannot.

    It must be a regular file: a submit reads it twice, once for its digest and once to load
    it, which a pipe (`/dev/stdin`) cannot give.
    """
    if str(path) == "-":
        raise UsageError(
            "requests are read from a file, not standard input: a submit reads its file twice"
            " (write them to a file first)"
        )
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(f"{path} is a directory, not a request file")
        if not stat.S_ISREG(mode):
            raise UsageError(
                f"{path} is not a regular file (a pipe or a device); requests are read from a"
                " file twice, so write them to one first"
            )
        with path.open("rb") as f:
            start = f.read(_LONGEST_MAGIC)
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    for magic, what in NOT_JSONL:
        if start.startswith(magic):
            raise UsageError(f"{path} is {what}; requests are read from UTF-8 JSON lines")


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, raw line without its newline, whether it ended with a newline)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.endswith(b"\n"):
                yield number, raw[:-1].rstrip(b"\r"), True
            else:
                yield number, raw, False


def _require_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadLine(f"{what} must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return "an object"


def _check_text(value: Any, name: str, width: int) -> str:
    """A non-empty string the database can store as it is: PostgreSQL text holds no NUL, and
    its column holds `width` characters."""
    if not isinstance(value, str) or not value:
        raise BadLine(f"'{name}' must be a non-empty string")
    if "\x00" in value:
        raise BadLine(f"'{name}' contains a NUL character")
    if len(value) > width:
        raise BadLine(f"'{name}' is longer than {width} characters ({len(value)})")
    return value


def _shown(value: Any) -> str:
    """A value for a message, cut short: a line may hold megabytes where it is wrong."""
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[: SHOWN_VALUE_CHARS - 3] + "..."


def _wrote_an_exponent(text: str) -> bool:
    """Whether orjson wrote a number with a positive exponent into `text` (`1e+16`,
    `1.8446744073709552e+19`): a digit, `e+`, digits, then what ends a number in JSON. Text
    inside strings rarely looks so (base64 data has `e+` every few kilobytes, but never before
    a comma or a bracket)."""
    at = text.find("e+")
    while at > 0:
        end = at + 2
        while end < len(text) and text[end].isdigit():
            end += 1
        if text[at - 1].isdigit() and end > at + 2 and end < len(text) and text[end] in ",}]":
            return True
        at = text.find("e+", end)
    return False


def _check_integers(raw: bytes) -> None:
    """Refuse an integer outside 64 bits: orjson reads it as a float without a word, and the
    request would go out with 2**64 as 1.8446744073709552e+19. Called only for a line whose
    JSON, as written back, has a number with an exponent, as such an integer always has."""

    def checked(literal: str) -> int:
        value = int(literal)
        if not -(2**63) <= value < 2**64:
            raise BadLine(
                f"the integer {_shown(value)} is outside 64 bits: it would be sent as a float"
            )
        return value

    # orjson has read the line already: what the standard parser would refuse otherwise
    # (it reads more loosely) is orjson's to judge. Not its depth: there, the integers would
    # go unchecked.
    try:
        json.loads(raw, parse_int=checked)
    except RecursionError:
        raise BadLine("nested too deep for its numbers to be checked") from None
    except ValueError:
        pass


def _dumps(value: Any, what: str) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        # The only thing parsed JSON can fail to be written for is its depth.
        raise BadLine(f"{what} is nested more than {MAX_WRITE_DEPTH} levels deep") from None


def _check_body(body: dict[str, Any]) -> tuple[str, bool, int, int]:
    """Validate a chat-completion request body; returns its model, whether it streams, its
    choices (`n`) and its output cap (`max_completion_tokens` or `max_tokens`, the larger
    where both are set, as `tokens.max_output_tokens`; 0: none), read here once rather than
    again for the job.

    Checks exact types (`type(x) is int`, which is also how a bool is kept out): orjson makes
    only plain dicts, lists, strings and numbers, and isinstance costs more on every line.
    """
    model = body.get("model")
    if type(model) is not str or not model.strip() or "\x00" in model or len(model) > MODEL_CHARS:
        if model is None:
            raise BadLine("missing 'model'")
        if type(model) is not str or not model.strip():
            raise BadLine("'model' must be a non-empty string")
        _check_text(model, "model", MODEL_CHARS)  # raises on the NUL or the length
    messages = body.get("messages")
    if type(messages) is not list or not messages:
        if messages is None:
            raise BadLine("missing 'messages'")
        if not isinstance(messages, list):
            raise BadLine(f"'messages' must be an array, not {_json_type(messages)}")
        raise BadLine("'messages' is empty")
    for i, message in enumerate(messages):
        if type(message) is not dict:
            raise BadLine(f"messages[{i}] must be an object, not {_json_type(message)}")
        role = message.get("role")
        if type(role) is not str or not role:
            if role is None:
                raise BadLine(f"messages[{i}] has no 'role'")
            raise BadLine(f"messages[{i}].role must be a non-empty string, not {_shown(role)}")
    stream = body.get("stream")
    if stream is None:
        stream = False  # absent, or null as the API takes it
    elif stream is not False and stream is not True:
        raise BadLine("'stream' must be true, false or null")
    n = body.get("n")
    if n is not None and (type(n) is not int or n < 1):
        raise BadLine("'n' must be a positive integer")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise BadLine("'max_tokens' must be a positive integer")
    cap = body.get("max_completion_tokens")
    if cap is not None and (type(cap) is not int or cap < 1):
        raise BadLine("'max_completion_tokens' must be a positive integer")
    return model, stream, n or 1, max(cap or 0, max_tokens or 0)


def parse_line(raw: bytes, number: int, meta_keys: set[str] | None = None) -> NewJob:
    """One line of either input format -> a job; raises BadLine with the reason. The keys of
    the job's metadata are added to `meta_keys`."""
    return NewJob._make(parse_row(raw, number, meta_keys))


def parse_row(raw: bytes, number: int, meta_keys: set[str] | None = None) -> JobRow:
    """`parse_line`, as a plain tuple: what a load needs, a line at a time. A named tuple
    costs ~0.8 us to make (a fifth of the line's parse), and sending it to another process
    twice what a tuple costs."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if BOM in raw:
            raise BadLine("byte order mark inside the file (were two files joined?)") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadLine("not valid UTF-8") from None
        # (orjson gives a character's position, at a minus sign's next character, at the
        # others' first)
        at = len(text[: exc.pos].encode())
        start = at - 1 if raw[at - 1 : at] == b"-" else at
        word = re.match(rb"-?(NaN|Infinity)", raw[start : start + 9])
        if word:
            # (Python's json.dumps writes them; the API refuses them, as JSON has no such number.)
            literal = word[0].decode()
            raise BadLine(f"invalid JSON: {literal} is not a JSON number ({exc})") from None
        raise BadLine(f"invalid JSON: {exc}") from None
    obj = _require_object(value, "a line")

    plain = "model" in obj or "messages" in obj
    if "body" in obj and (not plain or "custom_id" in obj or "url" in obj or "method" in obj):
        # OpenAI Batch API line.
        if not _BATCH_LINE_FIELDS.issuperset(obj):
            # (`temperature` or `model` beside `body` would not be sent: refused, not dropped.)
            extra = [_shown(k) for k in obj if k not in _BATCH_LINE_FIELDS]
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise BadLine(
                f"{', '.join(extra[:3])}{more} beside 'body': an OpenAI Batch API line has"
                " custom_id, method, url, body (the request's fields go inside 'body')"
            )
        method = obj.get("method", "POST")
        if not isinstance(method, str) or method.upper() != "POST":
            raise BadLine(f"unsupported method {_shown(method)}: only POST")
        url = obj.get("url", CHAT_ENDPOINT)
        if not isinstance(url, str) or url not in _CHAT_ENDPOINTS:
            raise BadLine(f"unsupported url {_shown(url)}: only {CHAT_ENDPOINT}")
        custom_id = _check_text(obj.get("custom_id"), "custom_id", CUSTOM_ID_CHARS)
        body = _require_object(obj["body"], "'body'")
        meta = obj.get("metadata")
        body_text = _dumps(body, "'body'")
    elif "url" in obj or "method" in obj:
        # (With `model` beside them: a Batch API line whose body was flattened into it; as a
        # plain body, `url` and `method` would be sent to the API.)
        raise BadLine("missing 'body' (an OpenAI Batch API line has custom_id, method, url, body)")
    else:
        # A plain request body: metadata and custom_id stay with the job, never sent.
        body = obj
        meta = body.pop("metadata", None)
        custom_id = body.pop("custom_id", None)
        if custom_id is None:
            custom_id = f"line-{number}"
        else:
            _check_text(custom_id, "custom_id", CUSTOM_ID_CHARS)
        body_text = _dumps(body, "the request")
    # The line is read again for its integers at most once, for the body or the metadata.
    integers_checked = _wrote_an_exponent(body_text)
    if integers_checked:
        _check_integers(raw)
    model, stream, n, cap = _check_body(body)
    if meta is not None and not isinstance(meta, dict):
        raise BadLine(f"'metadata' must be an object, not {_json_type(meta)}")
    # Characters / 4 (as OpenAI's own limiter estimates), except for bodies with inline
    # base64 data, whose characters are not text: those are counted part by part, as the API
    # bills them (a 3 MB photo is about a thousand tokens, not 800,000).
    if _INLINE_DATA in body_text:
        est = count_prompt_tokens(body) + cap * n
    else:
        est = quick_prompt_tokens(len(body_text)) + cap * n
    est = min(est, MAX_EST_TOKENS)
    meta_text = None
    if meta:
        meta_text = _dumps(meta, "'metadata'")
        if not integers_checked and _wrote_an_exponent(meta_text):
            _check_integers(raw)
        if meta_keys is not None:
            meta_keys.update(meta)
    return (number, custom_id, CHAT_ENDPOINT, body_text, meta_text, model, stream, est)


def read_jobs(path: Path, meta_keys: set[str] | None = None) -> Iterator[NewJob | LineError]:
    """Every request of a file in order, or the reason a line is bad. Blank lines are skipped.
    The keys of the jobs' metadata are added to `meta_keys`."""
    return _parse_lines(str(path), numbered_lines(path), parse_line, meta_keys)


def read_rows(path: Path, meta_keys: set[str] | None = None) -> Iterator[JobRow | LineError]:
    """`read_jobs`, each job a plain tuple (`parse_row`): for a load."""
    return _parse_lines(str(path), numbered_lines(path), parse_row, meta_keys)


def _parse_lines(
    name: str,
    lines: Iterable[tuple[int, bytes, bool]],
    parse: Callable[[bytes, int, set[str] | None], T],
    meta_keys: set[str] | None = None,
) -> Iterator[T | LineError]:
    for number, raw, ended in lines:
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if not raw.strip():
            continue
        try:
            yield parse(raw, number, meta_keys)
        except BadLine as bad:
            reason = bad.reason
            if reason.startswith("invalid JSON"):
                if not ended and "unexpected end of data" in reason:
                    reason = "truncated last line (no newline at the end and not valid JSON)"
                elif b"\r" in raw and "unexpected content after document" in reason:
                    reason += " (lines that end with a lone CR? end them with LF or CRLF)"
            yield LineError(name, number, reason)


def block_lines(first: int, block: bytes) -> Iterator[tuple[int, bytes, bool]]:
    """`numbered_lines` of one of `_blocks`."""
    lines = block.split(b"\n")
    last = lines.pop()  # after the last newline: empty, or a last line without one
    for number, raw in enumerate(lines, start=first):
        yield number, raw.rstrip(b"\r"), True
    if last:
        yield first + len(lines), last, False


#: What a worker sends back for a block: its jobs as plain tuples (in `NewJob`'s field order;
#: a named tuple costs twice as much to send) and its bad lines, each in line order, and the
#: keys of its jobs' metadata.
ParsedBlock = tuple[list[JobRow], list[LineError], set[str]]


class _BlockParser:
    """In a worker process of a parallel submit: blocks of the file in, jobs and errors out."""

    def __init__(self, name: str) -> None:
        self._name = name

    async def handle(self, block: tuple[int, bytes]) -> ParsedBlock:
        jobs: list[JobRow] = []
        errors: list[LineError] = []
        meta_keys: set[str] = set()
        for item in _parse_lines(self._name, block_lines(*block), parse_row, meta_keys):
            if isinstance(item, LineError):
                errors.append(item)
            else:
                jobs.append(item)
        return jobs, errors, meta_keys

    async def close(self) -> None:
        pass


async def open_block_parser(name: str) -> _BlockParser:
    return _BlockParser(name)
