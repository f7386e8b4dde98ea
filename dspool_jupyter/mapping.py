"""Maps: one pool call per item, in parallel, results in input order, optionally journaled.

``Pool.map`` and ``%dspool map`` are built on :class:`MapHandle`; ``Pool.map_async`` and
``%dspool map --bg`` return it. The map only uses the pool's public ``submit`` and
``store``, so it works the same on every backend.

Decisions:

- **One thread per map.** The handle's thread works out each item's call, reads the
  journal, submits the calls and writes the journal; the caller's thread only waits.
  So the kernel's stop button (a ``KeyboardInterrupt`` in the main thread) can never
  land inside ``submit`` and lose a future: every future is stored, under the handle's
  lock, by the thread that got it, and a future stored after ``cancel()`` is cancelled
  on the spot. The same thread writes the journal in batches (whatever finished since
  the last write), so the pool's dispatcher thread, which runs the futures' callbacks,
  only counts and queues.
- **Outcomes.** Every item ends in exactly one state: ``restored`` (taken from the
  journal, not run), ``done`` (ran, returned a value), ``failed`` (ran or could not be
  sent; holds its exception) or ``cancelled`` (cancelled before it finished: by
  ``cancel()``, the stop button, or a ``CallCancelled`` reply; holds
  ``concurrent.futures.CancelledError`` or the ``CallCancelled``). :class:`MapProgress`
  counts them apart; :class:`MapResult` lists the indexes of each (``.errors`` has both
  failed and cancelled items, ``.failed`` and ``.cancelled`` tell them apart).
- **Rate and time left.** The rate is items run (done + failed) per second since the
  first call was sent, restored items excluded; the estimate is what is left at that
  rate.
- **Journal** (:mod:`dspool_jupyter.journal`): a value and a program's failure
  (``ProgramError``, ``CallTimeout``, ``WorkerCrashed``, unpicklable arguments) are
  journaled; a cancelled call, a closed pool and a deleted program are not (they say
  nothing about the item). On the next run journaled values are restored and failed
  items run again unless ``keep_errors=True``. The program is resolved once, when the
  map starts: its id is the journal's key, and a map whose program is redefined while
  it runs journals what it ran under the id it started with.
- **Bad input** raises at once with what was wrong (``TypeError``/``ValueError``,
  ``ProgramNotFound``, :class:`~dspool_jupyter.journal.JournalMismatch`); a problem of
  one item (cannot be unpacked, cannot be pickled or keyed for the journal) fails that
  item only.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CallCancelled, PoolClosed, ProgramNotFound
from .journal import Journal, UnjournalableItem, check_journal_name, item_key, open_journal

if TYPE_CHECKING:
    from .pool import Pool

__all__ = [
    "FLUSH_EVERY",
    "MapHandle",
    "MapProgress",
    "MapResult",
    "start_map",
]

log = logging.getLogger(__name__)

FLUSH_EVERY = 256  # submits between journal writes while a map is still being sent
_PENDING, _RESTORED, _DONE, _FAILED, _CANCELLED = range(5)
_NOT_JOURNALED = (PoolClosed, ProgramNotFound, CallCancelled, UnjournalableItem)


class MapResult(list[Any]):
    """A map's results in input order; a failed or cancelled item holds its exception.

    ``errors`` maps the index of every item that did not return a value to its
    exception; ``failed`` and ``cancelled`` are the sorted indexes of each kind;
    ``restored`` the indexes taken from the journal instead of run; ``pending`` (only in
    ``Journal.results()``) the ones with no outcome yet.
    """

    def __init__(
        self, values: Iterable[Any] = (), errors: dict[int, BaseException] | None = None
    ) -> None:
        super().__init__(values)
        self.errors: dict[int, BaseException] = dict(errors or {})
        self.cancelled: list[int] = []
        self.restored: list[int] = []
        self.pending: list[int] = []

    @property
    def ok(self) -> bool:
        """True when every item returned a value."""
        return not self.errors

    @property
    def failed(self) -> list[int]:
        """Indexes of the items that failed (cancelled ones excluded)."""
        cancelled = set(self.cancelled)
        return sorted(i for i in self.errors if i not in cancelled)


@dataclass(frozen=True)
class MapProgress:
    """A snapshot of a map: counts of each outcome, and seconds since it started."""

    total: int
    restored: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    elapsed: float = 0.0
    running_for: float = 0.0  # seconds since the first call was sent
    finished: bool = False

    @property
    def pending(self) -> int:
        """Items with no outcome yet."""
        return self.total - self.restored - self.done - self.failed - self.cancelled

    @property
    def ended(self) -> int:
        """Items with an outcome (restored, done, failed or cancelled)."""
        return self.total - self.pending

    @property
    def rate(self) -> float | None:
        """Items run (done + failed) per second; None before any finished."""
        ran = self.done + self.failed
        if ran == 0 or self.running_for <= 0:
            return None
        return ran / self.running_for

    @property
    def eta(self) -> float | None:
        """Estimated seconds until every item has an outcome; None if unknown."""
        if self.pending == 0:
            return 0.0
        rate = self.rate
        return None if rate is None else self.pending / rate

    def text(self, label: str = "map") -> str:
        """One line, e.g. ``map qa: 150/200 · 120 done, 2 failed, 28 restored · 3.1 s, ...``."""
        parts = [
            f"{count} {word}"
            for count, word in (
                (self.done, "done"),
                (self.failed, "failed"),
                (self.cancelled, "cancelled"),
                (self.restored, "restored"),
            )
            if count
        ]
        timing = [_seconds(self.elapsed)]
        rate = self.rate
        if rate is not None:
            timing.append(f"{rate:.0f}/s" if rate >= 100 else f"{rate:.3g}/s")
        if not self.finished and self.pending:
            eta = self.eta
            timing.append("? left" if eta is None else f"~{_seconds(eta)} left")
        counts = ", ".join(parts) if parts else "0 done"
        return f"{label}: {self.ended}/{self.total} · {counts} · {', '.join(timing)}"


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class MapHandle:
    """A map on its way: ``progress``, ``wait``/``done``, ``result()``, ``cancel()``.

    Made by ``Pool.map_async`` (started) or by ``MapHandle(...)`` then ``start()``. The
    constructor checks everything that can be checked before running (the program, the
    options, the journal's owner) and raises on a mistake; ``result()`` never raises for
    a failed item (the item holds its exception).
    """

    def __init__(
        self,
        pool: Pool,
        program: str,
        items: Iterable[Any],
        *,
        arg: str | None = None,
        unpack: bool = False,
        session: str | None = None,
        timeout: float | None = None,
        journal: str | None = None,
        keep_errors: bool = False,
        common_args: Sequence[Any] = (),
        common_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(program, str) or not program:
            raise TypeError(f"the program must be a name (text), got {program!r}")
        if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
            raise TypeError(
                f"items must be a list (or another iterable) of items, got a {type(items).__name__}"
            )
        if arg is not None and (not isinstance(arg, str) or not arg.isidentifier()):
            raise ValueError(f"arg must name a keyword argument, got {arg!r}")
        if arg is not None and unpack:
            raise ValueError("use either arg= (each item as that keyword) or unpack=True, not both")
        if session is not None and not isinstance(session, str):
            raise TypeError(f"session must be a name (text) or None, got {session!r}")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if keep_errors and journal is None:
            raise ValueError("keep_errors=True keeps journaled failures: it needs journal=NAME")
        if isinstance(common_args, (str, bytes)) or not isinstance(common_args, Sequence):
            raise TypeError(f"common_args must be a tuple or list, got {common_args!r}")
        if common_kwargs is not None and not (
            isinstance(common_kwargs, dict) and all(isinstance(k, str) for k in common_kwargs)
        ):
            raise TypeError(f"common_kwargs must map names (text) to values, got {common_kwargs!r}")
        if journal is not None:
            check_journal_name(journal)
        self.pool = pool
        self.program = program
        self.items = list(items)
        self.arg = arg
        self.unpack = unpack
        self.session = session
        self.timeout = timeout
        self.journal_name = journal
        self.keep_errors = keep_errors
        self.common_args = tuple(common_args)
        self.common_kwargs = dict(common_kwargs or {})
        if pool.closed and journal is None:
            raise PoolClosed()
        self.program_id = pool.store.resolve(program, session)  # ProgramNotFound, at once
        self._journal: Journal | None = None
        if journal is not None:
            self._journal = open_journal(pool.store, journal, create=True)
            try:
                self._journal.check_program(program)
            except BaseException:
                self._journal.close()
                raise

        total = len(self.items)
        self._lock = threading.Lock()
        self._state = [_PENDING] * total
        self._values: list[Any] = [None] * total
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self._keys: list[str | None] = [None] * total
        self._counts = [0] * 5
        self._cancelled = False
        self._outstanding = 1  # submitted calls not yet ended, +1 while still submitting
        self._finished_q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._first_sent: float | None = None
        self._ended: float | None = None
        self._callbacks: list[Callable[[MapHandle], None]] = []
        self.journal_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<MapHandle {self.progress.text(repr(self.program))}>"

    # -- public
    def start(self) -> MapHandle:
        """Start the map's thread (once); returns the handle."""
        with self._lock:
            if self._thread is not None:
                return self
            self._started = time.monotonic()
            self._thread = threading.Thread(
                target=self._run, name=f"dspool-map-{self.program}", daemon=True
            )
        self._thread.start()
        return self

    @property
    def progress(self) -> MapProgress:
        """The counts so far (thread-safe)."""
        with self._lock:
            counts = list(self._counts)
            now = self._ended if self._ended is not None else time.monotonic()
            started = self._started or now
            sent = self._first_sent
        return MapProgress(
            total=len(self.items),
            restored=counts[_RESTORED],
            done=counts[_DONE],
            failed=counts[_FAILED],
            cancelled=counts[_CANCELLED],
            elapsed=max(0.0, now - started),
            running_for=0.0 if sent is None else max(0.0, now - sent),
            finished=self._finished.is_set(),
        )

    def done(self) -> bool:
        """True when every item has its outcome (and the journal is written)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the map to end; True if it has."""
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None) -> MapResult:
        """The results in input order (waits); ``TimeoutError`` after ``timeout`` s."""
        if self._thread is None:
            self.start()
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the map of {self.program!r} did not end within {timeout} s")
        if self._error is not None:
            raise self._error
        with self._lock:
            errors = {
                i: self._values[i]
                for i, state in enumerate(self._state)
                if state in (_FAILED, _CANCELLED)
                or (state == _RESTORED and isinstance(self._values[i], BaseException))
            }
            result = MapResult(self._values, errors)
            result.cancelled = [i for i, s in enumerate(self._state) if s == _CANCELLED]
            result.restored = [i for i, s in enumerate(self._state) if s == _RESTORED]
        return result

    def cancel(self) -> None:
        """Cancel every call of the map that has not ended (running ones are interrupted)."""
        with self._lock:
            self._cancelled = True
            futures = list(self._futures.values())
        for future in futures:
            future.cancel()

    def add_done_callback(self, callback: Callable[[MapHandle], None]) -> None:
        """Call ``callback(handle)`` when the map ends (at once if it has), on any thread."""
        with self._lock:
            if not self._finished.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    # -- the map's thread
    def _run(self) -> None:
        try:
            to_run = self._prepare()
            self._submit_all(to_run)
            self._drain()
        except BaseException as exc:
            log.exception("dspool map of %r failed", self.program)
            self._error = exc
            self.cancel()
        finally:
            if self._journal is not None:
                self._journal.close()
            with self._lock:
                self._ended = time.monotonic()
                self._finished.set()
                callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    log.exception("dspool map callback failed")

    def _call_of(self, item: Any) -> tuple[list[Any], dict[str, Any]]:
        positional = list(self.common_args)
        kwargs = dict(self.common_kwargs)
        if self.arg is not None:
            kwargs[self.arg] = item
        elif self.unpack:
            if isinstance(item, dict):
                if not all(isinstance(k, str) for k in item):
                    raise TypeError("unpack: a dict item's keys must be argument names (text)")
                kwargs.update(item)
            elif isinstance(item, (tuple, list)):
                positional.extend(item)
            else:
                raise TypeError(
                    f"unpack: cannot unpack a {type(item).__name__} (a dict gives keywords, "
                    "a tuple or list positional arguments)"
                )
        else:
            positional.append(item)
        return positional, kwargs

    def _prepare(self) -> list[tuple[int, list[Any], dict[str, Any]]]:
        """Each item's call; journaled outcomes restored. Returns the calls still to run."""
        calls: list[tuple[int, list[Any], dict[str, Any]]] = []
        for index, item in enumerate(self.items):
            try:
                positional, kwargs = self._call_of(item)
            except TypeError as exc:
                self._end(index, _FAILED, TypeError(f"item {index}: {exc}"))
                continue
            if self._journal is not None:
                try:
                    self._keys[index] = item_key(positional, kwargs)
                except Exception as exc:  # the encoder's TypeError already names the cause
                    reason = str(exc) if type(exc) is TypeError else f"{type(exc).__name__}: {exc}"
                    self._end(index, _FAILED, UnjournalableItem(index, item, reason))
                    continue
            calls.append((index, positional, kwargs))
        journal = self._journal
        if journal is None:
            return calls
        entries = journal.entries()
        journal.begin(self.program, self.program_id, self.session, self._keys)
        prefix = f"{self.program_id}|"
        remaining = []
        for index, positional, kwargs in calls:
            entry = entries.get(prefix + str(self._keys[index]))
            if entry is not None and entry.ok:
                self._end(index, _RESTORED, entry.value)
            elif entry is not None and self.keep_errors:
                self._end(index, _RESTORED, entry.error)
            else:
                remaining.append((index, positional, kwargs))
        return remaining

    def _submit_all(self, calls: list[tuple[int, list[Any], dict[str, Any]]]) -> None:
        with self._lock:
            if calls:
                self._first_sent = time.monotonic()
        for sent, (index, positional, kwargs) in enumerate(calls):
            if self._cancelled:
                self._end(index, _CANCELLED, concurrent.futures.CancelledError())
                continue
            try:
                future: concurrent.futures.Future[Any] = self.pool.submit(
                    self.program, *positional, session=self.session, timeout=self.timeout, **kwargs
                )
            except Exception as exc:  # PoolClosed: the pool closed while the map was sent
                self._end(index, _FAILED, exc)
                continue
            with self._lock:
                self._futures[index] = future
                self._outstanding += 1
                cancel = self._cancelled
            if cancel:
                future.cancel()
            future.add_done_callback(functools.partial(self._on_done, index))
            if self._journal is not None and sent % FLUSH_EVERY == FLUSH_EVERY - 1:
                self._write(self._take_finished())
        with self._lock:
            self._outstanding -= 1
            last = self._outstanding == 0
        if last:
            self._finished_q.put(None)

    def _on_done(self, index: int, future: concurrent.futures.Future[Any]) -> None:
        """A call ended (on the pool's dispatcher thread: count and queue, nothing more)."""
        value: Any
        if future.cancelled():
            state, value = _CANCELLED, concurrent.futures.CancelledError()
        else:
            error = future.exception()
            if error is None:
                state, value = _DONE, future.result()
            elif isinstance(error, CallCancelled):
                state, value = _CANCELLED, error
            else:
                state, value = _FAILED, error
        self._end(index, state, value)
        journal = state != _CANCELLED and not isinstance(value, _NOT_JOURNALED)
        with self._lock:
            self._futures.pop(index, None)
            self._outstanding -= 1
            last = self._outstanding == 0
        if journal and self._journal is not None:
            self._finished_q.put(index)
        if last:
            self._finished_q.put(None)

    def _end(self, index: int, state: int, value: Any) -> None:
        with self._lock:
            if self._state[index] != _PENDING:
                return
            self._state[index] = state
            self._values[index] = value
            self._counts[state] += 1

    def _take_finished(self) -> list[int]:
        finished: list[int] = []
        while True:
            try:
                index = self._finished_q.get_nowait()
            except queue.Empty:
                return finished
            if index is None:  # the end: put back for _drain
                self._finished_q.put(None)
                return finished
            finished.append(index)

    def _drain(self) -> None:
        """Write outcomes to the journal as they come, until every call has ended."""
        while True:
            index = self._finished_q.get()
            if index is None:
                return
            self._write([index, *self._take_finished()])

    def _write(self, indexes: list[int]) -> None:
        journal = self._journal
        if journal is None or not indexes or self.journal_error is not None:
            return
        prefix = f"{self.program_id}|"
        with self._lock:
            outcomes = [
                (prefix + str(self._keys[i]), self._state[i] == _DONE, self._values[i])
                for i in indexes
            ]
        try:
            journal.write(outcomes)
        except Exception as exc:  # a full disk must not lose the map's results in memory
            log.warning(
                "dspool map of %r: journal %r not written: %s", self.program, journal.name, exc
            )
            self.journal_error = exc


def start_map(pool: Pool, program: str, items: Iterable[Any], **options: Any) -> MapHandle:
    """A started :class:`MapHandle` (``Pool.map_async``)."""
    return MapHandle(pool, program, items, **options).start()
