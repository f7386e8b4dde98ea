"""DaskPool: the same pool on a Dask distributed cluster (the ``dask`` extra).

``Pool(backend="dask", address="tcp://scheduler:8786")`` (or ``%dspool start --dask
ADDRESS``) returns a :class:`DaskPool`: the public surface, the :class:`CallFuture`, the
errors, the events and the :class:`PoolStatus` snapshots are the local pool's, so the
magics, the status widget and the lab extension work unchanged. Without ``address`` the
pool starts a private ``LocalCluster`` (one single-threaded worker process per CPU,
nannies included) and stops it at ``close()``. Dask's scheduler, workers and nannies
move the bytes and keep the processes alive; nothing here opens a socket of its own.

How the pieces map:

- **One row per Dask worker process.** A worker takes as many calls at once as it has
  threads (``nthreads``). Its pool id (``w1``, ``w2``, ... as locally) names one
  incarnation: a worker that a nanny restarts comes back under a new id, announced as
  ``WorkerReplaced``. ``pid`` is the worker's own (on its host);
  ``pool.worker_addresses()`` maps ids to Dask addresses.
- **The kernel places every call.** The dispatcher (its own daemon thread running an
  asyncio loop that also drives an asynchronous ``distributed.Client``) keeps the queue
  and sends each call with ``client.submit(..., workers=[address],
  allow_other_workers=False, retries=0)`` to a worker with a free thread: any worker
  for anonymous calls, the session's worker for session calls (re-homed when it dies).
- **No silent reruns.** Dask reschedules a task whose worker died. Pinned to one address,
  a lost call can only wait in ``no-worker``; the kernel cancels it as it learns of the
  death, and the task also carries the id of the worker *process* it was sent to
  (``Worker.id``): a rerun anywhere else, even on a new worker at the same address,
  returns without running the program. A killed worker's calls end in
  :class:`WorkerCrashed` (exit status unknown: the nanny keeps it) and nothing else.
- **Programs travel by value.** The kernel's :class:`ProgramStore` stays the only source
  of truth; workers never see its disk. A call carries the program's spec (read from the
  store) until the worker has confirmed it by a reply; after that only the id. The
  worker builds the program with :func:`dspool_jupyter.worker.build_program` and caches
  it by content-hash id (a redefined program has a new id, so the cache is never stale;
  an evicted one is asked for again). A program deleted from the store fails calls that
  have not started with :class:`ProgramNotFound`. Session programs are isolated exactly
  as locally: names resolve in the kernel's store, ids are per namespace.
- **Deaths and heartbeats.** The kernel subscribes to each worker's scheduler event topic
  (its address): ``remove-worker`` arrives within milliseconds of a worker's death
  (SIGKILL, segfault, ``os._exit``, OOM) and fails its calls at once. A poll of
  ``scheduler.identity()`` every ``heartbeat_interval`` seconds (every 0.1 s for 10 s
  after the start, a death or a kill) adopts new workers, reconciles missed deaths, fills
  ``rss_bytes`` (the scheduler's memory metric) and ``last_heartbeat`` (the scheduler's
  ``last_seen``). The subscription to ``"all"`` is not used: every gather on the cluster
  is an event there. A worker the network lost is removed by the scheduler after its
  ``worker-ttl`` (5 minutes by default); its calls fail then.
- **Start-up.** Each new worker first runs a hello task: it imports the preloads and
  returns its pid, ``Worker.id`` and versions; then the pool's worker set-ups
  (``set_worker_setup``, DSPy's LM) run on it before any call. ``WorkerReady`` follows
  the hello. ``workers=None`` means the cluster's size when the pool connected (grown
  when workers join, shrunk when the scheduler retires one on purpose); ``workers=N``
  waits for N workers in ``wait_ready``.
- **Timeouts, cancel and restarts.** A call past its timeout fails with
  :class:`CallTimeout` and its worker process is SIGKILLed through its nanny
  (``client.run(..., nanny=True)``), which starts a new one; calls running beside it on
  the same worker end in :class:`WorkerCrashed`. ``cancel()`` of a running call raises
  KeyboardInterrupt in the thread running it (delivered when the thread next runs
  Python code: a blocking C call finishes first); a program that ignores it for
  ``CANCEL_GRACE`` seconds has its worker killed the same way. ``restart_worker`` and
  ``restart`` kill through the nanny too. A worker without a nanny cannot be killed by
  the pool: a timed-out call fails at once but keeps its thread until it returns, and
  ``restart_worker`` raises.
- **Output.** What a program prints in its own thread is captured per call (a
  thread-aware ``sys.stdout``/``sys.stderr`` on the worker) and echoed by ``run``.
- **Close.** Queued and running calls fail with :class:`PoolClosed`, running tasks are
  cancelled in Dask, the client disconnects. An external cluster keeps running; a
  private ``LocalCluster`` is stopped.

Cost: a call is one Dask task plus a gather, so its overhead is Dask's. On loopback on a
2-core machine (``bench/dask_backend.py``) a trivial call takes about 17 ms at the
median, against 11 ms for a plain ``client.submit(...).result()`` (about 4 ms of the
difference is Dask handling the worker restriction) and 0.15 ms on the local backend:
the Dask backend is for programs that run for much longer than that (LLM calls), on more
cores than one machine has.

Requirements: ``dspool_jupyter`` (and whatever the programs import) must be installed on
every Dask worker; the hello task reports a worker that cannot import it in
``status().last_error``. ``worker_memory_limit`` is not supported (use the cluster's
``--memory-limit``).

The worker-side functions (``_dask_hello``, ``_dask_call``, ``_interrupt_call``,
``_kill_worker_process``) live in this module, so a Dask worker imports it (and with it
the light kernel-side modules it names, none of which starts anything at import).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import ctypes
import importlib
import io
import itertools
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

import cloudpickle

from .errors import (
    CallTimeout,
    DspoolError,
    PoolClosed,
    PoolStartTimeout,
    ProgramError,
    ProgramNotFound,
    UnknownWorker,
    WorkerCrashed,
    error_from_reply,
    unloadable_result,
)
from .events import (
    CallFailed,
    CallFinished,
    CallStarted,
    EventBus,
    PoolClosedEvent,
    PoolReady,
    WorkerDied,
    WorkerReady,
    WorkerReplaced,
    WorkerStarting,
)
from .pool import (
    CANCEL_GRACE,
    DEFAULT_MAX_RESULT_BYTES,
    HEARTBEAT_INTERVAL,
    CallFuture,
    Pool,
    _open_pools,
    _registry_changed,
    _registry_lock,
    preload_modules,
)
from .status import FailedCall, PoolStatus, WorkerStatus
from .store import ProgramSpec, ProgramStore

__all__ = ["CONNECT_TIMEOUT", "DaskCallFuture", "DaskPool"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds the constructor waits to reach the scheduler
CLOSE_TIMEOUT = 5.0  # seconds close() waits for Dask to cancel, disconnect and stop
FAST_POLL_INTERVAL = 0.1  # seconds between polls just after a start, a death or a kill
FAST_POLL_SPAN = 10.0  # seconds of fast polling after each of those
HELLO_RETRY_MAX = 30.0  # seconds: longest wait before a failed hello is tried again
RECENT_FAILURES = 50  # failed calls kept for status()
WORKER_PROGRAM_CACHE = 256  # built programs a Dask worker keeps (by content-hash id)
MAX_ERROR_BLOB = 1 << 20  # bytes: a larger pickled exception is not sent back

# Reply kinds of the worker-side task.
_RESULT = "result"
_ERROR = "error"
_NEED_SPEC = "need_spec"
_MISROUTED = "misrouted"


class DaskCallFuture(CallFuture):
    """A :class:`CallFuture` of a :class:`DaskPool` call (same attributes, same use)."""

    def __init__(self, pool: DaskPool, program: str) -> None:
        super().__init__(pool, program)
        self._dask_call: _DCall | None = None

    def cancel(self) -> bool:
        cancelled = concurrent.futures.Future.cancel(self)
        pool = self._pool_ref()
        if cancelled and pool is not None and self._dask_call is not None:
            pool._post(("cancel", self._dask_call))
        return cancelled


@dataclass(eq=False)
class _DCall:
    id: int
    program: str
    program_id: str
    session: str | None
    blob: bytes
    future: DaskCallFuture
    timeout: float | None
    setup: bool = False
    key: str = ""
    worker: _DWorker | None = None
    started: float = 0.0
    dask_future: Any = None
    timer: asyncio.TimerHandle | None = None
    cancel_timer: asyncio.TimerHandle | None = None
    sent_spec: bool = False
    retried: bool = False


@dataclass(eq=False)
class _DWorker:
    id: str
    address: str
    nanny: str | None
    nthreads: int
    started_at: float
    start_mono: float
    pid: int | None = None
    uid: str | None = None  # the Dask Worker.id of this incarnation (from its hello)
    state: str = "starting"  # starting | idle | busy | stopping | dead
    ready: bool = False
    calls: int = 0
    errors: int = 0
    rss: int | None = None
    last_heartbeat: float | None = None
    inflight: dict[int, _DCall] = field(default_factory=dict)
    queue: collections.deque[_DCall] = field(default_factory=collections.deque)
    known: set[str] = field(default_factory=set)  # program ids this worker confirmed
    kill_reason: str | None = None
    hello: Any = None
    hello_failures: int = 0
    subscribed: bool = False

    def running(self) -> _DCall | None:
        """The call it runs (the oldest, with several threads); safe from any thread."""
        calls = list(self.inflight.values())
        return calls[0] if calls else None


class DaskPool(Pool):
    """A pool whose workers are the processes of a Dask distributed cluster.

    Made by ``Pool(backend="dask", address=...)``; see the module docstring. ``address``:
    the scheduler (``tcp://host:8786``), or None for a private ``LocalCluster`` of
    ``workers`` single-threaded processes on this machine. ``workers``: how many Dask
    workers ``wait_ready`` waits for (default: the cluster's size when connected).
    ``connect_timeout``: seconds to reach the scheduler before the constructor raises
    :class:`DspoolError`. The other arguments are :class:`Pool`'s.
    """

    def __init__(
        self,
        workers: int | None = None,
        store: str | os.PathLike[str] | ProgramStore | None = None,
        preload: Iterable[str] = (),
        call_timeout: float | None = None,
        *,
        backend: str = "dask",
        address: str | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        worker_memory_limit: int | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        if backend not in ("dask", "local"):  # "local": DaskPool(...) called directly
            raise ValueError(f"DaskPool runs on Dask, not on backend {backend!r}")
        if workers is not None and (
            not isinstance(workers, int) or isinstance(workers, bool) or workers < 1
        ):
            raise ValueError(f"workers must be a positive whole number, got {workers!r}")
        if call_timeout is not None and not call_timeout > 0:
            raise ValueError(
                f"call_timeout must be a positive number of seconds, got {call_timeout!r}"
            )
        if worker_memory_limit is not None:
            raise ValueError(
                "worker_memory_limit is not supported on Dask: set the workers' own "
                "memory limit (dask worker --memory-limit, LocalCluster(memory_limit=...))"
            )
        if address is not None and not isinstance(address, str):
            raise ValueError(f"address must be a scheduler address (tcp://host:port): {address!r}")
        try:
            import distributed  # noqa: F401
        except ImportError as exc:
            raise DspoolError(
                "backend='dask' needs the distributed package: pip install 'dspool-jupyter[dask]'"
            ) from exc
        _close_at_exit_before_dask()
        self.preload = preload_modules(preload)
        self.store = store if isinstance(store, ProgramStore) else ProgramStore(store)
        self.backend = "dask"
        self.address = address
        self.scheduler_address: str | None = address
        self.target = workers if workers is not None else (os.cpu_count() or 1)
        # A private LocalCluster has exactly the workers asked for; an external cluster's
        # size is followed unless ``workers`` says how many to wait for.
        self.requested_workers = self.target if address is None else workers
        self.call_timeout = call_timeout
        self.max_result_bytes = max_result_bytes
        self.heartbeat_interval = heartbeat_interval
        self.worker_memory_limit = None
        self.connect_timeout = connect_timeout
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._bus = EventBus()
        self._ids = itertools.count(1)
        self._closed = False
        self._closing = False
        self._ready_cond = threading.Condition()
        self._d = _Dispatcher(self)
        self._setup_session = self._d.setup_session  # Pool.set_worker_setup stores there
        self._thread = threading.Thread(target=self._d.run, name="dspool-dask", daemon=True)
        self._thread.start()
        try:
            self._d.connected.result(connect_timeout + 60.0)
        except BaseException as exc:
            self._closing = True
            self._post(("close",))
            self._thread.join(CLOSE_TIMEOUT * 2 + 2.0)
            self._closed = True
            where = address or "a new LocalCluster"
            raise DspoolError(
                f"cannot connect to the Dask scheduler at {where}: {type(exc).__name__}: {exc}"
            ) from exc
        with _registry_lock:
            _open_pools.append(weakref.ref(self))
        _registry_changed()

    # ------------------------------------------------------------------ public API
    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._d.ready_count}/{self.target} ready"
        return f"<DaskPool {state} scheduler={self.scheduler_address!r}>"

    def wait_ready(self, timeout: float | None = 30) -> None:
        """Block until ``target`` workers are ready; :class:`PoolStartTimeout` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready_cond:
            while self._d.ready_count < self.target:
                if self._closed or self._closing:
                    raise PoolClosed()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolStartTimeout(
                        self._d.ready_count, self.target, timeout or 0, self._d.last_error
                    )
                self._ready_cond.wait(0.1 if remaining is None else min(remaining, 0.1))

    def submit(
        self,
        program: str,
        *args: Any,
        session: str | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> CallFuture:
        """Queue one call; returns a :class:`CallFuture` at once (as :meth:`Pool.submit`)."""
        if self.closed:
            raise PoolClosed()
        future = DaskCallFuture(self, program)
        prepared = self._prepare_call(future, program, session, timeout, args, kwargs)
        if prepared is None:
            return future
        program_id, blob, timeout = prepared
        call = _DCall(next(self._ids), program, program_id, session, blob, future, timeout)
        future._dask_call = call
        self._post(("call", call))
        if self._closed and not future.done():
            future.set_exception(PoolClosed())
        return future

    # run() and arun() are Pool's: they only use submit().

    def status(self) -> PoolStatus:
        """A snapshot of the pool (safe from any thread), the same type as the local pool's."""
        d = self._d
        live = [w for w in list(d.workers.values()) if w.state != "dead"]
        workers = tuple(
            WorkerStatus(
                id=w.id,
                pid=w.pid,
                state=w.state,
                calls=w.calls,
                errors=w.errors,
                rss_bytes=w.rss,
                last_heartbeat=w.last_heartbeat,
                started_at=w.started_at,
                program=running.program if (running := w.running()) is not None else None,
            )
            for w in live
        )
        if self._closed or self._closing:
            state = "closed"
        elif d.ready_count >= self.target:
            state = "healthy"
        elif d.ever_ready:
            state = "degraded"
        else:
            state = "starting"
        return PoolStatus(
            state=state,
            target=self.target,
            ready_count=d.ready_count,
            workers=workers,
            queued=len(d.queue) + sum(len(w.queue) for w in live),
            running=sum(len(w.inflight) for w in live),
            calls=d.calls_done,
            failed=d.calls_failed,
            replaced=d.replaced,
            started_at=d.started_at,
            startup_seconds=d.startup_seconds,
            last_error=d.last_error,
            recent_failures=tuple(d.failures),
        )

    def worker_addresses(self) -> dict[str, str]:
        """Pool worker id -> the Dask worker's address, for the live workers."""
        return {w.id: w.address for w in list(self._d.workers.values()) if w.state != "dead"}

    def restart_worker(self, worker_id: str) -> None:
        """Kill ``worker_id`` via its nanny, which starts a new one; its calls get WorkerCrashed."""
        if self.closed:
            raise PoolClosed()
        worker = self._d.workers.get(worker_id)
        if worker is None or worker.state == "dead":
            known = ", ".join(w.id for w in self.status().workers) or "none"
            raise UnknownWorker(worker_id, known)
        if worker.nanny is None:
            raise DspoolError(
                f"worker {worker_id} ({worker.address}) has no Dask nanny, so nothing "
                "would start it again; restart it on the cluster"
            )
        self._post(("restart_worker", worker_id))

    def restart(self) -> None:
        """Replace every worker through its nanny (queued calls wait for the new ones)."""
        if self.closed:
            raise PoolClosed()
        self._post(("restart",))

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Fail pending calls with PoolClosed, cancel running tasks, disconnect.

        A private LocalCluster is stopped; an external cluster keeps running. Idempotent
        and safe from any thread.
        """
        if self._closed:
            return
        self._closing = True
        self._post(("close",))
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout * 3 + 2.0)
        self._closed = True
        with _registry_lock:
            _open_pools[:] = [r for r in _open_pools if r() not in (None, self)]
        _registry_changed()

    def _post(self, command: tuple[Any, ...]) -> None:
        self._d.post(command)


class _Dispatcher:
    """The state and the asyncio loop of one :class:`DaskPool` (its own thread)."""

    def __init__(self, pool: DaskPool) -> None:
        self.pool = pool
        self.bus = pool._bus
        self.store = pool.store
        self.token = pool.token
        self.connected: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.poll_now: asyncio.Event | None = None
        self.early_close = False
        self.closing = False
        self.client: Any = None
        self.cluster: Any = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self.worker_numbers = itertools.count(1)
        # Touched only on the dispatcher thread (status() only reads).
        self.workers: dict[str, _DWorker] = {}
        self.by_address: dict[str, _DWorker] = {}
        self.queue: collections.deque[_DCall] = collections.deque()
        self.homes: dict[str, _DWorker] = {}
        self.dead_by_nanny: dict[str, str] = {}  # nanny address -> id of its dead worker
        self.ready_count = 0
        self.ever_ready = False
        self.ready_announced = False
        self.started_at = time.time()
        self.start_mono = time.monotonic()
        self.startup_seconds: float | None = None
        self.calls_done = 0
        self.calls_failed = 0
        self.replaced = 0
        self.last_error: str | None = None
        self.failures: collections.deque[FailedCall] = collections.deque(maxlen=RECENT_FAILURES)
        self.setups: dict[str, tuple[str, str, bytes]] = {}
        self.setup_session = f"_pool.{self.token}"
        self.fast_poll_until = 0.0

    # -- cross-thread
    def post(self, command: tuple[Any, ...]) -> None:
        loop = self.loop
        if loop is None:
            if command[0] == "close":
                self.early_close = True
            return
        try:
            loop.call_soon_threadsafe(self.on_command, command)
        except RuntimeError:  # the loop is gone: the pool is closed
            if command[0] == "call" and not command[1].future.done():
                command[1].future.set_exception(PoolClosed())
            elif command[0] == "setup" and not command[3].done():
                command[3].set_result([])

    def run(self) -> None:
        """The dispatcher thread."""
        try:
            asyncio.run(self.main())
        except BaseException as exc:  # the pool must never take the kernel down
            log.exception("dspool Dask dispatcher stopped")
            self.fail_everything(DspoolError(f"the pool's dispatcher failed: {exc!r}"))
        finally:
            self.pool._closed = True
            self.pool._closing = True
            if not self.connected.done():
                self.connected.set_exception(PoolClosed("the pool stopped while connecting"))
            self.set_ready_count(0)

    async def main(self) -> None:
        import distributed

        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.poll_now = asyncio.Event()
        if self.early_close:
            return
        pool = self.pool
        try:
            address = pool.address
            if address is None:
                self.cluster = await self.start_local_cluster()
                address = str(self.cluster.scheduler_address)
            pool.scheduler_address = address
            client_class: Any = distributed.Client
            self.client = await client_class(
                address,
                asynchronous=True,
                set_as_default=False,
                timeout=pool.connect_timeout,
                name=f"dspool-{self.token}",
            )
            await self.poll()
        except BaseException as exc:
            if not self.connected.done():
                self.connected.set_exception(exc)
            await self.disconnect()
            return
        self.connected.set_result(None)
        self.fast_poll_until = time.monotonic() + FAST_POLL_SPAN  # workers still joining
        watcher = asyncio.ensure_future(self.watch())
        try:
            await self.stop.wait()
        finally:
            watcher.cancel()
            await self.shutdown()

    async def start_local_cluster(self) -> Any:
        import distributed

        cluster_class: Any = distributed.LocalCluster
        cluster = await cluster_class(
            n_workers=0,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",  # its HTTP server: any free port, never 8787
            asynchronous=True,
            # Offline by default, as the local pool: litellm must not fetch its price map.
            env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )
        cluster.scale(self.pool.target)
        return cluster

    def on_command(self, command: tuple[Any, ...]) -> None:
        op = command[0]
        try:
            if op == "call":
                self.enqueue(command[1])
            elif op == "close":
                assert self.stop is not None
                self.closing = True
                self.stop.set()
            elif op == "cancel":
                self.cancel(command[1])
            elif op == "restart_worker":
                worker = self.workers.get(command[1])
                if worker is not None and worker.state != "dead":
                    self.kill(worker, "restart")
            elif op == "restart":
                self.restart_all()
            elif op == "end_session":
                self.homes.pop(command[1], None)
            elif op == "setup":
                _, key, setup, applied = command
                self.setups[key] = setup
                futures = []
                for worker in list(self.workers.values()):
                    if self.usable(worker):
                        call = self.setup_call(*setup)
                        futures.append(call.future)
                        worker.queue.appendleft(call)
                        self.feed(worker)
                applied.set_result(futures)
            elif op == "remove_setup":
                self.setups.pop(command[1], None)
        except Exception:
            log.exception("dspool Dask pool failed on %r", op)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def set_ready_count(self, count: int) -> None:
        with self.pool._ready_cond:
            self.ready_count = count
            self.pool._ready_cond.notify_all()

    # -- the cluster's workers
    async def watch(self) -> None:
        assert self.poll_now is not None
        while True:
            fast = time.monotonic() < self.fast_poll_until
            interval = FAST_POLL_INTERVAL if fast else self.pool.heartbeat_interval
            try:
                await asyncio.wait_for(self.poll_now.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self.poll_now.clear()
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"cannot reach the Dask scheduler: {type(exc).__name__}: {exc}"
                log.debug("dspool: scheduler poll failed", exc_info=True)

    async def poll(self) -> None:
        info = await self.client.scheduler.identity(n_workers=-1)
        now = time.time()
        seen = info.get("workers", {})
        alive = {
            address: meta
            for address, meta in seen.items()
            if meta.get("status") in ("running", "paused", None)
        }
        for worker in list(self.workers.values()):
            if worker.address not in seen:
                self.worker_lost(worker)
        for address, meta in alive.items():
            found = self.by_address.get(address)
            worker = found if found is not None else self.adopt(address, meta)
            metrics = meta.get("metrics") or {}
            memory = metrics.get("memory")
            worker.rss = int(memory) if memory is not None else None
            last_seen = meta.get("last_seen")
            worker.last_heartbeat = float(last_seen) if last_seen else now
        pool = self.pool
        if pool.requested_workers is None:  # follow the cluster's size (see the docstring)
            if not self.ever_ready:
                pool.target = max(1, len(alive))
            elif len(alive) > pool.target:
                pool.target = len(alive)

    def adopt(self, address: str, meta: dict[str, Any]) -> _DWorker:
        number = next(self.worker_numbers)
        worker = _DWorker(
            id=f"w{number}",
            address=address,
            nanny=meta.get("nanny"),
            nthreads=max(1, int(meta.get("nthreads") or 1)),
            started_at=time.time(),
            start_mono=time.monotonic(),
        )
        self.workers[worker.id] = worker
        self.by_address[address] = worker
        self.client.subscribe_topic(address, lambda event, w=worker: self.on_worker_event(w, event))
        worker.subscribed = True
        old = self.dead_by_nanny.pop(worker.nanny, None) if worker.nanny else None
        if old is not None:
            self.replaced += 1
            if self.bus.active:
                self.bus.emit(WorkerReplaced(old_worker_id=old, new_worker_id=worker.id))
        if self.bus.active:
            self.bus.emit(
                WorkerStarting(worker_id=worker.id, ready=self.ready_count, target=self.pool.target)
            )
        self.send_hello(worker)
        return worker

    def send_hello(self, worker: _DWorker) -> None:
        if worker.state == "dead" or self.closing:
            return
        future = self.client.submit(
            _dask_hello,
            self.pool.preload,
            key=f"dspool-hello-{worker.id}-{self.token}-{worker.hello_failures}",
            workers=[worker.address],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )
        worker.hello = future
        self.spawn(self.await_hello(worker, future))

    async def await_hello(self, worker: _DWorker, future: Any) -> None:
        try:
            info = await future
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if worker.state == "dead" or worker.hello is not future:
                return
            worker.hello = None
            worker.hello_failures += 1
            self.last_error = (
                f"Dask worker {worker.address} cannot run dspool programs: "
                f"{type(exc).__name__}: {exc} (is dspool_jupyter installed there?)"
            )
            log.warning("dspool: %s", self.last_error)
            delay = min(HELLO_RETRY_MAX, 0.5 * 2**worker.hello_failures)
            assert self.loop is not None
            self.loop.call_later(delay, self.send_hello, worker)
            return
        if worker.state == "dead" or worker.hello is not future:
            return
        worker.hello = None
        self.on_hello(worker, info)

    def on_hello(self, worker: _DWorker, info: dict[str, Any]) -> None:
        worker.uid = str(info["uid"])
        worker.pid = int(info["pid"])
        worker.state = "idle"
        worker.ready = True
        worker.last_heartbeat = time.time()
        errors = info.get("preload_errors") or []
        if errors:
            self.last_error = "; ".join(errors)
            log.warning("dspool: %s", self.last_error)
        version = info.get("dspool")
        if version and version != _dspool_version():
            self.last_error = (
                f"Dask worker {worker.address} runs dspool_jupyter {version}, "
                f"the kernel {_dspool_version()}"
            )
            log.warning("dspool: %s", self.last_error)
        self.ever_ready = True
        self.set_ready_count(self.ready_count + 1)
        target = self.pool.target
        if self.bus.active:
            self.bus.emit(
                WorkerReady(
                    worker_id=worker.id,
                    pid=worker.pid,
                    ready=self.ready_count,
                    target=target,
                    startup_seconds=time.monotonic() - worker.start_mono,
                )
            )
        if self.ready_count >= target and not self.ready_announced:
            self.ready_announced = True
            self.startup_seconds = time.monotonic() - self.start_mono
            if self.bus.active:
                self.bus.emit(PoolReady(target=target, startup_seconds=self.startup_seconds))
        setups = [self.setup_call(*setup) for setup in self.setups.values()]
        worker.queue.extendleft(reversed(setups))
        self.feed(worker)

    def on_worker_event(self, worker: _DWorker, event: Any) -> None:
        try:
            _, message = event
            action = message.get("action") if isinstance(message, dict) else None
        except (TypeError, ValueError):
            return
        if action == "remove-worker" and worker.state != "dead":
            if message.get("expected") and self.pool.requested_workers is None:
                self.pool.target = max(1, self.pool.target - 1)  # retired on purpose
            self.worker_lost(worker)

    def worker_lost(self, worker: _DWorker) -> None:
        if worker.state == "dead":
            return
        worker.state = "dead"
        self.workers.pop(worker.id, None)
        if self.by_address.get(worker.address) is worker:
            del self.by_address[worker.address]
        if worker.subscribed:
            worker.subscribed = False
            try:
                self.client.unsubscribe_topic(worker.address)
            except Exception:
                pass
        if worker.ready:
            worker.ready = False
            self.set_ready_count(self.ready_count - 1)
        if worker.hello is not None:
            self.cancel_dask([worker.hello])
            worker.hello = None
        reason = worker.kill_reason or ("close" if self.closing else "crashed")
        calls = list(worker.inflight.values())
        worker.inflight.clear()
        program = calls[0].program if calls else None
        for call in calls:
            self.clear_timers(call)
            if not call.future.done():
                if self.closing:
                    error: BaseException = PoolClosed("the pool was closed while the call ran")
                else:
                    error = WorkerCrashed(call.program, worker.id, worker.pid, None)
                self.fail(call, error, worker.id)
        self.cancel_dask([c.dask_future for c in calls if c.dask_future is not None])
        for session, home in list(self.homes.items()):
            if home is worker:
                del self.homes[session]
        waiting = [c for c in worker.queue if not c.setup]
        for call in worker.queue:
            if call.setup and not call.future.done():
                call.future.set_result(None)  # its worker is gone; new workers run it first
        worker.queue.clear()
        self.queue.extendleft(reversed(waiting))
        if worker.nanny is not None:
            self.dead_by_nanny[worker.nanny] = worker.id
        self.fast_poll_until = time.monotonic() + FAST_POLL_SPAN
        if self.poll_now is not None:
            self.poll_now.set()
        if self.bus.active:
            self.bus.emit(
                WorkerDied(
                    worker_id=worker.id,
                    pid=worker.pid,
                    reason=reason,
                    returncode=None,
                    program=program,
                )
            )
        for other in list(self.workers.values()):
            if not self.queue:
                break
            self.feed(other)

    def kill(self, worker: _DWorker, reason: str) -> bool:
        """SIGKILL ``worker``'s process through its nanny (which starts a new one)."""
        if worker.state == "dead":
            return True
        if worker.nanny is None or worker.pid is None:
            self.last_error = (
                f"worker {worker.id} ({worker.address}) has no Dask nanny: the pool cannot "
                f"kill it ({reason})"
            )
            return False
        if worker.kill_reason is None:
            worker.kill_reason = reason
        worker.state = "stopping"
        self.fast_poll_until = time.monotonic() + FAST_POLL_SPAN
        self.spawn(self.kill_through_nanny(worker))
        return True

    async def kill_through_nanny(self, worker: _DWorker) -> None:
        try:
            await self.client.run(
                _kill_worker_process,
                worker.pid,
                workers=[worker.address],
                nanny=True,
                on_error="return",
            )
        except Exception as exc:
            self.last_error = f"could not kill worker {worker.id} through its nanny: {exc}"
            log.warning("dspool: %s", self.last_error)
        if self.poll_now is not None:
            self.poll_now.set()

    def restart_all(self) -> None:
        self.ready_announced = False
        self.ever_ready = False
        self.start_mono = time.monotonic()
        self.started_at = time.time()
        self.startup_seconds = None
        for worker in list(self.workers.values()):
            if worker.state != "dead":
                self.kill(worker, "restart")

    # -- dispatch
    def setup_call(self, program_id: str, name: str, blob: bytes) -> _DCall:
        future = DaskCallFuture(self.pool, name)
        call = _DCall(next(self.pool._ids), name, program_id, None, blob, future, None, setup=True)
        future._dask_call = call
        return call

    def usable(self, worker: _DWorker) -> bool:
        return worker.ready and worker.state in ("idle", "busy")

    def has_room(self, worker: _DWorker) -> bool:
        return self.usable(worker) and len(worker.inflight) < worker.nthreads

    def in_setup(self, worker: _DWorker) -> bool:
        return bool(worker.queue and worker.queue[0].setup) or any(
            c.setup for c in worker.inflight.values()
        )

    def enqueue(self, call: _DCall) -> None:
        if call.future.done():
            return
        if self.closing:
            self.fail(call, PoolClosed())
            return
        if call.session is not None:
            home = self.homes.get(call.session)
            if home is not None and home.state != "dead":
                if not home.queue and self.has_room(home) and not self.in_setup(home):
                    self.start_call(home, call)
                else:
                    home.queue.append(call)
                return
        worker = self.pick()
        if worker is None:
            self.queue.append(call)
            return
        if call.session is not None:
            self.homes[call.session] = worker
        self.start_call(worker, call)

    def pick(self) -> _DWorker | None:
        """The ready worker with the most free threads (ties: the first adopted)."""
        best = None
        best_free = 0
        for worker in self.workers.values():
            if not self.usable(worker) or worker.queue or self.in_setup(worker):
                continue
            free = worker.nthreads - len(worker.inflight)
            if free > best_free:
                best, best_free = worker, free
        return best

    def next_call(self, worker: _DWorker) -> _DCall | None:
        while worker.queue:
            call = worker.queue.popleft()
            if not call.future.done():
                return call
        queue = self.queue
        while queue:
            call = queue.popleft()
            if call.future.done():
                continue
            if call.session is not None:
                home = self.homes.get(call.session)
                if home is None or home.state == "dead":
                    self.homes[call.session] = worker
                elif home is not worker:
                    home.queue.append(call)
                    self.feed(home)
                    continue
            return call
        return None

    def feed(self, worker: _DWorker) -> None:
        """``worker`` may have free threads: give it its next calls."""
        while self.has_room(worker):
            if worker.queue and worker.queue[0].setup:
                call = worker.queue.popleft()
                if not call.future.done():
                    self.start_call(worker, call)
                continue
            if any(c.setup for c in worker.inflight.values()):
                break  # set-ups finish before the worker's first call starts
            next_call = self.next_call(worker)
            if next_call is None:
                break
            self.start_call(worker, next_call)
        if worker.state in ("idle", "busy"):
            worker.state = "busy" if worker.inflight else "idle"

    def start_call(self, worker: _DWorker, call: _DCall) -> None:
        # The store is the source of truth: a program deleted since submit() is gone.
        try:
            record = None
            if call.program_id not in worker.known:
                record = self.store.get(call.program_id).to_record()
            elif not self.store.exists(call.program_id):
                raise ProgramNotFound(call.program)
        except ProgramNotFound:
            self.fail(call, ProgramNotFound(call.program, call.session), worker.id)
            return
        except DspoolError as exc:
            self.fail(call, exc, worker.id)
            return
        call.worker = worker
        call.sent_spec = record is not None
        call.key = f"dspool-{call.program}-{call.id}-{self.token}"
        call.started = time.monotonic()
        call.future.worker_id = worker.id
        worker.inflight[call.id] = call
        worker.state = "busy"
        call.dask_future = self.client.submit(
            _dask_call,
            worker.uid,
            call.key,
            call.program_id,
            call.program,
            record,
            call.blob,
            self.pool.max_result_bytes,
            key=call.key,
            workers=[worker.address],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )
        assert self.loop is not None
        if call.timeout is not None:
            call.timer = self.loop.call_later(call.timeout, self.on_timeout, call)
        if call.future.cancelled():
            self.cancel(call)
        self.spawn(self.await_call(call, worker, call.dask_future))
        if self.bus.active:
            self.bus.emit(
                CallStarted(
                    call_id=call.id, program=call.program, worker_id=worker.id, session=call.session
                )
            )

    async def await_call(self, call: _DCall, worker: _DWorker, dask_future: Any) -> None:
        try:
            reply = await dask_future
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if call.dask_future is not dask_future or worker.inflight.get(call.id) is not call:
                return  # already settled (its worker died, the pool closed)
            self.on_task_error(call, worker, exc)
            return
        if call.dask_future is not dask_future or worker.inflight.get(call.id) is not call:
            return
        self.on_reply(call, worker, reply)

    def on_task_error(self, call: _DCall, worker: _DWorker, exc: BaseException) -> None:
        from distributed.scheduler import KilledWorker

        if isinstance(exc, (KilledWorker, concurrent.futures.CancelledError)):
            self.worker_lost(worker)  # fails the call with WorkerCrashed
            return
        # Dask itself failed the task (e.g. the worker could not unpickle it).
        del worker.inflight[call.id]
        self.clear_timers(call)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = ProgramError(
            call.program, worker.id, type(exc).__name__, str(exc), text, exc, phase="load"
        )
        self.fail(call, error, worker.id)
        self.feed(worker)

    def on_reply(self, call: _DCall, worker: _DWorker, reply: tuple[Any, ...]) -> None:
        kind = reply[0]
        if kind == _MISROUTED:
            # A new process answers at this address: the one the call was sent to is gone.
            self.worker_lost(worker)
            return
        del worker.inflight[call.id]
        self.clear_timers(call)
        call.dask_future = None
        if kind == _NEED_SPEC and not call.retried and not call.future.done():
            worker.known.discard(call.program_id)  # evicted there: send the spec again
            call.retried = True
            worker.queue.appendleft(call)
            self.feed(worker)
            return
        if call.sent_spec:
            worker.known.add(call.program_id)
        future = call.future
        error: BaseException | None = None
        if kind == _RESULT:
            worker.calls += 1
            future.stdout, future.stderr = reply[1], reply[2]
            try:
                value = cloudpickle.loads(reply[3])
            except Exception as exc:
                error = unloadable_result(call.program, worker.id, exc)
            else:
                call.blob = b""
                future._dask_call = None  # break the future <-> call cycle: no GC work per call
                if not future.done():
                    self.calls_done += 1
                    future.set_result(value)
                    if self.bus.active:
                        self.bus.emit(
                            CallFinished(
                                call_id=call.id,
                                program=call.program,
                                worker_id=worker.id,
                                seconds=time.monotonic() - call.started,
                            )
                        )
        elif kind == _ERROR:
            future.stdout, future.stderr = reply[2], reply[3]
            error = error_from_reply(call.program, call.session, worker.id, reply[1], reply[4])
            if isinstance(error, ProgramError):
                worker.calls += 1
                worker.errors += 1
        else:
            error = ProgramNotFound(call.program, call.session)
        if error is not None:
            self.fail(call, error, worker.id)
        self.feed(worker)

    def fail(self, call: _DCall, error: BaseException, worker_id: str | None = None) -> None:
        call.blob = b""
        call.future._dask_call = None
        if call.future.done():
            return
        call.future.set_exception(error)
        self.calls_failed += 1
        failure = FailedCall.of(call.id, call.program, worker_id, error)
        self.failures.append(failure)
        if self.bus.active:
            self.bus.emit(CallFailed.from_failure(failure))

    def clear_timers(self, call: _DCall) -> None:
        for timer in (call.timer, call.cancel_timer):
            if timer is not None:
                timer.cancel()
        call.timer = call.cancel_timer = None

    def cancel_dask(self, futures: list[Any]) -> None:
        if futures and self.client is not None:
            self.spawn(self.cancel_dask_async(futures))

    async def cancel_dask_async(self, futures: list[Any]) -> None:
        try:
            await self.client.cancel(futures, force=True)
        except Exception:
            log.debug("dspool: cancelling Dask tasks failed", exc_info=True)

    # -- faults
    def on_timeout(self, call: _DCall) -> None:
        call.timer = None
        worker = call.worker
        if worker is None or worker.inflight.get(call.id) is not call:
            return
        self.fail(call, CallTimeout(call.program, worker.id, call.timeout or 0), worker.id)
        self.kill(worker, "timeout")  # without a nanny the call keeps its thread till it ends

    def cancel(self, call: _DCall) -> None:
        worker = call.worker
        if worker is None or worker.inflight.get(call.id) is not call or call.cancel_timer:
            return  # still queued: dispatch skips it
        self.spawn(self.interrupt(worker, call.key))
        assert self.loop is not None
        call.cancel_timer = self.loop.call_later(CANCEL_GRACE, self.cancel_overdue, call)

    async def interrupt(self, worker: _DWorker, key: str) -> None:
        try:
            await self.client.run(_interrupt_call, key, workers=[worker.address], on_error="return")
        except Exception:
            log.debug("dspool: interrupting %s failed", key, exc_info=True)

    def cancel_overdue(self, call: _DCall) -> None:
        call.cancel_timer = None
        worker = call.worker
        if worker is not None and worker.inflight.get(call.id) is call:
            self.kill(worker, "cancel")

    # -- shutdown
    async def shutdown(self) -> None:
        self.closing = True
        error = PoolClosed("the pool was closed before the call ran")
        while self.queue:
            self.fail(self.queue.popleft(), error)
        futures = []
        for worker in list(self.workers.values()):
            for call in worker.queue:
                if call.setup and not call.future.done():
                    call.future.set_result(None)
                self.fail(call, error)
            worker.queue.clear()
            running = worker.running()
            for call in worker.inflight.values():
                self.clear_timers(call)
                self.fail(call, PoolClosed("the pool was closed while the call ran"), worker.id)
                if call.dask_future is not None:
                    futures.append(call.dask_future)
            worker.inflight.clear()
            if worker.hello is not None:
                futures.append(worker.hello)
            worker.state = "dead"
            if self.bus.active:  # stopped with the pool (the process stays the cluster's)
                self.bus.emit(
                    WorkerDied(
                        worker_id=worker.id,
                        pid=worker.pid,
                        reason="close",
                        returncode=None,
                        program=running.program if running is not None else None,
                    )
                )
        self.workers.clear()
        for task in list(self.tasks):
            task.cancel()
        if futures:
            try:
                await asyncio.wait_for(self.client.cancel(futures, force=True), CLOSE_TIMEOUT)
            except Exception:
                log.debug("dspool: cancelling Dask tasks at close failed", exc_info=True)
        try:
            self.store.clear_session(self.setup_session)
        except DspoolError:
            log.warning("dspool: could not remove this pool's set-ups from the store")
        await self.disconnect()
        self.set_ready_count(0)
        self.pool._closed = True
        if self.bus.active:
            self.bus.emit(PoolClosedEvent())

    async def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
            except Exception:
                log.debug("dspool: closing the Dask client failed", exc_info=True)
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            try:
                await asyncio.wait_for(cluster.close(), CLOSE_TIMEOUT * 2)
            except Exception:
                log.warning("dspool: stopping the LocalCluster failed", exc_info=True)

    def fail_everything(self, error: BaseException) -> None:
        calls: list[_DCall] = list(self.queue)
        for worker in list(self.workers.values()):
            calls.extend(worker.queue)
            calls.extend(worker.inflight.values())
        for call in calls:
            if not call.future.done():
                call.future.set_exception(error)


_atexit_registered = False


def _close_at_exit_before_dask() -> None:
    """Close open DaskPools at exit before distributed's own exit handlers run.

    atexit runs handlers last-registered first: registered after ``import distributed``,
    this closes the pools (and their LocalClusters) while Dask is still intact, instead
    of leaving a client to retry a scheduler that Dask already stopped.
    """
    global _atexit_registered
    with _registry_lock:
        if _atexit_registered:
            return
        _atexit_registered = True
    atexit.register(_close_dask_pools)


def _close_dask_pools() -> None:
    with _registry_lock:
        pools = [ref() for ref in _open_pools]
    for pool in pools:
        if isinstance(pool, DaskPool):
            pool.close()


def _dspool_version() -> str:
    from . import __version__

    return str(__version__)


# ---------------------------------------------------------------- worker side (Dask)
# These run in the Dask worker processes (pickled by reference: the worker imports this
# module). A worker runs several calls at once in its threads, hence the lock.

_worker_lock = threading.Lock()
_worker_programs: collections.OrderedDict[str, Callable[..., Any]] = collections.OrderedDict()
_worker_running: dict[str, int] = {}  # call key -> ident of the thread running it
_call_output = threading.local()


class _ThreadOutput:
    """``sys.stdout``/``sys.stderr`` on a Dask worker: a running call's thread writes
    into that call's buffer, every other thread to the original stream."""

    def __init__(self, name: str, fallback: TextIO) -> None:
        self._name = name
        self._fallback = fallback

    def write(self, text: str) -> int:
        buffer = getattr(_call_output, self._name, None)
        target = buffer if buffer is not None else self._fallback
        return target.write(text)

    def flush(self) -> None:
        if getattr(_call_output, self._name, None) is None:
            self._fallback.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fallback, name)


def _install_output_capture() -> None:
    with _worker_lock:
        if not isinstance(sys.stdout, _ThreadOutput):
            sys.stdout = cast(TextIO, _ThreadOutput("out", sys.stdout))
        if not isinstance(sys.stderr, _ThreadOutput):
            sys.stderr = cast(TextIO, _ThreadOutput("err", sys.stderr))


def _dask_hello(preload: list[str]) -> dict[str, Any]:
    """First task on every Dask worker: preloads, identity, versions."""
    from distributed import get_worker

    worker = get_worker()
    _install_output_capture()
    errors = []
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # an import that exits must not end the worker
            errors.append(
                f"preload {name!r} failed on {worker.address}: {type(exc).__name__}: {exc}"
            )
    return {
        "uid": worker.id,
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "dspool": _dspool_version(),
        "preload_errors": errors,
    }


def _error_info(
    phase: str, exc: BaseException, out: str, err: str, skip_frames: int = 0
) -> tuple[Any, ...]:
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    info = {
        "phase": phase,
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, tb)),
    }
    try:
        blob = cloudpickle.dumps(exc)
        if len(blob) > MAX_ERROR_BLOB:
            blob = b""
    except Exception:
        blob = b""
    return (_ERROR, info, out, err, blob)


def _load_program(program_id: str, record: dict[str, Any] | None) -> Callable[..., Any] | None:
    from .worker import build_program

    with _worker_lock:
        fn = _worker_programs.get(program_id)
        if fn is not None:
            _worker_programs.move_to_end(program_id)
            return fn
    if record is None:
        return None
    fn = build_program(ProgramSpec.from_record(record))
    with _worker_lock:
        _worker_programs[program_id] = fn
        while len(_worker_programs) > WORKER_PROGRAM_CACHE:
            _worker_programs.popitem(last=False)
    return fn


def _dask_call(
    uid: str,
    key: str,
    program_id: str,
    name: str,
    record: dict[str, Any] | None,
    blob: bytes,
    max_result_bytes: int,
) -> tuple[Any, ...]:
    """One pool call on a Dask worker; the reply is a tuple, never an exception."""
    from distributed import get_worker

    if get_worker().id != uid:
        return (_MISROUTED,)  # Dask reran it elsewhere: a call never runs twice
    try:
        fn = _load_program(program_id, record)
    except Exception as exc:
        return _error_info("load", exc, "", "")
    if fn is None:
        return (_NEED_SPEC,)
    try:
        args, kwargs = cloudpickle.loads(blob)
    except Exception as exc:
        return _error_info("args", exc, "", "")
    if not isinstance(sys.stdout, _ThreadOutput):
        _install_output_capture()
    out, err = io.StringIO(), io.StringIO()
    _call_output.out, _call_output.err = out, err
    try:
        try:
            with _worker_lock:
                _worker_running[key] = threading.get_ident()
            try:
                value = fn(*args, **kwargs)
            finally:
                with _worker_lock:
                    _worker_running.pop(key, None)
        except KeyboardInterrupt as exc:
            return _error_info("cancelled", exc, out.getvalue(), err.getvalue())
        except BaseException as exc:  # SystemExit too: a program's exit is its error
            return _error_info("run", exc, out.getvalue(), err.getvalue(), skip_frames=1)
    finally:
        _call_output.out = _call_output.err = None
    try:
        result = cloudpickle.dumps(value)
    except Exception as exc:
        return _error_info(
            "result",
            TypeError(f"the result ({type(value).__name__}) cannot be pickled: {exc}"),
            out.getvalue(),
            err.getvalue(),
        )
    if len(result) > max_result_bytes:
        return _error_info(
            "result",
            ValueError(
                f"the result is {len(result)} bytes pickled, over the pool's "
                f"max_result_bytes of {max_result_bytes}"
            ),
            out.getvalue(),
            err.getvalue(),
        )
    return (_RESULT, out.getvalue(), err.getvalue(), result)


def _interrupt_call(key: str) -> bool:
    """Raise KeyboardInterrupt in the thread running call ``key`` (``client.run``)."""
    with _worker_lock:
        ident = _worker_running.get(key)
        if ident is None:
            return False
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt)
        )
    return True


def _kill_worker_process(pid: int, dask_worker: Any = None) -> bool:
    """In a nanny (``client.run(..., nanny=True)``): SIGKILL its worker if it is ``pid``."""
    process = getattr(getattr(dask_worker, "process", None), "process", None)
    if process is None or process.pid != pid:
        return False  # already gone or replaced
    os.kill(pid, signal.SIGKILL)
    return True
