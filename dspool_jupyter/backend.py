"""What a backend is: the worker side of a pool, behind one small interface.

The :class:`~dspool_jupyter.dispatch.Dispatcher` decides which call runs where; a
backend owns the processes and the transport: it starts workers, sends a call to a
worker, interrupts or kills, and tells the dispatcher what happened (a worker ready, a
reply, a worker lost). Backends are chosen by name (``Pool(backend="local")``, the
default, or ``"dask"``) as anyio picks its event-loop backend; the facade never names a
backend class.

Threading: a backend runs its own loop thread and calls the dispatcher from it with
``dispatcher.lock`` held. The dispatcher calls the backend with the lock held too, on
the loop thread, and — only when ``direct_send`` is True — on a caller's thread for the
hand-off of a call to a worker with a free slot (:meth:`Backend.send`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from .calls import Call

__all__ = ["Backend", "call_locked_soon", "BackendOptions", "KillReason", "SlotState", "WorkerSlot"]

SlotState = Literal["starting", "idle", "busy", "stopping", "dead"]
KillReason = Literal["crashed", "timeout", "cancel", "restart", "close", "stuck"]


@dataclass(frozen=True)
class BackendOptions:
    """What the facade tells a backend (checked already; units in the Pool docstring)."""

    workers: int | None  # as the user asked (None: the default)
    target: int
    concurrency: int
    store_dir: str
    anonymous_ttl: float | None
    preload: list[str]
    heartbeat_interval: float
    max_result_bytes: int
    memory_limit: int | None
    address: str | None
    connect_timeout: float
    token: str
    env: dict[str, str]  # what every worker's environment needs (the LM broker's address)
    shared_memory_threshold: int | None = None  # bytes; None: no shared segments


@dataclass(eq=False)
class WorkerSlot:
    """One worker as the dispatcher sees it (a backend subclasses it with its own data).

    ``slots`` is how many calls it runs at once; ``inflight`` the calls sent to it in
    order (by call id); ``queue`` the calls that must run on it and wait: its set-ups
    and its sessions' calls.
    """

    id: str
    started_at: float
    start_mono: float
    slots: int = 1
    pid: int | None = None
    state: SlotState = "starting"
    ready: bool = False
    retiring: bool = False
    calls: int = 0
    done: int = 0
    errors: int = 0
    cancelled: int = 0
    rss: int | None = None
    last_heartbeat: float | None = None
    inflight: dict[int, Call] = field(default_factory=dict)
    queue: collections.deque[Call] = field(default_factory=collections.deque)
    setups_running: int = 0
    kill_reason: KillReason | None = None
    returncode: int | None = None
    lost_calls: list[Call] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """Ready and taking calls."""
        return self.ready and not self.retiring and self.state in ("idle", "busy")

    def running_program(self) -> str | None:
        """The program of its oldest running call, or None."""
        for call in self.inflight.values():
            if call.started:
                return call.program
        return None


def call_locked_soon(loop: Any, lock: Any, callback: Callable[[], None]) -> None:
    """Run ``callback()`` on ``loop``'s thread with ``lock`` held (both backends use it)."""
    if loop is None:
        return

    def locked() -> None:
        with lock:
            callback()

    try:
        loop.call_soon_threadsafe(locked)
    except RuntimeError:
        pass  # the loop is closed: the pool is gone


class Backend(Protocol):
    """The worker side of a pool (see the module docstring)."""

    name: str
    direct_send: bool

    def start(self, dispatcher: Any) -> None:
        """Start the loop thread and the workers for ``dispatcher`` (a
        :class:`~dspool_jupyter.dispatch.Dispatcher`); returns once they are starting."""

    def wake(self) -> None:
        """Commands wait in ``dispatcher.inbox``: drain them on the loop thread soon."""

    def send(self, slot: WorkerSlot, call: Call) -> bool:
        """Hand ``call`` to ``slot``; False when it could not reach the worker at all."""

    def interrupt(self, slot: WorkerSlot, call: Call) -> None:
        """Interrupt ``call`` (cancel or timeout) on ``slot``; the worker survives."""

    def kill(self, slot: WorkerSlot, reason: KillReason) -> None:
        """Kill ``slot``'s worker (it is replaced); the backend reports the loss."""

    def may_pipeline(self, slot: WorkerSlot) -> bool:
        """Whether one more call may wait on ``slot`` behind its full slots."""

    def replace(self, slot: WorkerSlot) -> None:
        """Start a worker in place of ``slot`` (dead or retiring)."""

    def restart_all(self) -> None:
        """Replace every worker (running calls get WorkerCrashed, queued ones wait)."""

    def close(self, timeout: float) -> None:
        """Stop the workers and the loop thread (blocks; from a caller's thread)."""

    def on_loop_thread(self) -> bool:
        """True on the backend's loop thread."""

    def call_soon(self, callback: object) -> None:
        """Run ``callback()`` on the loop thread with the dispatcher lock held."""
