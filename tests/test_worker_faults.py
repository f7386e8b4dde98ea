"""Worker faults end in their documented error (issue 15, worker items 2-8), real pools.

Each test is a careless program or an outside event, run through a real pool: processes
a program starts die with its worker, odd exceptions and huge messages are ordinary
replies, a program cannot break output capture, a memory blow-up is a ``MemoryError``
reply (or a replaced worker), a program's own ``KeyboardInterrupt`` is its error, and a
pool that closes while it forks prints nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from dspool_jupyter import Pool, local_backend, protocol
from dspool_jupyter.errors import ProgramError, WorkerCrashed
from tests.conftest import assert_no_leftovers, started, wait_for

pytestmark = pytest.mark.timeout(90)

MakePool = Callable[..., Pool]

# Starts three kinds of helper processes and returns their pids: a plain child, one in
# a session of its own (setsid), and a daemon whose parent exited (double fork).
SPAWNER = textwrap.dedent(
    """
    import os, subprocess, time

    def spawner():
        plain = subprocess.Popen(["sleep", "300"])
        own_session = subprocess.Popen(["sleep", "301"], start_new_session=True)
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:
            daemon = os.fork()
            if daemon == 0:
                os.setsid()
                time.sleep(302)
                os._exit(0)
            os.write(w, str(daemon).encode())
            os._exit(0)
        os.waitpid(middle, 0)
        daemon = int(os.read(r, 64))
        return [plain.pid, own_session.pid, daemon]
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _all_gone(pids: list[int]) -> bool:
    return not any(_alive(pid) for pid in pids)


# ------------------------------------------------------------ item 2: no escapes


def test_processes_a_program_started_die_at_close(make_pool: MakePool) -> None:
    pool = make_pool(1)
    pool.define("spawner", SPAWNER)
    pids = pool.run("spawner", timeout=20)
    assert all(_alive(pid) for pid in pids)
    pool.close()
    wait_for(lambda: _all_gone(pids), timeout=10)


def test_a_stuck_close_stops_the_template_gently_first(make_pool: MakePool) -> None:
    # The last resort of close() (the template did not stop in time): SIGTERM, so that
    # the template still kills what its workers started; SIGKILL only after a grace.
    pool = make_pool(1)
    pool.define("spawner", SPAWNER)
    pids = pool.run("spawner", timeout=20)
    template = pool._backend._template  # type: ignore[attr-defined]
    assert template is not None
    local_backend.kill_process_group(template.process)
    assert template.process.returncode == 0  # SIGTERM: it ran its clean-up and exited
    wait_for(lambda: _all_gone(pids), timeout=10)


def test_processes_a_program_started_die_with_its_worker(make_pool: MakePool) -> None:
    pool = make_pool(1)
    pool.define("spawner", SPAWNER)
    pids = pool.run("spawner", timeout=20)
    worker_pid = pool.status().workers[0].pid
    assert worker_pid is not None
    os.kill(worker_pid, signal.SIGKILL)
    wait_for(lambda: _all_gone(pids), timeout=10)
    pool.wait_ready(30)
    again = pool.run("spawner", timeout=20)  # the replacement's are kept while it lives
    time.sleep(1.5)  # several of the template's sweeps
    assert all(_alive(pid) for pid in again)


def test_a_live_workers_processes_are_left_alone_by_the_sweep(make_pool: MakePool) -> None:
    pool = make_pool(2)
    pool.wait_ready(30)
    pool.define("spawner", SPAWNER)
    pids = pool.run("spawner", timeout=20)
    owner = pool.status().workers
    victim = next(w for w in owner if w.calls == 0)
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)  # the other worker dies: a sweep runs
    pool.wait_ready(30)
    time.sleep(1.5)
    assert _alive(pids[0])  # in its live worker's group: kept
    pool.close()
    wait_for(lambda: _all_gone(pids), timeout=10)


def test_processes_a_program_started_die_after_kill_9_of_the_kernel(store_dir: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from dspool_jupyter import Pool
        pool = Pool(workers=2, store=sys.argv[1])
        pool.wait_ready(30)
        pool.define("spawner", sys.argv[2])
        pids = [pid for _ in range(2) for pid in pool.run("spawner")]
        print(pool.token, *pids, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(store_dir), SPAWNER],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    with proc:
        try:
            assert proc.stdout is not None
            token, *rest = proc.stdout.readline().split()
            pids = [int(p) for p in rest]
            assert len(pids) == 6 and all(_alive(pid) for pid in pids)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            wait_for(lambda: _all_gone(pids), timeout=10)
            assert_no_leftovers([token], timeout=5)
        finally:
            proc.kill()


# ------------------------------------------------------- items 3, 4: odd errors


def test_an_exception_whose_str_raises_is_a_program_error(pool: Pool) -> None:
    pool.define(
        "odd",
        "class Odd(Exception):\n"
        "    def __str__(self):\n"
        "        raise TypeError('no text for you')\n"
        "def odd():\n"
        "    raise Odd()\n",
    )
    pool.define("whoami", "import os\ndef whoami():\n    return os.getpid()\n")
    pids = {w.pid for w in pool.status().workers}
    with pytest.raises(ProgramError) as info:
        pool.run("odd", timeout=20)
    assert info.value.remote_type == "Odd"
    assert "<str() of Odd failed: TypeError>" in str(info.value)
    assert {w.pid for w in pool.status().workers} == pids  # nobody crashed
    assert pool.run("whoami") in pids


def test_a_huge_error_message_is_cut_and_replied(pool: Pool) -> None:
    pool.define("huge", "def huge():\n    raise ValueError('x' * (40 << 20))\n")
    pool.define("whoami", "import os\ndef whoami():\n    return os.getpid()\n")
    pids = {w.pid for w in pool.status().workers}
    with pytest.raises(ProgramError) as info:
        pool.run("huge", timeout=30)
    message = str(info.value)
    assert len(message) < 1 << 20
    assert "cut here" in message and str((40 << 20) - 64 * 1024) in message
    assert {w.pid for w in pool.status().workers} == pids  # nobody was killed
    assert pool.run("whoami") in pids


def test_huge_output_is_cut_and_the_call_replies(pool: Pool) -> None:
    pool.define(
        "loud",
        "import sys\n"
        "def loud():\n"
        "    for _ in range(70):\n"
        "        print('y' * (1 << 20))\n"
        "    sys.stderr.write('z' * (3 << 20))\n"
        "    return 'done'\n",
    )
    pids = {w.pid for w in pool.status().workers}
    future = pool.submit("loud")
    assert future.result(60) == "done"
    assert len(future.stdout) < (1 << 20) + 200
    assert future.stdout.rstrip().endswith("more characters not shown]")
    assert str(70 * ((1 << 20) + 1) - (1 << 20)) in future.stdout
    assert future.stderr.rstrip().endswith("more characters not shown]")
    assert {w.pid for w in pool.status().workers} == pids


# ------------------------------------------------------------ item 5: streams


def test_closing_or_replacing_stdout_does_not_break_the_worker(pool: Pool) -> None:
    pool.define(
        "rude",
        "import io, sys\n"
        "def rude(how):\n"
        "    print('before')\n"
        "    if how == 'close':\n"
        "        sys.stdout.close()\n"
        "        sys.stderr.close()\n"
        "    elif how == 'replace':\n"
        "        sys.stdout = io.StringIO()\n"
        "        sys.stderr = None\n"
        "    print('after')\n"
        "    return how\n",
    )
    pool.define("hello", "def hello():\n    print('hello')\n    return 1\n")
    pids = {w.pid for w in pool.status().workers}
    for how in ("close", "replace", "close", "replace"):
        future = pool.submit("rude", how)
        assert future.result(20) == how
        assert future.stdout.startswith("before\n")
        hellos = [pool.submit("hello") for _ in range(4)]
        assert all(f.result(20) == 1 and f.stdout == "hello\n" for f in hellos)
    assert {w.pid for w in pool.status().workers} == pids


# ------------------------------------------------------------ item 6: memory


@pytest.mark.parametrize("kind", ["objects", "ints", "blocks"])
def test_memory_limit_gives_a_memory_error_reply(make_pool: MakePool, kind: str) -> None:
    grow = {
        "objects": "l.append(object())",
        "ints": "l.append(len(l) * 1000003)",
        "blocks": "l.append(bytearray(1 << 20))",
    }[kind]
    pool = make_pool(1, worker_memory_limit=256 << 20)
    pool.wait_ready(30)
    pool.define("grow", f"def grow():\n    l = []\n    while True:\n        {grow}\n")
    pool.define("one", "def one():\n    return 1\n")
    pid = pool.status().workers[0].pid
    started = time.monotonic()
    with pytest.raises(ProgramError) as info:
        pool.run("grow", timeout=60)
    assert info.value.remote_type == "MemoryError"
    assert time.monotonic() - started < 30
    assert pool.run("one", timeout=20) == 1
    assert pool.status().workers[0].pid == pid  # it recovered: same worker


def test_memory_held_after_the_call_replaces_the_worker(make_pool: MakePool) -> None:
    pool = make_pool(1, worker_memory_limit=256 << 20)
    pool.wait_ready(30)
    pool.define(
        "hoard",
        "HOARD = []\ndef hoard():\n    while True:\n        HOARD.append(bytearray(1 << 16))\n",
    )
    pool.define("whoami", "import os\ndef whoami():\n    return os.getpid()\n")
    pid = pool.run("whoami")
    with pytest.raises(ProgramError) as info:
        pool.run("hoard", timeout=60)
    assert info.value.remote_type == "MemoryError"
    # The memory stays held by the program's global: the worker exits after replying
    # (exit code protocol.EXIT_OUT_OF_MEMORY) and the pool replaces it.
    wait_for(lambda: any(w.pid not in (None, pid) for w in pool.status().workers), timeout=20)
    pool.wait_ready(30)
    assert pool.run("whoami", timeout=20) != pid
    assert protocol.EXIT_OUT_OF_MEMORY == 86


def test_an_out_of_memory_exit_names_the_memory_limit(make_pool: MakePool, tmp_path: Path) -> None:
    # Two calls at once: one hoards memory in a global (its reply is the MemoryError),
    # then the worker cannot recover and exits; its neighbour's error says why.
    pool = make_pool(1, worker_memory_limit=256 << 20, concurrency=2)
    pool.wait_ready(30)
    pool.define(
        "hoard",
        "HOARD = []\ndef hoard():\n    while True:\n        HOARD.append(bytearray(1 << 16))\n",
    )
    pool.define(
        "nap",
        "import time\ndef nap(marker):\n    open(marker, 'w').close()\n    time.sleep(60)\n",
    )
    neighbour = pool.submit("nap", str(tmp_path / "m"))
    started(tmp_path / "m")
    with pytest.raises(ProgramError) as info:
        pool.run("hoard", timeout=60)
    assert info.value.remote_type == "MemoryError"
    error = neighbour.exception(20)
    assert isinstance(error, WorkerCrashed), error
    assert error.out_of_memory and error.returncode == protocol.EXIT_OUT_OF_MEMORY
    assert "worker_memory_limit=268435456 bytes" in str(error)
    pool.wait_ready(30)


def test_exit_code_86_without_a_memory_limit_is_a_plain_crash(pool: Pool) -> None:
    pool.define("leave", "import os\ndef leave():\n    os._exit(86)\n")
    with pytest.raises(WorkerCrashed) as info:
        pool.run("leave", timeout=20)
    assert not info.value.out_of_memory and "exit code 86" in str(info.value)
    assert "memory" not in str(info.value)


# ------------------------------------------------------- item 7: interrupts


def test_a_programs_own_keyboard_interrupt_is_a_program_error(pool: Pool) -> None:
    pool.define("ki", "def ki():\n    raise KeyboardInterrupt('by the program')\n")
    with pytest.raises(ProgramError) as info:
        pool.run("ki", timeout=20)
    assert info.value.remote_type == "KeyboardInterrupt"
    # The pool's own interrupt is still a cancel, and the worker survives it.
    pool.define("steps", "import time\ndef steps():\n    while True:\n        time.sleep(0.01)\n")
    pids = {w.pid for w in pool.status().workers}
    future = pool.submit("steps")
    wait_for(future.running)
    time.sleep(0.2)
    assert future.cancel()
    with pytest.raises(CancelledError):
        future.result(10)
    time.sleep(0.3)
    assert {w.pid for w in pool.status().workers} == pids
    assert pool.status().running == 0


# ----------------------------------------------- item 8: fork while closing


@pytest.mark.timeout(180)
def test_forking_while_the_pool_closes_prints_nothing(store_dir: Path) -> None:
    # Workers forked and SIGTERMed at every point of their start (the template stops
    # them while it is still forking the replacements that restart() asked for).
    script = textwrap.dedent(
        """
        import sys, time
        from dspool_jupyter import Pool
        for i in range(24):
            pool = Pool(workers=8, store=sys.argv[1])
            pool.wait_ready(30)
            pool.restart()
            time.sleep(0.001 * (i % 12))
            pool.close()
        print("done", flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(store_dir)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout.strip() == "done", proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    assert "SystemExit" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
