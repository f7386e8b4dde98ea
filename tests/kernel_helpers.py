"""A real Jupyter kernel for tests, spoken to over jupyter_client the way a frontend does.

``running_kernel(tmp)`` starts an ipykernel whose pools use a private store under
``tmp``, records the token of every pool started in it, and on exit shuts the kernel
down and fails if any process of those pools is still alive.
"""

from __future__ import annotations

import ast
import os
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import assert_no_leftovers

# Runs first in every test kernel: remember the token of every pool started in it.
TRACK_POOLS = """
from dspool_jupyter.pool import on_current_pool_changed as _on_changed
_dspool_tokens = []
def _dspool_track(pool):
    if pool is not None and pool.token not in _dspool_tokens:
        _dspool_tokens.append(pool.token)
_on_changed(_dspool_track)
del _on_changed
"""


@dataclass
class Execution:
    """One cell's execution: its reply and the IOPub messages that name it as parent."""

    msg_id: str
    reply: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.reply.get("status") == "ok")

    @property
    def error(self) -> tuple[str, str, list[str]]:
        """``(ename, evalue, traceback)`` of a failed cell."""
        return self.reply.get("ename", ""), self.reply.get("evalue", ""), self.reply["traceback"]

    def outputs(self, kind: str) -> list[dict[str, Any]]:
        return [m["content"] for m in self.messages if m["header"]["msg_type"] == kind]

    def stream(self, name: str = "stdout") -> str:
        return "".join(c["text"] for c in self.outputs("stream") if c["name"] == name)

    @property
    def result(self) -> str | None:
        """The ``text/plain`` of the cell's value (``Out[n]``), if any."""
        results = self.outputs("execute_result")
        return str(results[-1]["data"]["text/plain"]) if results else None

    @property
    def displays(self) -> list[dict[str, Any]]:
        return self.outputs("display_data")


class Kernel:
    """A started kernel: ``run`` a cell, read values, watch every IOPub message."""

    def __init__(self, km: Any, kc: Any) -> None:
        self.km = km
        self.kc = kc
        self.iopub: list[dict[str, Any]] = []  # every IOPub message, whatever its parent
        self._executions: dict[str, Execution] = {}

    def submit(self, code: str) -> Execution:
        """Send a cell without waiting for it."""
        execution = Execution(self.kc.execute(code))
        self._executions[execution.msg_id] = execution
        return execution

    def wait(self, execution: Execution, timeout: float = 30) -> Execution:
        """Wait for the cell's reply and for its IOPub 'idle'."""
        deadline = time.monotonic() + timeout
        while not execution.reply:
            reply = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            done = self._executions.get(reply["parent_header"].get("msg_id"))
            if done is not None:
                done.reply = reply["content"]
        while not any(
            m["header"]["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
            for m in execution.messages
        ):
            if time.monotonic() > deadline:
                raise AssertionError(f"no idle status for the cell within {timeout} s")
            self.pump(0.05)
        return execution

    def run(self, code: str, timeout: float = 30, ok: bool | None = True) -> Execution:
        """Run a cell; with ``ok`` True (False) fail the test unless it succeeded (failed)."""
        execution = self.wait(self.submit(code), timeout)
        if ok is True:
            assert execution.ok, (code, execution.reply, execution.stream("stderr"))
        elif ok is False:
            assert not execution.ok, (code, execution.messages)
        return execution

    def value(self, expression: str) -> Any:
        """Evaluate ``expression`` in the kernel; its repr is read back as a literal."""
        execution = self.run(f"__dspool_value = repr({expression})")
        assert execution.ok
        reply = self.kc.execute("", silent=True, user_expressions={"v": "__dspool_value"})
        deadline = time.monotonic() + 10
        while True:
            msg = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == reply:
                break
        text = msg["content"]["user_expressions"]["v"]["data"]["text/plain"]
        return ast.literal_eval(ast.literal_eval(text))

    def pump(self, timeout: float = 0.1) -> None:
        """Read IOPub messages for up to ``timeout`` seconds (at least one poll)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            msg["received"] = time.monotonic()
            self.iopub.append(msg)
            execution = self._executions.get(msg["parent_header"].get("msg_id"))
            if execution is not None:
                execution.messages.append(msg)
            if time.monotonic() >= deadline:
                return

    def wait_for_message(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10, start: int = 0
    ) -> dict[str, Any]:
        """The first IOPub message (from index ``start``) that matches; waits for it."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.iopub):
                if predicate(self.iopub[index]):
                    return self.iopub[index]
                index += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching IOPub message within {timeout} s")
            self.pump(0.05)

    def tokens(self) -> list[str]:
        return list(self.value("_dspool_tokens"))


@contextmanager
def running_kernel(tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[Kernel]:
    """A kernel with a private pool store; no pool process may outlive it."""
    from jupyter_client.manager import KernelManager

    env = {
        **os.environ,
        "DSPOOL_STORE": str(tmp / "store"),
        "XDG_CACHE_HOME": str(tmp / "cache"),
        **(extra_env or {}),
    }
    # over IPC (Unix sockets under tmp), not TCP: no port, no plain-text warning
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp / "kernel-ipc"))
    km.start_kernel(env=env, cwd=str(Path.cwd()))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
    except RuntimeError:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        raise
    kernel = Kernel(km, kc)
    tokens: list[str] = []
    try:
        kernel.run(TRACK_POOLS)
        yield kernel
        tokens = kernel.tokens()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
        if tokens:
            assert_no_leftovers(tokens, timeout=10)
