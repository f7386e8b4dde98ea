"""Pool.map and its journal, with real pools and processes (the SIGKILL test included)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from dspool_jupyter import Pool
from dspool_jupyter.errors import PoolClosed, ProgramError, ProgramNotFound, UnpicklableArguments
from dspool_jupyter.journal import (
    PENDING,
    JournalMismatch,
    JournalNotFound,
    UnjournalableItem,
    open_journal,
)
from dspool_jupyter.mapping import MapProgress
from dspool_jupyter.store import ProgramStore
from tests.conftest import assert_no_leftovers, wait_for

pytestmark = pytest.mark.timeout(60)

MakePool = Callable[..., Pool]

# Appends the item to a file per run, so a test can count how often each item ran.
RECORD = """
import time
def record(x, runs, delay=0.0, bad=()):
    with open(runs, "a") as f:
        f.write(f"{x}\\n")
    time.sleep(delay)
    if x in bad:
        raise ValueError(f"item {x} is bad")
    return x * x
"""
SLEEPY = "import time\ndef sleepy(s):\n    time.sleep(s)\n    return s\n"
PAIR = "def pair(a, b=0, *rest, c=0):\n    return (a, b, rest, c)\n"

# The "kernel" that dies: a process with its own pool, running a journaled map.
DYING_KERNEL = """
import sys
from dspool_jupyter import Pool
store, runs = sys.argv[1], sys.argv[2]
pool = Pool(workers=2, store=store)
print(pool.token, flush=True)
pool.define("record", {record!r})
pool.map("record", range(200), journal="kill", common_kwargs={{"runs": runs, "delay": 0.02}})
print("finished", flush=True)
"""


def runs_of(path: Path) -> Counter[int]:
    if not path.exists():
        return Counter()
    return Counter(int(line) for line in path.read_text().split())


def test_results_in_input_order_with_each_failure_in_place(pool: Pool, tmp_path: Path) -> None:
    pool.define("record", RECORD)
    runs = tmp_path / "runs"
    result = pool.map(
        "record", range(60), common_kwargs={"runs": str(runs), "bad": (7, 31)}, timeout=30
    )
    assert len(result) == 60
    assert [v for i, v in enumerate(result) if i not in (7, 31)] == [
        i * i for i in range(60) if i not in (7, 31)
    ]
    assert sorted(result.errors) == result.failed == [7, 31] and not result.ok
    assert isinstance(result[31], ProgramError) and "item 31 is bad" in str(result[31])
    assert result.cancelled == [] and result.restored == []
    assert runs_of(runs) == Counter(range(60))
    assert pool.map("record", [], common_kwargs={"runs": str(runs)}) == []


def test_arg_unpack_and_common_inputs(pool: Pool) -> None:
    pool.define("pair", PAIR)
    assert pool.map("pair", [1, 2], common_args=(9,)) == [(9, 1, (), 0), (9, 2, (), 0)]
    assert pool.map("pair", [1, 2], arg="c", common_args=(5,)) == [(5, 0, (), 1), (5, 0, (), 2)]
    mixed = pool.map("pair", [{"a": 1, "c": 3}, (1, 2, 3), [4], 7], unpack=True)
    assert mixed[:3] == [(1, 0, (), 3), (1, 2, (3,), 0), (4, 0, (), 0)]
    assert mixed.failed == [3] and isinstance(mixed[3], TypeError)
    assert "item 3: unpack: cannot unpack a int" in str(mixed[3])
    unsendable = pool.map("pair", [1, (x for x in ())])
    assert unsendable[0] == (1, 0, (), 0) and isinstance(unsendable[1], UnpicklableArguments)


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        (lambda p: p.map("pair", "abc"), TypeError, "items must be a list"),
        (lambda p: p.map("pair", {"a": 1}), TypeError, "got a dict"),
        (lambda p: p.map("pair", 5), TypeError, "got a int"),
        (lambda p: p.map(3, [1]), TypeError, "the program must be a name"),
        (lambda p: p.map("pair", [1], arg="c", unpack=True), ValueError, "not both"),
        (lambda p: p.map("pair", [1], arg="no pe"), ValueError, "arg must name a keyword"),
        (lambda p: p.map("pair", [1], timeout=0), ValueError, "timeout must be a positive"),
        (lambda p: p.map("pair", [1], keep_errors=True), ValueError, "needs journal=NAME"),
        (lambda p: p.map("pair", [1], journal="../up"), ValueError, "journal name '../up'"),
        (lambda p: p.map("pair", [1], common_args="ab"), TypeError, "common_args must be"),
        (lambda p: p.map("pair", [1], common_kwargs={1: 2}), TypeError, "common_kwargs must"),
        (lambda p: p.map("nosuch", [1]), ProgramNotFound, "no program 'nosuch'"),
        (lambda p: p.journal("nosuch"), JournalNotFound, "no journal 'nosuch'"),
    ],
)
def test_bad_input_is_a_clear_error(
    pool: Pool, call: Callable[[Pool], object], error: type[Exception], says: str
) -> None:
    pool.define("pair", PAIR)
    with pytest.raises(error, match=says.replace("(", r"\(").replace(".", r"\.")):
        call(pool)


def test_cancel_counts_done_failed_and_cancelled_apart(pool: Pool) -> None:
    pool.define("sleepy", SLEEPY)
    handle = pool.map_async("sleepy", [0, 0, 30, 30, 30, 30])
    wait_for(lambda: handle.progress.done == 2 and handle.progress.running_for > 0.2)
    running = handle.progress
    assert (running.done, running.failed, running.cancelled, running.pending) == (2, 0, 0, 4)
    assert running.rate is not None and running.eta is not None and not running.finished
    cancelled = time.monotonic()
    handle.cancel()
    result = handle.result(10)
    assert time.monotonic() - cancelled < 5
    assert result[:2] == [0, 0] and result.cancelled == [2, 3, 4, 5] and result.failed == []
    assert all(isinstance(result[i], concurrent.futures.CancelledError) for i in range(2, 6))
    final = handle.progress
    assert (final.done, final.failed, final.cancelled, final.pending) == (2, 0, 4, 0)
    assert final.finished and "2 done, 4 cancelled" in final.text("map sleepy")
    wait_for(lambda: pool.status().running == 0 and pool.status().queued == 0)
    assert pool.map("sleepy", [0.0]) == [0.0]  # the pool is fine


def test_progress_text_shows_counts_time_rate_and_time_left() -> None:
    running = MapProgress(
        total=200, restored=50, done=40, failed=2, cancelled=0, elapsed=4.2, running_for=4.0
    )
    assert running.rate == pytest.approx(10.5) and running.eta == pytest.approx(108 / 10.5)
    assert running.text("map qa") == (
        "map qa: 92/200 · 40 done, 2 failed, 50 restored · 4.2 s, 10.5/s, ~10.3 s left"
    )
    ended = MapProgress(total=3, done=1, cancelled=2, elapsed=75, running_for=75, finished=True)
    assert ended.text("map qa") == "map qa: 3/3 · 1 done, 2 cancelled · 1 min 15 s, 0.0133/s"


def test_journal_restores_and_reruns_only_what_has_no_value(
    make_pool: MakePool, tmp_path: Path
) -> None:
    pool = make_pool(2)
    pool.define("record", RECORD)
    runs = tmp_path / "runs"
    inputs = {"runs": str(runs), "bad": (3, 11)}
    first = pool.map("record", range(20), journal="j", common_kwargs=inputs)
    assert first.failed == [3, 11] and first.restored == []
    pool.close()

    again = make_pool(2)  # a new pool, the same store: as after a kernel restart
    second = again.map("record", range(20), journal="j", common_kwargs=inputs)
    assert second.restored == [i for i in range(20) if i not in (3, 11)]
    assert second.failed == [3, 11] and runs_of(runs) == Counter(range(20)) + Counter([3, 11])
    kept = again.map("record", range(20), journal="j", common_kwargs=inputs, keep_errors=True)
    assert kept.restored == list(range(20)) and isinstance(kept[3], ProgramError)
    assert runs_of(runs) == Counter(range(20)) + Counter([3, 11])  # nothing ran
    assert [kept[i] for i in (0, 19)] == [0, 361]

    progress = again.journal("j").progress()
    assert (progress.done, progress.failed, progress.total) == (18, 2, 20)
    (info,) = again.journals()
    assert (info.name, info.program, info.done, info.failed) == ("j", "record", 18, 2)


def test_a_changed_item_or_program_reruns_exactly_what_changed(pool: Pool, tmp_path: Path) -> None:
    pool.define("record", RECORD)
    runs = tmp_path / "runs"
    inputs = {"runs": str(runs)}
    pool.map("record", range(10), journal="j", common_kwargs=inputs)
    changed = pool.map("record", [*range(9), 100], journal="j", common_kwargs=inputs)
    assert changed.restored == list(range(9)) and changed[9] == 10000
    assert runs_of(runs) == Counter([*range(10), 100])
    pool.define("record", RECORD + "\n# redefined\n")
    redefined = pool.map("record", range(10), journal="j", common_kwargs=inputs)
    assert redefined.restored == [] and list(redefined) == [i * i for i in range(10)]
    assert runs_of(runs) == Counter([*range(10), 100]) + Counter(range(10))


def test_a_journal_belongs_to_its_program(pool: Pool, tmp_path: Path) -> None:
    pool.define("record", RECORD)
    pool.define("sleepy", SLEEPY)
    pool.map("record", [1], journal="j", common_kwargs={"runs": str(tmp_path / "r")})
    with pytest.raises(JournalMismatch, match="journal 'j' holds results of program 'record'"):
        pool.map("sleepy", [0.0], journal="j")


def test_an_item_that_cannot_be_keyed_fails_alone(pool: Pool) -> None:
    pool.define("pair", PAIR)
    result = pool.map("pair", [1, (x for x in ()), 3], journal="j")
    assert result[0] == (1, 0, (), 0) and result[2] == (3, 0, (), 0)
    assert result.failed == [1] and isinstance(result[1], UnjournalableItem)
    assert "item 1 (generator) cannot be journaled" in str(result[1])
    assert "cannot pickle 'generator' object" in str(result[1])


def test_journal_reads_partial_results_while_the_map_runs(pool: Pool) -> None:
    pool.define("sleepy", SLEEPY)
    quick = [0.0, 0.001, 0.002, 0.003]  # distinct items: equal ones share one entry
    handle = pool.map_async("sleepy", [*quick, 30.0], journal="partial")
    wait_for(lambda: pool.journals() and pool.journal("partial").progress().done == 4)
    journal = pool.journal("partial")
    results = journal.results()
    assert results[:4] == quick and results[4] is PENDING and results.pending == [4]
    handle.cancel()
    assert handle.result(10).cancelled == [4]
    assert journal.progress().pending == 1  # a cancelled call is not journaled
    journal.delete()
    with pytest.raises(JournalNotFound):
        pool.journal("partial")


def test_a_closed_pool_still_restores_a_finished_journal(pool: Pool) -> None:
    pool.define("pair", PAIR)
    expected = pool.map("pair", [1, 2], journal="done")
    pool.close()
    assert pool.map("pair", [1, 2], journal="done") == expected
    partly = pool.map("pair", [1, 2, 3], journal="done")
    assert partly[:2] == expected and isinstance(partly[2], PoolClosed)
    with pytest.raises(PoolClosed):
        pool.map("pair", [1])


@pytest.mark.timeout(120)
def test_a_killed_process_map_is_finished_by_a_new_process(
    make_pool: MakePool, store_dir: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    script = DYING_KERNEL.format(record=RECORD)
    kernel = subprocess.Popen(
        [sys.executable, "-c", script, str(store_dir), str(runs)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert kernel.stdout is not None
    token = kernel.stdout.readline().strip()
    try:
        wait_for(lambda: sum(runs_of(runs).values()) >= 100, timeout=60, interval=0.005)
    finally:
        os.kill(kernel.pid, signal.SIGKILL)
        kernel.wait()
    assert kernel.stdout.read() == ""  # it died half way
    kernel.stdout.close()
    assert_no_leftovers([token], timeout=10)  # its pool died with it

    ran_before = runs_of(runs)
    with open_journal(ProgramStore(store_dir), "kill") as journal:
        journaled = {i for i, v in enumerate(journal.results()) if v is not PENDING}
    assert 50 <= len(journaled) < 200

    pool = make_pool(2)
    result = pool.map(
        "record", range(200), journal="kill", common_kwargs={"runs": str(runs), "delay": 0.02}
    )
    assert list(result) == [i * i for i in range(200)] and result.ok
    assert set(result.restored) == journaled
    runs_now = runs_of(runs)
    assert set(runs_now) == set(range(200))
    rerun = {i for i, n in runs_now.items() if n > 1}
    # Nothing journaled ran again; what ran again is exactly what was under way at the
    # kill: started, not journaled yet (running, or its outcome not yet written).
    assert rerun == set(ran_before) - journaled
    assert all(n <= 2 for n in runs_now.values())
    # Typically 2-3 (one call per worker); more only if the map's thread lagged badly.
    assert len(rerun) <= 20, rerun
