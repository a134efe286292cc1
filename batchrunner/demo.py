"""`batchrunner demo`: the example request files, end to end, against the local fake API."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from batchrunner.config import DEMO_KEY_ENV, RunConfig
from batchrunner.errors import UsageError
from batchrunner.fakeapi import FakeConfig, FakeServer
from batchrunner.ingest import check_demo_apart, file_sha256, submit_file
from batchrunner.report import BatchStatus, batch_status
from batchrunner.runner import RunReport, run
from batchrunner.store import JobStore

#: The fake API answers after this long on average, so that progress is visible.
DEMO_LATENCY_MS = 40.0
DEMO_KEY = "demo-key-for-the-local-fake-api"


def example_files() -> Path:
    """The folder of the example request files: installed beside the package as
    `batchrunner/examples/`, and in a source checkout (or an editable install of one) the
    repository's `jobs/`."""
    here = Path(__file__).resolve().parent
    for folder in (here / "examples", here.parent / "jobs"):
        if any(folder.glob("*.jsonl")):
            return folder
    raise UsageError(f"the example request files are missing from {here / 'examples'}")


@dataclass(frozen=True, slots=True)
class DemoBatch:
    path: Path
    report: RunReport
    status: BatchStatus


async def run_demo(
    store: JobStore,
    jobs_dir: Path,
    *,
    warn: Callable[[str], None],
    config: RunConfig | None = None,
) -> list[DemoBatch]:
    """Submit and run every `*.jsonl` in `jobs_dir` against a fake API on 127.0.0.1."""
    files = sorted(jobs_dir.glob("*.jsonl"))
    if not files:
        raise UsageError(f"no example request files (*.jsonl) in {jobs_dir}")
    config = config or RunConfig(concurrency=16)
    # Every file first: a real batch of the fifth file stopped the demo after four.
    for path in files:
        existing = await store.find_batch_by_content(file_sha256(path))
        if existing is not None:
            check_demo_apart(existing, path, DEMO_KEY_ENV)
    out = []
    # The fake API checks the key like a real one would; the demo brings its own.
    os.environ.setdefault(DEMO_KEY_ENV, DEMO_KEY)
    async with FakeServer(
        FakeConfig(
            seed=7,
            latency_ms=DEMO_LATENCY_MS,
            latency_dist="lognormal",
            api_key=os.environ[DEMO_KEY_ENV],
        )
    ) as srv:
        warn(f"fake OpenAI-compatible API listening on {srv.url}")
        for path in files:
            submitted = await submit_file(store, path, base_url=srv.url, api_key_env=DEMO_KEY_ENV)
            batch = submitted.batch
            warn(f"{path.name}: batch {batch.id}, {submitted.jobs} job(s)")
            # The batch remembers the server of the first demo; this one's port may differ.
            rep = await run(
                store,
                batch.id,
                replace(config, base_url=srv.url),
                warn=warn,
                progress=False,
            )
            out.append(DemoBatch(path, rep, await batch_status(store, batch.id)))
    return out
