"""Token usage -> cost in US dollars, offline.

Prices come from a user's TOML file first (gateways resell at their own prices), then from the
price data bundled with `genai-prices` (never fetched: its updater is not started). A model
whose price is unknown costs None, never 0.

Usage follows OpenAI's convention: cached prompt tokens are part of `prompt_tokens` and are
billed at the cached rate; reasoning tokens are part of `completion_tokens` and are billed as
output, once.
"""

from __future__ import annotations

import abc
import bisect
import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from batchrunner.errors import UsageError

if TYPE_CHECKING:
    # genai-prices costs ~0.1 s to import and is needed only to price a model that no price
    # file names: imported where used, so that a run without a budget never pays for it.
    from genai_prices import types as genai_types

#: Environment variable naming a price file, used when no path is given.
PRICES_ENV: Final = "BATCHRUNNER_PRICES"
TOKENS_PER_MTOK: Final = 1_000_000

# genai-prices' bundled data lists OpenAI's own models under "openai"; names it cannot place
# there are matched against every provider's model patterns.
_OPENAI_PROVIDER: Final = "openai"
_OPENROUTER_PROVIDER: Final = "openrouter"
_USER_KEYS: Final = frozenset(
    {"input_per_mtok", "cached_input_per_mtok", "output_per_mtok", "match"}
)
# Price keys that can be computed from token counts; a model priced only by characters, audio
# hours or pages cannot be priced from a chat completion's usage.
_TOKEN_PRICE_KEYS: Final = frozenset({"input_mtok", "output_mtok", "cache_read_mtok"})
_ZERO: Final = Decimal(0)


# Not frozen: one is made for every request, and a frozen dataclass's __init__ (a call to
# object.__setattr__ per field) costs three times as much. Treat it as read-only all the same.
@dataclass(slots=True)
class UsageCounts:
    """The token counts of one completion, in OpenAI's terms."""

    #: All prompt tokens, cached ones included.
    prompt_tokens: int
    #: All output tokens, reasoning ones included.
    completion_tokens: int
    #: Prompt tokens served from the provider's prompt cache.
    cached_tokens: int
    #: Output tokens spent on hidden reasoning.
    reasoning_tokens: int
    total_tokens: int


def usage_from_completion(obj: Mapping[str, Any]) -> UsageCounts | None:
    """The usage of a chat-completion object; None when it reports none.

    Reads OpenAI's `prompt_tokens`, `completion_tokens`, `total_tokens`,
    `prompt_tokens_details.cached_tokens` and `completion_tokens_details.reasoning_tokens`.
    Missing or null fields count 0; a missing total is prompt + completion. Gateways add their
    own fields; they are used only where the standard ones are absent:

    * `input_tokens` / `output_tokens` (with `input_tokens_details.cached_tokens` and
      `output_tokens_details.reasoning_tokens`) stand in for absent prompt / completion counts.
      Anthropic-shaped usage (`input_tokens` beside `cache_read_input_tokens` /
      `cache_creation_input_tokens`, with no cached-token detail) excludes cache reads and
      writes from `input_tokens`: they are added back so the prompt count is complete.
    * `cache_read_input_tokens`, else DeepSeek's `prompt_cache_hit_tokens`, stands in for an
      absent `cached_tokens`.
    * Some gateways in front of Gemini leave reasoning out of `completion_tokens` while their
      total includes it (total = prompt + completion + reasoning): the reasoning is added to
      the completion, where OpenAI counts it and where it is billed. Where they give no
      reasoning count at all, what the total holds beyond prompt and completion is that
      reasoning (Gemini's thoughts).

    Breakdowns such as `text_tokens` and `image_tokens` are parts of the prompt and are ignored.
    """
    usage = obj.get("usage")
    # `type(...) is dict` first: parsed JSON is plain dicts, and the ABC check costs more than
    # the rest of reading the usage (run once per answer).
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return None
    return _usage_counts(usage)


def usage_from_json_text(text: str | bytes) -> UsageCounts | None:
    """`usage_from_completion` of a completion object given as JSON text; None when the text
    is not a JSON object or reports no usage."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return usage_from_completion(obj) if isinstance(obj, dict) else None


@dataclass(frozen=True, slots=True)
class ModelRates:
    """Prices of one model in US dollars per million tokens."""

    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal
    output_per_mtok: Decimal


class PriceBook:
    """Prices per model: the user's own first, then genai-prices' bundled data.

    `cost` is called for every exported row, so each model is looked up once and its per-token
    rates are derived once (with genai-prices' own arithmetic) per price set and prompt-size
    tier; each row is then plain Decimal arithmetic.
    """

    def __init__(
        self,
        models: Mapping[str, ModelRates] | None = None,
        patterns: tuple[tuple[str, ModelRates], ...] = (),
    ) -> None:
        """`models`: exact model names; `patterns`: (glob, rates) tried in order after them."""
        self._models = dict(models or {})
        self._patterns = patterns
        self._pricers: dict[str, _Pricer | None] = {}

    @classmethod
    def load(cls, path: Path | None = None) -> PriceBook:
        """Prices from `path`, else the file named by $BATCHRUNNER_PRICES, else genai-prices only.

        The file is TOML, one table per model, numbers in US dollars per million tokens::

            [models."deepseek-chat"]
            match = "deepseek-*"           # optional: also price names matching this glob
            input_per_mtok = 0.27
            cached_input_per_mtok = 0.07   # optional; default = input price
            output_per_mtok = 1.10
        """
        if path is None:
            env_path = os.environ.get(PRICES_ENV)
            if not env_path:
                return cls()
            path = Path(env_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{path}: cannot read the price file: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: the price file is not UTF-8 text") from exc
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<prices>") -> PriceBook:
        """Prices from TOML text (see `load`); `source` names it in error messages."""
        try:
            # parse_float=Decimal: 1.10 stays exactly 1.10, not the nearest binary float.
            document = tomllib.loads(text, parse_float=Decimal)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{source}: not valid TOML: {exc}") from exc
        unknown = sorted(set(document) - {"models"})
        if unknown:
            raise UsageError(
                f'{source}: unknown key {unknown[0]!r}; prices go under [models."NAME"]'
            )
        tables = document.get("models", {})
        if not isinstance(tables, dict):
            raise UsageError(f"{source}: 'models' must be a table of [models.\"NAME\"] tables")
        models: dict[str, ModelRates] = {}
        patterns: list[tuple[str, ModelRates]] = []
        for name, table in tables.items():
            where = f"{source}: models.{_toml_key(name)}"
            if not isinstance(table, dict):
                raise UsageError(
                    f"{where}: must be a table with input_per_mtok and output_per_mtok"
                )
            rates, pattern = _parse_model_table(table, where)
            models[name] = rates
            if pattern is not None:
                patterns.append((pattern, rates))
        return cls(models, tuple(patterns))

    def is_known(self, model: str) -> bool:
        """Whether `model` has a price (user file or genai-prices)."""
        return self._pricer(model) is not None

    def cost(self, model: str, usage: UsageCounts, *, at: datetime | None = None) -> Decimal | None:
        """US dollars `usage` cost on `model`; None when the model's price is unknown.

        `at` is when the request ran (default now): some providers' prices change on a date or
        by time of day (DeepSeek's off-peak hours).
        """
        return self.tokens_cost(
            model,
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.completion_tokens,
            usage.reasoning_tokens,
            at=at,
        )

    def tokens_cost(
        self,
        model: str,
        prompt: int,
        cached: int,
        completion: int,
        reasoning: int,
        *,
        at: datetime | None = None,
    ) -> Decimal | None:
        """`cost` from the token counts themselves: export prices every row of a batch, and
        building a `UsageCounts` for each cost about as much as the arithmetic."""
        try:
            pricer = self._pricers[model]
        except KeyError:
            pricer = self._pricer(model)
        if pricer is None:
            return None
        if cached > prompt:
            cached = prompt
        if reasoning > completion:
            reasoning = completion
        rates = pricer.rates(at, prompt)
        return (
            rates.per_request
            + (prompt - cached) * rates.input_per_token
            + cached * rates.cached_per_token
            + (completion - reasoning) * rates.output_per_token
            + reasoning * rates.reasoning_per_token
        )

    def shape(self, model: str) -> PriceShape | None:
        """What `model`'s price depends on besides token counts; None when it has no price."""
        pricer = self._pricer(model)
        return None if pricer is None else pricer.shape

    def group_cost(
        self,
        model: str,
        requests: int,
        prompt: int,
        cached: int,
        completion: int,
        reasoning: int,
        *,
        tier_prompt: int = 0,
        at: datetime | None = None,
    ) -> Decimal | None:
        """The cost of `requests` requests from the sums of their token counts, priced as one
        request of `tier_prompt` prompt tokens at `at` would be: exact when every one of them
        fell in that prompt-size tier and that price period (see `shape`). None when the model's
        price is unknown."""
        pricer = self._pricer(model)
        if pricer is None:
            return None
        cached = min(cached, prompt)
        reasoning = min(reasoning, completion)
        rates = pricer.rates(at, tier_prompt)
        return (
            requests * rates.per_request
            + (prompt - cached) * rates.input_per_token
            + cached * rates.cached_per_token
            + (completion - reasoning) * rates.output_per_token
            + reasoning * rates.reasoning_per_token
        )

    def worst_case_cost(
        self,
        model: str,
        prompt_tokens: int,
        max_output_tokens: int,
        *,
        at: datetime | None = None,
    ) -> Decimal | None:
        """The most a request can cost: every prompt token at the full input price (no cache
        hits) and `max_output_tokens` at the output price (for `n` choices, pass the cap times
        n). None when the model's price is unknown."""
        pricer = self._pricer(model)
        if pricer is None:
            return None
        rates = pricer.rates(at, prompt_tokens)
        output_per_token = max(rates.output_per_token, rates.reasoning_per_token)
        return (
            rates.per_request
            + prompt_tokens * rates.input_per_token
            + max_output_tokens * output_per_token
        )

    def price_times(self, model: str, now: datetime | None = None) -> list[datetime | None]:
        """Times within the next day, one for each price `model` has then: [None] (the price
        now) for a model whose price does not change with the time, or is not known. An
        estimate made in the evening of DeepSeek's off-peak hours took their price for the
        most a batch run in the day can cost (a quarter of it)."""
        pricer = self._pricer(model)
        if pricer is None or not pricer.shape.varies_in_time:
            return [None]
        now = now or datetime.now(tz=UTC)
        first = int(now.timestamp()) // PRICE_PERIOD_S
        times: dict[object, datetime] = {}
        for period in range(first, first + 86_400 // PRICE_PERIOD_S):
            at = price_period_time(period)
            times.setdefault(pricer.price_set(at), at)
        return list(times.values())

    def _pricer(self, model: str) -> _Pricer | None:
        try:
            return self._pricers[model]
        except KeyError:
            pricer = self._pricers[model] = self._find(model)
            return pricer

    def _find(self, model: str) -> _Pricer | None:
        rates = self._models.get(model)
        if rates is None:
            rates = next(
                (rates for pattern, rates in self._patterns if fnmatch.fnmatchcase(model, pattern)),
                None,
            )
        if rates is None:
            # APIs answer with other names for the model asked for: the file's price of
            # "gpt-4o" must not give way to the list price of "gpt-4o-2024-08-06".
            rates = next(
                (self._models[n] for n in same_model_names(model) if n in self._models), None
            )
        if rates is None and self._models:
            # ...and the file's name may carry the gateway's prefix the answer comes without:
            # "openai/gpt-4o-mini" answered as "gpt-4o-mini-2024-07-18" was priced at the list
            # price (the request was reserved at the file's, three times as much). Only the
            # prefix: a file's snapshot ("gpt-4o-2024-08-06") is not the price of another; it is
            # its own, whether its date follows a "-" or Vertex's "@".
            for name in (model, *same_model_names(model)):
                snapshot = _dashed(name)
                rates = next(
                    (
                        r
                        for key, r in self._models.items()
                        if snapshot in (_dashed(k) for k in (key, *_without_prefixes(key)))
                    ),
                    None,
                )
                if rates is not None:
                    break
        if rates is not None:
            return _UserPricer(rates)
        return _find_genai_model(model)


# A snapshot's date or version at the end of a model's name: gpt-4o-2024-08-06,
# claude-3-5-sonnet-20241022, claude-3-5-sonnet@20241022 (Vertex), gpt-4-0613,
# mistral-large-2411, gemini-1.5-pro-002.
_SNAPSHOT_SUFFIX: Final = re.compile(r"[-@](?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|\d{3})$")


def dollars(amount: Decimal) -> str:
    """An amount of US dollars as messages show it: small batches cost fractions of a cent,
    which four decimals showed as $0.0000."""
    return f"${amount:.4f}" if amount >= 1 else f"${amount:.6f}"


def same_model_names(model: str) -> list[str]:
    """Shorter names of the model `model` names, most specific first: without a gateway's or
    an API's prefix ("openai/gpt-4o", "models/gemini-2.0-flash"; one prefix at a time, so that
    "openai/meta-llama/llama-3.3-70b-instruct" is also "meta-llama/llama-3.3-70b-instruct") and
    without a snapshot's date or version ("gpt-4o-2024-08-06")."""
    names: list[str] = []
    parts = model.split("/")
    for name in ["/".join(parts[i:]) for i in range(len(parts))]:
        undated = _SNAPSHOT_SUFFIX.sub("", name)
        for candidate in (name, undated):
            if candidate and candidate != model and candidate not in names:
                names.append(candidate)
    return names


def _dashed(model: str) -> str:
    """`model` with the "@" before a snapshot's date or version (Vertex's
    "claude-3-5-sonnet@20241022") as the "-" other APIs write there."""
    found = _SNAPSHOT_SUFFIX.search(model)
    if found is None or model[found.start()] != "@":
        return model
    return f"{model[: found.start()]}-{model[found.start() + 1 :]}"


def _without_prefixes(model: str) -> list[str]:
    """`model` without its prefixes, one at a time ("a/b/c": "b/c", "c"); none without one."""
    parts = model.split("/")
    return ["/".join(parts[i:]) for i in range(1, len(parts))]


# --- usage parsing -----------------------------------------------------------------------


#: Token counts above this are not counts: no request comes near it (the largest context
#: windows hold a few million tokens). A usage object from a broken or hostile gateway could
#: carry anything; counts past what results' integer columns hold would fail every write of
#: the run, and of every run after it, each sending the request again. The sums `_usage_counts`
#: makes of a few counts stay within those columns too.
MAX_TOKEN_COUNT = 2**28


def _count(value: object) -> int | None:
    """A token count, or None for anything that is not a whole number from 0 to
    MAX_TOKEN_COUNT."""
    if type(value) is int:
        return value if 0 <= value <= MAX_TOKEN_COUNT else None
    if type(value) is float and 0 <= value <= MAX_TOKEN_COUNT and value.is_integer():
        return int(value)
    return None


def _detail(usage: Mapping[str, Any], field: str, key: str) -> int | None:
    details = usage.get(field)
    if type(details) is dict or isinstance(details, Mapping):
        return _count(details.get(key))
    return None


def _usage_counts(usage: Mapping[str, Any]) -> UsageCounts | None:
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is not None:
        cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
        if cached is None:
            cached = _count(usage.get("cache_read_input_tokens"))
        if cached is None:
            cached = _count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek's
    else:
        prompt = _count(usage.get("input_tokens"))
        cached = _detail(usage, "input_tokens_details", "cached_tokens")
        if prompt is not None and cached is None:
            cache_read = _count(usage.get("cache_read_input_tokens"))
            cache_write = _count(usage.get("cache_creation_input_tokens"))
            if cache_read is not None or cache_write is not None:
                prompt += (cache_read or 0) + (cache_write or 0)
                cached = cache_read
    completion = _count(usage.get("completion_tokens"))
    reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    if completion is None:
        completion = _count(usage.get("output_tokens"))
        if reasoning is None:
            reasoning = _detail(usage, "output_tokens_details", "reasoning_tokens")
    total = _count(usage.get("total_tokens"))
    # A part left out is what the total leaves of it; without the total, or with nothing but
    # the total, what the answer cost is not known (priced at $0, it was).
    split = prompt is not None and completion is not None
    if prompt is None and completion is not None and total is not None:
        prompt = max(total - completion, 0)
    elif completion is None and prompt is not None and total is not None:
        completion = max(total - prompt, 0)
    if prompt is None or completion is None:
        return None
    reasoning = reasoning or 0
    if total is None:
        total = prompt + completion
    elif reasoning and total == prompt + completion + reasoning:
        completion += reasoning
    elif split and not reasoning and total > prompt + completion:
        # Gemini's thoughts, which such gateways name nowhere but in the total.
        reasoning = total - prompt - completion
        completion += reasoning
    return UsageCounts(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=min(cached or 0, prompt),
        reasoning_tokens=min(reasoning, completion),
        total_tokens=total,
    )


# --- price file --------------------------------------------------------------------------


def _toml_key(name: str) -> str:
    return name if name.replace("-", "").replace("_", "").isalnum() else f'"{name}"'


def _price(table: Mapping[str, Any], key: str, where: str) -> Decimal | None:
    value = table.get(key)
    if value is None:
        return None
    # bool is an int in Python, and `true` is no price.
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise UsageError(f"{where}.{key}: must be a number (US dollars per million tokens)")
    price = Decimal(value)
    if not price.is_finite() or price < 0:
        raise UsageError(f"{where}.{key}: must be zero or more, not {value}")
    return price


def _parse_model_table(table: Mapping[str, Any], where: str) -> tuple[ModelRates, str | None]:
    unknown = sorted(set(table) - _USER_KEYS)
    if unknown:
        known = ", ".join(sorted(_USER_KEYS))
        raise UsageError(f"{where}.{unknown[0]}: unknown key (known: {known})")
    input_price = _price(table, "input_per_mtok", where)
    output_price = _price(table, "output_per_mtok", where)
    cached_price = _price(table, "cached_input_per_mtok", where)
    if input_price is None:
        raise UsageError(f"{where}.input_per_mtok: missing (US dollars per million prompt tokens)")
    if output_price is None:
        raise UsageError(f"{where}.output_per_mtok: missing (US dollars per million output tokens)")
    pattern = table.get("match")
    if pattern is not None and (not isinstance(pattern, str) or not pattern):
        raise UsageError(f'{where}.match: must be a model-name glob such as "deepseek-*"')
    rates = ModelRates(
        input_per_mtok=input_price,
        cached_input_per_mtok=input_price if cached_price is None else cached_price,
        output_per_mtok=output_price,
    )
    return rates, pattern


# --- pricers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TokenRates:
    """A linear price: dollars per token of each kind plus a fixed amount per request."""

    input_per_token: Decimal
    cached_per_token: Decimal
    output_per_token: Decimal
    reasoning_per_token: Decimal
    per_request: Decimal


@dataclass(frozen=True, slots=True)
class PriceShape:
    """What a model's price depends on besides the token counts, so that a sum of requests'
    tokens can be priced exactly: group them by tier and by price period first."""

    #: Prompt sizes past which another tier's rates apply to the whole request (genai-prices:
    #: prompt tokens > start), ascending; empty when the price has no tiers.
    tier_starts: tuple[int, ...]
    #: Whether the price changes with the date or the time of day. The changes genai-prices
    #: knows of fall on whole or half hours (UTC), so a price is constant within each
    #: `PRICE_PERIOD_S` counted from the epoch.
    varies_in_time: bool

    def tier_prompt(self, tier: int) -> int:
        """A prompt size in tier number `tier` (0: below every start)."""
        return 0 if tier == 0 else self.tier_starts[tier - 1] + 1


#: Prices that change by date or time of day are constant within each period this long, counted
#: from the epoch (see PriceShape.varies_in_time).
PRICE_PERIOD_S = 1800


def price_period_time(period: int) -> datetime:
    """A time within price period number `period` (the finish time // PRICE_PERIOD_S): its
    middle, where the price in force is that of the whole period."""
    return datetime.fromtimestamp((period + 0.5) * PRICE_PERIOD_S, tz=UTC)


class _Pricer(abc.ABC):
    """Where a model's rates come from: a user's price file or genai-prices' data."""

    shape: PriceShape

    @abc.abstractmethod
    def rates(self, at: datetime | None, prompt_tokens: int) -> _TokenRates:
        """Rates in force at `at` for a request of `prompt_tokens`."""

    def price_set(self, at: datetime) -> object:
        """What identifies the prices in force at `at`: equal at times of equal prices."""
        return None


class _UserPricer(_Pricer):
    def __init__(self, rates: ModelRates) -> None:
        output = rates.output_per_mtok / TOKENS_PER_MTOK
        self._rates = _TokenRates(
            input_per_token=rates.input_per_mtok / TOKENS_PER_MTOK,
            cached_per_token=rates.cached_input_per_mtok / TOKENS_PER_MTOK,
            output_per_token=output,
            reasoning_per_token=output,
            per_request=_ZERO,
        )
        self.shape = PriceShape(tier_starts=(), varies_in_time=False)

    def rates(self, at: datetime | None, prompt_tokens: int) -> _TokenRates:
        return self._rates


class _PriceRates:
    """The rates of one genai-prices price set, one `_TokenRates` per prompt-size tier.

    genai-prices' tiers are cliffs: past a tier's start, every token of that kind is billed at
    the tier's rate. So within a tier the price is linear, and the tier is known from the
    prompt size alone.
    """

    __slots__ = ("_by_tier", "_price", "_starts")

    def __init__(self, price: genai_types.ModelPrice) -> None:
        self._price = price
        self._starts = _tier_starts(price)
        self._by_tier: dict[int, _TokenRates] = {}

    def rates(self, prompt_tokens: int) -> _TokenRates:
        # How many tier starts the prompt is past (genai-prices: tokens > start).
        tier = bisect.bisect_left(self._starts, prompt_tokens) if self._starts else 0
        rates = self._by_tier.get(tier)
        if rates is None:
            flat = _flatten_tiers(self._price, prompt_tokens) if self._starts else self._price
            rates = self._by_tier[tier] = _linear_rates(flat)
        return rates


class _GenaiPricer(_Pricer):
    """One genai-prices model. Its prices may change with the request's date or time of day
    (a list of conditional prices): rates are derived once per distinct price set."""

    def __init__(self, model: genai_types.ModelInfo) -> None:
        from genai_prices import types as genai_types

        self._model = model
        static = model.prices if isinstance(model.prices, genai_types.ModelPrice) else None
        self._static = _PriceRates(static) if static is not None else None
        # id(price) -> rates; _PriceRates holds the price, so the id is never reused.
        self._by_price: dict[int, _PriceRates] = {}
        prices: list[genai_types.ModelPrice] = (
            [model.prices]
            if isinstance(model.prices, genai_types.ModelPrice)
            else [conditional.prices for conditional in model.prices]
        )
        self.shape = PriceShape(
            tier_starts=tuple(sorted({start for price in prices for start in _tier_starts(price)})),
            varies_in_time=static is None,
        )

    def price_set(self, at: datetime) -> object:
        return None if self._static is not None else id(self._model.get_prices(at))

    def rates(self, at: datetime | None, prompt_tokens: int) -> _TokenRates:
        price_rates = self._static
        if price_rates is None:
            price = self._model.get_prices(at or datetime.now(tz=UTC))
            price_rates = self._by_price.get(id(price))
            if price_rates is None:
                price_rates = self._by_price[id(price)] = _PriceRates(price)
        return price_rates.rates(prompt_tokens)


def _tier_starts(price: genai_types.ModelPrice) -> list[int]:
    from genai_prices import types as genai_types

    return sorted(
        {
            tier.start
            for value in vars(price).values()
            if isinstance(value, genai_types.TieredPrices)
            for tier in value.tiers
        }
    )


def _flatten_tiers(price: genai_types.ModelPrice, prompt_tokens: int) -> genai_types.ModelPrice:
    """`price` with each tiered value replaced by the rate that applies to `prompt_tokens`."""
    from genai_prices import types as genai_types

    flat: dict[str, Decimal | None] = {}
    for key, value in vars(price).items():
        if isinstance(value, genai_types.TieredPrices):
            applicable = value.base
            for tier in reversed(value.tiers):
                if prompt_tokens > tier.start:
                    applicable = tier.price
                    break
            flat[key] = applicable
        else:
            flat[key] = value
    return genai_types.ModelPrice(**flat)


def _linear_rates(price: genai_types.ModelPrice) -> _TokenRates:
    """Per-token rates of an untiered genai-prices price, measured with genai-prices' own
    arithmetic on one million tokens of each kind, so cached and reasoning tokens follow its
    rules exactly (cached tokens are the part of the input billed at the cache-read price;
    reasoning tokens the part of the output billed at a reasoning price, where one exists)."""
    import genai_prices

    def calc(**tokens: int) -> Decimal:
        return price.calc_price(genai_prices.Usage(**tokens))["total_price"]

    million = TOKENS_PER_MTOK
    per_request = calc(input_tokens=0, output_tokens=0)
    input_cost = calc(input_tokens=million) - per_request
    cached_cost = calc(input_tokens=million, cache_read_tokens=million) - per_request
    output_cost = calc(output_tokens=million) - per_request
    reasoning_cost = calc(output_tokens=million, output_reasoning_tokens=million) - per_request
    return _TokenRates(
        input_per_token=input_cost / million,
        cached_per_token=cached_cost / million,
        output_per_token=output_cost / million,
        reasoning_per_token=reasoning_cost / million,
        per_request=per_request,
    )


def _is_token_priced(model: genai_types.ModelInfo) -> bool:
    """True when token counts can price the model: it has a token price, or no price at all
    (free models). Models priced by characters, audio hours or pages are not."""
    from genai_prices import types as genai_types

    prices = (
        [model.prices]
        if isinstance(model.prices, genai_types.ModelPrice)
        else [conditional.prices for conditional in model.prices]
    )
    for price in prices:
        keys = {key for key, value in vars(price).items() if value is not None}
        if keys and not keys & _TOKEN_PRICE_KEYS:
            return False
    return True


def _find_genai_model(model: str) -> _GenaiPricer | None:
    """The genai-prices model for a name: OpenAI's catalogue first, then any provider whose
    models match the name; for "vendor/name" (gateway style) also the vendor's catalogue and
    OpenRouter's."""
    import genai_prices

    attempts: list[tuple[str, str | None]] = [(model, _OPENAI_PROVIDER), (model, None)]
    if "/" in model:
        vendor, _, bare = model.rpartition("/")
        attempts += [(bare, vendor.rsplit("/", 1)[-1]), (model, _OPENROUTER_PROVIDER), (bare, None)]
    for name, provider_id in attempts:
        try:
            # The public entry point resolves the name exactly as calc_price does for users.
            found = genai_prices.calc_price(
                genai_prices.Usage(input_tokens=0, output_tokens=0), name, provider_id=provider_id
            )
        except (LookupError, ValueError):
            # LookupError: not in that catalogue; ValueError: a price genai-prices rejects.
            continue
        if not _is_token_priced(found.model):
            return None
        return _GenaiPricer(found.model)
    return None
