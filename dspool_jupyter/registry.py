"""The pools of this process: which one is current, and closing them all at exit.

The magics, the comm and the widget follow the current pool (``pool.current_pool``,
typed, is the face of :func:`current`); a pool registers
itself when it starts and unregisters when it closes. At interpreter exit every open
pool is closed. A Dask pool needs that to happen before ``distributed``'s own exit
handlers stop its machinery: :func:`close_at_exit_first` registers a second handler,
after ``import distributed``, which atexit therefore runs first.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Protocol


class Registered(Protocol):
    """What the registry needs of a pool."""

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


__all__ = [
    "Registered",
    "add",
    "close_all",
    "close_at_exit_first",
    "current",
    "on_current_changed",
    "remove",
]

log = logging.getLogger(__name__)

_open_pools: list[weakref.ref[Registered]] = []
_listeners: list[Callable[[Registered | None], None]] = []
_lock = threading.Lock()
_early_handler = False


def current() -> Registered | None:
    """The most recently started pool of this process that is not closed, or None."""
    with _lock:
        refs = list(_open_pools)
    for ref in reversed(refs):
        pool = ref()
        if pool is not None and not pool.closed:
            return pool
    return None


def on_current_changed(callback: Callable[[Registered | None], None]) -> Callable[[], None]:
    """Call ``callback(current())`` whenever a pool starts or closes; returns unsubscribe."""
    with _lock:
        _listeners.append(callback)

    def unsubscribe() -> None:
        with _lock:
            if callback in _listeners:
                _listeners.remove(callback)

    return unsubscribe


def _changed() -> None:
    pool = current()
    with _lock:
        listeners = list(_listeners)
    for callback in listeners:
        try:
            callback(pool)
        except Exception:
            log.exception("dspool current-pool listener failed")


def add(pool: Registered) -> None:
    with _lock:
        _open_pools.append(weakref.ref(pool))
    _changed()


def remove(pool: Registered) -> None:
    with _lock:
        _open_pools[:] = [r for r in _open_pools if r() not in (None, pool)]
    _changed()


@atexit.register
def close_all() -> None:
    """Close every open pool of this process (also run at interpreter exit)."""
    with _lock:
        pools = [ref() for ref in _open_pools]
    for pool in pools:
        if pool is not None:
            pool.close()


def close_at_exit_first() -> None:
    """Make exit close the pools before handlers registered until now (Dask's) run."""
    global _early_handler
    with _lock:
        if _early_handler:
            return
        _early_handler = True
    atexit.register(close_all)
