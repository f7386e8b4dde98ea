"""A template and its workers driven directly, as the pool drives them, without a pool.

:class:`Template` starts ``python -m dspool_jupyter.worker --control-fd N --config JSON``
exactly as the pool does (its own session, the config keys the pool sends, the pool's
owner token in its environment for the leak check), and :meth:`Template.spawn` asks it
for a worker over the SEQPACKET control socket, the worker's end of a socketpair riding
along by SCM_RIGHTS. :class:`Worker` speaks protocol frames to that worker: CALL,
INTERRUPT, STOP, and reads its replies. Tests use it to check the worker side of the
protocol (concurrency, interrupts, output capture) with real processes.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import cloudpickle

from dspool_jupyter import protocol
from dspool_jupyter.pool import OWNER_ENV
from dspool_jupyter.store import ProgramStore

__all__ = ["Reply", "Template", "Worker"]

START_TIMEOUT = 30.0  # seconds for the template's "ready" and a worker's HELLO


class Reply:
    """A worker's reply to one call: a value, or an error dict."""

    def __init__(self, kind: int, meta: tuple[Any, ...], blob: bytes) -> None:
        self.kind = kind
        self.call_id: int = meta[0]
        if kind == protocol.RESULT:
            self.ok = True
            self.info: dict[str, Any] = {}
            self.out, self.err = meta[1], meta[2]
            self.value = cloudpickle.loads(blob)
        else:
            self.ok = False
            self.info = meta[1]
            self.out, self.err = meta[2], meta[3]
            self.value = None
        self.at = time.monotonic()

    @property
    def phase(self) -> str | None:
        return self.info.get("phase") if not self.ok else None

    def __repr__(self) -> str:
        if self.ok:
            return f"<Reply {self.call_id} value={self.value!r}>"
        return f"<Reply {self.call_id} {self.info['phase']} {self.info['type']}>"


class Worker:
    """One worker's socket: send frames, collect replies."""

    def __init__(self, sock: socket.socket, worker_id: str) -> None:
        self.sock = sock
        self.worker_id = worker_id
        self.reader = protocol.FrameReader()
        self.pending: list[tuple[int, tuple[Any, ...], bytes]] = []
        self.pid = 0
        self.heartbeats: list[tuple[Any, ...]] = []

    def call(self, call_id: int, program_id: str, name: str, *args: Any, **kwargs: Any) -> None:
        blob = cloudpickle.dumps((args, kwargs))
        self.sock.sendall(protocol.encode_frame(protocol.CALL, (call_id, program_id, name), blob))

    def interrupt(self, call_id: int, reason: str = "cancel") -> None:
        self.sock.sendall(protocol.encode_frame(protocol.INTERRUPT, (call_id, reason)))

    def stop(self) -> None:
        self.sock.sendall(protocol.encode_frame(protocol.STOP, ()))

    def frame(self, timeout: float) -> tuple[int, tuple[Any, ...], bytes] | None:
        """The next frame other than a heartbeat; None on EOF. Fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                kind, meta, blob = self.pending.pop(0)
                if kind == protocol.HEARTBEAT:
                    self.heartbeats.append(meta)
                    continue
                return kind, meta, blob
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no frame from worker {self.worker_id} in {timeout} s")
            readable, _, _ = select.select([self.sock], [], [], left)
            if not readable:
                continue
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))

    def reply(self, timeout: float = 10.0) -> Reply:
        frame = self.frame(timeout)
        assert frame is not None, f"worker {self.worker_id} closed its socket"
        kind, meta, blob = frame
        assert kind in (protocol.RESULT, protocol.ERROR), f"unexpected frame {kind} {meta!r}"
        return Reply(kind, meta, blob)

    def replies(self, count: int, timeout: float = 10.0) -> dict[int, Reply]:
        deadline = time.monotonic() + timeout
        got: dict[int, Reply] = {}
        while len(got) < count:
            reply = self.reply(max(0.01, deadline - time.monotonic()))
            assert reply.call_id not in got, f"two replies to call {reply.call_id}"
            got[reply.call_id] = reply
        return got

    def close(self) -> None:
        self.sock.close()


class Template:
    """The template process, started as the pool starts it."""

    def __init__(self, store_dir: Path, **config: Any) -> None:
        self.store = ProgramStore(store_dir)
        self.token = uuid.uuid4().hex
        self.config: dict[str, Any] = {
            "parent_pid": os.getpid(),
            "store": str(store_dir),
            "anonymous_ttl": None,
            "preload": [],
            "sys_path": [p for p in sys.path if p],
            "heartbeat_interval": 1.0,
            "max_result_bytes": 256 << 20,
            "memory_limit": None,
            "concurrency": 1,
        }
        self.config.update(config)
        pool_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env[OWNER_ENV] = self.token
        env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dspool_jupyter.worker",
                    "--control-fd",
                    str(child_end.fileno()),
                    "--config",
                    json.dumps(self.config),
                ],
                pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            child_end.close()
        self.control = pool_end
        self.workers: list[Worker] = []
        self.exits: dict[str, int] = {}
        message = self.control_message(START_TIMEOUT)
        assert message["op"] == "ready", message
        assert not message["preload_errors"], message

    def control_message(self, timeout: float) -> dict[str, Any]:
        readable, _, _ = select.select([self.control], [], [], timeout)
        assert readable, f"no control message from the template in {timeout} s"
        received = protocol.recv_control(self.control)
        assert received is not None, "the template closed its control socket"
        message, fds = received
        for fd in fds:
            os.close(fd)
        if message["op"] == "exited":
            self.exits[message["worker_id"]] = message["returncode"]
        return message

    def wait_exit(self, worker_id: str, timeout: float = 10.0) -> int:
        """The exit status the template reports for ``worker_id``."""
        deadline = time.monotonic() + timeout
        while worker_id not in self.exits:
            self.control_message(max(0.01, deadline - time.monotonic()))
        return self.exits[worker_id]

    def define(self, name: str, program: Any, entry: str | None = None) -> str:
        return self.store.put(name, program, entry=entry).id

    def spawn(self, worker_id: str | None = None) -> Worker:
        worker_id = worker_id or f"w{len(self.workers) + 1}"
        pool_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            protocol.send_control(
                self.control, {"op": "spawn", "worker_id": worker_id}, [worker_end.fileno()]
            )
        finally:
            worker_end.close()
        worker = Worker(pool_end, worker_id)
        self.workers.append(worker)
        frame = worker.frame(START_TIMEOUT)
        assert frame is not None and frame[0] == protocol.HELLO, frame
        assert frame[1][0] == worker_id
        worker.pid = int(frame[1][1])
        return worker

    def close(self) -> None:
        """Stop the template (it stops its workers) and wait for it."""
        for worker in self.workers:
            worker.close()
        try:
            protocol.send_control(self.control, {"op": "stop"})
        except OSError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(5)
        self.control.close()
        self.store.close()
