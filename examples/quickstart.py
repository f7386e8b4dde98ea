"""The Python quickstart from the README, runnable offline: python examples/quickstart.py.

It starts a pool on a private temporary store, defines programs, runs them, shows each
kind of failure, and checks that the pool healed after each one.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time

from dspool_jupyter import Pool
from dspool_jupyter.errors import CallTimeout, ProgramError, WorkerCrashed


def main() -> None:
    with tempfile.TemporaryDirectory() as store, Pool(workers=2, store=store) as pool:
        started = time.perf_counter()
        pool.wait_ready(timeout=30)
        print(f"2 workers ready in {time.perf_counter() - started:.2f} s")

        pool.define("square", "def square(x):\n    return x * x\n")
        assert pool.run("square", 7) == 49
        futures = [pool.submit("square", i) for i in range(100)]
        assert [f.result() for f in futures] == [i * i for i in range(100)]
        print("square(0..99) ran on workers", sorted({f.worker_id for f in futures}))

        pool.define("fails", "def fails():\n    raise ValueError('bad input')\n")
        try:
            pool.run("fails")
        except ProgramError as exc:
            print("ProgramError:", exc)

        pool.define("crashes", "import os\ndef crashes():\n    os._exit(3)\n")
        try:
            pool.run("crashes")
        except WorkerCrashed as exc:
            print("WorkerCrashed:", exc)

        pool.define("hangs", "import time\ndef hangs():\n    time.sleep(3600)\n")
        try:
            pool.run("hangs", timeout=0.5)
        except CallTimeout as exc:
            print("CallTimeout:", exc)

        pool.define("sleepy", "import time\ndef sleepy(s):\n    time.sleep(s)\n")
        busy = pool.submit("sleepy", 60)
        while not busy.running():
            time.sleep(0.01)
        victim = next(w for w in pool.status().workers if w.id == busy.worker_id)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)  # from outside, mid-call
        try:
            busy.result()
        except WorkerCrashed as exc:
            print("SIGKILL from outside:", exc)
        pool.define(
            "session_counter",
            "n = 0\ndef session_counter():\n    global n\n    n += 1\n    return n\n",
        )
        assert [pool.run("session_counter", session="demo") for _ in range(3)] == [1, 2, 3]

        pool.wait_ready(timeout=10)
        status = pool.status()
        assert status.ready and len(status.workers) == 2
        print(
            f"pool {status.state}: {status.ready_count}/{status.target} ready, "
            f"{status.calls} calls done, {status.failed} failed, {status.replaced} workers replaced"
        )


if __name__ == "__main__":
    main()
