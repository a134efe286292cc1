"""What `status` shows: counts by state, tokens and cost by model, throughput, errors, workers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from batchrunner.pricing import PRICE_PERIOD_S, PriceBook, dollars, price_period_time
from batchrunner.store import (
    BatchCounts,
    BatchInfo,
    JobStore,
    ModelUsage,
    UsageGroup,
    WorkerInfo,
)

#: Kinds of failure the text lists by name; the rest are counted together (`--json` has all).
SHOWN_KINDS = 10
#: Failures that sending the same request again does not change (client.py fails them at
#: once): the API refused the request itself.
_REFUSED_KINDS = frozenset({"request_too_large", "invalid_url", "flagged", "http_501", "http_505"})
#: ...unlike these 4xx, which say "not now".
_NOT_NOW_4XX = frozenset({"http_408", "http_409", "http_429", "http_498"})


def fails_again(kind: str) -> bool:
    """Whether a job that failed so fails again when its request is sent again as it was."""
    return kind in _REFUSED_KINDS or (kind.startswith("http_4") and kind not in _NOT_NOW_4XX)


@dataclass(frozen=True, slots=True)
class ModelCost:
    usage: ModelUsage
    #: None when the model's price is unknown.
    cost_usd: Decimal | None

    @property
    def known_cost_usd(self) -> Decimal | None:
        """`cost_usd`, or None also when not one of the answers reported its usage."""
        u = self.usage
        return None if u.without_usage == u.results + u.discarded else self.cost_usd


_TOKEN_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


def _token_sums(models: list[ModelCost]) -> dict[str, int]:
    """The token counts of `models`, summed: `status`'s, and those of its discarded answers."""
    out = {k: sum(getattr(m.usage, k) for m in models) for k in _TOKEN_KEYS}
    out["total_tokens"] = sum(m.usage.total_tokens for m in models)
    return out


@dataclass(frozen=True, slots=True)
class BatchStatus:
    batch: BatchInfo
    counts: BatchCounts
    models: list[ModelCost]
    errors: list[tuple[str, int]]
    attempt_errors: list[tuple[str, int]]
    workers: list[WorkerInfo]
    first_s: float | None
    last_s: float | None
    #: How long the batch's workers ran, the time between runs left out (None: no worker
    #: of it is known).
    run_s: float | None = None
    now: float = field(default_factory=time.time)
    #: The part of `models` that answers paid for and not kept make up (no export row holds
    #: them), by model.
    discarded: list[ModelCost] = field(default_factory=list)

    @property
    def cost_usd(self) -> Decimal:
        return sum((m.cost_usd for m in self.models if m.cost_usd is not None), Decimal(0))

    @property
    def unpriced_models(self) -> list[str]:
        return [m.usage.model for m in self.models if m.cost_usd is None]

    @property
    def without_usage(self) -> int:
        """Results whose answer reported no usage: what they cost is not in `cost_usd`."""
        return sum(m.usage.without_usage for m in self.models)

    @property
    def known_cost_usd(self) -> Decimal | None:
        """`cost_usd`, or None when results were kept and not one of them could be priced
        (no price known, or no usage reported): a sum of nothing known is not $0."""
        priced = any(m.known_cost_usd is not None for m in self.models)
        return self.cost_usd if priced or not self.models else None

    @property
    def tokens(self) -> dict[str, int]:
        return _token_sums(self.models)

    @property
    def elapsed_s(self) -> float | None:
        if self.first_s is None or self.last_s is None:
            return None
        return max(self.last_s - self.first_s, 1e-9)

    @property
    def requests_per_s(self) -> float | None:
        """Jobs ended per second: the pace of the live workers while the batch runs, else
        the batch's own over the time its runs took."""
        if self.workers:
            return _live_pace(
                [(w, w.succeeded + w.failed, w.recent_requests_per_s) for w in self.workers]
            )
        ended = self.counts.counts["succeeded"] + self.counts.counts["failed"]
        return self._over_runs(ended)

    @property
    def tokens_per_s(self) -> float | None:
        if self.workers:
            return _live_pace([(w, w.tokens, w.recent_tokens_per_s) for w in self.workers])
        return self._over_runs(self.tokens["total_tokens"])

    def _over_runs(self, amount: int) -> float | None:
        # A batch run twice an hour apart did not go at half its speed.
        span = self.run_s or self.elapsed_s
        return amount / span if span and amount else None

    @property
    def eta_s(self) -> float | None:
        rate = self.requests_per_s
        if not rate or not self.counts.unfinished or not self.workers:
            return None
        return self.counts.unfinished / rate

    def discarded_json(self) -> dict[str, Any]:
        """The answers paid for and not kept: how many, their tokens and cost (None: some
        model's price unknown)."""
        d = self.discarded
        out: dict[str, Any] = {"answers": sum(m.usage.discarded for m in d), **_token_sums(d)}
        unknown = any(m.cost_usd is None for m in d)
        out["cost_usd"] = None if unknown else float(sum((m.cost_usd or 0 for m in d), Decimal(0)))
        return out

    def to_json(self) -> dict[str, Any]:
        b = self.batch
        return {
            "batch": b.id,
            "name": b.name,
            "source_file": b.source_file,
            "base_url": b.base_url,
            "created_at": b.created_at,
            "cancelled": b.cancelled_at is not None,
            "total": self.counts.total,
            "counts": dict(self.counts.counts),
            "invalid_lines": b.invalid_lines,
            "tokens": self.tokens,
            "cost_usd": None if self.known_cost_usd is None else float(self.known_cost_usd),
            "unpriced_models": self.unpriced_models,
            "results_without_usage": self.without_usage,
            "models": [
                {
                    "model": m.usage.model,
                    "results": m.usage.results,
                    "prompt_tokens": m.usage.prompt_tokens,
                    "completion_tokens": m.usage.completion_tokens,
                    "cached_tokens": m.usage.cached_tokens,
                    "reasoning_tokens": m.usage.reasoning_tokens,
                    "total_tokens": m.usage.total_tokens,
                    "discarded_answers": m.usage.discarded,
                    "results_without_usage": m.usage.without_usage,
                    "cost_usd": None if m.known_cost_usd is None else float(m.known_cost_usd),
                }
                for m in self.models
            ],
            # Counted in the figures above, in no export row.
            "discarded": self.discarded_json(),
            "requests_per_s": self.requests_per_s,
            "tokens_per_s": self.tokens_per_s,
            "eta_s": self.eta_s,
            "errors": dict(self.errors),
            "attempt_errors": dict(self.attempt_errors),
            "workers": [
                {
                    "id": w.id,
                    "host": w.host,
                    "pid": w.pid,
                    "heartbeat_age_s": round(self.now - w.heartbeat_at, 1),
                    "sent": w.sent,
                    "succeeded": w.succeeded,
                    "failed": w.failed,
                    "tokens": w.tokens,
                    "recent_requests_per_s": w.recent_requests_per_s,
                    "recent_tokens_per_s": w.recent_tokens_per_s,
                }
                for w in self.workers
            ],
        }


async def batch_status(
    store: JobStore, batch_id: str, prices: PriceBook | None = None
) -> BatchStatus:
    """What `status` says of a batch: every figure from one snapshot of the database, so
    that those of a running batch agree with each other."""
    prices = prices or PriceBook.load()
    async with store.snapshot() as view:
        return await _batch_status(view, batch_id, prices)


async def _batch_status(store: JobStore, batch_id: str, prices: PriceBook) -> BatchStatus:
    batch = await store.get_batch(batch_id)
    groups = await store.usage_groups(batch_id, PRICE_PERIOD_S)
    costs = await model_costs(store, batch_id, groups, prices)
    models = [ModelCost(u, costs[u.model]) for u in usage_by_model(groups)]
    # What of those went to answers paid for and not kept, which no export row holds: a
    # script that adds up an export can tell the two apart.
    paid: list[UsageGroup] = []
    if any(g.discarded for g in groups):
        paid = await store.usage_groups(batch_id, PRICE_PERIOD_S, discarded_only=True)
    paid_costs = await model_costs(store, batch_id, paid, prices, discarded_only=True)
    discarded = [ModelCost(u, paid_costs[u.model]) for u in usage_by_model(paid)]
    first, last = await store.first_and_last_finish(batch_id)
    run_s = _union_s(await store.worker_spans(batch_id))
    return BatchStatus(
        batch=batch,
        counts=await store.counts(batch_id),
        models=models,
        errors=await store.error_counts(batch_id),
        attempt_errors=await store.attempt_error_counts(batch_id),
        workers=await store.live_workers(batch_id, time.time()),
        first_s=first,
        last_s=last,
        run_s=run_s or None,
        discarded=discarded,
    )


def _live_pace(reported: list[tuple[WorkerInfo, int, float | None]]) -> float | None:
    """The sum of each live worker's pace: between its last two heartbeats (a run slowed by
    429s an hour in shows its pace now, not its first minutes'), or until it has beaten
    twice, what it had done by its heartbeat over the time since it started. None until one
    of them has reported some."""
    pace: float | None = None
    for w, amount, recent in reported:
        if recent is not None:
            pace = (pace or 0.0) + recent  # 0 when it ended nothing since: a stalled run
        elif amount and w.heartbeat_at > w.started_at:
            pace = (pace or 0.0) + amount / (w.heartbeat_at - w.started_at)
    return pace


def _union_s(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the spans: workers running side by side count once."""
    total = 0.0
    covered_to = float("-inf")
    for start, end in sorted(spans):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


def usage_by_model(groups: list[UsageGroup]) -> list[ModelUsage]:
    """Token totals by model, from `JobStore.usage_groups`."""
    totals: dict[str, list[int]] = {}
    for g in groups:
        sums = totals.setdefault(g.model, [0] * 8)
        for i, value in enumerate(
            (
                g.results,
                g.prompt_tokens,
                g.completion_tokens,
                g.cached_tokens,
                g.reasoning_tokens,
                g.total_tokens,
                g.discarded,
                # `requests` counts the results with usage and the discarded answers (all with).
                g.results + g.discarded - g.requests,
            )
        ):
            sums[i] += value
    return [ModelUsage(model, *totals[model]) for model in sorted(totals)]


async def model_costs(
    store: JobStore,
    batch_id: str,
    groups: list[UsageGroup],
    prices: PriceBook,
    *,
    discarded_only: bool = False,
) -> dict[str, Decimal | None]:
    """What the batch's results cost, by model (None: the model's price is unknown), from
    `JobStore.usage_groups` by price period.

    Each request is priced as it ran: at the price in force when it finished (prices change on
    set dates, and by time of day for DeepSeek's off-peak hours) and in its own prompt-size tier
    (a long prompt can move a whole request to a higher rate): the models with tiers are read
    again, by tier. The sums come from the database, so the work does not grow with the batch.
    `discarded_only`: `groups` are those of the discarded answers alone.
    """
    shapes = {g.model: prices.shape(g.model) for g in groups}
    costs: dict[str, Decimal | None] = {
        model: None if shape is None else Decimal(0) for model, shape in shapes.items()
    }
    tiers = {m: shape.tier_starts for m, shape in shapes.items() if shape and shape.tier_starts}
    if tiers:
        groups = [g for g in groups if g.model not in tiers]
        groups += await store.usage_groups(
            batch_id, PRICE_PERIOD_S, tiers, discarded_only=discarded_only
        )
    for group in groups:
        shape = shapes.get(group.model)
        so_far = costs.get(group.model)
        if shape is None or so_far is None:
            continue
        at = price_period_time(group.period) if shape.varies_in_time else None
        cost = prices.group_cost(
            group.model,
            group.requests,
            group.prompt_tokens,
            group.cached_tokens,
            group.completion_tokens,
            group.reasoning_tokens,
            tier_prompt=shape.tier_prompt(group.tier),
            at=at,
        )
        costs[group.model] = None if cost is None else so_far + cost
    return costs


@dataclass(frozen=True, slots=True)
class BatchLine:
    batch: BatchInfo
    counts: BatchCounts

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch.id,
            "name": self.batch.name,
            "total": self.counts.total,
            "counts": dict(self.counts.counts),
        }


async def all_batches(store: JobStore) -> list[BatchLine]:
    async with store.snapshot() as view:
        return [BatchLine(b, await view.counts(b.id)) for b in await view.list_batches()]


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def render_batch_list(rows: list[BatchLine]) -> str:
    if not rows:
        return "no batches yet: batchrunner submit FILE"
    lines = []
    for r in rows:
        c = r.counts.counts
        lines.append(
            f"{r.batch.id}  {r.batch.name[:30]:<30} total {r.counts.total:>8}  "
            f"pending {c['pending']:>7}  running {c['running']:>5}  "
            f"succeeded {c['succeeded']:>8}  failed {c['failed']:>6}  cancelled {c['cancelled']:>6}"
        )
    return "\n".join(lines)


def render_status(st: BatchStatus) -> str:
    b, c = st.batch, st.counts.counts
    out = [
        f"batch     {b.id}  ({b.name})",
        f"source    {b.source_file}",
        f"endpoint  {b.base_url}",
        f"jobs      {st.counts.total} total: pending {c['pending']}, running {c['running']}, "
        f"succeeded {c['succeeded']}, failed {c['failed']}, cancelled {c['cancelled']}"
        + (
            f"  (invalid lines skipped: {b.invalid_lines}; `export --invalid` lists them)"
            if b.invalid_lines
            else ""
        ),
    ]
    if c["running"] and not st.workers:
        # (Left by a run killed or stopped at once: they looked taken for ever.)
        out.append(
            "          the running ones are leased to no live run: the next run of the batch"
            " takes them back"
        )
    t = st.tokens
    out.append(
        f"tokens    prompt {t['prompt_tokens']} (cached {t['cached_tokens']}), completion "
        f"{t['completion_tokens']} (reasoning {t['reasoning_tokens']}), total {t['total_tokens']}"
    )
    known = st.known_cost_usd
    cost = f"cost      {'unknown' if known is None else dollars(known)}"
    if st.unpriced_models and known is not None:
        cost += f"  + unknown for {', '.join(st.unpriced_models)} (no price known)"
    if st.without_usage and known is not None:
        cost += f"  + unknown for {st.without_usage} result(s) whose answer reported no usage"
    out.append(cost)
    for m in st.models:
        price = "unknown" if m.known_cost_usd is None else dollars(m.known_cost_usd)
        notes = []
        if m.usage.discarded:
            paid = next((d.cost_usd for d in st.discarded if d.usage.model == m.usage.model), None)
            notes.append(
                f"with {m.usage.discarded} answer(s) paid for and not kept"
                + ("" if paid is None else f", {dollars(paid)} of it")
            )
        if m.usage.without_usage:
            notes.append(f"{m.usage.without_usage} without usage: tokens and cost unknown")
        out.append(
            f"  {m.usage.model:<32} {m.usage.results:>8} results  "
            f"{m.usage.total_tokens:>12} tokens  {price}"
            + (f"  ({'; '.join(notes)})" if notes else "")
        )
    rps, tps = st.requests_per_s, st.tokens_per_s
    out.append(
        f"speed     {rps:.1f} req/s, {tps or 0:.0f} tokens/s, ETA {_fmt_s(st.eta_s)}"
        if rps is not None
        else "speed     -"
    )
    if st.errors:
        shown, rest = st.errors[:SHOWN_KINDS], st.errors[SHOWN_KINDS:]
        line = "failed    " + ", ".join(f"{k} {n}" for k, n in shown)
        if rest:
            line += f", and {len(rest)} other kind(s): {sum(n for _, n in rest)}"
        out.append(line)
    if st.attempt_errors:
        # Every attempt that did not succeed: those retried and the last of each failed job.
        out.append("attempts  with errors: " + ", ".join(f"{k} {n}" for k, n in st.attempt_errors))
    if st.workers:
        out.append(f"workers   {len(st.workers)} live")
        for w in st.workers:
            out.append(
                f"  {w.id} on {w.host} pid {w.pid}: sent {w.sent}, succeeded {w.succeeded}, "
                f"failed {w.failed}, heartbeat {st.now - w.heartbeat_at:.0f}s ago"
            )
    return "\n".join(out)
