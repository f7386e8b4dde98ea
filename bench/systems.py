"""One adapter per system under test, all with the same small surface.

An adapter starts a pool of ``workers`` processes, submits the functions of
:mod:`bench.tasks` by name, reports its worker pids, and knows what a user of that
system does after a worker crash (``recover``; ``after_kill`` for the step a user takes
as soon as they learn a worker died). Adapters are used only inside a trial process
(:mod:`bench.trial`), one adapter per process, so nothing leaks between systems.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from bench.tasks import TASK_SOURCES, TASKS

__all__ = ["SYSTEMS", "System", "missing_reason"]

IDLE_TIMEOUT = 3600  # seconds; loky's workers must not time out during a run
WORKER_WAIT = 120  # seconds; how long an adapter waits for workers to (re)appear


class System:
    """A pool of ``workers`` processes of one system."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    distribution: ClassVar[str | None] = None  # the PyPI name whose version is reported
    replacement: ClassVar[str] = ""  # how a dead worker's place is refilled

    def __init__(self, workers: int, preload: list[str], workdir: Path) -> None:
        self.workers = workers
        self.preload = preload
        self.workdir = workdir

    def start(self) -> None:
        """Create the pool (it may start its workers lazily)."""
        raise NotImplementedError

    def submit(self, name: str, *args: Any) -> Any:
        """Submit ``bench.tasks.<name>(*args)``; returns a future with ``result(timeout)``."""
        raise NotImplementedError

    def submit_each(self, name: str, *args: Any) -> list[Any]:
        """Submit one call per worker (for blocking tasks such as the barrier)."""
        return [self.submit(name, *args) for _ in range(self.workers)]

    def call(self, name: str, *args: Any) -> Any:
        """One call, waited for: the per-call overhead path."""
        return self.submit(name, *args).result()

    def gather(self, futures: list[Any]) -> list[Any]:
        return [f.result() for f in futures]

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (before any kill)."""
        raise NotImplementedError

    def after_kill(self, pid: int) -> None:
        """What a user does on learning that worker ``pid`` died (default: nothing)."""

    def recover(self) -> None:
        """What a user does after a call failed because a worker died (default: nothing)."""

    def close(self) -> None:
        raise NotImplementedError


class Dspool(System):
    name = "dspool"
    requires = ("dspool_jupyter.pool",)
    distribution = "dspool-jupyter"
    replacement = "automatic (forked from the warm template)"

    def start(self) -> None:
        from dspool_jupyter import Pool

        self.dead_pids: set[int] = set()
        self.pool = Pool(
            workers=self.workers, store=str(self.workdir / "store"), preload=list(self.preload)
        )
        for name, source in TASK_SOURCES.items():
            self.pool.define(name, source, entry=name)

    def submit(self, name: str, *args: Any) -> Future[Any]:
        return self.pool.submit(name, *args)

    def submit_each(self, name: str, *args: Any) -> list[Any]:
        # dspool pipelines a call to a busy worker when no worker is idle, so blocking
        # calls submitted while workers start (or a dead one is replaced) could queue
        # behind each other. Wait until the pool reports every worker ready and no dead
        # one among them, as the Dask adapter waits for its workers to register.
        deadline = time.monotonic() + WORKER_WAIT
        while True:
            status = self.pool.status()
            pids = {w.pid for w in status.workers if w.state in ("idle", "busy")}
            if status.ready_count >= status.target and not pids & self.dead_pids:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"dspool: {status.ready_count} of {status.target} ready")
            time.sleep(0.001)
        return super().submit_each(name, *args)

    def after_kill(self, pid: int) -> None:
        self.dead_pids.add(pid)

    def call(self, name: str, *args: Any) -> Any:
        return self.pool.run(name, *args)

    def worker_pids(self) -> list[int]:
        return [
            w.pid
            for w in self.pool.status().workers
            if w.pid is not None and w.state in ("idle", "busy")
        ]

    def close(self) -> None:
        self.pool.close()


class _PPE(System):
    method: ClassVar[str]
    replacement = "manual (BrokenProcessPool: make a new executor)"

    def _make(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context(self.method)
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)

    def start(self) -> None:
        self.retired: list[ProcessPoolExecutor] = []
        self.ex = self._make()

    def submit(self, name: str, *args: Any) -> Future[Any]:
        return self.ex.submit(TASKS[name], *args)

    def worker_pids(self) -> list[int]:
        procs = getattr(self.ex, "_processes", None) or {}
        return [p.pid for p in list(procs.values()) if p.is_alive() and p.pid is not None]

    def recover(self) -> None:
        if getattr(self.ex, "_broken", False):
            self.ex.shutdown(wait=False, cancel_futures=True)
            self.retired.append(self.ex)
            self.ex = self._make()

    def close(self) -> None:
        for ex in [*self.retired, self.ex]:
            ex.shutdown(wait=True, cancel_futures=True)


class PPEFork(_PPE):
    name = "ppe-fork"
    method = "fork"


class PPEForkserver(_PPE):
    name = "ppe-forkserver"
    method = "forkserver"


class Loky(System):
    name = "loky"
    requires = ("loky",)
    distribution = "loky"
    replacement = "semi-automatic (get_reusable_executor() makes a new executor)"

    def _get(self) -> Any:
        from loky import get_reusable_executor  # type: ignore[import-untyped]

        return get_reusable_executor(max_workers=self.workers, timeout=IDLE_TIMEOUT)

    def start(self) -> None:
        self.ex = self._get()

    def submit(self, name: str, *args: Any) -> Future[Any]:
        return self.ex.submit(TASKS[name], *args)  # type: ignore[no-any-return]

    def worker_pids(self) -> list[int]:
        procs = getattr(self.ex, "_processes", None) or {}
        return [p.pid for p in list(procs.values()) if p.is_alive()]

    def recover(self) -> None:
        self.ex = self._get()

    def close(self) -> None:
        self.ex.shutdown(wait=True, kill_workers=True)


class IPyParallel(System):
    name = "ipyparallel"
    requires = ("ipyparallel",)
    distribution = "ipyparallel"
    replacement = "manual (cluster.start_engines(1); no supervisor)"

    def start(self) -> None:
        import ipyparallel as ipp  # type: ignore[import-untyped]

        self.cluster = ipp.Cluster(n=self.workers, log_level=logging.ERROR)
        self.rc: Any = None
        self.rc = self.cluster.start_and_connect_sync()
        self.view = self.rc.load_balanced_view()  # hwm=1: one task per engine at a time

    def submit(self, name: str, *args: Any) -> Any:
        return self.view.apply_async(TASKS[name], *args)

    def worker_pids(self) -> list[int]:
        return list(self.rc[:].apply_sync(TASKS["getpid"]))

    def after_kill(self, pid: int) -> None:
        self.cluster.start_engines_sync(n=1)

    def close(self) -> None:
        try:
            if getattr(self, "rc", None) is not None:
                self.rc.close()
        finally:
            self.cluster.stop_cluster_sync()


class Dask(System):
    name = "dask"
    requires = ("distributed",)
    distribution = "distributed"
    replacement = "automatic (the nanny restarts the worker)"

    def start(self) -> None:
        from distributed import Client, LocalCluster

        self.dead_addresses: set[str] = set()
        self.address_of: dict[int, str] = {}
        self.cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=self.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        )
        self.client = Client(self.cluster)  # type: ignore[no-untyped-call]

    def submit(self, name: str, *args: Any) -> Any:
        return self.client.submit(TASKS[name], *args, pure=False)

    def submit_each(self, name: str, *args: Any) -> list[Any]:
        # Pin one call to each worker: Dask may queue two root tasks on one worker.
        deadline = time.monotonic() + WORKER_WAIT
        while True:
            addresses = [
                a
                for a in self.client.run_on_scheduler(  # type: ignore[no-untyped-call]
                    _worker_addresses
                )
                if a not in self.dead_addresses
            ]
            if len(addresses) >= self.workers:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"dask: {len(addresses)} of {self.workers} workers")
            time.sleep(0.005)
        return [
            self.client.submit(
                TASKS[name], *args, pure=False, workers=[a], allow_other_workers=False
            )
            for a in addresses[: self.workers]
        ]

    def gather(self, futures: list[Any]) -> list[Any]:
        return list(self.client.gather(futures))  # type: ignore[no-untyped-call]

    def worker_pids(self) -> list[int]:
        pids = self.client.run(os.getpid)
        self.address_of = {pid: address for address, pid in pids.items()}
        return list(pids.values())

    def after_kill(self, pid: int) -> None:
        if pid in self.address_of:
            self.dead_addresses.add(self.address_of[pid])

    def close(self) -> None:
        try:
            self.client.close()  # type: ignore[no-untyped-call]
        finally:
            self.cluster.close()


class DspoolBaseline(Dspool):
    """dspool from another source tree (``python -m bench --baseline DIR``): the driver
    runs its trials from DIR, so a change is measured beside its baseline in one run."""

    name = "dspool-baseline"


def _worker_addresses(dask_scheduler: Any) -> list[str]:
    return list(dask_scheduler.workers)


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (Dspool, DspoolBaseline, PPEFork, PPEForkserver, Loky, IPyParallel, Dask)
}


def missing_reason(name: str) -> str | None:
    """Why system ``name`` cannot run here (a module is not installed), or None."""
    for module in SYSTEMS[name].requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"missing: no module {module!r} (pip install -e '.[bench]')"
    return None
