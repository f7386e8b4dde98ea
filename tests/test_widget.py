"""The status view: pure rendering, throttling, fallback, and a real pool's faults."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from dspool_jupyter import Pool, widget
from dspool_jupyter.events import CallFinished, Event, EventBus, WorkerDied
from dspool_jupyter.status import FailedCall, PoolStatus, WorkerStatus
from dspool_jupyter.widget import (
    StatusView,
    build_model,
    render_failures_html,
    render_html,
    render_text,
    summary_text,
)
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

NOW = 1_700_000_000.0
TRACEBACK = (
    'Traceback (most recent call last):\n  File "<dspool program bad>", line 2\nValueError: x\n'
)


def _status(state: str = "healthy", workers: int = 2, failures: int = 1, calls: int = 10) -> Any:
    return PoolStatus(
        state=state,
        target=2,
        ready_count=min(workers, 2),
        workers=tuple(
            WorkerStatus(
                id=f"w{i + 1}",
                pid=4000 + i,
                state="busy" if i == 0 else "idle",
                calls=calls + i,
                errors=i,
                rss_bytes=50 * 1024 * 1024,
                last_heartbeat=NOW - 0.4,
                started_at=NOW - 60,
                program="qa" if i == 0 else None,
            )
            for i in range(workers)
        ),
        queued=3,
        running=1,
        calls=calls,
        failed=failures,
        replaced=0,
        started_at=NOW - 60,
        startup_seconds=0.5,
        last_error=None,
        recent_failures=tuple(
            FailedCall(
                call_id=i,
                program="bad",
                worker_id="w2",
                error="ProgramError",
                message=f"program 'bad' raised on worker w2: ValueError: x{i}",
                traceback=TRACEBACK,
                time=NOW,
            )
            for i in range(failures)
        ),
    )


@dataclass
class FakePool:
    """What a StatusView needs of a pool, with a status the test controls."""

    bus: EventBus = field(default_factory=EventBus)
    current: Any = field(default_factory=_status)
    closed: bool = False
    target: int = 2
    snapshots: int = 0
    restarted: list[str] = field(default_factory=list)

    def status(self) -> Any:
        self.snapshots += 1
        return self.current

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self.bus.subscribe(callback)

    def restart_worker(self, worker_id: str) -> None:
        self.restarted.append(worker_id)

    def restart(self) -> None:
        self.restarted.append("*")


def test_render_text_and_html() -> None:
    model = build_model(_status(), now=NOW)
    text = render_text(model)
    assert "healthy, 2/2 workers ready, 10 calls, 1 failed" in text
    assert re.search(r"w1\s+4000\s+busy\s+10\s+0\s+50\.0 MB\s+0 s ago\s+qa", text), text
    assert "bad on w2: ProgramError: program 'bad' raised on worker w2: ValueError: x0" in text
    page = render_html(model)
    assert 'data-worker="w1" data-state="busy"' in page
    assert '<progress value="2" max="2"' in page
    assert "<details" in page and "ValueError: x" in page  # the expandable traceback


def test_departed_workers_show_how_they_died() -> None:
    gone = widget.Departed(
        row=build_model(_status(), now=NOW).rows[1], since=0.0, reason="crashed", returncode=-9
    )
    model = build_model(_status(workers=1), {"w2": gone}, now=NOW)
    states = {r.id: (r.state, r.note) for r in model.rows}
    assert states == {"w1": ("busy", ""), "w2": ("dead", "killed by SIGKILL")}
    restarted = widget.Departed(gone.row, 0.0, "restart", -9)
    model = build_model(_status(workers=1), {"w2": restarted}, now=NOW)
    assert model.rows[1].state == "stopped"


def test_failures_are_newest_first_and_escaped() -> None:
    model = build_model(_status(failures=3), now=NOW)
    assert [f.call_id for f in model.failures] == [2, 1, 0]
    failures = (FailedCall(1, "p<b>", None, "WorkerCrashed", "died", "", NOW),)
    page = render_failures_html(failures)
    assert "p&lt;b&gt;" in page and "<details" not in page  # no traceback: no details


def test_text_plain_is_stable() -> None:
    pool = FakePool()
    view = StatusView(pool, widgets=False)  # type: ignore[arg-type]
    try:
        first = view._repr_mimebundle_()["text/plain"]
        pool.current = _status(calls=99, failures=0)
        view.refresh()
        assert view._repr_mimebundle_()["text/plain"] == first == summary_text(2)
        assert not re.search(r"\d{3,}|w\d", first)  # no pids, counts, times or worker ids
    finally:
        view.close()


def test_widget_mode_bundle() -> None:
    pool = FakePool()
    view = StatusView(pool, widgets=True)  # type: ignore[arg-type]
    try:
        bundle = view._repr_mimebundle_()
        assert bundle["text/plain"] == summary_text(2)
        assert "application/vnd.jupyter.widget-view+json" in bundle
        rows = view._parts["rows"].children
        assert len(rows) == 2 and 'data-state="busy"' in rows[0].children[0].value
        rows[1].children[1].click()  # the restart button of w2
        view._parts["restart"].click()
        assert pool.restarted == ["w2", "*"]
    finally:
        view.close()


def test_fallback_without_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(widget, "_ipywidgets", lambda: None)
    view = StatusView(FakePool(), widgets=True)  # type: ignore[arg-type]
    try:
        assert not view.uses_widgets and view.widget is None
        bundle = view._repr_mimebundle_()
        assert set(bundle) == {"text/plain", "text/html"}
        assert "dspool-row" in bundle["text/html"]
    finally:
        view.close()


def test_refreshes_are_throttled_never_per_event() -> None:
    pool = FakePool()
    view = StatusView(pool, interval=0.1, widgets=False)  # type: ignore[arg-type]
    view._repr_mimebundle_()  # starts following
    try:
        start, renders = time.monotonic(), view.renders
        events = 0
        while time.monotonic() - start < 0.5:
            for _ in range(100):
                pool.bus.emit(CallFinished(call_id=events, program="p", worker_id="w1", seconds=0))
                events += 1
            time.sleep(0.001)
        pool.current = _status(calls=12345)
        pool.bus.emit(CallFinished(call_id=events, program="p", worker_id="w1", seconds=0))
        wait_for(lambda: view.model is not None and view.model.calls == 12345, timeout=1)
        elapsed = time.monotonic() - start
        assert events > 5000
        assert view.renders - renders <= elapsed / 0.1 + 2, (view.renders - renders, elapsed)
    finally:
        view.close()
    assert not view.following


def test_urgent_events_render_at_once() -> None:
    pool = FakePool()
    view = StatusView(pool, interval=5.0, widgets=False)  # type: ignore[arg-type]
    view._repr_mimebundle_()
    try:
        time.sleep(0.1)
        renders = view.renders
        pool.current = _status(workers=1)
        t0 = time.monotonic()
        pool.bus.emit(
            WorkerDied(worker_id="w2", pid=4001, reason="crashed", returncode=-9, program=None)
        )
        wait_for(lambda: view.renders > renders, timeout=1)
        assert time.monotonic() - t0 < 0.5
        assert view.model is not None
        assert [(r.id, r.state, r.note) for r in view.model.rows][1] == (
            "w2",
            "dead",
            "killed by SIGKILL",
        )
    finally:
        view.close()


def test_idle_refresh_keeps_ages_true(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(widget, "IDLE_REFRESH", 0.05)
    view = StatusView(FakePool(), widgets=False)  # type: ignore[arg-type]
    view._repr_mimebundle_()
    try:
        renders = view.renders
        wait_for(lambda: view.renders >= renders + 3, timeout=2)
    finally:
        view.close()


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        StatusView(FakePool(), interval=0)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_real_pool_death_shows_and_heals(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(2)
    pool.wait_ready(30)
    view = StatusView(pool, widgets=True)
    try:
        view._repr_mimebundle_()
        victim = pool.status().workers[0]
        assert victim.pid is not None

        def row_state(worker_id: str) -> str | None:
            with view._render_lock:
                entry = view._rows.get(worker_id)
                html = entry[1].value if entry else ""
            match = re.search(rf'data-worker="{worker_id}" data-state="(\w+)"', html)
            return match.group(1) if match else None

        t0 = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: row_state(victim.id) == "dead", timeout=5, interval=0.002)
        delay = time.monotonic() - t0
        assert delay < 1.0, delay  # the target is < 0.5 s; bench/widget_cost.py measures it
        wait_for(lambda: pool.status().ready_count == 2, timeout=15)
        pool.define("one", "def one():\n    return 1\n")
        assert pool.run("one") == 1
        wait_for(lambda: view.model is not None and view.model.state == "healthy", timeout=5)
        assert view._parts["progress"].value == 2
        # the restart button of a live worker restarts it
        live = next(w for w in pool.status().workers if w.id != victim.id)
        view._rows[live.id][2].click()
        wait_for(lambda: row_state(live.id) == "stopped", timeout=10)
        wait_for(lambda: pool.status().ready_count == 2, timeout=15)
    finally:
        view.close()


def test_view_stops_following_a_closed_pool(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(1)
    view = StatusView(pool, widgets=False)
    view._repr_mimebundle_()
    assert view.following
    pool.close()
    wait_for(lambda: not view.following, timeout=5)
    assert view.model is not None and view.model.state == "closed"
    assert all(r.state == "stopped" for r in view.model.rows)
