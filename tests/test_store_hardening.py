"""Store hardening (issue 15, items 9-13): trust, relative paths, fds, locks, bad source.

Real processes and a real second user (``nobody``, or one made with ``useradd``); the
trust tests need root to act as that user and skip, saying so, without it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest

from dspool_jupyter.errors import InvalidProgram, StoreError
from dspool_jupyter.store import LOCK_TIMEOUT, ProgramStore
from tests.conftest import wait_for
from tests.programs import INC

pytestmark = pytest.mark.timeout(60)

needs_root = pytest.mark.skipif(
    os.getuid() != 0, reason="acting as a second local user needs root (CI runs as root)"
)


def other_user() -> pwd.struct_passwd:
    """A local user that is not us: ``nobody``, else one created now."""
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "dspool-other"], check=True)
        return pwd.getpwnam("dspool-other")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the other user can use, like /tmp (pytest's tmp_path is private)."""
    path = Path(tempfile.mkdtemp(prefix="dspool-trust-", dir="/tmp"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Planted:
    """Unpickling this creates ``marker``: the stand-in for another user's code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


# -- item 9: trust


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_store_writable_by_group_or_others_is_refused_not_repaired(
    store_dir: Path, mode: int
) -> None:
    ProgramStore(store_dir).put("inc", INC)
    os.chmod(store_dir, mode)
    with pytest.raises(StoreError, match=r"writable by group or others.*Move it aside"):
        ProgramStore(store_dir)
    assert stat.S_IMODE(store_dir.stat().st_mode) == mode  # refused, not "fixed"


@needs_root
def test_store_planted_by_another_user_is_refused_before_anything_is_read(
    shared_dir: Path,
) -> None:
    user = other_user()
    marker = shared_dir / "planted-code-ran"
    evil = shared_dir / "evil"
    evil.mkdir(mode=0o755)
    with diskcache.Cache(str(evil)) as cache:
        cache.set("old||inc", Planted(str(marker)))  # what the next define unpickles
    victim = shared_dir / "victim"
    ProgramStore(victim).put("inc", INC)
    os.chmod(victim, 0o777)  # the store was world-writable for a while
    subprocess.run(
        "cp evil/cache.db victim/planted && mv -f victim/planted victim/cache.db"
        " && rm -f victim/cache.db-wal victim/cache.db-shm",
        shell=True,
        cwd=shared_dir,
        user=user.pw_uid,
        group=user.pw_gid,
        check=True,
    )
    assert (victim / "cache.db").stat().st_uid == user.pw_uid

    with pytest.raises(StoreError, match="writable by group or others"):
        ProgramStore(victim).put("inc", INC)
    # someone makes it private again (what dspool used to do): still refused
    os.chmod(victim, 0o700)
    with pytest.raises(StoreError, match=rf"cache.db belongs to {user.pw_name} \(uid"):
        ProgramStore(victim).put("inc", INC)
    assert not marker.exists()
    # the control: a plain reader of that store would have run the planted code
    with diskcache.Cache(str(victim)) as cache:
        cache.get("old||inc")
    assert marker.exists()


@needs_root
def test_store_directory_of_another_user_is_refused(shared_dir: Path) -> None:
    user = other_user()
    subprocess.run(["mkdir", "-m", "700", "theirs"], cwd=shared_dir, user=user.pw_uid, check=True)
    with pytest.raises(StoreError, match=rf"directory belongs to {user.pw_name} \(uid"):
        ProgramStore(shared_dir / "theirs")


def test_writable_file_or_symlink_inside_is_refused(store_dir: Path, tmp_path: Path) -> None:
    ProgramStore(store_dir).put("inc", INC)
    os.chmod(store_dir / "cache.db", 0o666)
    with pytest.raises(StoreError, match=r"cache.db is writable by group or others \(0o666\)"):
        ProgramStore(store_dir)
    os.chmod(store_dir / "cache.db", 0o644)
    ProgramStore(store_dir)
    (tmp_path / "elsewhere").write_text("")
    os.symlink(tmp_path / "elsewhere", store_dir / "link")
    with pytest.raises(StoreError, match="contains a symbolic link, link"):
        ProgramStore(store_dir)


def test_files_the_store_makes_are_private_whatever_the_umask(store_dir: Path) -> None:
    # In a child process: the umask is process-wide.
    script = textwrap.dedent(
        """
        import os, sys
        os.umask(0)
        from dspool_jupyter.store import ProgramStore
        store = ProgramStore(sys.argv[1])
        store.put("big", "def big():\\n    return %r\\n" % ("x" * 200_000))
        store.put("inc", "def inc(x):\\n    return x + 1\\n")
        store.close()
        """
    )
    subprocess.run([sys.executable, "-c", script, str(store_dir)], check=True)
    made = {p.relative_to(store_dir).as_posix(): p.lstat() for p in store_dir.rglob("*")}
    assert set(made) <= {"cache.db", "cache.db-wal", "cache.db-shm"}, made  # no side files
    assert all(info.st_mode & 0o022 == 0 for info in made.values())
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    assert len(ProgramStore(store_dir).lookup("big").payload) > 200_000


# -- item 10: relative paths


def test_relative_store_path_survives_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    store = ProgramStore("rel/store")
    assert store.directory == tmp_path / "a" / "rel" / "store"
    spec = store.put("inc", INC)
    monkeypatch.chdir(tmp_path / "b")  # a notebook's %cd

    found: list[str] = []
    thread = threading.Thread(target=lambda: found.append(store.resolve("inc")))
    thread.start()
    thread.join(10)
    assert found == [spec.id]  # a new thread opens a new connection: same store
    # a new worker gets str(store.directory) and starts in the new working directory
    script = "import sys; from dspool_jupyter.store import ProgramStore; "
    script += "print(ProgramStore(sys.argv[1]).resolve('inc'))"
    out = subprocess.run(
        [sys.executable, "-c", script, str(store.directory)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == spec.id
    assert not (tmp_path / "b" / "rel").exists()


# -- item 11: file descriptors


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_closed_stores_release_every_file_descriptor(tmp_path: Path) -> None:
    # A thread that outlives the stores, as the kernel's threads do.
    requests: list[ProgramStore | None] = []
    ready = threading.Semaphore(0)
    answered = threading.Semaphore(0)

    def other_thread() -> None:
        while True:
            ready.acquire()
            store = requests.pop()
            if store is None:
                return
            store.resolve("inc")
            answered.release()

    helper = threading.Thread(target=other_thread)
    helper.start()
    try:
        ProgramStore(tmp_path / "warm").close()  # first use's imports and caches
        before = open_fds()
        stores = []
        for i in range(50):
            store = ProgramStore(tmp_path / f"s{i}")
            store.put("inc", INC)
            requests.append(store)
            ready.release()
            assert answered.acquire(timeout=10)
            stores.append(store)
        assert open_fds() > before + 50
        for store in stores:
            store.close()
        wait_for(lambda: open_fds() <= before, timeout=5)
        # a closed store reopens when used again, and closes again
        assert stores[0].resolve("inc") == stores[0].lookup("inc").id
        stores[0].close()
        stores[0].close()
        wait_for(lambda: open_fds() <= before, timeout=5)
    finally:
        requests.append(None)
        ready.release()
        helper.join(10)


def test_close_while_another_thread_is_reading(store_dir: Path) -> None:
    store = ProgramStore(store_dir)
    spec = store.put("inc", INC)
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def reader() -> None:
        try:
            while not stop.is_set():
                assert store.resolve("inc") == spec.id
                reads[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        store.close()
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == [] and reads[0] > 0


# -- item 12: another process's write lock


HOLDER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def locked_store(store_dir: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A store whose SQLite write lock another process holds (BEGIN IMMEDIATE)."""
    ProgramStore(store_dir).put("inc", INC)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store_dir / "cache.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    with holder:  # closes its pipes
        yield store_dir, holder
        holder.kill()


def test_a_held_write_lock_does_not_block_opening_or_reading(
    locked_store: tuple[Path, subprocess.Popen[str]],
) -> None:
    store_dir, _ = locked_store
    started = time.monotonic()
    store = ProgramStore(store_dir)
    assert store.lookup("inc").payload == INC
    assert time.monotonic() - started < 1.0
    # a worker starting meanwhile: a new process opens the store and reads
    script = "import sys; from dspool_jupyter.store import ProgramStore; "
    script += "print(ProgramStore(sys.argv[1]).lookup('inc').name)"
    out = subprocess.run(
        [sys.executable, "-c", script, str(store_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.stdout.strip() == "inc"


def test_a_write_waits_for_the_lock_a_bounded_time(
    locked_store: tuple[Path, subprocess.Popen[str]],
) -> None:
    store_dir, holder = locked_store
    assert ProgramStore(store_dir).lock_timeout == LOCK_TIMEOUT == 10.0
    store = ProgramStore(store_dir, lock_timeout=0.5)
    for write in (lambda: store.put("other", INC, entry="inc"), lambda: store.delete("inc")):
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"write lock .* held by pid {holder.pid} .*0\.5 s"):
            write()
        assert 0.4 < time.monotonic() - started < 5.0
    assert store.names() == ["inc"]  # nothing half-written
    # once the writer has finished, writes go through
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(10)
    assert store.put("other", INC, entry="inc").name == "other"
    assert store.delete("inc") is True


# -- item 13: pathological source


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f():\n    return " + "-" * 200000 + "1", "nested too deeply or is too large"),
        ("def f():\n    return " + "-" * 1000 + "1", "nested too deeply or is too large"),
        ("return 1\n", "syntax error at line 1: 'return' outside function"),
        ("def f():\n    return 1\0\n", "cannot be compiled|syntax error"),
    ],
)
def test_pathological_source_is_an_invalid_program(
    store_dir: Path, source: str, message: str
) -> None:
    store = ProgramStore(store_dir)
    with pytest.raises(InvalidProgram, match=message):
        store.put("f", source)
    assert store.names() == []
    assert store.put("f", "def f():\n    return 1\n").name == "f"  # the store is fine


def _resolve_in_child(store: ProgramStore, name: str, queue: Any) -> None:
    queue.put(store.resolve(name))


def test_a_forked_child_opens_its_own_connection(store_dir: Path) -> None:
    import multiprocessing

    store = ProgramStore(store_dir)
    spec = store.put("inc", INC)
    assert store.resolve("inc") == spec.id  # the parent's connection exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_resolve_in_child, args=(store, "inc", queue))
    child.start()
    assert queue.get(timeout=20) == spec.id
    child.join(20)
    assert child.exitcode == 0
    assert store.resolve("inc") == spec.id
    queue.close()
    queue.join_thread()
