"""The process pool of the bulk paths: results in order, errors, and no worker left behind."""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batchrunner.bulk import OrderedWorkers, usable_cores
from batchrunner.errors import BatchrunnerError, StoreError

REPO = Path(__file__).resolve().parent.parent


class _Doubler:
    """Doubles numbers, slowest for the first tasks, so that results arrive out of order."""

    def __init__(self, fail_on: int | None) -> None:
        self._fail_on = fail_on

    async def handle(self, task: int) -> tuple[int, int]:
        if task == self._fail_on:
            raise ValueError(f"cannot double {task}")
        await asyncio.sleep(0.05 if task < 3 else 0.0)
        return task * 2, os.getpid()

    async def close(self) -> None:
        pass


async def _doubler(fail_on: int | None = None) -> _Doubler:
    return _Doubler(fail_on)


@pytest.mark.slow
async def test_results_come_back_in_the_order_of_the_tasks() -> None:
    workers: OrderedWorkers[int, tuple[int, int]] = OrderedWorkers(_doubler, 3, name="test")
    results = [result async for result in workers.map((), range(40))]
    assert [doubled for doubled, _ in results] == [2 * i for i in range(40)]
    assert len({pid for _, pid in results} - {os.getpid()}) >= 2  # spread over the workers


def _feeder_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "QueueFeederThread" and t.is_alive()}


@pytest.mark.slow
async def test_the_queues_threads_have_ended_when_the_map_has() -> None:
    """A queue's feeder thread held the last references to its semaphores: one still running
    as the process exited was cut off unlinking them, and the resource tracker warned of a
    leak. Once the workers have stopped at their None, the map waits for those threads."""
    before = _feeder_threads()
    workers: OrderedWorkers[int, tuple[int, int]] = OrderedWorkers(_doubler, 2, name="test")
    results = [doubled async for doubled, _ in workers.map((), range(10))]
    assert results == [2 * i for i in range(10)]
    assert [p.exitcode for p in workers._processes] == [0, 0]
    assert _feeder_threads() - before == set()


@pytest.mark.slow
async def test_a_task_that_raises_fails_the_map_with_its_message() -> None:
    workers: OrderedWorkers[int, tuple[int, int]] = OrderedWorkers(
        _doubler, 2, name="test", error=StoreError
    )
    seen = []
    with pytest.raises(StoreError, match="ValueError: cannot double 5"):
        async for doubled, _ in workers.map((5,), range(10)):
            seen.append(doubled)
    # The error comes as soon as it is known, perhaps before results of earlier tasks.
    assert seen == [2 * i for i in range(len(seen))] and len(seen) <= 5


@pytest.mark.slow
async def test_a_failing_setup_fails_the_map() -> None:
    workers: OrderedWorkers[int, int] = OrderedWorkers(_doubler, 1, name="test")
    with pytest.raises(BatchrunnerError, match="TypeError"):
        async for _ in workers.map(("too", "many"), range(3)):
            pass


@pytest.mark.slow
async def test_workers_started_early_stop_when_closed_before_any_map() -> None:
    """Export starts its workers before it knows their setup: when it fails in between,
    closing stops workers still waiting for it."""
    workers: OrderedWorkers[int, tuple[int, int]] = OrderedWorkers(_doubler, 2, name="test")
    workers.start()
    assert all(p.pid is not None and p.exitcode is None for p in workers._processes)
    await workers.close()
    # Each left by itself, none terminated.
    assert [p.exitcode for p in workers._processes] == [0, 0]
    await workers.close()  # nothing more to do


@pytest.mark.slow
async def test_workers_started_early_take_their_setup_with_the_tasks() -> None:
    workers: OrderedWorkers[int, tuple[int, int]] = OrderedWorkers(
        _doubler, 2, name="test", error=StoreError
    )
    workers.start()
    await asyncio.sleep(0.2)  # the workers wait for their setup meanwhile
    with pytest.raises(StoreError, match="cannot double 3"):
        async for _ in workers.map((3,), range(6)):
            pass
    with pytest.raises(RuntimeError, match="one map"):
        async for _ in workers.map((), range(1)):
            pass


@pytest.mark.slow
async def test_setup_arguments_that_cannot_be_pickled_fail_the_map_at_once() -> None:
    workers: OrderedWorkers[int, tuple[int, int]] = OrderedWorkers(_doubler, 2, name="test")
    workers.start()
    with pytest.raises(TypeError, match="pickle"):
        async for _ in workers.map((threading.Lock(),), range(3)):
            pass
    # The workers waiting for them were stopped.
    assert [p.exitcode for p in workers._processes] == [0, 0]


@pytest.mark.slow
async def test_a_task_that_cannot_be_pickled_fails_the_map_at_once() -> None:
    """Pickled by the queue's own thread, it was only printed there, and the map waited for
    its result for ever."""
    workers: OrderedWorkers[Any, tuple[int, int]] = OrderedWorkers(_doubler, 1, name="test")
    with pytest.raises(TypeError, match="pickle"):
        async for _ in workers.map((), [1, threading.Lock(), 3]):
            pass
    assert [p.exitcode for p in workers._processes] == [0]


_PARENT = """
import asyncio, sys
from batchrunner.bulk import OrderedWorkers
from tests.test_bulk import _doubler

async def main():
    workers = OrderedWorkers(_doubler, 2, name="test")
    async for _ in workers.map((), range(10**9)):
        for process in workers._processes:
            print(process.pid, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: only its parent's wait is missing.
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_workers_end_when_their_parent_is_killed() -> None:
    """A `kill -9` of submit or export must not leave its workers running for ever."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        cwd=REPO,
        stdout=subprocess.PIPE,
        # The killed parent's resource tracker reports its queues' semaphores as leaked.
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pids = [int(parent.stdout.readline()) for _ in range(2)]
        assert all(_alive(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


class _Big:
    async def handle(self, task: int) -> bytes:
        return bytes(1 << 20)  # more than a pipe holds: the sender blocks until it is read

    async def close(self) -> None:
        pass


async def _big() -> _Big:
    return _Big()


@pytest.mark.slow
async def test_leaving_early_does_not_wait_for_results_nobody_reads() -> None:
    """A submit that meets a repeated id stops reading its workers' results at once."""
    workers: OrderedWorkers[int, bytes] = OrderedWorkers(_big, 2, name="test")
    async with contextlib.aclosing(workers.map((), range(100))) as results:
        async for result in results:
            assert len(result) == 1 << 20
            break
    # Each worker left by itself: one stuck on its unread results is killed instead
    # (exit code -SIGKILL) once the stop has waited WORKER_STOP_S for it.
    assert [p.exitcode for p in workers._processes] == [0, 0]


class _Slow:
    async def handle(self, task: int) -> int:
        await asyncio.sleep(0.02)
        return task

    async def close(self) -> None:
        pass


async def _slow() -> _Slow:
    return _Slow()


@pytest.mark.slow
async def test_workers_leave_sigterm_to_the_parent() -> None:
    """A service manager's stop sends SIGTERM to every process of the command: the parent
    stops them (cli.py), and says "interrupted"; a worker killed by it would fail the command
    with its exit code instead."""
    workers: OrderedWorkers[int, int] = OrderedWorkers(_slow, 2, name="test")
    got = []
    async with contextlib.aclosing(workers.map((), range(40))) as results:
        async for result in results:
            got.append(result)
            if len(got) == 1:
                for process in workers._processes:
                    assert process.pid is not None
                    os.kill(process.pid, signal.SIGTERM)
    assert got == list(range(40))
    assert [p.exitcode for p in workers._processes] == [0, 0]


@pytest.mark.slow
async def test_a_worker_killed_part_way_through_a_result_fails_the_map() -> None:
    """The OOM killer or a kill -9 may stop a worker while it writes a result into its pipe:
    the read of it fails with the worker's exit code instead of waiting for the rest for
    ever (8 submits in 16 hung so, when one queue took every worker's results)."""
    workers: OrderedWorkers[int, bytes] = OrderedWorkers(_big, 1, name="test")
    workers.start()
    # A map's first steps, without its reads: the result (1 MiB) waits for room in the pipe.
    workers._setup_args.put(pickle.dumps(()))
    workers._args_sent = True
    workers._tasks.put((0, pickle.dumps(0)))
    (reader,) = workers._results
    deadline = time.monotonic() + 60
    # Another process's pipe: nothing to wait on but time.
    while _bytes_in(reader) < 4096 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    (process,) = workers._processes
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    failed: list[BaseException] = []

    def read() -> None:
        try:
            workers._next_result()
        except BaseException as exc:
            failed.append(exc)

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    reading.join(30)
    assert not reading.is_alive(), "the read waits for the rest of the result"
    assert len(failed) == 1 and isinstance(failed[0], BatchrunnerError)
    assert f"exit code {-signal.SIGKILL}" in str(failed[0])
    await workers.close()


def _bytes_in(pipe: Any) -> int:
    """How much waits to be read in a pipe (Linux's FIONREAD)."""
    waiting = array.array("i", [0])
    fcntl.ioctl(pipe.fileno(), termios.FIONREAD, waiting)
    return waiting[0]


class _Refuser:
    async def handle(self, task: bytes) -> None:
        raise ValueError("refused")

    async def close(self) -> None:
        pass


async def _refuser() -> _Refuser:
    return _Refuser()


def _refuse_to_load() -> None:
    raise ValueError("cannot be loaded here")


class _Unloadable:
    """Pickles, and fails to unpickle: as setup arguments that need what the worker lacks."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _refuse_to_load, ()


@pytest.mark.slow
async def test_setup_arguments_a_worker_cannot_unpickle_fail_the_map_with_the_reason() -> None:
    """Not only with the worker's exit code (its traceback went to the terminal)."""
    workers: OrderedWorkers[int, tuple[int, int]] = OrderedWorkers(_doubler, 1, name="test")
    with pytest.raises(BatchrunnerError, match="ValueError: cannot be loaded here"):
        async for _ in workers.map((_Unloadable(),), range(3)):
            pass


_FAILING_MAP = """
import asyncio
from batchrunner.bulk import OrderedWorkers
from batchrunner.errors import BatchrunnerError
from tests.test_bulk import _refuser

async def main():
    workers = OrderedWorkers(_refuser, 2, name="test")
    try:
        async for _ in workers.map((), (bytes(1 << 20) for _ in range(10))):
            pass
    except BatchrunnerError as exc:
        print(exc.message, [p.exitcode for p in workers._processes])

asyncio.run(main())
"""


def _in_a_process(script: str) -> subprocess.CompletedProcess[str]:
    """`script` run by a Python of its own, which a hang would not take the tests down with."""
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_workers_that_fail_leaving_tasks_unread_do_not_hold_up_the_stop() -> None:
    """Both workers fail at their first task, leaving the tasks handed out ahead of it unread:
    more than a pipe holds, so the thread writing them waits for ever. The stop must not wait
    for that thread (it does for one whose tasks were all read)."""
    done = _in_a_process(_FAILING_MAP)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ValueError: refused [1, 1]"


_LEFT_RUNNING = """
import asyncio, signal, time
from batchrunner.bulk import OrderedWorkers
from tests.test_bulk import _big, _in_signal_set

async def main():
    global workers
    workers = OrderedWorkers(_big, 2, name="test")
    workers.start()  # and never stopped
    deadline = time.monotonic() + 30
    while not all(_in_signal_set(p.pid, "SigIgn", signal.SIGTERM) for p in workers._processes):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_process_that_leaves_its_workers_running_still_exits() -> None:
    """At exit multiprocessing ends its daemon children with SIGTERM and waits for them;
    workers ignore it (the parent stops them), so a parent whose stop failed, or never ran,
    waited for ever."""
    done = _in_a_process(_LEFT_RUNNING)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("module", ["batchrunner.lines", "batchrunner.exportrows"])
def test_what_worker_processes_import_leaves_the_database_code_out(module: str) -> None:
    """Submit's and a SQLite export's workers start in a fraction of a second because these
    modules (and the pool's) import neither SQLAlchemy nor the database drivers."""
    code = (
        f"import sys, batchrunner.bulk, {module}\n"
        "heavy = ('sqlalchemy', 'aiosqlite', 'asyncpg', 'alembic', 'click')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(heavy)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.skipif(usable_cores() < 2, reason="worker processes need two cores or more")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_ctrl_c_as_the_workers_start_shows_no_traceback(tmp_path: Path) -> None:
    """A terminal's Ctrl-C goes to the whole process group: also to workers still starting up
    (importing, most of a second), which it ended with a KeyboardInterrupt and its traceback."""
    # Here, not at the top: the workers of the tests above import this module.
    import orjson
    import psutil

    from batchrunner.ingest import PARALLEL_MIN_BYTES
    from tests.conftest import chat, started_cli

    line = orjson.dumps(chat("x" * 200)) + b"\n"
    path = tmp_path / "big.jsonl"
    path.write_bytes(line * (PARALLEL_MIN_BYTES // len(line) + 1))
    db_path = tmp_path / "jobs.db"
    # Its own process group, with SIGINT at its default: a shell's foreground job.
    with started_cli("submit", str(path), db=f"sqlite:///{db_path}", process_group=0) as proc:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while not (starting := _a_worker_starting(parent)) and time.monotonic() < deadline:
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert starting, "no worker was seen starting up"
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted", stderr
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def _a_worker_starting(parent: Any) -> bool:
    """A worker past the interpreter's own start, whose handler turns SIGINT into a
    KeyboardInterrupt, and not yet at work, where it ignores SIGINT."""
    import psutil

    for child in parent.children():
        with contextlib.suppress(psutil.Error, OSError):
            if "spawn_main" in " ".join(child.cmdline()) and _in_signal_set(
                child.pid, "SigCgt", signal.SIGINT
            ):
                return True
    return False


def _in_signal_set(pid: int, field: str, sig: int) -> bool:
    """Whether `sig` is in a set of /proc/PID/status: SigCgt (caught), SigIgn (ignored)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False
