"""The live status view of a pool: ipywidgets over pool snapshots, with an HTML/text fallback.

Model apart from view: the pool gives plain snapshots (``pool.status()``,
:mod:`dspool_jupyter.status`); :func:`build_model` turns one into a :class:`ViewModel`
(adding the rows of workers that just died, which a snapshot no longer lists), and the
pure functions :func:`render_html` / :func:`render_text` and the widgets only render it.

:class:`StatusView` shows one pool:

- a start-up progress bar (workers ready / target) coloured by the pool's state;
- a headline with one meaning per word, the same as the lab panel's and status bar's:
  ``calls`` every call that ended, split into ``done``, ``failed`` and ``cancelled``;
  ``in flight`` calls running now out of the ``slots`` the ready workers have;
  ``queued`` calls waiting for a slot; while the template imports the preloads, what it
  imports and for how long so far; under it, once anything travelled, the bytes the
  worker sockets carried and the bytes that went as shared memory instead
  (:func:`transfer_text`; the local backend's counters, absent on Dask);
- the provider limits when the pool has any (:mod:`dspool_jupyter.limits`): per model
  the achieved requests/min and tokens/min against its limit, in flight and 429s seen;
  the LM usage so far (requests, tokens, cost) and the budget's spend;
- one row per worker: id, pid, state as colour, slots in use (``3/16``), calls, errors,
  memory, heartbeat age and the program it runs, with a button that restarts it; a
  worker that left stays listed for :data:`DEAD_ROW_SECONDS` with how it left (red
  when it died), as in the lab panel (:class:`dspool_jupyter.status.Departures`);
- the recent failed calls (program, worker, what went wrong; the traceback in an
  expandable ``<details>``, or for a crash or timeout the exit code, signal or
  timeout), and a button that restarts the pool after asking (disabled once the pool
  is closed).

Colours: one per state (:data:`STATE_COLOURS`), the same in the lab extension
(``labextension/style/base.css`` defines them as ``--dspool-state-*``).

Updates are live and throttled. The view subscribes to the pool's events; an event only
marks the view dirty (the callback runs on the pool's dispatcher thread and never
waits; :class:`dspool_jupyter.throttle.Throttle`, shared with the lab comm), and a
refresher thread of the view takes a snapshot and re-renders at most once every
``interval`` seconds (default :data:`DEFAULT_INTERVAL`), or after
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import DspoolError
from .status import (
    DEPARTED_SECONDS,
    Departed,
    Departures,
    FailedCall,
    PoolStatus,
    PoolView,
    format_bytes,
    limits_of,
    transfer_text,
)
from .throttle import URGENT_EVENTS, Throttle

if TYPE_CHECKING:
    from .events import Event
    from .usage import LimitsSnapshot

__all__ = [
    "DEAD_ROW_SECONDS",
    "DEFAULT_INTERVAL",
    "IDLE_REFRESH",
    "LIMITS_REFRESH",
    "STATE_COLOURS",
    "URGENT_EVENTS",
    "URGENT_INTERVAL",
    "FailuresView",
    "StatusView",
    "ViewModel",
    "WorkerRow",
    "build_model",
    "counts_text",
    "failure_line",
    "render_failures_html",
    "render_failures_text",
    "render_html",
    "render_limits_html",
    "render_text",
    "starting_text",
    "summary_text",
]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.25  # seconds between refreshes while events arrive (4 a second at most)
URGENT_INTERVAL = 0.05  # seconds: a death, a failed call, ready or closed shows this fast
IDLE_REFRESH = 1.0  # seconds between refreshes when no event came (heartbeat ages, memory)
DEAD_ROW_SECONDS = DEPARTED_SECONDS  # seconds a departed worker's row stays in the table
SHOWN_FAILURES = 10  # recent failed calls listed, newest first
LIMITS_REFRESH = 1.0  # seconds between snapshots of the provider limits (per-minute rates)

# One colour per state word, pool and worker alike; labextension/style/base.css has the
# same values (tests/test_widget.py checks), so the widget, panel and status bar agree.
STATE_COLOURS = {
    "starting": "#1565c0",  # blue
    "healthy": "#2e7d32",  # green
    "idle": "#2e7d32",
    "busy": "#00838f",  # teal
    "degraded": "#ef6c00",  # orange
    "stopping": "#ef6c00",
    "dead": "#c62828",  # red
    "closed": "#757575",  # grey
    "stopped": "#757575",
}
ERROR_COLOUR = STATE_COLOURS["dead"]
COLUMNS = (  # (title, width in characters) of the worker table
    ("worker", 7),
    ("pid", 8),
    ("state", 9),
    ("slots", 7),
    ("calls", 7),
    ("errors", 7),
    ("memory", 10),
    ("heartbeat", 11),
    ("running / note", 0),  # the rest of the line
)


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class WorkerRow:
    """One row of the worker table; ``state`` adds 'dead' and 'stopped' to the pool's.

    ``calls`` ended on this worker, ``errors`` of them in an error; ``active`` calls run
    on it now out of its ``slots``.
    """

    id: str
    pid: int | None
    state: str
    calls: int
    errors: int
    rss_bytes: int | None
    heartbeat_age: float | None  # seconds since the last heartbeat
    program: str | None
    note: str = ""
    active: int = 0
    slots: int = 1


@dataclass(frozen=True)
class ViewModel:
    """What the view shows: a snapshot plus the workers that left recently."""

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
    done: int = 0
    cancelled: int = 0
    slots: int = 0
    starting: str = ""  # what the start-up is doing, when it says more than the count
    died_recently: int = 0  # workers that died within DEAD_ROW_SECONDS
    limits: tuple[str, ...] = ()  # LimitsSnapshot.lines(): limits, usage, budget
    transfer: str = ""  # transfer_text(): bytes sent, received, shared and placed


def starting_text(status: PoolStatus, now: float | None = None) -> str:
    """What a start is doing beyond the ready count (the preload import), or ''."""
    if not status.importing or status.preload_started_at is None:
        return ""
    now = time.time() if now is None else now
    so_far = max(0.0, now - status.preload_started_at)
    return f"importing {', '.join(status.preload)} in the template ({so_far:.0f} s so far)"


def build_model(
    status: PoolStatus,
    departed: Iterable[Departed] = (),
    now: float | None = None,
    limits: LimitsSnapshot | None = None,
) -> ViewModel:
    """Turn a snapshot (the recently departed workers, the provider limits' snapshot)
    into what the view shows."""
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
            # today's pool leaves ``active`` at 0: a busy worker of one slot runs one call
            active=w.active or int(w.state == "busy"),
            slots=w.slots,
        )
        for w in status.workers
    ]
    # today's pool leaves ``slots`` at 0: the ready workers' slots are the same number
    slots = status.slots or sum(w.slots for w in status.workers if w.state in ("idle", "busy"))
    died = 0
    for gone in departed:
        died += gone.state == "dead"
        rows.append(
            WorkerRow(
                id=gone.worker.id,
                pid=gone.worker.pid,
                state=gone.state,
                calls=gone.worker.calls,
                errors=gone.worker.errors,
                rss_bytes=None,
                heartbeat_age=None,
                program=None,
                note=gone.note,
                active=0,
                slots=gone.worker.slots,
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
        done=status.done,
        cancelled=status.cancelled,
        slots=slots,
        starting=starting_text(status, now),
        died_recently=died,
        limits=tuple(limits.lines()) if limits is not None else (),
        transfer=transfer_text(status),
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


def _age(seconds: float | None) -> str:
    # whole seconds: the text only changes when it means something (fewer widget updates)
    return "-" if seconds is None else f"{int(seconds)} s ago"


def _cells(row: WorkerRow) -> list[str]:
    live = row.state not in ("dead", "stopped")
    return [
        row.id,
        "-" if row.pid is None else str(row.pid),
        row.state,
        f"{row.active}/{row.slots}" if live else "-",
        str(row.calls),
        str(row.errors),
        format_bytes(row.rss_bytes),
        _age(row.heartbeat_age),
        row.note or row.program or "",
    ]


def counts_text(model: ViewModel) -> str:
    """The headline after the state: readiness, in flight, queued, calls and how they ended.

    The words are the lab panel's and status bar's: ``in flight`` calls running now out of
    ``slots``; ``calls`` every call that ended, = ``done`` + ``failed`` + ``cancelled``.
    """
    parts = [f"{model.ready_count}/{model.target} workers ready"]
    if model.starting:
        parts.append(model.starting)
    parts.append(f"{model.running}/{model.slots} slots in flight")
    parts.append(f"{model.queued} queued")
    parts.append(
        f"{model.calls} calls: {model.done} done, {model.failed} failed, "
        f"{model.cancelled} cancelled"
    )
    parts.append(f"{model.replaced} replaced")
    if model.died_recently:
        parts.append(f"{model.died_recently} died just now")
    return ", ".join(parts)


def _headline(model: ViewModel) -> str:
    return f"{model.state}, {counts_text(model)}"


def render_text(model: ViewModel | None) -> str:
    """The whole view as a text table (terminals, logs)."""
    if model is None:
        return summary_text(None)
    lines = [f"dspool pool: {_headline(model)}"]
    if model.transfer:
        lines.append(model.transfer)
    if model.last_error:
        lines.append(f"last error: {model.last_error}")
    lines.extend(model.limits)
    table = [[title for title, _ in COLUMNS], *(_cells(r) for r in model.rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if model.failures:
        lines.append("recent failed calls (newest first):")
        lines.extend(f"  {failure_line(f)}" for f in model.failures)
    return "\n".join(lines)


def _detail(failure: FailedCall) -> str:
    """What went wrong, without the program and worker the line already names."""
    if failure.detail:
        return failure.detail
    message = failure.message.splitlines()[0] if failure.message else ""
    return f"{failure.error}: {message}" if message else failure.error


def failure_line(failure: FailedCall) -> str:
    """One failed call on one line: ``parse on w2: ValueError: x``."""
    where = f" on {failure.worker_id}" if failure.worker_id else ""
    detail = _detail(failure).splitlines()[0] if _detail(failure) else failure.error
    if failure.traceback or failure.error == "ProgramError":
        return f"{failure.program}{where}: {detail}"
    return f"{failure.program}{where}: {failure.error}: {detail}"


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


def render_limits_html(lines: tuple[str, ...]) -> str:
    """The provider limits, usage and budget lines ('' when there are none)."""
    if not lines:
        return ""
    items = "".join(f"<div>{html.escape(line)}</div>" for line in lines)
    return f'<div class="dspool-limits" style="font-family:monospace">{items}</div>'


def _headline_html(model: ViewModel) -> str:
    error = ""
    if model.last_error:
        error = (
            f'<br><span style="color:{ERROR_COLOUR}">last error: '
            f"{html.escape(model.last_error)}</span>"
        )
    transfer = ""
    if model.transfer:
        transfer = (
            f'<br><span class="dspool-transfer" style="color:#757575">'
            f"{html.escape(model.transfer)}</span>"
        )
    return (
        f'<span class="dspool-headline"><b>dspool pool</b> {_state_badge(model.state)} '
        f"{html.escape(counts_text(model))}{transfer}{error}</span>"
    )


_FAILURE_STYLE = f"color:{ERROR_COLOUR};margin:0;line-height:1.3;overflow-wrap:anywhere"
_TRACEBACK_STYLE = (
    "font-size:90%;margin:2px 0 4px 1em;white-space:pre-wrap;overflow-wrap:anywhere;"
    "line-height:1.25"
)


def render_failures_html(failures: tuple[FailedCall, ...] | list[FailedCall]) -> str:
    """Failed calls as a list; a traceback is in an expandable ``<details>``.

    A crash or a timeout has no traceback: its line says the exit code, signal or
    timeout instead, with nothing to expand.
    """
    if not failures:
        return '<div style="color:#757575">no failed calls</div>'
    items = []
    for failure in failures:
        line = html.escape(failure_line(failure))
        if failure.traceback:
            items.append(
                f'<details class="dspool-failure" style="margin:0">'
                f'<summary style="{_FAILURE_STYLE}">{line}</summary>'
                f'<pre style="{_TRACEBACK_STYLE}">{html.escape(failure.traceback)}</pre>'
                "</details>"
            )
        else:
            items.append(f'<div class="dspool-failure" style="{_FAILURE_STYLE}">{line}</div>')
    return "<div><b>recent failed calls</b> (newest first)" + "".join(items) + "</div>"


def render_failures_text(failures: tuple[FailedCall, ...] | list[FailedCall]) -> str:
    """Failed calls with their full tracebacks, as text."""
    if not failures:
        return "no failed calls"
    parts = []
    for failure in failures:
        parts.append(failure_line(failure))
        if failure.traceback:
            parts.append("    " + failure.traceback.rstrip("\n").replace("\n", "\n    "))
    return "\n".join(parts)


def render_html(model: ViewModel | None) -> str:
    """The whole view as static HTML (the fallback without ipywidgets)."""
    if model is None:
        return f"<div>{html.escape(summary_text(None))}</div>"
    percent = 100 * min(model.ready_count, model.target) // max(model.target, 1)
    rows = "".join(_row_html(r) for r in model.rows)
    colour = STATE_COLOURS.get(model.state, "#757575")
    return (
        f'<div class="dspool-status">{_headline_html(model)}'
        f'<div><progress value="{model.ready_count}" max="{model.target}" '
        f'style="width:20em;accent-color:{colour}"></progress> '
        f"{model.ready_count}/{model.target} ready ({percent} %)</div>"
        f"{render_limits_html(model.limits)}"
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


@dataclass
class _Pending:
    """A restart asked for from the widget: its note stays until the restart is over."""

    what: str  # "w3" or "pool"
    workers: frozenset[str]  # the workers it replaces


_BUTTON_WIDTH = "90px"  # a row's restart button; the table head is indented as much


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
        pool: PoolView,
        *,
        interval: float = DEFAULT_INTERVAL,
        widgets: bool | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.pool = pool
        self.renders = 0
        self.render_seconds = 0.0
        self.model: ViewModel | None = None
        self._widgets_wanted = widgets
        self._throttle = Throttle(interval, URGENT_INTERVAL, idle=IDLE_REFRESH)
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._render_lock = threading.Lock()
        self._departures = Departures(DEAD_ROW_SECONDS)
        self._handles: list[Any] = []  # display handles of the HTML fallback
        self._box: Any = None
        self._parts: dict[str, Any] = {}
        self._rows: dict[str, tuple[Any, Any, Any]] = {}  # worker id -> (row, html, button)
        self._failure_ids: tuple[int, ...] | None = None
        self._pending: list[_Pending] = []
        self._limits: LimitsSnapshot | None = None
        self._limits_at: float | None = None  # monotonic time of that limits snapshot

    # -- public
    @property
    def interval(self) -> float:
        """Seconds between refreshes while events arrive."""
        return self._throttle.interval

    @interval.setter
    def interval(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {value!r}")
        self._throttle.interval = value

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
        """Display the view as of now: the widget, a live HTML table, or the text table."""
        self._ensure_live()
        self.refresh()
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
            self._throttle.acted()
        for handle in handles:
            try:
                handle.update(self)
            except Exception:
                log.debug("dspool view: updating a display failed", exc_info=True)
        self.render_seconds += time.thread_time() - started
        return model

    def request_refresh(self, urgent: bool = False) -> None:
        """Ask for a refresh within the throttle interval (``urgent``: at once)."""
        self._throttle.mark(urgent)

    def close(self) -> None:
        """Stop following the pool (the view keeps showing its last state)."""
        self._throttle.stop()
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
        with self._throttle.cond:
            if self._thread is not None or self._throttle.stopped:
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
        if event.kind in URGENT_EVENTS:
            self._departures.on_event(event)
            self._throttle.mark(urgent=True)
        elif not self._throttle.dirty:  # read without the lock: a missed mark is re-marked
            self._throttle.mark()

    def _run(self) -> None:
        warned = False
        try:
            while self._throttle.wait():
                try:
                    self.refresh()
                except Exception:
                    # One failed snapshot must not freeze the live view: try again after
                    # the interval (said once, so a lasting fault does not flood the log).
                    (log.debug if warned else log.warning)(
                        "dspool status view: a refresh failed; retrying", exc_info=True
                    )
                    warned = True
                    self._throttle.acted()
                    self._throttle.mark()
                    continue
                if self.pool.closed and self.model is not None and self.model.state == "closed":
                    return
        finally:
            self._unfollow()

    def _snapshot(self) -> ViewModel:
        status = self.pool.status()
        now = time.monotonic()
        # the limits' rates are per-minute averages: one snapshot a second is plenty
        if self._limits_at is None or now - self._limits_at >= LIMITS_REFRESH:
            self._limits, self._limits_at = limits_of(self.pool), now
        return build_model(status, self._departures.update(status), limits=self._limits)

    # -- widgets (built lazily, only touched under the render lock or when building)
    def _build(self) -> Any:
        with self._render_lock:
            if self._box is not None:
                return self._box
            w = _ipywidgets()
            parts = self._parts
            parts["headline"] = w.HTML()
            parts["progress"] = w.IntProgress(min=0, max=max(self.pool.target, 1))
            parts["progress_label"] = w.Label()
            parts["limits"] = w.HTML()
            parts["head"] = w.HBox(
                [w.Box(layout=w.Layout(width=_BUTTON_WIDTH, flex="0 0 auto")), w.HTML(_head_html())]
            )
            parts["rows"] = w.VBox()
            parts["failures"] = w.HTML()
            restart = w.Button(
                description="Restart pool",
                icon="refresh",
                button_style="warning",
                tooltip="replace every worker (asks first)",
            )
            restart.on_click(lambda _button: self._ask_restart_pool())
            confirm = w.Button(
                description="Restart every worker",
                button_style="danger",
                tooltip="replace every worker now (running calls fail with WorkerCrashed)",
                layout=w.Layout(display="none", width="auto"),
            )
            confirm.on_click(lambda _button: self._restart_pool())
            cancel = w.Button(description="Cancel", layout=w.Layout(display="none", width="auto"))
            cancel.on_click(lambda _button: self._confirming(False))
            parts["restart"], parts["confirm"], parts["cancel"] = restart, confirm, cancel
            parts["message"] = w.HTML()
            self._box = w.VBox(
                [
                    parts["headline"],
                    w.HBox([parts["progress"], parts["progress_label"]]),
                    parts["limits"],
                    parts["head"],
                    parts["rows"],
                    parts["failures"],
                    w.HBox([restart, confirm, cancel, parts["message"]]),
                ]
            )
            self._box.add_class("dspool-status-widget")
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
            progress.style.bar_color = STATE_COLOURS.get(model.state, "#757575")
        label = f"{model.ready_count}/{model.target}"
        parts["progress_label"].value = f"{label} · {model.starting}" if model.starting else label
        limits = render_limits_html(model.limits)
        if parts["limits"].value != limits:
            parts["limits"].value = limits
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
                    layout=w.Layout(width=_BUTTON_WIDTH, flex="0 0 auto"),
                )
                button.on_click(lambda _button, worker_id=row.id: self._restart_worker(worker_id))
                # the button comes first, so a note at the row's end never shifts it
                entry = (w.HBox([button, cells]), cells, button)
                self._rows[row.id] = entry
            entry[1].value = _row_html(row)
            entry[2].disabled = row.state not in ("idle", "busy") or model.state == "closed"
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
        closed = model.state == "closed"
        parts["restart"].disabled = closed
        if closed:
            self._show_confirm(False)
        self._settle_pending(model)

    # -- commands
    def _settle_pending(self, model: ViewModel) -> None:
        """Replace a "restarting ..." note by its outcome once the restart is over."""
        if not self._pending:
            return
        live = {r.id for r in model.rows if r.state not in ("dead", "stopped")}
        over = model.state == "closed" or model.ready_count >= model.target
        settled = [p for p in self._pending if over and not (p.workers & live)]
        if not settled:
            return
        self._pending = [p for p in self._pending if p not in settled]
        if model.state == "closed":
            text = "the pool is closed"
        elif any(p.what == "pool" for p in settled):
            text = "pool restarted: every worker was replaced"
        else:
            text = ", ".join(f"worker {p.what} restarted" for p in settled)
        if not self._pending:
            self._say(text)

    def _say(self, text: str, error: bool = False) -> None:
        message = self._parts.get("message")
        if message is not None:
            style = f' style="color:{ERROR_COLOUR}"' if error else ""
            message.value = f"<span{style}>{html.escape(text)}</span>" if text else ""

    def _show_confirm(self, shown: bool) -> None:
        for name in ("confirm", "cancel"):
            button = self._parts.get(name)
            if button is not None:
                button.layout.display = "" if shown else "none"
        restart = self._parts.get("restart")
        if restart is not None:
            restart.layout.display = "none" if shown else ""

    def _confirming(self, shown: bool) -> None:
        with self._render_lock:
            self._show_confirm(shown)
            if shown:
                self._say("running calls fail with WorkerCrashed; restart every worker?")
            else:
                self._say("")

    def _ask_restart_pool(self) -> None:
        if self.pool.closed:
            self._say("the pool is closed", error=True)
            return
        self._confirming(True)

    def _restart_worker(self, worker_id: str) -> None:
        self._command(lambda: self.pool.restart_worker(worker_id), worker_id, {worker_id})

    def _restart_pool(self) -> None:
        with self._render_lock:
            self._show_confirm(False)
            workers = {r.id for r in (self.model.rows if self.model else ()) if r.state != "dead"}
        self._command(self.pool.restart, "pool", workers)

    def _command(self, action: Callable[[], None], what: str, workers: set[str]) -> None:
        try:
            action()
        except (DspoolError, ValueError) as exc:
            with self._render_lock:
                self._say(str(exc), error=True)
        else:
            with self._render_lock:
                self._pending.append(_Pending(what, frozenset(workers)))
                doing = "every worker" if what == "pool" else f"worker {what}"
                self._say(f"restarting {doing}…")
        self.request_refresh(urgent=True)
