"""Pool: the kernel side that starts, feeds and heals the worker processes.

The dispatcher runs on its own daemon thread under ``anyio.run`` and owns all pool
state; callers (the kernel's thread, other threads, event-loop code) only hand it
commands through an inbox and wait on ``concurrent.futures`` futures, so the kernel
never blocks on the pool. ``run`` is the blocking facade over ``submit``.

What the pool promises (DESIGN.md):

- All workers start at once: the template process (see :mod:`dspool_jupyter.worker`)
  imports the preloads once and forks every worker; one ``WorkerReady`` event per worker.
- Calls that arrive before any worker is ready queue and run when one is.
- Anonymous calls go to any idle worker. A session's calls go, in order, to the session's
  worker (the first worker that served it); when that worker dies the session moves to
  a live worker.
- A worker that dies fails only the call it was running, with :class:`WorkerCrashed`
  carrying the exit code or signal, and is replaced at once.
- A call past its timeout fails with :class:`CallTimeout`; its worker is killed and
  replaced. The timeout counts the time the call runs on its worker, not the time it
  waited in the queue. Replies are matched by call id, so a late reply never reaches
  another caller.
- ``CallFuture.cancel()`` (and a kernel interrupt during ``run``) cancels a queued call,
  or interrupts a running one with SIGINT (its worker survives); a program that ignores
  the interrupt for ``CANCEL_GRACE`` seconds has its worker killed and replaced.
- Outcomes: a value, ``ProgramError``, ``WorkerCrashed``, ``CallTimeout``,
  ``ProgramNotFound``, ``CallCancelled`` or ``PoolClosed``. Nothing hangs.
- Anything a program prints is captured and shown by ``run`` in the caller's output
  (``future.stdout`` / ``future.stderr`` for ``submit``).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import cloudpickle

from . import protocol
from .errors import (
    CallCancelled,
    CallTimeout,
    DspoolError,
    PoolClosed,
    PoolStartTimeout,
    ProgramError,
    ProgramNotFound,
    UnknownWorker,
    UnpicklableArguments,
    WorkerCrashed,
    error_from_reply,
    unloadable_result,
)
from .events import (
    CallFailed,
    CallFinished,
    CallStarted,
    Event,
    EventBus,
    PoolClosedEvent,
    PoolReady,
    ProgramDefined,
    ProgramDeleted,
    WorkerDied,
    WorkerReady,
    WorkerReplaced,
    WorkerStarting,
)
from .status import FailedCall, PoolStatus, WorkerStatus
from .store import ProgramStore

if TYPE_CHECKING:
    from .journal import Journal, JournalInfo
    from .mapping import MapHandle, MapResult

__all__ = [
    "CANCEL_GRACE",
    "DEFAULT_MAX_RESULT_BYTES",
    "HEARTBEAT_INTERVAL",
    "CallFuture",
    "Pool",
    "current_pool",
    "on_current_pool_changed",
    "preload_modules",
]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's heartbeats
SUPERVISE_IDLE = 1.0  # seconds the supervisor sleeps when no deadline is pending
CANCEL_GRACE = 2.0  # seconds a program gets to stop after SIGINT before its worker is killed
EXIT_STATUS_WAIT = 0.5  # seconds to wait for a dead worker's exit code before reporting
CLOSE_TIMEOUT = 5.0  # seconds close() waits for the template to stop its workers
DEFAULT_MAX_RESULT_BYTES = 1 << 30  # a larger pickled result is an error, not a transfer
RECENT_FAILURES = 50  # failed calls kept for status()
PIPELINE_DEPTH = 2  # calls sent to one worker at once: one runs, one waits in its socket
PIPELINE_SHORT_CALL = 0.005  # seconds: only behind a program this fast may a call wait
DURATION_MEMORY = 4096  # programs whose typical run time the pool remembers
READ_CHUNK = 1 << 20  # bytes read from a worker socket at once
OWNER_ENV = "DSPOOL_POOL_TOKEN"  # set in every pool process's environment (leak checks)


class CallFuture(concurrent.futures.Future[Any]):
    """A ``concurrent.futures.Future`` for one pool call.

    ``cancel()`` also works while the call runs: the worker is interrupted. After the
    call, ``stdout`` and ``stderr`` hold what the program printed and ``worker_id`` the
    worker that ran it.
    """

    def __init__(self, pool: Pool, program: str) -> None:
        super().__init__()
        self.program = program
        self.stdout = ""
        self.stderr = ""
        self.worker_id: str | None = None
        self._pool_ref = weakref.ref(pool)
        self._call: _Call | None = None

    def running(self) -> bool:
        return self.worker_id is not None and not self.done()

    def cancel(self) -> bool:
        cancelled = super().cancel()
        pool = self._pool_ref()
        if cancelled and pool is not None and self._call is not None:
            pool._post(("cancel", self._call))
        return cancelled


@dataclass(eq=False)
class _Call:
    id: int
    program: str
    program_id: str
    session: str | None
    blob: bytes
    future: CallFuture
    timeout: float | None
    worker: _Worker | None = None
    started: float = 0.0
    deadline: float | None = None
    cancel_deadline: float | None = None


@dataclass(eq=False)
class _Worker:
    id: str
    sock: socket.socket
    started_at: float
    start_mono: float
    pid: int | None = None
    state: str = "starting"  # starting | idle | busy | stopping | dead
    calls: int = 0
    errors: int = 0
    rss: int | None = None
    last_heartbeat: float | None = None
    # Calls sent to the worker, in order: the first runs, the rest wait in its socket.
    inflight: collections.deque[_Call] = field(default_factory=collections.deque)
    outbox: collections.deque[memoryview] = field(default_factory=collections.deque)
    queue: collections.deque[_Call] = field(default_factory=collections.deque)
    reader: protocol.FrameReader = field(default_factory=protocol.FrameReader)
    kill_reason: str | None = None
    returncode: int | None = None
    exited: bool = False
    lost_call: _Call | None = None
    lost_at: float = 0.0
    template: _Template | None = None
    replace: bool = True
    reading: bool = False

    @property
    def call(self) -> _Call | None:
        """The call the worker is running now."""
        return self.inflight[0] if self.inflight else None


@dataclass(eq=False)
class _Template:
    process: subprocess.Popen[bytes]
    control: socket.socket
    started: float
    ready: bool = False
    stopping: bool = False


# -------------------------------------------------------------- current pool registry

_open_pools: list[weakref.ref[Pool]] = []
_pool_listeners: list[Callable[[Pool | None], None]] = []
_registry_lock = threading.Lock()


def current_pool() -> Pool | None:
    """The most recently started pool of this process that is not closed, or None."""
    with _registry_lock:
        for ref in reversed(_open_pools):
            pool = ref()
            if pool is not None and not pool.closed:
                return pool
    return None


def on_current_pool_changed(callback: Callable[[Pool | None], None]) -> Callable[[], None]:
    """Call ``callback(current_pool())`` whenever a pool starts or closes; returns unsubscribe."""
    with _registry_lock:
        _pool_listeners.append(callback)

    def unsubscribe() -> None:
        with _registry_lock:
            if callback in _pool_listeners:
                _pool_listeners.remove(callback)

    return unsubscribe


def _registry_changed() -> None:
    current = current_pool()
    with _registry_lock:
        listeners = list(_pool_listeners)
    for callback in listeners:
        try:
            callback(current)
        except Exception:
            log.exception("dspool current-pool listener failed")


@atexit.register
def _close_all_pools() -> None:
    with _registry_lock:
        pools = [ref() for ref in _open_pools]
    for pool in pools:
        if pool is not None:
            pool.close()


# ------------------------------------------------------------------------------ Pool


class Pool:
    """A self-healing pool of worker processes running programs from a shared store.

    ``workers``: how many processes (default: the CPU count). ``store``: a directory, a
    :class:`ProgramStore`, or None for the per-user default. ``preload``: modules the
    template imports once so every worker starts with them. ``call_timeout``: default
    per-call timeout in seconds (None: no limit). ``max_result_bytes``: the largest
    pickled result a call may return. ``worker_memory_limit``: bytes of data memory a
    worker may use (``RLIMIT_DATA``); a program that needs more gets ``MemoryError``,
    reported as :class:`ProgramError`, instead of the machine's OOM killer. The pool
    starts at once; ``wait_ready`` blocks until every worker is ready (calls made before
    then queue).

    ``backend="dask"`` returns a :class:`~dspool_jupyter.dask_backend.DaskPool` instead:
    the same pool on the Dask cluster whose scheduler is at ``address`` (None: a private
    ``LocalCluster``). ``backend="local"``, the default, is this class.
    """

    def __new__(
        cls, *args: Any, backend: str = "local", address: str | None = None, **kwargs: Any
    ) -> Pool:
        if backend == "dask" and cls is Pool:
            from .dask_backend import DaskPool  # the dask extra: imported only when asked

            return super().__new__(DaskPool)
        return super().__new__(cls)

    def __init__(
        self,
        workers: int | None = None,
        store: str | os.PathLike[str] | ProgramStore | None = None,
        preload: Iterable[str] = (),
        call_timeout: float | None = None,
        *,
        backend: str = "local",
        address: str | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        worker_memory_limit: int | None = None,
    ) -> None:
        if backend != "local":
            raise ValueError(f"backend must be 'local' or 'dask', got {backend!r}")
        if address is not None:
            raise ValueError("address= names a Dask scheduler: use it with backend='dask'")
        target = (os.cpu_count() or 1) if workers is None else workers
        if not isinstance(target, int) or isinstance(target, bool) or target < 1:
            raise ValueError(f"workers must be a positive whole number, got {workers!r}")
        if call_timeout is not None and not call_timeout > 0:
            raise ValueError(
                f"call_timeout must be a positive number of seconds, got {call_timeout!r}"
            )
        self.preload = preload_modules(preload)
        self.store = store if isinstance(store, ProgramStore) else ProgramStore(store)
        self.target = target
        self.call_timeout = call_timeout
        self.max_result_bytes = max_result_bytes
        self.heartbeat_interval = heartbeat_interval
        if worker_memory_limit is not None and worker_memory_limit < 64 << 20:
            raise ValueError(
                "worker_memory_limit must be at least 64 MiB (in bytes), "
                f"got {worker_memory_limit!r}"
            )
        self.worker_memory_limit = worker_memory_limit
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

        self._bus = EventBus()
        self._ids = itertools.count(1)
        self._worker_numbers = itertools.count(1)
        self._inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._closed = False
        self._closing = False
        self._ready_cond = threading.Condition()
        # Guards the dispatcher state below. The dispatcher thread holds it in each of its
        # callbacks; a caller's submit takes it to hand a call straight to an idle worker
        # (one thread hop less than going through the inbox). Re-entrant: an event
        # subscriber may submit.
        self._lock = threading.RLock()
        self._loop_thread: int | None = None

        # Dispatcher state: touched only on the dispatcher thread (status() only reads).
        self._workers: dict[str, _Worker] = {}
        self._idle: collections.deque[_Worker] = collections.deque()
        self._queue: collections.deque[_Call] = collections.deque()
        self._homes: dict[str, _Worker] = {}
        self._durations: dict[str, float] = {}  # program id -> typical run time (s)
        self._next_due: float | None = None  # the supervisor's next deadline (monotonic)
        self._template: _Template | None = None
        self._template_failures = 0
        self._startup_failures = 0
        self._dying: dict[str, _Worker] = {}
        self._ready_count = 0
        self._ever_ready = False
        self._ready_announced = False
        self._started_at = time.time()
        self._start_mono = time.monotonic()
        self._startup_seconds: float | None = None
        self._calls_done = 0
        self._calls_failed = 0
        self._replaced = 0
        self._last_error: str | None = None
        self._failures: collections.deque[FailedCall] = collections.deque(maxlen=RECENT_FAILURES)
        self._setups: dict[str, tuple[str, str, bytes]] = {}  # key -> (program id, name, args)
        self._setup_session = f"_pool.{self.token}"
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop_error: BaseException | None = None

        self._thread = threading.Thread(target=self._thread_main, name="dspool-pool", daemon=True)
        self._thread.start()
        with _registry_lock:
            _open_pools.append(weakref.ref(self))
        _registry_changed()

    # ------------------------------------------------------------------ public API
    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._ready_count}/{self.target} ready"
        return f"<Pool {state} store={str(self.store.directory)!r}>"

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Receive every pool event (see :mod:`dspool_jupyter.events`); returns unsubscribe."""
        return self._bus.subscribe(callback)

    def wait_ready(self, timeout: float | None = 30) -> None:
        """Block until all workers are ready; :class:`PoolStartTimeout` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready_cond:
            while self._ready_count < self.target:
                if self._closed or self._closing:
                    raise PoolClosed()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolStartTimeout(
                        self._ready_count, self.target, timeout or 0, self._last_error
                    )
                self._ready_cond.wait(0.1 if remaining is None else min(remaining, 0.1))

    def define(
        self,
        name: str,
        program: str | Callable[..., Any],
        entry: str | None = None,
        session: str | None = None,
    ) -> str:
        """Store ``program`` (source text or a callable) as ``name``; returns its id.

        Every worker sees it at once (the store is shared). Source is checked here:
        a syntax error or a missing entry raises :class:`InvalidProgram`.
        """
        spec = self.store.put(name, program, entry=entry, session=session)
        if self._bus.active:
            self._bus.emit(ProgramDefined(name=name, program_id=spec.id, session=session))
        return spec.id

    def delete(self, name: str, session: str | None = None) -> bool:
        """Delete ``name`` for every worker; False when it did not exist."""
        deleted = self.store.delete(name, session)
        if deleted and self._bus.active:
            self._bus.emit(ProgramDeleted(name=name, session=session))
        return deleted

    def programs(self, session: str | None = None) -> list[str]:
        """Names of the programs a call in ``session`` (or anonymous) can run."""
        return self.store.names(session)

    def end_session(self, session: str) -> int:
        """Forget ``session``: delete its programs and free its worker affinity."""
        removed = self.store.clear_session(session)
        if not self.closed:
            self._post(("end_session", session))
        return removed

    def define_signature(
        self,
        name: str,
        signature: str,
        module: str = "Predict",
        session: str | None = None,
        **options: Any,
    ) -> str:
        """Define a DSPy program from a declarative signature (the ``dspy`` extra).

        ``signature`` is e.g. ``"question -> answer"`` (typed fields and instruction
        lines allowed); ``module`` is ``Predict`` or ``ChainOfThought``; ``options``:
        ``instructions``, ``demos`` and the module's config. Returns the program's id.
        See :mod:`dspool_jupyter.dspy_programs`.
        """
        from . import dspy_programs

        program_id = dspy_programs.define_signature(
            self, name, signature, module=module, session=session, **options
        )
        if self._bus.active:
            self._bus.emit(ProgramDefined(name=name, program_id=program_id, session=session))
        return program_id

    def configure_lm(self, model: Any, **kwargs: Any) -> None:
        """Make ``model`` DSPy's LM in every worker, later ones included (the ``dspy`` extra).

        ``model``: ``"dummy"`` (offline, ``answers={...}``), a ``dspy.LM`` model name
        (``kwargs`` go to ``dspy.LM``) or an LM object. See
        :func:`dspool_jupyter.dspy_programs.configure_lm`.
        """
        from . import dspy_programs

        dspy_programs.configure_lm(self, model, **kwargs)

    def set_worker_setup(
        self,
        key: str,
        program: str | Callable[..., Any],
        *args: Any,
        entry: str | None = None,
        timeout: float | None = 60,
        **kwargs: Any,
    ) -> None:
        """Run ``program(*args, **kwargs)`` in every worker, now and in every later worker.

        For per-process configuration that every call relies on (DSPy's LM, a client, a
        seed). ``key`` names the set-up: setting the same key again replaces it. Blocks
        until every ready worker has run it; a worker that starts later (a replacement,
        a restart) runs every set-up before its first call. Raises :class:`ProgramError`
        if it failed in a worker (the pool and the other workers carry on).
        """
        if self.closed:
            raise PoolClosed()
        name = f"setup.{key}"
        if isinstance(program, str) and entry is None:
            entry = key  # source text: the entry defaults to the set-up's key
        spec = self.store.put(name, program, entry=entry, session=self._setup_session)
        try:
            blob = cloudpickle.dumps((args, kwargs))
        except Exception as exc:
            raise UnpicklableArguments(name, f"{type(exc).__name__}: {exc}") from exc
        applied: concurrent.futures.Future[list[CallFuture]] = concurrent.futures.Future()
        self._post(("setup", key, (spec.id, name, blob), applied))
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in applied.result(timeout):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            future.result(remaining)

    def remove_worker_setup(self, key: str) -> None:
        """Stop running set-up ``key`` in new workers (running workers keep its effect)."""
        if not self.closed:
            self._post(("remove_setup", key))

    def _prepare_call(
        self,
        future: CallFuture,
        program: str,
        session: str | None,
        timeout: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[str, bytes, float | None] | None:
        """Resolve and pickle one call (both backends): ``(program id, args, timeout)``.

        A problem of this one call is set on ``future`` (and None returned); a bad
        ``timeout`` is the caller's mistake and raises.
        """
        try:
            program_id = self.store.resolve(program, session)
        except ProgramNotFound as exc:
            future.set_exception(exc)
            return None
        try:
            blob = cloudpickle.dumps((args, kwargs))
        except Exception as exc:
            future.set_exception(UnpicklableArguments(program, f"{type(exc).__name__}: {exc}"))
            return None
        if timeout is None:
            timeout = self.call_timeout
        elif not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        return program_id, blob, timeout

    def submit(
        self,
        program: str,
        *args: Any,
        session: str | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> CallFuture:
        """Queue one call; returns a :class:`CallFuture` at once.

        Problems with this one call (unknown program, arguments that cannot be pickled)
        are set on the future, so ``map``-style code collects them per item.
        """
        if self.closed:
            raise PoolClosed()
        future = CallFuture(self, program)
        prepared = self._prepare_call(future, program, session, timeout, args, kwargs)
        if prepared is None:
            return future
        program_id, blob, timeout = prepared
        call = _Call(next(self._ids), program, program_id, session, blob, future, timeout)
        future._call = call
        if self._loop_thread is not None and self._idle and not self._inbox:
            # A worker looks idle: hand the call to it from this thread (one thread hop
            # less). Otherwise the inbox: a burst of submits then costs the caller a
            # deque append each, and with commands still in the inbox a call goes behind
            # them so one thread's calls keep their order.
            with self._lock:
                if not self._closing:
                    self._enqueue(call)
                    return future
        self._post(("call", call))
        if self._closed and not future.done():  # lost a race with close()
            future.set_exception(PoolClosed())
        return future

    def run(
        self,
        program: str,
        *args: Any,
        session: str | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run one call and return its value (or raise its error).

        What the program printed is written to this process's stdout/stderr. A
        KeyboardInterrupt while waiting (the kernel's stop button) cancels the call.
        """
        future = self.submit(program, *args, session=session, timeout=timeout, **kwargs)
        try:
            future.exception()  # waits (concurrent.futures.wait costs more per call)
        except KeyboardInterrupt:
            future.cancel()
            raise
        except concurrent.futures.CancelledError:
            pass  # result() below raises it
        _echo_output(future)
        return future.result()

    async def arun(
        self,
        program: str,
        *args: Any,
        session: str | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """``run`` for async code (top-level ``await`` in a notebook); cancellable."""
        future = self.submit(program, *args, session=session, timeout=timeout, **kwargs)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException:
            pass
        _echo_output(future)
        return future.result()

    def status(self) -> PoolStatus:
        """A snapshot of the pool (safe from any thread; see :mod:`dspool_jupyter.status`).

        From the moment ``close()`` starts, the snapshot is 'closed' with no workers:
        they are being stopped, not serving.
        """
        closing = self._closed or self._closing
        workers = (
            ()
            if closing
            else tuple(
                WorkerStatus(
                    id=w.id,
                    pid=w.pid,
                    state=w.state,
                    calls=w.calls,
                    errors=w.errors,
                    rss_bytes=w.rss,
                    last_heartbeat=w.last_heartbeat,
                    started_at=w.started_at,
                    program=w.call.program if w.call is not None else None,
                )
                for w in list(self._workers.values())
                if w.state != "dead"
            )
        )
        if closing:
            state = "closed"
        elif self._ready_count >= self.target:
            state = "healthy"
        elif self._ever_ready:
            state = "degraded"
        else:
            state = "starting"
        running = sum(1 for w in workers if w.program is not None)
        queued = len(self._queue) + sum(len(w.queue) for w in list(self._workers.values()))
        return PoolStatus(
            state=state,
            target=self.target,
            ready_count=self._ready_count,
            workers=workers,
            queued=queued,
            running=running,
            calls=self._calls_done,
            failed=self._calls_failed,
            replaced=self._replaced,
            started_at=self._started_at,
            startup_seconds=self._startup_seconds,
            last_error=self._last_error,
            recent_failures=tuple(self._failures),
        )

    def restart_worker(self, worker_id: str) -> None:
        """Kill ``worker_id`` and start a replacement; its running call gets WorkerCrashed."""
        if self.closed:
            raise PoolClosed()
        worker = self._workers.get(worker_id)
        if worker is None or worker.state == "dead":
            known = ", ".join(w.id for w in self.status().workers) or "none"
            raise UnknownWorker(worker_id, known)
        self._post(("restart_worker", worker_id))

    def restart(self) -> None:
        """Replace every worker and the template (re-importing the preloads).

        Queued calls wait for the new workers; running calls fail with WorkerCrashed.
        """
        if self.closed:
            raise PoolClosed()
        self._post(("restart",))

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop every worker and the template; pending calls fail with PoolClosed.

        Idempotent, and safe to call from any thread (from the dispatcher's own thread,
        e.g. an event callback, it only starts the shutdown).
        """
        if self._closed:
            return
        self._closing = True
        self._post(("close",))
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout + 2.0)
        if self._thread.is_alive():  # the dispatcher is stuck: make sure nothing survives
            template = self._template
            if template is not None:
                _kill_process_group(template.process)
        self._closed = True
        with _registry_lock:
            _open_pools[:] = [r for r in _open_pools if r() not in (None, self)]
        _registry_changed()

    # ------------------------------------------------------- cross-thread commands
    def _post(self, command: tuple[Any, ...]) -> None:
        self._inbox.append(command)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # a wake-up byte is already pending, or the pool is gone

    # ------------------------------------------------------------ dispatcher thread
    def _thread_main(self) -> None:
        try:
            anyio.run(self._main, backend="asyncio")
        except BaseException as exc:  # the pool must never take the kernel down
            self._loop_error = exc
            log.exception("dspool pool dispatcher stopped")
            with self._lock:
                self._fail_everything(DspoolError(f"the pool's dispatcher failed: {exc!r}"))
        finally:
            self._closed = True
            self._closing = True
            with self._ready_cond:
                self._ready_cond.notify_all()
            for sock in (self._wake_r, self._wake_w):
                sock.close()

    async def _main(self) -> None:
        # The hot sockets (the inbox's wake-up socket, every worker's socket, the
        # template's) stay registered with the event loop for their whole life and are
        # served by callbacks: no task switch and no epoll re-registration per call.
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stop = anyio.Event()
        self._supervisor_wake = anyio.Event()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._loop.add_reader(self._wake_r.fileno(), self._on_wake)
            try:
                with self._lock:
                    self._start_template()
                    for _ in range(self.target):
                        self._spawn_worker()
                tg.start_soon(self._supervise)
                await self._stop.wait()
            finally:
                self._loop.remove_reader(self._wake_r.fileno())
                with anyio.CancelScope(shield=True):
                    await self._shutdown()
                tg.cancel_scope.cancel()

    def _on_wake(self) -> None:
        with self._lock:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
            # Cleared after draining the wake-up bytes and before reading the inbox, so a
            # command posted at any moment is either read below or sends a new byte.
            self._wake_pending = False
            while self._inbox and not self._stop.is_set():
                command = self._inbox.popleft()
                if command[0] == "close":
                    self._stop.set()
                    return
                try:
                    self._handle(command)
                except Exception:
                    log.exception("dspool pool failed on %r", command[0])

    def _handle(self, command: tuple[Any, ...]) -> None:
        op = command[0]
        if op == "call":
            self._enqueue(command[1])
        elif op == "cancel":
            self._cancel(command[1])
        elif op == "restart_worker":
            worker = self._workers.get(command[1])
            if worker is not None and worker.state != "dead":
                self._kill(worker, "restart")
        elif op == "restart":
            self._restart_all()
        elif op == "end_session":
            self._homes.pop(command[1], None)
        elif op == "setup":
            _, key, setup, applied = command
            self._setups[key] = setup
            futures = []
            for worker in list(self._workers.values()):
                if worker.state in ("idle", "busy"):
                    call = self._setup_call(*setup)
                    futures.append(call.future)
                    worker.queue.appendleft(call)
                    if worker.state == "idle":
                        self._worker_free(worker)
            applied.set_result(futures)
        elif op == "remove_setup":
            self._setups.pop(command[1], None)

    def _setup_call(self, program_id: str, name: str, blob: bytes) -> _Call:
        future = CallFuture(self, name)
        call = _Call(next(self._ids), name, program_id, None, blob, future, None)
        future._call = call
        return call

    # -- template and worker processes
    def _start_template(self) -> None:
        pool_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {
            "parent_pid": os.getpid(),
            "store": str(self.store.directory),
            "anonymous_ttl": self.store.anonymous_ttl,
            "preload": self.preload,
            "sys_path": [p for p in sys.path if p],
            "heartbeat_interval": self.heartbeat_interval,
            "max_result_bytes": self.max_result_bytes,
            "memory_limit": self.worker_memory_limit,
        }
        env = dict(os.environ)
        env[OWNER_ENV] = self.token
        # Offline by default: litellm (under dspy) must not fetch its price map at import.
        env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dspool_jupyter.worker",
                    "--control-fd",
                    str(child_end.fileno()),
                    "--config",
                    json.dumps(config),
                ],
                pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=os.getcwd(),
                # Its own session: the kernel's interrupt (SIGINT to its process group)
                # must not reach the workers; cancellation is the pool's job.
                start_new_session=True,
            )
        finally:
            child_end.close()
        pool_end.setblocking(False)
        template = _Template(process=process, control=pool_end, started=time.monotonic())
        self._template = template
        self._loop.add_reader(pool_end.fileno(), self._on_control_readable, template)

    def _on_control_readable(self, template: _Template) -> None:
        with self._lock:
            while True:
                try:
                    received = protocol.recv_control(template.control)
                except BlockingIOError:
                    return
                except (OSError, protocol.ProtocolError):
                    received = None
                if received is None:
                    self._loop.remove_reader(template.control.fileno())
                    self._on_template_lost(template)
                    return
                message, fds = received
                for fd in fds:
                    os.close(fd)
                try:
                    self._on_control(template, message)
                except Exception:
                    log.exception("dspool pool failed on a template message")

    def _on_control(self, template: _Template, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "ready":
            template.ready = True
            self._template_failures = 0
            errors = message.get("preload_errors") or []
            if errors:
                self._last_error = "; ".join(errors)
                log.warning("dspool: %s", self._last_error)
        elif op == "spawned":
            worker = self._workers.get(message["worker_id"])
            if worker is not None and worker.pid is None:
                worker.pid = int(message["pid"])
        elif op == "exited":
            worker_id = message["worker_id"]
            worker = self._dying.get(worker_id) or self._workers.get(worker_id)
            if worker is not None:
                worker.returncode = int(message["returncode"])
                worker.exited = True
                if worker.state == "dead":
                    self._finish_lost(worker)

    def _on_template_lost(self, template: _Template) -> None:
        template.control.close()
        try:
            template.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            _kill_process_group(template.process)
        if self._template is not template:
            return
        self._template = None
        if self._closing:
            return
        # Its workers die with it (parent-death signal); their readers replace them.
        self._template_failures += 1
        if not template.ready:
            self._last_error = (
                f"the worker template exited during start-up "
                f"(code {template.process.returncode}); see the kernel's log"
            )
        log.warning(
            "dspool: worker template exited (code %s); restarting", template.process.returncode
        )
        # Workers already asked for (and not yet forked) must be asked again.
        for worker in list(self._workers.values()):
            if worker.state == "starting" and worker.template is template:
                self._kill(worker, "crashed")
        failures = self._template_failures
        delay = 0.0 if failures <= 1 else min(5.0, 0.25 * 2 ** (failures - 2))
        assert self._tg is not None
        self._tg.start_soon(self._restart_template_later, delay)

    async def _restart_template_later(self, delay: float) -> None:
        if delay:
            await anyio.sleep(delay)
        with self._lock:
            if self._closing or self._template is not None:
                return
            self._start_template()
            for _ in range(self._workers_wanted()):
                self._spawn_worker()

    def _workers_wanted(self) -> int:
        return self.target - sum(1 for w in self._workers.values() if w.state != "dead")

    def _spawn_worker(self, replacing: str | None = None) -> _Worker | None:
        if self._closing:
            return None
        template = self._template
        if template is None:
            return None  # the template is restarting; it spawns what is missing
        number = next(self._worker_numbers)
        pool_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = _Worker(
            id=f"w{number}", sock=pool_end, started_at=time.time(), start_mono=time.monotonic()
        )
        worker.template = template
        try:
            protocol.send_control(
                template.control, {"op": "spawn", "worker_id": worker.id}, [worker_end.fileno()]
            )
        except OSError as exc:
            log.warning("dspool: could not ask the template for a worker: %s", exc)
            pool_end.close()
            return None
        finally:
            worker_end.close()
        pool_end.setblocking(False)
        self._workers[worker.id] = worker
        self._loop.add_reader(pool_end.fileno(), self._on_worker_readable, worker)
        worker.reading = True
        if replacing is not None:
            self._replaced += 1
            if self._bus.active:
                self._bus.emit(WorkerReplaced(old_worker_id=replacing, new_worker_id=worker.id))
        if self._bus.active:
            self._bus.emit(
                WorkerStarting(worker_id=worker.id, ready=self._ready_count, target=self.target)
            )
        return worker

    def _on_worker_readable(self, worker: _Worker) -> None:
        with self._lock:
            try:
                while worker.state != "dead":
                    try:
                        data = worker.sock.recv(READ_CHUNK)
                    except BlockingIOError:
                        return
                    if not data:
                        break
                    for kind, meta, blob in worker.reader.feed(data):
                        self._on_frame(worker, kind, meta, blob)
            except OSError:
                pass
            except protocol.ProtocolError as exc:
                self._last_error = f"worker {worker.id} broke the protocol: {exc}"
                self._kill(worker, "crashed")
            except Exception:
                log.exception("dspool pool failed on a message from worker %s", worker.id)
                return
            self._on_worker_lost(worker)

    def _on_frame(self, worker: _Worker, kind: int, meta: tuple[Any, ...], blob: bytes) -> None:
        if kind == protocol.RESULT or kind == protocol.ERROR:
            self._on_reply(worker, kind, meta, blob)
        elif kind == protocol.HEARTBEAT:
            worker.rss = meta[0]
            worker.last_heartbeat = time.time()
        elif kind == protocol.HELLO:
            self._on_hello(worker, int(meta[1]))
        elif kind == protocol.FATAL:
            self._last_error = f"worker {worker.id} could not start: {meta[0]}"
            log.warning("dspool: %s", self._last_error)
        else:
            raise protocol.ProtocolError(f"unexpected frame kind {kind}")

    def _on_hello(self, worker: _Worker, pid: int) -> None:
        if worker.state != "starting":
            return
        worker.pid = pid
        worker.state = "idle"
        worker.last_heartbeat = time.time()
        self._startup_failures = 0
        self._ever_ready = True
        with self._ready_cond:
            self._ready_count += 1
            self._ready_cond.notify_all()
        startup = time.monotonic() - worker.start_mono
        if self._bus.active:
            self._bus.emit(
                WorkerReady(
                    worker_id=worker.id,
                    pid=pid,
                    ready=self._ready_count,
                    target=self.target,
                    startup_seconds=startup,
                )
            )
        if self._ready_count >= self.target and not self._ready_announced:
            self._ready_announced = True
            self._startup_seconds = time.monotonic() - self._start_mono
            if self._bus.active:
                self._bus.emit(PoolReady(target=self.target, startup_seconds=self._startup_seconds))
        # Worker set-ups (e.g. the LM configuration) run before anything else it serves.
        setups = [self._setup_call(*setup) for setup in self._setups.values()]
        worker.queue.extendleft(reversed(setups))
        self._worker_free(worker)

    # -- dispatch
    def _enqueue(self, call: _Call) -> None:
        if call.future.done():
            return
        if self._closing:
            self._fail(call, PoolClosed())
            return
        if call.session is not None:
            home = self._homes.get(call.session)
            if home is not None and home.state != "dead":
                if home.state in ("idle", "busy") and not home.queue and self._has_room(home):
                    self._start_call(home, call)
                else:
                    home.queue.append(call)
                return
        worker = self._pop_idle() or self._pipeline_candidate()
        if worker is None:
            self._queue.append(call)
            return
        if call.session is not None:
            self._homes[call.session] = worker
        self._start_call(worker, call)

    def _has_room(self, worker: _Worker) -> bool:
        inflight = worker.inflight
        if not inflight:
            return True
        last = inflight[-1]
        # A call waits in a worker's socket only behind a call known to be short: behind
        # a long one it would wait even when another worker frees up (head-of-line), and
        # behind one with a timeout the worker may be killed for it.
        # (Short: its program usually is, and this call has not run long yet.)
        return (
            len(inflight) < PIPELINE_DEPTH
            and last.timeout is None
            and self._durations.get(last.program_id, PIPELINE_SHORT_CALL) < PIPELINE_SHORT_CALL
            and (last.started == 0.0 or time.monotonic() - last.started < PIPELINE_SHORT_CALL)
        )

    def _pipeline_candidate(self) -> _Worker | None:
        """A busy worker that can take one more call behind its current (short) one.

        Only asked when no worker is idle, so a call never waits behind another while
        a worker is free; it saves the round trip between two calls under load.
        """
        best = None
        for worker in self._workers.values():
            if worker.state == "busy" and not worker.queue and self._has_room(worker):
                if best is None or len(worker.inflight) < len(best.inflight):
                    best = worker
        return best

    def _pop_idle(self) -> _Worker | None:
        while self._idle:
            worker = self._idle.popleft()
            if worker.state == "idle" and not worker.queue:
                return worker
        return None

    def _next_call(self, worker: _Worker) -> _Call | None:
        while worker.queue:
            call = worker.queue.popleft()
            if not call.future.done():
                return call
        queue = self._queue
        while queue:
            call = queue.popleft()
            if call.future.done():
                continue
            if call.session is not None:
                home = self._homes.get(call.session)
                if home is None or home.state == "dead":
                    self._homes[call.session] = worker
                elif home is not worker:
                    home.queue.append(call)
                    if home.state == "idle":
                        self._worker_free(home)
                    continue
            return call
        return None

    def _worker_free(self, worker: _Worker) -> None:
        """``worker`` has room: give it the next calls, or mark it idle."""
        if worker.state == "stopping":
            return  # being killed: it gets nothing more
        while self._has_room(worker):
            call = self._next_call(worker)
            if call is None:
                break
            self._start_call(worker, call)
        if not worker.inflight:
            worker.state = "idle"
            self._idle.append(worker)

    def _start_call(self, worker: _Worker, call: _Call) -> None:
        call.worker = worker
        worker.inflight.append(call)
        worker.state = "busy"
        if len(worker.inflight) == 1:
            self._running(call)
        frame = protocol.encode_frame(
            protocol.CALL, (call.id, call.program_id, call.program), call.blob
        )
        self._send(worker, frame)

    def _running(self, call: _Call) -> None:
        """``call`` is now the one its worker runs: its timeout starts."""
        call.started = time.monotonic()
        if call.timeout is not None:
            call.deadline = call.started + call.timeout
            self._due(call.deadline)
        else:
            call.deadline = None
        assert call.worker is not None
        call.future.worker_id = call.worker.id
        if call.future.cancelled():
            self._cancel(call)  # cancelled while it waited in the worker's socket
        if self._bus.active:
            self._emit(
                CallStarted(
                    call_id=call.id,
                    program=call.program,
                    worker_id=call.worker.id,
                    session=call.session,
                )
            )

    def _in_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _emit(self, event: Event) -> None:
        """Emit on the dispatcher thread, as subscribers are promised, from any thread."""
        if self._in_loop():
            self._bus.emit(event)
        else:
            self._loop.call_soon_threadsafe(self._bus.emit, event)

    def _send(self, worker: _Worker, frame: bytes) -> None:
        if worker.outbox:  # an earlier frame is still part-way out: keep the order
            worker.outbox.append(memoryview(frame))
            return
        try:
            sent = worker.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the worker is gone; its reader fails the call
        if sent < len(frame):
            worker.outbox.append(memoryview(frame)[sent:])
            if self._in_loop():
                self._loop.add_writer(worker.sock.fileno(), self._on_worker_writable, worker)
            else:
                self._loop.call_soon_threadsafe(self._watch_writable, worker)

    def _watch_writable(self, worker: _Worker) -> None:
        with self._lock:
            if worker.outbox and worker.sock.fileno() != -1:
                self._loop.add_writer(worker.sock.fileno(), self._on_worker_writable, worker)

    def _on_worker_writable(self, worker: _Worker) -> None:
        with self._lock:
            while worker.outbox:
                view = worker.outbox[0]
                try:
                    sent = worker.sock.send(view)
                except BlockingIOError:
                    return
                except OSError:
                    worker.outbox.clear()
                    break
                if sent < len(view):
                    worker.outbox[0] = view[sent:]
                    return
                worker.outbox.popleft()
            self._loop.remove_writer(worker.sock.fileno())

    def _on_reply(self, worker: _Worker, kind: int, meta: tuple[Any, ...], blob: bytes) -> None:
        call = worker.call
        if call is None or call.id != meta[0]:
            return  # a reply to a call this worker no longer runs: never hand it on
        worker.inflight.popleft()
        call.blob = b""  # done: the future may live on, the arguments need not
        if worker.inflight:
            self._running(worker.inflight[0])
        future = call.future
        elapsed = time.monotonic() - call.started
        typical = self._durations.get(call.program_id)
        if typical is None and len(self._durations) >= DURATION_MEMORY:
            self._durations.clear()
        self._durations[call.program_id] = (
            elapsed if typical is None else 0.7 * typical + 0.3 * elapsed
        )
        if kind == protocol.RESULT:
            worker.calls += 1
            future.stdout, future.stderr = meta[1], meta[2]
            try:
                value = cloudpickle.loads(blob)
            except Exception as exc:
                error: BaseException | None = unloadable_result(call.program, worker.id, exc)
            else:
                error = None
                self._calls_done += 1
                future._call = None  # break the future <-> call cycle: no GC work per call
                if not future.done():
                    future.set_result(value)
                if self._bus.active:
                    self._bus.emit(
                        CallFinished(
                            call_id=call.id,
                            program=call.program,
                            worker_id=worker.id,
                            seconds=elapsed,
                        )
                    )
        else:
            future.stdout, future.stderr = meta[2], meta[3]
            error = error_from_reply(call.program, call.session, worker.id, meta[1], blob)
            if isinstance(error, ProgramError):
                worker.calls += 1
                worker.errors += 1
        if error is not None:
            self._fail(call, error, worker.id)
        self._worker_free(worker)

    def _fail(self, call: _Call, error: BaseException, worker_id: str | None = None) -> None:
        call.blob = b""
        call.future._call = None
        if call.future.done():
            return
        call.future.set_exception(error)
        self._calls_failed += 1
        failure = FailedCall.of(call.id, call.program, worker_id, error)
        self._failures.append(failure)
        if self._bus.active:
            self._bus.emit(CallFailed.from_failure(failure))

    # -- faults
    def _cancel(self, call: _Call) -> None:
        worker = call.worker
        if worker is None or worker.call is not call or worker.pid is None:
            return  # still queued: dispatch skips it, or cancels it when it starts
        call.cancel_deadline = time.monotonic() + CANCEL_GRACE
        self._due(call.cancel_deadline)
        try:
            os.kill(worker.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def _kill(self, worker: _Worker, reason: str) -> None:
        if worker.kill_reason is None:
            worker.kill_reason = reason
        if worker.state in ("idle", "busy"):
            worker.state = "stopping"
        if worker.pid is not None:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            # Not forked yet: without its socket the child exits as soon as it starts.
            self._on_worker_lost(worker)

    def _close_worker_socket(self, worker: _Worker) -> None:
        fd = worker.sock.fileno()
        if fd == -1:
            return
        if worker.reading:
            self._loop.remove_reader(fd)
            worker.reading = False
        if worker.outbox:
            self._loop.remove_writer(fd)
            worker.outbox.clear()
        worker.sock.close()

    def _on_worker_lost(self, worker: _Worker) -> None:
        if worker.state == "dead":
            return
        was = worker.state
        worker.state = "dead"
        self._close_worker_socket(worker)
        self._workers.pop(worker.id, None)
        if was != "starting":
            with self._ready_cond:
                self._ready_count -= 1
                self._ready_cond.notify_all()
        elif not self._closing and worker.kill_reason is None:
            self._startup_failures += 1
        call = worker.call
        # Calls sent behind the running one never started (a worker reads its next call
        # only after replying, and every reply before the end was read): run them elsewhere.
        waiting = list(worker.inflight)[1:]
        worker.inflight.clear()
        for queued in waiting:
            queued.worker = None
            queued.future.worker_id = None
        if worker.kill_reason is None and self._closing:
            worker.kill_reason = "close"  # stopped with the pool, not dead
        reason = worker.kill_reason or "crashed"
        if call is not None and not call.future.done():
            if reason == "timeout":
                pass  # already failed with CallTimeout
            else:
                worker.lost_call = call
        worker.lost_at = time.monotonic()
        self._due(worker.lost_at + EXIT_STATUS_WAIT)
        self._dying[worker.id] = worker
        if worker.exited or worker.pid is None:
            self._finish_lost(worker)
        # Sessions homed here move to a live worker; their queued calls go first.
        for session, home in list(self._homes.items()):
            if home is worker:
                del self._homes[session]
        requeue = waiting + list(worker.queue)
        worker.queue.clear()
        self._queue.extendleft(reversed(requeue))
        if not self._closing and worker.replace:
            if self._startup_failures >= 3:
                delay = min(5.0, 0.1 * 2 ** (self._startup_failures - 3))
                assert self._tg is not None
                self._tg.start_soon(self._spawn_later, delay, worker.id)
            else:
                self._spawn_worker(replacing=worker.id)
        while self._queue:
            idle = self._pop_idle()
            if idle is None:
                break
            self._worker_free(idle)

    async def _spawn_later(self, delay: float, replacing: str) -> None:
        await anyio.sleep(delay)
        with self._lock:
            if self._workers_wanted() > 0:
                self._spawn_worker(replacing=replacing)

    def _finish_lost(self, worker: _Worker) -> None:
        """Report a lost worker once its exit status is known (or waited for long enough)."""
        if self._dying.pop(worker.id, None) is None:
            return
        reason = worker.kill_reason or "crashed"
        call = worker.lost_call
        worker.lost_call = None
        program = call.program if call is not None else None
        if call is not None:
            if self._closing:
                self._fail(call, PoolClosed("the pool was closed while the call ran"), worker.id)
            elif reason == "cancel":
                self._fail(call, CallCancelled(call.program, worker.id), worker.id)
            else:
                self._fail(
                    call,
                    WorkerCrashed(call.program, worker.id, worker.pid, worker.returncode),
                    worker.id,
                )
        if self._bus.active:
            self._bus.emit(
                WorkerDied(
                    worker_id=worker.id,
                    pid=worker.pid,
                    reason=reason,
                    returncode=worker.returncode,
                    program=program,
                )
            )

    async def _supervise(self) -> None:
        """Act on deadlines (timeouts, cancel graces, exit codes) exactly when they fall.

        It sleeps until the nearest deadline instead of ticking, so it does not wake the
        dispatcher (and delay a call) while nothing is due.
        """
        while True:
            self._supervisor_wake = anyio.Event()
            self._next_due = self._check_deadlines()
            delay = SUPERVISE_IDLE if self._next_due is None else self._next_due - time.monotonic()
            with anyio.move_on_after(max(0.0, delay)):
                await self._supervisor_wake.wait()

    def _due(self, when: float) -> None:
        """A new deadline: wake the supervisor if it sleeps past it."""
        if not self._in_loop():
            self._loop.call_soon_threadsafe(self._due, when)
            return
        if self._next_due is None or when < self._next_due:
            self._next_due = when
            self._supervisor_wake.set()

    def _check_deadlines(self) -> float | None:
        with self._lock:
            now = time.monotonic()
            next_due: float | None = None
            for worker in list(self._workers.values()):
                call = worker.call
                if call is None or worker.state not in ("busy", "stopping"):
                    continue
                if call.deadline is not None and call.cancel_deadline is None:
                    if now >= call.deadline:
                        self._fail(
                            call, CallTimeout(call.program, worker.id, call.timeout or 0), worker.id
                        )
                        self._kill(worker, "timeout")
                        call.deadline = None
                        continue
                    next_due = call.deadline if next_due is None else min(next_due, call.deadline)
                if call.cancel_deadline is not None:
                    if now >= call.cancel_deadline:
                        call.cancel_deadline = None
                        self._kill(worker, "cancel")
                        continue
                    when = call.cancel_deadline
                    next_due = when if next_due is None else min(next_due, when)
            for worker in list(self._dying.values()):
                when = worker.lost_at + EXIT_STATUS_WAIT
                if now >= when:
                    self._finish_lost(worker)
                else:
                    next_due = when if next_due is None else min(next_due, when)
            return next_due

    def _restart_all(self) -> None:
        template = self._template
        for worker in list(self._workers.values()):
            if worker.state != "dead":
                worker.replace = False
                self._kill(worker, "restart")
        self._ready_announced = False
        self._ever_ready = False
        self._start_mono = time.monotonic()
        self._started_at = time.time()
        self._startup_seconds = None
        if template is not None:
            template.stopping = True
            self._template = None
            try:
                protocol.send_control(template.control, {"op": "stop"})
            except OSError:
                pass
        self._start_template()
        for _ in range(self.target):
            self._spawn_worker()

    async def _shutdown(self) -> None:
        with self._lock:
            self._closing = True
            error = PoolClosed("the pool was closed before the call ran")
            while self._inbox:  # commands that came after "close"
                command = self._inbox.popleft()
                if command[0] == "call":
                    self._fail(command[1], error)
                elif command[0] == "setup":
                    command[3].set_result([])
            while self._queue:
                self._fail(self._queue.popleft(), error)
            for worker in list(self._workers.values()):
                while worker.queue:
                    self._fail(worker.queue.popleft(), error)
            template = self._template
            if template is not None:
                try:
                    protocol.send_control(template.control, {"op": "stop"})
                except OSError:
                    pass
        if template is not None:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                while template.process.poll() is None:
                    await anyio.sleep(0.01)
        with self._lock:
            if template is not None:
                if template.process.poll() is None:
                    _kill_process_group(template.process)
                if template.control.fileno() != -1:
                    self._loop.remove_reader(template.control.fileno())
                    template.control.close()
            for worker in list(self._workers.values()):
                for call in worker.inflight:
                    self._fail(
                        call, PoolClosed("the pool was closed while the call ran"), worker.id
                    )
                self._close_worker_socket(worker)
            for worker in list(self._dying.values()):
                self._finish_lost(worker)
            try:
                self.store.clear_session(self._setup_session)
            except DspoolError:
                log.warning("dspool: could not remove this pool's set-ups from the store")
            with self._ready_cond:
                self._ready_count = 0
                self._ready_cond.notify_all()
            self._closed = True
            if self._bus.active:
                self._bus.emit(PoolClosedEvent())

    def _fail_everything(self, error: BaseException) -> None:
        calls: list[_Call] = list(self._queue)
        for worker in list(self._workers.values()):
            calls.extend(worker.queue)
            calls.extend(worker.inflight)
        calls.extend(command[1] for command in list(self._inbox) if command[0] == "call")
        for command in list(self._inbox):
            if command[0] == "setup" and not command[3].done():
                command[3].set_result([])
        for call in calls:
            if not call.future.done():
                call.future.set_exception(error)
        template = self._template
        if template is not None:
            _kill_process_group(template.process)

    # ------------------------------------------- maps and journals (mapping.py, journal.py)
    def map(
        self,
        program: str,
        items: Iterable[Any],
        *,
        arg: str | None = None,
        unpack: bool = False,
        session: str | None = None,
        timeout: float | None = None,
        journal: str | None = None,
        keep_errors: bool = False,
        common_args: tuple[Any, ...] = (),
        common_kwargs: dict[str, Any] | None = None,
    ) -> MapResult:
        """Call ``program`` once per item, in parallel; the results in input order.

        Each item is the call's one positional argument (after ``common_args``), or
        keyword ``arg``, or with ``unpack`` a dict's keywords / a tuple's arguments;
        ``common_kwargs`` go to every call. A failed item holds its exception (see
        ``.errors``). ``journal="NAME"`` writes each outcome to the store as it ends and
        restores it on the next run of the same map (failed items run again unless
        ``keep_errors``). The stop button (KeyboardInterrupt) cancels every call. See
        :mod:`dspool_jupyter.mapping`.
        """
        from .mapping import MapHandle

        handle = MapHandle(
            self, program, items, arg=arg, unpack=unpack, session=session, timeout=timeout,
            journal=journal, keep_errors=keep_errors, common_args=common_args,
            common_kwargs=common_kwargs,
        )  # fmt: skip
        try:
            handle.start()
            return handle.result()
        except KeyboardInterrupt:
            handle.cancel()
            raise

    def map_async(self, program: str, items: Iterable[Any], **options: Any) -> MapHandle:
        """``map`` without waiting: a started handle (``progress``, ``result()``, ``cancel()``)."""
        from .mapping import start_map

        return start_map(self, program, items, **options)

    def journal(self, name: str) -> Journal:
        """The map journal ``name`` of this pool's store: progress, results, ``delete()``."""
        from .journal import open_journal

        return open_journal(self.store, name)

    def journals(self) -> list[JournalInfo]:
        """Every map journal in this pool's store, with progress, age and size."""
        from .journal import list_journals

        return list_journals(self.store)


def preload_modules(preload: Iterable[str]) -> list[str]:
    """The module names of a ``preload`` option (a list, or "a,b" text), checked."""
    if isinstance(preload, str):
        preload = [p for p in preload.split(",") if p]
    names = [str(p).strip() for p in preload]
    for name in names:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"preload entry {name!r} is not a module name")
    return names


def _kill_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the template's session (it and every worker it forked)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        pass


def _echo_output(future: CallFuture) -> None:
    if future.stdout:
        sys.stdout.write(future.stdout)
    if future.stderr:
        sys.stderr.write(future.stderr)
