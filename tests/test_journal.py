"""Journals on their own: item keys, batches, error records, names, privacy (no pool)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dspool_jupyter.errors import CallTimeout, ProgramError
from dspool_jupyter.journal import (
    PENDING,
    JournaledError,
    JournalMismatch,
    JournalNotFound,
    item_key,
    journal_names,
    list_journals,
    open_journal,
)
from dspool_jupyter.store import ProgramStore

KEY_IN_A_CHILD = (
    "from dspool_jupyter.journal import item_key\n"
    "print(item_key(['x', {'b', 'a', 'c'}], {'z': {'k': (1, 2.5)}, 'a': None}))\n"
)


@pytest.fixture
def store(tmp_path: Path) -> ProgramStore:
    return ProgramStore(tmp_path / "store")


def test_item_keys_are_stable_across_processes_and_orders() -> None:
    here = item_key(["x", {"c", "a", "b"}], {"a": None, "z": {"k": (1, 2.5)}})
    for seed in ("1", "2"):
        child = subprocess.run(
            [sys.executable, "-c", KEY_IN_A_CHILD],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == here


def test_item_keys_tell_values_apart() -> None:
    values = [1, 1.0, True, "1", b"1", (1,), [1], {1}, frozenset({1}), {1: 1}, None, 0, "", ()]
    keys = {item_key([v], {}) for v in values}
    assert len(keys) == len(values)
    assert item_key([1], {}) != item_key([], {"x": 1})  # positional vs keyword
    assert item_key([], {"a": 1, "b": 2}) == item_key([], {"b": 2, "a": 1})


def test_item_keys_of_other_objects_use_their_pickle() -> None:
    assert item_key([Path("/a")], {}) == item_key([Path("/a")], {})
    assert item_key([Path("/a")], {}) != item_key([Path("/b")], {})
    assert item_key([lambda: 1], {})  # cloudpickle takes what pickle refuses
    with pytest.raises(TypeError, match="cannot pickle"):
        item_key([threading.Lock()], {})


def test_write_read_latest_wins_and_errors_come_back(store: ProgramStore) -> None:
    journal = open_journal(store, "j", create=True)
    journal.begin("prog", "pid1", None, ["k1", "k2", "k3"])
    failure = ProgramError("prog", "w2", "ValueError", "bad", "Traceback ...\nValueError: bad\n")
    assert journal.write([("pid1|k1", True, {"v": 1}), ("pid1|k2", False, failure)]) == 2
    journal.write([("pid1|k3", False, CallTimeout("prog", "w1", 2))])
    journal.write([("pid1|k3", True, 3)])  # a later run of the same item wins
    journal.close()

    again = open_journal(store, "j")
    entries = again.entries()
    assert entries["pid1|k1"].value == {"v": 1} and entries["pid1|k3"].value == 3
    error = entries["pid1|k2"].error
    assert isinstance(error, ProgramError)
    assert (error.program, error.worker_id, error.remote_type) == ("prog", "w2", "ValueError")
    assert error.remote_traceback.endswith("ValueError: bad\n")
    progress = again.progress()
    assert (progress.done, progress.failed, progress.total, progress.pending) == (2, 1, 3, 0)
    results = again.results()
    assert results[0] == {"v": 1} and results[2] == 3 and list(results.errors) == [1]
    assert isinstance(results[1], ProgramError) and str(results[1]) == str(error)
    again.close()


def test_other_errors_come_back_as_journaled_errors(store: ProgramStore) -> None:
    with open_journal(store, "j", create=True) as journal:
        journal.begin("prog", "pid", None, ["k"])
        journal.write([("pid|k", False, CallTimeout("prog", "w1", 2))])
        error = journal.entries()["pid|k"].error
    assert isinstance(error, JournaledError) and error.remote_type == "CallTimeout"
    assert "ran past its timeout of 2 s" in str(error)


def test_results_mark_items_without_an_outcome(store: ProgramStore) -> None:
    with open_journal(store, "j", create=True) as journal:
        journal.begin("prog", "pid", None, ["a", None, "c"])
        journal.write([("pid|c", True, "C")])
        results = journal.results()
    assert list(results) == [PENDING, PENDING, "C"] and results.pending == [0, 1]
    assert repr(PENDING) == "<pending>"


def test_a_journal_belongs_to_one_program(store: ProgramStore) -> None:
    with open_journal(store, "j", create=True) as journal:
        journal.begin("prog", "pid", None, [])
        journal.check_program("prog")
        with pytest.raises(JournalMismatch, match="holds results of program 'prog', not 'other'"):
            journal.check_program("other")
        with pytest.raises(JournalMismatch):
            journal.begin("other", "pid2", None, [])


def test_names_listing_privacy_and_delete(store: ProgramStore) -> None:
    for bad in ("", "../x", "a/b", ".hidden", "x" * 101, 3):
        with pytest.raises(ValueError, match="journal name"):
            open_journal(store, bad, create=True)  # type: ignore[arg-type]
    with pytest.raises(JournalNotFound, match="no journal 'nope' in the store; there are no"):
        open_journal(store, "nope")
    with open_journal(store, "eval-1.a", create=True) as journal:
        journal.begin("prog", "pid", "s1", ["k"])
        journal.write([("pid|k", True, 1)])
    directory = store.directory / "journals"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "eval-1.a").stat().st_mode) == 0o700
    (info,) = list_journals(store)
    assert (info.name, info.program, info.session) == ("eval-1.a", "prog", "s1")
    assert (info.done, info.failed, info.total) == (1, 0, 1)
    assert info.size_bytes > 0 and 0 <= info.age < 60
    with pytest.raises(JournalNotFound, match="journals: eval-1.a"):
        open_journal(store, "nope")
    open_journal(store, "eval-1.a").delete()
    assert journal_names(store) == [] and not (directory / "eval-1.a").exists()
