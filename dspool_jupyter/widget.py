"""The live status view of a pool: ipywidgets over pool snapshots, with an HTML/text fallback.

Model apart from view: the pool gives plain snapshots (``pool.status()``,
:mod:`dspool_jupyter.status`); :func:`build_model` turns one into a :class:`ViewModel`
(adding the rows of workers that just died, which a snapshot no longer lists), and the
pure functions :func:`render_html` / :func:`render_text` and the widgets only render it.

:class:`StatusView` shows one pool:

- a start-up progress bar (workers ready / target) coloured by the pool's state;
- one row per worker: id, pid, state as colour, calls, errors, memory, heartbeat age
  and the program it runs, with a button that restarts it; a worker that died stays
  listed in red for :data:`DEAD_ROW_SECONDS` with how it died;
- the recent failed calls (program, worker, error line, the traceback in an expandable
  ``<details>``), and a button that restarts the pool.

Updates are live and throttled. The view subscribes to the pool's events; an event only
marks the view dirty (the callback runs on the pool's dispatcher thread and never
waits), and a refresher thread of the view takes a snapshot and re-renders at most once
every ``interval`` seconds (default :data:`DEFAULT_INTERVAL`), or after
:data:`URGENT_INTERVAL` for the events a user must see at once (a worker died, a call
failed, the pool became ready or closed), never once per event. With no events it still
refreshes every :data:`IDLE_REFRESH` seconds so heartbeat ages stay true. Widgets only
send what changed. The thread starts when the view is first shown and stops when the
pool closes (after showing it closed) or on :meth:`StatusView.close`.

Without ipywidgets (or outside a Jupyter kernel) the view is an HTML table
(``text/html``) that is updated in place through a display id when shown with
:meth:`StatusView.show`; in a terminal, ``show`` prints the text table.

The ``text/plain`` of the view is the stable one-liner of :func:`summary_text` (no pids,
times or ids), so notebooks stay checkable by nbval.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import DspoolError, describe_returncode
from .events import WorkerDied
from .status import FailedCall, PoolStatus

if TYPE_CHECKING:
    from .events import Event

__all__ = [
    "DEAD_ROW_SECONDS",
    "DEFAULT_INTERVAL",
    "IDLE_REFRESH",
    "STATE_COLOURS",
    "URGENT_INTERVAL",
    "FailuresView",
    "StatusView",
    "ViewModel",
    "WorkerRow",
    "build_model",
    "render_failures_html",
    "render_failures_text",
    "render_html",
    "render_text",
    "summary_text",
]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.25  # seconds between refreshes while events arrive (4 a second at most)
URGENT_INTERVAL = 0.05  # seconds: a death, a failed call, ready or closed shows this fast
IDLE_REFRESH = 1.0  # seconds between refreshes when no event came (heartbeat ages, memory)
DEAD_ROW_SECONDS = 15.0  # seconds a dead worker's row stays in the table
SHOWN_FAILURES = 10  # recent failed calls listed, newest first
URGENT_EVENTS = frozenset(
    {"worker_died", "worker_replaced", "call_failed", "pool_ready", "pool_closed"}
)

STATE_COLOURS = {
    "healthy": "#2e7d32",  # the pool's states
    "degraded": "#ef6c00",
    "closed": "#757575",
    "idle": "#2e7d32",  # green
    "busy": "#1565c0",  # blue
    "starting": "#ef6c00",  # orange
    "stopping": "#ef6c00",
    "stopped": "#757575",  # grey: restarted on purpose
    "dead": "#c62828",  # red
}
POOL_BAR_STYLES = {"starting": "info", "healthy": "success", "degraded": "warning"}
COLUMNS = (  # (title, width in characters) of the worker table
    ("worker", 7),
    ("pid", 8),
    ("state", 9),
    ("calls", 8),
    ("errors", 7),
    ("memory", 10),
    ("heartbeat", 11),
    ("running / note", 0),  # the rest of the line
)


class PoolLike(Protocol):
    """The part of :class:`dspool_jupyter.pool.Pool` the view uses."""

    @property
    def closed(self) -> bool: ...

    @property
    def target(self) -> int: ...

    def status(self) -> PoolStatus: ...

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]: ...

    def restart_worker(self, worker_id: str) -> None: ...

    def restart(self) -> None: ...


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class WorkerRow:
    """One row of the worker table; ``state`` adds 'dead' and 'stopped' to the pool's."""

    id: str
    pid: int | None
    state: str
    calls: int
    errors: int
    rss_bytes: int | None
    heartbeat_age: float | None  # seconds since the last heartbeat
    program: str | None
    note: str = ""


@dataclass(frozen=True)
class ViewModel:
    """What the view shows: a snapshot plus the workers that died recently."""

    state: str
    target: int
    ready_count: int
    rows: tuple[WorkerRow, ...]
    calls: int
    failed: int
    replaced: int
    queued: int
    running: int
    last_error: str | None
    failures: tuple[FailedCall, ...]  # newest first, at most SHOWN_FAILURES


@dataclass(frozen=True)
class Departed:
    """A worker that left the snapshot: its last row, when it left, and how (if known)."""

    row: WorkerRow
    since: float  # monotonic seconds
    reason: str | None = None
    returncode: int | None = None


def build_model(
    status: PoolStatus, departed: Mapping[str, Departed] = {}, now: float | None = None
) -> ViewModel:
    """Turn a snapshot (and the recently departed workers) into what the view shows."""
    now = time.time() if now is None else now
    rows = [
        WorkerRow(
            id=w.id,
            pid=w.pid,
            state=w.state,
            calls=w.calls,
            errors=w.errors,
            rss_bytes=w.rss_bytes,
            heartbeat_age=None if w.last_heartbeat is None else max(0.0, now - w.last_heartbeat),
            program=w.program,
        )
        for w in status.workers
    ]
    for gone in departed.values():
        if status.state == "closed":
            state, note = "stopped", "pool closed"
        elif gone.reason == "restart":
            state, note = "stopped", "restarted"
        elif gone.reason == "close":
            state, note = "stopped", "pool closed"
        else:
            state = "dead"
            if gone.reason in ("timeout", "cancel"):
                note = f"killed ({gone.reason})"
            elif gone.returncode is not None:
                note = describe_returncode(gone.returncode)
            else:
                note = "died"
        rows.append(
            WorkerRow(
                id=gone.row.id,
                pid=gone.row.pid,
                state=state,
                calls=gone.row.calls,
                errors=gone.row.errors,
                rss_bytes=None,
                heartbeat_age=None,
                program=None,
                note=note,
            )
        )
    rows.sort(key=_worker_order)
    return ViewModel(
        state=status.state,
        target=status.target,
        ready_count=status.ready_count,
        rows=tuple(rows),
        calls=status.calls,
        failed=status.failed,
        replaced=status.replaced,
        queued=status.queued,
        running=status.running,
        last_error=status.last_error,
        failures=tuple(reversed(status.recent_failures[-SHOWN_FAILURES:])),
    )


def _worker_order(row: WorkerRow) -> tuple[int, str]:
    digits = row.id.lstrip("w")
    return (int(digits) if digits.isdigit() else 1 << 30, row.id)


# -------------------------------------------------------------------------- rendering


def summary_text(target: int | None) -> str:
    """The view's stable ``text/plain``: no pids, times, ids or live counts."""
    if target is None:
        return "dspool: no pool"
    return f"dspool pool status ({target} worker{'s' if target != 1 else ''}, live view)"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def _age(seconds: float | None) -> str:
    # whole seconds: the text only changes when it means something (fewer widget updates)
    return "-" if seconds is None else f"{int(seconds)} s ago"


def _cells(row: WorkerRow) -> list[str]:
    return [
        row.id,
        "-" if row.pid is None else str(row.pid),
        row.state,
        str(row.calls),
        str(row.errors),
        _bytes(row.rss_bytes),
        _age(row.heartbeat_age),
        row.note or row.program or "",
    ]


def _headline(model: ViewModel) -> str:
    text = (
        f"{model.state}, {model.ready_count}/{model.target} workers ready, "
        f"{model.calls} calls, {model.failed} failed, {model.replaced} replaced, "
        f"{model.running} running, {model.queued} queued"
    )
    return text


def render_text(model: ViewModel | None) -> str:
    """The whole view as a text table (terminals, logs)."""
    if model is None:
        return summary_text(None)
    lines = [f"dspool pool: {_headline(model)}"]
    if model.last_error:
        lines.append(f"last error: {model.last_error}")
    table = [[title for title, _ in COLUMNS], *(_cells(r) for r in model.rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if model.failures:
        lines.append("recent failed calls (newest first):")
        lines.extend(f"  {_failure_line(f)}" for f in model.failures)
    return "\n".join(lines)


def _failure_line(failure: FailedCall) -> str:
    where = f" on {failure.worker_id}" if failure.worker_id else ""
    message = failure.message.splitlines()[0] if failure.message else ""
    return f"{failure.program}{where}: {failure.error}: {message}"


def _state_badge(state: str, worker_id: str = "") -> str:
    colour = STATE_COLOURS.get(state, "#757575")
    attrs = f' data-worker="{html.escape(worker_id)}"' if worker_id else ""
    return (
        f'<span class="dspool-state"{attrs} data-state="{html.escape(state)}" '
        f'style="color:white;background:{colour};border-radius:3px;padding:0 3px">'
        f"{html.escape(state)}</span>"
    )


_ROW_STYLE = "font-family:monospace;white-space:pre"


def _row_html(row: WorkerRow) -> str:
    """One worker as a line of fixed-width columns (small: it is re-sent when it changes)."""
    out = []
    for i, ((_, width), text) in enumerate(zip(COLUMNS, _cells(row), strict=True)):
        pad = " " * max(1, width - len(text)) if width else ""
        out.append((_state_badge(row.state, row.id) if i == 2 else html.escape(text)) + pad)
    return f'<div class="dspool-row" style="{_ROW_STYLE}">{"".join(out)}</div>'


def _head_html() -> str:
    titles = "".join(title.ljust(width) for title, width in COLUMNS)
    return f'<div style="{_ROW_STYLE};font-weight:bold">{html.escape(titles)}</div>'


def _headline_html(model: ViewModel) -> str:
    error = ""
    if model.last_error:
        error = (
            f'<br><span style="color:#c62828">last error: {html.escape(model.last_error)}</span>'
        )
    return (
        f"<b>dspool pool</b> {_state_badge(model.state)} "
        f"{html.escape(_headline(model).split(', ', 1)[1])}{error}"
    )


def render_failures_html(failures: tuple[FailedCall, ...] | list[FailedCall]) -> str:
    """Failed calls as a list; each traceback is in an expandable ``<details>``."""
    if not failures:
        return '<div style="color:#757575">no failed calls</div>'
    items = []
    for failure in failures:
        line = html.escape(_failure_line(failure))
        if failure.traceback:
            items.append(
                f'<details class="dspool-failure"><summary style="color:#c62828">{line}</summary>'
                f'<pre style="font-size:90%">{html.escape(failure.traceback)}</pre></details>'
            )
        else:
            items.append(f'<div class="dspool-failure" style="color:#c62828">{line}</div>')
    return "<div><b>recent failed calls</b> (newest first)" + "".join(items) + "</div>"


def render_failures_text(failures: tuple[FailedCall, ...] | list[FailedCall]) -> str:
    """Failed calls with their full tracebacks, as text."""
    if not failures:
        return "no failed calls"
    parts = []
    for failure in failures:
        parts.append(_failure_line(failure))
        if failure.traceback:
            parts.append("    " + failure.traceback.rstrip("\n").replace("\n", "\n    "))
    return "\n".join(parts)


def render_html(model: ViewModel | None) -> str:
    """The whole view as static HTML (the fallback without ipywidgets)."""
    if model is None:
        return f"<div>{html.escape(summary_text(None))}</div>"
    percent = 100 * min(model.ready_count, model.target) // max(model.target, 1)
    rows = "".join(_row_html(r) for r in model.rows)
    return (
        f'<div class="dspool-status">{_headline_html(model)}'
        f'<div><progress value="{model.ready_count}" max="{model.target}" '
        f'style="width:20em"></progress> {model.ready_count}/{model.target} ready '
        f"({percent} %)</div>"
        f"{_head_html()}{rows}{render_failures_html(model.failures)}</div>"
    )


class FailuresView:
    """The recent failed calls of a pool (``%dspool errors``): HTML with details, or text."""

    def __init__(self, failures: tuple[FailedCall, ...] | list[FailedCall]) -> None:
        self.failures = tuple(failures)

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None, **kwargs: Any
    ) -> dict[str, str]:
        return {
            "text/plain": render_failures_text(self.failures),
            "text/html": render_failures_html(self.failures),
        }


# ------------------------------------------------------------------------------- view


def _ipywidgets() -> Any:
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


def _display(obj: object, **kwargs: Any) -> Any:
    """``IPython.display.display`` (typed for mypy); returns its display handle, if any."""
    from IPython.display import display

    return display(obj, **kwargs)  # type: ignore[no-untyped-call]


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


class StatusView:
    """A live view of ``pool``: a widget in a Jupyter kernel, HTML or text elsewhere.

    ``interval``: seconds between refreshes while events arrive (the throttle).
    ``widgets``: use ipywidgets (True), never (False), or when ipywidgets is importable
    and this runs in a Jupyter kernel (None). Display it (it is the cell's value, or
    ``display(view)``), or call :meth:`show`. ``renders`` counts the refreshes and
    ``render_seconds`` is the CPU time they took on the refresher thread.
    """

    def __init__(
        self,
        pool: PoolLike,
        *,
        interval: float = DEFAULT_INTERVAL,
        widgets: bool | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.pool = pool
        self.interval = interval
        self.renders = 0
        self.render_seconds = 0.0
        self.model: ViewModel | None = None
        self._widgets_wanted = widgets
        self._cond = threading.Condition()
        self._dirty = False
        self._urgent = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._render_lock = threading.Lock()
        self._last_render = float("-inf")  # monotonic
        self._seen: dict[str, WorkerRow] = {}
        self._departed: dict[str, Departed] = {}
        self._deaths: dict[str, tuple[str, int | None]] = {}  # from WorkerDied events
        self._handles: list[Any] = []  # display handles of the HTML fallback
        self._box: Any = None
        self._parts: dict[str, Any] = {}
        self._rows: dict[str, tuple[Any, Any, Any]] = {}  # worker id -> (row, html, button)
        self._failure_ids: tuple[int, ...] | None = None

    # -- public
    @property
    def uses_widgets(self) -> bool:
        """Whether this view renders as ipywidgets."""
        if self._widgets_wanted is not None:
            return self._widgets_wanted and _ipywidgets() is not None
        return _ipywidgets() is not None and _in_kernel()

    @property
    def widget(self) -> Any:
        """The ipywidgets box (built on first use); None when widgets are not used."""
        if not self.uses_widgets:
            return None
        self._ensure_live()
        return self._build()

    def show(self) -> None:
        """Display the view: the widget, a live HTML table, or (no kernel) the text table."""
        self._ensure_live()
        if self.uses_widgets:
            _display(self)
        elif _in_kernel():
            handle = _display(self, display_id=True)
            with self._render_lock:
                self._handles.append(handle)
        else:
            import sys

            sys.stdout.write(render_text(self.model) + "\n")

    def refresh(self) -> ViewModel:
        """Take a snapshot and render it now (the refresher thread calls this)."""
        started = time.thread_time()
        with self._render_lock:
            model = self._snapshot()
            self.model = model
            if self._box is not None:
                self._apply(model)
            handles = list(self._handles)
            self.renders += 1
            self._last_render = time.monotonic()
        for handle in handles:
            try:
                handle.update(self)
            except Exception:
                log.debug("dspool view: updating a display failed", exc_info=True)
        self.render_seconds += time.thread_time() - started
        return model

    def request_refresh(self, urgent: bool = False) -> None:
        """Ask for a refresh within the throttle interval (``urgent``: at once)."""
        with self._cond:
            self._dirty = True
            self._urgent = self._urgent or urgent
            self._cond.notify()

    def close(self) -> None:
        """Stop following the pool (the view keeps showing its last state)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._unfollow()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)

    @property
    def following(self) -> bool:
        """True while the refresher thread follows the pool."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        self._ensure_live()
        text = summary_text(self.pool.target)
        if self.uses_widgets:
            bundle: dict[str, Any] = dict(self._build()._repr_mimebundle_())
            bundle["text/plain"] = text
            return bundle
        return {"text/plain": text, "text/html": render_html(self.model)}

    def __repr__(self) -> str:
        return f"<StatusView {summary_text(self.pool.target)}>"

    # -- following the pool
    def _ensure_live(self) -> None:
        with self._cond:
            if self._thread is not None or self._stopped:
                return
            self._unsubscribe = self.pool.subscribe(self._on_event)
            self._thread = threading.Thread(
                target=self._run, name="dspool-status-view", daemon=True
            )
        self.refresh()
        self._thread.start()

    def _unfollow(self) -> None:
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()

    def _on_event(self, event: Event) -> None:
        """Pool dispatcher thread: note the change and return; never render here."""
        kind = event.kind
        if kind in URGENT_EVENTS:
            if isinstance(event, WorkerDied):
                self._deaths[event.worker_id] = (event.reason, event.returncode)
            with self._cond:
                self._dirty = self._urgent = True
                self._cond.notify()
        elif not self._dirty:  # read without the lock: a missed wake-up is covered below
            with self._cond:
                self._dirty = True
                self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    idle_until = time.monotonic() + IDLE_REFRESH
                    while not (self._dirty or self._stopped):
                        remaining = idle_until - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    while not self._stopped:
                        gap = URGENT_INTERVAL if self._urgent else self.interval
                        remaining = self._last_render + gap - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if self._stopped:
                        return
                    # Cleared before the snapshot: an event after this point marks it again.
                    self._dirty = self._urgent = False
                self.refresh()
                if self.pool.closed and self.model is not None and self.model.state == "closed":
                    return
        except Exception:
            log.exception("dspool status view stopped")
        finally:
            self._unfollow()

    def _snapshot(self) -> ViewModel:
        status = self.pool.status()
        mono = time.monotonic()
        current = {w.id for w in status.workers}
        for worker_id, row in self._seen.items():
            if worker_id not in current and worker_id not in self._departed:
                self._departed[worker_id] = Departed(row=row, since=mono)
        for worker_id, gone in list(self._departed.items()):
            if mono - gone.since > DEAD_ROW_SECONDS:
                del self._departed[worker_id]
                self._deaths.pop(worker_id, None)
            elif gone.reason is None and worker_id in self._deaths:
                reason, returncode = self._deaths[worker_id]
                self._departed[worker_id] = Departed(gone.row, gone.since, reason, returncode)
        model = build_model(status, self._departed)
        self._seen = {r.id: r for r in model.rows if r.id in current}
        return model

    # -- widgets (built lazily, only touched under the render lock or when building)
    def _build(self) -> Any:
        with self._render_lock:
            if self._box is not None:
                return self._box
            w = _ipywidgets()
            parts = self._parts
            parts["headline"] = w.HTML()
            parts["progress"] = w.IntProgress(
                min=0, max=max(self.pool.target, 1), description="ready", bar_style="info"
            )
            parts["progress_label"] = w.Label()
            parts["head"] = w.HTML(_head_html())
            parts["rows"] = w.VBox()
            parts["failures"] = w.HTML()
            restart = w.Button(
                description="Restart pool",
                icon="refresh",
                button_style="warning",
                tooltip="replace every worker (running calls fail with WorkerCrashed)",
            )
            restart.on_click(lambda _button: self._restart_pool())
            parts["restart"] = restart
            parts["message"] = w.HTML()
            self._box = w.VBox(
                [
                    parts["headline"],
                    w.HBox([parts["progress"], parts["progress_label"]]),
                    parts["head"],
                    parts["rows"],
                    parts["failures"],
                    w.HBox([restart, parts["message"]]),
                ]
            )
            if self.model is not None:
                self._apply(self.model)
            return self._box

    def _apply(self, model: ViewModel) -> None:
        w = _ipywidgets()
        parts = self._parts
        parts["headline"].value = _headline_html(model)
        progress = parts["progress"]
        with progress.hold_sync():
            progress.max = max(model.target, 1)
            progress.value = min(model.ready_count, model.target)
            progress.bar_style = POOL_BAR_STYLES.get(model.state, "danger")
        parts["progress_label"].value = f"{model.ready_count}/{model.target}"
        ids = []
        for row in model.rows:
            ids.append(row.id)
            entry = self._rows.get(row.id)
            if entry is None:
                cells = w.HTML()
                button = w.Button(
                    description="restart",
                    icon="refresh",
                    tooltip=f"restart worker {row.id}",
                    layout=w.Layout(width="auto"),
                )
                button.on_click(lambda _button, worker_id=row.id: self._restart_worker(worker_id))
                entry = (w.HBox([cells, button]), cells, button)
                self._rows[row.id] = entry
            entry[1].value = _row_html(row)
            entry[2].disabled = row.state not in ("idle", "busy")
        for gone in [i for i in self._rows if i not in ids]:
            row_box, cells, button = self._rows.pop(gone)
            for widget in (button, cells, row_box):
                widget.close()
        if tuple(parts["rows"].children) != tuple(self._rows[i][0] for i in ids):
            parts["rows"].children = tuple(self._rows[i][0] for i in ids)
        failure_ids = tuple(f.call_id for f in model.failures)
        if failure_ids != self._failure_ids:  # re-rendering would fold open tracebacks
            self._failure_ids = failure_ids
            parts["failures"].value = render_failures_html(model.failures)

    def _restart_worker(self, worker_id: str) -> None:
        self._command(lambda: self.pool.restart_worker(worker_id), f"restarting {worker_id}")

    def _restart_pool(self) -> None:
        self._command(self.pool.restart, "restarting the pool")

    def _command(self, action: Callable[[], None], doing: str) -> None:
        message = self._parts.get("message")
        try:
            action()
        except (DspoolError, ValueError) as exc:
            text = f'<span style="color:#c62828">{html.escape(str(exc))}</span>'
        else:
            text = f"<span>{html.escape(doing)}…</span>"
        if message is not None:
            message.value = text
        self.request_refresh(urgent=True)
