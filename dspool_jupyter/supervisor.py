"""Deadlines: call timeouts, cancel graces and exit-status waits, for both backends.

One task sleeps until the nearest deadline and runs what is due with the dispatcher's
lock held; it never ticks, so it does not wake the loop (and delay a call) while
nothing is due. A deadline is a callback at a monotonic time; cancelling one only
marks it (the heap is compacted when most of it is cancelled), so scheduling and
cancelling cost O(log n) and O(1) on the per-call path.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Deadline", "Supervisor"]

log = logging.getLogger(__name__)

IDLE_SLEEP = 1.0  # seconds the supervisor sleeps when no deadline is pending


class Deadline:
    """A callback due at ``when`` (monotonic seconds); :meth:`cancel` to drop it."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Supervisor:
    """Runs deadlines on one asyncio loop; ``at`` may be called from any thread."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._sleeping_until: float | None = None

    def at(self, when: float, callback: Callable[[], None]) -> Deadline:
        """Run ``callback()`` (lock held) at monotonic time ``when``."""
        deadline = Deadline(when, callback)
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._seq), deadline))
            until = self._sleeping_until
            if until is None or when < until:
                self._sleeping_until = when
                self._poke()
        return deadline

    def drop(self, deadline: Deadline | None) -> None:
        """Cancel ``deadline`` (None: nothing)."""
        if deadline is None or deadline.cancelled:
            return
        deadline.cancelled = True
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
            with self._lock:
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass  # the loop is closed: the pool is gone

    def run_due(self) -> float | None:
        """Run every due deadline; the time of the next one, or None.

        The next time is also where the task will sleep until, recorded before the lock
        is let go, so a deadline added from then on wakes it if it falls earlier.
        """
        with self._lock:
            heap = self._heap
            now = time.monotonic()
            next_due: float | None = None
            while heap:
                when, _, deadline = heap[0]
                if deadline.cancelled:
                    heapq.heappop(heap)
                    self._cancelled = max(0, self._cancelled - 1)
                    continue
                if when > now:
                    next_due = when
                    break
                heapq.heappop(heap)
                deadline.cancelled = True
                try:
                    deadline.callback()
                except Exception:
                    log.exception("dspool: a deadline's action failed")
                now = time.monotonic()
            self._sleeping_until = next_due
            return next_due

    async def run(self) -> None:
        """The sleeping task (start it on the backend's loop)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        while True:
            self._wake = asyncio.Event()
            next_due = self.run_due()
            delay = IDLE_SLEEP if next_due is None else max(0.0, next_due - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
