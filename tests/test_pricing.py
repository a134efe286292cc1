"""Usage parsing and cost: OpenAI and gateway usage objects, genai-prices data, user prices."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrunner.errors import UsageError
from batchrunner.pricing import (
    PRICES_ENV,
    ModelRates,
    PriceBook,
    UsageCounts,
    usage_from_completion,
    usage_from_json_text,
)

MTOK = Decimal(1_000_000)

# Published rates in US dollars per million tokens, as genai-prices' bundled data has them
# (input, cached input, output). test_bundled_rates_are_the_ones_these_tests_assume checks
# the OpenAI ones are still what the data says, so a data update fails there first.
GPT_4O = (Decimal("2.5"), Decimal("1.25"), Decimal("10"))
O3_MINI = (Decimal("1.1"), Decimal("0.55"), Decimal("4.4"))
O4_MINI = (Decimal("1.1"), Decimal("0.275"), Decimal("4.4"))
GEMINI_25_PRO_UP_TO_200K = (Decimal("1.25"), Decimal("0.125"), Decimal("10"))
GEMINI_25_PRO_OVER_200K = (Decimal("2.5"), Decimal("0.25"), Decimal("15"))
DEEPSEEK_CHAT_0030_1630_UTC = (Decimal("0.27"), Decimal("0.07"), Decimal("1.1"))
DEEPSEEK_CHAT_OTHER_HOURS = (Decimal("0.135"), Decimal("0.035"), Decimal("0.55"))


def by_hand(rates: tuple[Decimal, Decimal, Decimal], usage: UsageCounts) -> Decimal:
    """Uncached prompt at the input rate, cached at the cached rate, all output (reasoning
    included, once) at the output rate."""
    input_rate, cached_rate, output_rate = rates
    uncached = usage.prompt_tokens - usage.cached_tokens
    return (
        uncached * input_rate + usage.cached_tokens * cached_rate
    ) / MTOK + usage.completion_tokens * output_rate / MTOK


def usage(
    prompt: int, completion: int, cached: int = 0, reasoning: int = 0, total: int | None = None
) -> UsageCounts:
    return UsageCounts(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
        total_tokens=prompt + completion if total is None else total,
    )


@pytest.fixture
def book(monkeypatch: pytest.MonkeyPatch) -> PriceBook:
    monkeypatch.delenv(PRICES_ENV, raising=False)
    return PriceBook.load()


# --- usage parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            usage(10, 5),
            id="openai-plain",
        ),
        pytest.param(
            {
                "prompt_tokens": 2006,
                "completion_tokens": 300,
                "total_tokens": 2306,
                "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0},
            },
            usage(2006, 300, cached=1920, reasoning=256),
            id="openai-cached-and-reasoning",
        ),
        pytest.param(
            {
                "prompt_tokens": 7,
                "completion_tokens": 3,
                "total_tokens": None,
                "prompt_tokens_details": None,
                "completion_tokens_details": {"reasoning_tokens": None},
            },
            usage(7, 3),
            id="null-fields",
        ),
        pytest.param({"prompt_tokens": 7, "completion_tokens": 3}, usage(7, 3), id="no-total"),
        # A part missing is what the total leaves; with no total, or nothing but the total,
        # the answer's use is unknown (it was priced at $0 for the part not given).
        pytest.param({"completion_tokens": 3}, None, id="no-prompt"),
        pytest.param({"prompt_tokens": 1000}, None, id="no-completion"),
        pytest.param({"total_tokens": 1000}, None, id="only-total"),
        pytest.param({"prompt_tokens": 7, "total_tokens": 10}, usage(7, 3), id="prompt-and-total"),
        pytest.param(
            {"completion_tokens": 3, "total_tokens": 10}, usage(7, 3), id="completion-and-total"
        ),
        pytest.param(
            {
                "prompt_tokens": 100,
                "completion_tokens": 20,
                "total_tokens": 120,
                "input_tokens": 999,
                "output_tokens": 888,
                "text_tokens": 70,
                "image_tokens": 30,
                "cache_read_input_tokens": 40,
                "prompt_tokens_details": {"cached_tokens": 10},
            },
            usage(100, 20, cached=10),
            id="gateway-extras-do-not-override",
        ),
        pytest.param(
            {
                "prompt_tokens": 100,
                "completion_tokens": 20,
                "total_tokens": 120,
                "cache_read_input_tokens": 40,
                "text_tokens": 70,
                "image_tokens": 30,
            },
            usage(100, 20, cached=40),
            id="gateway-cache-read-when-no-detail",
        ),
        pytest.param(
            {
                "input_tokens": 500,
                "output_tokens": 80,
                "total_tokens": 580,
                "input_tokens_details": {"cached_tokens": 128},
                "output_tokens_details": {"reasoning_tokens": 64},
            },
            usage(500, 80, cached=128, reasoning=64),
            id="input-output-names",
        ),
        pytest.param(
            {
                "input_tokens": 50,
                "output_tokens": 30,
                "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": 200,
            },
            usage(1250, 30, cached=1000),
            id="anthropic-shaped",
        ),
        pytest.param(
            {
                "prompt_tokens": 21,
                "completion_tokens": 0,
                "total_tokens": 81,
                "completion_tokens_details": {"reasoning_tokens": 60},
            },
            usage(21, 60, reasoning=60, total=81),
            id="reasoning-left-out-of-completion",
        ),
        pytest.param(
            {
                "prompt_tokens": 21,
                "completion_tokens": 60,
                "total_tokens": 81,
                "completion_tokens_details": {"reasoning_tokens": 60},
            },
            usage(21, 60, reasoning=60),
            id="reasoning-inside-completion",
        ),
        pytest.param(
            {"prompt_tokens": 20, "completion_tokens": 151, "total_tokens": 553},
            usage(20, 533, reasoning=382, total=553),
            id="reasoning-only-in-the-total",
        ),
        pytest.param(
            {
                "prompt_tokens": 1000,
                "completion_tokens": 10,
                "total_tokens": 1010,
                "prompt_cache_hit_tokens": 900,
                "prompt_cache_miss_tokens": 100,
            },
            usage(1000, 10, cached=900),
            id="deepseek-cache-hits",
        ),
        pytest.param(
            {"prompt_tokens": 12.0, "completion_tokens": 3.0, "total_tokens": 15.0},
            usage(12, 3),
            id="whole-floats",
        ),
        pytest.param(
            {"prompt_tokens": "12", "completion_tokens": -1, "total_tokens": True},
            None,
            id="junk-values-only",
        ),
        pytest.param(
            {
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 9},
            },
            usage(5, 1, cached=5),
            id="cached-capped-at-prompt",
        ),
        pytest.param({}, None, id="empty-usage"),
    ],
)
def test_usage_from_completion(raw: dict[str, Any], expected: UsageCounts | None) -> None:
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": raw}
    assert usage_from_completion(completion) == expected
    assert usage_from_json_text(orjson.dumps(completion).decode()) == expected


@pytest.mark.parametrize(
    "completion", [{}, {"usage": None}, {"usage": [1, 2]}, {"usage": "10 tokens"}]
)
def test_no_usage_is_none(completion: dict[str, Any]) -> None:
    assert usage_from_completion(completion) is None


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", "null", '{"usage": {"prompt_tok'])
def test_usage_from_bad_json_text_is_none(text: str) -> None:
    assert usage_from_json_text(text) is None


def test_usage_from_json_bytes() -> None:
    assert usage_from_json_text(
        b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    ) == usage(3, 4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
usage_keys = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        "input_tokens_details",
        "output_tokens_details",
    ]
)
usage_values = (
    st.integers(min_value=-5, max_value=10**7)
    | json_values
    | st.fixed_dictionaries(
        {}, optional={"cached_tokens": json_values | st.integers(), "reasoning_tokens": json_values}
    )
)


@given(raw=st.dictionaries(usage_keys, usage_values))
def test_any_usage_object_parses_to_sane_counts(raw: dict[str, Any]) -> None:
    counts = usage_from_completion({"usage": raw})
    if counts is None:
        return
    assert min(counts.prompt_tokens, counts.completion_tokens, counts.total_tokens) >= 0
    assert 0 <= counts.cached_tokens <= counts.prompt_tokens
    assert 0 <= counts.reasoning_tokens <= counts.completion_tokens
    # What results' integer columns hold (PostgreSQL's is 32 bits).
    assert max(counts.prompt_tokens, counts.completion_tokens, counts.total_tokens) < 2**31


# --- genai-prices costs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "provider_id", "rates"),
    [
        ("gpt-4o", "openai", GPT_4O),
        ("o3-mini", "openai", O3_MINI),
        ("o4-mini", "openai", O4_MINI),
    ],
)
def test_bundled_rates_are_the_ones_these_tests_assume(
    model: str, provider_id: str, rates: tuple[Decimal, Decimal, Decimal]
) -> None:
    price = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=0, output_tokens=0), model, provider_id=provider_id
    ).model_price
    assert (price.input_mtok, price.cache_read_mtok, price.output_mtok) == rates


@pytest.mark.parametrize(
    ("model", "counts", "rates", "expected"),
    [
        # 6,000 x 2.50 + 4,000 x 1.25 + 2,000 x 10 per million = 0.015 + 0.005 + 0.02
        ("gpt-4o", usage(10_000, 2_000, cached=4_000), GPT_4O, Decimal("0.04")),
        ("gpt-4o-2024-08-06", usage(1_000, 100), GPT_4O, Decimal("0.0035")),
        ("openai/gpt-4o", usage(1_000, 100), GPT_4O, Decimal("0.0035")),
        # Reasoning is inside completion: 1,000 x 1.10 + 5,000 x 4.40, not 9,000 x 4.40.
        ("o3-mini", usage(1_000, 5_000, reasoning=4_000), O3_MINI, Decimal("0.0231")),
        # 8,000 x 1.10 + 12,000 x 0.275 + 3,000 x 4.40 = 0.0088 + 0.0033 + 0.0132
        (
            "o4-mini",
            usage(20_000, 3_000, cached=12_000, reasoning=2_500),
            O4_MINI,
            Decimal("0.0253"),
        ),
        # Tiers are cliffs on the prompt size: past 200k every token pays the higher rate.
        # 150,000 x 1.25 + 50,000 x 0.125 + 1,000 x 10 = 0.1875 + 0.00625 + 0.01
        (
            "gemini-2.5-pro",
            usage(200_000, 1_000, cached=50_000),
            GEMINI_25_PRO_UP_TO_200K,
            Decimal("0.20375"),
        ),
        # 150,001 x 2.50 + 50,000 x 0.25 + 1,000 x 15 = 0.3750025 + 0.0125 + 0.015
        (
            "gemini-2.5-pro",
            usage(200_001, 1_000, cached=50_000),
            GEMINI_25_PRO_OVER_200K,
            Decimal("0.4025025"),
        ),
    ],
)
def test_cost_by_hand(
    book: PriceBook,
    model: str,
    counts: UsageCounts,
    rates: tuple[Decimal, Decimal, Decimal],
    expected: Decimal,
) -> None:
    assert by_hand(rates, counts) == expected
    assert book.cost(model, counts) == expected


@pytest.mark.parametrize(
    ("hour_utc", "rates"),
    [
        (12, DEEPSEEK_CHAT_0030_1630_UTC),
        (20, DEEPSEEK_CHAT_OTHER_HOURS),
        (0, DEEPSEEK_CHAT_OTHER_HOURS),
    ],
)
def test_prices_that_change_by_time_of_day(
    book: PriceBook, hour_utc: int, rates: tuple[Decimal, Decimal, Decimal]
) -> None:
    counts = usage(100_000, 10_000, cached=60_000)
    at = datetime(2025, 3, 4, hour_utc, 0, tzinfo=UTC)
    assert book.cost("deepseek-chat", counts, at=at) == by_hand(rates, counts)


@pytest.mark.parametrize(
    "model", ["gpt-4o", "o3", "deepseek-chat", "gemini-2.5-pro", "claude-sonnet-4"]
)
@given(
    prompt=st.integers(min_value=0, max_value=400_000),
    completion=st.integers(min_value=0, max_value=100_000),
    cached_share=st.fractions(min_value=0, max_value=1),
    reasoning_share=st.fractions(min_value=0, max_value=1),
    day=st.integers(min_value=1, max_value=28),
    hour=st.integers(min_value=0, max_value=23),
)
def test_cost_agrees_with_genai_prices_and_stays_under_the_worst_case(
    model: str,
    prompt: int,
    completion: int,
    cached_share: Any,
    reasoning_share: Any,
    day: int,
    hour: int,
) -> None:
    cached, reasoning = int(prompt * cached_share), int(completion * reasoning_share)
    at = datetime(2025, 7, day, hour, tzinfo=UTC)
    book = PriceBook()
    cost = book.cost(model, usage(prompt, completion, cached, reasoning), at=at)
    reference = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=prompt, cache_read_tokens=cached, output_tokens=completion),
        model,
        genai_request_timestamp=at,
    ).total_price
    assert cost == reference
    worst = book.worst_case_cost(model, prompt, completion, at=at)
    assert worst is not None and cost <= worst


def test_worst_case_cost(book: PriceBook) -> None:
    # Every prompt token at the full input price, the whole cap at the output price.
    assert book.worst_case_cost("gpt-4o", 1_000, 500) == Decimal("0.0075")
    assert book.worst_case_cost("o3-mini", 0, 100_000) == Decimal("0.44")
    assert book.worst_case_cost("no-such-model", 1_000, 500) is None


@pytest.mark.parametrize(
    "model", ["no-such-model-xyz", "tts-1", "whisper-1", "", "vendor/no-such-model-xyz"]
)
def test_unknown_price_is_none_never_zero(book: PriceBook, model: str) -> None:
    assert book.cost(model, usage(1_000, 1_000)) is None
    assert not book.is_known(model)


def test_free_models_cost_zero(book: PriceBook) -> None:
    assert book.is_known("meta-llama/llama-3.3-70b-instruct:free")
    assert book.cost("meta-llama/llama-3.3-70b-instruct:free", usage(1_000, 1_000)) == 0


@pytest.mark.parametrize(
    "model", ["gpt-4o", "o3-mini", "gemini-2.5-pro", "anthropic/claude-sonnet-4"]
)
def test_known_models(book: PriceBook, model: str) -> None:
    assert book.is_known(model)


# --- user prices ---------------------------------------------------------------------------

USER_PRICES = """
[models."deepseek-chat"]
match = "deepseek-*"
input_per_mtok = 0.27
cached_input_per_mtok = 0.07
output_per_mtok = 1.10

[models.gpt-4o]
input_per_mtok = 3
output_per_mtok = 12

[models."my-org/finetune"]
input_per_mtok = 0
output_per_mtok = 0.5
"""


def test_user_prices_override_and_add(tmp_path: Path, book: PriceBook) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(USER_PRICES)
    user = PriceBook.load(path)
    counts = usage(10_000, 2_000, cached=4_000, reasoning=500)
    # 6,000 x 0.27 + 4,000 x 0.07 + 2,000 x 1.10 per million
    assert user.cost("deepseek-chat", counts) == Decimal("0.0041")
    assert user.cost("deepseek-reasoner", counts) == Decimal("0.0041")
    # No cached price given: cached tokens pay the input price.
    assert user.cost("gpt-4o", counts) == Decimal("0.054")
    assert user.cost("gpt-4o-mini", counts) == book.cost("gpt-4o-mini", counts)
    assert user.cost("my-org/finetune", counts) == Decimal("0.001")
    assert user.worst_case_cost("gpt-4o", 1_000, 1_000) == Decimal("0.015")
    assert user.is_known("deepseek-v3")


@pytest.mark.parametrize(
    "answered",
    ["gpt-4o-2024-08-06", "openai/gpt-4o", "openai/gpt-4o-2024-08-06", "gpt-4o@2024-08-06"],
)
def test_a_file_price_holds_for_the_names_an_api_answers_with(
    tmp_path: Path, book: PriceBook, answered: str
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(USER_PRICES)
    user = PriceBook.load(path)
    # The file's $3 per million, not the list price the bundled data has for the snapshot.
    assert user.cost(answered, usage(1_000_000, 0)) == Decimal("3")
    assert book.cost(answered, usage(1_000_000, 0)) != Decimal("3")
    # A name the file does not hold, even one that starts like one it does, is not its price.
    assert user.cost("gpt-4o-mini-2024-07-18", usage(1_000_000, 0)) == book.cost(
        "gpt-4o-mini-2024-07-18", usage(1_000_000, 0)
    )


@pytest.mark.parametrize("answered", ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"])
def test_a_file_price_of_a_prefixed_name_holds_for_the_name_without_it(
    tmp_path: Path, book: PriceBook, answered: str
) -> None:
    """A price file keyed by the name the request gives (LiteLLM's "openai/gpt-4o-mini"), an
    answer named without the prefix: priced at the list price, where the run had reserved at
    the file's."""
    path = tmp_path / "prices.toml"
    path.write_text('[models."openai/gpt-4o-mini"]\ninput_per_mtok = 1\noutput_per_mtok = 10\n')
    user = PriceBook.load(path)
    assert user.cost(answered, usage(1_000_000, 0)) == Decimal("1")
    assert user.cost("openai/gpt-4o-mini", usage(0, 1_000_000)) == Decimal("10")
    assert user.cost("gpt-4o", usage(1_000_000, 0)) == book.cost("gpt-4o", usage(1_000_000, 0))


@pytest.mark.parametrize("answered", ["openai/my-org/finetune", "a/b/my-org/finetune"])
def test_a_file_price_of_a_name_with_a_slash_holds_behind_a_gateway_prefix(
    tmp_path: Path, answered: str
) -> None:
    """A gateway that prefixes a name that has a slash of its own: only the last part
    ("finetune") was tried besides the whole name, and the cost was unknown."""
    path = tmp_path / "prices.toml"
    path.write_text(USER_PRICES)
    assert PriceBook.load(path).cost(answered, usage(0, 1_000_000)) == Decimal("0.5")


def test_prices_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(USER_PRICES)
    monkeypatch.setenv(PRICES_ENV, str(path))
    assert PriceBook.load().cost("gpt-4o", usage(1_000_000, 0)) == Decimal("3")
    other = tmp_path / "other.toml"
    other.write_text("[models.gpt-4o]\ninput_per_mtok = 5\noutput_per_mtok = 20\n")
    assert PriceBook.load(other).cost("gpt-4o", usage(1_000_000, 0)) == Decimal("5")


def test_constructed_price_book() -> None:
    rates = ModelRates(Decimal("1"), Decimal("0.5"), Decimal("2"))
    book = PriceBook({"m": rates}, patterns=(("team-*", rates),))
    assert book.cost("m", usage(1_000_000, 1_000_000, cached=1_000_000)) == Decimal("2.5")
    assert book.cost("team-a", usage(0, 1_000_000)) == Decimal("2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.x\ninput_per_mtok = 1", "not valid TOML"),
        ("[models.x]\ninput_per_mtok = 1\n", "models.x.output_per_mtok: missing"),
        ("[models.x]\noutput_per_mtok = 1\n", "models.x.input_per_mtok: missing"),
        (
            "[models.x]\ninput_per_mtok = -1\noutput_per_mtok = 1\n",
            "models.x.input_per_mtok: must be zero or more",
        ),
        (
            "[models.x]\ninput_per_mtok = 1\noutput_per_mtok = -0.5\n",
            "models.x.output_per_mtok: must be zero or more",
        ),
        (
            '[models.x]\ninput_per_mtok = "1"\noutput_per_mtok = 1\n',
            "models.x.input_per_mtok: must be a number",
        ),
        ("[models.x]\ninput_per_mtok = true\noutput_per_mtok = 1\n", "must be a number"),
        ("[models.x]\ninput_per_mtok = nan\noutput_per_mtok = 1\n", "must be zero or more"),
        (
            "[models.x]\ninput_per_mtok = 1\noutput_per_mtok = 1\ncached_input_per_mtok = -1\n",
            "cached_input_per_mtok",
        ),
        (
            "[models.x]\ninput_per_mtok = 1\nouput_per_mtok = 1\n",
            "models.x.ouput_per_mtok: unknown key",
        ),
        ("[models.x]\ninput_per_mtok = 1\noutput_per_mtok = 1\nmatch = 3\n", "models.x.match"),
        ('[models."a.b"]\ninput_per_mtok = 1\n', 'models."a.b".output_per_mtok: missing'),
        ("models = 3\n", "'models' must be a table"),
        ("[models]\nx = 3\n", "models.x: must be a table"),
        ("[prices.x]\ninput_per_mtok = 1\n", "unknown key 'prices'"),
    ],
)
def test_bad_price_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        PriceBook.load(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_missing_price_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(UsageError, match="cannot read the price file") as caught:
        PriceBook.load(path)
    assert str(path) in str(caught.value)


def test_no_price_file_means_genai_prices_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PRICES_ENV, "")
    assert PriceBook.load().cost("gpt-4o", usage(1_000_000, 0)) == GPT_4O[0]


# --- offline -------------------------------------------------------------------------------


def test_prices_and_token_counts_work_without_network() -> None:
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network is off in this test")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from batchrunner.pricing import PriceBook, UsageCounts
        from batchrunner.tokens import count_prompt_tokens

        book = PriceBook.load()
        print(book.cost("gpt-4o", UsageCounts(1000, 100, 0, 0, 1100)))
        hello = [{"role": "user", "content": "hi"}]
        print(count_prompt_tokens({"model": "gpt-4", "messages": hello}))
        print(count_prompt_tokens({"model": "gpt-4o", "messages": hello}))
        """
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    cost, cl100k_count, o200k_count = done.stdout.split()
    assert Decimal(cost) == Decimal("0.0035")
    assert int(cl100k_count) == int(o200k_count) == 3 + 1 + 1 + 3


@pytest.mark.parametrize(
    ("model", "prompts"),
    [
        ("gpt-4o-mini", [1_000, 2_000, 50_000]),
        ("perplexity/sonar", [100, 2_000]),  # a fee per request besides the tokens
        ("gemini-2.5-pro", [250_000, 300_000]),  # all past the 200k tier start
    ],
)
def test_a_group_costs_what_its_requests_cost_one_by_one(
    book: PriceBook, model: str, prompts: list[int]
) -> None:
    shape = book.shape(model)
    assert shape is not None
    tier = sum(start < prompts[0] for start in shape.tier_starts)
    one_by_one = [book.tokens_cost(model, p, p // 4, 300, 0) for p in prompts]
    assert all(cost is not None for cost in one_by_one)
    together = book.group_cost(
        model,
        len(prompts),
        sum(prompts),
        sum(p // 4 for p in prompts),
        300 * len(prompts),
        0,
        tier_prompt=shape.tier_prompt(tier),
    )
    assert together == sum(one_by_one, Decimal(0))  # type: ignore[arg-type]


def test_price_shapes(book: PriceBook) -> None:
    assert book.shape("no-such-model-anywhere") is None
    deepseek = book.shape("deepseek-chat")
    assert deepseek is not None and deepseek.varies_in_time and deepseek.tier_starts == ()
    gemini = book.shape("gemini-2.5-pro")
    assert gemini is not None and not gemini.varies_in_time and 200_000 in gemini.tier_starts
    assert gemini.tier_prompt(0) == 0
    assert gemini.tier_prompt(1) == gemini.tier_starts[0] + 1


@pytest.mark.parametrize(
    ("key", "answered"),
    [
        ("claude-3-5-sonnet@20241022", "claude-3-5-sonnet-20241022"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet@20241022"),
        ("vertex_ai/claude-3-5-sonnet@20241022", "claude-3-5-sonnet-20241022"),
        ("gemini-1.5-pro@002", "gemini-1.5-pro-002"),
        ("my-model@20250101", "my-model-20250101"),
    ],
)
def test_a_file_price_of_a_snapshot_holds_for_its_date_after_a_dash_or_an_at(
    tmp_path: Path, key: str, answered: str
) -> None:
    """Vertex writes a snapshot's date after "@", other APIs after "-": the same snapshot,
    which the file prices either way (a model no list has was unknown, and --max-cost then
    refused to run its batch)."""
    path = tmp_path / "prices.toml"
    path.write_text(f'[models."{key}"]\ninput_per_mtok = 1.25\noutput_per_mtok = 10\n')
    user = PriceBook.load(path)
    assert user.cost(answered, usage(1_000_000, 0)) == Decimal("1.25")
    # Another date is another snapshot.
    other = answered.replace("2024", "2023").replace("2025", "2023").replace("002", "001")
    assert user.cost(other, usage(1_000_000, 0)) != Decimal("1.25")


@pytest.mark.parametrize(
    ("key", "answered"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o-2024-05-13"),
        ("openai/gpt-4o-2024-08-06", "gpt-4o-2024-05-13"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
    ],
)
def test_a_file_price_of_a_snapshot_is_not_another_snapshots(
    tmp_path: Path, book: PriceBook, key: str, answered: str
) -> None:
    """A file's price for one dated snapshot priced every other snapshot of the model (and its
    undated name) at it: a gateway's $2.50 a million prompt tokens for gpt-4o-2024-05-13, listed
    at $5, and `--max-cost` reserved at it too. Its own snapshot, with or without a prefix,
    keeps it. (The file's price here is one no list has.)"""
    path = tmp_path / "prices.toml"
    path.write_text(f'[models."{key}"]\ninput_per_mtok = 1.25\noutput_per_mtok = 10\n')
    user = PriceBook.load(path)
    assert user.cost(answered, usage(1_000_000, 0)) == book.cost(answered, usage(1_000_000, 0))
    assert book.cost(answered, usage(1_000_000, 0)) != Decimal("1.25")
    assert user.cost("gpt-4o-2024-08-06", usage(1_000_000, 0)) == Decimal("1.25")
    assert user.cost("openai/gpt-4o-2024-08-06", usage(1_000_000, 0)) == Decimal("1.25")
