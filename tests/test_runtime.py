"""The shared child-side call handling, in this process: replies, caps, caches, kinds."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from dspool_jupyter import programs, runtime
from dspool_jupyter.context import CallContext, current_call
from dspool_jupyter.store import ProgramStore

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _restore_streams() -> object:
    saved = sys.stdout, sys.stderr
    yield None
    sys.stdout, sys.stderr = saved


def test_capped_text_keeps_the_head_and_says_what_was_cut() -> None:
    buf = runtime.CappedText(limit=10)
    assert buf.write("12345") == 5
    assert buf.write("67890abc") == 8
    assert buf.getvalue() == "1234567890\n[dspool: output cut here: 3 more characters not shown]\n"
    small = runtime.CappedText(limit=10)
    small.write("short")
    assert small.getvalue() == "short"


def test_run_call_returns_the_value_and_the_output() -> None:
    runtime.install_output_capture()

    def talk(x: int) -> int:
        print("out", x)  # noqa: T201 - what the capture takes
        sys.stderr.write("err\n")
        return x + 1

    reply = runtime.run_call(talk, (1,), {}, 1 << 20)
    assert reply.info is None and cloudpickle.loads(reply.blob) == 2
    assert (reply.out, reply.err) == ("out 1\n", "err\n")


def test_current_call_is_set_only_during_the_call() -> None:
    context = CallContext(7, "p", "w1")
    reply = runtime.run_call(current_call.get, (), {}, 1 << 20, context)
    assert cloudpickle.loads(reply.blob) == context
    assert current_call.get() is None


def test_errors_are_replies_with_their_phase() -> None:
    def boom() -> None:
        raise ValueError("bad")

    reply = runtime.run_call(boom, (), {}, 1 << 20)
    assert reply.info is not None
    assert (reply.info["phase"], reply.info["type"], reply.info["message"]) == (
        "run",
        "ValueError",
        "bad",
    )
    assert "boom" in reply.info["traceback"] and "run_call" not in reply.info["traceback"]
    assert isinstance(cloudpickle.loads(reply.blob), ValueError)

    big = runtime.run_call(lambda: "x" * 100, (), {}, 50)
    assert big.info is not None and big.info["phase"] == "result"
    assert "max_result_bytes of 50" in big.info["message"]

    unpicklable = runtime.run_call(threading.Lock, (), {}, 1 << 20)
    assert unpicklable.info is not None and unpicklable.info["phase"] == "result"


def test_a_failing_str_and_a_huge_message_are_safe() -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert runtime.safe_str(Odd()) == "<str() of Odd failed: RuntimeError>"
    info, _ = runtime.error_info("run", Odd())
    assert info["message"] == "<str() of Odd failed: RuntimeError>"
    huge = ValueError("x" * (runtime.MAX_MESSAGE_CHARS + 5))
    info, blob = runtime.error_info("run", huge)
    assert info["message"].endswith("[dspool: cut here: 5 more characters]")
    assert len(info["traceback"]) < runtime.MAX_TRACEBACK_CHARS + 100
    assert blob == b""  # too big to send as an object


def test_a_keyboard_interrupt_is_a_cancel_only_when_the_state_says_so() -> None:
    def own() -> None:
        raise KeyboardInterrupt

    reply = runtime.run_call(own, (), {}, 1 << 20, state=runtime.CallState(1))
    assert reply.info is not None and reply.info["phase"] == "run"

    state = runtime.CallState(2, thread_id=threading.get_ident())

    def wait_for_cancel() -> None:
        for _ in range(500):
            time.sleep(0.01)

    threading.Timer(0.1, state.interrupt).start()
    reply = runtime.run_call(wait_for_cancel, (), {}, 1 << 20, state=state)
    assert reply.info is not None and reply.info["phase"] == "cancelled"
    assert not state.interrupt()  # over: nothing to interrupt

    early = runtime.CallState(3)
    assert early.interrupt()  # before it starts: it never starts
    ran = []
    reply = runtime.run_call(ran.append, (1,), {}, 1 << 20, state=early)
    assert reply.info is not None and reply.info["phase"] == "cancelled" and ran == []


def test_program_cache_is_lru_by_id(tmp_path: Path) -> None:
    store = ProgramStore(tmp_path / "store")
    try:
        specs = [
            store.put(f"p{i}", f"def p{i}():\n    return {i}\n", entry=f"p{i}") for i in range(3)
        ]
        cache = runtime.ProgramCache(size=2)
        for spec in specs:
            assert cache.build(spec)() == int(spec.name[1:])
        assert len(cache) == 2
        assert cache.get(specs[0].id) is None
        assert cache.get(specs[2].id) is not None
    finally:
        store.close()


def test_unknown_kinds_are_a_clear_error(tmp_path: Path) -> None:
    store = ProgramStore(tmp_path / "store")
    try:
        spec = store.put("p", "def p():\n    return 1\n")
        odd = dataclasses.replace(spec, kind="nonsense")
        with pytest.raises(TypeError, match="unknown kind 'nonsense'"):
            programs.build_program(odd)
        assert programs.builder_for("source") is not None
    finally:
        store.close()


def test_the_stream_proxies_survive_close_and_replacement() -> None:
    runtime.install_output_capture()

    def rude() -> str:
        print("a")  # noqa: T201
        sys.stdout.close()
        print("b")  # noqa: T201
        sys.stdout = None  # type: ignore[assignment]
        return "ok"

    reply = runtime.run_call(rude, (), {}, 1 << 20)
    assert cloudpickle.loads(reply.blob) == "ok" and reply.out == "a\nb\n"
    again = runtime.run_call(print, ("c",), {}, 1 << 20)
    assert again.out == "c\n"
