"""What the live status widget costs the kernel, and how fast it shows a dead worker.

Runs a real kernel (jupyter_client) whose pool serves a steady load of trivial calls
(default 1,000 a second, submitted by a thread in the kernel), and measures:

1. **Kernel-side cost of the widget** (target < 2 % of a core), as the sum of its parts:
   the view's refresher thread (snapshots, rendering, widget state; CPU time measured
   by the view itself), the kernel's IOPub thread sending the widget's messages (its CPU
   with the widget minus without, per thread from /proc via psutil), and the work the
   pool's thread does per event because someone listens (building the event and the
   view's callback; a micro-benchmark times the measured event rate). The whole kernel
   process's CPU without and with the widget is printed too, as a cross-check: on a
   shared machine its windows scatter by several % of a core, more than the cost.
2. **Death-to-widget delay** (target < 0.5 s): SIGKILL a worker from outside and time
   until this process (playing the frontend) receives the widget update that shows the
   worker dead; under the load and idle.

    .venv/bin/python bench/widget_cost.py [--rate 1000] [--window 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ast
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

SETUP = """
import threading, time
from dspool_jupyter import Pool
pool = Pool(workers={workers})
pool.wait_ready(60)
pool.define("noop", "def noop():\\n    return None\\n")


class Load:
    '''Submits `rate` trivial calls a second from a thread, at most `rate` in flight.'''

    def __init__(self, pool, rate):
        self.pool, self.rate = pool, rate
        self.submitted = self.finished = self.failed = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def done(self, future):
        self.finished += 1
        if future.cancelled() or future.exception() is not None:
            self.failed += 1

    def run(self):
        batch = max(1, self.rate // 200)  # a batch every 5 ms
        due = time.monotonic()
        while not self.stopped.is_set():
            if self.submitted - self.finished < self.rate:
                for _ in range(batch):
                    self.pool.submit("noop").add_done_callback(self.done)
                self.submitted += batch
            due += batch / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1:
                due = time.monotonic()


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, event):
        self.n += 1


load = Load(pool, {rate})
"""


class Frontend:
    """Just enough of a frontend: run cells, read values, drain and watch IOPub."""

    def __init__(self, tmp: Path) -> None:
        from jupyter_client.manager import start_new_kernel

        env = {**os.environ, "DSPOOL_STORE": str(tmp / "store")}
        # the kernel's own log (a TCP warning, the interrupt jupyter_client sends before
        # a shutdown) would only clutter the figures; cell errors come back in replies
        self.km, self.kc = start_new_kernel(
            kernel_name="python3", env=env, stderr=subprocess.DEVNULL
        )
        self.pid = int(self.value("__import__('os').getpid()"))
        self.process = psutil.Process(self.pid)

    def run(self, code: str, timeout: float = 60) -> None:
        msg_id = self.kc.execute(code)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"cell failed: {code!r}: {reply['content'].get('evalue')}")
        self.drain(0.0)

    def value(self, expression: str) -> Any:
        msg_id = self.kc.execute("", silent=True, user_expressions={"v": expression})
        while True:
            reply = self.kc.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        result = reply["content"]["user_expressions"]["v"]
        if result["status"] != "ok":
            raise RuntimeError(f"{expression!r}: {result.get('evalue')}")
        return ast.literal_eval(result["data"]["text/plain"])

    def drain(self, seconds: float, until: Any = None) -> tuple[int, float | None]:
        """Read IOPub for ``seconds``; returns (messages, arrival of the first ``until`` match)."""
        deadline = time.monotonic() + seconds
        count = 0
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return count, None
            count += 1
            if until is not None and until(msg):
                return count, time.monotonic()
            if time.monotonic() >= deadline and seconds:
                return count, None

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def thread_cpu(self, native_id: int) -> float:
        for thread in self.process.threads():
            if thread.id == native_id:
                return float(thread.user_time + thread.system_time)
        return 0.0

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def measure_window(front: Frontend, seconds: float, iopub: int) -> dict[str, float]:
    """CPU in % of a core over a window (IOPub drained meanwhile): kernel, IOPub thread."""
    calls0 = front.value("load.finished")
    cpu0, io0, t0 = front.cpu(), front.thread_cpu(iopub), time.monotonic()
    messages, _ = front.drain(seconds)
    cpu1, io1, t1 = front.cpu(), front.thread_cpu(iopub), time.monotonic()
    calls1 = front.value("load.finished")
    elapsed = t1 - t0
    return {
        "kernel": 100 * (cpu1 - cpu0) / elapsed,
        "iopub": 100 * (io1 - io0) / elapsed,
        "messages": messages / elapsed,
        "calls": (calls1 - calls0) / elapsed,
    }


def death_delay(front: Frontend, timeout: float = 10) -> float:
    """SIGKILL a worker; seconds until the widget update showing it dead arrives."""
    workers = front.value("[(w.id, w.pid) for w in pool.status().workers if w.state != 'starting']")
    worker_id, pid = workers[0]
    marker = f'data-worker="{worker_id}" data-state="dead"'

    def shows_death(msg: dict[str, Any]) -> bool:
        if msg["header"]["msg_type"] != "comm_msg":
            return False
        state = msg["content"]["data"].get("state") or {}
        return marker in str(state.get("value", ""))

    front.drain(0.0)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _, seen = front.drain(timeout, until=shows_death)
    if seen is None:
        raise RuntimeError(f"the widget did not show {worker_id} dead within {timeout} s")
    delay = seen - killed
    deadline = time.monotonic() + 30
    while front.value("pool.status().ready_count") < front.value("pool.target"):
        front.drain(0.05)
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not heal")
    return delay


def event_cost() -> float:
    """Seconds per event the pool's thread spends because the view listens.

    What the pool does per call only when its bus has a subscriber: build a CallStarted
    and a CallFinished event and emit them, here to the view's callback (the common,
    already-dirty case).
    """
    from dspool_jupyter.events import CallFinished, CallStarted, EventBus
    from dspool_jupyter.widget import StatusView

    class Quiet:
        closed = False
        target = 1

    view = StatusView(Quiet(), widgets=False)  # type: ignore[arg-type]
    view._throttle.dirty = True
    bus = EventBus()
    bus.subscribe(view._on_event)
    n = 100_000
    started = time.perf_counter()
    for i in range(n):
        if bus.active:
            bus.emit(CallStarted(call_id=i, program="noop", worker_id="w1", session=None))
        if bus.active:
            bus.emit(CallFinished(call_id=i, program="noop", worker_id="w1", seconds=0.0))
    return (time.perf_counter() - started) / (2 * n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="trivial calls per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=float, default=3.0, help="seconds per CPU window")
    parser.add_argument("--rounds", type=int, default=5, help="windows without/with widget")
    parser.add_argument("--kills", type=int, default=5, help="worker kills per condition")
    parser.add_argument("--interval", type=float, default=None, help="widget refresh interval")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        front = Frontend(Path(tmp))
        try:
            front.run("%load_ext dspool_jupyter")
            front.run(SETUP.format(workers=args.workers, rate=args.rate))
            front.drain(1.0)  # let the load settle
            iopub = int(front.value("get_ipython().kernel.iopub_thread.thread.native_id"))
            without: list[dict[str, float]] = []
            with_widget: list[dict[str, float]] = []
            renders: list[float] = []
            events: list[float] = []
            interval = f" --interval {args.interval}" if args.interval else ""
            for _ in range(args.rounds):
                without.append(measure_window(front, args.window, iopub))
                front.run(
                    f"%dspool status{interval}\n"
                    "from dspool_jupyter.magics import _state\n"
                    "view = _state.view\ncounter = Counter()\n"
                    "unsubscribe = pool.subscribe(counter)"
                )
                front.drain(0.5)
                started = front.value("(counter.n, view.render_seconds)")
                t0 = time.monotonic()
                with_widget.append(measure_window(front, args.window, iopub))
                elapsed = time.monotonic() - t0
                ended = front.value("(counter.n, view.render_seconds)")
                events.append((ended[0] - started[0]) / elapsed)
                renders.append(100 * (ended[1] - started[1]) / elapsed)
                front.run("unsubscribe()\nview.close()\n_state.view = None")
                front.drain(0.3)
            per_event = event_cost()
            front.run(f"%dspool status{interval}")
            front.drain(0.5)
            load_delays = [death_delay(front) for _ in range(args.kills)]
            front.run("load.stopped.set()\n%dspool status")
            front.drain(1.0)
            idle_delays = [death_delay(front) for _ in range(args.kills)]
            failed = front.value("load.failed")
        finally:
            front.close()

    def median(windows: list[dict[str, float]], key: str) -> float:
        return statistics.median(w[key] for w in windows)

    refresher = statistics.median(renders)
    sending = max(0.0, median(with_widget, "iopub") - median(without, "iopub"))
    event_rate = statistics.median(events)
    listening = 100 * per_event * event_rate
    kernels = [w["kernel"] for w in without + with_widget]
    print(
        f"dspool status widget at {args.rate} trivial calls/s (achieved "
        f"{median(without + with_widget, 'calls'):.0f}/s, {args.workers} workers, "
        f"{args.rounds} windows of {args.window:g} s without and with the widget)"
    )
    print(
        f"  widget cost, sum of its parts : {refresher + sending + listening:5.2f} % of a core"
        "  (target < 2 %)"
    )
    print(f"    refresher thread            : {refresher:5.2f} %  (snapshots, rendering, state)")
    print(
        f"    IOPub thread                : {sending:5.2f} %  "
        f"({median(with_widget, 'messages'):.0f} widget messages/s)"
    )
    print(
        f"    pool thread, events         : {listening:5.2f} %  "
        f"({per_event * 1e9:.0f} ns x {event_rate:.0f} events/s)"
    )
    print(
        f"  whole kernel, without / with  : {median(without, 'kernel'):5.2f} / "
        f"{median(with_widget, 'kernel'):5.2f} % of a core (medians; windows ranged "
        f"{min(kernels):.1f}-{max(kernels):.1f} %, so this difference is noise-bound)"
    )
    print(
        f"death -> widget shows it dead : median {statistics.median(load_delays) * 1000:.0f} ms, "
        f"max {max(load_delays) * 1000:.0f} ms under load; median "
        f"{statistics.median(idle_delays) * 1000:.0f} ms, max {max(idle_delays) * 1000:.0f} ms "
        f"idle ({args.kills} kills each; target < 500 ms); {failed} calls lost to the kills"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
