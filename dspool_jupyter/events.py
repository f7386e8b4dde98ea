"""The pool's one typed event stream.

The widget, the lab status item, logging and the tests all read this stream (and the
snapshots in :mod:`dspool_jupyter.status`); nothing else reaches into the pool.

Subscribe with ``unsubscribe = pool.subscribe(callback)``. Callbacks run on the pool's
dispatcher thread, in event order: they must be quick and must not block (mark a view
dirty, put the event on a queue). An exception in a callback is logged and ignored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .status import FailedCall

__all__ = [
    "CallFailed",
    "CallFinished",
    "CallStarted",
    "Event",
    "EventBus",
    "PoolClosedEvent",
    "PoolReady",
    "ProgramDefined",
    "ProgramDeleted",
    "WorkerDied",
    "WorkerReady",
    "WorkerReplaced",
    "WorkerStarting",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Event:
    """Base of all events; ``time`` is wall-clock seconds since the epoch.

    Events are shared by every subscriber: treat them as read-only. (They are slotted,
    not frozen: a frozen dataclass costs more than twice as much to build, and the pool
    builds two per call while anyone listens.)
    """

    kind: ClassVar[str] = "event"
    time: float = field(default_factory=time.time, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the event's ``kind``."""
        return {"kind": self.kind, **asdict(self)}


@dataclass(slots=True)
class WorkerStarting(Event):
    """A worker process was asked for (pool start, replacement or restart)."""

    kind: ClassVar[str] = "worker_starting"
    worker_id: str
    ready: int
    target: int


@dataclass(slots=True)
class WorkerReady(Event):
    """A worker said hello and takes calls; ``ready``/``target`` is start-up progress."""

    kind: ClassVar[str] = "worker_ready"
    worker_id: str
    pid: int
    ready: int
    target: int
    startup_seconds: float


@dataclass(slots=True)
class WorkerDied(Event):
    """A worker process is gone.

    ``reason`` is 'crashed', 'timeout', 'restart', 'cancel' or 'close' (stopped with its
    pool).
    """

    kind: ClassVar[str] = "worker_died"
    worker_id: str
    pid: int | None
    reason: str
    returncode: int | None
    program: str | None


@dataclass(slots=True)
class WorkerReplaced(Event):
    """A dead worker's place went to a new worker (which then starts)."""

    kind: ClassVar[str] = "worker_replaced"
    old_worker_id: str
    new_worker_id: str


@dataclass(slots=True)
class PoolReady(Event):
    """Every worker of the pool's target size is ready (emitted once per start)."""

    kind: ClassVar[str] = "pool_ready"
    target: int
    startup_seconds: float


@dataclass(slots=True)
class PoolClosedEvent(Event):
    kind: ClassVar[str] = "pool_closed"


@dataclass(slots=True)
class CallStarted(Event):
    kind: ClassVar[str] = "call_started"
    call_id: int
    program: str
    worker_id: str
    session: str | None


@dataclass(slots=True)
class CallFinished(Event):
    kind: ClassVar[str] = "call_finished"
    call_id: int
    program: str
    worker_id: str
    seconds: float


@dataclass(slots=True)
class CallFailed(Event):
    """A call ended in an error; ``error`` is the class name, ``message`` its text."""

    kind: ClassVar[str] = "call_failed"
    call_id: int
    program: str
    worker_id: str | None
    error: str
    message: str
    traceback: str

    @classmethod
    def from_failure(cls, failure: FailedCall) -> CallFailed:
        return cls(
            call_id=failure.call_id,
            program=failure.program,
            worker_id=failure.worker_id,
            error=failure.error,
            message=failure.message,
            traceback=failure.traceback,
        )


@dataclass(slots=True)
class ProgramDefined(Event):
    kind: ClassVar[str] = "program_defined"
    name: str
    program_id: str
    session: str | None


@dataclass(slots=True)
class ProgramDeleted(Event):
    kind: ClassVar[str] = "program_deleted"
    name: str
    session: str | None


Subscriber = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers; cheap when nobody listens."""

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """True when someone listens (emitters skip building events otherwise)."""
        return bool(self._subscribers)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add ``callback``; returns a function that removes it again."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    def emit(self, event: Event) -> None:
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("dspool event subscriber %r failed on %s", callback, event.kind)
