"""Plain, immutable snapshots of a pool: what the widget, the lab item and tests render.

``pool.status()`` returns a :class:`PoolStatus`; ``to_dict()`` gives the JSON form the
lab extension receives over the comm. Times are wall-clock seconds since the epoch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["FailedCall", "PoolStatus", "WorkerStatus"]


@dataclass(frozen=True)
class WorkerStatus:
    """One worker: ``state`` is 'starting', 'idle' or 'busy'.

    The words mean the same everywhere (pool headline, worker rows, widget, lab panel):
    ``calls`` every call that ended on this worker, ``done`` those that returned a value,
    ``errors`` those that ended in an error (the program raised, the worker crashed, the
    call timed out), ``cancelled`` those cancelled while they ran. ``active`` is how many
    calls run on it now, out of ``slots`` (the pool's ``concurrency``); worker set-ups
    are the pool's own work and count in none of these (the state says 'busy').
    """

    id: str
    pid: int | None
    state: str
    calls: int
    errors: int
    rss_bytes: int | None
    last_heartbeat: float | None
    started_at: float
    program: str | None
    done: int = 0
    cancelled: int = 0
    active: int = 0
    slots: int = 1


@dataclass(frozen=True)
class FailedCall:
    """A recent failed call: the error's class name, its one-line message and traceback."""

    call_id: int
    program: str
    worker_id: str | None
    error: str
    message: str
    traceback: str
    time: float

    @classmethod
    def of(
        cls, call_id: int, program: str, worker_id: str | None, error: BaseException
    ) -> FailedCall:
        """The record of ``error`` ending a call (the worker's traceback if it has one)."""
        return cls(
            call_id=call_id,
            program=program,
            worker_id=worker_id,
            error=type(error).__name__,
            message=str(error),
            traceback=str(getattr(error, "remote_traceback", "") or ""),
            time=time.time(),
        )


@dataclass(frozen=True)
class PoolStatus:
    """The pool at one moment.

    ``state`` is 'starting' (fewer than ``target`` workers ready and none has been ready
    since the start), 'healthy' (all ready), 'degraded' (some place is being refilled) or
    'closed'. ``ready`` is True when all ``target`` workers are ready.

    Counts (the same words as :class:`WorkerStatus`): ``calls`` every call that ended,
    ``done`` with a value, ``failed`` with an error, ``cancelled`` by the caller;
    ``queued`` calls waiting for a worker, ``running`` calls on a worker now (in flight),
    ``slots`` calls the ready workers can run at once (workers x concurrency).

    Transfer (bytes, local backend; 0 on Dask): ``bytes_sent`` written into worker
    sockets, ``bytes_received`` read from them, ``bytes_shared`` of arguments and results
    that went as shared segments instead (they did not need sending), ``bytes_placed``
    copied into segments by the pool (once per distinct large argument buffer).
    """

    state: str
    target: int
    ready_count: int
    workers: tuple[WorkerStatus, ...]
    queued: int
    running: int
    calls: int
    failed: int
    replaced: int
    started_at: float
    startup_seconds: float | None
    last_error: str | None
    recent_failures: tuple[FailedCall, ...]
    done: int = 0
    cancelled: int = 0
    slots: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_shared: int = 0
    bytes_placed: int = 0

    @property
    def ready(self) -> bool:
        return self.state != "closed" and self.ready_count >= self.target

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the lab extension receives)."""
        data = asdict(self)
        data["ready"] = self.ready
        return data
