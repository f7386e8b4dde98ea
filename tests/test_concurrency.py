"""Many calls at once per worker (``Pool(concurrency=K)``), with real worker processes.

Each call stays isolated from its neighbours: its output, its cancel, its timeout; a
stuck call retires its worker (replaced at once, killed when only stuck calls are left);
a crash fails every call that worker was running. Sessions keep running in order, one
at a time.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from dspool_jupyter import Pool
from dspool_jupyter.errors import CallTimeout, WorkerCrashed
from tests.conftest import started, wait_for
from tests.programs import HANG, INC, SLEEPY

pytestmark = pytest.mark.timeout(120)

MakePool = Callable[..., Pool]

NOISY = (
    "import time\n"
    "def noisy(tag, n=20):\n"
    "    for i in range(n):\n"
    "        print(tag, i)\n"
    "        time.sleep(0.005)\n"
    "    return tag\n"
)
ASYNC_NAP = (
    "import asyncio, os\n"
    "async def anap(seconds, tag=None):\n"
    "    await asyncio.sleep(seconds)\n"
    "    return (tag, os.getpid())\n"
)
STUCK = (
    "import signal, time\n"
    "def stuck(marker=None):\n"
    "    if marker:\n"
    "        open(marker, 'w').close()\n"
    "    while True:\n"
    "        try:\n"
    "            time.sleep(0.05)\n"
    "        except KeyboardInterrupt:\n"
    "            pass  # ignores every interrupt\n"
)


@pytest.fixture
def kpool(make_pool: MakePool) -> Pool:
    pool = make_pool(2, concurrency=8)
    pool.wait_ready(30)
    return pool


def test_bad_concurrency_is_a_clear_error(store_dir: Path) -> None:
    for bad in (0, -1, 1.5, "4", True):
        with pytest.raises(ValueError, match="concurrency"):
            Pool(workers=1, concurrency=bad, store=store_dir)  # type: ignore[arg-type]


def test_k_calls_overlap_in_each_worker(kpool: Pool) -> None:
    kpool.define("sleepy", SLEEPY)
    kpool.define("anap", ASYNC_NAP)
    begun = time.monotonic()
    futures = [kpool.submit("sleepy", 0.5, tag=i) for i in range(16)]
    results = [f.result(20) for f in futures]
    assert time.monotonic() - begun < 2.0  # 16 half-second calls on 2 workers of 8 slots
    assert [tag for tag, _ in results] == list(range(16))
    assert len({pid for _, pid in results}) == 2
    begun = time.monotonic()
    results = [f.result(20) for f in [kpool.submit("anap", 0.5, tag=i) for i in range(16)]]
    assert time.monotonic() - begun < 2.0
    status = kpool.status()
    assert all(w.slots == 8 for w in status.workers) and status.slots == 16


def test_status_shows_slots_in_use(kpool: Pool, tmp_path: Path) -> None:
    kpool.define("hang", HANG)
    futures = [kpool.submit("hang", marker=str(tmp_path / f"m{i}")) for i in range(5)]
    for i in range(5):
        started(tmp_path / f"m{i}")
    status = kpool.status()
    assert status.running == 5
    assert sum(w.active for w in status.workers) == 5
    for f in futures:
        f.cancel()
    wait_for(lambda: kpool.status().running == 0, timeout=10)


def test_output_is_captured_per_call(kpool: Pool) -> None:
    kpool.define("noisy", NOISY)
    futures = [kpool.submit("noisy", f"call{i}") for i in range(8)]
    for i, future in enumerate(futures):
        assert future.result(20) == f"call{i}"
        lines = future.stdout.splitlines()
        assert lines == [f"call{i} {n}" for n in range(20)], future.stdout


def test_cancel_interrupts_that_call_only(kpool: Pool, tmp_path: Path) -> None:
    kpool.define("hang", HANG)
    kpool.define("sleepy", SLEEPY)
    pids = {w.pid for w in kpool.status().workers}
    neighbours = [kpool.submit("sleepy", 1.0, tag=i) for i in range(6)]
    victim = kpool.submit("hang", marker=str(tmp_path / "m"))
    started(tmp_path / "m")
    assert victim.cancel()
    with pytest.raises(CancelledError):
        victim.result(5)
    assert [f.result(20)[0] for f in neighbours] == list(range(6))
    wait_for(lambda: kpool.status().running == 0, timeout=10)
    assert {w.pid for w in kpool.status().workers} == pids  # nobody was killed


def test_timeout_fails_at_once_and_spares_the_neighbours(kpool: Pool) -> None:
    kpool.define("hang", HANG)
    kpool.define("sleepy", SLEEPY)
    pids = {w.pid for w in kpool.status().workers}
    neighbours = [kpool.submit("sleepy", 1.5, tag=i) for i in range(6)]
    begun = time.monotonic()
    with pytest.raises(CallTimeout):
        kpool.run("hang", timeout=0.5)
    assert time.monotonic() - begun < 1.5
    assert [f.result(20)[0] for f in neighbours] == list(range(6))
    wait_for(lambda: kpool.status().running == 0, timeout=10)
    assert {w.pid for w in kpool.status().workers} == pids  # the thread was interrupted


def test_a_stuck_call_retires_its_worker_and_only_it_fails(
    make_pool: MakePool, tmp_path: Path
) -> None:
    pool = make_pool(1, concurrency=4)
    pool.wait_ready(30)
    pool.define("stuck", STUCK)
    pool.define("sleepy", SLEEPY)
    pool.define("inc", INC)
    old = {w.pid for w in pool.status().workers}
    stuck = pool.submit("stuck", marker=str(tmp_path / "m"), timeout=0.5)
    started(tmp_path / "m")
    neighbour = pool.submit("sleepy", 4.0, tag="neighbour")
    with pytest.raises(CallTimeout):
        stuck.result(10)
    # After the grace the worker is retired: a replacement serves new calls at once,
    # while the neighbour finishes on the old one; then the old one is killed.
    wait_for(lambda: pool.status().ready_count == 1 and pool.status().replaced == 1, timeout=10)
    assert pool.run("inc", 1) == 2
    assert neighbour.result(20)[0] == "neighbour"
    wait_for(lambda: not ({w.pid for w in pool.status().workers} & old), timeout=10)
    assert pool.status().failed == 1


def test_a_crash_fails_every_call_the_worker_ran(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1, concurrency=4)
    pool.wait_ready(30)
    pool.define("sleepy", SLEEPY)
    pool.define("inc", INC)
    running = [pool.submit("sleepy", 30, marker=str(tmp_path / f"m{i}")) for i in range(4)]
    for i in range(4):
        started(tmp_path / f"m{i}")
    waiting = [pool.submit("inc", i) for i in range(3)]  # no free slot: they wait
    pid = pool.status().workers[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for future in running:
        assert isinstance(future.exception(10), WorkerCrashed)
    assert [f.result(20) for f in waiting] == [1, 2, 3]  # never started: run elsewhere


def test_sessions_run_in_order_one_at_a_time(kpool: Pool) -> None:
    source = (
        "import threading, time\n"
        "log = []\n"
        "active = [0]\n"
        "lock = threading.Lock()\n"
        "def step(i):\n"
        "    with lock:\n"
        "        active[0] += 1\n"
        "        overlap = active[0]\n"
        "    time.sleep(0.02)\n"
        "    log.append(i)\n"
        "    with lock:\n"
        "        active[0] -= 1\n"
        "    return (list(log), overlap)\n"
    )
    kpool.define("step", source, session="s")
    kpool.define("sleepy", SLEEPY)
    others = [kpool.submit("sleepy", 0.2) for _ in range(6)]
    futures = [kpool.submit("step", i, session="s") for i in range(12)]
    results = [f.result(20) for f in futures]
    assert results[-1][0] == list(range(12))
    assert {overlap for _, overlap in results} == {1}
    for f in others:
        f.result(20)


def test_dspy_signature_program_at_many_calls_per_worker(make_pool: MakePool) -> None:
    pool = make_pool(2, concurrency=4, preload=["dspy"])
    pool.wait_ready(60)
    answers = {f"<{i}>": {"answer": f"a{i}"} for i in range(12)}
    pool.configure_lm("dummy", answers=answers)
    pool.define_signature("qa", "question -> answer")
    futures = [pool.submit("qa", question=f"<{i}>") for i in range(12)]
    assert [f.result(30).answer for f in futures] == [f"a{i}" for i in range(12)]
