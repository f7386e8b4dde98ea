"""The kernel side of the JupyterLab status item: pool snapshots over a Jupyter comm.

``register_comm_target(ipython)`` (called by ``%load_ext dspool_jupyter``) registers the
comm target ``"dspool"`` in the running kernel and opens one announcement comm so that a
JupyterLab page that is already open learns that this kernel can show a pool. Outside a
kernel (terminal IPython, plain Python) it does nothing and returns ``False``.

Protocol (version 1). Every message is a JSON object with a ``type``.

Frontend and kernel:

- The kernel opens comm ``"dspool"`` once, with ``{"type": "hello", "protocol": 1,
  "version": ...}``; a frontend that already has a pool comm ignores it.
- A frontend that connects later (page reload, notebook opened) asks ``comm_info`` for
  target ``"dspool"`` and adopts an open comm by its id; if there is none it waits for
  the announcement. A frontend may also open a comm of its own (target ``"dspool"``);
  the kernel accepts any number of them.
- A comm is *live* once the frontend sent anything on it (or opened it), and stays live
  for :data:`LEASE` seconds after the last message; frontends send ``{"type": "hello"}``
  every :data:`KEEPALIVE` seconds. Only while at least one comm is live does the kernel
  follow the pool's events: with no frontend listening (none ever came, or all went
  away, even without closing their comm) the pool pays nothing.
- The kernel closes its comms with ``{"type": "bye"}`` when the target is unregistered;
  a frontend whose comm was closed by anyone else (say, a frontend without this
  extension closing the announcement) opens a comm of its own.

Kernel to frontend:

- ``{"type": "status", "protocol": 1, "seq": n, "time": t, "status": PoolStatus.to_dict()
  or null, "events": [...]}``: a snapshot of the current pool (``null`` when this kernel
  has no pool, or it is closed). ``time`` is the kernel's wall clock (seconds since the
  epoch) so the frontend can age heartbeats without trusting its own clock; ``events``
  lists the urgent events folded into this snapshot (``kind``, ``time``, ``worker_id``);
  ``departed`` lists the workers that left the pool in the last
  :data:`~dspool_jupyter.status.DEPARTED_SECONDS` (``id``, ``pid``, ``state`` 'dead' or
  'stopped', ``note`` such as 'killed by SIGKILL', ``calls``, ``errors``, ``age`` in
  seconds), the same rows and for the same time as the status widget shows them.
  ``status["limits"]`` is the provider limits' snapshot
  (:meth:`dspool_jupyter.usage.LimitsSnapshot.as_dict`: ``models`` with their limits,
  achieved rates, in-flight requests and 429s, ``budget``, ``usage`` totals and
  breakdowns), or ``null`` for a pool without limits. ``status["transfer"]`` is the
  widget's line of byte counters (sent, received, shared instead of sent, placed), or
  ``""`` while nothing travelled (always on Dask).
  Snapshots are throttled: at most one every :data:`MIN_INTERVAL` seconds, coalescing
  everything that happened in between; a worker's death, a failed call, the pool
  becoming ready or closing (:data:`URGENT_EVENTS`) are sent at once (at most one every
  :data:`URGENT_MIN_INTERVAL` seconds), so a death shows in well under a second.
- ``{"type": "result", "request_id": id, "ok": bool, "error": str | null}``: the outcome
  of a command that carried a ``request_id``.

Frontend to kernel:

- ``{"type": "refresh"}``: send a snapshot now (the panel polls this while it is shown,
  to age memory and heartbeats).
- ``{"type": "restart_worker", "worker_id": str, "request_id": str?}``
- ``{"type": "restart_pool", "request_id": str?}``

Threads: pool events arrive on the pool's dispatcher thread and only mark a
:class:`~dspool_jupyter.throttle.Throttle` (the status widget's too); one sender thread
per kernel takes the snapshots and sends them (ipykernel hands IOPub
messages from any thread to its IOPub thread, so ``comm.send`` never blocks it).
Commands run on a short-lived thread of their own, so neither the shell (nor the
per-comm-target subshell JupyterLab 4.6 uses with ipykernel 7) waits for a restart.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .status import Departures, PoolView, limits_of, transfer_text
from .throttle import URGENT_EVENTS, Throttle

if TYPE_CHECKING:
    from .events import Event
    from .pool import Pool

__all__ = [
    "KEEPALIVE",
    "LEASE",
    "MIN_INTERVAL",
    "PROTOCOL_VERSION",
    "TARGET_NAME",
    "URGENT_EVENTS",
    "URGENT_MIN_INTERVAL",
    "StatusPublisher",
    "register_comm_target",
    "unregister_comm_target",
]

log = logging.getLogger(__name__)

TARGET_NAME = "dspool"
PROTOCOL_VERSION = 1
MIN_INTERVAL = 0.25  # seconds between routine snapshots: at most 4 a second
URGENT_MIN_INTERVAL = 0.05  # seconds between snapshots sent at once for URGENT_EVENTS
KEEPALIVE = 30.0  # seconds between a frontend's hellos (the lab extension's constant)
LEASE = 90.0  # seconds a comm stays live after the frontend's last message
MAX_URGENT_EVENTS = 20  # per snapshot; more are dropped (the snapshot has the counts)
MAX_TRACEBACK_CHARS = 8000  # per failed call in a snapshot; the head is cut


class CommLike(Protocol):
    """What the publisher needs of a comm (``comm.base_comm.BaseComm`` has it)."""

    comm_id: str

    def send(
        self,
        data: dict[str, Any] | None = ...,
        metadata: dict[str, Any] | None = ...,
        buffers: list[bytes] | None = ...,
    ) -> None: ...

    def on_msg(self, callback: Callable[[dict[str, Any]], None] | None) -> None: ...

    def on_close(self, callback: Callable[[dict[str, Any]], None] | None) -> None: ...


PoolGetter = Callable[[], "PoolView | None"]
PoolWatcher = Callable[[Callable[["PoolView | None"], None]], Callable[[], None]]


def _default_pool_getter() -> PoolView | None:
    from .pool import current_pool

    pool: Pool | None = current_pool()
    return pool


def _default_pool_watcher(callback: Callable[[PoolView | None], None]) -> Callable[[], None]:
    from .pool import on_current_pool_changed

    return on_current_pool_changed(callback)


class StatusPublisher:
    """Sends snapshots of the kernel's current pool to every live frontend comm.

    One per kernel (see :func:`register_comm_target`); tests build their own with fake
    comms and pools. ``min_interval`` and ``urgent_min_interval`` are seconds.
    """

    def __init__(
        self,
        *,
        pool_getter: PoolGetter = _default_pool_getter,
        pool_watcher: PoolWatcher = _default_pool_watcher,
        min_interval: float = MIN_INTERVAL,
        urgent_min_interval: float = URGENT_MIN_INTERVAL,
        lease: float = LEASE,
    ) -> None:
        self._pool_getter = pool_getter
        self._pool_watcher = pool_watcher
        self._lease = lease
        self._cond = threading.Condition(threading.RLock())
        self._throttle = Throttle(
            min_interval, urgent_min_interval, idle=lease / 4, cond=self._cond
        )
        self._departures = Departures()
        self._comms: dict[str, CommLike] = {}
        self._live: dict[str, float] = {}  # comm id -> monotonic time last heard from
        self._pool: PoolView | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._unwatch: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self._events: list[dict[str, Any]] = []
        self._seq = 0

    # -- comms ------------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        """True while some frontend listens (the pool's events are then followed)."""
        with self._cond:
            return bool(self._live)

    @property
    def comm_ids(self) -> list[str]:
        with self._cond:
            return list(self._comms)

    def add_comm(self, comm: CommLike, *, live: bool) -> None:
        """Serve ``comm``; ``live`` when a frontend opened it (it then gets a snapshot)."""
        comm.on_msg(lambda msg: self.handle_message(comm, msg))
        comm.on_close(lambda _msg: self.remove_comm(comm.comm_id))
        with self._cond:
            self._comms[comm.comm_id] = comm
        if live:
            self._make_live(comm.comm_id)

    def remove_comm(self, comm_id: str) -> None:
        """Forget a closed comm; with no live comm left, stop following the pool."""
        with self._cond:
            self._comms.pop(comm_id, None)
            self._live.pop(comm_id, None)
            if not self._live:
                self._stop_following()

    def handle_message(self, comm: CommLike, msg: Mapping[str, Any]) -> None:
        """A ``comm_msg`` from a frontend (runs on the shell or a subshell thread)."""
        content = msg.get("content")
        data = content.get("data") if isinstance(content, Mapping) else None
        if not isinstance(data, Mapping):
            return
        if comm.comm_id not in self._comms:
            with self._cond:
                self._comms[comm.comm_id] = comm
        self._make_live(comm.comm_id)
        kind = data.get("type")
        request_id = data.get("request_id")
        if kind == "refresh":
            self.request_snapshot(urgent=True)
        elif kind == "restart_worker":
            worker_id = data.get("worker_id")
            if not isinstance(worker_id, str) or not worker_id:
                self._reply(comm, request_id, "restart_worker needs a worker_id")
                return
            self._command(comm, request_id, lambda pool: pool.restart_worker(worker_id))
        elif kind == "restart_pool":
            self._command(comm, request_id, lambda pool: pool.restart())
        elif kind != "hello":
            self._reply(comm, request_id, f"unknown message type {kind!r}")

    def close(self) -> None:
        """Stop following the pool and end the sender thread (comms stay open)."""
        with self._cond:
            self._comms.clear()
            self._live.clear()
            self._stop_following()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)

    # -- pool ---------------------------------------------------------------------------

    def request_snapshot(self, *, urgent: bool = False) -> None:
        """Ask for a snapshot; it goes out within the throttle interval."""
        self._throttle.mark(urgent)

    def _on_event(self, event: Event) -> None:
        """Pool dispatcher thread: note the change, never wait."""
        urgent = event.kind in URGENT_EVENTS
        with self._cond:
            if urgent:
                self._departures.on_event(event)
                if len(self._events) < MAX_URGENT_EVENTS:
                    self._events.append(_event_brief(event))
            self._throttle.mark(urgent)

    def _on_pool_changed(self, pool: PoolView | None) -> None:
        with self._cond:
            if self._unwatch is None:
                return
            self._attach(pool)

    def _attach(self, pool: PoolView | None) -> None:
        if pool is self._pool and (pool is None or self._unsubscribe is not None):
            return
        self._detach()
        self._pool = pool
        self._departures = Departures()
        if pool is not None:
            self._unsubscribe = pool.subscribe(self._on_event)
        self.request_snapshot(urgent=True)

    def _detach(self) -> None:
        unsubscribe, self._unsubscribe, self._pool = self._unsubscribe, None, None
        if unsubscribe is not None:
            try:
                unsubscribe()
            except Exception:
                log.exception("dspool comm: unsubscribing from the pool failed")

    def _make_live(self, comm_id: str) -> None:
        with self._cond:
            known = comm_id in self._live
            self._live[comm_id] = time.monotonic()
            if known:
                return
            if self._unwatch is None:
                self._throttle.start()
                self._unwatch = self._pool_watcher(self._on_pool_changed)
                self._attach(self._pool_getter())
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="dspool-comm-sender", daemon=True
                    )
                    self._thread.start()
            self.request_snapshot(urgent=True)

    def _stop_following(self) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            try:
                unwatch()
            except Exception:
                log.exception("dspool comm: unwatching the current pool failed")
        self._detach()
        self._throttle.stop()
        self._events = []

    # -- sender thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._expire_leases()
                if not self._throttle.wait(on_idle=self._expire_leases):
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
                events, self._events = self._events, []
                pool = self._pool
                departures = self._departures
                comms = [self._comms[c] for c in self._live if c in self._comms]
                self._seq += 1
                seq = self._seq
            try:
                status = _snapshot_and_departed(pool, departures, strict=True)
            except Exception:
                # a failed snapshot is not "no pool": send nothing, try again shortly
                log.debug("dspool comm: no snapshot of the pool; retrying", exc_info=True)
                self._throttle.acted()
                self._throttle.mark()
                continue
            message = {
                "type": "status",
                "protocol": PROTOCOL_VERSION,
                "seq": seq,
                "time": time.time(),
                "status": status[0] if status else None,
                "events": events,
                "departed": status[1] if status else [],
            }
            for comm in comms:
                if getattr(comm, "_closed", False):  # closed from this side, unannounced
                    self.remove_comm(comm.comm_id)
                    continue
                try:
                    comm.send(message)
                except Exception:
                    log.exception("dspool comm: sending a snapshot failed")
            self._throttle.acted()

    def _expire_leases(self) -> None:
        deadline = time.monotonic() - self._lease
        for comm_id in [c for c, heard in self._live.items() if heard < deadline]:
            del self._live[comm_id]
        if not self._live and self._unwatch is not None:
            self._stop_following()

    # -- commands -------------------------------------------------------------------------

    def _command(
        self, comm: CommLike, request_id: object, action: Callable[[PoolView], object]
    ) -> None:
        def run() -> None:
            with self._cond:
                pool = self._pool
            if pool is None:
                pool = self._pool_getter()
            if pool is None:
                self._reply(comm, request_id, "this kernel has no pool")
                return
            try:
                action(pool)
            except Exception as exc:
                log.warning("dspool comm: command failed: %s", exc)
                self._reply(comm, request_id, f"{type(exc).__name__}: {exc}")
            else:
                self._reply(comm, request_id, None)
            self.request_snapshot(urgent=True)

        threading.Thread(target=run, name="dspool-comm-command", daemon=True).start()

    def _reply(self, comm: CommLike, request_id: object, error: str | None) -> None:
        if request_id is None and error is None:
            return
        try:
            comm.send(
                {
                    "type": "result",
                    "request_id": request_id,
                    "ok": error is None,
                    "error": error,
                }
            )
        except Exception:
            log.exception("dspool comm: sending a command result failed")


def _snapshot(pool: PoolView | None) -> dict[str, Any] | None:
    """The pool's snapshot as JSON (None without a pool, or when it is closed)."""
    parts = _snapshot_and_departed(pool, Departures())
    return parts[0] if parts else None


def _snapshot_and_departed(
    pool: PoolView | None, departures: Departures, *, strict: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The pool's snapshot as JSON and its recently departed workers; None without one.

    A snapshot that fails is None too, unless ``strict``: then its exception propagates.
    """
    if pool is None:
        return None
    try:
        status = pool.status()
    except Exception:
        if strict:
            raise
        log.debug("dspool comm: no snapshot of the pool", exc_info=True)
        return None
    if status.state == "closed":
        return None
    now = time.monotonic()
    departed = [d.to_dict(now) for d in departures.update(status, now)]
    data: dict[str, Any] = status.to_dict()
    limits = limits_of(pool)
    data["limits"] = limits.as_dict() if limits is not None else None
    data["transfer"] = transfer_text(status)  # the widget's words; '' until bytes travel
    failures = data.get("recent_failures")
    if isinstance(failures, (list, tuple)):
        data["recent_failures"] = [_trim_failure(f) for f in failures]
    return data, departed


def _trim_failure(failure: Any) -> Any:
    if not isinstance(failure, dict):
        return failure
    tb = failure.get("traceback")
    if isinstance(tb, str) and len(tb) > MAX_TRACEBACK_CHARS:
        failure = {**failure, "traceback": "...\n" + tb[-MAX_TRACEBACK_CHARS:]}
    return failure


def _package_version() -> str:
    try:
        # generated at build time from labextension/package.json (git-ignored)
        return str(importlib.import_module(f"{__package__}._version").__version__)
    except ImportError:
        pass
    try:
        return importlib.metadata.version("dspool-jupyter")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _event_brief(event: Event) -> dict[str, Any]:
    brief: dict[str, Any] = {"kind": event.kind, "time": event.time}
    worker_id = getattr(event, "worker_id", None)
    if worker_id is not None:
        brief["worker_id"] = worker_id
    return brief


_lock = threading.Lock()
_publisher: StatusPublisher | None = None
_announcement: Any = None


def register_comm_target(ipython: Any = None) -> bool:
    """Register comm target ``"dspool"`` in this kernel and announce it to frontends.

    ``ipython`` is the shell (``get_ipython()`` when omitted). Idempotent and cheap, so
    it may be called whenever a pool starts; returns ``False`` (doing nothing) when not
    running inside a Jupyter kernel.
    """
    global _publisher, _announcement
    if ipython is None:
        if "IPython" not in sys.modules:  # a kernel has imported it long ago
            return False
        from IPython import get_ipython

        ipython = get_ipython()
    if getattr(ipython, "kernel", None) is None:
        return False
    import comm

    with _lock:
        if _publisher is None:
            _publisher = StatusPublisher()
            publisher = _publisher

            def open_from_frontend(new_comm: Any, _msg: dict[str, Any]) -> None:
                publisher.add_comm(new_comm, live=True)

            comm.get_comm_manager().register_target(TARGET_NAME, open_from_frontend)
        if _announcement is None or getattr(_announcement, "_closed", False):
            _announcement = comm.create_comm(
                target_name=TARGET_NAME,
                data={"type": "hello", "protocol": PROTOCOL_VERSION, "version": _package_version()},
            )
            _publisher.add_comm(_announcement, live=False)
    return True


def unregister_comm_target() -> None:
    """Undo :func:`register_comm_target`: close the comms and stop the sender thread."""
    global _publisher, _announcement
    with _lock:
        publisher, _publisher = _publisher, None
        announcement, _announcement = _announcement, None
    if publisher is None:
        return
    import comm

    manager = comm.get_comm_manager()
    manager.targets.pop(TARGET_NAME, None)
    for comm_id in publisher.comm_ids:
        opened = manager.get_comm(comm_id)
        if opened is not None:
            opened.close(data={"type": "bye"})
    if announcement is not None:
        announcement.close(data={"type": "bye"})
    publisher.close()
