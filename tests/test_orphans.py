"""No process outlives its pool: parent SIGKILLed, template killed, forgotten close()."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dspool_jupyter import Pool
from tests.conftest import assert_no_leftovers, pool_processes, started, wait_for
from tests.programs import SLEEPY, WHOAMI

pytestmark = pytest.mark.timeout(60)

PARENT = textwrap.dedent(
    """
    import sys, time
    from dspool_jupyter import Pool
    pool = Pool(workers=3, store=sys.argv[1])
    pool.wait_ready(30)
    pool.define("sleepy", "import time\\ndef sleepy(s):\\n    time.sleep(s)\\n")
    busy = pool.submit("sleepy", 600)   # one worker is mid-call when we die
    print(pool.token, flush=True)
    time.sleep(600)
    """
)


def _start_parent(store: Path, script: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(store)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    token = proc.stdout.readline().strip()
    assert token, "the parent did not start its pool"
    return proc, token


def test_no_orphans_after_the_parent_is_sigkilled(store_dir: Path) -> None:
    proc, token = _start_parent(store_dir, PARENT)
    with proc:
        try:
            wait_for(lambda: len(pool_processes(token)) == 4)  # template + 3 workers
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert_no_leftovers([token], timeout=5)
        finally:
            proc.kill()


def test_a_forgotten_pool_is_closed_at_interpreter_exit(store_dir: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from dspool_jupyter import Pool
        pool = Pool(workers=2, store=sys.argv[1])
        pool.wait_ready(30)
        print(pool.token, flush=True)
        """
    )
    begun = time.monotonic()
    proc, token = _start_parent(store_dir, script)
    with proc:
        assert proc.wait(20) == 0
    assert time.monotonic() - begun < 15
    assert_no_leftovers([token], timeout=5)


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def test_killing_the_template_heals_the_pool(
    make_pool: Callable[..., Pool], tmp_path: Path
) -> None:
    pool = make_pool(2)
    pool.wait_ready(30)
    pool.define("whoami", WHOAMI)
    pool.define("sleepy", SLEEPY)
    old = {w.pid for w in pool.status().workers}
    template_pid = _parent_of(next(iter(old)))  # the template forked the workers
    assert template_pid not in old
    running = pool.submit("sleepy", 30, marker=str(tmp_path / "m"))
    started(tmp_path / "m")
    os.kill(template_pid, signal.SIGKILL)
    assert type(running.exception(10)).__name__ == "WorkerCrashed"
    wait_for(lambda: not ({w.pid for w in pool.status().workers} & old), timeout=10)
    pool.wait_ready(15)
    assert pool.run("whoami") not in old
    assert len(pool_processes(pool.token)) == 3  # a new template and two workers


def test_close_from_an_event_callback_does_not_deadlock(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(1)
    pool.subscribe(lambda event: pool.close() if event.kind == "call_finished" else None)
    pool.define("whoami", WHOAMI)
    pool.run("whoami")
    wait_for(lambda: pool.status().state == "closed", timeout=10)
