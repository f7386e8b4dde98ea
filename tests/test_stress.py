"""The seed's own scenarios under load: cross-worker visibility and sessions, at scale."""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from dspool_jupyter import Pool
from dspool_jupyter.errors import ProgramNotFound
from tests.programs import SLEEPY, WHOAMI

pytestmark = pytest.mark.timeout(300)

MakePool = Callable[..., Pool]
SESSIONS = [f"session{i}" for i in range(5)]


def _anonymous_op(pool: Pool, index: int) -> int:
    """Define a program with a distinct id, then run it at once (any worker)."""
    name = f"anon_stress_{index}"
    pool.define(name, f"def {name}(x):\n    return x * {index}\n")
    return int(pool.run(name, 3))


def _session_op(pool: Pool, index: int) -> int:
    session = SESSIONS[index % len(SESSIONS)]
    pool.define(
        "sess_prog", f"def sess_prog(x):\n    return x + {index % len(SESSIONS)}\n", session=session
    )
    return int(pool.run("sess_prog", 100, session=session))


@pytest.mark.parametrize("concurrency", [10, 20, 50, 100])
def test_mixed_stress_all_succeed(make_pool: MakePool, concurrency: int) -> None:
    """Seed: anonymous define-then-run plus session calls, N at once: 100 % success."""
    pool = make_pool(4)
    pool.wait_ready(30)
    with ThreadPoolExecutor(max_workers=concurrency) as executor:
        futures: list[tuple[str, int, Future[int]]] = []
        for i in range(concurrency * 3):
            if i % 2:
                futures.append(("anon", i, executor.submit(_anonymous_op, pool, i)))
            else:
                futures.append(("session", i, executor.submit(_session_op, pool, i)))
        for kind, i, future in futures:
            value = future.result(60)
            if kind == "anon":
                assert value == 3 * i
            else:
                # another thread may have redefined the session's program since: any
                # of the session's definitions is right, never another session's
                assert value == 100 + i % len(SESSIONS)


def test_every_worker_runs_programs_it_never_saw_defined(make_pool: MakePool) -> None:
    pool = make_pool(4)
    pool.wait_ready(30)
    pool.define("whoami", WHOAMI)
    for i in range(50):
        pool.define(f"p{i}", f"def p{i}():\n    return {i}\n")
    futures = [pool.submit(f"p{i % 50}") for i in range(400)]
    assert [f.result(30) for f in futures] == [i % 50 for i in range(400)]
    assert len({f.worker_id for f in futures}) == 4


def test_chaos_kills_under_load(make_pool: MakePool) -> None:
    """Kill one worker, several, then 30 % three rounds in a row, while calls stream in."""
    import os
    import signal
    import time

    pool = make_pool(6)
    pool.wait_ready(30)
    pool.define("sleepy", SLEEPY)
    rng = random.Random(7)
    outcomes: dict[str, int] = {"ok": 0, "crashed": 0}
    for kill_count in (1, 3, 2, 2, 2):  # 2 of 6 is the 30 % rounds
        futures = [pool.submit("sleepy", rng.uniform(0.01, 0.05), tag=i) for i in range(120)]
        time.sleep(0.1)
        victims = rng.sample([w.pid for w in pool.status().workers if w.pid], kill_count)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        for i, future in enumerate(futures):
            error = future.exception(60)  # every call resolves
            if error is None:
                assert future.result()[0] == i
                outcomes["ok"] += 1
            else:
                assert type(error).__name__ == "WorkerCrashed", error
                outcomes["crashed"] += 1
        pool.wait_ready(10)
        assert len(pool.status().workers) == 6
    assert outcomes["crashed"] <= 10  # only the calls that were running on the victims
    assert outcomes["ok"] >= 600 - 10


@pytest.mark.slow
def test_ten_thousand_mixed_calls_with_random_kills(make_pool: MakePool) -> None:
    """10,000 mixed calls on 8 workers with random SIGKILLs: 0 wrong results, 0 hangs."""
    import os
    import signal
    import threading

    pool = make_pool(8)
    pool.wait_ready(60)
    rng = random.Random(11)
    expected: list[tuple[Future[Any], Any]] = []
    stop = threading.Event()
    kills = []

    def killer() -> None:
        while not stop.wait(0.1):  # the run lasts ~2 s: several kills
            pids = [w.pid for w in pool.status().workers if w.pid and w.state == "busy"]
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills.append(1)
                except ProcessLookupError:
                    pass

    pool.define("sq", "def sq(x):\n    return x * x\n")
    anonymous: dict[str, Future[Any]] = {}
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    not_found = 0
    for i in range(10_000):
        choice = i % 10
        if choice == 0:  # define then run a fresh anonymous program
            name = f"anon{i}"
            pool.define(name, f"def {name}(x):\n    return x + {i}\n")
            anonymous[name] = pool.submit(name, 1)
            expected.append((anonymous[name], 1 + i))
        elif choice in (1, 2, 3):  # session calls on 5 sessions
            session = SESSIONS[i % 5]
            pool.define("s", f"def s(x):\n    return ('{session}', x)\n", session=session)
            expected.append((pool.submit("s", i, session=session), (session, i)))
        elif choice == 4 and i > 100:  # delete a program whose call is done, then call it
            name = f"anon{i - 94}"
            anonymous.pop(name).exception(60)
            pool.delete(name)
            expected.append((pool.submit(name, 1), ProgramNotFound))
        else:
            expected.append((pool.submit("sq", i), i * i))
    counts = {"ok": 0, "crashed": 0, "deleted": 0}
    try:
        for future, want in expected:
            error = future.exception(120)
            if want is ProgramNotFound:
                assert isinstance(error, ProgramNotFound), error
                counts["deleted"] += 1
            elif error is None:
                assert future.result() == want
                counts["ok"] += 1
            elif isinstance(error, ProgramNotFound):
                not_found += 1
            else:
                assert type(error).__name__ == "WorkerCrashed", error
                counts["crashed"] += 1
    finally:
        stop.set()
        thread.join()
    assert not_found == 0
    assert counts["ok"] + counts["crashed"] + counts["deleted"] == 10_000
    assert counts["crashed"] <= len(kills) < 500
    assert len(kills) >= 3  # the run really was under fire
    pool.wait_ready(30)
    assert len(pool.status().workers) == 8
