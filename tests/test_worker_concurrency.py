"""Many calls at once in one worker process (config ``concurrency`` > 1), worker side.

Real template and worker processes, driven frame by frame through
:mod:`tests.worker_harness` (no pool): calls overlap in time, ``async def`` entries
overlap on the worker's event loop, output is captured per call, an INTERRUPT frame
stops only the call it names, and DSPy programs run in parallel threads with the LM a
worker set-up configured.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dspool_jupyter import protocol
from dspool_jupyter.context import CallContext
from tests.conftest import assert_no_leftovers
from tests.worker_harness import Template

pytestmark = pytest.mark.timeout(60)

NAP = "import time\ndef nap(s):\n    time.sleep(s)\n    return s\n"
ANAP = "import asyncio\nasync def anap(s):\n    await asyncio.sleep(s)\n    return s\n"
# Sleeps in short steps: an interrupt lands between two steps (a blocking C call
# finishes first: that is how PyThreadState_SetAsyncExc works).
STEPS = (
    "import time\n"
    "def steps(n):\n"
    "    print('start', n)\n"
    "    for _ in range(n):\n"
    "        time.sleep(0.01)\n"
    "    return n\n"
)
TALK = (
    "import sys, time\n"
    "def talk(tag, n):\n"
    "    for i in range(n):\n"
    "        print(tag, i)\n"
    "        sys.stderr.write(f'{tag} err {i}\\n')\n"
    "        time.sleep(0.002)\n"
    "    return tag\n"
)
ATALK = (
    "import asyncio, sys\n"
    "async def atalk(tag, n):\n"
    "    for i in range(n):\n"
    "        print(tag, i)\n"
    "        await asyncio.sleep(0.002)\n"
    "    return tag\n"
)
WHO = "from dspool_jupyter.context import current_call\ndef who():\n    return current_call.get()\n"
AWHO = (
    "import asyncio\n"
    "from dspool_jupyter.context import current_call\n"
    "async def awho():\n"
    "    await asyncio.sleep(0.05)\n"
    "    return current_call.get()\n"
)


@pytest.fixture
def template(store_dir: Path) -> Iterator[Callable[..., Template]]:
    made: list[Template] = []

    def make(**config: Any) -> Template:
        t = Template(store_dir, **config)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()
    assert_no_leftovers([t.token for t in made])


def test_k_plain_calls_overlap_in_time(template: Callable[..., Template]) -> None:
    t = template(concurrency=8)
    nap = t.define("nap", NAP)
    worker = t.spawn()
    started = time.monotonic()
    for i in range(8):
        worker.call(i, nap, "nap", 0.3)
    replies = worker.replies(8)
    elapsed = time.monotonic() - started
    assert all(r.ok and r.value == 0.3 for r in replies.values()), replies
    assert elapsed < 1.0, f"8 calls of 0.3 s at concurrency 8 took {elapsed:.2f} s"


def test_concurrency_one_runs_calls_one_after_another(template: Callable[..., Template]) -> None:
    t = template(concurrency=1)
    nap = t.define("nap", NAP)
    worker = t.spawn()
    started = time.monotonic()
    for i in range(3):
        worker.call(i, nap, "nap", 0.2)
    replies = worker.replies(3)
    assert all(r.ok for r in replies.values())
    assert time.monotonic() - started >= 0.6


def test_async_entries_overlap_on_the_workers_loop(template: Callable[..., Template]) -> None:
    t = template(concurrency=8)
    anap = t.define("anap", ANAP)
    nap = t.define("nap", NAP)
    worker = t.spawn()
    started = time.monotonic()
    for i in range(8):
        worker.call(i, anap, "anap", 0.3)
    for i in range(8, 12):  # threads and the loop at once
        worker.call(i, nap, "nap", 0.3)
    replies = worker.replies(12)
    elapsed = time.monotonic() - started
    assert all(r.ok and r.value == 0.3 for r in replies.values()), replies
    assert elapsed < 1.0, f"12 overlapping calls of 0.3 s took {elapsed:.2f} s"


def test_an_async_entry_runs_at_concurrency_one_too(template: Callable[..., Template]) -> None:
    t = template(concurrency=1)
    anap = t.define("anap", ANAP)
    worker = t.spawn()
    worker.call(1, anap, "anap", 0.01)
    reply = worker.reply()
    assert reply.ok and reply.value == 0.01


@pytest.mark.parametrize("concurrency", [1, 4])
def test_current_call_names_the_call(template: Callable[..., Template], concurrency: int) -> None:
    t = template(concurrency=concurrency)
    who = t.define("who", WHO)
    awho = t.define("awho", AWHO)
    worker = t.spawn("w7")
    for i in range(4):
        worker.call(i, who, "who")
        worker.call(100 + i, awho, "awho")
    replies = worker.replies(8)
    for call_id, reply in replies.items():
        name = "who" if call_id < 100 else "awho"
        assert reply.value == CallContext(call_id, name, "w7")


def test_output_is_captured_per_call(template: Callable[..., Template]) -> None:
    t = template(concurrency=4)
    talk = t.define("talk", TALK)
    atalk = t.define("atalk", ATALK)
    worker = t.spawn()
    for i in range(4):
        worker.call(i, talk, "talk", f"t{i}", 40)
        worker.call(10 + i, atalk, "atalk", f"a{i}", 40)
    replies = worker.replies(8)
    for reply in replies.values():
        tag = reply.value
        assert reply.out == "".join(f"{tag} {i}\n" for i in range(40)), reply.out
        expected_err = "".join(f"{tag} err {i}\n" for i in range(40)) if tag[0] == "t" else ""
        assert reply.err == expected_err


def test_interrupt_stops_only_the_named_call(template: Callable[..., Template]) -> None:
    t = template(concurrency=4)
    steps = t.define("steps", STEPS)
    worker = t.spawn()
    for i in range(4):
        worker.call(i, steps, "steps", 100)  # about 1 s each
    time.sleep(0.3)
    sent = time.monotonic()
    worker.interrupt(2)
    first = worker.reply(5)
    assert first.call_id == 2 and first.phase == "cancelled", first
    assert first.at - sent < 0.5
    assert first.out == "start 100\n"
    rest = worker.replies(3)
    assert {r.call_id for r in rest.values()} == {0, 1, 3}
    assert all(r.ok and r.value == 100 for r in rest.values()), rest


def test_interrupt_cancels_only_the_named_task(template: Callable[..., Template]) -> None:
    t = template(concurrency=4)
    anap = t.define("anap", ANAP)
    worker = t.spawn()
    for i in range(3):
        worker.call(i, anap, "anap", 1.0)
    time.sleep(0.2)
    worker.interrupt(1)
    first = worker.reply(5)
    assert first.call_id == 1 and first.phase == "cancelled", first
    rest = worker.replies(2)
    assert all(r.ok and r.value == 1.0 for r in rest.values()), rest


def test_interrupt_of_a_queued_call_means_it_never_runs(
    template: Callable[..., Template],
) -> None:
    t = template(concurrency=2)
    steps = t.define("steps", STEPS)
    worker = t.spawn()
    for i in range(3):
        worker.call(i, steps, "steps", 30)  # the third waits for a thread
    worker.interrupt(2)
    replies = worker.replies(3)
    assert replies[2].phase == "cancelled" and replies[2].out == "", replies[2].out
    assert replies[0].ok and replies[1].ok


def test_an_interrupt_for_a_finished_call_is_ignored(template: Callable[..., Template]) -> None:
    t = template(concurrency=4)
    nap = t.define("nap", NAP)
    steps = t.define("steps", STEPS)
    worker = t.spawn()
    worker.call(1, nap, "nap", 0)
    assert worker.reply().ok
    worker.interrupt(1)
    worker.interrupt(99)  # never existed
    worker.call(2, steps, "steps", 20)
    reply = worker.reply()
    assert reply.ok and reply.value == 20
    for _ in range(50):  # a late interrupt must not land in a later call
        worker.call(3, nap, "nap", 0)
        worker.interrupt(3)
        reply = worker.reply()
        assert reply.ok or reply.phase == "cancelled"
    worker.call(4, steps, "steps", 5)
    assert worker.reply().ok


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_programs_own_keyboard_interrupt_is_its_error(
    template: Callable[..., Template], concurrency: int
) -> None:
    t = template(concurrency=concurrency)
    raiser = t.define("raiser", "def raiser():\n    raise KeyboardInterrupt('mine')\n")
    worker = t.spawn()
    worker.call(1, raiser, "raiser")
    reply = worker.reply()
    assert reply.phase == "run" and reply.info["type"] == "KeyboardInterrupt"
    assert reply.info["message"] == "mine"


def test_every_call_gets_its_reply_under_load(template: Callable[..., Template]) -> None:
    t = template(concurrency=8)
    nap = t.define("nap", NAP)
    anap = t.define("anap", ANAP)
    worker = t.spawn()
    for i in range(400):
        if i % 2:
            worker.call(i, nap, "nap", 0)
        else:
            worker.call(i, anap, "anap", 0)
    replies = worker.replies(400, timeout=30)
    assert all(r.ok for r in replies.values())
    worker.stop()
    assert worker.frame(10) is None


# ------------------------------------------------------------------------------ DSPy

DSPY_MODULE = (
    "import time\n"
    "import dspy\n"
    "class Slow(dspy.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.qa = dspy.Predict('question -> answer')\n"
    "    def forward(self, question):\n"
    "        time.sleep(0.3)\n"
    "        return self.qa(question=question)\n"
)


def _lm_setup(t: Template, answers: dict[str, dict[str, str]]) -> tuple[str, Any]:
    from dspool_jupyter import dspy_programs

    program = t.define("setup.dspy.lm", dspy_programs.apply_lm)
    return program, dspy_programs.lm_config("dummy", answers=answers)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_dspy_programs_use_the_configured_lm_in_every_thread(
    template: Callable[..., Template], concurrency: int
) -> None:
    pytest.importorskip("dspy")
    from dspool_jupyter import dspy_programs

    t = template(concurrency=concurrency)
    answers = {f"question {i}?": {"answer": f"answer {i}"} for i in range(8)}
    setup, config = _lm_setup(t, answers)
    qa = t.store.put("qa", dspy_programs.signature_spec("question -> answer"), kind="signature").id
    slow = t.define("slow", DSPY_MODULE, entry="Slow")
    worker = t.spawn()
    worker.call(0, setup, "setup.dspy.lm", config)
    assert worker.reply(30).ok
    for i in range(8):
        worker.call(1 + i, qa, "qa", question=f"question {i}?")
    replies = worker.replies(8, timeout=30)
    for call_id, reply in replies.items():
        assert reply.ok, reply.info
        assert reply.value.answer == f"answer {call_id - 1}"
    started = time.monotonic()
    for i in range(4):
        worker.call(20 + i, slow, "slow", question=f"question {i}?")
    replies = worker.replies(4, timeout=30)
    elapsed = time.monotonic() - started
    for call_id, reply in replies.items():
        assert reply.ok, reply.info
        assert reply.value.answer == f"answer {call_id - 20}"
    if concurrency == 4:
        assert elapsed < 1.0, f"4 DSPy calls of 0.3 s at concurrency 4 took {elapsed:.2f} s"
    # configure_lm again (a set-up applied twice, on whichever thread runs it)
    config = dspy_programs.lm_config("dummy", answers={"": {"answer": "changed"}})
    worker.call(30, setup, "setup.dspy.lm", config)
    assert worker.reply(30).ok
    for i in range(4):
        worker.call(31 + i, qa, "qa", question=f"question {i}?")
    replies = worker.replies(4, timeout=30)
    assert all(r.ok and r.value.answer == "changed" for r in replies.values()), replies


def test_heartbeats_name_a_running_call(template: Callable[..., Template]) -> None:
    t = template(concurrency=4, heartbeat_interval=0.1)
    nap = t.define("nap", NAP)
    worker = t.spawn()
    worker.call(5, nap, "nap", 0.6)
    worker.call(6, nap, "nap", 0.6)
    worker.replies(2)
    busy = {meta[1] for meta in worker.heartbeats}
    assert busy & {5, 6}
    assert all(isinstance(meta[0], int) for meta in worker.heartbeats)
    assert protocol.HEARTBEAT == 13


def test_at_concurrency_one_sigint_cancels_the_running_call(
    template: Callable[..., Template],
) -> None:
    t = template(concurrency=1)
    steps = t.define("steps", STEPS)
    worker = t.spawn()
    worker.call(1, steps, "steps", 500)
    time.sleep(0.3)
    os.kill(worker.pid, signal.SIGINT)
    reply = worker.reply(5)
    assert reply.call_id == 1 and reply.phase == "cancelled", reply
    os.kill(worker.pid, signal.SIGINT)  # between calls: a late cancel, ignored
    time.sleep(0.2)
    worker.call(2, steps, "steps", 5)
    reply = worker.reply(5)
    assert reply.ok and reply.value == 5
