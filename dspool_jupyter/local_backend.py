"""The local backend: worker processes on this machine, forked from a warm template.

The template (``python -m dspool_jupyter.worker``, its own session so the kernel's
Ctrl-C never reaches a worker) imports the preloads once and forks a worker for every
``spawn`` request; each worker talks to the pool over its own stream socketpair, whose
other end reaches it through the template (SCM_RIGHTS). One loop thread (``anyio.run``
on asyncio) serves every socket from loop callbacks: no task switch and no epoll
re-registration per call.

Deaths are seen from the process's exit, which the template reports with its exit
status, never from the socket alone (a program's forked helper may keep the socket open
after its worker died). The pool keeps a copy of each worker's end of its socketpair:
when a worker dies, the bytes still unread in its end tell exactly which calls it never
read; those go back to the queue, and only calls it may have started fail with
``WorkerCrashed``. That costs nothing per call (no acknowledgement frame).

At concurrency 1 a worker runs one call at a time; one more call may wait in its socket
behind a call known to be short (pipelining: it saves a round trip under load, and never
puts a call behind a long one while another worker is free). A running call is
interrupted with SIGINT, and a timeout kills and replaces the worker. At concurrency K
> 1 a worker runs up to K calls at once (threads, or its event loop for ``async def``
entries) and one call is interrupted with an ``INTERRUPT`` frame.

Large buffers of arguments and results travel as shared segments whose descriptors ride
with the frame (:mod:`~dspool_jupyter.shm`): the ``Placer`` here pickles a call's
arguments in the caller's thread (``Pool.submit``), :meth:`LocalBackend.send` attaches
the segments' descriptors, and replies may bring segments back. Descriptors are
ancillary data, so the byte counts above are unchanged; a frame waiting in the outbox
keeps its segments alive until it is sent.
"""

from __future__ import annotations

import array
import asyncio
import collections
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from . import protocol, shm
from .backend import BackendOptions, KillReason, WorkerSlot, call_locked_soon
from .errors import DspoolError

if TYPE_CHECKING:
    from .calls import Call
    from .dispatch import Dispatcher

__all__ = ["OWNER_ENV", "LocalBackend", "LocalWorker", "TemplateHandle", "kill_process_group"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0  # seconds close() waits for the template to stop its workers
TERMINATE_GRACE = 2.0  # seconds a SIGTERMed template gets to stop its workers' processes
PIPELINE_DEPTH = 2  # calls sent to a one-slot worker at once: one runs, one waits
PIPELINE_SHORT_CALL = 0.005  # seconds: only behind a program this fast may a call wait
DURATION_MEMORY = 4096  # programs whose typical run time the pool remembers
READ_CHUNK = 1 << 20  # bytes read from a worker socket at once
INBOX_CHECK = 1.0  # seconds between checks for commands whose wake-up was lost
RESIGNAL_INTERVAL = 0.1  # seconds between SIGINTs to a call that has not stopped yet
UNREAD_POLL_INTERVAL = 0.002  # seconds between looks at whether a worker read its call
OWNER_ENV = "DSPOOL_POOL_TOKEN"  # set in every pool process's environment (leak checks)


@dataclass(eq=False)
class TemplateHandle:
    """The template process and its control socket."""

    process: subprocess.Popen[bytes]
    control: socket.socket
    ready: bool = False


class _WithFds:
    """An outbox entry whose descriptors have not gone yet (they go with its first byte)."""

    __slots__ = ("segments", "view")

    def __init__(self, view: memoryview, segments: tuple[shm.Segment, ...]) -> None:
        self.view = view
        self.segments = segments


def _send_with_fds(sock: socket.socket, entry: _WithFds) -> int:
    fds = array.array("i", [segment.fd for segment in entry.segments])
    return sock.sendmsg([entry.view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


@dataclass(eq=False)
class LocalWorker(WorkerSlot):
    """A local worker process: its socket, the copy of its end, and what was sent."""

    sock: socket.socket | None = None
    peer: socket.socket | None = None  # our copy of the worker's end (see module doc)
    template: TemplateHandle | None = None
    outbox: collections.deque[memoryview | _WithFds] = field(default_factory=collections.deque)
    reader: protocol.FrameReader = field(default_factory=protocol.FrameReader)
    sent_bytes: int = 0
    reading: bool = False
    replace: bool = True
    exited: bool = False


def _unread_bytes(sock: socket.socket) -> int:
    """Bytes queued in ``sock`` that its reader has not read (SIOCINQ)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


def kill_process_group(process: subprocess.Popen[bytes], grace: float = TERMINATE_GRACE) -> None:
    """Stop the template: SIGTERM, then SIGKILL to its process group after ``grace`` s.

    Each worker is a process group of its own, so the template's group holds the template
    alone; SIGKILLed at once, it could not stop its workers' children (they would go to
    init). On SIGTERM it kills its workers, their groups and every orphan it adopted,
    then exits; its workers die with it in any case (their parent-death signal).
    """
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        pass


class LocalBackend:
    """Worker processes on this machine (see the module docstring)."""

    name = "local"
    direct_send = True

    def __init__(self, options: BackendOptions) -> None:
        if options.address is not None:
            raise ValueError("address= names a Dask scheduler: use it with backend='dask'")
        self.target = options.target
        self.concurrency = options.concurrency
        self.config: dict[str, Any] = {
            "store": options.store_dir,
            "anonymous_ttl": options.anonymous_ttl,
            "preload": options.preload,
            "sys_path": [p for p in sys.path if p],
            "heartbeat_interval": options.heartbeat_interval,
            "max_result_bytes": options.max_result_bytes,
            "memory_limit": options.memory_limit,
            "concurrency": options.concurrency,
            "shared_memory_threshold": options.shared_memory_threshold,
        }
        threshold = options.shared_memory_threshold
        self.placer = None if threshold is None else shm.Placer(threshold, self._on_shm_fallback)
        self.bytes_sent = 0  # bytes written into worker sockets
        self.bytes_received = 0  # bytes read from worker sockets
        self.bytes_shared = 0  # bytes of arguments and results that went as segments
        self._read_buffer = memoryview(bytearray(READ_CHUNK))  # loop thread only
        self.token = options.token
        self.env_extra: dict[str, str] = dict(options.env)
        self.d: Dispatcher | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._thread: threading.Thread | None = None
        self._stop: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._template: TemplateHandle | None = None
        self._template_failures = 0
        self._startup_failures = 0
        self._numbers = iter(range(1, 1 << 62))
        self._durations: dict[str, float] = {}  # program id -> typical run time (s)
        self._started = threading.Event()
        # (wall time the current template started, seconds until it was ready): the
        # preload import as PoolStatus shows it; one tuple, so any thread reads a pair
        self.preload_times: tuple[float | None, float | None] = (None, None)

    # ------------------------------------------------------------ Backend API
    def start(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher
        self._thread = threading.Thread(target=self._thread_main, name="dspool-pool", daemon=True)
        self._thread.start()
        self._started.wait(10.0)

    def wake(self) -> None:
        # Any thread, without the lock. The flag goes up *before* the byte: a set flag
        # always means a byte is on its way, posted after the command, so the loop reads
        # that command after its next wake-up. (The byte first let a loop that had just
        # read it clear the flag before it went up: later posts sent nothing, and waited
        # for INBOX_CHECK.) An interrupt between the two lowers the flag again.
        try:
            if not self._wake_pending:
                self._wake_pending = True
                self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up byte is already pending, or the pool is gone
        except BaseException:
            self._wake_pending = False
            raise

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def call_soon(self, callback: object) -> None:
        assert callable(callback)
        call_locked_soon(self._loop, self._d().lock, callback)

    def transfer_counts(self) -> dict[str, int]:
        """The status snapshot's byte counters (see :class:`~.status.PoolStatus`)."""
        placer = self.placer
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_shared": self.bytes_shared,
            "bytes_placed": 0 if placer is None else placer.placed,
        }

    def _on_shm_fallback(self, message: str) -> None:
        d = self.d
        if d is not None:
            d.last_error = message

    def send(self, slot: WorkerSlot, call: Call) -> bool:
        assert isinstance(slot, LocalWorker)
        sock = slot.sock
        if sock is None or sock.fileno() == -1:
            return False
        segments = call.segments
        if segments:
            return self._send_with_segments(slot, sock, call, segments)
        frame = protocol.encode_frame(
            protocol.CALL, (call.id, call.program_id, call.program), call.blob
        )
        slot.sent_bytes += len(frame)
        self.bytes_sent += len(frame)
        call.handle = slot.sent_bytes  # where its frame ends in the worker's stream
        if slot.outbox:  # an earlier frame is still part-way out: keep the order
            slot.outbox.append(memoryview(frame))
            return True
        try:
            sent = sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            slot.sent_bytes -= len(frame)
            return False
        if sent < len(frame):
            slot.outbox.append(memoryview(frame)[sent:])
            if self.on_loop_thread():
                self._watch_writable(slot)
            else:
                self.call_soon(lambda: self._watch_writable(slot))
        return True

    def _send_with_segments(
        self,
        slot: LocalWorker,
        sock: socket.socket,
        call: Call,
        segments: tuple[shm.Segment, ...],
    ) -> bool:
        frame = protocol.encode_frame(
            protocol.CALL,
            (call.id, call.program_id, call.program),
            call.blob,
            tuple(segment.size for segment in segments),
        )
        entry = _WithFds(memoryview(frame), segments)
        slot.sent_bytes += len(frame)
        self.bytes_sent += len(frame)
        self.bytes_shared += sum(segment.size for segment in segments)
        call.handle = slot.sent_bytes
        if slot.outbox:
            slot.outbox.append(entry)
            return True
        try:
            sent = _send_with_fds(sock, entry)
        except BlockingIOError:
            sent = 0
        except OSError:
            slot.sent_bytes -= len(frame)
            return False
        if sent == 0:
            slot.outbox.append(entry)
        elif sent < len(frame):
            slot.outbox.append(entry.view[sent:])  # the descriptors went with byte one
        if sent < len(frame):
            if self.on_loop_thread():
                self._watch_writable(slot)
            else:
                self.call_soon(lambda: self._watch_writable(slot))
        return True

    def interrupt(self, slot: WorkerSlot, call: Call) -> None:
        assert isinstance(slot, LocalWorker)
        if slot.slots > 1:
            reason = "cancel" if call.future.cancelled() else "timeout"
            frame = protocol.encode_frame(protocol.INTERRUPT, (call.id, reason))
            slot.sent_bytes += len(frame)
            self.bytes_sent += len(frame)
            self._send_raw(slot, frame)
        elif self.on_loop_thread():
            self._signal_call(slot, call)
        else:
            self.call_soon(lambda: self._signal_call(slot, call))

    def _signal_call(self, worker: LocalWorker, call: Call) -> None:
        """SIGINT ``worker`` while it runs ``call`` (one slot), until the call ends.

        A worker ignores SIGINT between calls, so a signal is sent only while the
        worker has read exactly up to the end of this call's frame: it runs this call
        (or has just replied and waits for a frame that is not there). Before it has
        read the frame, the signal waits; once it has read further, the call ended.
        """
        if worker.inflight.get(call.id) is not call or worker.pid is None:
            return
        consumed = self._consumed(worker)
        if consumed > call.handle:
            return
        if consumed == call.handle:
            try:
                os.kill(worker.pid, signal.SIGINT)
            except ProcessLookupError:
                return
        assert self._loop is not None
        delay = RESIGNAL_INTERVAL if consumed == call.handle else UNREAD_POLL_INTERVAL
        self._loop.call_later(delay, self._signal_call_locked, worker, call)

    def _signal_call_locked(self, worker: LocalWorker, call: Call) -> None:
        with self._d().lock:
            self._signal_call(worker, call)

    def _consumed(self, worker: LocalWorker) -> int:
        """How many bytes of its stream ``worker`` has read."""
        unsent = sum(
            len(entry.view if isinstance(entry, _WithFds) else entry) for entry in worker.outbox
        )
        unread = _unread_bytes(worker.peer) if worker.peer is not None else 0
        return worker.sent_bytes - unsent - unread

    def kill(self, slot: WorkerSlot, reason: KillReason) -> None:
        assert isinstance(slot, LocalWorker)
        if slot.state == "dead":
            return
        if slot.kill_reason is None:
            slot.kill_reason = reason
        if slot.state in ("idle", "busy", "starting") and slot.pid is not None:
            slot.state = "stopping"
        if slot.pid is not None:
            try:
                os.kill(slot.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            # Not forked yet: without its socket the child exits as soon as it starts.
            self._lost(slot)

    def may_pipeline(self, slot: WorkerSlot) -> bool:
        if slot.slots != 1 or not slot.inflight or len(slot.inflight) >= PIPELINE_DEPTH:
            return False
        last = next(reversed(slot.inflight.values()))
        # A call waits in a worker's socket only behind a call known to be short: behind
        # a long one it would wait even when another worker frees up (head-of-line), and
        # behind one with a timeout the worker may be killed for it.
        return (
            last.timeout is None
            and self._durations.get(last.program_id, PIPELINE_SHORT_CALL) < PIPELINE_SHORT_CALL
            and (not last.started or time.monotonic() - last.started < PIPELINE_SHORT_CALL)
        )

    def replace(self, slot: WorkerSlot) -> None:
        assert isinstance(slot, LocalWorker)
        slot.replace = False
        self._spawn_worker(replacing=slot.id)

    def restart_all(self) -> None:
        d = self._d()
        for worker in list(d.workers.values()):
            assert isinstance(worker, LocalWorker)
            if worker.state != "dead":
                worker.replace = False
                self.kill(worker, "restart")
        template = self._template
        if template is not None:
            self._template = None
            try:
                protocol.send_control(template.control, {"op": "stop"})
            except OSError:
                pass
        self._start_template()
        for _ in range(self.target):
            self._spawn_worker()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        thread = self._thread
        if thread is None or threading.get_ident() == self._loop_thread:
            return
        thread.join(timeout + 2.0)
        if thread.is_alive():  # the loop is stuck: make sure nothing survives
            template = self._template
            if template is not None:
                kill_process_group(template.process)

    # ----------------------------------------------------------- loop thread
    def _d(self) -> Dispatcher:
        assert self.d is not None
        return self.d

    def _thread_main(self) -> None:
        d = self._d()
        try:
            anyio.run(self._main, backend="asyncio")
        except BaseException as exc:  # the pool must never take the kernel down
            log.exception("dspool pool loop stopped")
            d.fail_everything(DspoolError(f"the pool's dispatcher failed: {exc!r}"))
            template = self._template
            if template is not None:
                kill_process_group(template.process)
        finally:
            self._started.set()
            with d.lock:
                d.stopped = True
                d.closed = True
                d.ready_cond.notify_all()
            d.drain_unserved()
            for sock in (self._wake_r, self._wake_w):
                sock.close()

    async def _main(self) -> None:
        d = self._d()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._loop.add_reader(self._wake_r.fileno(), self._on_wake)
            try:
                with d.lock:
                    self._start_template()
                    for _ in range(self.target):
                        self._spawn_worker()
                tg.start_soon(d.supervisor.run)
                tg.start_soon(self._check_inbox)
                self._started.set()
                await self._stop.wait()
            finally:
                self._loop.remove_reader(self._wake_r.fileno())
                with anyio.CancelScope(shield=True):
                    await self._shutdown()
                tg.cancel_scope.cancel()

    def _on_wake(self) -> None:
        d = self._d()
        with d.lock:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
            # Cleared after draining the wake-up bytes and before reading the inbox, so a
            # command posted at any moment is either read below or sends a new byte.
            self._wake_pending = False
            d.drain()
            if d.stopped and self._stop is not None:
                self._stop.set()

    async def _check_inbox(self) -> None:
        # A post interrupted between its append and its wake-up byte is served here.
        while True:
            await anyio.sleep(INBOX_CHECK)
            if self._d().inbox:
                self._on_wake()

    # -- template and worker processes
    def _start_template(self) -> None:
        pool_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env[OWNER_ENV] = self.token
        env.update(self.env_extra)
        # Offline by default: litellm (under dspy) must not fetch its price map at import.
        env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        config = dict(self.config, parent_pid=os.getpid())
        started_at = time.time()
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dspool_jupyter.worker",
                    "--control-fd",
                    str(child_end.fileno()),
                    "--config",
                    json.dumps(config),
                ],
                pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=os.getcwd(),
                # Its own session: the kernel's interrupt (SIGINT to its process group)
                # must not reach the workers; cancellation is the pool's job.
                start_new_session=True,
            )
        finally:
            child_end.close()
        pool_end.setblocking(False)
        template = TemplateHandle(process=process, control=pool_end)
        self.preload_times = (started_at, None)
        self._template = template
        assert self._loop is not None
        self._loop.add_reader(pool_end.fileno(), self._on_control_readable, template)

    def _on_control_readable(self, template: TemplateHandle) -> None:
        with self._d().lock:
            while True:
                try:
                    received = protocol.recv_control(template.control)
                except BlockingIOError:
                    return
                except (OSError, protocol.ProtocolError):
                    received = None
                if received is None:
                    assert self._loop is not None
                    self._loop.remove_reader(template.control.fileno())
                    self._on_template_lost(template)
                    return
                message, fds = received
                for fd in fds:
                    os.close(fd)
                try:
                    self._on_control(template, message)
                except Exception:
                    log.exception("dspool pool failed on a template message")

    def _on_control(self, template: TemplateHandle, message: dict[str, Any]) -> None:
        d = self._d()
        op = message.get("op")
        if op == "ready":
            template.ready = True
            started_at = self.preload_times[0]
            if template is self._template and started_at is not None:
                self.preload_times = (started_at, max(0.0, time.time() - started_at))
            self._template_failures = 0
            errors = message.get("preload_errors") or []
            if errors:
                d.last_error = "; ".join(errors)
                log.warning("dspool: %s", d.last_error)
        elif op == "spawned":
            worker = d.workers.get(message["worker_id"])
            if isinstance(worker, LocalWorker) and worker.pid is None:
                worker.pid = int(message["pid"])
        elif op == "exited":
            worker = d.workers.get(message["worker_id"])
            if isinstance(worker, LocalWorker) and worker.template is template:
                worker.returncode = int(message["returncode"])
                worker.exited = True
                self._lost(worker)

    def _on_template_lost(self, template: TemplateHandle) -> None:
        template.control.close()
        try:
            template.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            kill_process_group(template.process)
        d = self._d()
        # Its workers die with it (parent-death signal) and nobody reports their exit.
        for worker in list(d.workers.values()):
            if isinstance(worker, LocalWorker) and worker.template is template:
                if worker.pid is not None:
                    try:
                        os.kill(worker.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if worker.kill_reason is None and not d.stopped and worker.state == "starting":
                    worker.kill_reason = "crashed"
                self._lost(worker)
        if self._template is not template:
            return
        self._template = None
        if d.stopped:
            return
        self._template_failures += 1
        if not template.ready:
            d.last_error = (
                f"the worker template exited during start-up "
                f"(code {template.process.returncode}); see the kernel's log"
            )
        log.warning(
            "dspool: worker template exited (code %s); restarting", template.process.returncode
        )
        failures = self._template_failures
        delay = 0.0 if failures <= 1 else min(5.0, 0.25 * 2 ** (failures - 2))
        assert self._tg is not None
        self._tg.start_soon(self._restart_template_later, delay)

    async def _restart_template_later(self, delay: float) -> None:
        if delay:
            await anyio.sleep(delay)
        d = self._d()
        with d.lock:
            if d.stopped or self._template is not None:
                return
            self._start_template()
            for _ in range(self._workers_wanted()):
                self._spawn_worker()

    def _workers_wanted(self) -> int:
        d = self._d()
        live = sum(1 for w in d.workers.values() if w.state != "dead" and not w.retiring)
        return self.target - live

    def _spawn_worker(self, replacing: str | None = None) -> LocalWorker | None:
        d = self._d()
        if d.stopped:
            return None
        template = self._template
        if template is None:
            return None  # the template is restarting; it spawns what is missing
        number = next(self._numbers)
        pool_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = LocalWorker(
            id=f"w{number}",
            started_at=time.time(),
            start_mono=time.monotonic(),
            slots=self.concurrency,
            sock=pool_end,
            peer=worker_end,
            template=template,
        )
        try:
            protocol.send_control(
                template.control, {"op": "spawn", "worker_id": worker.id}, [worker_end.fileno()]
            )
        except OSError as exc:
            log.warning("dspool: could not ask the template for a worker: %s", exc)
            pool_end.close()
            worker_end.close()
            return None
        pool_end.setblocking(False)
        worker_end.setblocking(False)
        d.add_worker(worker, replacing)
        assert self._loop is not None
        self._loop.add_reader(pool_end.fileno(), self._on_worker_readable, worker)
        worker.reading = True
        return worker

    def _on_worker_readable(self, worker: LocalWorker) -> None:
        d = self._d()
        with d.lock:
            sock = worker.sock
            if sock is None:
                return
            try:
                while worker.state != "dead":
                    buffer = self._read_buffer
                    try:
                        n, fds = protocol.recv_some(sock, buffer)
                    except BlockingIOError:
                        return
                    if not n:
                        shm.close_attached([(fd, 0) for fd in fds])
                        break
                    self.bytes_received += n
                    for kind, meta, blob in worker.reader.feed(buffer[:n], fds):
                        self._on_frame(worker, kind, meta, blob)
            except OSError:
                pass
            except protocol.ProtocolError as exc:
                d.last_error = f"worker {worker.id} broke the protocol: {exc}"
                self.kill(worker, "crashed")
                return
            except Exception:
                log.exception("dspool pool failed on a message from worker %s", worker.id)
                return
            # The worker closed its socket: it is exiting (its exit status tells how).
            self._stop_reading(worker)

    def _on_frame(self, worker: LocalWorker, kind: int, meta: tuple[Any, ...], blob: bytes) -> None:
        d = self._d()
        attached = protocol.attached(meta)
        if attached and kind != protocol.RESULT:
            shm.close_attached(attached)  # only results bring segments back
            attached = protocol.Attached()
        if kind == protocol.RESULT or kind == protocol.ERROR:
            call = d.release(worker, meta[0])
            if call is None:
                shm.close_attached(attached)
                return  # a reply to a call this worker no longer runs: never hand it on
            call.segments = ()
            self._learn_duration(call)
            if kind == protocol.RESULT:
                if attached:
                    self.bytes_shared += sum(size for _fd, size in attached)
                d.settle_value(worker, call, blob, meta[1], meta[2], meta[3], attached)
            else:
                d.settle_error(worker, call, meta[1], blob, meta[2], meta[3], meta[4])
        elif kind == protocol.HEARTBEAT:
            worker.rss = meta[0]
            worker.last_heartbeat = time.time()
        elif kind == protocol.HELLO:
            self._startup_failures = 0
            d.worker_ready(worker, int(meta[1]))
        elif kind == protocol.FATAL:
            d.last_error = f"worker {worker.id} could not start: {meta[0]}"
            log.warning("dspool: %s", d.last_error)
        else:
            raise protocol.ProtocolError(f"unexpected frame kind {kind}")

    def _learn_duration(self, call: Call) -> None:
        if not call.started:
            return
        elapsed = time.monotonic() - call.started
        durations = self._durations
        typical = durations.get(call.program_id)
        if typical is None and len(durations) >= DURATION_MEMORY:
            durations.clear()
        durations[call.program_id] = elapsed if typical is None else 0.7 * typical + 0.3 * elapsed

    def _send_raw(self, worker: LocalWorker, frame: bytes) -> None:
        sock = worker.sock
        if sock is None or sock.fileno() == -1:
            return
        if worker.outbox:
            worker.outbox.append(memoryview(frame))
            return
        try:
            sent = sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            return
        if sent < len(frame):
            worker.outbox.append(memoryview(frame)[sent:])
            self._watch_writable(worker)

    def _watch_writable(self, worker: LocalWorker) -> None:
        sock = worker.sock
        if worker.outbox and sock is not None and sock.fileno() != -1:
            assert self._loop is not None
            self._loop.add_writer(sock.fileno(), self._on_worker_writable, worker)

    def _on_worker_writable(self, worker: LocalWorker) -> None:
        with self._d().lock:
            sock = worker.sock
            if sock is None:
                return
            while worker.outbox:
                entry = worker.outbox[0]
                view = entry.view if isinstance(entry, _WithFds) else entry
                try:
                    if isinstance(entry, _WithFds):
                        sent = _send_with_fds(sock, entry)
                    else:
                        sent = sock.send(view)
                except BlockingIOError:
                    return
                except OSError:
                    worker.outbox.clear()
                    break
                if sent < len(view):
                    worker.outbox[0] = view[sent:]
                    return
                worker.outbox.popleft()
            assert self._loop is not None
            self._loop.remove_writer(sock.fileno())

    def _stop_reading(self, worker: LocalWorker) -> None:
        sock = worker.sock
        if sock is not None and worker.reading and sock.fileno() != -1:
            assert self._loop is not None
            self._loop.remove_reader(sock.fileno())
        worker.reading = False

    def _close_sockets(self, worker: LocalWorker) -> None:
        self._stop_reading(worker)
        sock, peer = worker.sock, worker.peer
        worker.sock = worker.peer = None
        worker.reader.close()
        if sock is not None and sock.fileno() != -1:
            if worker.outbox:
                assert self._loop is not None
                self._loop.remove_writer(sock.fileno())
                worker.outbox.clear()
            sock.close()
        if peer is not None:
            peer.close()

    def _lost(self, worker: LocalWorker) -> None:
        """``worker`` is gone (its exit seen, or it never forked): settle and replace it."""
        d = self._d()
        if worker.state == "dead":
            return
        # What the worker read of its stream: every call whose frame ends there or
        # before reached it (and may have started); the rest it never saw.
        consumed = self._consumed(worker)
        for call in worker.inflight.values():
            call.acked = isinstance(call.handle, int) and call.handle <= consumed
        failed_start = worker.state == "starting" and worker.kill_reason is None
        self._close_sockets(worker)
        d.worker_lost(worker)
        d.report_lost(worker)
        if d.stopped or not worker.replace:
            return
        if failed_start:
            self._startup_failures += 1
        if self._startup_failures >= 3:
            delay = min(5.0, 0.1 * 2 ** (self._startup_failures - 3))
            assert self._tg is not None
            self._tg.start_soon(self._spawn_later, delay, worker.id)
        else:
            self._spawn_worker(replacing=worker.id)
        d.feed_all()

    async def _spawn_later(self, delay: float, replacing: str) -> None:
        await anyio.sleep(delay)
        with self._d().lock:
            if self._workers_wanted() > 0:
                self._spawn_worker(replacing=replacing)

    async def _shutdown(self) -> None:
        d = self._d()
        with d.lock:
            d.stopped = True
            template = self._template
            if template is not None:
                try:
                    protocol.send_control(template.control, {"op": "stop"})
                except OSError:
                    pass
        if template is not None:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                while template.process.poll() is None:
                    await anyio.sleep(0.01)
        with d.lock:
            if template is not None:
                if template.process.poll() is None:
                    kill_process_group(template.process)
                if template.control.fileno() != -1:
                    assert self._loop is not None
                    self._loop.remove_reader(template.control.fileno())
                    template.control.close()
            for worker in list(d.workers.values()):
                if isinstance(worker, LocalWorker):
                    self._close_sockets(worker)
            d.end_shutdown()
            if self.placer is not None:
                self.placer.clear()
