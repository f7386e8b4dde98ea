"""Holding the stop button for a few bytecodes.

Python raises ``KeyboardInterrupt`` (SIGINT: the kernel's stop button) between any two
bytecodes of the main thread. A few state changes must not be cut in half: the hand-off
of a call to the pool, and a future's cancel (its state, then its waiters' notification:
cut between the two, ``concurrent.futures.wait`` never counts the future as done). Inside
:class:`HeldInterrupts` SIGINT's handler only records the signal; on exit the real
handler runs, once. Other threads never receive ``KeyboardInterrupt`` and are left as
they are (only the main thread may install handlers).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["HeldInterrupts"]


class HeldInterrupts:
    """``with HeldInterrupts():`` defers SIGINT's Python handler to the block's end.

    Nests: an inner hold passes its signal on to the outer one.
    """

    __slots__ = ("pending", "previous")

    def __init__(self) -> None:
        self.pending: tuple[int, FrameType | None] | None = None
        self.previous: Any = None

    def __enter__(self) -> HeldInterrupts:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                signal.signal(signal.SIGINT, self._hold)
                self.previous = previous
        return self

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self.pending = (signum, frame)

    def __exit__(self, *exc: object) -> None:
        previous, self.previous = self.previous, None
        if previous is None:
            return
        signal.signal(signal.SIGINT, previous)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            previous(*pending)
