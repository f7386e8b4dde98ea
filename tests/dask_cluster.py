"""A real Dask cluster on 127.0.0.1 for the tests: a ``dask scheduler`` and two
``dask worker`` processes (each a nanny with one single-threaded worker process).

``.ci/run`` starts one and exports its address as ``DSPOOL_TEST_DASK_ADDRESS``; without
it the fixture starts its own here (random free ports) and kills it at teardown. Every
process runs in its own session, so killing its process group also kills the worker
process its nanny spawned.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADDRESS_ENV = "DSPOOL_TEST_DASK_ADDRESS"
START_TIMEOUT = 60.0  # seconds for the scheduler and both workers to come up
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL at teardown


@dataclass
class DaskTestCluster:
    """A running cluster: the scheduler's address and the processes we started (if any)."""

    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def external(self) -> bool:
        return not self.processes


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _wait_for_workers(address: str, count: int, deadline: float) -> None:
    from distributed import Client

    with Client(address, timeout=max(1.0, deadline - time.monotonic())) as client:
        client.wait_for_workers(count, timeout=max(1.0, deadline - time.monotonic()))


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group, then SIGKILL whatever is left; wait for all."""
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the worker processes too
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()


def group_alive(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            alive.append(int(entry))
    return alive


@contextmanager
def dask_cluster(workdir: Path, workers: int = 2) -> Iterator[DaskTestCluster]:
    """The cluster at ``$DSPOOL_TEST_DASK_ADDRESS``, else a new one stopped on exit."""
    address = os.environ.get(ADDRESS_ENV)
    if address:
        yield DaskTestCluster(address)
        return
    workdir.mkdir(parents=True, exist_ok=True)
    scheduler_file = workdir / "scheduler.json"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(
            _start(
                [
                    "scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--no-dashboard",
                    "--dashboard-address",
                    "127.0.0.1:0",  # its HTTP server still starts: never on 8787
                    "--scheduler-file",
                    str(scheduler_file),
                ],
                workdir / "scheduler.log",
            )
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            if processes[0].poll() is not None or time.monotonic() > deadline:
                log = (workdir / "scheduler.log").read_text(errors="replace")
                raise RuntimeError(f"the dask scheduler did not start:\n{log}")
            time.sleep(0.05)
        address = json.loads(scheduler_file.read_text())["address"]
        for number in range(1, workers + 1):
            processes.append(
                _start(
                    [
                        "worker",
                        address,
                        "--host",
                        "127.0.0.1",
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--nanny",
                        "--no-dashboard",
                        "--name",
                        f"test-worker-{number}",
                        "--local-directory",
                        str(workdir / f"worker-{number}"),
                    ],
                    workdir / f"worker-{number}.log",
                )
            )
        _wait_for_workers(address, workers, deadline)
        yield DaskTestCluster(address, processes)
    finally:
        stop(processes)
        deadline = time.monotonic() + STOP_GRACE  # a SIGKILLed process takes a moment to go
        while True:
            left = {p.pid: group_alive(p.pid) for p in processes}
            left = {pgid: pids for pgid, pids in left.items() if pids}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if left:
            raise AssertionError(f"Dask test processes outlived their cluster: {left}")


def executing(address: str) -> dict[str, list[str]]:
    """The keys of the tasks each of the cluster's workers is executing now."""
    from distributed import Client

    def keys(dask_worker: Any) -> list[str]:
        return sorted(str(task.key) for task in dask_worker.state.executing)

    with Client(address, timeout=30) as client:
        return dict(client.run(keys))
