"""Shared fixtures: real pools on a private temporary store, and a leak check.

Every pool a test makes is closed at teardown, and the test then fails if any process
that carries the pool's token (the template and every worker it forked) is still alive.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dspool_jupyter import Pool
from dspool_jupyter.pool import OWNER_ENV


def pool_processes(token: str) -> list[int]:
    """Pids of live processes whose environment carries ``token`` (zombies excluded)."""
    needle = f"{OWNER_ENV}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != b"Z":
            found.append(int(entry))
    return found


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something true; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def started(marker: Path, timeout: float = 10.0) -> None:
    """Wait until a program given ``marker=str(marker)`` has started (it creates the file).

    ``future.running()`` says the call was handed to a worker; this says it runs there.
    """
    wait_for(marker.exists, timeout=timeout)


def assert_no_leftovers(tokens: list[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = {t: pool_processes(t) for t in tokens}
        left = {t: p for t, p in left.items() if p}
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pool processes outlived their pool: {left}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def dask_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Dask cluster's scheduler (CI's, or one started for this session)."""
    from tests.dask_cluster import dask_cluster

    with dask_cluster(tmp_path_factory.mktemp("dask")) as cluster:
        yield cluster.address


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def make_pool(store_dir: Path) -> Iterator[Callable[..., Pool]]:
    pools: list[Pool] = []

    def make(workers: int = 2, **kwargs: Any) -> Pool:
        kwargs.setdefault("store", store_dir)
        pool = Pool(workers=workers, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
    assert_no_leftovers([p.token for p in pools])


@pytest.fixture
def pool(make_pool: Callable[..., Pool]) -> Pool:
    p = make_pool(2)
    p.wait_ready(30)
    return p
