"""The pool's contract, run against every backend (anyio's ``anyio_backend`` habit).

What a user relies on, whatever runs the workers: define/run/submit/arun, errors,
sessions, cancel, close, timeouts, set-ups and status. Backend-specific behaviour
(the template, pipelining, nannies, misrouted tasks) is tested beside this file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspool_jupyter import Pool
from dspool_jupyter.errors import (
    CallTimeout,
    PoolClosed,
    ProgramError,
    ProgramNotFound,
    UnpicklableArguments,
)
from tests.conftest import assert_no_leftovers, wait_for
from tests.dask_cluster import executing
from tests.programs import BOOM, HANG, INC, SLEEPY, WHOAMI

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["local", "dask"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def any_pool(backend: str, request: pytest.FixtureRequest, store_dir: Path) -> Iterator[Pool]:
    kwargs: dict[str, object] = {"store": store_dir, "workers": 2}
    if backend == "dask":
        kwargs["address"] = request.getfixturevalue("dask_address")
    pool = Pool(backend=backend, **kwargs)  # type: ignore[arg-type]
    try:
        pool.wait_ready(60)
        yield pool
    finally:
        pool.close()
        if backend == "local":
            assert_no_leftovers([pool.token])


def test_define_run_submit_arun(any_pool: Pool) -> None:
    any_pool.define("inc", INC)

    def double(x: int) -> int:
        return 2 * x

    any_pool.define("double", double)
    assert any_pool.run("inc", 1) == 2
    assert [f.result(20) for f in [any_pool.submit("double", i) for i in range(20)]] == [
        2 * i for i in range(20)
    ]
    assert asyncio.run(any_pool.arun("inc", 41)) == 42


def test_errors_are_replies_and_workers_survive(any_pool: Pool) -> None:
    any_pool.define("boom", BOOM)
    any_pool.define("whoami", WHOAMI)
    pids = {w.pid for w in any_pool.status().workers}
    with pytest.raises(ProgramError, match="bad input") as info:
        any_pool.run("boom")
    assert "ValueError" in info.value.remote_traceback
    with pytest.raises(ProgramNotFound):
        any_pool.run("nope")
    with pytest.raises(UnpicklableArguments):
        any_pool.run("whoami", threading.Lock())
    assert {any_pool.run("whoami") for _ in range(10)} <= pids
    status = any_pool.status()
    assert status.failed == 1 and status.done >= 10


def test_sessions_stick_isolate_and_keep_order(any_pool: Pool) -> None:
    any_pool.define("whoami", WHOAMI)
    seen = {any_pool.run("whoami", session="s1") for _ in range(10)}
    assert len(seen) == 1
    any_pool.define("secret", INC, entry="inc", session="s2")
    assert any_pool.run("secret", 1, session="s2") == 2
    with pytest.raises(ProgramNotFound):
        any_pool.run("secret", 1, session="s1")
    order = "log = []\ndef note(i):\n    log.append(i)\n    return list(log)\n"
    any_pool.define("note", order, session="s3")
    futures = [any_pool.submit("note", i, session="s3") for i in range(10)]
    assert futures[-1].result(20) == list(range(10))


def test_cancel_queued_and_running(
    any_pool: Pool, backend: str, request: pytest.FixtureRequest
) -> None:
    any_pool.define("hang", HANG)
    any_pool.define("inc", INC)
    running = [any_pool.submit("hang") for _ in range(2)]
    wait_for(lambda: all(f.running() for f in running), timeout=20)
    queued = any_pool.submit("hang")
    assert queued.cancel()
    assert all(f.cancel() for f in running)
    done, not_done = concurrent.futures.wait([*running, queued], timeout=5)
    assert not not_done
    wait_for(lambda: any_pool.status().running == 0, timeout=30)
    if backend == "dask":  # stopped on the cluster too, not only in the pool
        address = request.getfixturevalue("dask_address")
        wait_for(lambda: not _ours(executing(address), any_pool), timeout=20)
    any_pool.wait_ready(60)
    assert any_pool.run("inc", 1) == 2
    assert any_pool.status().cancelled == 3


def test_timeout_fails_the_call_and_the_pool_heals(any_pool: Pool) -> None:
    any_pool.define("sleepy", SLEEPY)
    any_pool.define("inc", INC)
    with pytest.raises(CallTimeout):
        any_pool.run("sleepy", 30, timeout=0.5)
    any_pool.wait_ready(60)
    assert any_pool.run("inc", 1) == 2


def test_setups_reach_every_worker(any_pool: Pool) -> None:
    setup = "import builtins\ndef configure(value):\n    builtins.dspool_setting = value\n"
    any_pool.set_worker_setup("configure", setup, 7)
    read = "import builtins, os\ndef read():\n    return (builtins.dspool_setting, os.getpid())\n"
    any_pool.define("read", read)
    results = {f.result(20) for f in [any_pool.submit("read") for _ in range(30)]}
    assert {value for value, _ in results} == {7}


def test_status_counts_agree(any_pool: Pool) -> None:
    any_pool.define("inc", INC)
    any_pool.define("boom", BOOM)
    for i in range(5):
        any_pool.run("inc", i)
    with pytest.raises(ProgramError):
        any_pool.run("boom")
    status = any_pool.status()
    assert status.state == "healthy" and status.ready
    assert status.done == 5 and status.failed == 1 and status.calls == 6
    assert sum(w.calls for w in status.workers) == 6
    assert sum(w.done for w in status.workers) == 5
    assert all(w.slots == 1 and w.active == 0 for w in status.workers)


def test_close_ends_every_call(
    backend: str, request: pytest.FixtureRequest, store_dir: Path
) -> None:
    kwargs: dict[str, object] = {"store": store_dir, "workers": 1}
    if backend == "dask":
        kwargs["address"] = request.getfixturevalue("dask_address")
    pool = Pool(backend=backend, **kwargs)  # type: ignore[arg-type]
    pool.wait_ready(60)
    pool.define("hang", HANG)
    futures = [pool.submit("hang") for _ in range(5)]
    wait_for(lambda: futures[0].running(), timeout=20)
    pool.close()
    for future in futures:
        with pytest.raises(PoolClosed):
            future.result(10)
    with pytest.raises(PoolClosed):
        pool.submit("hang")
    assert pool.status().state == "closed"
    if backend == "local":
        assert_no_leftovers([pool.token])
    else:  # Dask's cancel leaves threads running: the pool stops them on a shared cluster
        address = str(kwargs["address"])
        wait_for(lambda: not any(_ours(executing(address), pool)), timeout=20)


def _ours(executing: dict[str, list[str]], pool: Pool) -> list[str]:
    return [key for keys in executing.values() for key in keys if pool.token in key]
