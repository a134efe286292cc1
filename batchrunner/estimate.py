"""`batchrunner estimate`: tokens and cost of a request file or a batch, before anything is sent.

For each model: the requests, their prompt tokens (counted with the model's tokenizer, images
by OpenAI's vision formula; see `tokens.count_prompt_tokens`), the most output tokens they may
be billed for, and the cost range that follows:

* the maximum output of a request is its `max_completion_tokens` or `max_tokens` (the larger)
  times its `n`; a request that sets neither is counted at the most the model can write in one
  answer (`tokens.default_max_output_tokens`: 16,384 for gpt-4o, 65,536 for gemini-2.5-flash,
  131,072 for a model it does not know), and is counted in `uncapped_requests` so the reader
  knows the maximum is the model's limit rather than the request's;
* the minimum cost is the prompt alone at the full input price (no output, no cache hits), the
  maximum the prompt plus every allowed output token at the output price. Each request is
  priced on its own, so prompt-size price tiers and per-request fees apply as billed;
* a model whose price is unknown (neither genai-prices nor the user's price file knows it) has
  no cost: it is listed, and left out of the totals, never counted as $0.

A batch is estimated whole, and its unfinished part (pending and running jobs) on its own: the
whole says what the batch costs from scratch, the unfinished part what running it again may
still spend. Running jobs count as unfinished because they may not have been billed yet.

Both read their input as a stream: memory does not grow with the number of requests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from batchrunner.errors import LineError
from batchrunner.export import iter_job_requests
from batchrunner.ingest import SHOWN_ERRORS
from batchrunner.lines import check_request_file, read_jobs
from batchrunner.models import UNFINISHED_STATES
from batchrunner.pricing import PriceBook, UsageCounts
from batchrunner.store import JobStore
from batchrunner.tokens import RequestEstimate, estimate_request

#: Requests counted between two yields to the event loop (tokenizing is CPU work).
YIELD_EVERY_REQUESTS: Final = 500

_ZERO: Final = Decimal(0)
CENT_USD: Final = Decimal("0.01")
_UNFINISHED: Final = frozenset(s.value for s in UNFINISHED_STATES)


@dataclass(slots=True)
class ModelEstimate:
    """The requests of one model, summed."""

    model: str
    requests: int = 0
    prompt_tokens: int = 0
    #: The most output tokens the requests may be billed for (their caps times their `n`).
    max_output_tokens: int = 0
    #: Requests that set no output cap: counted at the model's own limit.
    uncapped_requests: int = 0
    #: US dollars for the prompts alone; None when the model's price is unknown.
    min_cost_usd: Decimal | None = _ZERO
    #: US dollars for the prompts and every allowed output token; None when unknown.
    max_cost_usd: Decimal | None = _ZERO
    #: The times the model's prices are taken at (`PriceBook.price_times`), once known.
    _times: list[datetime | None] | None = field(default=None, compare=False, repr=False)

    def add(self, est: RequestEstimate, prices: PriceBook) -> None:
        self.requests += 1
        self.prompt_tokens += est.prompt_tokens
        output = est.worst_case_output_tokens
        self.max_output_tokens += output
        if est.max_output_tokens is None:
            self.uncapped_requests += 1
        if self.min_cost_usd is None or self.max_cost_usd is None:
            return
        if self._times is None:
            self._times = prices.price_times(self.model)
        prompt = est.prompt_tokens
        usage = UsageCounts(prompt, 0, 0, 0, prompt)
        # Whenever in the next day the batch runs: the least and the most it can cost.
        least = most = None
        for at in self._times:
            low = prices.cost(self.model, usage, at=at)
            high = prices.worst_case_cost(self.model, prompt, output, at=at)
            if low is None or high is None:
                self.min_cost_usd = self.max_cost_usd = None
                return
            least = low if least is None else min(least, low)
            most = high if most is None else max(most, high)
        assert least is not None and most is not None
        self.min_cost_usd += least
        self.max_cost_usd += most

    @property
    def priced(self) -> bool:
        return self.min_cost_usd is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "max_output_tokens": self.max_output_tokens,
            "uncapped_requests": self.uncapped_requests,
            "min_cost_usd": _usd(self.min_cost_usd),
            "max_cost_usd": _usd(self.max_cost_usd),
        }


@dataclass(slots=True)
class EstimateTable:
    """Per-model estimates of a set of requests, and their total."""

    by_model: dict[str, ModelEstimate] = field(default_factory=dict)

    def add(self, est: RequestEstimate, prices: PriceBook) -> None:
        model = self.by_model.get(est.model)
        if model is None:
            model = self.by_model[est.model] = ModelEstimate(est.model)
        model.add(est, prices)

    @property
    def models(self) -> list[ModelEstimate]:
        return sorted(self.by_model.values(), key=lambda m: m.model)

    @property
    def unpriced_models(self) -> list[str]:
        return [m.model for m in self.models if not m.priced]

    @property
    def total(self) -> ModelEstimate:
        """Every model summed. The costs are those of the priced models only (see
        `unpriced_models`), and unknown when no model has a price."""
        total = ModelEstimate("total")
        priced = [m for m in self.by_model.values() if m.priced]
        for m in self.by_model.values():
            total.requests += m.requests
            total.prompt_tokens += m.prompt_tokens
            total.max_output_tokens += m.max_output_tokens
            total.uncapped_requests += m.uncapped_requests
        if priced or not self.by_model:
            total.min_cost_usd = sum((m.min_cost_usd or _ZERO for m in priced), _ZERO)
            total.max_cost_usd = sum((m.max_cost_usd or _ZERO for m in priced), _ZERO)
        else:
            total.min_cost_usd = total.max_cost_usd = None
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "models": [m.to_json() for m in self.models],
            "total": self.total.to_json(),
            "unpriced_models": self.unpriced_models,
        }


@dataclass(slots=True)
class Estimate:
    """What a request file or a batch will cost."""

    #: The file's path or the batch's id.
    source: str
    kind: Literal["file", "batch"]
    #: Every request.
    everything: EstimateTable = field(default_factory=EstimateTable)
    #: A batch's unfinished jobs (pending and running); None for a file.
    remaining: EstimateTable | None = None
    #: A file's lines that are not valid requests (left out), and the first of them.
    invalid_lines: int = 0
    invalid: list[LineError] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "kind": self.kind,
            "requests": self.everything.to_json(),
        }
        if self.remaining is not None:
            out["remaining"] = self.remaining.to_json()
        if self.kind == "file":
            out["invalid_lines"] = self.invalid_lines
            out["invalid"] = [{"line": e.line, "reason": e.reason} for e in self.invalid]
        return out


async def estimate_file(path: str | Path, prices: PriceBook | None = None) -> Estimate:
    """Estimate every valid request of a request file (either input format). Bad lines are
    left out and counted; `submit` would refuse the file unless told `--skip-invalid`."""
    path = Path(path)
    check_request_file(path)
    prices = prices or PriceBook.load()
    est = Estimate(source=str(path), kind="file")
    # A custom_id seen on an earlier line makes a bad line, as submit says. Kept as hashes: a
    # million ids would take ~100 MB as strings, ~60 MB so (two ids sharing a 64-bit hash,
    # about once in 10**7 such files, would count one good line as bad).
    seen: set[int] = set()
    for count, item in enumerate(read_jobs(path), start=1):
        if not isinstance(item, LineError):
            key = hash(item.custom_id)
            if key in seen:
                item = LineError(str(path), item.line, f"duplicate custom_id {item.custom_id!r}")
            else:
                seen.add(key)
        if isinstance(item, LineError):
            est.invalid_lines += 1
            if len(est.invalid) < SHOWN_ERRORS:
                est.invalid.append(item)
        else:
            est.everything.add(estimate_request(orjson.loads(item.body)), prices)
        if count % YIELD_EVERY_REQUESTS == 0:
            await asyncio.sleep(0)
    return est


async def estimate_batch(
    store: JobStore, batch_id: str, prices: PriceBook | None = None
) -> Estimate:
    """Estimate a submitted batch: all its jobs, and its unfinished ones apart."""
    await store.get_batch(batch_id)
    prices = prices or PriceBook.load()
    remaining = EstimateTable()
    est = Estimate(source=batch_id, kind="batch", remaining=remaining)
    count = 0
    async for job in iter_job_requests(store, batch_id):
        request = estimate_request(orjson.loads(job.body))
        est.everything.add(request, prices)
        if job.state in _UNFINISHED:
            remaining.add(request, prices)
        count += 1
        if count % YIELD_EVERY_REQUESTS == 0:
            await asyncio.sleep(0)
    return est


def render(est: Estimate) -> str:
    """The estimate as a plain-text table."""
    title = "file " if est.kind == "file" else "batch "
    lines = [f"{title}{est.source}"]
    if est.kind == "file" and est.invalid_lines:
        lines.append(f"left out {est.invalid_lines} invalid line(s), first:")
        lines.extend(f"  {e}" for e in est.invalid[:5])
    lines.append("")
    lines.extend(_render_table("every request", est.everything))
    if est.remaining is not None:
        lines.append("")
        lines.extend(
            _render_table("unfinished jobs (what running the batch may still cost)", est.remaining)
        )
    lines.append("")
    lines.append(
        "min = prompts only; max = prompts + every allowed output token (the request's cap x n,"
        " or the model's limit where it sets none)"
    )
    return "\n".join(lines)


_HEADER: Final = ("model", "requests", "prompt tokens", "max output tokens", "min USD", "max USD")


def _render_table(title: str, table: EstimateTable) -> list[str]:
    if not table.by_model:
        return [f"{title}: none"]
    rows = [_cells(m) for m in table.models]
    rows.append(_cells(table.total))
    widths = [max(len(r[i]) for r in [_HEADER, *rows]) for i in range(len(_HEADER))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    out = [f"{title}:", line(_HEADER), line(tuple("-" * w for w in widths))]
    out.extend(line(r) for r in rows[:-1])
    out.append(line(rows[-1]))
    uncapped = table.total.uncapped_requests
    if uncapped:
        out.append(f"{uncapped} request(s) set no output cap: counted at the model's limit")
    if table.unpriced_models:
        out.append(
            "no price known for " + ", ".join(table.unpriced_models) + " (left out of the total;"
            " add it to a price file, see --prices)"
        )
    return out


def _cells(m: ModelEstimate) -> tuple[str, ...]:
    return (
        m.model,
        f"{m.requests:,}",
        f"{m.prompt_tokens:,}",
        f"{m.max_output_tokens:,}",
        _money(m.min_cost_usd),
        _money(m.max_cost_usd),
    )


def _money(amount: Decimal | None) -> str:
    if amount is None:
        return "unknown"
    # Four decimals hide the cost of a few cheap requests: show six below a cent.
    return f"${amount:,.4f}" if amount >= CENT_USD or not amount else f"${amount:.6f}"


def _usd(amount: Decimal | None) -> float | None:
    return None if amount is None else float(amount)
