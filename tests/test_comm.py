"""The kernel side of the lab status item: throttling, liveness, commands, and a real kernel."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from dspool_jupyter import comm as dcomm
from dspool_jupyter.events import CallFinished, Event, EventBus, WorkerDied
from dspool_jupyter.status import FailedCall, PoolStatus, WorkerStatus

pytestmark = pytest.mark.timeout(60)


class FakeComm:
    def __init__(self, comm_id: str = "c1") -> None:
        self.comm_id = comm_id
        self.sent: queue.Queue[dict[str, Any]] = queue.Queue()
        self.msg_cb: Callable[[dict[str, Any]], None] | None = None
        self.close_cb: Callable[[dict[str, Any]], None] | None = None

    def send(
        self,
        data: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: list[bytes] | None = None,
    ) -> None:
        assert data is not None
        self.sent.put(data)

    def on_msg(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.msg_cb = callback

    def on_close(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.close_cb = callback

    def from_frontend(self, data: dict[str, Any]) -> None:
        assert self.msg_cb is not None
        self.msg_cb({"content": {"comm_id": self.comm_id, "data": data}})

    def next(self, kind: str = "status", timeout: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.sent.get(timeout=max(0.01, deadline - time.monotonic()))
            if msg["type"] == kind:
                return msg

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.sent.get_nowait())
            except queue.Empty:
                return out


def pool_status(calls: int, workers: tuple[str, ...] = ("w1", "w2")) -> PoolStatus:
    """A hand-built healthy snapshot: ``calls`` calls done on ``workers``."""
    return PoolStatus(
        state="healthy",
        target=len(workers),
        ready_count=len(workers),
        workers=tuple(
            WorkerStatus(w, 4000 + i, "idle", 0, 0, None, None, 0.0, None)
            for i, w in enumerate(workers)
        ),
        queued=0,
        running=0,
        calls=calls,
        failed=0,
        replaced=0,
        started_at=0.0,
        startup_seconds=None,
        last_error=None,
        recent_failures=(),
        done=calls,
    )


@dataclass
class FakePool:
    bus: EventBus = field(default_factory=EventBus)
    calls: int = 0
    restarted: list[str] = field(default_factory=list)
    fail_restart: bool = False
    workers: tuple[str, ...] = ("w1", "w2")
    closed: bool = False
    target: int = 2

    def status(self) -> PoolStatus:
        return pool_status(self.calls, self.workers)

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self.bus.subscribe(callback)

    def restart_worker(self, worker_id: str) -> None:
        if self.fail_restart:
            raise KeyError(worker_id)
        self.restarted.append(worker_id)

    def restart(self) -> None:
        self.restarted.append("*")


class Registry:
    """Stands in for pool.current_pool / on_current_pool_changed."""

    def __init__(self, pool: FakePool | None) -> None:
        self.pool = pool
        self.listeners: list[Callable[[Any], None]] = []

    def get(self) -> FakePool | None:
        return self.pool

    def watch(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        self.listeners.append(callback)
        return lambda: self.listeners.remove(callback)

    def change(self, pool: FakePool | None) -> None:
        self.pool = pool
        for cb in list(self.listeners):
            cb(pool)


@pytest.fixture
def setup() -> Iterator[tuple[dcomm.StatusPublisher, Registry, FakePool]]:
    pool = FakePool()
    reg = Registry(pool)
    pub = dcomm.StatusPublisher(pool_getter=reg.get, pool_watcher=reg.watch)
    yield pub, reg, pool
    pub.close()


def died(worker: str = "w0") -> WorkerDied:
    return WorkerDied(worker_id=worker, pid=1, reason="crashed", returncode=3, program="p")


def test_not_live_costs_nothing(setup: tuple[dcomm.StatusPublisher, Registry, FakePool]) -> None:
    pub, reg, pool = setup
    c = FakeComm()
    pub.add_comm(c, live=False)
    assert not pool.bus.active and not reg.listeners and not pub.listening
    pool.bus.emit(died())
    time.sleep(0.1)
    assert c.drain() == []
    c.from_frontend({"type": "hello"})
    assert pool.bus.active and pub.listening
    assert c.next()["status"]["state"] == "healthy"


def test_open_sends_snapshot_then_close_unsubscribes(
    setup: tuple[dcomm.StatusPublisher, Registry, FakePool],
) -> None:
    pub, reg, pool = setup
    c = FakeComm()
    pub.add_comm(c, live=True)
    msg = c.next()
    assert msg["protocol"] == dcomm.PROTOCOL_VERSION and msg["status"]["calls"] == 0
    assert c.close_cb is not None
    c.close_cb({})
    assert not pool.bus.active and not reg.listeners and not pub.listening


def test_routine_events_are_throttled_and_coalesced(
    setup: tuple[dcomm.StatusPublisher, Registry, FakePool],
) -> None:
    pub, _reg, pool = setup
    c = FakeComm()
    pub.add_comm(c, live=True)
    c.next()
    start = time.monotonic()
    for i in range(200):
        pool.calls = i + 1
        pool.bus.emit(CallFinished(call_id=i, program="p", worker_id="w0", seconds=0.0))
        time.sleep(0.005)
    elapsed = time.monotonic() - start
    time.sleep(dcomm.MIN_INTERVAL * 2)
    msgs = [m for m in c.drain() if m["type"] == "status"]
    assert msgs[-1]["status"]["calls"] == 200  # the last state always arrives
    assert len(msgs) <= elapsed / dcomm.MIN_INTERVAL + 3


def test_death_is_sent_at_once(setup: tuple[dcomm.StatusPublisher, Registry, FakePool]) -> None:
    pub, _reg, pool = setup
    c = FakeComm()
    pub.add_comm(c, live=True)
    c.next()
    pool.bus.emit(CallFinished(call_id=1, program="p", worker_id="w0", seconds=0.0))
    c.next()  # routine snapshot; the next one would wait MIN_INTERVAL
    t0 = time.monotonic()
    pool.bus.emit(died("w1"))
    msg = c.next()
    assert time.monotonic() - t0 < dcomm.MIN_INTERVAL
    assert [e["kind"] for e in msg["events"]] == ["worker_died"]
    assert msg["events"][0]["worker_id"] == "w1"


def test_follows_current_pool(setup: tuple[dcomm.StatusPublisher, Registry, FakePool]) -> None:
    pub, reg, pool = setup
    c = FakeComm()
    pub.add_comm(c, live=True)
    c.next()
    reg.change(None)
    assert c.next()["status"] is None and not pool.bus.active
    other = FakePool(calls=7)
    reg.change(other)
    assert c.next()["status"]["calls"] == 7 and other.bus.active


def test_a_failed_snapshot_is_not_sent_as_no_pool(
    setup: tuple[dcomm.StatusPublisher, Registry, FakePool],
) -> None:
    class Flaky(FakePool):
        failures = 0

        def status(self) -> PoolStatus:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("deque mutated during iteration")
            return super().status()

    pub, reg, _pool = setup
    flaky = Flaky(calls=3)
    flaky.failures = 2
    c = FakeComm()
    pub.add_comm(c, live=True)
    reg.change(flaky)
    msg = c.next()
    while msg["status"] is None or msg["status"]["calls"] != 3:
        assert msg["status"] is not None or flaky.failures == 2, "a failure was sent as no pool"
        msg = c.next()
    assert flaky.failures == 0


def test_commands(setup: tuple[dcomm.StatusPublisher, Registry, FakePool]) -> None:
    pub, _reg, pool = setup
    c = FakeComm()
    pub.add_comm(c, live=True)
    c.from_frontend({"type": "restart_worker", "worker_id": "w1", "request_id": "r1"})
    assert c.next("result") == {"type": "result", "request_id": "r1", "ok": True, "error": None}
    c.from_frontend({"type": "restart_pool", "request_id": "r2"})
    assert c.next("result")["ok"]
    assert pool.restarted == ["w1", "*"]
    pool.fail_restart = True
    c.from_frontend({"type": "restart_worker", "worker_id": "w9", "request_id": "r3"})
    reply = c.next("result")
    assert not reply["ok"] and "KeyError" in reply["error"]
    c.from_frontend({"type": "restart_worker", "request_id": "r4"})
    assert "worker_id" in c.next("result")["error"]
    c.from_frontend({"type": "bogus", "request_id": "r5"})
    assert "unknown" in c.next("result")["error"]


def test_callback_never_blocks_on_slow_comm(
    setup: tuple[dcomm.StatusPublisher, Registry, FakePool],
) -> None:
    pub, _reg, pool = setup
    gate = threading.Event()

    class SlowComm(FakeComm):
        def send(self, data: dict[str, Any] | None = None, *a: Any, **k: Any) -> None:
            gate.wait(5)
            super().send(data)

    c = SlowComm()
    pub.add_comm(c, live=True)
    time.sleep(0.05)  # the sender is now stuck in send()
    t0 = time.monotonic()
    for _ in range(1000):
        pool.bus.emit(died())
    assert time.monotonic() - t0 < 0.5
    gate.set()
    msgs = [c.next()] + [m for m in c.drain() if m["type"] == "status"]
    assert len(msgs) <= 3  # coalesced, not one per event


def test_lease_expires_without_hellos() -> None:
    pool = FakePool()
    reg = Registry(pool)
    pub = dcomm.StatusPublisher(pool_getter=reg.get, pool_watcher=reg.watch, lease=0.4)
    try:
        c = FakeComm()
        pub.add_comm(c, live=True)
        c.next()
        for i in range(30):  # a busy pool does not keep a silent frontend's lease alive
            pool.bus.emit(CallFinished(call_id=i, program="p", worker_id="w0", seconds=0.0))
            time.sleep(0.02)
        deadline = time.monotonic() + 2
        while pub.listening and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pub.listening and not pool.bus.active and not reg.listeners
        c.drain()
        c.from_frontend({"type": "hello"})  # the frontend's keepalive brings it back
        assert pool.bus.active
        assert c.next()["status"]["state"] == "healthy"
    finally:
        pub.close()


def test_long_tracebacks_are_trimmed() -> None:
    class Pool(FakePool):
        def status(self) -> PoolStatus:
            tb = "x" * (dcomm.MAX_TRACEBACK_CHARS * 2)
            failure = FailedCall(1, "p", "w1", "ProgramError", "m", tb, 0.0)
            return replace(pool_status(0), state="degraded", recent_failures=(failure,))

    snap = dcomm._snapshot(Pool())
    assert snap is not None
    assert len(snap["recent_failures"][0]["traceback"]) <= dcomm.MAX_TRACEBACK_CHARS + 4


def test_departed_workers_are_sent_like_the_widget_shows_them(
    setup: tuple[dcomm.StatusPublisher, Registry, FakePool],
) -> None:
    pub, _reg, pool = setup
    c = FakeComm()
    pub.add_comm(c, live=True)
    assert c.next()["departed"] == []
    pool.workers = ("w1", "w3")
    pool.bus.emit(
        WorkerDied(worker_id="w2", pid=4001, reason="crashed", returncode=-9, program="p")
    )
    msg = c.next()
    while msg["departed"] == []:
        msg = c.next()
    (gone,) = msg["departed"]
    assert (gone["id"], gone["state"], gone["note"]) == ("w2", "dead", "killed by SIGKILL")
    assert 0 <= gone["age"] < 5


def test_register_outside_kernel_does_nothing() -> None:
    assert dcomm.register_comm_target(object()) is False


# -- a real kernel, spoken to the way JupyterLab does ------------------------------------


class KernelFrontend:
    """A jupyter_client kernel with helpers that play the lab extension's part."""

    def __init__(self, kc: Any) -> None:
        self.kc = kc
        self.statuses: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.opened: list[dict[str, Any]] = []

    def execute(self, code: str, timeout: float = 30) -> dict[str, Any]:
        msg_id = self.kc.execute(code)
        reply: dict[str, Any] = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=timeout)
        assert reply["content"]["status"] == "ok", reply["content"]
        return reply

    def pump(self, timeout: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "comm_open" and content.get("target_name") == dcomm.TARGET_NAME:
                self.opened.append(content)
            elif kind == "comm_msg":
                data = content["data"]
                (self.statuses if data.get("type") == "status" else self.results).append(data)

    def wait_status(self, predicate: Callable[[Any], bool], timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.statuses:
                if predicate(msg["status"]):
                    return msg["status"]
            if time.monotonic() > deadline:
                last = self.statuses[-1]["status"] if self.statuses else None
                raise AssertionError(f"no matching status within {timeout} s; last: {last}")
            self.pump()

    def send(self, comm_id: str, data: dict[str, Any]) -> None:
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.kc.shell_channel.send(msg)


@pytest.fixture
def kernel(tmp_path: Any) -> Iterator[KernelFrontend]:
    from jupyter_client.manager import start_new_kernel

    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        yield KernelFrontend(kc)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


@pytest.mark.timeout(90)
def test_kernel_comm_end_to_end(kernel: KernelFrontend) -> None:
    k = kernel
    k.execute("from dspool_jupyter.comm import register_comm_target\nok = register_comm_target()")
    k.execute("assert ok")
    k.pump(0.5)
    assert len(k.opened) == 1 and k.opened[0]["data"]["type"] == "hello"
    announced = k.opened[0]["comm_id"]

    # a reloaded page finds the comm through comm_info, and adopts it by sending on it
    k.kc.comm_info(target_name=dcomm.TARGET_NAME)
    info = k.kc.get_shell_msg(timeout=10)["content"]
    assert announced in info["comms"]
    k.send(announced, {"type": "hello"})
    assert k.wait_status(lambda s: s is None) is None  # no pool yet

    k.statuses.clear()
    k.execute("from dspool_jupyter import Pool\npool = Pool(workers=2)")
    status = k.wait_status(lambda s: s is not None and s["ready_count"] == 2)
    assert status["state"] == "healthy" and status["target"] == 2
    assert status["limits"]["models"] == [] and status["limits"]["budget"]["max_cost"] is None

    # the panel's snapshot carries the provider limits, the usage and the budget
    k.statuses.clear()
    k.execute(
        "pool.set_rate_limit('openai/gpt-4o-mini', rpm=60, plain=True)\n"
        "pool.set_budget(max_tokens=1000)\n"
        "pool.define('ask', 'from dspool_jupyter.llm import permit\\ndef ask():\\n"
        '    with permit("openai/gpt-4o-mini") as p:\\n        p.record(12, 5)\\n\')\n'
        "pool.run('ask')"
    )
    status = k.wait_status(
        lambda s: s is not None and s["limits"]["usage"]["total"]["requests"] == 1
    )
    (model,) = status["limits"]["models"]
    assert (model["model"], model["rpm"], model["achieved_rpm"]) == ("openai/gpt-4o-mini", 60, 1)
    assert status["limits"]["budget"] == {
        "max_cost": None,
        "max_tokens": 1000,
        "spent_cost": status["limits"]["budget"]["spent_cost"],
        "spent_tokens": 17,
        "exhausted": False,
    }

    k.statuses.clear()
    k.execute(
        "pool.define('crash', 'import os\\ndef crash():\\n    os._exit(3)\\n')\n"
        "from dspool_jupyter.errors import WorkerCrashed\n"
        "try:\n    pool.run('crash')\nexcept WorkerCrashed:\n    pass\n"
        "else:\n    raise AssertionError('no crash')"
    )
    status = k.wait_status(lambda s: s is not None and s["failed"] >= 1 and s["replaced"] >= 1)
    assert status["recent_failures"][-1]["error"] == "WorkerCrashed"
    k.wait_status(lambda s: s is not None and s["failed"] >= 1 and s["ready_count"] == 2)

    worker = status["workers"][0]["id"]
    k.statuses.clear()
    k.send(announced, {"type": "restart_worker", "worker_id": worker, "request_id": "r1"})
    deadline = time.monotonic() + 20
    while not any(r.get("request_id") == "r1" for r in k.results):
        assert time.monotonic() < deadline, k.results
        k.pump()
    assert [r for r in k.results if r["request_id"] == "r1"][0]["ok"] is True
    k.wait_status(lambda s: s is not None and worker not in {w["id"] for w in s["workers"]})

    k.statuses.clear()
    k.execute("pool.close()")
    k.wait_status(lambda s: s is None)
    k.execute("from dspool_jupyter.comm import unregister_comm_target\nunregister_comm_target()")


def test_register_without_a_kernel_does_nothing() -> None:
    assert dcomm.register_comm_target() is False  # plain Python: no IPython shell
