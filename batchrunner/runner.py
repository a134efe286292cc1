"""`batchrunner run`: resolve the batch and its key, then dispatch until every job has ended."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

from batchrunner import journal, report
from batchrunner.client import is_insecure, is_loopback
from batchrunner.config import RunConfig, check_api_key, check_base_url, check_key_env
from batchrunner.dispatcher import Dispatcher, RunResult, StopReason, worst_case_cost
from batchrunner.errors import BudgetExceeded, UsageError
from batchrunner.lines import names_a_file
from batchrunner.pricing import PriceBook
from batchrunner.progress import show
from batchrunner.states import cancelled_for_good
from batchrunner.store import BatchInfo, JobStore

try:
    import resource
except ImportError:  # pragma: no cover - Windows: no open-file limit to raise
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ABORTED = 1
EXIT_SOME_FAILED = 3
EXIT_INTERRUPTED = 130
#: Files a run keeps open besides its connections to the API: the database's (SQLite's file,
#: WAL and journal, or PostgreSQL's connections), the answer journal's, the interpreter's own.
OTHER_OPEN_FILES = 64


@dataclass(frozen=True, slots=True)
class RunReport:
    batch: BatchInfo
    result: RunResult

    @property
    def exit_code(self) -> int:
        reason = self.result.reason
        if reason is StopReason.INTERRUPTED:
            return EXIT_INTERRUPTED
        if reason is StopReason.CANCELLED:
            return EXIT_SOME_FAILED  # cancelled is an end: the batch is finished, for good
        if reason is not StopReason.DONE:
            return EXIT_ABORTED
        if self.result.unfinished or self.result.failed_in_batch or self.result.cancelled_in_batch:
            return EXIT_SOME_FAILED
        return EXIT_OK


async def run(
    store: JobStore,
    target: str,
    config: RunConfig,
    *,
    warn: Callable[[str], None],
    progress: bool = True,
    install_signals: bool = True,
    skip_invalid: bool = False,
) -> RunReport:
    """Run a batch (by id, or a file to submit first) until every job has ended or it stops.

    `skip_invalid`: a file's bad lines are left out (and recorded), as `submit --skip-invalid`
    does, rather than refusing the file."""
    if names_a_file(target):
        # Imported here: the load's machinery (ingest.py, bulk.py) is start-up that a run of
        # a submitted batch does not need. A name that is no file fails here with the reason.
        from batchrunner.ingest import submit_file

        # As `submit` would: the base URL falls back to $OPENAI_BASE_URL.
        submitted = await submit_file(
            store,
            Path(target),
            base_url=config.base_url or os.environ.get("OPENAI_BASE_URL"),
            api_key_env=config.api_key_env,
            skip_invalid=skip_invalid,
            workers=None,
            overridden=frozenset(
                setting
                for setting, given in (
                    ("base_url", config.base_url),
                    ("api_key_env", config.api_key_env),
                )
                if given
            ),
        )
        if submitted.batch.cancelled_at is None:  # (else the error below says what to do)
            for notice in submitted.notices:
                # (That the batch keeps the base URL it was first submitted with, say.)
                warn(f"note: {notice}")
        if submitted.created:
            warn(f"loaded {submitted.jobs} job(s) from {target} as batch {submitted.batch.id}")
            if submitted.invalid_total:
                warn(
                    f"skipped {submitted.invalid_total} bad line(s): `batchrunner export"
                    f" {submitted.batch.id} --invalid` lists them"
                )
        batch = submitted.batch
    else:
        batch = await store.get_batch(target)
    if batch.cancelled_at is not None:
        raise UsageError(cancelled_for_good(batch.id))

    base_url = check_base_url(config.base_url or batch.base_url)
    key_env = check_key_env(config.api_key_env or batch.api_key_env)
    api_key = os.environ.get(key_env, "").strip() or None
    if api_key is not None:
        api_key = check_api_key(api_key, key_env)
    if api_key is None:
        if not is_loopback(base_url):
            raise UsageError(
                f"set the API key in ${key_env} (or name another variable with --api-key-env)"
            )
        warn(f"${key_env} is not set: sending without an API key to {base_url}")
    elif is_insecure(base_url):
        warn(f"warning: the API key goes over plain http to {base_url}: anyone between can read it")

    prices = PriceBook.load(config.prices_path)
    config = _within_open_files(config, warn)
    dispatcher = Dispatcher(store, batch, config, api_key=api_key, base_url=base_url, prices=prices)
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            # Stopped first: the message may not get out (a stderr whose reader the same
            # Ctrl-C ended; the command line's `warn` then writes nothing), and the stop must
            # not depend on it.
            dispatcher.stop(StopReason.INTERRUPTED)
            warn(
                f"stopping: waiting up to {config.grace_s:.0f}s for requests in flight"
                " (Ctrl-C again to stop at once)"
            )
        else:
            # A second Ctrl-C: no grace; what is in flight is sent again by the next run.
            dispatcher.force_stop()

    # A signal ignored by whoever started us stays ignored, as Python leaves it through the
    # load: a background job of a script ignores SIGINT, so that the script's Ctrl-C is the
    # script's. Taken, it would stop the run and not the load before it.
    handled = (
        [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) != signal.SIG_IGN]
        if install_signals
        else []
    )
    # Put back as the run ends (the event loop leaves the default): Ctrl-C and SIGTERM still
    # stop what comes after, as they stopped the load before (cli.py).
    previous = {sig: signal.getsignal(sig) for sig in handled}
    for sig in handled:
        loop.add_signal_handler(sig, on_signal)
    display = asyncio.create_task(show(dispatcher)) if progress else None
    try:
        # What dead runs of the batch kept in this machine's journal is recorded first, under
        # the handlers above (a Ctrl-C lets it finish): those answers were paid for, and the
        # budget starts from what the batch has cost (counted before them, a run after a
        # kill -9 went past --max-cost by up to a run's concurrency of them).
        await dispatcher.recover_journal()
        if dispatcher.budget is not None:
            budget = dispatcher.budget
            budget.start_from(await _spent(store, batch.id, prices, budget.cap_usd))
        result = await dispatcher.run()
    finally:
        if display is not None:
            display.cancel()
            await asyncio.gather(display, return_exceptions=True)
        for sig in handled:
            loop.remove_signal_handler(sig)
            if previous[sig] is not None:  # (None: not set from Python)
                signal.signal(sig, previous[sig])
    return RunReport(batch, result)


async def cancel(store: JobStore, batch_id: str) -> tuple[int, int]:
    """Stop a batch for good: (answers recorded first, jobs cancelled).

    Answers that a run of this machine received and died before writing wait in its journal
    for the next run, and a cancelled batch has none: they are recorded first (they were paid
    for), then every unfinished job is cancelled. A live run sees the cancel within a second.
    """
    await store.get_batch(batch_id)
    recorded = await journal.recover_dead(store, batch_id)
    return recorded, await store.cancel(batch_id)


async def _spent(store: JobStore, batch_id: str, prices: PriceBook, cap: Decimal) -> Decimal:
    """What the batch has cost, for `--max-cost`; BudgetExceeded when that is at the cap or
    past it, or when a model in it has no price."""
    status = await report.batch_status(store, batch_id, prices)
    if status.unpriced_models:
        raise BudgetExceeded(
            "--max-cost needs prices, and none is known for "
            + ", ".join(status.unpriced_models)
            + "; add them to a price file (--prices)"
        )
    spent = status.cost_usd
    if status.without_usage:
        # What they cost is not known: their worst case, as the run that received them
        # counted it (else every run would start from less than was spent).
        spent += await _worst_case_without_usage(store, batch_id, prices)
    if spent >= cap:
        raise BudgetExceeded(
            f"the batch has already cost ${spent:f}"
            + (
                f" (counting the worst case of {status.without_usage} answer(s) that"
                " reported no usage)"
                if status.without_usage
                else ""
            )
            + f", at or over --max-cost ${cap:f}; run again with a higher cap to go on"
        )
    return spent


async def _worst_case_without_usage(store: JobStore, batch_id: str, prices: PriceBook) -> Decimal:
    """The sum of the worst cases of the batch's results whose answer reported no usage."""
    total = Decimal(0)
    after = 0
    while page := await store.bodies_without_usage(batch_id, after):
        total += sum((worst_case_cost(body, prices) for _, body in page), Decimal(0))
        after = page[-1][0]
    return total


def _within_open_files(config: RunConfig, warn: Callable[[str], None]) -> RunConfig:
    """Room for `--concurrency` connections under the process's open-file limit.

    A soft limit of 1,024 is common: a run with more connections than that failed request
    after request with "Too many open files", then stopped. The soft limit is raised as far as
    the hard one allows; when even that is too low, the run goes on with the concurrency that
    fits, and says so.
    """
    if resource is None:
        return config
    wanted = config.concurrency + OTHER_OPEN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return config
    raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if raised > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", raised, exc)
    if soft >= wanted:
        return config
    fits = max(1, soft - OTHER_OPEN_FILES)
    warn(
        f"warning: --concurrency {config.concurrency} needs {wanted} open files and this"
        f" process may have {soft} (ulimit -n); running with --concurrency {fits}"
    )
    return replace(config, concurrency=fits)
