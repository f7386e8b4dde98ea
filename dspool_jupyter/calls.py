"""One call through the pool: its future (the caller's handle) and its record.

Both backends use these. A :class:`CallFuture` is a real ``concurrent.futures.Future``:
``wait``, ``as_completed`` and ``asyncio.wrap_future`` treat it as they treat any other,
a cancelled one included. ``cancel()`` also works while the call runs: the future is
cancelled at once (its waiters wake) and the pool interrupts the call on its worker.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .interrupts import HeldInterrupts

__all__ = ["Call", "CallFuture", "echo_output", "reject", "resolve"]

_PENDING = concurrent.futures._base.PENDING
_CANCELLED = concurrent.futures._base.CANCELLED


class CallFuture(concurrent.futures.Future[Any]):
    """A ``concurrent.futures.Future`` for one pool call.

    ``cancel()`` also works while the call runs: the worker is interrupted. After the
    call, ``stdout`` and ``stderr`` hold what the program printed and ``worker_id`` the
    worker that ran it. ``usage`` is the call's LM usage when the program made LM
    requests (a dict of requests, tokens and cost), else None.
    """

    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program
        self.stdout = ""
        self.stderr = ""
        self.worker_id: str | None = None
        self.usage: dict[str, Any] | None = None
        # Set while the call is in the pool, cleared when it ends (no future <-> call
        # cycle for the collector to find).
        self._call: Call | None = None
        self._cancel_asked = False

    def running(self) -> bool:
        return self.worker_id is not None and not self.done()

    def cancel(self) -> bool:
        # Held: an interrupt between the state change and the waiters' notification
        # would leave a future that wait() never counts as done.
        with HeldInterrupts():
            with self._condition:
                first = self._state == _PENDING and not self._cancel_asked
                self._cancel_asked = True
            if not super().cancel():
                return False
            with self._condition:
                if self._state == _CANCELLED:
                    # Our futures never enter RUNNING, so notify the waiters of wait()
                    # and as_completed() here: the pool has nothing more to tell them.
                    self.set_running_or_notify_cancel()
        call = self._call
        if first and call is not None and call.on_cancel is not None:
            call.on_cancel(call)
        return True


@dataclass(eq=False, slots=True)
class Call:
    """The pool's record of one call (both backends; backend data in ``handle``).

    ``started`` is 0 until the call runs on its worker (monotonic seconds); ``acked``
    is True once the worker is known to have it (a call that was never acked when its
    worker died never started, and goes back to the queue).
    """

    id: int
    program: str
    program_id: str
    session: str | None
    blob: bytes
    future: CallFuture
    timeout: float | None
    setup: bool = False
    on_cancel: Callable[[Call], None] | None = None
    slot: Any = None  # the backend.WorkerSlot it was sent to (calls.py is below backend.py)
    started: float = 0.0
    acked: bool = False
    interrupted: bool = False
    deadline: Any = None  # its timeout's supervisor.Deadline while it runs
    grace: Any = None  # after an interrupt: the Deadline by which it must have stopped
    handle: Any = None
    segments: tuple[Any, ...] = ()  # shm.Segment of its large arguments (local backend)


def resolve(future: CallFuture, value: Any) -> bool:
    """Set ``value`` unless the future already ended (a cancel may race us); True if set."""
    try:
        future.set_result(value)
    except concurrent.futures.InvalidStateError:
        return False
    return True


def reject(future: CallFuture, error: BaseException) -> bool:
    """Set ``error`` unless the future already ended; True if set."""
    try:
        future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        return False
    return True


def echo_output(future: CallFuture) -> None:
    """Write what the call printed to this process's stdout/stderr (``run``, the magics)."""
    if future.stdout:
        sys.stdout.write(future.stdout)
    if future.stderr:
        sys.stderr.write(future.stderr)
