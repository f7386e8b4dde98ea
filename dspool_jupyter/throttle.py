"""One throttle for the views that follow a pool: the status widget and the lab comm.

Pool events arrive on the pool's dispatcher thread, which must never wait; they only
:meth:`Throttle.mark` the view dirty (``urgent`` for what a user must see at once). The
view's own thread loops on :meth:`Throttle.wait`, which returns when a refresh is due: the
view is dirty and at least ``interval`` seconds (``urgent_interval`` when urgent) passed
since the last refresh (:meth:`Throttle.acted`). So a burst of events costs one refresh,
never one per event (dask's ``cluster-repr-interval``, tqdm's ``mininterval``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["URGENT_EVENTS", "Throttle"]

# The events a user must see at once: a death, a replacement, a failed call, ready, closed.
URGENT_EVENTS = frozenset(
    {"worker_died", "worker_replaced", "call_failed", "pool_ready", "pool_closed"}
)


class Throttle:
    """Dirty and urgent flags with a minimum gap between refreshes (seconds).

    ``idle``: with ``on_idle`` given to :meth:`wait`, it is called every ``idle``
    seconds while nothing is marked; without it, a refresh is due after ``idle`` seconds
    anyway (to age heartbeats). ``cond`` lets the owner share its condition (and lock).
    """

    def __init__(
        self,
        interval: float,
        urgent_interval: float,
        *,
        idle: float | None = None,
        cond: threading.Condition | None = None,
    ) -> None:
        self.interval = interval
        self.urgent_interval = urgent_interval
        self.idle = idle
        self.cond = cond if cond is not None else threading.Condition()
        self.dirty = False
        self.urgent = False
        self.stopped = False
        self.last = float("-inf")  # monotonic time of the last refresh

    def mark(self, urgent: bool = False) -> None:
        """Ask for a refresh (any thread, never blocks for long)."""
        with self.cond:
            self.dirty = True
            self.urgent = self.urgent or urgent
            self.cond.notify_all()

    def acted(self) -> None:
        """Record that a refresh just happened (the gap counts from here)."""
        self.last = time.monotonic()

    def stop(self) -> None:
        """Make :meth:`wait` return False; pending marks are dropped."""
        with self.cond:
            self.stopped = True
            self.dirty = self.urgent = False
            self.cond.notify_all()

    def start(self) -> None:
        """Undo :meth:`stop`."""
        with self.cond:
            self.stopped = False

    def wait(self, on_idle: Callable[[], None] | None = None) -> bool:
        """Block until a refresh is due (True, flags cleared) or until stopped (False)."""
        with self.cond:
            idle_until = None if self.idle is None else time.monotonic() + self.idle
            while not (self.dirty or self.stopped):
                if idle_until is None:
                    self.cond.wait()
                    continue
                remaining = idle_until - time.monotonic()
                if remaining > 0:
                    self.cond.wait(remaining)
                    continue
                if on_idle is None:
                    break
                on_idle()
                idle_until = time.monotonic() + (self.idle or 0.0)
            while not self.stopped:
                gap = self.urgent_interval if self.urgent else self.interval
                remaining = self.last + gap - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            if self.stopped:
                return False
            # Cleared before the refresh: a mark from now on asks for the next one.
            self.dirty = self.urgent = False
            return True
