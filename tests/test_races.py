"""The dispatcher's races, driven hard: every future ends, nothing wedges.

- a cancelled future is done for ``wait``, ``as_completed`` and asyncio, queued or running;
- ``close()`` racing ``submit()`` from many threads ends every future;
- SIGINT (the kernel's stop button) landing at any instant of ``run``/``submit`` leaves
  each call cancelled or tracked, and the pool serving (a child process takes the storm);
- a call handed to a worker that was already SIGKILLed runs elsewhere: only a call that
  may have started on a dead worker fails with ``WorkerCrashed``;
- no wake-up of the loop is lost when threads post while it drains its inbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dspool_jupyter import Pool
from dspool_jupyter.errors import PoolClosed
from tests.conftest import started, wait_for
from tests.programs import HANG, INC, SLEEPY, WHOAMI

pytestmark = pytest.mark.timeout(120)

MakePool = Callable[..., Pool]


def test_no_wake_up_is_lost_when_threads_post_while_the_loop_drains(
    make_pool: MakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop also reads its inbox every INBOX_CHECK seconds, which hides a lost
    # wake-up as a stall; pushed out of reach, a lost one leaves a call unserved.
    from dspool_jupyter import local_backend

    monkeypatch.setattr(local_backend, "INBOX_CHECK", 3600.0)
    pool = make_pool(2)
    pool.wait_ready(30)
    pool.define("inc", INC)
    for _ in range(60):
        futures: list[concurrent.futures.Future[int]] = []

        def submit_some(into: list[concurrent.futures.Future[int]]) -> None:
            into.extend(pool.submit("inc", i) for i in range(12))

        threads = [threading.Thread(target=submit_some, args=(futures,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(f.result(10) for f in futures) == sorted(
            i + 1 for i in range(12) for _ in range(4)
        )


def test_held_interrupts_defer_sigint_to_the_end_of_the_block_and_nest() -> None:
    from dspool_jupyter.interrupts import HeldInterrupts

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with HeldInterrupts():
            with HeldInterrupts():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here: it only records
                reached.append("inner")
            reached.append("outer")  # the inner hold passed it on, still held
    assert reached == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_status_while_threads_submit(make_pool: MakePool) -> None:
    pool = make_pool(2)
    pool.wait_ready(30)
    pool.define("inc", INC)
    stop = threading.Event()
    futures: list[concurrent.futures.Future[int]] = []

    def submit_until_stopped() -> None:
        while not stop.is_set():
            futures.append(pool.submit("inc", 1))

    threads = [threading.Thread(target=submit_until_stopped) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3000):
            status = pool.status()  # reads the inbox the submitters append to
            assert status.queued >= 0
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert all(f.result(30) == 2 for f in futures)


def test_a_cancelled_queued_call_is_done_for_every_waiter(make_pool: MakePool) -> None:
    pool = make_pool(1)
    pool.wait_ready(30)
    pool.define("sleepy", SLEEPY)
    blocker = pool.submit("sleepy", 1)
    queued = [pool.submit("sleepy", 30) for _ in range(3)]
    assert all(f.cancel() for f in queued)
    done, not_done = concurrent.futures.wait(queued, timeout=5)
    assert not not_done and set(done) == set(queued)
    assert list(concurrent.futures.as_completed(queued, timeout=5))  # no hang
    assert blocker.result(10)[0] is None
    assert pool.status().cancelled == 3


def test_a_cancelled_running_call_is_done_for_every_waiter(pool: Pool, tmp_path: Path) -> None:
    pool.define("hang", HANG)
    pool.define("inc", INC)
    future = pool.submit("hang", marker=str(tmp_path / "m"))
    started(tmp_path / "m")
    waiter: list[set[concurrent.futures.Future[object]]] = []
    thread = threading.Thread(
        target=lambda: waiter.append(concurrent.futures.wait([future])[0])  # no timeout
    )
    thread.start()
    assert future.cancel()
    done, _ = concurrent.futures.wait([future], timeout=5)
    assert future in done
    thread.join(5)
    assert waiter == [{future}]
    assert list(concurrent.futures.as_completed([future], timeout=5)) == [future]

    async def awaited() -> None:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wrap_future(future)

    asyncio.run(asyncio.wait_for(awaited(), 5))
    wait_for(lambda: pool.status().running == 0, timeout=10)
    assert pool.run("inc", 1) == 2
    status = pool.status()
    assert status.cancelled == 1 and sum(w.cancelled for w in status.workers) == 1


def test_cancel_twice_and_cancel_after_the_end_count_once(pool: Pool) -> None:
    pool.define("inc", INC)
    pool.define("sleepy", SLEEPY)
    finished = pool.submit("inc", 1)
    assert finished.result(10) == 2
    assert not finished.cancel()
    busy = [pool.submit("sleepy", 1) for _ in range(2)]
    queued = pool.submit("sleepy", 30)
    assert queued.cancel() and queued.cancel()
    for f in busy:
        f.result(10)
    wait_for(lambda: pool.status().cancelled == 1)
    time.sleep(0.2)
    assert pool.status().cancelled == 1


@pytest.mark.parametrize("threads", [4, 8])
def test_close_racing_submits_from_many_threads_ends_every_future(
    make_pool: MakePool, threads: int
) -> None:
    for _ in range(10):
        pool = make_pool(2)
        pool.define("inc", INC)
        pool.wait_ready(30)
        futures: list[concurrent.futures.Future[object]] = []
        go = threading.Barrier(threads + 1)

        def submitter(
            pool: Pool = pool,
            futures: list[concurrent.futures.Future[object]] = futures,
            go: threading.Barrier = go,
        ) -> None:
            go.wait()
            while True:
                try:
                    futures.append(pool.submit("inc", 1))
                except PoolClosed:
                    return

        workers = [threading.Thread(target=submitter) for _ in range(threads)]
        for t in workers:
            t.start()
        go.wait()
        time.sleep(0.05)
        pool.close()
        for t in workers:
            t.join(10)
        done, not_done = concurrent.futures.wait(futures, timeout=10)
        assert not not_done, f"{len(not_done)} of {len(futures)} futures never ended"
        for f in done:
            error = f.exception()
            assert error is None or isinstance(error, PoolClosed), repr(error)


STORM = textwrap.dedent(
    """
    import concurrent.futures, json, os, random, signal, sys, threading, time
    from dspool_jupyter import Pool

    pool = Pool(workers=2, store=sys.argv[1])
    pool.wait_ready(30)
    pool.define("inc", "def inc(x):\\n    return x + 1\\n")
    pool.define("nap", "import time\\ndef nap(s):\\n    time.sleep(s)\\n    return s\\n")
    mode = sys.argv[2]
    stop = time.monotonic() + float(sys.argv[3])
    pid = os.getpid()

    def storm():
        rng = random.Random(0)
        time.sleep(0.2)  # the main thread is inside its loop by then
        while time.monotonic() < stop:
            os.kill(pid, signal.SIGINT)
            time.sleep(rng.uniform(0.0002, 0.0015))

    threading.Thread(target=storm, daemon=True).start()
    ok = interrupted = 0
    tracked = []
    while time.monotonic() < stop:
        try:
            try:
                if mode == "run":
                    pool.run("inc", 1)
                    ok += 1
                else:
                    # what %dspool map does: submit a batch, wait, cancel it on interrupt
                    # (Not concurrent.futures.wait: an interrupt inside it can leave a
                    # future's lock held; Future.exception() is interrupt-safe.)
                    with pool.track() as batch:
                        try:
                            for _ in range(3):
                                pool.submit("nap", 0.001)
                            for f in batch:
                                f.exception()
                        except KeyboardInterrupt:
                            for f in batch:
                                f.cancel()
                            raise
                        finally:
                            tracked.extend(batch)
                    ok += 1
            except KeyboardInterrupt:
                interrupted += 1
        except KeyboardInterrupt:
            interrupted += 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(0.05)
    deadline = time.monotonic() + 15
    while True:
        status = pool.status()
        if status.running == 0 and status.queued == 0:
            break
        if time.monotonic() > deadline:
            print(json.dumps({"wedged": repr(status)}))
            sys.exit(3)
        time.sleep(0.01)
    _, pending = concurrent.futures.wait(tracked, timeout=15)
    served = {pool.run("inc", i) for i in range(20)}
    status = pool.status()
    print(json.dumps({
        "ok": ok, "interrupted": interrupted, "tracked": len(tracked),
        "left_pending": len(pending), "served": len(served),
        "states": sorted(w.state for w in status.workers), "ready": status.ready_count,
    }))
    pool.close()
    """
)


@pytest.mark.parametrize("mode", ["run", "submit"])
def test_sigint_storm_never_wedges_the_pool(store_dir: Path, mode: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-c", STORM, str(store_dir), mode, "3"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["interrupted"] > 50, result  # the storm really hit
    assert result["served"] == 20 and result["ready"] == 2, result
    assert result["left_pending"] == 0, result
    assert result["states"] == ["idle", "idle"], result


def test_a_call_handed_to_a_worker_sigkilled_while_idle_runs_elsewhere(pool: Pool) -> None:
    pool.define("whoami", WHOAMI)
    pool.define("inc", INC)
    for _ in range(15):
        pool.wait_ready(30)
        victim = next(w for w in pool.status().workers if w.state == "idle")
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        futures = [pool.submit("inc", i) for i in range(6)]  # before the pool noticed
        assert [f.result(20) for f in futures] == [i + 1 for i in range(6)]
    assert pool.status().failed == 0


def test_a_crash_with_calls_waiting_in_the_socket_fails_only_the_started_one(
    pool: Pool, tmp_path: Path
) -> None:
    pool.define("sleepy", SLEEPY)
    pool.define("inc", INC)
    running = pool.submit("sleepy", 30, marker=str(tmp_path / "m"))
    started(tmp_path / "m")
    victim = next(w for w in pool.status().workers if w.id == running.worker_id)
    others = [pool.submit("inc", i) for i in range(20)]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    assert type(running.exception(10)).__name__ == "WorkerCrashed"
    assert [f.result(20) for f in others] == [i + 1 for i in range(20)]


def test_a_cancel_that_lands_before_the_worker_read_the_call_still_interrupts_it(
    pool: Pool,
) -> None:
    pool.define("hang", HANG)
    pids = {w.pid for w in pool.status().workers}
    for _ in range(20):
        future = pool.submit("hang")
        assert future.cancel()  # most often before the worker has read the frame
        # interrupted, not killed after the 2 s grace: the same workers, free again
        wait_for(lambda: pool.status().running == 0, timeout=1.5)
    assert {w.pid for w in pool.status().workers} == pids
    assert pool.status().cancelled == 20
