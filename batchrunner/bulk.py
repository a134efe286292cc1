"""Helpers for the bulk paths (submit, export) that handle a million rows in one call."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.util import Finalize
from typing import Any, Generic, Protocol, TypeVar

from batchrunner.errors import BatchrunnerError

T = TypeVar("T")
R = TypeVar("R")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)

#: Tasks each worker is handed ahead of the one whose result is wanted next.
TASKS_AHEAD_PER_WORKER = 2
#: How often a wait for a worker's result looks whether the workers are being stopped, and
#: how often a worker looks whether its parent is still alive.
WORKER_CHECK_S = 1.0
#: How long a worker may take to stop once the work is done, before it is killed...
WORKER_STOP_S = 10.0
#: ...looked at this often.
WORKER_POLL_S = 0.05
_NO_MORE: Any = object()
_ORPHANED: Any = object()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Automatic garbage collection off for the block, back on (if it was) at its end.

    Submit and export make a few short-lived containers per row and no reference cycles, so
    reference counting frees everything as they go; but every few thousand rows the collector
    walked the whole heap (SQLAlchemy's and alembic's objects included), 1-4 us a row in all.
    The few cycles the event loop makes in between wait for the next collection after it.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def workers_for(large: bool) -> int:
    """Worker processes for bulk work: one per usable core when the work is `large` and there
    are two cores or more, else 0 (the calling process does it all)."""
    cores = usable_cores()
    return cores if large and cores > 1 else 0


class Handler(Protocol[T_contra, R_co]):
    """What a worker process of `OrderedWorkers` does with each task."""

    async def handle(self, task: T_contra) -> R_co: ...

    async def close(self) -> None: ...


class OrderedWorkers(Generic[T, R]):
    """Tasks handed to worker processes; their results come back in the order of the tasks.

    For CPU-bound Python (parsing a request file, turning rows into CSV), which one process
    runs on one core whatever the machine has. Each worker calls `setup(*args)` once (a
    module-level coroutine function: it is imported by name in the worker) for the `Handler`
    of its tasks; `args` come with the tasks (`map`), so that the workers may be started
    first (`start`) and start up (import, which takes most of a second) while this process
    is still working out what they will need. At most `TASKS_AHEAD_PER_WORKER` tasks per
    worker are handed out ahead of the result wanted next, so memory stays flat. A task that
    raises in a worker fails the whole map with `error(its message)`; a worker that dies
    fails it too. Every worker is stopped at the end of `map`, or by `close`.

    Workers are started with multiprocessing's "spawn", which imports the main module again:
    a program using this must guard its main module with `if __name__ == "__main__":`.
    """

    def __init__(
        self,
        setup: Callable[..., Awaitable[Handler[T, R]]],
        workers: int,
        *,
        name: str,
        error: type[BatchrunnerError] = BatchrunnerError,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._setup_args: Any = context.Queue()
        self._tasks: Any = context.Queue()
        # A pipe of its own for each worker's results. A worker that dies part way through
        # writing one (the OOM killer, a kill -9) closes its end, and the read of that pipe
        # ends; on one queue shared by every worker the read waited for the rest for ever
        # (and the other workers for the lock the dead one held).
        pipes = [context.Pipe(duplex=False) for _ in range(workers)]
        self._results = [reader for reader, _ in pipes]
        #: The workers' ends, closed here once the workers have them.
        self._result_ends: list[Any] = [writer for _, writer in pipes]
        #: One read of the result pipes at a time: a map left while it waited for a result (a
        #: Ctrl-C) leaves that wait's thread reading them as `_stop` discards what is left.
        self._reading = threading.Lock()
        self._error = error
        self._processes = [
            context.Process(
                target=_serve,
                args=(setup, self._setup_args, self._tasks, writer),
                name=f"batchrunner-{name}-{i}",
                daemon=True,
            )
            for i, (_, writer) in enumerate(pipes)
        ]
        self._started = False
        self._args_sent = False
        self._stopped = False
        # Workers ignore SIGTERM (`_serve`), and at exit multiprocessing ends its daemon
        # children with it, then waits for them: any still alive then (a stop that failed, a
        # close never awaited) are killed first, as they are should this object be dropped.
        Finalize(self, _kill_alive, args=(self._processes,), exitpriority=10)

    def start(self) -> None:
        """Start the worker processes (`map` does, if this was not called)."""
        if not self._started:
            self._started = True
            try:
                with _stop_signals_blocked():
                    for process in self._processes:
                        process.start()
            finally:
                for end in self._result_ends:
                    end.close()

    async def close(self) -> None:
        """Stop the workers (waiting for them in a thread); nothing once they are stopped."""
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            await asyncio.get_running_loop().run_in_executor(None, self._stop)
        else:
            self._close_pipes_and_queues(read_all=True)

    async def map(self, args: tuple[Any, ...], tasks: Iterable[T]) -> AsyncGenerator[R, None]:
        """The results of `tasks`, in their order, from workers set up with `setup(*args)`."""
        if self._args_sent:
            raise RuntimeError("the workers of an OrderedWorkers run one map only")
        loop = asyncio.get_running_loop()
        pending = iter(tasks)
        try:
            # Pickled here, so that arguments that cannot be fail the map (the queue's own
            # thread would only print the error, and the workers wait for them for ever).
            setup_args = _pickled(args)
            self.start()
            self._args_sent = True
            for _ in self._processes:
                self._setup_args.put(setup_args)
            asked = 0
            done: dict[int, R] = {}
            for index in itertools.count():
                while asked < index + TASKS_AHEAD_PER_WORKER * len(self._processes):
                    task = next(pending, _NO_MORE)
                    if task is _NO_MORE:
                        break
                    # Pickled here, as the setup's arguments are.
                    self._tasks.put((asked, _pickled(task)))
                    asked += 1
                if index >= asked:
                    return
                while index not in done:
                    number, result = await loop.run_in_executor(None, self._next_result)
                    done[number] = result
                yield done.pop(index)
        finally:
            await self.close()

    def _next_result(self) -> tuple[int, R]:
        while not self._stopped:
            try:
                ready = multiprocessing.connection.wait(self._results, WORKER_CHECK_S)
            except (OSError, ValueError):
                if self._stopped:
                    break  # closed by `_stop` meanwhile
                raise
            with self._reading:
                if self._stopped:
                    break
                for reader in ready:
                    assert isinstance(reader, multiprocessing.connection.Connection)
                    try:
                        if not reader.poll():
                            continue  # read by `_stop` meanwhile
                        index, result, error = reader.recv()
                    except (EOFError, OSError):
                        # Its worker is gone (what it sent before, its error if it had one,
                        # was read first); OSError: part way through a result.
                        process = self._processes[self._results.index(reader)]
                        process.join(WORKER_CHECK_S)
                        raise self._error(
                            f"a worker process stopped (exit code {process.exitcode})"
                        ) from None
                    if error is not None:
                        raise self._error(error)
                    return index, result
        # Only a wait that the map left behind gets here: nobody reads this.
        raise self._error("the workers were stopped")

    def _stop(self) -> None:
        # A worker still waiting for its setup stops at None there, one at work at None
        # among the tasks.
        stop = self._tasks if self._args_sent else self._setup_args
        for _ in self._processes:
            stop.put(None)
        deadline = time.monotonic() + WORKER_STOP_S
        for process in self._processes:
            if process.pid is None:
                continue  # never started: a start of an earlier one failed
            while process.exitcode is None and time.monotonic() < deadline:
                # Results nobody will read (the map was left early) are read all the same:
                # a worker cannot exit while its last ones are stuck in a full pipe.
                self._discard_results()
                process.join(WORKER_POLL_S)
            if process.exitcode is None:
                process.kill()  # (it ignores SIGTERM, see `_serve`)
                process.join()
        # Workers that stopped at their None (exit code 0) read everything before it: each
        # queue's feeder thread can write what it still holds, and is waited for here. Left
        # to end as the process exits, it held the last references to the queue's semaphores
        # and was cut off unlinking them, and the resource tracker warned of a leak. A worker
        # that failed or died may have left a pipe full of tasks, where the feeder would wait
        # for ever: not waited for.
        self._close_pipes_and_queues(
            read_all=all(p.exitcode == 0 for p in self._processes if p.pid is not None)
        )

    def _close_pipes_and_queues(self, *, read_all: bool) -> None:
        for q in (self._setup_args, self._tasks):
            q.close()
            if read_all:
                q.join_thread()
            else:
                q.cancel_join_thread()
        for end in self._result_ends:
            end.close()  # (closed already once the workers started)
        with self._reading:
            for reader in self._results:
                reader.close()

    def _discard_results(self) -> None:
        with self._reading:
            for reader in self._results:
                # (EOFError: its worker has stopped.)
                with contextlib.suppress(EOFError, OSError):
                    while reader.poll():
                        reader.recv()


#: Signals that stop a command (cli.py): the parent's to handle, not its workers'.
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back from this thread for the block, and from the processes it
    starts, which inherit the mask: a Ctrl-C while a worker is still starting up (importing,
    most of a second) would end it with a KeyboardInterrupt and its traceback. The worker
    ignores them, then lets them through (`_serve`). This process still gets one sent
    meanwhile: on another of its threads, or at the block's end (as the standard library
    starts its resource tracker)."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS - blocked)


def _serve(
    setup: Callable[..., Awaitable[Handler[Any, Any]]],
    setup_args: Any,
    tasks: Any,
    results: Any,
) -> None:
    """A worker process of `OrderedWorkers`: its setup's arguments, pickled (or None: stop)
    first, then (index, pickled task) in, (index, result, error) out, until None comes."""
    gc.disable()  # as collector_paused: bulk work makes no cycles worth a collection
    # Ctrl-C reaches the whole process group, and so does a SIGTERM sent to it (a service
    # manager's stop): the parent's to handle, and it stops us; the command then says
    # "interrupted", where a worker killed by one would fail it with its exit code. Held back
    # since the start (`_stop_signals_blocked`): ignored first, then let through.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    args = _get_or_orphaned(setup_args)
    if args is None or args is _ORPHANED:
        return
    if not asyncio.run(_serve_tasks(setup, args, tasks, _Sender(results))):
        # Gone before its None: the tasks after its last may be unread, which the parent
        # needs to know (`OrderedWorkers._stop`).
        sys.exit(1)


def _get_or_orphaned(source: Any) -> Any:
    """The next item of a queue from the parent; `_ORPHANED` once the parent is gone."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            # Blocking is fine: a worker's event loop runs nothing else meanwhile.
            return source.get(timeout=WORKER_CHECK_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return _ORPHANED


async def _serve_tasks(
    setup: Callable[..., Awaitable[Handler[Any, Any]]],
    args: bytes,
    tasks: Any,
    results: _Sender,
) -> bool:
    """True: stopped at the parent's None; False: stopped early, by an error (sent to the
    parent, setup's arguments that cannot be unpickled here included)."""
    try:
        try:
            handler = await setup(*pickle.loads(args))
        except Exception as exc:
            results.send((-1, None, _error_text(exc)))
            return False
        try:
            while True:
                item = _get_or_orphaned(tasks)
                if item is _ORPHANED:
                    # The process that asked was killed: nobody wants the rest.
                    return False
                if item is None:
                    return True
                index, task = item
                try:
                    # (A result that cannot be pickled is its task's error: `_Sender.send`.)
                    results.send((index, await handler.handle(pickle.loads(task)), None))
                except Exception as exc:
                    results.send((index, None, _error_text(exc)))
                    return False
        finally:
            await handler.close()
    finally:
        results.close()


class _Sender:
    """A worker's results (pickled) into its pipe, each written by a thread while the worker
    goes on with its next task (as a queue's feeder thread would; one result waits at most)."""

    def __init__(self, pipe: multiprocessing.connection.Connection) -> None:
        self._pipe = pipe
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="results")
        self._sending: Future[None] | None = None

    def send(self, message: tuple[int, Any, str | None]) -> None:
        """Pickled here, in the worker's own thread, so that one that cannot be raises here."""
        data = _pickled(message)
        self._wait()
        self._sending = self._thread.submit(self._pipe.send_bytes, data)

    def _wait(self) -> None:
        sending, self._sending = self._sending, None
        if sending is not None:
            # A broken pipe: the parent is gone, and nobody wants the rest.
            with contextlib.suppress(OSError):
                sending.result()

    def close(self) -> None:
        """Once the last result is written (or the parent is gone)."""
        self._wait()
        self._thread.shutdown()
        self._pipe.close()


def _pickled(obj: Any) -> bytes:
    """A task, setup's arguments or a result message as bytes (`Connection.recv` reads a
    message back)."""
    return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def _kill_alive(processes: list[Any]) -> None:
    for process in processes:
        if process.pid is not None and process.exitcode is None:
            process.kill()


def _error_text(exc: Exception) -> str:
    if isinstance(exc, BatchrunnerError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
