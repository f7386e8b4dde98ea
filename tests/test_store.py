"""ProgramStore: by value, content-hash ids, namespaces, delete, TTL, permissions."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import stat
import time
from pathlib import Path

import pytest

from dspool_jupyter.errors import InvalidProgram, ProgramNotFound, StoreError
from dspool_jupyter.store import ProgramStore, default_store_path
from tests.programs import INC

pytestmark = pytest.mark.timeout(60)


def test_put_resolve_get_by_value(store_dir: Path) -> None:
    store = ProgramStore(store_dir)
    spec = store.put("inc", INC)
    assert spec.kind == "source" and spec.entry == "inc" and spec.payload == INC
    assert store.resolve("inc") == spec.id
    assert store.get(spec.id).payload == INC
    # a second store object on the same directory (another process's view) sees it
    assert ProgramStore(store_dir).lookup("inc").id == spec.id


def test_redefinition_gets_a_new_id_and_keeps_the_old_version_runnable(store_dir: Path) -> None:
    store = ProgramStore(store_dir)
    first = store.put("inc", INC)
    second = store.put("inc", INC.replace("x + 1", "x + 2"))
    assert first.id != second.id
    assert store.resolve("inc") == second.id
    assert store.exists(first.id)  # calls already on their way still find it
    assert store.put("inc", INC.replace("x + 1", "x + 2")).id == second.id  # same content, same id


def test_session_programs_are_invisible_to_others(store_dir: Path) -> None:
    store = ProgramStore(store_dir)
    mine = store.put("helper", INC, entry="inc", session="alice")
    shared = store.put("shared", INC, entry="inc")
    assert store.resolve("helper", "alice") == mine.id
    assert store.resolve("shared", "alice") == shared.id  # sessions see anonymous programs
    with pytest.raises(ProgramNotFound, match="no program 'helper' in session 'bob'"):
        store.resolve("helper", "bob")
    with pytest.raises(ProgramNotFound, match="no program 'helper'"):
        store.resolve("helper")
    # the id of a session program is not a way around the namespace
    with pytest.raises(ProgramNotFound):
        store.resolve(mine.id, "bob")
    assert store.names("alice") == ["helper", "shared"]
    assert store.names() == ["shared"]


def test_delete_removes_every_version(store_dir: Path) -> None:
    store = ProgramStore(store_dir)
    old = store.put("inc", INC)
    new = store.put("inc", INC.replace("1", "5"))
    assert store.delete("inc") is True
    assert not store.exists(old.id) and not store.exists(new.id)
    with pytest.raises(ProgramNotFound):
        store.resolve("inc")
    assert store.delete("inc") is False


def test_clear_session(store_dir: Path) -> None:
    store = ProgramStore(store_dir)
    for name in ("a", "b", "c"):
        store.put(name, INC, entry="inc", session="s1")
    store.put("a", INC, entry="inc", session="s2")
    assert store.clear_session("s1") == 3
    assert store.names("s1") == []
    assert store.names("s2") == ["a"]


def test_anonymous_programs_expire(store_dir: Path) -> None:
    store = ProgramStore(store_dir, anonymous_ttl=0.3)
    spec = store.put("inc", INC)
    kept = store.put("kept", INC, entry="inc", session="s")
    time.sleep(0.5)
    with pytest.raises(ProgramNotFound):
        store.resolve("inc")
    assert not store.exists(spec.id)
    assert store.resolve("kept", "s") == kept.id  # session programs do not expire
    store.expire()
    assert store.names() == []


@pytest.mark.parametrize(
    ("source", "entry", "message"),
    [
        ("def inc(x:\n    return x\n", None, "syntax error at line 1"),
        ("def other(x):\n    return x\n", None, "does not define its entry 'inc'.*defines: other"),
        ("x = 1\n", "missing", "does not define its entry 'missing'"),
    ],
)
def test_bad_programs_are_refused_and_not_stored(
    store_dir: Path, source: str, entry: str | None, message: str
) -> None:
    store = ProgramStore(store_dir)
    with pytest.raises(InvalidProgram, match=message):
        store.put("inc", source, entry=entry)
    assert store.names() == []


@pytest.mark.parametrize("name", ["", "two words", "1abc", "a/b", None])
def test_bad_names_are_refused(store_dir: Path, name: object) -> None:
    with pytest.raises(InvalidProgram, match="is not valid"):
        ProgramStore(store_dir).put(name, INC, entry="inc")  # type: ignore[arg-type]


def test_callables_are_stored_by_value(store_dir: Path) -> None:
    store = ProgramStore(store_dir)

    def double(x: int) -> int:
        return 2 * x

    spec = store.put("double", double)
    assert spec.kind == "pickle" and isinstance(spec.payload, bytes)
    assert pickle.loads(store.get(spec.id).payload)(21) == 42


def test_directory_is_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store"
    ProgramStore(path)
    for p in (path, path.parent, path.parent.parent):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    ProgramStore(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to make a directory owned by someone else")
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(StoreError, match=r"belongs to nobody \(uid 65534\), not to you"):
        ProgramStore(foreign)


def test_a_file_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StoreError, match="is not a directory"):
        ProgramStore(path)


def test_default_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DSPOOL_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store_path() == tmp_path / "xdg" / "dspool_jupyter" / "store"
    monkeypatch.setenv("DSPOOL_STORE", str(tmp_path / "explicit"))
    assert ProgramStore().directory == tmp_path / "explicit"


def test_store_pickles_as_its_directory(store_dir: Path) -> None:
    store = ProgramStore(store_dir)
    spec = store.put("inc", INC)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.directory == store.directory
    assert clone.resolve("inc") == spec.id


def _writer(directory: str, index: int, count: int) -> None:
    store = ProgramStore(directory)
    for i in range(count):
        store.put(f"p{index}_{i}", INC, entry="inc")
        store.put("shared", INC.replace("1", str(index)), entry="inc")


def test_concurrent_writers_from_several_processes(store_dir: Path) -> None:
    ProgramStore(store_dir)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(store_dir), i, 40)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ProgramStore(store_dir)
    names = store.names()
    assert len(names) == 4 * 40 + 1
    assert store.lookup("shared").payload in {INC.replace("1", str(i)) for i in range(4)}
