"""Pool: the public surface and each call outcome, with real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from dspool_jupyter import Pool
from dspool_jupyter.errors import (
    CallTimeout,
    InvalidProgram,
    PoolClosed,
    PoolStartTimeout,
    ProgramError,
    ProgramNotFound,
    UnknownWorker,
    UnpicklableArguments,
    WorkerCrashed,
)
from dspool_jupyter.events import Event, PoolReady, WorkerDied, WorkerReady
from tests.conftest import started, wait_for
from tests.programs import BOOM, EXIT, HANG, INC, SEGFAULT, SLEEPY, SPIN, WHOAMI

pytestmark = pytest.mark.timeout(60)

MakePool = Callable[..., Pool]


def worker_pids(pool: Pool) -> set[int]:
    return {w.pid for w in pool.status().workers if w.pid is not None}


def test_define_run_submit(pool: Pool) -> None:
    program_id = pool.define("inc", INC)
    assert program_id.startswith("p")
    assert pool.run("inc", 41) == 42
    assert pool.run("inc", x=1) == 2
    futures = [pool.submit("inc", i) for i in range(200)]
    assert [f.result(10) for f in futures] == [i + 1 for i in range(200)]
    assert pool.run(program_id, 1) == 2  # by id, too


def test_callables_run_by_value(pool: Pool) -> None:
    offset = 10

    def add(x: int) -> int:
        return x + offset

    pool.define("add", add)
    assert pool.run("add", 5) == 15


def test_arun_from_async_code(pool: Pool) -> None:
    pool.define("inc", INC)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(pool.arun("inc", i) for i in range(10))))

    assert asyncio.run(main()) == list(range(1, 11))


def test_program_output_is_captured_and_echoed(
    pool: Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    pool.define(
        "talk",
        "import sys\n"
        "def talk():\n"
        "    print('to out')\n"
        "    print('to err', file=sys.stderr)\n"
        "    return 1\n",
    )
    future = pool.submit("talk")
    assert future.result(10) == 1
    assert future.stdout == "to out\n" and future.stderr == "to err\n"
    assert pool.run("talk") == 1
    captured = capsys.readouterr()
    assert "to out" in captured.out and "to err" in captured.err


def test_program_error_has_remote_traceback_and_worker_survives(pool: Pool) -> None:
    pool.define("boom", BOOM)
    pool.define("whoami", WHOAMI)
    pids = worker_pids(pool)
    with pytest.raises(ProgramError) as info:
        pool.run("boom", "bad input 7")
    err = info.value
    assert err.remote_type == "ValueError" and err.remote_message == "bad input 7"
    assert 'File "<dspool program boom>", line 2, in boom' in err.remote_traceback
    assert "raise ValueError(msg)" in err.remote_traceback  # the program's own line
    assert isinstance(err.remote_exception, ValueError)
    assert err.worker_id in {w.id for w in pool.status().workers}
    rendered = "\n".join(err._render_traceback_())
    assert f"on worker {err.worker_id}" in rendered and "ValueError: bad input 7" in rendered
    assert worker_pids(pool) == pids  # nobody died
    assert pool.run("whoami") in pids
    status = pool.status()
    assert status.failed == 1 and status.recent_failures[-1].program == "boom"
    assert sum(w.errors for w in status.workers) == 1


def test_unknown_input_is_a_clear_error(pool: Pool) -> None:
    pool.define("inc", INC)
    pids = worker_pids(pool)
    with pytest.raises(
        ProgramError, match="TypeError: inc\\(\\) got an unexpected keyword argument 'y'"
    ):
        pool.run("inc", y=1)
    with pytest.raises(ProgramError, match="missing 1 required positional argument"):
        pool.run("inc")
    assert worker_pids(pool) == pids


def test_missing_program_is_a_clear_error(pool: Pool) -> None:
    pool.define("inc", INC)
    with pytest.raises(ProgramNotFound, match="no program 'nope'; known: inc"):
        pool.run("nope")
    future = pool.submit("nope")
    assert isinstance(future.exception(5), ProgramNotFound)


def test_bad_programs_fail_at_definition(pool: Pool) -> None:
    with pytest.raises(InvalidProgram, match="syntax error at line 2"):
        pool.define("bad", "def bad():\n    return (\n")
    assert pool.programs() == []


def test_program_that_fails_to_load_is_an_error_reply(pool: Pool) -> None:
    pool.define("whoami", WHOAMI)
    pids = worker_pids(pool)
    pool.define("broken", "import no_such_module_here\ndef broken():\n    return 1\n")
    with pytest.raises(ProgramError, match="failed to load.*ModuleNotFoundError") as info:
        pool.run("broken")
    assert info.value.phase == "load"
    pool.define("dynamic", "if True:\n    pass\n", entry="missing")
    with pytest.raises(ProgramError, match="defines no 'missing'"):
        pool.run("dynamic")
    assert worker_pids(pool) == pids


def test_unpicklable_result_and_arguments(pool: Pool) -> None:
    pool.define("lock", "import threading\ndef lock():\n    return threading.Lock()\n")
    pool.define("whoami", WHOAMI)
    pids = worker_pids(pool)
    with pytest.raises(ProgramError, match="the result \\(lock\\) cannot be pickled"):
        pool.run("lock")
    with pytest.raises(
        UnpicklableArguments, match="arguments of a call to 'whoami' cannot be sent"
    ):
        pool.run("whoami", threading.Lock())
    assert worker_pids(pool) == pids


def test_result_size_limit(make_pool: MakePool) -> None:
    pool = make_pool(1, max_result_bytes=1000)
    pool.define("big", "def big(n):\n    return b'x' * n\n")
    assert len(pool.run("big", 100)) == 100
    with pytest.raises(ProgramError, match="over the pool's max_result_bytes of 1000"):
        pool.run("big", 10_000)
    assert pool.run("big", 10) == b"x" * 10


def test_large_arguments_and_results_travel(pool: Pool) -> None:
    pool.define("echo", "def echo(data):\n    return data[::-1]\n")
    data = os.urandom(8 << 20)
    assert pool.run("echo", data) == data[::-1]


def test_sys_exit_in_a_program_is_its_error(pool: Pool) -> None:
    pool.define("leave", "import sys\ndef leave():\n    sys.exit(4)\n")
    pids = worker_pids(pool)
    with pytest.raises(ProgramError, match="SystemExit: 4"):
        pool.run("leave")
    assert worker_pids(pool) == pids


@pytest.mark.parametrize(
    ("source", "entry", "returncode"),
    [(EXIT, "exit_now", 3), (SEGFAULT, "segfault", -signal.SIGSEGV)],
)
def test_worker_crash_fails_only_that_call(
    pool: Pool, source: str, entry: str, returncode: int
) -> None:
    pool.define(entry, source)
    pool.define("sleepy", SLEEPY)
    bystander = pool.submit("sleepy", 0.5, tag="other")
    wait_for(lambda: bystander.running())
    with pytest.raises(WorkerCrashed) as info:
        pool.run(entry)
    assert info.value.returncode == returncode
    assert bystander.result(10)[0] == "other"  # the other call was not touched
    pool.wait_ready(10)
    assert len(pool.status().workers) == 2


def test_sigkill_from_outside_during_a_call(pool: Pool, tmp_path: Path) -> None:
    pool.define("sleepy", SLEEPY)
    future = pool.submit("sleepy", 30, marker=str(tmp_path / "m"))
    started(tmp_path / "m")
    victim = next(w for w in pool.status().workers if w.id == future.worker_id)
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    with pytest.raises(WorkerCrashed, match="killed by SIGKILL") as info:
        future.result(10)
    assert info.value.signal == signal.SIGKILL and info.value.pid == victim.pid
    pool.wait_ready(10)
    assert victim.pid not in worker_pids(pool)
    assert pool.status().replaced == 1


def test_timeout_kills_only_that_worker_and_late_reply_never_arrives(pool: Pool) -> None:
    pool.define("sleepy", SLEEPY)
    pool.define("inc", INC)
    slow = pool.submit("sleepy", 1.0, tag="late", timeout=0.3)
    other = pool.submit("sleepy", 0.6, tag="ok")
    with pytest.raises(CallTimeout, match="ran past its timeout of 0.3 s"):
        slow.result(10)
    assert other.result(10)[0] == "ok"
    # the next callers get their own answers, never the late one
    results = [pool.run("sleepy", 0.01, tag=i) for i in range(20)]
    assert [r[0] for r in results] == list(range(20))
    pool.wait_ready(10)
    assert pool.status().replaced == 1


def test_pool_default_timeout_and_a_program_that_ignores_signals(make_pool: MakePool) -> None:
    pool = make_pool(1, call_timeout=0.3)
    pool.define("spin", SPIN)
    pool.define("inc", INC)
    with pytest.raises(CallTimeout):
        pool.run("spin")
    assert pool.run("inc", 1) == 2


def test_cancel_a_running_call_keeps_the_worker(pool: Pool, tmp_path: Path) -> None:
    pool.define("hang", HANG)
    pool.define("whoami", WHOAMI)
    pids = worker_pids(pool)
    future = pool.submit("hang", marker=str(tmp_path / "m"))
    started(tmp_path / "m")
    assert future.cancel()
    with pytest.raises(CancelledError):
        future.result(5)
    # the worker was interrupted, not killed
    time.sleep(0.2)
    assert worker_pids(pool) == pids
    assert {pool.run("whoami") for _ in range(20)} <= pids


def test_cancel_a_program_that_ignores_the_interrupt(pool: Pool) -> None:
    source = (
        "import signal, time\n"
        "def stubborn():\n"
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "    while True:\n"
        "        time.sleep(0.05)\n"
    )
    pool.define("stubborn", source)
    pool.define("inc", INC)
    future = pool.submit("stubborn")
    wait_for(lambda: future.running())
    victim = future.worker_id
    future.cancel()
    wait_for(lambda: victim not in {w.id for w in pool.status().workers}, timeout=10)
    pool.wait_ready(10)
    assert pool.run("inc", 1) == 2


def test_keyboard_interrupt_during_run_cancels_the_call(pool: Pool) -> None:
    pool.define("hang", HANG)
    pool.define("inc", INC)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        pool.run("hang")
    wait_for(lambda: pool.status().running == 0, timeout=5)
    assert pool.run("inc", 1) == 2


def test_calls_before_ready_queue_and_run(make_pool: MakePool) -> None:
    pool = make_pool(2, preload=["json"])
    pool.define("inc", INC)
    futures = [pool.submit("inc", i) for i in range(50)]  # no wait_ready first
    assert [f.result(30) for f in futures] == [i + 1 for i in range(50)]


def test_startup_emits_one_ready_event_per_worker(make_pool: MakePool, store_dir: Path) -> None:
    events: list[Event] = []
    pool = make_pool(3)
    pool.subscribe(events.append)
    pool.wait_ready(30)
    wait_for(lambda: any(isinstance(e, PoolReady) for e in events) or pool.status().startup_seconds)
    status = pool.status()
    assert status.ready and status.state == "healthy" and status.ready_count == 3
    assert len({w.pid for w in status.workers}) == 3
    assert status.startup_seconds is not None and status.startup_seconds > 0
    # events seen after subscribing (some workers may have been ready before)
    ready = [e for e in events if isinstance(e, WorkerReady)]
    assert all(1 <= e.ready <= 3 and e.target == 3 for e in ready)


def test_events_stream_reports_death_and_replacement(pool: Pool) -> None:
    events: list[Event] = []
    pool.subscribe(events.append)
    pool.define("exit_now", EXIT)
    with pytest.raises(WorkerCrashed):
        pool.run("exit_now", 5)
    died = wait_for(lambda: [e for e in events if isinstance(e, WorkerDied)])
    assert died[0].returncode == 5 and died[0].reason == "crashed" and died[0].program == "exit_now"
    expected = {"call_started", "call_failed", "worker_died", "worker_replaced", "worker_starting"}
    # The replacement is announced after the death, by the pool's loop thread: wait for it.
    wait_for(lambda: expected <= {e.kind for e in events})
    wait_for(lambda: any(isinstance(e, WorkerReady) for e in events))


def test_session_calls_stick_to_one_worker(pool: Pool) -> None:
    pool.define("whoami", WHOAMI)
    for session in ("s1", "s2", "s3"):
        pids = {pool.run("whoami", session=session) for _ in range(10)}
        assert len(pids) == 1, session
    futures = [pool.submit("whoami", session="s1") for _ in range(30)]
    assert len({f.result(10) for f in futures}) == 1


def test_session_moves_to_a_live_worker_when_its_worker_dies(pool: Pool) -> None:
    pool.define("whoami", WHOAMI)
    home = pool.run("whoami", session="s")
    os.kill(home, signal.SIGKILL)
    wait_for(lambda: home not in worker_pids(pool))
    new_home = pool.run("whoami", session="s")
    assert new_home != home
    assert {pool.run("whoami", session="s") for _ in range(5)} == {new_home}


def test_session_state_is_kept_on_its_worker(pool: Pool) -> None:
    source = (
        "state = {}\n"
        "def counter(key):\n"
        "    state[key] = state.get(key, 0) + 1\n"
        "    return state[key]\n"
    )
    pool.define("counter", source, session="s")
    assert [pool.run("counter", "k", session="s") for _ in range(5)] == [1, 2, 3, 4, 5]


def test_session_isolation_and_deletion(pool: Pool) -> None:
    pool.define("secret", INC, entry="inc", session="alice")
    assert pool.run("secret", 1, session="alice") == 2
    with pytest.raises(ProgramNotFound, match="in session 'bob'"):
        pool.run("secret", 1, session="bob")
    with pytest.raises(ProgramNotFound):
        pool.run("secret", 1)
    assert pool.delete("secret", session="alice")
    with pytest.raises(ProgramNotFound):
        pool.run("secret", 1, session="alice")
    pool.define("tmp", INC, entry="inc", session="carol")
    assert pool.end_session("carol") == 1
    assert pool.programs("carol") == []


def test_deletion_reaches_every_worker(pool: Pool) -> None:
    pool.define("whoami", WHOAMI)
    # every worker has the program compiled and cached
    futures = [pool.submit("whoami") for _ in range(40)]
    assert len({f.result(10) for f in futures}) == 2
    program_id = pool.store.resolve("whoami")
    pool.delete("whoami")
    for _ in range(10):
        with pytest.raises(ProgramNotFound):
            pool.run(program_id)


def test_redefinition_is_never_stale(pool: Pool) -> None:
    pool.define("f", "def f():\n    return 1\n")
    assert {f.result(10) for f in [pool.submit("f") for _ in range(20)]} == {1}
    pool.define("f", "def f():\n    return 2\n")
    assert {f.result(10) for f in [pool.submit("f") for _ in range(20)]} == {2}


def test_forced_cross_worker_run(pool: Pool) -> None:
    """Seed fault 1: define while every worker is busy, then run on any worker."""
    pool.define("sleepy", SLEEPY)
    busy = [pool.submit("sleepy", 0.3) for _ in range(2)]
    wait_for(lambda: all(f.running() for f in busy))
    # no worker has seen it; each call lasts long enough that both workers serve some
    pool.define("late", "import time\ndef late(x):\n    time.sleep(0.05)\n    return x + 1\n")
    futures = [pool.submit("late", i) for i in range(10)]
    assert [f.result(10) for f in futures] == list(range(1, 11))
    assert len({f.worker_id for f in futures}) == 2


def test_idle_workers_still_answer(make_pool: MakePool) -> None:
    pool = make_pool(2, heartbeat_interval=0.1)
    pool.wait_ready(30)
    pool.define("whoami", WHOAMI)
    pids = worker_pids(pool)
    time.sleep(3)  # 30 heartbeats of silence from the caller
    assert {pool.run("whoami") for _ in range(10)} <= pids
    status = pool.status()
    assert all(w.last_heartbeat and time.time() - w.last_heartbeat < 1 for w in status.workers)
    assert all(w.rss_bytes and w.rss_bytes > 1 << 20 for w in status.workers)


def test_restart_worker_and_restart_pool(pool: Pool) -> None:
    pool.define("whoami", WHOAMI)
    before = pool.status().workers
    pool.restart_worker(before[0].id)
    wait_for(lambda: before[0].id not in {w.id for w in pool.status().workers})
    pool.wait_ready(10)
    assert before[1].pid in worker_pids(pool) and before[0].pid not in worker_pids(pool)
    with pytest.raises(UnknownWorker, match="no worker 'w99' in this pool"):
        pool.restart_worker("w99")
    old = worker_pids(pool)
    pool.restart()
    wait_for(lambda: not (worker_pids(pool) & old), timeout=10)
    pool.wait_ready(10)
    assert pool.run("whoami") not in old


def test_close_fails_pending_calls_and_leaves_nothing(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1)
    pool.define("sleepy", SLEEPY)
    running = pool.submit("sleepy", 30, marker=str(tmp_path / "m"))
    started(tmp_path / "m")
    queued = pool.submit("sleepy", 30)
    pool.close()
    with pytest.raises(PoolClosed):
        running.result(5)
    with pytest.raises(PoolClosed):
        queued.result(5)
    with pytest.raises(PoolClosed):
        pool.submit("sleepy", 1)
    pool.close()  # idempotent
    assert pool.status().state == "closed"


def test_context_manager_and_bad_arguments(store_dir: Path) -> None:
    with pytest.raises(ValueError, match="workers must be a positive whole number"):
        Pool(workers=0, store=store_dir)
    with pytest.raises(ValueError, match="preload entry 'no such' is not a module name"):
        Pool(workers=1, store=store_dir, preload=["no such"])
    with pytest.raises(ValueError, match="call_timeout must be a positive"):
        Pool(workers=1, store=store_dir, call_timeout=-1)
    with Pool(workers=1, store=store_dir) as pool:
        pool.define("inc", INC)
        assert pool.run("inc", 1) == 2
    assert pool.closed


def test_preload_failure_is_reported_and_the_pool_still_works(make_pool: MakePool) -> None:
    pool = make_pool(1, preload=["no_such_module_for_dspool"])
    pool.wait_ready(30)
    assert "preload 'no_such_module_for_dspool' failed: ModuleNotFoundError" in (
        pool.status().last_error or ""
    )
    pool.define("inc", INC)
    assert pool.run("inc", 1) == 2


def test_preloaded_modules_are_in_the_workers(make_pool: MakePool) -> None:
    pool = make_pool(2, preload=["json", "decimal"])
    pool.define("mods", "import sys\ndef mods():\n    return 'decimal' in sys.modules\n")
    assert pool.run("mods") is True


def test_wait_ready_times_out_clearly(make_pool: MakePool) -> None:
    pool = make_pool(1, preload=["tests.slow_import"])
    with pytest.raises(PoolStartTimeout, match="0 of 1 workers ready after 0.2 s"):
        pool.wait_ready(0.2)
    pool.wait_ready(30)


SETUP = "import builtins\ndef configure(value):\n    builtins._dspool_setting = value\n"
READ = "import builtins\ndef read():\n    return getattr(builtins, '_dspool_setting', None)\n"


def test_worker_setup_reaches_every_worker_and_replacements(pool: Pool) -> None:
    pool.define("read", READ)
    pool.define("sleepy", SLEEPY)
    busy = pool.submit("sleepy", 0.3)  # a busy worker gets it after its call
    pool.set_worker_setup("setting", SETUP, "first", entry="configure")
    assert busy.result(10)[0] is None
    futures = [pool.submit("read") for _ in range(20)]
    assert {f.result(10) for f in futures} == {"first"}
    assert len({f.worker_id for f in futures}) == 2
    pool.set_worker_setup("setting", SETUP, "second", entry="configure")  # replaces it
    for worker in pool.status().workers:
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: pool.status().replaced == 2)
    pool.wait_ready(10)
    futures = [pool.submit("read") for _ in range(20)]
    assert {f.result(10) for f in futures} == {"second"}


def test_failing_worker_setup_is_a_clear_error(pool: Pool) -> None:
    pool.define("read", READ)
    with pytest.raises(ProgramError, match="program 'setup.bad' raised.*ValueError: no such model"):
        pool.set_worker_setup("bad", "def bad():\n    raise ValueError('no such model')\n")
    assert pool.run("read") is None  # the pool carries on
    pool.remove_worker_setup("bad")


def test_memory_blow_up_is_a_program_error_with_a_limit(make_pool: MakePool) -> None:
    pool = make_pool(1, worker_memory_limit=512 << 20)
    pool.define("hog", "def hog():\n    return len(bytearray(4 << 30))\n")
    pool.define("whoami", WHOAMI)
    pid = pool.run("whoami")
    with pytest.raises(ProgramError, match="MemoryError"):
        pool.run("hog")
    assert pool.run("whoami") == pid
    with pytest.raises(ValueError, match="worker_memory_limit must be at least 64 MiB"):
        Pool(workers=1, store=pool.store, worker_memory_limit=1000)


def test_a_corrupt_store_is_a_clear_error(tmp_path: Path) -> None:
    from dspool_jupyter.errors import StoreError

    path = tmp_path / "corrupt"
    path.mkdir(mode=0o700)
    (path / "cache.db").write_bytes(b"not a database" * 1000)
    match = "program store at .*corrupt: opening failed: file is not a database"
    with pytest.raises(StoreError, match=match):
        Pool(workers=1, store=path)


def test_no_call_waits_behind_a_long_one_while_a_worker_is_free(pool: Pool) -> None:
    pool.define("sleepy", SLEEPY)
    for _ in range(5):
        pool.run("sleepy", 0)  # the pool learns that sleepy is usually short
    long_call = pool.submit("sleepy", 3.0)
    short_call = pool.submit("sleepy", 0.2)
    wait_for(lambda: long_call.running() and short_call.running())
    time.sleep(0.02)
    started = time.monotonic()
    pool.run("sleepy", 0)  # both busy now; the short one frees its worker first
    assert time.monotonic() - started < 1.5
    assert not long_call.done()


def test_pipelined_calls_behind_a_crash_run_elsewhere(pool: Pool) -> None:
    pool.define("inc", INC)
    pool.define("exit_now", EXIT)
    for _ in range(20):
        pool.run("inc", 1)  # inc is short: calls may wait in a busy worker's socket
    futures = [pool.submit("inc", i) for i in range(500)]
    crash = pool.submit("exit_now")
    futures += [pool.submit("inc", i) for i in range(500, 1000)]
    assert [f.result(30) for f in futures] == [i + 1 for i in range(1000)]
    assert isinstance(crash.exception(30), WorkerCrashed)


FORKS_A_HELPER = (
    "import os, time\n"
    "def fork_and_die(pidfile, code=3):\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        time.sleep(30)  # holds the worker's socket open\n"
    "        os._exit(0)\n"
    "    with open(pidfile, 'w') as f:\n"
    "        f.write(str(pid))\n"
    "    os._exit(code)\n"
)


@pytest.mark.parametrize("timeout", [None, 1.0])
def test_a_death_is_seen_even_when_a_forked_helper_holds_the_socket(
    pool: Pool, tmp_path: Path, timeout: float | None
) -> None:
    pool.define("fork_and_die", FORKS_A_HELPER)
    pool.define("inc", INC)
    pidfile = tmp_path / "helper.pid"
    begun = time.monotonic()
    try:
        with pytest.raises(WorkerCrashed) as info:
            pool.run("fork_and_die", str(pidfile), timeout=timeout)
        assert info.value.returncode == 3
        assert time.monotonic() - begun < 5  # not when the helper lets go of the socket
        pool.wait_ready(10)
        status = pool.status()
        assert len(status.workers) == 2 and all(w.state == "idle" for w in status.workers)
        assert pool.run("inc", 1) == 2
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_closed_pools_hold_no_file_descriptors(store_dir: Path) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with Pool(workers=1, store=store_dir) as warm:  # imports and first-time set-up
        warm.wait_ready(30)
    before = fds()
    for _ in range(10):
        pool = Pool(workers=1, store=store_dir)
        pool.define("inc", INC)
        pool.wait_ready(30)
        assert pool.run("inc", 1) == 2
        pool.close()
    assert fds() <= before + 1
