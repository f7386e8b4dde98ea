"""The dispatcher: which call runs where, and what becomes of it. Written once.

Both backends (:mod:`~dspool_jupyter.local_backend`, :mod:`~dspool_jupyter.dask_backend`)
drive this one dispatcher; they own processes and transport, it owns the policy:

- a global queue, and per worker a queue for what must run there (its set-ups, which
  run before anything else, and the calls of the sessions homed on it);
- **free slots per worker**: a worker runs up to ``slots`` calls at once (the pool's
  ``concurrency``); anonymous calls go to the ready worker with the most free slots
  (a backend may let one more wait behind full slots: local pipelining);
- sessions: a session's calls run in order, one at a time, on its home worker (the
  first that served it), and move to a live worker when it dies;
- settling replies (value, error), failures and counters, the recent failures;
- a lost worker: calls it may have started fail with ``WorkerCrashed`` (once the
  backend knows the exit status), calls it never started go back to the queue;
- timeouts and cancels through the :class:`~dspool_jupyter.supervisor.Supervisor`: at
  one slot the worker is killed; with several, the call is interrupted and, if it does
  not stop within the grace, the worker is *retired* (no new calls, replaced at once,
  killed when only stuck calls are left);
- shutdown (every pending call ends in ``PoolClosed``), status snapshots, readiness.

**Threading rule.** Every piece of dispatcher state is read and written with
``self.lock`` held. The backend's loop thread holds it in each of its callbacks. A
caller's thread takes it in exactly two places: :meth:`submit`'s hand-off of a call to a
worker with a free slot (only when the backend can send from any thread; the caller
guards it against ``KeyboardInterrupt``, see :mod:`~dspool_jupyter.calls`), and the
read-only :meth:`status` / :meth:`wait_ready`. Everything else a caller wants goes
through the inbox (:meth:`post`), which the loop drains. After shutdown began, posting
fails the posted call at once, so no future is left pending.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import shm
from .calls import Call, CallFuture, reject, resolve
from .errors import (
    CallCancelled,
    CallTimeout,
    DspoolError,
    PoolClosed,
    PoolStartTimeout,
    ProgramError,
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
from .status import FailedCall, PoolStatus, WorkerStatus
from .supervisor import Supervisor

if TYPE_CHECKING:
    from .backend import Backend, WorkerSlot
    from .store import ProgramStore

__all__ = [
    "CANCEL_GRACE",
    "RECENT_FAILURES",
    "Cancel",
    "Close",
    "Dispatcher",
    "EndSession",
    "RemoveSetup",
    "RestartAll",
    "RestartWorker",
    "Setup",
]

log = logging.getLogger(__name__)

CANCEL_GRACE = 2.0  # seconds a call gets to stop after an interrupt before it is stuck
RECENT_FAILURES = 50  # failed calls kept for status()


# ------------------------------------------------------------------- commands
@dataclass(slots=True)
class Cancel:
    call: Call


@dataclass(slots=True)
class RestartWorker:
    worker_id: str


@dataclass(slots=True)
class RestartAll:
    pass


@dataclass(slots=True)
class EndSession:
    session: str


@dataclass(slots=True)
class Setup:
    key: str
    spec: tuple[str, str, bytes]  # program id, name, pickled (args, kwargs)
    applied: concurrent.futures.Future[list[CallFuture]]


@dataclass(slots=True)
class RemoveSetup:
    key: str


@dataclass(slots=True)
class Close:
    pass


Command = Call | Cancel | RestartWorker | RestartAll | EndSession | Setup | RemoveSetup | Close


class Dispatcher:
    """The pool's state and policy (see the module docstring)."""

    def __init__(
        self,
        *,
        target: int,
        concurrency: int,
        store: ProgramStore,
        bus: EventBus,
        token: str,
        cancel_grace: float = CANCEL_GRACE,
        memory_limit: int | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.ready_cond = threading.Condition(self.lock)
        self.target = target
        self.concurrency = concurrency
        self.store = store
        self.bus = bus
        self.token = token
        self.cancel_grace = cancel_grace
        self.memory_limit = memory_limit  # bytes per worker (named in WorkerCrashed)
        self.supervisor = Supervisor(self.lock)
        self.backend: Backend | None = None
        self.ids = itertools.count(1)
        self.inbox: collections.deque[Command] = collections.deque()
        self.stopped = False  # shutdown began: nothing posted from now on is served
        self.closed = False  # shutdown finished
        self.workers: dict[str, WorkerSlot] = {}
        self.queue: collections.deque[Call] = collections.deque()
        self.homes: dict[str, WorkerSlot] = {}
        self.busy_sessions: set[str] = set()
        self.setups: dict[str, tuple[str, str, bytes]] = {}
        self.setup_session = f"_pool.{token}"
        self.ready_count = 0
        self.announced = False  # every worker was ready since the (re)start
        self.start_failed = False
        self.started_at = time.time()
        self.start_mono = time.monotonic()
        self.startup_seconds: float | None = None
        self.done = 0
        self.failed = 0
        self.cancelled = 0
        self.replaced = 0
        self.last_error: str | None = None
        self.failures: collections.deque[FailedCall] = collections.deque(maxlen=RECENT_FAILURES)

    # ------------------------------------------------------------ caller side
    def new_call(
        self,
        future: CallFuture,
        program_id: str,
        session: str | None,
        blob: bytes,
        timeout: float | None,
        setup: bool = False,
    ) -> Call:
        call = Call(
            next(self.ids),
            future.program,
            program_id,
            session,
            blob,
            future,
            timeout,
            setup=setup,
            on_cancel=self.cancel_soon,
        )
        future._call = call
        return call

    def submit(self, call: Call) -> None:
        """Hand ``call`` to a worker with a free slot from this thread, or post it."""
        backend = self.backend
        if backend is not None and backend.direct_send and not self.inbox and self.has_free_slot():
            # One thread hop less than the inbox. With commands still in the inbox the
            # call goes behind them, so one thread's calls keep their order.
            with self.lock:
                if self.stopped:
                    self.end_unserved(call)
                else:
                    self.enqueue(call)
                return
        self.post(call)

    def post(self, command: Command) -> None:
        """Queue ``command`` for the loop thread (any thread)."""
        self.inbox.append(command)
        if self.stopped:
            # Shutdown began, so the loop may never read it: end it here. (Either the
            # loop's final drain or this one sees it: ``stopped`` is set before that drain.)
            self.drain_unserved()
            return
        backend = self.backend
        if backend is not None:
            backend.wake()

    def cancel_soon(self, call: Call) -> None:
        """The caller cancelled ``call``'s future: interrupt it if it runs (any thread)."""
        self.post(Cancel(call))

    def has_free_slot(self) -> bool:
        """A hint (read without the lock): some ready worker has a free slot."""
        for worker in list(self.workers.values()):
            if worker.usable and len(worker.inflight) < worker.slots:
                return True
        return False

    # ---------------------------------------------------------- loop side
    def drain(self) -> None:
        """Serve the inbox (loop thread, lock held)."""
        inbox = self.inbox
        while inbox and not self.stopped:
            command = inbox.popleft()
            try:
                if isinstance(command, Call):
                    self.enqueue(command)
                else:
                    self.handle(command)
            except Exception:
                log.exception("dspool pool failed on %r", type(command).__name__)

    def handle(self, command: Command) -> None:
        backend = self.backend
        assert backend is not None
        if isinstance(command, Cancel):
            self.cancel(command.call)
        elif isinstance(command, RestartWorker):
            worker = self.workers.get(command.worker_id)
            if worker is not None and worker.state != "dead":
                backend.kill(worker, "restart")
        elif isinstance(command, RestartAll):
            self.announced = False
            self.start_failed = False
            self.start_mono = time.monotonic()
            self.started_at = time.time()
            self.startup_seconds = None
            backend.restart_all()
        elif isinstance(command, EndSession):
            self.homes.pop(command.session, None)
        elif isinstance(command, Setup):
            self.setups[command.key] = command.spec
            futures = []
            for worker in list(self.workers.values()):
                if worker.usable:
                    call = self.setup_call(command.spec)
                    futures.append(call.future)
                    worker.queue.appendleft(call)
                    self.feed(worker)
            command.applied.set_result(futures)
        elif isinstance(command, RemoveSetup):
            self.setups.pop(command.key, None)
        elif isinstance(command, Close):
            self.begin_shutdown()

    def setup_call(self, spec: tuple[str, str, bytes]) -> Call:
        program_id, name, blob = spec
        return self.new_call(CallFuture(name), program_id, None, blob, None, setup=True)

    # -- where calls go
    def enqueue(self, call: Call) -> None:
        if call.future.done():
            return
        session = call.session
        if session is not None:
            home = self.homes.get(session)
            if home is not None and home.state != "dead":
                home.queue.append(call)
                self.feed(home)
                return
        worker = self.pick()
        if worker is None:
            self.queue.append(call)
            return
        if session is not None:
            if session in self.busy_sessions:
                self.queue.append(call)
                return
            self.homes[session] = worker
        self.start(worker, call)

    def pick(self) -> WorkerSlot | None:
        """The ready worker with the most free slots; else one that may pipeline."""
        best = None
        best_free = 0
        for worker in self.workers.values():
            if not worker.usable or worker.setups_running or worker.queue:
                continue
            free = worker.slots - len(worker.inflight)
            if free > best_free:
                best, best_free = worker, free
        if best is not None:
            return best
        backend = self.backend
        assert backend is not None
        for worker in self.workers.values():
            if (
                worker.usable
                and not worker.queue
                and not worker.setups_running
                and backend.may_pipeline(worker)
            ):
                if best is None or len(worker.inflight) < len(best.inflight):
                    best = worker
        return best

    def has_room(self, worker: WorkerSlot) -> bool:
        if not worker.usable:
            return False
        if len(worker.inflight) < worker.slots:
            return True
        backend = self.backend
        assert backend is not None
        return backend.may_pipeline(worker)

    def next_call(self, worker: WorkerSlot) -> Call | None:
        """What ``worker`` runs next: its set-ups, its sessions' calls, then the queue."""
        queue = worker.queue
        while queue and queue[0].setup:
            call = queue.popleft()
            if not call.future.done():
                return call
        if worker.setups_running:
            return None  # set-ups finish before anything else starts
        if queue:
            busy = self.busy_sessions
            for index, call in enumerate(queue):
                if call.future.done() or call.session not in busy:
                    del queue[index]
                    if call.future.done():
                        return self.next_call(worker)
                    return call
        shared = self.queue
        while shared:
            call = shared.popleft()
            if call.future.done():
                continue
            session = call.session
            if session is not None:
                home = self.homes.get(session)
                if home is None or home.state == "dead":
                    self.homes[session] = worker
                elif home is not worker:
                    home.queue.append(call)
                    self.feed(home)
                    continue
                if session in self.busy_sessions:
                    queue.append(call)
                    continue
            return call
        return None

    def feed(self, worker: WorkerSlot) -> None:
        """``worker`` may have room: start its next calls, then note idle or busy."""
        while self.has_room(worker):
            call = self.next_call(worker)
            if call is None:
                break
            self.start(worker, call)
        if worker.state in ("idle", "busy"):
            worker.state = "busy" if worker.inflight else "idle"

    def feed_all(self) -> None:
        for worker in list(self.workers.values()):
            if not self.queue:
                return
            self.feed(worker)

    def start(self, worker: WorkerSlot, call: Call) -> None:
        backend = self.backend
        assert backend is not None
        call.slot = worker
        worker.inflight[call.id] = call
        worker.state = "busy"
        if call.session is not None:
            self.busy_sessions.add(call.session)
        if call.setup:
            worker.setups_running += 1
        if not backend.send(worker, call):
            # It never reached the worker, which is going (the backend reports it lost):
            # run the call elsewhere, and give that worker nothing more.
            self.unstart(worker, call)
            if worker.state in ("idle", "busy"):
                worker.state = "stopping"
            self.queue.appendleft(call)
            return
        if len(worker.inflight) <= worker.slots:
            self.running(call)

    def unstart(self, worker: WorkerSlot, call: Call) -> None:
        worker.inflight.pop(call.id, None)
        if call.session is not None:
            self.busy_sessions.discard(call.session)
        if call.setup:
            worker.setups_running -= 1
        call.slot = None
        call.started = 0.0
        call.acked = False
        call.future.worker_id = None
        self.supervisor.drop(call.deadline)
        call.deadline = None

    def running(self, call: Call) -> None:
        """``call`` now runs on its worker: its timeout starts."""
        worker = call.slot
        assert worker is not None
        call.started = time.monotonic()
        call.future.worker_id = worker.id
        if call.timeout is not None:
            call.deadline = self.supervisor.at(
                call.started + call.timeout, lambda: self.on_timeout(call)
            )
        if self.bus.active:
            self.emit(
                CallStarted(
                    call_id=call.id, program=call.program, worker_id=worker.id, session=call.session
                )
            )
        if call.future.cancelled():
            self.interrupt(call)  # cancelled while it waited to be sent

    def emit(self, event: Any) -> None:
        """Emit on the loop thread, as subscribers are promised, from any thread."""
        backend = self.backend
        if backend is None or backend.on_loop_thread():
            self.bus.emit(event)
        else:
            backend.call_soon(lambda: self.bus.emit(event))

    # -- replies
    def release(self, worker: WorkerSlot, call_id: int) -> Call | None:
        """Take call ``call_id`` off ``worker`` (its reply came); None if it is not there."""
        call = worker.inflight.pop(call_id, None)
        if call is None:
            return None  # a late reply to a call the worker no longer runs: never hand it on
        self.supervisor.drop(call.deadline)
        self.supervisor.drop(call.grace)
        call.deadline = call.grace = None
        call.blob = b""
        if call.session is not None:
            self.busy_sessions.discard(call.session)
        if call.setup:
            worker.setups_running -= 1
        if len(worker.inflight) >= worker.slots:
            for waiting in worker.inflight.values():
                if not waiting.started:
                    self.running(waiting)  # it waited behind the call that ended
                    break
        return call

    def settle_value(
        self,
        worker: WorkerSlot,
        call: Call,
        blob: bytes,
        stdout: str,
        stderr: str,
        usage: dict[str, Any] | None = None,
        attached: tuple[tuple[int, int], ...] = (),
    ) -> None:
        """``call`` returned the pickled value ``blob`` on ``worker`` (``usage``: its LM use;
        ``attached``: the shared segments attached to its reply, see :mod:`~dspool_jupyter.shm`)."""
        future = call.future
        future.stdout, future.stderr, future.usage = stdout, stderr, usage
        try:
            value = (
                shm.loads(blob, attached, writable=True) if attached else cloudpickle.loads(blob)
            )
        except Exception as exc:
            self.fail(call, unloadable_result(call.program, worker.id, exc), worker)
        else:
            future._call = None
            # Worker set-ups are the pool's own calls: not in the counts.
            if resolve(future, value) and not call.setup:
                worker.done += 1
                self.done += 1
                if self.bus.active:
                    self.bus.emit(
                        CallFinished(
                            call_id=call.id,
                            program=call.program,
                            worker_id=worker.id,
                            seconds=time.monotonic() - call.started,
                        )
                    )
        self.after_release(worker)

    def settle_error(
        self,
        worker: WorkerSlot,
        call: Call,
        info: dict[str, Any],
        blob: bytes,
        stdout: str,
        stderr: str,
        usage: dict[str, Any] | None = None,
    ) -> None:
        """``call`` ended in the error the worker described (``info``, pickled ``blob``)."""
        call.future.stdout, call.future.stderr, call.future.usage = stdout, stderr, usage
        error = error_from_reply(call.program, call.session, worker.id, info, blob)
        if isinstance(error, CallCancelled) and not call.interrupted:
            error = ProgramError(
                call.program,
                worker.id,
                info.get("type", "KeyboardInterrupt"),
                info.get("message", ""),
                info.get("traceback", ""),
                None,
                phase="run",
            )
        self.fail(call, error, worker)
        self.after_release(worker)

    def after_release(self, worker: WorkerSlot) -> None:
        if worker.retiring:
            self.finish_retiring(worker)
        else:
            self.feed(worker)
            if self.queue and worker.inflight:
                self.feed_all()

    def fail(self, call: Call, error: BaseException, worker: WorkerSlot | None = None) -> None:
        """End ``call`` with ``error`` (unless it already ended) and record it."""
        call.blob = b""
        future = call.future
        future._call = None
        if not reject(future, error):
            return
        if worker is not None:
            worker.errors += 1
        self.failed += 1
        failure = FailedCall.of(call.id, call.program, worker.id if worker else None, error)
        self.failures.append(failure)
        if self.bus.active:
            self.emit(CallFailed.from_failure(failure))

    def end_unserved(self, call: Call) -> None:
        self.fail(call, PoolClosed("the pool was closed before the call ran"))

    def drain_unserved(self) -> None:
        """End every posted command that no loop will serve (after shutdown began)."""
        with self.lock:
            inbox = self.inbox
            while inbox:
                command = inbox.popleft()
                if isinstance(command, Call):
                    self.end_unserved(command)
                elif isinstance(command, Setup) and not command.applied.done():
                    command.applied.set_result([])

    # -- cancel, timeouts, stuck calls
    def cancel(self, call: Call) -> None:
        """The caller cancelled ``call``: count it, and interrupt it if it runs."""
        self.cancelled += 1
        worker = call.slot
        if worker is not None and worker.inflight.get(call.id) is call:
            worker.cancelled += 1
            self.interrupt(call)

    def interrupt(self, call: Call) -> None:
        worker = call.slot
        if worker is None or worker.inflight.get(call.id) is not call or not call.started:
            return  # still waiting: it is skipped, or interrupted when it starts
        if call.interrupted:
            return
        call.interrupted = True
        backend = self.backend
        assert backend is not None
        backend.interrupt(worker, call)
        call.grace = self.supervisor.at(
            time.monotonic() + self.cancel_grace, lambda: self.overdue(call)
        )

    def on_timeout(self, call: Call) -> None:
        call.deadline = None
        worker = call.slot
        if worker is None or worker.inflight.get(call.id) is not call:
            return
        self.fail(call, CallTimeout(call.program, worker.id, call.timeout or 0), worker)
        backend = self.backend
        assert backend is not None
        if worker.slots == 1:
            backend.kill(worker, "timeout")
        else:
            self.interrupt(call)

    def overdue(self, call: Call) -> None:
        """An interrupted call did not stop within the grace."""
        call.grace = None
        worker = call.slot
        if worker is None or worker.inflight.get(call.id) is not call:
            return
        backend = self.backend
        assert backend is not None
        if worker.slots == 1:
            backend.kill(worker, "cancel" if call.future.cancelled() else "timeout")
        else:
            self.retire(worker)

    def retire(self, worker: WorkerSlot) -> None:
        """Stop giving ``worker`` calls, replace it now, kill it once only stuck calls are left."""
        if worker.retiring or worker.state == "dead":
            return
        worker.retiring = True
        if worker.ready:
            self.set_ready_count(self.ready_count - 1)
        for session, home in list(self.homes.items()):
            if home is worker:
                del self.homes[session]
        waiting = [c for c in worker.queue if not c.setup]
        worker.queue.clear()
        self.queue.extendleft(reversed(waiting))
        backend = self.backend
        assert backend is not None
        backend.replace(worker)
        self.finish_retiring(worker)
        self.feed_all()

    def finish_retiring(self, worker: WorkerSlot) -> None:
        if worker.state == "dead":
            return
        if all(call.future.done() for call in worker.inflight.values()):
            backend = self.backend
            assert backend is not None
            backend.kill(worker, "stuck")

    # -- workers coming and going
    def add_worker(self, worker: WorkerSlot, replacing: str | None = None) -> None:
        self.workers[worker.id] = worker
        if replacing is not None:
            self.replaced += 1
            if self.bus.active:
                self.emit(WorkerReplaced(old_worker_id=replacing, new_worker_id=worker.id))
        if self.bus.active:
            self.emit(
                WorkerStarting(worker_id=worker.id, ready=self.ready_count, target=self.target)
            )

    def set_ready_count(self, count: int) -> None:
        self.ready_count = count
        self.ready_cond.notify_all()

    def worker_ready(self, worker: WorkerSlot, pid: int) -> None:
        if worker.state != "starting":
            return
        worker.pid = pid
        worker.state = "idle"
        worker.ready = True
        worker.last_heartbeat = time.time()
        self.set_ready_count(self.ready_count + 1)
        if self.bus.active:
            self.emit(
                WorkerReady(
                    worker_id=worker.id,
                    pid=pid,
                    ready=self.ready_count,
                    target=self.target,
                    startup_seconds=time.monotonic() - worker.start_mono,
                )
            )
        if self.ready_count >= self.target and not self.announced:
            self.announced = True
            self.startup_seconds = time.monotonic() - self.start_mono
            if self.bus.active:
                self.emit(PoolReady(target=self.target, startup_seconds=self.startup_seconds))
        # Worker set-ups (e.g. the LM configuration) run before anything else it serves.
        setups = [self.setup_call(spec) for spec in self.setups.values()]
        worker.queue.extendleft(reversed(setups))
        self.feed(worker)

    def worker_lost(self, worker: WorkerSlot) -> None:
        """``worker`` is gone: requeue what it never started, keep the rest for reporting.

        The backend then replaces it, and calls :meth:`report_lost` once it knows the
        exit status (or waited long enough).
        """
        if worker.state == "dead":
            return
        was_serving = worker.ready and not worker.retiring
        if not worker.ready and not self.stopped and worker.kill_reason is None:
            self.start_failed = True
        worker.state = "dead"
        worker.ready = False
        self.workers.pop(worker.id, None)
        if was_serving:
            self.set_ready_count(self.ready_count - 1)
        if worker.kill_reason is None and self.stopped:
            worker.kill_reason = "close"  # stopped with the pool, not dead
        requeue = []
        for call in list(worker.inflight.values()):
            self.supervisor.drop(call.deadline)
            self.supervisor.drop(call.grace)
            call.deadline = call.grace = None
            if call.session is not None:
                self.busy_sessions.discard(call.session)
            if call.future.done():
                continue
            if not call.acked and not self.stopped and not call.setup:
                # It never reached the program: run it elsewhere (not a rerun).
                call.slot = None
                call.started = 0.0
                call.future.worker_id = None
                requeue.append(call)
            else:
                worker.lost_calls.append(call)
        worker.inflight.clear()
        worker.setups_running = 0
        for session, home in list(self.homes.items()):
            if home is worker:
                del self.homes[session]
        for call in worker.queue:
            if call.setup:
                resolve(call.future, None)  # its worker is gone; new ones run set-ups first
            else:
                requeue.append(call)
        worker.queue.clear()
        self.queue.extendleft(reversed(requeue))
        if not self.stopped:
            self.feed_all()

    def report_lost(self, worker: WorkerSlot) -> None:
        """Fail the calls ``worker`` may have started, and tell the world it died."""
        reason = worker.kill_reason or "crashed"
        calls, worker.lost_calls = worker.lost_calls, []
        program = calls[0].program if calls else None
        for call in calls:
            if self.stopped:
                error: BaseException = PoolClosed("the pool was closed while the call ran")
            else:
                error = WorkerCrashed(
                    call.program, worker.id, worker.pid, worker.returncode, self.memory_limit
                )
            self.fail(call, error, worker)
        if self.bus.active:
            self.emit(
                WorkerDied(
                    worker_id=worker.id,
                    pid=worker.pid,
                    reason=reason,
                    returncode=worker.returncode,
                    program=program,
                )
            )

    # -- shutdown
    def begin_shutdown(self) -> None:
        """Stop serving; everything not yet on a worker ends in PoolClosed (lock held)."""
        self.stopped = True
        self.drain_unserved()
        error = PoolClosed("the pool was closed before the call ran")
        while self.queue:
            self.fail(self.queue.popleft(), error)
        for worker in list(self.workers.values()):
            while worker.queue:
                call = worker.queue.popleft()
                if call.setup:
                    resolve(call.future, None)
                else:
                    self.fail(call, error)

    def end_shutdown(self) -> None:
        """The backend stopped its workers: end what ran on them (lock held)."""
        self.drain_unserved()
        for worker in list(self.workers.values()):
            self.worker_lost(worker)
            self.report_lost(worker)
        try:
            self.store.clear_session(self.setup_session)
        except DspoolError:
            log.warning("dspool: could not remove this pool's set-ups from the store")
        self.set_ready_count(0)
        self.closed = True
        if self.bus.active:
            self.emit(PoolClosedEvent())

    def fail_everything(self, error: BaseException) -> None:
        """The loop died: end every future it held (any thread)."""
        with self.lock:
            self.stopped = True
            calls: list[Call] = list(self.queue)
            for worker in list(self.workers.values()):
                calls.extend(worker.queue)
                calls.extend(worker.inflight.values())
                calls.extend(worker.lost_calls)
            for command in list(self.inbox):
                if isinstance(command, Call):
                    calls.append(command)
                elif isinstance(command, Setup) and not command.applied.done():
                    command.applied.set_result([])
            self.inbox.clear()
            for call in calls:
                reject(call.future, error)
            self.set_ready_count(0)
            self.closed = True

    # -- what callers read
    def wait_ready(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.ready_cond:
            while self.ready_count < self.target:
                if self.stopped:
                    raise PoolClosed()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolStartTimeout(
                        self.ready_count, self.target, timeout or 0, self.last_error
                    )
                self.ready_cond.wait(0.1 if remaining is None else min(remaining, 0.1))

    def status(self, closing: bool = False) -> PoolStatus:
        """A snapshot (any thread). From the moment closing starts: 'closed', no workers."""
        with self.lock:
            closing = closing or self.stopped
            workers = (
                ()
                if closing
                else tuple(
                    WorkerStatus(
                        id=w.id,
                        pid=w.pid,
                        state="stopping" if w.retiring else w.state,
                        calls=w.done + w.errors + w.cancelled,
                        errors=w.errors,
                        rss_bytes=w.rss,
                        last_heartbeat=w.last_heartbeat,
                        started_at=w.started_at,
                        program=w.running_program(),
                        done=w.done,
                        cancelled=w.cancelled,
                        active=sum(1 for c in w.inflight.values() if c.started and not c.setup),
                        slots=w.slots,
                    )
                    for w in self.workers.values()
                    if w.state != "dead"
                )
            )
            if closing:
                state = "closed"
            elif self.ready_count >= self.target:
                state = "healthy"
            elif not self.announced and not self.start_failed:
                state = "starting"
            else:
                state = "degraded"
            # Posts append to the inbox without the lock: copy it in one C step first.
            queued = len(self.queue) + sum(
                1 for c in tuple(self.inbox) if isinstance(c, Call) and not c.future.done()
            )
            queued += sum(len(w.queue) for w in self.workers.values())
            return PoolStatus(
                state=state,
                target=self.target,
                ready_count=self.ready_count,
                workers=workers,
                queued=queued,
                running=sum(w.active for w in workers),
                calls=self.done + self.failed + self.cancelled,
                failed=self.failed,
                replaced=self.replaced,
                started_at=self.started_at,
                startup_seconds=self.startup_seconds,
                last_error=self.last_error,
                recent_failures=tuple(self.failures),
                done=self.done,
                cancelled=self.cancelled,
                slots=sum(w.slots for w in self.workers.values() if w.usable),
            )
