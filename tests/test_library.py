"""The README's "From Python" example, run as it is written there, against the fake API."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from batchrunner.fakeapi import FakeConfig, FakeServerThread
from tests.conftest import chat, write_jsonl

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    section = README.read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "one example in the section"
    return blocks[0]


def _run_example(directory: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "main.py"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_readme_example_submits_runs_and_exports(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text(_example())
    rows = [chat(f"question {i}") for i in range(5)] + [chat("[[fault:400]] refused")]
    write_jsonl(tmp_path / "requests.jsonl", rows)
    with FakeServerThread(FakeConfig()) as srv:
        env = {**os.environ, "OPENAI_BASE_URL": srv.url, "OPENAI_API_KEY": "sk-test"}
        env.pop("BATCHRUNNER_DB", None)
        first = _run_example(tmp_path, env)
        assert first.returncode == 3, first.stderr  # one job failed, as `run` says it
        sent = srv.stats.requests_total
        with (tmp_path / "results.csv").open(newline="") as f:
            rows_out = list(csv.DictReader(f))
        assert sorted(r["state"] for r in rows_out) == ["failed"] + ["succeeded"] * 5
        assert all(r["content"] for r in rows_out if r["state"] == "succeeded")
        # Again: the same batch, nothing sent again, the same export.
        again = _run_example(tmp_path, env)
        assert again.returncode == 3, again.stderr
        assert srv.stats.requests_total == sent
    assert (tmp_path / "jobs.db").exists()
    assert list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text()))) == [
        dict(r) for r in rows_out
    ]
