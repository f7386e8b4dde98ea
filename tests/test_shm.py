"""Large arguments and results through shared memory (issue 17), with real processes.

What "no copy" means here is checked from the outside: the worker's array is backed by
a ``/memfd:dspool`` mapping whose inode is the caller's segment (``/proc/<pid>/maps``),
and the status counters say how many bytes were copied into segments at all.
"""

from __future__ import annotations

import array
import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from dspool_jupyter import Pool, protocol, shm
from dspool_jupyter.errors import ProgramError, WorkerCrashed
from tests.conftest import wait_for

MIB = 1 << 20

INSPECT = """
def inspect(x, write=False):
    import numpy as np
    inodes = []
    with open("/proc/self/maps") as f:
        for line in f:
            if "/memfd:dspool" in line:
                fields = line.split()
                inodes.append((int(fields[4]), fields[1]))
    if write:
        x[0] = 1.0
    return {
        "sum": float(np.asarray(x).sum()),
        "writeable": x.flags.writeable,
        "owndata": x.flags.owndata,
        "maps": inodes,
    }
"""

KINDS = """
def kinds(*args, **kwargs):
    out = [(type(a).__name__, len(bytes(a)), bytes(a[:4])) for a in args]
    out += [(k, type(v).__name__, len(bytes(v))) for k, v in sorted(kwargs.items())]
    return out
"""

MAKE = """
def make(n, value=1.0):
    import numpy as np
    return np.full(n, value)
"""

SLEEP = """
def hold(x, seconds):
    import time
    time.sleep(seconds)
    return float(x.sum())
"""


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def memfd_links(pid: int | str = "self") -> list[str]:
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("/memfd:dspool"):
            found.append(link)
    return found


def mapped_memfds(pid: int | str = "self") -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "/memfd:dspool" in line]


def segment_inode(pool: Pool, owner: Any) -> int:
    placer = pool._placer
    assert placer is not None
    entry = placer.entries[id(owner)]
    return os.fstat(entry.segment.fd).st_ino


@pytest.fixture
def shm_pool(make_pool: Callable[..., Pool]) -> Pool:
    pool = make_pool(2)
    pool.wait_ready(60)
    pool.define("inspect", INSPECT)
    pool.define("kinds", KINDS)
    pool.define("make", MAKE)
    pool.define("hold", SLEEP)
    return pool


@pytest.mark.timeout(120)
def test_worker_sees_a_read_only_view_of_the_callers_segment(shm_pool: Pool) -> None:
    a = np.arange(MIB, dtype=np.float64)  # 8 MiB
    out = shm_pool.run("inspect", a)
    assert out["sum"] == float(a.sum())
    assert out["writeable"] is False
    assert out["owndata"] is False
    inode = segment_inode(shm_pool, a)
    # The worker maps the very segment the pool wrote (same inode), read-only & shared.
    assert (inode, "r--s") in out["maps"]
    status = shm_pool.status()
    assert status.bytes_placed == a.nbytes
    assert status.bytes_shared >= a.nbytes
    assert status.bytes_sent < 64 * 1024  # the array did not go through the socket


@pytest.mark.timeout(120)
def test_writing_into_an_argument_is_a_clear_error(shm_pool: Pool) -> None:
    a = np.zeros(MIB // 4 + 1)  # just over 2 MiB
    with pytest.raises(ProgramError) as info:
        shm_pool.run("inspect", a, write=True)
    assert "ValueError" in str(info.value)
    assert "read-only" in str(info.value)
    assert a[0] == 0.0


@pytest.mark.timeout(300)
def test_same_array_to_1000_calls_is_placed_once_and_fds_do_not_grow(shm_pool: Pool) -> None:
    a = np.ones(MIB // 4 + 1)  # 2 MiB
    shm_pool.run("inspect", a)
    workers = [w.pid for w in shm_pool.status().workers]
    before = fd_count(), {pid: fd_count(pid) for pid in workers}
    futures = [shm_pool.submit("inspect", a) for _ in range(1000)]
    sums = {f.result(60)["sum"] for f in futures}
    assert sums == {float(a.size)}
    status = shm_pool.status()
    assert status.bytes_placed == a.nbytes  # one copy, not 1,001
    assert status.bytes_shared >= 1001 * a.nbytes
    assert fd_count() <= before[0] + 2
    for pid in workers:
        assert fd_count(pid) <= before[1][pid] + 2


@pytest.mark.timeout(120)
def test_an_array_changed_after_placing_is_placed_again(shm_pool: Pool) -> None:
    a = np.ones(MIB // 4 + 1)
    assert shm_pool.run("inspect", a)["sum"] == a.size
    a[0] = 100.0
    assert shm_pool.run("inspect", a)["sum"] == a.size + 99
    assert shm_pool.status().bytes_placed == 2 * a.nbytes


@pytest.mark.timeout(120)
def test_bytes_bytearray_and_memoryview_arguments(shm_pool: Pool) -> None:
    big = bytes(range(256)) * (2 * MIB // 256)
    out = shm_pool.run("kinds", big, bytearray(big), memoryview(big), small=b"abc", ba=big)
    assert out == [
        ("bytes", len(big), big[:4]),
        ("bytearray", len(big), big[:4]),
        ("memoryview", len(big), big[:4]),
        ("ba", "bytes", len(big)),
        ("small", "bytes", 3),
    ]
    status = shm_pool.status()
    assert status.bytes_shared >= 4 * len(big)
    assert status.bytes_sent < 64 * 1024


@pytest.mark.timeout(120)
def test_large_result_comes_back_shared_and_outlives_its_worker(shm_pool: Pool) -> None:
    before = shm_pool.status()
    future = shm_pool.submit("make", MIB, 3.0)
    r = future.result(60)
    after = shm_pool.status()
    assert after.bytes_shared - before.bytes_shared == r.nbytes
    assert after.bytes_received - before.bytes_received < 64 * 1024
    assert r.flags.writeable  # copy-on-write in the caller: an ordinary array
    worker = next(w for w in after.workers if w.id == future.worker_id)
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: worker.pid not in [w.pid for w in shm_pool.status().workers], 30)
    shm_pool.wait_ready(60)
    assert float(r.sum()) == 3.0 * MIB
    r[0] = 0.0
    assert float(r.sum()) == 3.0 * MIB - 3.0


@pytest.mark.timeout(120)
def test_sigkilled_worker_and_closed_pool_leave_no_segment(
    make_pool: Callable[..., Pool],
) -> None:
    pool = make_pool(1)
    pool.wait_ready(60)
    pool.define("hold", SLEEP)
    a = np.ones(MIB // 4 + 1)
    future = pool.submit("hold", a, 30)
    pid = next(w.pid for w in pool.status().workers)
    assert pid is not None
    wait_for(lambda: mapped_memfds(pid), timeout=30)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        future.result(60)
    pool.close()
    del future
    gc.collect()
    assert memfd_links() == []
    assert mapped_memfds() == []


@pytest.mark.timeout(120)
def test_threshold_none_sends_everything_through_the_socket(
    make_pool: Callable[..., Pool],
) -> None:
    pool = make_pool(1, shared_memory_threshold=None)
    pool.wait_ready(60)
    pool.define("inspect", INSPECT)
    a = np.ones(MIB // 4 + 1)
    out = pool.run("inspect", a)
    assert out["maps"] == [] and out["sum"] == a.size
    status = pool.status()
    assert status.bytes_shared == 0 and status.bytes_placed == 0
    assert status.bytes_sent > a.nbytes


FALLBACK = """
import resource, signal, sys
import numpy as np
from dspool_jupyter import Pool, protocol, shm

# A real failure of memfd: every file this process tree grows past 256 KiB is EFBIG.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
with Pool(workers=1, store=sys.argv[1]) as pool:
    pool.wait_ready(60)
    pool.define("total", "def total(x):\\n    return float(x.sum()), x.flags.writeable\\n")
    pool.define("make", "def make(n):\\n    import numpy as np\\n    return np.ones(n)\\n")
    a = np.ones(1 << 18)
    assert pool.run("total", a) == (float(a.size), True), "in-band"
    assert pool.run("total", a)[0] == a.size
    assert float(pool.run("make", 1 << 18).sum()) == 1 << 18
    status = pool.status()
    assert status.bytes_placed == 0 and status.bytes_shared == 0, status
    assert "shared memory unavailable" in (status.last_error or ""), status.last_error
    print("ok")
"""


@pytest.mark.timeout(120)
def test_fallback_to_the_socket_when_segments_cannot_be_made(tmp_path: Any) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FALLBACK), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr.count("shared memory unavailable") == 1  # said once


@pytest.mark.timeout(120)
def test_views_of_one_bytes_at_different_offsets_are_not_confused(shm_pool: Pool) -> None:
    big = bytes(range(256)) * (2 * MIB // 256 + 1)
    view = memoryview(big)
    n = 2 * MIB
    first = shm_pool.run("kinds", view[0:n])
    second = shm_pool.run("kinds", view[1 : n + 1])
    assert first == [("memoryview", n, big[0:4])]
    assert second == [("memoryview", n, big[1:5])]


@pytest.mark.timeout(30)
def test_segments_are_found_by_type_not_by_position_in_the_meta() -> None:
    # A reply whose meta grows an element (say, per-call usage) keeps its segments last.
    a, b = socket.socketpair()
    fd = os.memfd_create("dspool-test")
    try:
        os.ftruncate(fd, 16)
        frame = protocol.encode_frame(
            protocol.RESULT, (7, "out", "err", {"lm_calls": 1}), b"blob", (16,)
        )
        a.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        reader = protocol.FrameReader()
        n, fds = protocol.recv_some(b, memoryview(bytearray(1 << 16)))
        assert len(fds) == 1
        frames = reader.feed(frame[:n], fds)
        assert len(frames) == 1
        kind, meta, blob = frames[0]
        assert kind == protocol.RESULT and blob == b"blob"
        assert meta[:4] == (7, "out", "err", {"lm_calls": 1})
        (got,) = protocol.attached(meta)
        assert got[1] == 16 and os.fstat(got[0]).st_ino == os.fstat(fd).st_ino
        shm.close_attached([got])
        assert protocol.attached((7, "out", "err", {"lm_calls": 1})) == ()
    finally:
        os.close(fd)
        a.close()
        b.close()


AINSPECT = """
async def ainspect(x):
    import asyncio
    import numpy as np
    await asyncio.sleep(0.01)
    return {"sum": float(np.asarray(x).sum()), "writeable": x.flags.writeable, "back": x * 2}
"""


@pytest.mark.timeout(180)
def test_shared_arguments_and_results_at_concurrency_4(make_pool: Callable[..., Pool]) -> None:
    # Four calls at once per worker: the thread path and the async path each receive
    # the segments of their own frame and send their result's segments with their reply.
    pool = make_pool(2, concurrency=4)
    pool.wait_ready(60)
    pool.define("inspect", INSPECT)
    pool.define("ainspect", AINSPECT)
    a = np.arange(MIB, dtype=np.float64)  # 8 MiB
    workers = [w.pid for w in pool.status().workers]
    pool.run("inspect", a)  # placed once
    futures = [pool.submit("inspect", a) for _ in range(16)]
    afutures = [pool.submit("ainspect", a) for _ in range(16)]
    inode = segment_inode(pool, a)
    for future in futures:
        out = future.result(60)
        assert out["sum"] == float(a.sum()) and out["writeable"] is False
        assert (inode, "r--s") in out["maps"]
    for future in afutures:
        out = future.result(60)
        assert out["sum"] == float(a.sum()) and out["writeable"] is False
        assert np.array_equal(out["back"], a * 2) and out["back"].flags.writeable
    status = pool.status()
    assert status.bytes_placed == a.nbytes  # one copy for 33 calls
    assert status.bytes_shared >= 33 * a.nbytes + 16 * a.nbytes  # arguments and results
    assert status.bytes_sent < 1 << 20 and status.bytes_received < 1 << 20
    # Every frame's descriptors and every result's segments were closed in the workers:
    # what is left is the one mapping of ``a`` each keeps for the next call (an mmap
    # holds a duplicate of its descriptor). Other descriptors (the store's connection
    # per call thread) are not counted.
    for pid in workers:
        wait_for(lambda pid=pid: len(memfd_links(pid)) <= 1, 10)
