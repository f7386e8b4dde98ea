"""The Dask backend against a real cluster: a scheduler and two nanny workers on 127.0.0.1.

The cluster is ``$DSPOOL_TEST_DASK_ADDRESS`` (``.ci/run`` starts one) or, without it, one
this module starts and kills at teardown (:mod:`tests.dask_cluster`). Tests that kill a
worker leave the nanny to start a new one; every pool waits for two ready workers
first. After each pool closes, no task of it may be left on the scheduler.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from distributed import Client

from dspool_jupyter import Pool
from dspool_jupyter.comm import _snapshot
from dspool_jupyter.errors import (
    CallTimeout,
    DspoolError,
    InvalidProgram,
    PoolClosed,
    ProgramError,
    ProgramNotFound,
    UnknownWorker,
    WorkerCrashed,
)
from dspool_jupyter.events import Event, WorkerDied, WorkerReady, WorkerReplaced
from dspool_jupyter.pool import current_pool
from dspool_jupyter.widget import build_model, render_text
from tests.conftest import wait_for
from tests.programs import BOOM, INC, WHOAMI

pytestmark = pytest.mark.timeout(60)

MakePool = Callable[..., Pool]

# Appends the call's tag to a file (the workers share this machine's disk in the tests
# only), then sleeps: a tag that appears twice would be a silent rerun.
MARKED = (
    "import os, time\n"
    "def marked(path, tag, seconds):\n"
    "    with open(path, 'a') as f:\n"
    "        f.write(f'{tag}\\n')\n"
    "    time.sleep(seconds)\n"
    "    return (tag, os.getpid())\n"
)
NAP = "import os, time\ndef nap(seconds):\n    time.sleep(seconds)\n    return os.getpid()\n"


def scheduler_keys(address: str, needle: str) -> list[str]:
    """Keys of tasks the scheduler still holds whose name contains ``needle``."""
    with Client(address, timeout=10) as client:
        keys = client.run_on_scheduler(
            lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks]
        )
    return [k for k in keys if needle in k]


@pytest.fixture
def make_dask_pool(dask_address: str, store_dir: Path) -> Iterator[MakePool]:
    pools: list[Pool] = []

    def make(**kwargs: Any) -> Pool:
        kwargs.setdefault("store", store_dir)
        kwargs.setdefault("workers", 2)
        pool = Pool(backend="dask", address=dask_address, **kwargs)
        assert pool.backend_name == "dask"
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
        assert not pool._backend.thread.is_alive()
    for pool in pools:
        deadline = time.monotonic() + 15
        while (left := scheduler_keys(dask_address, pool.token)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"tasks of a closed pool are still on the scheduler: {left}"


@pytest.fixture
def dpool(make_dask_pool: MakePool) -> Pool:
    pool = make_dask_pool()
    pool.wait_ready(30)
    return pool


def pids(pool: Pool) -> set[int]:
    return {w.pid for w in pool.status().workers if w.pid is not None}


def spread(pool: Pool, program: str, n: int = 40) -> set[Any]:
    """Results of ``n`` concurrent calls (enough that both workers serve some)."""
    return {f.result(20) for f in [pool.submit(program, 0.02) for _ in range(n)]}


# ------------------------------------------------------------------ surface and set-up


def test_backend_dispatch_registry_and_surface(dask_address: str, store_dir: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        Pool(backend="spark", store=store_dir)
    with pytest.raises(ValueError, match="backend='dask'"):
        Pool(address=dask_address, store=store_dir)
    with pytest.raises(DspoolError, match="cannot connect to the Dask scheduler"):
        Pool(backend="dask", address="tcp://127.0.0.1:9", store=store_dir, connect_timeout=1)
    pool = Pool(backend="dask", address=dask_address, store=store_dir)
    try:
        assert type(pool) is Pool and pool.backend_name == "dask"
        assert pool.target == 2  # workers=None: the cluster's size
        pool.wait_ready(30)
        assert current_pool() is pool
        assert "dask" in repr(pool) and "scheduler=" in repr(pool)
    finally:
        pool.close()
    assert current_pool() is not pool and pool.closed
    with pytest.raises(PoolClosed):
        pool.submit("inc", 1)
    # One facade over both backends: nothing subclasses Pool.
    assert Pool.__subclasses__() == []


def test_cross_worker_visibility_redefinition_and_delete(dpool: Pool) -> None:
    program_id = dpool.define("inc", INC)
    assert dpool.run("inc", 41) == 42
    assert [f.result(20) for f in [dpool.submit("inc", i) for i in range(100)]] == list(
        range(1, 101)
    )
    assert dpool.run(program_id, 1) == 2  # by id too
    dpool.define("nap", NAP)
    assert spread(dpool, "nap") == pids(dpool)  # both workers ran it

    offset = 10

    def add(x: int) -> int:
        return x + offset

    dpool.define("add", add)  # a callable travels by value
    assert {f.result(20) for f in [dpool.submit("add", 1) for _ in range(20)]} == {11}

    dpool.define("version", "import os\ndef version(s=0):\n    return ('v1', os.getpid())\n")
    assert {v for v, _ in spread(dpool, "version")} == {"v1"}
    dpool.define("version", "import os\ndef version(s=0):\n    return ('v2', os.getpid())\n")
    seen = spread(dpool, "version")
    assert {v for v, _ in seen} == {"v2"} and {p for _, p in seen} == pids(dpool)

    assert dpool.delete("version")
    with pytest.raises(ProgramNotFound):
        dpool.run("version")
    # Deleted while its call waited in the queue: the store decides, not the worker's cache.
    busy = [dpool.submit("nap", 0.5) for _ in range(2)]
    queued = dpool.submit("inc", 1)
    assert dpool.delete("inc")
    with pytest.raises(ProgramNotFound):
        queued.result(20)
    assert len({f.result(20) for f in busy}) == 2
    dpool.define("inc", INC)
    with pytest.raises(InvalidProgram):
        dpool.define("broken", "def broken(:\n")
    assert dpool.programs() == ["add", "inc", "nap"]


def test_program_errors_output_and_results(make_dask_pool: MakePool) -> None:
    dpool = make_dask_pool(max_result_bytes=1 << 16)
    dpool.wait_ready(30)
    dpool.define("boom", BOOM)
    dpool.define("whoami", WHOAMI)
    before = pids(dpool)
    failed: list[Event] = []
    dpool.subscribe(lambda e: failed.append(e) if e.kind == "call_failed" else None)
    with pytest.raises(ProgramError) as info:
        dpool.run("boom", "bad input 7")
    err = info.value
    assert err.remote_type == "ValueError" and err.remote_message == "bad input 7"
    assert 'File "<dspool program boom>", line 2, in boom' in err.remote_traceback
    assert isinstance(err.remote_exception, ValueError)
    assert f"on worker {err.worker_id}" in "\n".join(err._render_traceback_())
    with pytest.raises(ProgramError, match="unexpected keyword argument 'y'"):
        dpool.run("boom", y=1)
    dpool.define(
        "talk", "import sys\ndef talk():\n    print('out')\n    print('err', file=sys.stderr)\n"
    )
    future = dpool.submit("talk")
    assert future.result(20) is None
    assert (future.stdout, future.stderr) == ("out\n", "err\n")
    dpool.define("lock", "import threading\ndef lock():\n    return threading.Lock()\n")
    with pytest.raises(ProgramError, match="cannot be pickled") as bad:
        dpool.run("lock")
    assert bad.value.phase == "result"
    dpool.define("big", "def big():\n    return b'x' * (1 << 20)\n")
    with pytest.raises(ProgramError, match="max_result_bytes"):
        dpool.run("big")
    assert pids(dpool) == before  # nobody died
    status = dpool.status()
    assert status.failed == 4 and status.recent_failures[-1].program == "big"
    assert [e.kind for e in failed].count("call_failed") >= 4


def test_sessions_are_isolated_and_move_when_their_worker_dies(dpool: Pool) -> None:
    dpool.define("whoami", WHOAMI, session="a")
    dpool.define("only_b", INC, entry="inc", session="b")
    dpool.define("inc", INC)
    with pytest.raises(ProgramNotFound):
        dpool.run("whoami")  # not anonymous
    with pytest.raises(ProgramNotFound):
        dpool.run("whoami", session="b")
    assert dpool.run("inc", 1, session="a") == 2  # anonymous programs are visible
    assert dpool.programs("a") == ["inc", "whoami"]
    homes = {f.result(20) for f in [dpool.submit("whoami", session="a") for _ in range(30)]}
    assert len(homes) == 1  # one worker serves the session
    (home,) = homes
    os.kill(home, signal.SIGKILL)
    moved = wait_for(lambda: _run_quietly(dpool, "whoami", "a"), timeout=20)
    assert moved != home and moved in pids(dpool)
    assert dpool.end_session("a") == 1
    with pytest.raises(ProgramNotFound):
        dpool.run("whoami", session="a")


def _run_quietly(pool: Pool, program: str, session: str) -> int | None:
    try:
        return int(pool.run(program, session=session))
    except WorkerCrashed:
        return None


# ------------------------------------------------------------------------------ faults


def test_worker_killed_under_load_fails_only_its_calls_and_never_reruns(
    dpool: Pool, tmp_path: Path
) -> None:
    dpool.define("marked", MARKED)
    events: list[Event] = []
    dpool.subscribe(events.append)
    marks = tmp_path / "marks.txt"
    futures = [dpool.submit("marked", str(marks), i, 0.25) for i in range(20)]
    victim = wait_for(lambda: _busy_pid(dpool), timeout=20)
    time.sleep(0.05)  # well inside its 0.25 s call
    os.kill(victim, signal.SIGKILL)  # from outside, as the OOM killer would
    outcomes: dict[int, Any] = {}
    for i, future in enumerate(futures):
        try:
            outcomes[i] = future.result(30)
        except WorkerCrashed as exc:
            outcomes[i] = exc
    crashed = [i for i, o in outcomes.items() if isinstance(o, WorkerCrashed)]
    assert len(crashed) == 1  # the call it ran (one thread), nothing else
    assert all(
        o.pid == victim and "died while running" in str(o) for o in map(outcomes.get, crashed)
    )
    tags = [int(line) for line in marks.read_text().split()]
    assert len(tags) == len(set(tags)), "a call ran twice"
    assert set(tags) >= {i for i, o in outcomes.items() if not isinstance(o, WorkerCrashed)}
    wait_for(lambda: dpool.status().ready_count == 2 and victim not in pids(dpool), timeout=30)
    died = [e for e in events if isinstance(e, WorkerDied)]
    assert died and died[0].pid == victim and died[0].reason == "crashed"
    assert any(isinstance(e, WorkerReplaced) for e in events)
    assert any(isinstance(e, WorkerReady) for e in events)
    assert dpool.status().replaced >= 1 and dpool.status().state == "healthy"
    assert dpool.run("marked", str(marks), "after", 0)[0] == "after"


def test_a_task_dask_reruns_elsewhere_does_not_run_the_program(
    dask_address: str, tmp_path: Path
) -> None:
    from dspool_jupyter.dask_tasks import _dask_call
    from dspool_jupyter.store import ProgramStore

    spec = ProgramStore(tmp_path / "store").put("marked", MARKED)
    marks = tmp_path / "marks.txt"
    blob = cloudpickle.dumps(((str(marks), "x", 0), {}))
    with Client(dask_address, timeout=10) as client:
        uid = "Worker-that-died"  # the process the call was sent to, not this one
        reply = client.submit(
            _dask_call, uid, "k", spec.id, "marked", spec.to_record(), blob, 1 << 20, pure=False
        ).result(20)
    assert reply == ("misrouted",) and not marks.exists()


def _busy_pid(pool: Pool) -> int | None:
    for worker in pool.status().workers:
        if worker.program is not None and worker.pid is not None:
            return worker.pid
    return None


def test_timeout_kills_and_replaces_the_worker(dpool: Pool) -> None:
    dpool.define("nap", NAP)
    dpool.define("inc", INC)
    events: list[Event] = []
    dpool.subscribe(events.append)
    before = pids(dpool)
    started = time.monotonic()
    with pytest.raises(CallTimeout) as info:
        dpool.run("nap", 30, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    assert info.value.worker_id is not None
    died = wait_for(lambda: [e for e in events if isinstance(e, WorkerDied)], timeout=20)
    assert died[0].reason == "timeout" and died[0].worker_id == info.value.worker_id
    wait_for(lambda: dpool.status().ready_count == 2 and len(pids(dpool) - before) == 1, 30)
    assert [f.result(20) for f in [dpool.submit("inc", i) for i in range(10)]] == list(range(1, 11))
    with pytest.raises(CallTimeout):
        dpool.submit("nap", 30, timeout=0.3).result(20)  # submit's timeout too


def test_cancel_interrupts_the_running_call_and_its_worker_survives(dpool: Pool) -> None:
    dpool.define(
        "loop", "import os, time\ndef loop():\n    while True:\n        time.sleep(0.01)\n"
    )
    dpool.define("whoami", WHOAMI)
    before = pids(dpool)
    future = dpool.submit("loop")
    wait_for(future.running, timeout=20)
    time.sleep(0.2)
    assert future.cancel() and future.cancelled()
    worker = future.worker_id
    wait_for(lambda: all(w.program is None for w in dpool.status().workers), timeout=10)
    assert pids(dpool) == before  # interrupted, not killed
    assert worker in {w.id for w in dpool.status().workers}
    assert dpool.run("whoami") in before


def test_setups_run_on_every_worker_and_on_replacements(dpool: Pool) -> None:
    dpool.set_worker_setup(
        "seed", "import builtins\ndef seed(v):\n    builtins.DSPOOL_SEED = v\n", 7
    )
    dpool.define(
        "seed_of",
        "import builtins, os\ndef seed_of(s=0):\n    return (builtins.DSPOOL_SEED, os.getpid())\n",
    )
    assert {v for v, _ in spread(dpool, "seed_of")} == {7}
    old = dpool.status().workers[0]
    with pytest.raises(UnknownWorker):
        dpool.restart_worker("w999")
    dpool.restart_worker(old.id)
    wait_for(lambda: dpool.status().ready_count == 2 and old.pid not in pids(dpool), 30)
    seen = spread(dpool, "seed_of")
    assert {v for v, _ in seen} == {7} and {p for _, p in seen} == pids(dpool)


def test_status_renders_in_the_widget_and_the_lab_snapshot(dpool: Pool) -> None:
    dpool.define("inc", INC)
    dpool.run("inc", 1)
    status = dpool.status()
    assert status.state == "healthy" and status.ready and status.target == 2
    assert len(status.workers) == 2 and status.calls >= 1
    for worker in status.workers:
        assert worker.pid and worker.rss_bytes and worker.last_heartbeat
        assert worker.state in ("idle", "busy")
    assert set(dpool.worker_addresses()) == {w.id for w in status.workers}
    text = render_text(build_model(status))
    assert all(w.id in text for w in status.workers)
    snapshot = _snapshot(dpool)
    assert snapshot is not None and len(snapshot["workers"]) == 2 and snapshot["ready"]


# -------------------------------------------------------------- LocalCluster and magics


@pytest.mark.timeout(90)
def test_local_cluster_pool_starts_serves_and_leaves_nothing(store_dir: Path) -> None:
    me = psutil.Process()
    before = _children(me)
    pool = Pool(backend="dask", workers=2, store=store_dir)
    try:
        assert pool.backend_name == "dask"
        pool.wait_ready(60)
        pool.define("whoami", WHOAMI)
        seen = {f.result(20) for f in [pool.submit("whoami") for _ in range(20)]}
        workers = pids(pool)
        assert seen <= workers and len(workers) == 2
        assert workers <= _children(me)  # ours, on this machine
    finally:
        pool.close()
    assert pool.status().state == "closed"
    wait_for(lambda: not (_children(me) - before), timeout=15)


def _children(process: psutil.Process) -> set[int]:
    """Live descendants, without multiprocessing's resource tracker (it lives on for
    the whole process once anything was spawned)."""
    found = set()
    for child in process.children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            continue
    return found


def test_magic_starts_a_dask_pool(dask_address: str, store_dir: Path) -> None:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "dspool_jupyter")
        shell.run_line_magic(
            "dspool", f"start --dask {dask_address} --workers 2 --store {store_dir}"
        )
        pool = current_pool()
        assert pool.backend_name == "dask" and pool.status().ready
        shell.run_cell_magic("dspool", "program square", "def square(x):\n    return x * x\n")
        assert shell.run_line_magic("dspool", "run square x=7") == 49
        shell.run_line_magic("dspool", "stop")
        assert pool.closed
    finally:
        pool = current_pool()
        if pool is not None:
            pool.close()
        shell.run_line_magic("unload_ext", "dspool_jupyter")
        InteractiveShell.clear_instance()


def test_close_fails_pending_calls(make_dask_pool: MakePool) -> None:
    pool = make_dask_pool()
    pool.wait_ready(30)
    pool.define("nap", NAP)
    events: list[Event] = []
    pool.subscribe(events.append)
    running = [pool.submit("nap", 5) for _ in range(4)]
    wait_for(lambda: pool.status().running == 2, timeout=20)
    closer = threading.Thread(target=pool.close)
    closer.start()
    closer.join(20)
    for future in running:
        with pytest.raises(PoolClosed):
            future.result(5)
    stopped = [e for e in events if isinstance(e, WorkerDied)]
    assert len(stopped) == 2 and {e.reason for e in stopped} == {"close"}
    assert {e.program for e in stopped} == {"nap"} and pool.status().state == "closed"
    assert events[-1].kind == "pool_closed"


def test_journaled_map_runs_on_the_cluster_and_journals_in_the_kernels_store(
    dpool: Pool,
) -> None:
    dpool.define("inc", INC)
    first = dpool.map("inc", range(20), journal="on-dask")
    assert list(first) == list(range(1, 21)) and first.restored == []
    assert (dpool.store.directory / "journals" / "on-dask").is_dir()
    again = dpool.map("inc", range(20), journal="on-dask")
    assert list(again) == list(first) and again.restored == list(range(20))


def test_each_call_reports_its_usage_on_dask(make_dask_pool: MakePool) -> None:
    from tests.llm_server import LLMServer

    with LLMServer(latency=0.02) as server:
        pool = make_dask_pool(preload=["dspy"])
        pool.wait_ready(60)
        pool.configure_lm(
            "openai/gpt-4o-mini", api_base=server.url, api_key="x", cache=False, num_retries=0
        )
        pool.define_signature("qa", "question -> answer")
        futures = [pool.submit("qa", question=f"q{i}") for i in range(4)]
        for future in futures:
            future.result(60)
        stats = server.stats()
    usages = [f.usage for f in futures]
    assert all(u is not None and u["requests"] == 1 for u in usages), usages
    assert sum(u["prompt_tokens"] for u in usages if u is not None) == stats["prompt_tokens"]
    assert pool.usage().requests == stats["ok"] == 4
