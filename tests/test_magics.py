"""The %dspool magics: input parsing, then a real kernel spoken to over jupyter_client.

One kernel serves most tests of this module (each test leaves its pool usable); the
shutdown and notebook tests start their own. No pool process may outlive its kernel.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError

from dspool_jupyter.magics import (
    cancel_on_interrupt,
    parse_cell_inputs,
    parse_inputs,
    parse_value,
    split_line,
)
from tests.conftest import assert_no_leftovers, wait_for
from tests.kernel_helpers import TRACK_POOLS, Kernel, running_kernel

pytestmark = pytest.mark.timeout(60)

PROGRAMS = """
%%dspool program square
def square(x):
    print("squaring", x)
    return x * x
"""
BAD = """
%%dspool program bad
def bad(n):
    raise ValueError(f"bad input {n}")
"""
SLEEPY = """
%%dspool program sleepy
import os, time
def sleepy(s, marker=None):
    if marker:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
    time.sleep(s)
    return s
"""
FLAKY = """
%%dspool program flaky
def flaky(i):
    if i in (13, 77, 150):
        raise ValueError(f"item {i} is bad")
    return 2 * i
"""


# -------------------------------------------------------------------------- parsing


def test_split_line_keeps_quotes_and_brackets_together() -> None:
    assert split_line('run qa q="two words" xs=[1, 2] d={"a": 1} --bg') == [
        "run",
        "qa",
        'q="two words"',
        "xs=[1, 2]",
        'd={"a": 1}',
        "--bg",
    ]
    with pytest.raises(UsageError, match="quote"):
        split_line("run qa q='open")


def test_values_are_literals_else_text() -> None:
    assert parse_value("3") == 3
    assert parse_value("'3'") == "3"
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("What is 2+2?") == "What is 2+2?"
    assert parse_value("None") is None
    args, kwargs = parse_inputs(["7", "q=hello there", "n=2.5", 'x="1"'])
    assert args == [7] and kwargs == {"q": "hello there", "n": 2.5, "x": "1"}
    with pytest.raises(UsageError, match="twice"):
        parse_inputs(["a=1", "a=2"])


def test_cell_inputs() -> None:
    assert parse_cell_inputs('{"q": "hi", "n": [1, 2]}') == {"q": "hi", "n": [1, 2]}
    assert parse_cell_inputs("{'q': 'hi'}") == {"q": "hi"}  # a dict literal works too
    body = "# inputs\nquestion = What is the capital of France?\n\nk = 3\n"
    assert parse_cell_inputs(body) == {"question": "What is the capital of France?", "k": 3}
    with pytest.raises(UsageError, match="line 1"):
        parse_cell_inputs("just text")
    with pytest.raises(UsageError, match="JSON"):
        parse_cell_inputs("{not json")


def test_cancel_on_interrupt_says_what_it_cancelled_where() -> None:
    futures: list[concurrent.futures.Future[Any]] = [concurrent.futures.Future() for _ in range(4)]
    futures[0].set_result(1)  # ended before the stop button
    futures[1].worker_id = "w2"  # type: ignore[attr-defined]
    futures[2].worker_id = "w1"  # type: ignore[attr-defined]
    interrupt = cancel_on_interrupt("nap", futures, None)
    assert isinstance(interrupt, KeyboardInterrupt)
    assert all(f.cancelled() for f in futures[1:])
    assert interrupt._render_traceback_() == [  # type: ignore[attr-defined]
        "KeyboardInterrupt: cancelled 3 calls of 'nap' (2 running on w1, w2, 1 queued); "
        "1 had already ended",
        "The interrupted workers get SIGINT and serve the next call.",
    ]
    queued: concurrent.futures.Future[Any] = concurrent.futures.Future()
    assert cancel_on_interrupt("nap", [queued], None)._render_traceback_() == [  # type: ignore[attr-defined]
        "KeyboardInterrupt: cancelled the call of 'nap' before it started (it was queued)"
    ]


# --------------------------------------------------------------------- the kernel


@pytest.fixture(scope="module")
def k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    with running_kernel(tmp_path_factory.mktemp("kernel")) as kernel:
        kernel.run("%load_ext dspool_jupyter")
        kernel.run("%dspool start --workers 2")
        for program in (PROGRAMS, BAD, SLEEPY, FLAKY):
            kernel.run(program.strip())
        yield kernel


def _pids(k: Kernel) -> list[int]:
    return list(
        k.value(
            "[w.pid for w in __import__('dspool_jupyter').pool.current_pool().status().workers]"
        )
    )


def _pool_value(k: Kernel, attribute: str) -> Any:
    return k.value(f"__import__('dspool_jupyter').pool.current_pool().status().{attribute}")


def test_define_and_run(k: Kernel) -> None:
    run = k.run("%dspool run square x=7")
    assert run.result == "49"
    assert run.stream() == "squaring 7\n"
    assert k.run("%dspool run square 6").result == "36"  # a positional input
    assert k.run("%%dspool run square\n# one input\nx = 5\n").result == "25"
    assert k.run('%%dspool run square\n{"x": 4}').result == "16"
    stored = k.run("%dspool run square x=3 --out nine")
    assert stored.result is None and k.value("nine") == 9
    assert "square" in k.run("%dspool programs").stream()
    assert k.run("%%dspool program cube\ndef cube(x):\n    return x ** 3\n").stream() == (
        "defined program 'cube'\n"
    )
    assert k.run("%dspool run cube x=2").result == "8"


def test_program_error_shows_the_worker_traceback_and_the_kernel_carries_on(k: Kernel) -> None:
    failed = k.run("%dspool run bad n=3", ok=False)
    ename, evalue, traceback = failed.error
    assert ename == "ProgramError"
    assert re.match(r"ProgramError: program 'bad' on worker w\d+", traceback[0])
    text = "\n".join(traceback)
    assert "raise ValueError" in text and "ValueError: bad input 3" in text
    assert "magics.py" not in text  # the worker's traceback, not the kernel's
    assert k.run("%dspool run square x=3").result == "9"
    errors = k.run("%dspool errors")
    assert "ValueError: bad input 3" in errors.displays[-1]["data"]["text/plain"]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("%dspool", "needs a subcommand"),
        ("%dspool frobnicate", "unknown subcommand 'frobnicate'"),
        ("%dspool run", "required: NAME; usage: %dspool run NAME"),
        ("%dspool run nosuch", "no program 'nosuch'"),
        ("%dspool run square x=1 x=2", "given twice"),
        ("%dspool run square --timeout -1", "must be more than 0"),
        ("%dspool run square --out 1x", "not a Python variable name"),
        ("%dspool start --workers none", "'none' is not a whole number"),
        ("%dspool program square", "needs its source in a cell"),
        ("%%dspool program nothing\n\n", "the cell is empty"),
        ("%%dspool program broken\ndef broken(:\n", "syntax error"),
        ("%%dspool program noentry\nx = 1\n", "does not define its entry"),
        ("%dspool map square --over missing", "no variable 'missing'"),
        ("%dspool map square", "--over"),
        ("%dspool map square --over items --keep-errors", "use it with --journal J"),
        ("%dspool map square --over items --journal a/b", "journal name 'a/b' is not valid"),
        ("%dspool journals --delete nope", "no journal 'nope'"),
        ("%dspool restart w999", "no worker 'w999'"),
        ("%%dspool status\nbody", "takes no cell body"),
        ("%dspool run square q='open", "not closed"),
        ("%dspool start --concurrency 0", "'0' must be at least 1"),
        ("%dspool limit nosuch rpm=5", "unknown model 'nosuch'"),
        ("%dspool limit openai/gpt-4o-mini rpm=-5", "rpm must be a positive number, got '-5'"),
        ("%dspool limit openai/gpt-4o-mini tpm=lots", "tpm must be a positive number"),
        ("%dspool limit openai/gpt-4o-mini rps=5", "unknown setting 'rps'; it takes rpm=N"),
        ("%dspool limit openai/gpt-4o-mini 60", "'60' is not key=value"),
        ("%dspool limit openai/gpt-4o-mini", "give rpm=N and/or tpm=N"),
        ("%dspool limit openai/gpt-4o-mini rpm=60", "this pool has no LM"),
        ("%dspool limit rpm=60", "needs MODEL before 'rpm=60'"),
        ("%dspool limit --budget max_cost=0", "max_cost must be a positive number"),
        ("%dspool limit --budget max_tokens=2.5", "max_tokens must be a whole number"),
        ("%dspool limit --budget cost=1", "unknown setting 'cost'"),
        ("%dspool usage --out 1x", "not a Python variable name"),
    ],
)
def test_usage_errors_are_one_line(k: Kernel, line: str, says: str) -> None:
    failed = k.run(line, ok=False)
    assert failed.error[0] == "UsageError"
    stderr = failed.stream("stderr")
    assert stderr.startswith("UsageError: ") and stderr.count("\n") == 1, stderr
    assert says in stderr, stderr
    assert not failed.outputs("error")  # no traceback


def test_signature_and_lm_errors_are_one_line(k: Kernel) -> None:
    """Whatever dspy_programs can do today, a mistake in a signature cell is one line."""
    failed = k.run("%%dspool signature qa\nthis is not a signature\n", ok=False)
    assert failed.error[0] == "UsageError" and failed.stream("stderr").count("\n") == 1


def test_bg_result_lands_in_its_own_cell(k: Kernel) -> None:
    first = k.run("%dspool run sleepy s=1.0 --bg --out job")
    placeholder = first.displays[0]
    display_id = placeholder["transient"]["display_id"]
    assert (
        "running in the background (job.result() waits for it)"
        in (placeholder["data"]["text/plain"])
    )
    assert k.value("repr(job)") == "<BackgroundCall 'sleepy' running>"
    start = len(k.iopub)
    second = k.run("import time\ntime.sleep(1.5)\n'second cell'")
    update = k.wait_for_message(
        lambda m: m["header"]["msg_type"] == "update_display_data", start=start, timeout=10
    )
    assert update["content"]["transient"]["display_id"] == display_id
    assert update["content"]["data"]["text/plain"] == "1.0"
    # the second cell's own outputs are its own: only its value
    assert second.result == "'second cell'" and not second.displays and not second.stream()
    assert k.value("job.result()") == 1.0

    failed = k.run("%dspool run bad n=9 --bg")
    display_id = failed.displays[0]["transient"]["display_id"]
    update = k.wait_for_message(
        lambda m: (
            m["header"]["msg_type"] == "update_display_data"
            and m["content"]["transient"]["display_id"] == display_id
        ),
        timeout=10,
    )
    text = update["content"]["data"]["text/plain"]
    assert text.startswith("ProgramError: program 'bad' on worker") and "bad input 9" in text
    assert k.value("type(dspool_bg.exception()).__name__") == "ProgramError"


def test_interrupt_cancels_the_call_and_the_pool_stays_usable(k: Kernel, tmp_path: Path) -> None:
    pids = _pids(k)
    marker = tmp_path / "started"
    running = k.submit(f"%dspool run sleepy s=60 marker='{marker}'")
    wait_for(marker.exists, timeout=10)
    interrupted = time.monotonic()
    k.km.interrupt_kernel()
    k.wait(running, timeout=15)
    assert running.error[0] == "KeyboardInterrupt"
    assert time.monotonic() - interrupted < 5
    assert k.run("%dspool run square x=4").result == "16"
    wait_for(lambda: _pool_value(k, "running") == 0, timeout=10)
    assert sorted(_pids(k)) == sorted(pids)  # the interrupted worker survived

    # a map: every call is cancelled, queued ones included
    k.run("slow = [60] * 6")
    mapping = k.submit(f"%dspool map sleepy --over slow marker='{tmp_path / 'map'}'")
    wait_for((tmp_path / "map").exists, timeout=10)
    k.km.interrupt_kernel()
    k.wait(mapping, timeout=15)
    assert mapping.error[0] == "KeyboardInterrupt"
    wait_for(lambda: _pool_value(k, "running") == 0 and _pool_value(k, "queued") == 0, timeout=10)
    assert k.run("%dspool run square x=5").result == "25"

    # a --bg call of the interrupted cell is cancelled too; one of an earlier cell is not
    k.run("%dspool run sleepy s=1.5 --bg --out earlier")
    same = k.submit(
        f"%dspool run sleepy s=60 marker='{tmp_path / 'bg'}' --bg --out mine\n"
        "import time\ntime.sleep(60)"
    )
    wait_for((tmp_path / "bg").exists, timeout=10)
    k.km.interrupt_kernel()
    k.wait(same, timeout=15)
    assert k.value("mine.future.cancelled()") is True
    assert k.value("earlier.result(10)") == 1.5
    assert k.run("%dspool run square x=6").result == "36"


def test_stop_button_on_run_says_what_was_cancelled_in_a_few_lines(
    k: Kernel, tmp_path: Path
) -> None:
    workers = {pid: w for w, pid in _workers(k)}
    marker = tmp_path / "started"
    running = k.submit(f"%dspool run sleepy s=60 marker='{marker}'")
    wait_for(lambda: marker.exists() and marker.read_text() != "", timeout=10)
    worker = workers[int(marker.read_text())]
    k.km.interrupt_kernel()
    k.wait(running, timeout=15)
    ename, evalue, traceback = running.error
    assert ename == "KeyboardInterrupt"
    assert traceback[0] == (
        f"KeyboardInterrupt: cancelled the call of 'sleepy' on worker {worker} while it ran"
    )
    assert traceback[1] == "The interrupted worker gets SIGINT and serves the next call."
    assert traceback[2].startswith("The pool carries on: healthy, 2/2 workers ready, ")
    assert len(traceback) == 3
    text = "\n".join(traceback)
    for frame in ("magics.py", "concurrent", "threading", "Traceback"):
        assert frame not in text
    assert k.run("%dspool run square x=4").result == "16"  # and the pool is fine


def test_start_on_a_live_pool_says_so_and_replace_replaces(k: Kernel) -> None:
    pids = _pids(k)
    again = k.run("%dspool start --workers 2", ok=False)
    ename, evalue, traceback = again.error
    assert ename == "UsageError"
    assert evalue.startswith("a pool is running (healthy, 2/2 workers ready)")
    assert "%dspool start --replace" in evalue and "%dspool stop" in evalue
    assert sorted(_pids(k)) == sorted(pids)  # nothing changed
    replaced = k.run("%dspool start --workers 2 --replace")
    assert replaced.stream().startswith("dspool: stopped the running pool\n")
    assert not set(_pids(k)) & set(pids)
    assert k.run("%dspool run square x=2").result == "4"


ASK = """
%%dspool program ask
from dspool_jupyter.llm import permit
def ask():
    with permit("openai/gpt-4o-mini", tokens=10) as p:
        p.record(12, 5)
    return "answered"
"""


def test_start_concurrency_limit_and_usage(k: Kernel) -> None:
    k.run("%dspool start --workers 1 --concurrency 3 --replace")
    try:
        assert _pool_value(k, "slots") == 3
        assert k.value(
            "[w.slots for w in __import__('dspool_jupyter').pool.current_pool().status().workers]"
        ) == [3]
        assert k.run("%dspool limit openai/gpt-4o-mini rpm=60 tpm=10000 --plain").stream() == (
            "dspool: 'openai/gpt-4o-mini' limited to 60 requests/min, 10,000 tokens/min "
            "across every worker\n"
        )
        assert k.run("%dspool limit --budget max_tokens=1000").stream() == (
            "dspool: budget 1,000 tokens; once spent, LM requests fail at once\n"
        )
        assert "(no LM request yet)" in k.run("%dspool usage").stream()
        k.run(ASK.strip())
        assert k.run("%dspool run ask").result == "'answered'"
        assert k.run("%dspool limit").stream() == (
            "openai/gpt-4o-mini: 1/60 rpm, 17/10,000 tpm, 0 in flight, 0 429s\n"
            "budget: 17 of 1,000 tokens spent\n"
        )
        usage = k.run("%dspool usage --out spent").stream().splitlines()
        assert usage[0].split() == ["requests", "prompt", "completion", "cost", "429s"]
        assert usage[1].split()[:4] == ["total", "1", "12", "5"]
        assert usage[2].split()[:5] == ["model", "openai/gpt-4o-mini", "1", "12", "5"]
        assert usage[-1] == "budget: 17 of 1,000 tokens spent"
        assert k.value("(spent.requests, spent.prompt_tokens, spent.completion_tokens)") == (
            1,
            12,
            5,
        )
        assert k.run("%dspool limit openai/gpt-4o-mini --off").stream() == (
            "dspool: no limit on 'openai/gpt-4o-mini'\n"
        )
        assert k.run("%dspool limit --budget --off").stream() == "dspool: no budget\n"
        assert k.run("%dspool limit").stream().splitlines() == [
            "openai/gpt-4o-mini: 1 rpm (no limit), 0 in flight, 0 429s",
            "no budget (%dspool limit --budget max_cost=D sets one)",
        ]
    finally:
        k.run("%dspool start --workers 2 --replace")
        k.run("__import__('dspool_jupyter').pool.current_pool().wait_ready(30)")


def test_status_text_is_the_state_when_it_runs(k: Kernel) -> None:
    k.run("%dspool status")  # a live view exists from an earlier cell
    k.run("items = list(range(20))\n%dspool map square --over items --out res")
    text = k.run("%dspool status --text").stream()
    calls = _pool_value(k, "calls")
    done, failed, cancelled = (_pool_value(k, name) for name in ("done", "failed", "cancelled"))
    headline = text.splitlines()[0]
    assert headline.startswith("dspool pool: healthy, 2/2 workers ready, 0/2 slots in flight")
    assert f"{calls} calls: {done} done, {failed} failed, {cancelled} cancelled" in headline, (
        headline
    )
    assert "starting" not in text


def _workers(k: Kernel) -> list[tuple[str, int]]:
    return [
        (w, pid)
        for w, pid in k.value(
            "[(w.id, w.pid) for w in "
            "__import__('dspool_jupyter').pool.current_pool().status().workers]"
        )
    ]


def test_sigkilled_worker_shows_in_the_widget_and_the_pool_heals(k: Kernel) -> None:
    shown = k.run("%dspool status")
    bundle = shown.displays[-1]["data"]
    assert bundle["text/plain"] == "dspool pool status (2 workers, live view)"
    assert "application/vnd.jupyter.widget-view+json" in bundle
    workers = k.value(
        "[(w.id, w.pid) for w in __import__('dspool_jupyter').pool.current_pool().status().workers]"
    )
    worker_id, pid = workers[0]
    marker = f'data-worker="{worker_id}" data-state="dead"'
    start = len(k.iopub)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    message = k.wait_for_message(
        lambda m: (
            m["header"]["msg_type"] == "comm_msg"
            and marker in str(m["content"]["data"].get("state", {}).get("value", ""))
        ),
        start=start,
        timeout=10,
    )
    delay = message["received"] - killed
    assert delay < 1.5, delay  # target < 0.5 s (bench/widget_cost.py); slack for loaded CI
    wait_for(lambda: _pool_value(k, "ready_count") == 2, timeout=15)
    assert pid not in _pids(k)
    assert k.run("%dspool run square x=8").result == "64"
    text = k.run("%dspool status --text").stream()
    assert "healthy, 2/2 workers ready" in text


def test_map_200_items_with_3_failures(k: Kernel) -> None:
    mapped = k.run("items = list(range(200))\n%dspool map flaky --over items --out res")
    assert k.value("len(res)") == 200
    assert k.value("sorted(res.errors)") == [13, 77, 150]
    assert (
        k.value(
            "[v for i, v in enumerate(res) if i not in res.errors] == "
            "[2 * i for i in range(200) if i not in (13, 77, 150)]"
        )
        is True
    )
    assert k.value("type(res[77]).__name__") == "ProgramError"
    out = mapped.stream()
    assert out.startswith("3 of 200 calls failed:\n  [13] ProgramError:")
    progress_id = mapped.displays[0]["transient"]["display_id"]
    updates = [
        m["content"]["data"]["text/plain"]
        for m in mapped.messages
        if m["header"]["msg_type"] == "update_display_data"
        and m["content"]["transient"]["display_id"] == progress_id
    ]
    final = r"map flaky: 200/200 · 197 done, 3 failed · [\d.]+ s, [\d.]+/s"
    assert re.fullmatch(final, updates[-1]), updates[-1]
    assert k.run("%dspool map square --over items --arg x").result is not None


def test_interrupted_map_counts_done_and_cancelled_apart(k: Kernel) -> None:
    k.run("naps = [0, 0, 60, 60, 60, 60]")
    mapping = k.submit("%dspool map sleepy --over naps --out partial")
    k.wait_for_message(
        lambda m: (
            m["parent_header"].get("msg_id") == mapping.msg_id
            and m["header"]["msg_type"] == "update_display_data"
            and "2 done" in m["content"]["data"]["text/plain"]
        ),
        timeout=15,
    )
    k.km.interrupt_kernel()
    k.wait(mapping, timeout=15)
    assert mapping.error[0] == "KeyboardInterrupt"
    last = [
        m["content"]["data"]["text/plain"]
        for m in mapping.messages
        if m["header"]["msg_type"] == "update_display_data"
    ][-1]
    assert last.startswith("map sleepy: 6/6 · 2 done, 4 cancelled · "), last
    assert (
        last.endswith("(interrupted: the remaining calls were cancelled)") and "failed" not in last
    )
    assert k.value("(partial[:2], partial.cancelled, partial.failed)") == ([0, 0], [2, 3, 4, 5], [])
    wait_for(lambda: _pool_value(k, "running") == 0 and _pool_value(k, "queued") == 0, timeout=10)


def test_journaled_map_resumes_and_journals_are_listed(k: Kernel) -> None:
    k.run("%dspool journals --delete evens", ok=None)
    k.run("evens = list(range(0, 40, 2))")
    first = k.run("%dspool map flaky --over evens --journal evens --out r1")
    assert first.stream().startswith("journal 'evens': 0 restored, 20 run\n")
    again = k.run("%dspool map flaky --over evens --journal evens --out r2")
    assert again.stream() == "journal 'evens': 20 restored, 0 run\n"
    assert k.value("r2 == r1 == [2 * i for i in evens] and r2.restored == list(range(20))")
    listed = k.run("%dspool journals").stream().splitlines()
    assert listed[0].split() == ["journal", "program", "done", "failed", "items", "age", "size"]
    row = next(line.split() for line in listed if line.startswith("evens "))
    assert row[:5] == ["evens", "flaky", "20", "0", "20"] and row[-1] in ("KB", "MB")
    assert "holds results of program 'flaky'" in (
        k.run("%dspool map square --over evens --journal evens", ok=False).stream("stderr")
    )
    background = k.run("%dspool map flaky --over evens --journal evens --bg --out job")
    assert background.result is None
    assert k.value("job.result(10).restored == list(range(20))")
    assert k.run("%dspool journals --delete evens").stream() == "deleted journal 'evens'\n"
    assert "no journal 'evens'" in k.run("%dspool journals --delete evens", ok=False).stream(
        "stderr"
    )


def test_restart_stop_and_autostart(k: Kernel) -> None:
    old = sorted(_pids(k))
    assert k.run("%dspool restart").stream() == "restarting every worker\n"
    wait_for(lambda: _pool_value(k, "ready_count") == 2 and not set(_pids(k)) & set(old), 20)
    assert k.run("%reload_ext dspool_jupyter").ok
    assert k.run("%dspool stop").stream() == "dspool: pool stopped\n"
    assert k.run("%dspool status").stream().startswith("dspool: no pool is running")
    autostarted = k.run("%dspool run square x=2")
    assert autostarted.result == "4"
    assert autostarted.stream().startswith("dspool: no pool was running, started one")
    k.run("%dspool start --workers 2 --replace")  # leave the module's pool as it was


# ------------------------------------------------------------- kernels of their own


@pytest.mark.timeout(90)
def test_kernel_shutdown_and_restart_leave_no_worker(tmp_path: Path) -> None:
    with running_kernel(tmp_path) as kernel:
        kernel.run("%load_ext dspool_jupyter\n%dspool start --workers 2")
        kernel.run("%%dspool program keep\ndef keep():\n    return 'kept'\n")
        first = kernel.tokens()
        assert len(first) == 1
        kernel.km.restart_kernel(now=False)
        kernel.kc.wait_for_ready(timeout=30)
        assert_no_leftovers(first, timeout=10)
        kernel.run(TRACK_POOLS)
        kernel.run("%load_ext dspool_jupyter")
        # programs survive a kernel restart; the new pool starts on demand
        assert kernel.run("%dspool run keep").result == "'kept'"
    # running_kernel shut the kernel down and checked the second pool's processes


@pytest.mark.timeout(90)
def test_bg_output_in_a_notebook_run_by_nbclient(tmp_path: Path, monkeypatch: Any) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DSPOOL_STORE", str(tmp_path / "store"))
    cells = [
        TRACK_POOLS,
        "%load_ext dspool_jupyter\n%dspool start --workers 2",
        SLEEPY.strip(),
        "%dspool run sleepy s=0.3 --bg --out job",
        "import time\ntime.sleep(1.0)\nprint('second cell')",
        "job.result()",
        "print(_dspool_tokens)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    outputs = [cell["outputs"] for cell in nb.cells]
    tokens = re.findall(r"'([\w-]+)'", outputs[-1][0]["text"])
    assert tokens
    assert_no_leftovers(tokens, timeout=10)
    bg = outputs[3]
    assert len(bg) == 1 and bg[0]["data"]["text/plain"] == "0.3"  # replaced in its cell
    assert [o.get("text") for o in outputs[4]] == ["second cell\n"]
    widget_text = outputs[1][0]["data"]["text/plain"]
    assert widget_text == "dspool pool status (2 workers, live view)"
