"""The task functions every system runs, kept self-contained.

Each function imports what it needs inside its body, so the same text works as a
pickled function (ProcessPoolExecutor, loky, Dask), a canned function (ipyparallel) and
as dspool program source (``pool.define(name, TASK_SOURCES[name], entry=name)``).
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["TASK_SOURCES", "barrier", "getpid", "inc", "slow"]


def inc(x: int) -> int:
    """The trivial call."""
    return x + 1


def getpid() -> int:
    """The worker's pid."""
    import os

    return os.getpid()


def barrier(n: int, directory: str, modules: list[str], timeout: float) -> int:
    """Import ``modules``, check in, and return once ``n`` distinct workers checked in.

    Every worker that runs this blocks until ``n`` different pids have written their file
    to ``directory``, so ``n`` barrier calls complete only when ``n`` workers have each
    run one: the start-up measure. Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    import importlib
    import os
    import time

    for module in modules:
        importlib.import_module(module)
    pid = os.getpid()
    with open(os.path.join(directory, str(pid)), "w"):
        pass
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier: {len(os.listdir(directory))} of {n} workers")
        time.sleep(0.001)
    return pid


def slow(prefix: str, seconds: float) -> int:
    """Record that this call started (file ``<prefix><pid>-<ns>``), then sleep ``seconds``."""
    import os
    import time

    pid = os.getpid()
    with open(f"{prefix}{pid}-{time.time_ns()}", "w"):
        pass
    time.sleep(seconds)
    return pid


TASK_SOURCES: dict[str, str] = {
    fn.__name__: inspect.getsource(fn) for fn in (inc, getpid, barrier, slow)
}

TASKS: dict[str, Any] = {fn.__name__: fn for fn in (inc, getpid, barrier, slow)}
