"""The Dask backend: the pool's workers are the processes of a Dask distributed cluster.

``Pool(backend="dask", address="tcp://scheduler:8786")`` (or ``%dspool start --dask
ADDRESS``) makes the same pool on Dask: the public surface, the :class:`CallFuture`, the
errors, the events and the :class:`PoolStatus` snapshots are the local backend's, and
the one :class:`~dspool_jupyter.dispatch.Dispatcher` decides where calls go, so the
magics, the status widget and the lab extension work unchanged. Without ``address`` the
pool starts a private ``LocalCluster`` (``workers`` processes of ``concurrency`` threads,
nannies included) and stops it at ``close()``. Dask's scheduler, workers and nannies
move the bytes and keep the processes alive; nothing here opens a socket of its own.

How the pieces map:

- **One row per Dask worker process.** A worker runs up to ``min(concurrency,
  nthreads)`` calls at once (its slots). Its pool id (``w1``, ``w2``, ... as locally)
  names one incarnation: a worker that a nanny restarts comes back under a new id,
  announced as ``WorkerReplaced``. ``pid`` is the worker's own (on its host);
  ``pool.worker_addresses()`` maps ids to Dask addresses.
- **The kernel places every call.** The dispatcher's loop thread (an asyncio loop that
  also drives an asynchronous ``distributed.Client``) sends each call with
  ``client.submit(..., workers=[address], allow_other_workers=False, retries=0)`` to
  the worker the dispatcher chose.
- **No silent reruns.** Dask reschedules a task whose worker died. Pinned to one address,
  a lost call can only wait in ``no-worker``; the kernel cancels it as it learns of the
  death, and the task also carries the id of the worker *process* it was sent to
  (``Worker.id``): a rerun anywhere else, even on a new worker at the same address,
  returns without running the program. A killed worker's calls end in
  :class:`WorkerCrashed` (exit status unknown: the nanny keeps it) and nothing else.
- **Programs travel by value.** The kernel's :class:`ProgramStore` stays the only source
  of truth; workers never see its disk. A call carries the program's spec (read from the
  store) until the worker has confirmed it by a reply; after that only the id. The
  worker builds the program and caches it by content-hash id (a redefined program has a
  new id, so the cache is never stale; an evicted one is asked for again). A program
  deleted from the store fails calls that have not started with :class:`ProgramNotFound`.
- **Deaths and heartbeats.** The kernel subscribes to each worker's scheduler event topic
  (its address): ``remove-worker`` arrives within milliseconds of a worker's death and
  fails its calls at once. A poll of ``scheduler.identity()`` every
  ``heartbeat_interval`` seconds (every 0.1 s for 10 s after the start, a death or a
  kill) adopts new workers, reconciles missed deaths, fills ``rss_bytes`` and
  ``last_heartbeat``. A worker the network lost is removed by the scheduler after its
  ``worker-ttl`` (5 minutes by default); its calls fail then.
- **Start-up.** Each new worker first runs a hello task (preloads, pid, ``Worker.id``,
  versions); then the pool's worker set-ups run on it before any call. ``workers=None``
  means the cluster's size when the pool connected (grown when workers join, shrunk when
  the scheduler retires one on purpose); ``workers=N`` waits for N in ``wait_ready``.
- **Timeouts, cancel and restarts.** A call past its timeout fails with
  :class:`CallTimeout`; at one slot its worker process is SIGKILLed through its nanny
  (``client.run(..., nanny=True)``), which starts a new one. ``cancel()`` of a running
  call raises KeyboardInterrupt in the thread running it (delivered when the thread next
  runs Python code); a program that ignores it for ``CANCEL_GRACE`` seconds has its
  worker killed the same way. A worker without a nanny cannot be killed by the pool.
- **Output.** What a program prints is captured per call (a ContextVar-routed
  ``sys.stdout``/``sys.stderr`` on the worker, see :mod:`dspool_jupyter.runtime`).
- **Large arguments** travel inside the Dask task, through Dask's own transport (no
  shared memory): pass big data by reference (a path, a Dask-scattered future) instead.

Cost: a call is one Dask task plus a gather (``bench/dask_backend.py``: ~13 ms against
0.13 ms locally): the Dask backend is for programs that run much longer (LLM calls), on
more cores than one machine has. ``dspool_jupyter`` (and whatever the programs import)
must be installed on every Dask worker. ``worker_memory_limit`` is not supported (use the
cluster's ``--memory-limit``).

The worker-side functions (``_dask_hello``, ``_dask_call``, ``_interrupt_call``,
``_kill_worker_process``) live in :mod:`dspool_jupyter.dask_tasks`, which imports nothing
of the kernel side: a Dask worker never imports this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import registry
from .backend import BackendOptions, KillReason, WorkerSlot, call_locked_soon
from .dask_tasks import (
    _ERROR,
    _INTERRUPT_PENDING,
    _INTERRUPT_SENT,
    _MISROUTED,
    _NEED_SPEC,
    _RESULT,
    _dask_call,
    _dask_hello,
    _dspool_version,
    _interrupt_call,
    _kill_worker_process,
)
from .errors import DspoolError, PoolClosed, ProgramError, ProgramNotFound

if TYPE_CHECKING:
    from .calls import Call
    from .dispatch import Dispatcher

__all__ = ["CONNECT_TIMEOUT", "DaskBackend", "DaskTask", "DaskWorker"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds the constructor waits to reach the scheduler
CLOSE_TIMEOUT = 5.0  # seconds close() waits for Dask to cancel, disconnect and stop
# Seconds close() lets an interrupted call end before it kills its worker (through the
# nanny): Dask's cancel never stops a running thread, and a call left hanging would hold
# the shared cluster's thread for good.
CLOSE_GRACE = 2.0
INTERRUPT_REACH = 2.0  # seconds an interrupt may take to reach a worker (a dead one: never)
FAST_POLL_INTERVAL = 0.1  # seconds between polls just after a start, a death or a kill
FAST_POLL_SPAN = 10.0  # seconds of fast polling after each of those
HELLO_RETRY_MAX = 30.0  # seconds: longest wait before a failed hello is tried again


@dataclass(eq=False)
class DaskTask:
    """A call's Dask side (in ``call.handle``): its task key and future."""

    key: str
    future: Any = None
    sent_spec: bool = False
    retried: bool = False


@dataclass(eq=False)
class DaskWorker(WorkerSlot):
    """A Dask worker process as the dispatcher sees it."""

    address: str = ""
    nanny: str | None = None
    nthreads: int = 1
    uid: str | None = None  # the Dask Worker.id of this incarnation (from its hello)
    known: set[str] = field(default_factory=set)  # program ids this worker confirmed
    hello: Any = None
    hello_failures: int = 0
    subscribed: bool = False


class DaskBackend:
    """Workers on a Dask distributed cluster (see the module docstring)."""

    name = "dask"
    direct_send = False  # the asynchronous Client is driven from its loop only
    extras = ("worker_addresses",)

    def __init__(self, options: BackendOptions) -> None:
        if options.memory_limit is not None:
            raise ValueError(
                "worker_memory_limit is not supported on Dask: set the workers' own "
                "memory limit (dask worker --memory-limit, LocalCluster(memory_limit=...))"
            )
        if options.address is not None and not isinstance(options.address, str):
            raise ValueError(
                f"address must be a scheduler address (tcp://host:port): {options.address!r}"
            )
        try:
            import distributed  # noqa: F401
        except ImportError as exc:
            raise DspoolError(
                "backend='dask' needs the distributed package: pip install 'dspool-jupyter[dask]'"
            ) from exc
        self.options = options
        self.address = options.address
        self.scheduler_address: str | None = options.address
        # A private LocalCluster has exactly the workers asked for; an external cluster's
        # size is followed unless ``workers`` says how many to wait for.
        self.requested_workers = options.target if options.address is None else options.workers
        self.connected: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.d: Dispatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.thread: threading.Thread | None = None
        self.stop_event: asyncio.Event | None = None
        self.poll_now: asyncio.Event | None = None
        self.client: Any = None
        self.cluster: Any = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self.numbers = iter(range(1, 1 << 62))
        self.by_address: dict[str, DaskWorker] = {}
        self.dead_by_nanny: dict[str, str] = {}  # nanny address -> id of its dead worker
        self.fast_poll_until = 0.0
        self.ever_ready = False

    # ------------------------------------------------------------ Backend API
    def start(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher
        registry.close_at_exit_first()  # after import distributed: atexit runs us first
        self.thread = threading.Thread(target=self._run, name="dspool-dask", daemon=True)
        self.thread.start()
        try:
            self.connected.result(self.options.connect_timeout + 60.0)
        except BaseException as exc:
            from .dispatch import Close

            dispatcher.post(Close())
            self.close(CLOSE_TIMEOUT)
            where = self.address or "a new LocalCluster"
            raise DspoolError(
                f"cannot connect to the Dask scheduler at {where}: {type(exc).__name__}: {exc}"
            ) from exc

    def wake(self) -> None:
        loop = self.loop
        if loop is None:
            return  # the loop drains the inbox when it starts
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass  # the loop is gone: the dispatcher ends what was posted

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self.loop_thread

    def call_soon(self, callback: object) -> None:
        assert callable(callback)
        call_locked_soon(self.loop, self._d().lock, callback)

    def send(self, slot: WorkerSlot, call: Call) -> bool:
        assert isinstance(slot, DaskWorker)
        d = self._d()
        # The store is the source of truth: a program deleted since submit() is gone.
        try:
            record = None
            if call.program_id not in slot.known:
                record = d.store.get(call.program_id).to_record()
            elif not d.store.exists(call.program_id):
                raise ProgramNotFound(call.program)
        except DspoolError as exc:
            error = (
                ProgramNotFound(call.program, call.session)
                if isinstance(exc, ProgramNotFound)
                else exc
            )
            assert self.loop is not None
            self.loop.call_soon(self._settle_unsent, slot, call, error)
            return True
        task = call.handle if isinstance(call.handle, DaskTask) else None
        if task is None:
            task = DaskTask(key=f"dspool-{call.program}-{call.id}-{d.token}")
            call.handle = task
        else:
            task.key = f"{task.key}-again"
        task.sent_spec = record is not None
        call.acked = True  # a task may start any time: a lost worker's calls all crashed
        task.future = self.client.submit(
            _dask_call,
            slot.uid,
            task.key,
            call.program_id,
            call.program,
            record,
            call.blob,
            self.options.max_result_bytes,
            call.id,
            key=task.key,
            workers=[slot.address],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )
        self._spawn(self._await_call(call, slot, task.future))
        return True

    def interrupt(self, slot: WorkerSlot, call: Call) -> None:
        assert isinstance(slot, DaskWorker)
        task = call.handle
        if isinstance(task, DaskTask):
            # Until the grace ends (then the dispatcher kills the worker).
            self._spawn(self._interrupt(slot, task.key, self._d().cancel_grace, task.future))

    def kill(self, slot: WorkerSlot, reason: KillReason) -> None:
        """SIGKILL ``slot``'s process through its nanny (which starts a new one)."""
        assert isinstance(slot, DaskWorker)
        d = self._d()
        if slot.state == "dead":
            return
        if slot.nanny is None or slot.pid is None:
            d.last_error = (
                f"worker {slot.id} ({slot.address}) has no Dask nanny: the pool cannot "
                f"kill it ({reason})"
            )
            return
        if slot.kill_reason is None:
            slot.kill_reason = reason
        slot.state = "stopping"
        self.fast_poll_until = time.monotonic() + FAST_POLL_SPAN
        self._spawn(self._kill_through_nanny(slot))

    def may_pipeline(self, slot: WorkerSlot) -> bool:
        return False

    def replace(self, slot: WorkerSlot) -> None:
        pass  # the cluster keeps its size: the nanny restarts the worker once it is killed

    def restart_all(self) -> None:
        d = self._d()
        self.ever_ready = False
        for worker in list(d.workers.values()):
            if worker.state != "dead":
                self.kill(worker, "restart")

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        thread = self.thread
        if thread is None or threading.get_ident() == self.loop_thread:
            return
        thread.join(timeout * 3 + 2.0)

    # -- extras
    def describe(self) -> str:
        return f"scheduler={self.scheduler_address!r}"

    def worker_addresses(self) -> dict[str, str]:
        """Pool worker id -> the Dask worker's address, for the live workers."""
        d = self._d()
        with d.lock:
            return {
                w.id: w.address
                for w in d.workers.values()
                if isinstance(w, DaskWorker) and w.state != "dead"
            }

    def check_restart(self, worker: WorkerSlot) -> None:
        if isinstance(worker, DaskWorker) and worker.nanny is None:
            raise DspoolError(
                f"worker {worker.id} ({worker.address}) has no Dask nanny, so nothing "
                "would start it again; restart it on the cluster"
            )

    # ------------------------------------------------------------ loop thread
    def _d(self) -> Dispatcher:
        assert self.d is not None
        return self.d

    def _run(self) -> None:
        d = self._d()
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # the pool must never take the kernel down
            log.exception("dspool Dask dispatcher stopped")
            d.fail_everything(DspoolError(f"the pool's dispatcher failed: {exc!r}"))
        finally:
            if not self.connected.done():
                self.connected.set_exception(PoolClosed("the pool stopped while connecting"))
            with d.lock:
                d.stopped = True
                d.closed = True
                d.set_ready_count(0)
            d.drain_unserved()

    def _drain(self) -> None:
        d = self._d()
        with d.lock:
            d.drain()
            if d.stopped and self.stop_event is not None:
                self.stop_event.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _main(self) -> None:
        import distributed

        d = self._d()
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.stop_event = asyncio.Event()
        self.poll_now = asyncio.Event()
        try:
            address = self.address
            if address is None:
                self.cluster = await self._start_local_cluster()
                address = str(self.cluster.scheduler_address)
            self.scheduler_address = address
            client_class: Any = distributed.Client
            self.client = await client_class(
                address,
                asynchronous=True,
                set_as_default=False,
                timeout=self.options.connect_timeout,
                name=f"dspool-{d.token}",
            )
            with d.lock:
                if d.stopped:
                    raise PoolClosed("the pool was closed while it connected")
            await self._poll()
        except BaseException as exc:
            if not self.connected.done():
                self.connected.set_exception(exc)
            await self._disconnect()
            return
        self.connected.set_result(None)
        self.fast_poll_until = time.monotonic() + FAST_POLL_SPAN  # workers still joining
        supervisor = asyncio.ensure_future(d.supervisor.run())
        watcher = asyncio.ensure_future(self._watch())
        self._drain()  # what was posted before the loop ran
        try:
            await self.stop_event.wait()
        finally:
            watcher.cancel()
            supervisor.cancel()
            await self._shutdown()

    async def _start_local_cluster(self) -> Any:
        import distributed

        cluster_class: Any = distributed.LocalCluster
        cluster = await cluster_class(
            n_workers=0,
            threads_per_worker=self.options.concurrency,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",  # its HTTP server: any free port, never 8787
            asynchronous=True,
            # Offline by default, as the local pool: litellm must not fetch its price map.
            env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )
        cluster.scale(self.options.target)
        return cluster

    # -- the cluster's workers
    async def _watch(self) -> None:
        assert self.poll_now is not None
        while True:
            fast = time.monotonic() < self.fast_poll_until
            interval = FAST_POLL_INTERVAL if fast else self.options.heartbeat_interval
            try:
                await asyncio.wait_for(self.poll_now.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self.poll_now.clear()
            try:
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._d().last_error = (
                    f"cannot reach the Dask scheduler: {type(exc).__name__}: {exc}"
                )
                log.debug("dspool: scheduler poll failed", exc_info=True)

    async def _poll(self) -> None:
        info = await self.client.scheduler.identity(n_workers=-1)
        d = self._d()
        now = time.time()
        seen = info.get("workers", {})
        alive = {
            address: meta
            for address, meta in seen.items()
            if meta.get("status") in ("running", "paused", None)
        }
        with d.lock:
            for worker in list(d.workers.values()):
                if isinstance(worker, DaskWorker) and worker.address not in seen:
                    self._lost(worker)
            for address, meta in alive.items():
                found = self.by_address.get(address)
                worker = found if found is not None else self._adopt(address, meta)
                metrics = meta.get("metrics") or {}
                memory = metrics.get("memory")
                worker.rss = int(memory) if memory is not None else None
                last_seen = meta.get("last_seen")
                worker.last_heartbeat = float(last_seen) if last_seen else now
            if self.requested_workers is None:  # follow the cluster's size (see the docstring)
                if not self.ever_ready:
                    self._set_target(max(1, len(alive)))
                elif len(alive) > d.target:
                    self._set_target(len(alive))

    def _set_target(self, target: int) -> None:
        self._d().target = target

    def _adopt(self, address: str, meta: dict[str, Any]) -> DaskWorker:
        d = self._d()
        nthreads = max(1, int(meta.get("nthreads") or 1))
        worker = DaskWorker(
            id=f"w{next(self.numbers)}",
            started_at=time.time(),
            start_mono=time.monotonic(),
            slots=min(self.options.concurrency, nthreads),
            address=address,
            nanny=meta.get("nanny"),
            nthreads=nthreads,
        )
        self.by_address[address] = worker
        self.client.subscribe_topic(address, lambda event, w=worker: self._on_event(w, event))
        worker.subscribed = True
        old = self.dead_by_nanny.pop(worker.nanny, None) if worker.nanny else None
        d.add_worker(worker, replacing=old)
        self._send_hello(worker)
        return worker

    def _send_hello(self, worker: DaskWorker) -> None:
        d = self._d()
        if worker.state == "dead" or d.stopped:
            return
        future = self.client.submit(
            _dask_hello,
            self.options.preload,
            key=f"dspool-hello-{worker.id}-{d.token}-{worker.hello_failures}",
            workers=[worker.address],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )
        worker.hello = future
        self._spawn(self._await_hello(worker, future))

    async def _await_hello(self, worker: DaskWorker, future: Any) -> None:
        d = self._d()
        try:
            info = await future
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            with d.lock:
                if worker.state == "dead" or worker.hello is not future:
                    return
                worker.hello = None
                worker.hello_failures += 1
                d.last_error = (
                    f"Dask worker {worker.address} cannot run dspool programs: "
                    f"{type(exc).__name__}: {exc} (is dspool_jupyter installed there?)"
                )
                log.warning("dspool: %s", d.last_error)
            delay = min(HELLO_RETRY_MAX, 0.5 * 2**worker.hello_failures)
            assert self.loop is not None
            self.loop.call_later(delay, self._send_hello, worker)
            return
        with d.lock:
            if worker.state == "dead" or worker.hello is not future:
                return
            worker.hello = None
            self._on_hello(worker, info)

    def _on_hello(self, worker: DaskWorker, info: dict[str, Any]) -> None:
        d = self._d()
        worker.uid = str(info["uid"])
        errors = info.get("preload_errors") or []
        if errors:
            d.last_error = "; ".join(errors)
            log.warning("dspool: %s", d.last_error)
        version = info.get("dspool")
        if version and version != _dspool_version():
            d.last_error = (
                f"Dask worker {worker.address} runs dspool_jupyter {version}, "
                f"the kernel {_dspool_version()}"
            )
            log.warning("dspool: %s", d.last_error)
        self.ever_ready = True
        d.worker_ready(worker, int(info["pid"]))

    def _on_event(self, worker: DaskWorker, event: Any) -> None:
        try:
            _, message = event
            action = message.get("action") if isinstance(message, dict) else None
        except (TypeError, ValueError):
            return
        if action == "remove-worker" and worker.state != "dead":
            with self._d().lock:
                if message.get("expected") and self.requested_workers is None:
                    self._set_target(max(1, self._d().target - 1))  # retired on purpose
                self._lost(worker)

    def _lost(self, worker: DaskWorker) -> None:
        d = self._d()
        if worker.state == "dead":
            return
        if self.by_address.get(worker.address) is worker:
            del self.by_address[worker.address]
        if worker.subscribed:
            worker.subscribed = False
            try:
                self.client.unsubscribe_topic(worker.address)
            except Exception:
                pass
        if worker.hello is not None:
            self._cancel_dask([worker.hello])
            worker.hello = None
        tasks = [c.handle for c in worker.inflight.values() if isinstance(c.handle, DaskTask)]
        d.worker_lost(worker)
        d.report_lost(worker)
        self._cancel_dask([t.future for t in tasks if t.future is not None])
        if worker.nanny is not None:
            self.dead_by_nanny[worker.nanny] = worker.id
        self.fast_poll_until = time.monotonic() + FAST_POLL_SPAN
        if self.poll_now is not None:
            self.poll_now.set()

    async def _kill_through_nanny(self, worker: DaskWorker) -> None:
        try:
            await self.client.run(
                _kill_worker_process,
                worker.pid,
                workers=[worker.address],
                nanny=True,
                on_error="return",
            )
        except Exception as exc:
            self._d().last_error = f"could not kill worker {worker.id} through its nanny: {exc}"
            log.warning("dspool: %s", self._d().last_error)
        if self.poll_now is not None:
            self.poll_now.set()

    # -- calls
    def _settle_unsent(self, worker: DaskWorker, call: Call, error: BaseException) -> None:
        d = self._d()
        with d.lock:
            if d.release(worker, call.id) is None:
                return
            d.fail(call, error, worker)
            d.after_release(worker)

    async def _await_call(self, call: Call, worker: DaskWorker, dask_future: Any) -> None:
        d = self._d()
        try:
            reply = await dask_future
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            with d.lock:
                if self._current(call, worker, dask_future):
                    self._on_task_error(call, worker, exc)
            return
        with d.lock:
            if self._current(call, worker, dask_future):
                self._on_reply(call, worker, reply)

    @staticmethod
    def _current(call: Call, worker: DaskWorker, dask_future: Any) -> bool:
        task = call.handle
        return (
            isinstance(task, DaskTask)
            and task.future is dask_future
            and worker.inflight.get(call.id) is call
        )

    def _on_task_error(self, call: Call, worker: DaskWorker, exc: BaseException) -> None:
        from distributed.scheduler import KilledWorker

        d = self._d()
        if isinstance(exc, (KilledWorker, concurrent.futures.CancelledError)):
            self._lost(worker)  # fails the call with WorkerCrashed
            return
        # Dask itself failed the task (e.g. the worker could not unpickle it).
        d.release(worker, call.id)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = ProgramError(
            call.program, worker.id, type(exc).__name__, str(exc), text, exc, phase="load"
        )
        d.fail(call, error, worker)
        d.after_release(worker)

    def _on_reply(self, call: Call, worker: DaskWorker, reply: tuple[Any, ...]) -> None:
        d = self._d()
        kind = reply[0]
        if kind == _MISROUTED:
            # A new process answers at this address: the one the call was sent to is gone.
            self._lost(worker)
            return
        task = call.handle
        assert isinstance(task, DaskTask)
        task.future = None
        if kind == _NEED_SPEC and not task.retried and not call.future.done():
            blob = call.blob
            d.release(worker, call.id)
            worker.known.discard(call.program_id)  # evicted there: send the spec again
            task.retried = True
            call.blob = blob
            worker.queue.appendleft(call)
            d.feed(worker)
            return
        if task.sent_spec:
            worker.known.add(call.program_id)
        d.release(worker, call.id)
        if kind == _RESULT:
            d.settle_value(worker, call, reply[3], reply[1], reply[2], reply[4])
        elif kind == _ERROR:
            d.settle_error(worker, call, reply[1], reply[4], reply[2], reply[3], reply[5])
        else:
            d.fail(call, ProgramNotFound(call.program, call.session), worker)
            d.after_release(worker)

    def _cancel_dask(self, futures: list[Any]) -> None:
        if futures and self.client is not None:
            self._spawn(self._cancel_dask_async(futures))

    async def _cancel_dask_async(self, futures: list[Any]) -> None:
        try:
            await asyncio.wait_for(self.client.cancel(futures, force=True), CLOSE_TIMEOUT)
        except Exception:
            log.debug("dspool: cancelling Dask tasks failed", exc_info=True)

    async def _interrupt(
        self, worker: DaskWorker, key: str, patience: float = 0.0, future: Any = None
    ) -> bool:
        """Interrupt call ``key`` on ``worker``; True if it may still run afterwards.

        A task the pool counts as running may not have reached its program yet, or even
        its worker (Dask queues it on the worker's thread; the worker may not have
        received it); while its ``future`` is pending, the interrupt is tried again
        until it lands, or ``patience`` seconds (at least one try) have passed.
        """
        deadline = time.monotonic() + patience
        while True:
            try:
                answers = await asyncio.wait_for(
                    self.client.run(
                        _interrupt_call, key, workers=[worker.address], on_error="return"
                    ),
                    max(0.0, deadline - time.monotonic()) + INTERRUPT_REACH,
                )
            except Exception:
                log.debug("dspool: interrupting %s failed", key, exc_info=True)
                return False  # the worker is gone (or unreachable): nothing runs there
            answer = answers.get(worker.address)
            on_its_way = future is not None and future.status == "pending"
            if answer not in (_INTERRUPT_SENT, _INTERRUPT_PENDING) and not on_its_way:
                return False
            if time.monotonic() >= deadline:
                return True
            await asyncio.sleep(0.1)

    # -- shutdown
    async def _shutdown(self) -> None:
        d = self._d()
        unwanted: list[Any] = []  # Dask futures to cancel at once
        running: list[tuple[DaskWorker, DaskTask]] = []
        with d.lock:
            d.stopped = True
            for worker in list(d.workers.values()):
                assert isinstance(worker, DaskWorker)
                being_killed = worker.state in ("stopping", "dead")
                for call in worker.inflight.values():
                    task = call.handle
                    if isinstance(task, DaskTask) and task.future is not None:
                        if being_killed:  # its process goes: no thread to stop
                            unwanted.append(task.future)
                        else:
                            running.append((worker, task))
                if worker.hello is not None:
                    unwanted.append(worker.hello)
                    worker.hello = None
            d.end_shutdown()
        for pending in list(self.tasks):
            pending.cancel()
        if unwanted:
            await self._cancel_dask_async(unwanted)
        if running:
            await self._stop_running(running)
        await self._disconnect()

    async def _stop_running(self, running: list[tuple[DaskWorker, DaskTask]]) -> None:
        """Stop the pool's calls on the cluster: Dask's cancel never stops a running
        thread, so each is interrupted, and a worker whose call still runs after
        CLOSE_GRACE is killed through its nanny."""
        still = await asyncio.gather(
            *(self._interrupt(w, task.key, CLOSE_GRACE, task.future) for w, task in running)
        )
        # Those not started yet never will (a started one ignores this).
        await self._cancel_dask_async([task.future for _, task in running])
        stuck = {id(w): w for (w, _), alive in zip(running, still, strict=True) if alive}
        for worker in stuck.values():
            if worker.nanny is not None and worker.pid is not None:
                await self._kill_through_nanny(worker)
            else:
                log.warning(
                    "dspool: a call still runs on %s after close, which has no nanny",
                    worker.address,
                )

    async def _disconnect(self) -> None:
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
