"""Plain, immutable snapshots of a pool: what the widget, the lab item and tests render.

``pool.status()`` returns a :class:`PoolStatus`; ``to_dict()`` gives the JSON form the
lab extension receives over the comm. Times are wall-clock seconds since the epoch.

:class:`PoolView` is the part of a pool that every view (widget, comm, magics) uses, and
:class:`Departures` remembers the workers that left the snapshot for
:data:`DEPARTED_SECONDS`, so the widget and the lab panel show a death for as long.
"""

from __future__ import annotations

import signal as _signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

if TYPE_CHECKING:
    from .events import Event
    from .usage import LimitsSnapshot

__all__ = [
    "format_bytes",
    "transfer_text",
    "DEPARTED_SECONDS",
    "Departed",
    "Departures",
    "FailedCall",
    "PoolState",
    "PoolStatus",
    "PoolView",
    "WorkerState",
    "WorkerStatus",
    "dead_recently",
    "limits_of",
]

# The snapshot fields stay ``str`` until the dispatcher builds them from these types
# (today's pool.py passes plain strings); the views key their colours and words by them.
PoolState = Literal["starting", "healthy", "degraded", "closed"]
WorkerState = Literal["starting", "idle", "busy", "stopping"]
DepartedState = Literal["dead", "stopped"]

DEPARTED_SECONDS = 15.0  # seconds a worker that left stays listed (widget and lab panel)


@dataclass(frozen=True)
class WorkerStatus:
    """One worker: ``state`` is 'starting', 'idle', 'busy' or 'stopping'.

    The words mean the same everywhere (pool headline, worker rows, widget, lab panel):
    ``calls`` every call that ended on this worker, ``done`` those that returned a value,
    ``errors`` those that ended in an error (the program raised, the worker crashed, the
    call timed out), ``cancelled`` those cancelled while they ran. ``active`` is how many
    calls run on it now, out of ``slots`` (the pool's ``concurrency``); worker set-ups
    are the pool's own work and count in none of these (the state says 'busy').
    """

    id: str
    pid: int | None
    state: str  # a WorkerState
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
    """A recent failed call: the error's class name, its one-line message and traceback.

    ``detail`` is what went wrong without repeating the program or the worker (the
    program's own ``ValueError: x``, or ``killed by SIGKILL``); ``exit_code``,
    ``signal`` (its name) and ``timeout`` (seconds) are set for a crash or a timeout,
    which have no traceback.
    """

    call_id: int
    program: str
    worker_id: str | None
    error: str
    message: str
    traceback: str
    time: float
    detail: str = ""
    exit_code: int | None = None
    signal: str | None = None
    timeout: float | None = None

    @classmethod
    def of(
        cls, call_id: int, program: str, worker_id: str | None, error: BaseException
    ) -> FailedCall:
        """The record of ``error`` ending a call (the worker's traceback if it has one)."""
        remote_type = getattr(error, "remote_type", None)
        exit_code = getattr(error, "exit_code", None)
        signum = getattr(error, "signal", None)
        timeout = getattr(error, "timeout", None)
        signame = None
        if isinstance(signum, int):
            try:
                signame = _signal.Signals(signum).name
            except ValueError:
                signame = f"signal {signum}"
        if isinstance(remote_type, str):
            remote_message = str(getattr(error, "remote_message", "") or "")
            detail = f"{remote_type}: {remote_message}" if remote_message else remote_type
        elif signame is not None:
            detail = f"the worker was killed by {signame}"
        elif isinstance(exit_code, int):
            detail = f"the worker exited with code {exit_code}"
        elif isinstance(timeout, (int, float)):
            detail = f"ran past its timeout of {timeout:g} s; the worker was replaced"
        else:
            detail = str(error)
        return cls(
            call_id=call_id,
            program=program,
            worker_id=worker_id,
            error=type(error).__name__,
            message=str(error),
            traceback=str(getattr(error, "remote_traceback", "") or ""),
            time=time.time(),
            detail=detail,
            exit_code=exit_code if isinstance(exit_code, int) else None,
            signal=signame,
            timeout=float(timeout) if isinstance(timeout, (int, float)) else None,
        )


@dataclass(frozen=True)
class PoolStatus:
    """The pool at one moment.

    ``state`` is 'starting' (not every worker has been ready yet since the start),
    'healthy' (all ready), 'degraded' (some place is being refilled) or 'closed'.
    ``ready`` is True when all ``target`` workers are ready.

    Counts (the same words as :class:`WorkerStatus`): ``calls`` every call that ended,
    ``done`` with a value, ``failed`` with an error, ``cancelled`` by the caller;
    ``queued`` calls waiting for a worker, ``running`` calls on a worker now (in flight),
    ``slots`` calls the ready workers can run at once (workers x concurrency).

    Start-up: ``preload`` lists the modules the template imports before any worker can
    fork; ``preload_started_at`` is when that import began and ``preload_seconds`` how
    long it took (None while it runs, and when nothing is preloaded).

    Transfer (bytes, local backend; 0 on Dask): ``bytes_sent`` written into worker
    sockets, ``bytes_received`` read from them, ``bytes_shared`` of arguments and results
    that went as shared segments instead (they did not need sending), ``bytes_placed``
    copied into segments by the pool (once per distinct large argument buffer).
    """

    state: str  # a PoolState
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
    preload: tuple[str, ...] = ()
    preload_started_at: float | None = None
    preload_seconds: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_shared: int = 0
    bytes_placed: int = 0

    @property
    def ready(self) -> bool:
        return self.state != "closed" and self.ready_count >= self.target

    @property
    def importing(self) -> bool:
        """True while the template imports the preloads (no worker can start before)."""
        return (
            self.state != "closed"
            and bool(self.preload)
            and self.preload_started_at is not None
            and self.preload_seconds is None
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the lab extension receives)."""
        data = asdict(self)
        data["ready"] = self.ready
        return data


class PoolView(Protocol):
    """The part of a pool that the views (widget, lab comm, magics) use."""

    @property
    def closed(self) -> bool: ...

    @property
    def target(self) -> int: ...

    def status(self) -> PoolStatus: ...

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]: ...

    def restart_worker(self, worker_id: str) -> None: ...

    def restart(self) -> None: ...


def limits_of(pool: object) -> LimitsSnapshot | None:
    """The provider limits' snapshot of ``pool`` (``pool.limits.snapshot()``), or None.

    A view of any :class:`PoolView` may show it: a pool without ``limits`` (or whose
    broker fails to answer) has none.
    """
    snapshot = getattr(getattr(pool, "limits", None), "snapshot", None)
    if snapshot is None:
        return None
    try:
        result = snapshot()
    except Exception:
        return None
    return cast("LimitsSnapshot", result)


@dataclass(frozen=True)
class Departed:
    """A worker that left the snapshot: its last record, when it left (monotonic), how.

    ``state`` is 'dead' (crashed, killed for a timeout or a cancel) or 'stopped' (a
    restart or the pool's close); ``note`` says how in a few words.
    """

    worker: WorkerStatus
    since: float
    state: DepartedState
    note: str
    reason: str | None = None
    returncode: int | None = None

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "id": self.worker.id,
            "pid": self.worker.pid,
            "state": self.state,
            "note": self.note,
            "calls": self.worker.calls,
            "errors": self.worker.errors,
            "age": max(0.0, now - self.since),
        }


def _note(reason: str | None, returncode: int | None, closed: bool) -> tuple[DepartedState, str]:
    from .errors import describe_returncode

    if closed or reason == "close":
        return "stopped", "pool closed"
    if reason == "restart":
        return "stopped", "restarted"
    if reason in ("timeout", "cancel"):
        return "dead", f"killed ({reason})"
    if returncode is not None:
        return "dead", describe_returncode(returncode)
    return "dead", "died"


class Departures:
    """The workers that left a pool's snapshots in the last :data:`DEPARTED_SECONDS`.

    Feed it every snapshot (:meth:`update`) and the pool's ``WorkerDied`` events
    (:meth:`on_event`, from any thread); :meth:`update` returns the departed workers,
    oldest first. The widget and the lab comm each hold one, so both show a death for
    the same time and with the same words.
    """

    def __init__(self, keep: float = DEPARTED_SECONDS) -> None:
        self.keep = keep
        self._seen: dict[str, WorkerStatus] = {}
        self._left: dict[str, tuple[WorkerStatus, float]] = {}  # id -> (last record, since)
        self._deaths: dict[str, tuple[str, int | None]] = {}

    def on_event(self, event: Event) -> None:
        """Remember how a worker died (a ``WorkerDied`` event); other events are ignored."""
        if event.kind == "worker_died":
            worker_id = getattr(event, "worker_id", None)
            if isinstance(worker_id, str):
                self._deaths[worker_id] = (
                    str(getattr(event, "reason", "")),
                    getattr(event, "returncode", None),
                )

    def update(self, status: PoolStatus, now: float | None = None) -> tuple[Departed, ...]:
        """The departed workers as of ``status`` (``now``: monotonic seconds), oldest first."""
        now = time.monotonic() if now is None else now
        current = {w.id for w in status.workers}
        for worker_id, worker in self._seen.items():
            if worker_id not in current and worker_id not in self._left:
                self._left[worker_id] = (worker, now)
        out = []
        for worker_id, (worker, since) in list(self._left.items()):
            if now - since > self.keep or worker_id in current:
                del self._left[worker_id]
                self._deaths.pop(worker_id, None)
                continue
            reason, code = self._deaths.get(worker_id, (None, None))
            state, note = _note(reason, code, status.state == "closed")
            out.append(Departed(worker, since, state, note, reason, code))
        self._seen = {w.id: w for w in status.workers}
        return tuple(out)


def dead_recently(departed: Iterable[Departed]) -> int:
    """How many of ``departed`` died (rather than being stopped on purpose)."""
    return sum(1 for d in departed if d.state == "dead")


def format_bytes(n: int | None) -> str:
    """``n`` bytes for people ('512 B', '3.0 KB', '8.0 MB'); '-' for None."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def transfer_text(status: PoolStatus) -> str:
    """The byte counters in one line, or '' while nothing travelled (and on Dask).

    ``sent``/``received`` went through the worker sockets; ``shared`` went as shared
    memory instead (it did not need sending); ``placed`` was copied into segments.
    """
    counts = (status.bytes_sent, status.bytes_received, status.bytes_shared)
    if not any(counts) and not status.bytes_placed:
        return ""
    sent, received = format_bytes(status.bytes_sent), format_bytes(status.bytes_received)
    shared, placed = format_bytes(status.bytes_shared), format_bytes(status.bytes_placed)
    return f"bytes: {sent} sent, {received} received, {shared} shared instead of sent " + (
        f"({placed} placed)"
    )
