"""The API key never lands anywhere: database, outputs, error messages, exports, status.

Each test runs the command line in subprocesses with a recognisable key (`sk-test-` and random
hex), collects everything the commands printed and every file they wrote (the SQLite database
with its write-ahead log and shared memory, exports), and looks for the key in all of it.

Servers: the in-package fake API, which checks the key, and a small local server that is as
careless as some gateways are: it echoes the Authorization header back in error bodies, in
non-completion answers and in the 401 message, so the key reaches every place where an error
is stored or shown.

Plain http: the warning is checked through a real `run` pointed at a non-loopback address
(TEST-NET-1, which is never routed) on a batch that has already finished, so the run has
nothing to send and sends nothing; `is_insecure` itself is checked on a table of URLs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from click.testing import CliRunner

from batchrunner.cli import cli
from batchrunner.client import is_insecure
from batchrunner.fakeapi import FakeConfig, FakeServer
from tests.conftest import chat

MakeFile = Callable[..., Path]

pytestmark = pytest.mark.slow

#: TEST-NET-1 (RFC 5737): reserved for documentation, routed nowhere.
UNROUTED_BASE_URL = "http://192.0.2.1/v1"


def _key() -> str:
    return f"sk-test-{secrets.token_hex(16)}"


class Session:
    """Runs `batchrunner` commands against one SQLite database and keeps all they printed."""

    def __init__(self, tmp_path: Path, key: str | None) -> None:
        self.dir = tmp_path
        self.db = tmp_path / "jobs.db"
        self.key = key
        self.outputs: list[bytes] = []
        #: What the latest command printed to stdout.
        self.stdout = ""

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "BATCH"))}
        if self.key is not None:
            env["OPENAI_API_KEY"] = self.key
        return env | (extra or {})

    async def __call__(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        full_env = self.env(env)
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "batchrunner", "--db", f"sqlite:///{self.db}", *args],
            cwd=self.dir,
            env=full_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        self.outputs += [out, err]
        self.stdout = out.decode()
        assert b"Traceback" not in err, err.decode()
        assert proc.returncode is not None
        return proc.returncode, (out + err).decode()

    async def submit(self, path: Path, base_url: str) -> str:
        code, text = await self("submit", str(path), "--base-url", base_url)
        assert code == 0, text
        return self.stdout.strip()

    async def look(self, *args: str) -> None:
        """A command that only reads, run in process (in a thread: it runs its own event
        loop), which saves starting an interpreter for each."""
        result = await asyncio.to_thread(
            CliRunner().invoke, cli, ["--db", f"sqlite:///{self.db}", *args], env=self.env()
        )
        self.outputs += [result.stdout_bytes, result.stderr_bytes]
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert result.exit_code == 0, result.output

    async def look_at_everything(self, *batch_ids: str) -> None:
        """Every command that shows or exports what a batch stored."""
        await self.look("status")
        await self.look("status", "--json")
        for batch_id in batch_ids:
            await self.look("status", batch_id)
            await self.look("status", batch_id, "--json")
            if "export" in cli.commands:
                for fmt in ("csv", "jsonl"):
                    out = str(self.dir / f"{batch_id}.{fmt}")
                    await self.look("export", batch_id, "--format", fmt, "-o", out)
                    await self.look("export", batch_id, "--format", fmt)

    def assert_nowhere(self, *keys: str) -> None:
        written = [p for p in self.dir.rglob("*") if p.is_file()]
        assert self.db in written
        for key in keys:
            needle = key.encode()
            for path in written:
                assert needle not in path.read_bytes(), f"the key is in {path.name}"
            for i, output in enumerate(self.outputs):
                assert needle not in output, f"the key is in output {i}: {output[-500:]!r}"


async def test_the_key_is_nowhere_after_a_run(make_file: MakeFile, tmp_path: Path) -> None:
    key = _key()
    rows = [chat(f"secret {i}") for i in range(20)] + [
        chat("a failing one [[fault:400]]"),
        chat("a retried one [[fault:500x1]]"),
        chat("a streamed one", stream=True, stream_options={"include_usage": True}),
    ]
    run = Session(tmp_path, key)
    async with FakeServer(FakeConfig(api_key=key)) as srv:
        batch_id = await run.submit(make_file(rows), srv.url)
        code, text = await run("run", batch_id, "--quiet")
        assert code == 3, text  # one job failed for good, the rest succeeded with the key
        assert srv.stats.answers_by_status.get("401", 0) == 0
        assert "plain http" not in text  # loopback: no warning
    await run.look_at_everything(batch_id)
    run.assert_nowhere(key)


async def test_a_wrong_key_is_nowhere_either(make_file: MakeFile, tmp_path: Path) -> None:
    right, wrong = _key(), _key()
    run = Session(tmp_path, wrong)
    async with FakeServer(FakeConfig(api_key=right)) as srv:
        batch_id = await run.submit(make_file([chat(f"q{i}") for i in range(10)]), srv.url)
        code, text = await run("run", batch_id, "--quiet")
        assert code == 1, text
        assert "401" in text or "key" in text.lower()
        # Run again through another variable, as the message suggests one might.
        code, text = await run(
            "run", batch_id, "--quiet", "--api-key-env", "OTHER_KEY", env={"OTHER_KEY": wrong}
        )
        assert code == 1, text
    await run.look_at_everything(batch_id)
    run.assert_nowhere(wrong, right)


# -- a careless server ---------------------------------------------------------------------------


async def _echoing(request: web.Request) -> web.Response:
    """Puts the Authorization header it got into whatever it answers."""
    auth = request.headers.get("Authorization", "")
    text = orjson.loads(await request.read())["messages"][-1]["content"]
    said = {"error": {"message": f"request with {auth} refused", "type": "invalid_request_error"}}
    headers = {"x-echo": auth}
    if "echo-401" in text:
        said["error"]["code"] = "invalid_api_key"
        return web.json_response(said, status=401, headers=headers)
    if "echo-400" in text:
        return web.json_response(said, status=400, headers=headers)
    if "echo-500" in text:
        return web.json_response(said, status=500, headers=headers)
    if "echo-not-completion" in text:
        return web.json_response({"note": f"got {auth}"}, status=200, headers=headers)
    if "echo-bad-json" in text:
        return web.Response(body=f'{{"id": "{auth}", "choi', status=200, headers=headers)
    return web.json_response(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "fine"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        },
        headers=headers,
    )


@pytest.fixture
async def careless_url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _echoing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_a_server_that_echoes_the_key_cannot_make_it_stored_or_shown(
    make_file: MakeFile, tmp_path: Path, careless_url: str
) -> None:
    key = _key()
    run = Session(tmp_path, key)
    rows = [
        chat("fine"),
        chat("echo-400"),
        chat("echo-500"),
        chat("echo-not-completion"),
        chat("echo-bad-json"),
    ]
    failing = await run.submit(make_file(rows), careless_url)
    code, text = await run("run", failing, "--quiet", "--max-attempts", "2")
    assert code == 3, text
    stopped = await run.submit(make_file([chat("echo-401")]), careless_url)
    code, text = await run("run", stopped, "--quiet")
    assert code == 1, text
    assert "refused" in text  # the server's message is shown, with the key taken out
    await run.look_at_everything(failing, stopped)
    run.assert_nowhere(key)
    # The echoed errors were stored, with the key taken out of them.
    assert b"request with Bearer " in run.db.read_bytes()


# -- plain http ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "insecure"),
    [
        ("http://192.0.2.1/v1", True),
        ("http://10.0.0.5:8000/v1", True),
        ("http://gateway.example/api/v1", True),
        ("HTTP://Gateway.Example/v1", True),
        ("http://[2001:db8::1]/v1", True),
        ("https://api.openai.com/v1", False),
        ("https://192.0.2.1/v1", False),
        ("http://127.0.0.1:8000/v1", False),
        ("http://127.1.2.3/v1", False),
        ("http://localhost:8000/v1", False),
        ("http://api.localhost/v1", False),
        ("http://[::1]:8000/v1", False),
    ],
)
def test_is_insecure(url: str, insecure: bool) -> None:
    assert is_insecure(url) is insecure


async def test_a_key_bound_for_plain_http_elsewhere_is_warned_about(
    make_file: MakeFile, tmp_path: Path
) -> None:
    key = _key()
    run = Session(tmp_path, key)
    async with FakeServer(FakeConfig(api_key=key)) as srv:
        batch_id = await run.submit(make_file([chat("done already")]), srv.url)
        code, text = await run("run", batch_id, "--quiet")
        assert code == 0, text
        assert "plain http" not in text
    # Nothing is left to send, so pointing the run elsewhere sends nothing there.
    code, text = await run(
        "run", batch_id, "--quiet", "--timeout", "1", "--base-url", UNROUTED_BASE_URL
    )
    assert code == 0, text
    assert "(0 request(s) sent)" in text
    warning = next(line for line in text.splitlines() if "plain http" in line)
    assert UNROUTED_BASE_URL in warning and "key" in warning
    run.assert_nowhere(key)


# -- what reaches a terminal ---------------------------------------------------------------------

EVIL = "\x1b[2K\r\x1b[32mALL GOOD\x1b]8;;http://evil.example/\x07link\x1b]8;;\x07\x9b"


async def _spoofing(request: web.Request) -> web.Response:
    """Answers with terminal escape sequences in the model's name, or in a 401's message."""
    text = orjson.loads(await request.read())["messages"][-1]["content"]
    if "refuse" in text:
        return web.json_response({"error": {"message": f"bad key {EVIL}"}}, status=401)
    completion = {
        "object": "chat.completion",
        "model": f"gpt{EVIL}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    return web.json_response(completion)


async def test_escape_sequences_from_a_server_reach_no_terminal(
    make_file: MakeFile, tmp_path: Path
) -> None:
    """A server's model name (in `status`) or error message (in the run's stop message) with
    escape sequences could rewrite what the terminal showed: a line made to say ALL GOOD, a
    link to elsewhere. They are written out instead (`\\x1b`)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _spoofing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        run = Session(tmp_path, _key())
        answered = await run.submit(make_file([chat("fine")]), url)
        assert (await run("run", answered, "--quiet"))[0] == 0
        refused = await run.submit(make_file([chat("refuse")]), url)
        code, text = await run("run", refused, "--quiet")
        assert code == 1 and "bad key \\x1b[2K\\x0d\\x1b[32mALL GOOD" in text
        await run.look("status", answered)
        await run.look("status")
    finally:
        await runner.cleanup()
    for output in run.outputs:
        assert not any(c in output for c in (b"\x1b", b"\r", b"\x07", "\x9b".encode()))
    assert any(b"gpt\\x1b[2K" in output for output in run.outputs)
