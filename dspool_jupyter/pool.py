"""Pool: the facade. It checks arguments, owns the store and the event bus, and composes
a :class:`~dspool_jupyter.dispatch.Dispatcher` (the policy, written once) with a backend
chosen by name (the processes and transport): ``backend="local"`` (the default, worker
processes forked from a warm template on this machine) or ``backend="dask"`` (the
processes of a Dask distributed cluster). No class subclasses Pool.

What the pool promises (DESIGN.md):

- All workers start at once; one ``WorkerReady`` event per worker. Calls that arrive
  before any worker is ready queue and run when one is.
- Anonymous calls go to the ready worker with the most free slots (``concurrency``
  calls at once per worker). A session's calls run in order, one at a time, on the
  session's worker; when it dies the session moves to a live worker.
- A worker that dies fails the calls it may have started with :class:`WorkerCrashed`
  (exit code or signal attached); calls it never received run elsewhere. It is
  replaced at once.
- A call past its timeout fails with :class:`CallTimeout` at once. The timeout counts
  the time the call runs on its worker, not the time it waited. Replies are matched by
  call id, so a late reply never reaches another caller.
- ``CallFuture.cancel()`` (and a kernel interrupt during ``run``) cancels a queued call,
  or interrupts a running one (its worker survives unless the program ignores the
  interrupt for ``CANCEL_GRACE`` seconds). A cancelled future is done at once.
- Outcomes: a value, ``ProgramError``, ``WorkerCrashed``, ``CallTimeout``,
  ``ProgramNotFound``, ``CallCancelled`` or ``PoolClosed``. Nothing hangs: ``close()``
  racing ``submit()`` from other threads ends every future, and an interrupt landing at
  any instant of ``submit`` leaves the call either cancelled or tracked.
- Anything a program prints is captured and shown by ``run`` in the caller's output
  (``future.stdout`` / ``future.stderr`` for ``submit``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import registry, shm
from .backend import BackendOptions
from .calls import CallFuture, echo_output
from .dispatch import (
    CANCEL_GRACE,
    Close,
    Dispatcher,
    EndSession,
    RemoveSetup,
    RestartAll,
    RestartWorker,
    Setup,
)
from .errors import (
    DspoolError,
    PoolClosed,
    ProgramNotFound,
    UnknownWorker,
    UnpicklableArguments,
)
from .events import Event, EventBus, ProgramDefined, ProgramDeleted
from .interrupts import HeldInterrupts
from .limits import ProviderLimits
from .local_backend import OWNER_ENV
from .status import PoolStatus
from .store import ProgramStore

if TYPE_CHECKING:
    from .journal import Journal, JournalInfo
    from .mapping import MapHandle, MapResult
    from .usage import UsageReport

__all__ = [
    "CANCEL_GRACE",
    "DEFAULT_MAX_RESULT_BYTES",
    "HEARTBEAT_INTERVAL",
    "OWNER_ENV",
    "CallFuture",
    "Pool",
    "current_pool",
    "on_current_pool_changed",
    "preload_modules",
]

HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's heartbeats
CLOSE_TIMEOUT = 5.0  # seconds close() waits for the backend to stop its workers
DEFAULT_MAX_RESULT_BYTES = 1 << 30  # a larger pickled result is an error, not a transfer
# Backends by name, imported only when asked (the dask extra is optional).
BACKENDS = {"local": "local_backend:LocalBackend", "dask": "dask_backend:DaskBackend"}

_SET_ENV = "import os\ndef llm_broker(env):\n    os.environ.update(env)\n"
_tracking = threading.local()


class _InterruptsHeld(HeldInterrupts):
    """Holds SIGINT while a call is handed over; an interrupt cancels that call.

    Inside the hand-off an interrupt could leave a call half submitted. Here it is only
    recorded; on exit the call is cancelled (still held) and the interrupt raised, so
    the call ends up cancelled, never lost or running unseen.
    """

    __slots__ = ("future",)

    def __init__(self, future: CallFuture) -> None:
        super().__init__()
        self.future = future

    def __exit__(self, *exc: object) -> None:
        if self.pending is not None:
            self.future.cancel()  # held: cancel() also holds, but is not yet running
        previous, self.previous = self.previous, None
        if previous is None:
            return
        signal.signal(signal.SIGINT, previous)
        if self.pending is not None:  # also one that came after the check above
            self.future.cancel()
            pending, self.pending = self.pending, None
            previous(*pending)


class Pool:
    """A self-healing pool of worker processes running programs from a shared store.

    ``workers``: how many processes (default: the CPU count; on Dask, the cluster's
    size). ``store``: a directory, a :class:`ProgramStore`, or None for the per-user
    default. ``preload``: modules every worker imports once before its first call (the
    local template imports them once and forks). ``call_timeout``: default per-call
    timeout in seconds (None: no limit). ``concurrency``: calls each worker runs at once
    (default 1; see the README for when to raise it). ``max_result_bytes``: the largest
    pickled result a call may return. ``worker_memory_limit``: bytes of data memory a
    local worker may use (``RLIMIT_DATA``); a program that needs more gets
    ``MemoryError``, reported as :class:`ProgramError`. ``backend``: ``"local"`` or
    ``"dask"`` (with ``address``, the scheduler, or None for a private
    ``LocalCluster``). The pool starts at once; ``wait_ready`` blocks until every worker
    is ready (calls made before then queue). ``shared_memory_threshold``: arguments'
    and results' buffers of at least this many bytes (numpy arrays, ``bytearray``,
    ``memoryview``, a top-level ``bytes``) go to local workers as shared memory, not
    through the socket; the worker sees them read-only (None: always the socket). See
    :mod:`dspool_jupyter.shm`.
    """

    def __init__(
        self,
        workers: int | None = None,
        store: str | os.PathLike[str] | ProgramStore | None = None,
        preload: Iterable[str] = (),
        call_timeout: float | None = None,
        *,
        backend: str = "local",
        address: str | None = None,
        concurrency: int = 1,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        worker_memory_limit: int | None = None,
        connect_timeout: float = 10.0,
        shared_memory_threshold: int | None = shm.DEFAULT_THRESHOLD,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        if workers is not None and (
            not isinstance(workers, int) or isinstance(workers, bool) or workers < 1
        ):
            raise ValueError(f"workers must be a positive whole number, got {workers!r}")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ValueError(
                f"concurrency must be a whole number of calls per worker (>= 1), "
                f"got {concurrency!r}"
            )
        if call_timeout is not None and not call_timeout > 0:
            raise ValueError(
                f"call_timeout must be a positive number of seconds, got {call_timeout!r}"
            )
        if worker_memory_limit is not None and worker_memory_limit < 64 << 20:
            raise ValueError(
                "worker_memory_limit must be at least 64 MiB (in bytes), "
                f"got {worker_memory_limit!r}"
            )
        if shared_memory_threshold is not None and (
            not isinstance(shared_memory_threshold, int) or shared_memory_threshold < 1
        ):
            raise ValueError(
                "shared_memory_threshold must be a positive number of bytes or None, "
                f"got {shared_memory_threshold!r}"
            )
        self.preload = preload_modules(preload)
        self.store = store if isinstance(store, ProgramStore) else ProgramStore(store)
        target = (os.cpu_count() or 1) if workers is None else workers
        self.concurrency = concurrency
        self.call_timeout = call_timeout
        self.max_result_bytes = max_result_bytes
        self.heartbeat_interval = heartbeat_interval
        self.worker_memory_limit = worker_memory_limit
        self.address = address
        self.connect_timeout = connect_timeout
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._closing = False
        self._bus = EventBus()
        # One broker of LM permits and one usage ledger for every worker (limits.py):
        # a Unix socket in the private store directory, or TCP for a Dask cluster.
        if backend == "local":
            self.limits = ProviderLimits(self.store.directory, labels=self._usage_labels)
        else:
            remote = address is not None and not _is_loopback(address)
            self.limits = ProviderLimits(
                None,
                host="0.0.0.0" if remote else "127.0.0.1",
                advertise=socket.gethostbyname(socket.gethostname()) if remote else None,
                labels=self._usage_labels,
            )
        self._dispatcher = Dispatcher(
            target=target,
            concurrency=concurrency,
            store=self.store,
            bus=self._bus,
            token=self.token,
            memory_limit=worker_memory_limit,
        )
        module_name, _, class_name = BACKENDS[backend].partition(":")
        module = importlib.import_module(f"{__package__}.{module_name}")
        self.backend_name = backend
        options = BackendOptions(
            workers=workers,
            target=target,
            concurrency=concurrency,
            store_dir=str(self.store.directory),
            anonymous_ttl=self.store.anonymous_ttl,
            preload=self.preload,
            heartbeat_interval=heartbeat_interval,
            max_result_bytes=max_result_bytes,
            memory_limit=worker_memory_limit,
            address=address,
            connect_timeout=connect_timeout,
            token=self.token,
            env=self.limits.env,
            shared_memory_threshold=shared_memory_threshold,
        )
        try:
            self._backend = getattr(module, class_name)(options)
            self._dispatcher.backend = self._backend
            self._backend.start(self._dispatcher)
        except BaseException:
            self.limits.close()
            raise
        self._placer: shm.Placer | None = getattr(self._backend, "placer", None)
        if backend != "local":
            # Remote workers learn the broker's address from a set-up (new workers too).
            self.set_worker_setup("llm_broker", _SET_ENV, self.limits.env)
        registry.add(self)

    # ------------------------------------------------------------------ public API
    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        d = self._dispatcher
        state = "closed" if self.closed else f"{d.ready_count}/{self.target} ready"
        where = getattr(self._backend, "describe", lambda: f"store={str(self.store.directory)!r}")
        return f"<Pool {self.backend_name} {state} {where()}>"

    @property
    def target(self) -> int:
        """How many workers the pool keeps (on Dask, may follow the cluster's size)."""
        return self._dispatcher.target

    @property
    def closed(self) -> bool:
        return self._closing or self._dispatcher.stopped

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Receive every pool event (see :mod:`dspool_jupyter.events`); returns unsubscribe."""
        return self._bus.subscribe(callback)

    def wait_ready(self, timeout: float | None = 30) -> None:
        """Block until all workers are ready; :class:`PoolStartTimeout` after ``timeout`` s."""
        self._dispatcher.wait_ready(timeout)

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
            self._dispatcher.post(EndSession(session))
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
        d = self._dispatcher
        spec = self.store.put(name, program, entry=entry, session=d.setup_session)
        try:
            blob = cloudpickle.dumps((args, kwargs))
        except Exception as exc:
            raise UnpicklableArguments(name, f"{type(exc).__name__}: {exc}") from exc
        applied: concurrent.futures.Future[list[CallFuture]] = concurrent.futures.Future()
        d.post(Setup(key, (spec.id, name, blob), applied))
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in applied.result(timeout):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            future.result(remaining)

    def remove_worker_setup(self, key: str) -> None:
        """Stop running set-up ``key`` in new workers (running workers keep its effect)."""
        if not self.closed:
            self._dispatcher.post(RemoveSetup(key))

    @contextmanager
    def track(self) -> Iterator[list[CallFuture]]:
        """Collect every future this thread submits inside the block (see ``run``).

        A future is added as part of its submission, so an interrupt can never leave a
        submitted call out of the list: on ``KeyboardInterrupt`` cancel them all.
        """
        stack = getattr(_tracking, "stack", None)
        if stack is None:
            stack = _tracking.stack = []
        futures: list[CallFuture] = []
        stack.append(futures)
        try:
            yield futures
        finally:
            stack.remove(futures)

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
        if timeout is None:
            timeout = self.call_timeout
        elif not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        future = CallFuture(program)
        try:
            program_id = self.store.resolve(program, session)
        except ProgramNotFound as exc:
            future.set_exception(exc)
            return future
        segments: tuple[shm.Segment, ...] = ()
        try:
            if self._placer is None:
                blob = cloudpickle.dumps((args, kwargs))
            else:
                blob, segments = self._placer.dumps_call(args, kwargs)
        except Exception as exc:
            future.set_exception(UnpicklableArguments(program, f"{type(exc).__name__}: {exc}"))
            return future
        d = self._dispatcher
        call = d.new_call(future, program_id, session, blob, timeout)
        call.segments = segments
        with _InterruptsHeld(future):
            stack = getattr(_tracking, "stack", None)
            if stack:
                for futures in stack:
                    futures.append(future)
            d.submit(call)
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
        with self.track() as submitted:
            try:
                future = self.submit(program, *args, session=session, timeout=timeout, **kwargs)
                future.exception()  # waits (concurrent.futures.wait costs more per call)
            except KeyboardInterrupt:
                for pending in submitted:
                    pending.cancel()
                raise
            except concurrent.futures.CancelledError:
                pass  # result() below raises it
        echo_output(future)
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
        echo_output(future)
        return future.result()

    def status(self) -> PoolStatus:
        """A snapshot of the pool as of now (safe from any thread; see :mod:`.status`).

        From the moment ``close()`` starts, the snapshot is 'closed' with no workers:
        they are being stopped, not serving.

        ``preload``, ``preload_started_at`` and ``preload_seconds`` come from the local
        backend's template: when it started (wall clock) and how long until it had
        imported the preloads and said it was ready (from the kernel's side, so the
        interpreter's own start counts too); a restart of the pool or of the template
        starts them again. The Dask backend leaves the two times None (its workers
        import the preloads in their hello task, each on its own).
        """
        status = self._dispatcher.status(closing=self._closing)
        counts = getattr(self._backend, "transfer_counts", None)
        if counts is not None:
            status = dataclasses.replace(status, **counts())
        if not self.preload:
            return status
        started_at, seconds = getattr(self._backend, "preload_times", (None, None))
        return dataclasses.replace(
            status,
            preload=tuple(self.preload),
            preload_started_at=started_at,
            preload_seconds=seconds,
        )

    def restart_worker(self, worker_id: str) -> None:
        """Kill ``worker_id`` and start a replacement; its running calls get WorkerCrashed."""
        if self.closed:
            raise PoolClosed()
        d = self._dispatcher
        with d.lock:
            worker = d.workers.get(worker_id)
            known = ", ".join(w.id for w in d.workers.values() if w.state != "dead") or "none"
        if worker is None or worker.state == "dead":
            raise UnknownWorker(worker_id, known)
        check = getattr(self._backend, "check_restart", None)
        if check is not None:
            check(worker)
        d.post(RestartWorker(worker_id))

    def restart(self) -> None:
        """Replace every worker (the local template too, re-importing the preloads).

        Queued calls wait for the new workers; running calls fail with WorkerCrashed.
        """
        if self.closed:
            raise PoolClosed()
        self._dispatcher.post(RestartAll())

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop every worker; pending calls fail with PoolClosed.

        Idempotent, and safe to call from any thread (from the pool's own thread, e.g.
        an event callback, it only starts the shutdown).
        """
        if self._closing:
            return
        self._closing = True
        self._dispatcher.post(Close())
        self._backend.close(timeout)
        self.limits.close()
        # Its descriptors go too (it reopens lazily if the caller uses it again).
        self.store.close()
        registry.remove(self)

    # ------------------------------------------- provider limits and usage (limits.py)
    def set_rate_limit(
        self,
        model: str,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        plain: bool = False,
    ) -> None:
        """One limit for ``model`` across every worker: ``rpm`` requests and ``tpm``
        tokens per minute (both None: no limit). Every LM request of every worker takes
        a permit from the kernel side; 429s pause the model pool-wide and are retried.

        Raises ValueError for an unknown model or a limit that is not a positive number,
        and :class:`DspoolError` on a pool with no LM (``configure_lm``) unless
        ``plain=True`` says plain programs take permits themselves
        (:func:`dspool_jupyter.llm.permit`).
        """
        if not plain:
            from . import dspy_programs

            if dspy_programs.current_lm(self) is None:
                raise DspoolError(
                    f"this pool has no LM, so a limit on {model!r} would limit nothing: "
                    "configure one first (pool.configure_lm / %dspool lm), or pass "
                    "plain=True when your programs take permits with "
                    "dspool_jupyter.llm.permit"
                )
        self.limits.set_rate_limit(model, rpm=rpm, tpm=tpm)

    def set_budget(self, max_cost: float | None = None, max_tokens: int | None = None) -> None:
        """Stop LM requests (with :class:`BudgetExceeded`) once ``max_cost`` dollars or
        ``max_tokens`` tokens are spent; calls already answered keep their results."""
        self.limits.set_budget(max_cost, max_tokens)

    def usage(self) -> UsageReport:
        """LM requests, tokens and cost so far: totals, per program, session and model."""
        return self.limits.usage()

    def _usage_labels(
        self, call_id: int | None, program: str | None
    ) -> tuple[str | None, str | None]:
        d = self._dispatcher
        if call_id is not None:
            with d.lock:
                for worker in d.workers.values():
                    call = worker.inflight.get(call_id)
                    if call is not None:
                        return call.program, call.session
        return program, None

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

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras (e.g. the Dask backend's worker_addresses()).
        if name.startswith("_"):
            raise AttributeError(name)
        backend = self.__dict__.get("_backend")
        extras = getattr(backend, "extras", {})
        if name in extras:
            return getattr(backend, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def current_pool() -> Pool | None:
    """The most recently started pool of this process that is not closed, or None."""
    pool = registry.current()
    return pool if isinstance(pool, Pool) else None


def on_current_pool_changed(callback: Callable[[Pool | None], None]) -> Callable[[], None]:
    """Call ``callback(current_pool())`` whenever a pool starts or closes; returns unsubscribe."""
    return registry.on_current_changed(
        lambda pool: callback(pool if isinstance(pool, Pool) else None)
    )


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def preload_modules(preload: Iterable[str]) -> list[str]:
    """The module names of a ``preload`` option (a list, or "a,b" text), checked."""
    if isinstance(preload, str):
        preload = [p for p in preload.split(",") if p]
    names = [str(p).strip() for p in preload]
    for name in names:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"preload entry {name!r} is not a module name")
    return names
