"""The child side: a warm template process that forks workers, and the worker loop.

Run as ``python -m dspool_jupyter.worker --control-fd N --config JSON`` by the pool.
The *template* imports the preload modules once, then forks a worker for every
``spawn`` request (forkserver-style), so N workers start in about the time of one even
when each needs a heavy import. It reaps its children and reports each exit code to the
pool. The template is single-threaded: forking from it is safe.

A *worker* resolves the program by id from the store and runs calls through
:mod:`dspool_jupyter.runtime` (programs cached by content-hash id, so a redefined
program is never stale; output captured per call; every outcome a reply). A program's
exception, an unpicklable result or a program that fails to load is a reply, never a
reason to exit.

**Calls at once** (config ``"concurrency": K``, default 1; the pool never sends more
than K calls at once):

- K = 1: the main thread reads a frame and runs the call itself (no thread hop on the
  hot path); the pool interrupts it with SIGINT, which only lands while the program
  runs. An INTERRUPT frame is ignored.
- K > 1: the main thread only reads frames. Plain functions run on a pool of K
  threads, ``async def`` entries on the worker's own event loop (one thread); replies
  are sent under a lock. ``INTERRUPT (call_id, reason)`` interrupts that call only:
  ``KeyboardInterrupt`` in its thread (``PyThreadState_SetAsyncExc``: it lands when the
  thread next runs Python code, so a blocking C call such as ``time.sleep(30)`` or a
  socket read finishes first; the pool's cancel grace covers that) or ``task.cancel()``
  for a task. The call replies ERROR with phase ``"cancelled"``. A queued call it names
  never starts; one for a call no longer running is ignored.
- In both, a ``KeyboardInterrupt`` the program raises itself is its error (phase
  ``"run"``): only the pool's interrupt is a cancel. HEARTBEAT's busy call id is the
  oldest running call.

**No process outlives its worker.** Each worker is its own process group and a child
subreaper (orphans of what its programs start become its children, for as long as it
lives). The template is a child subreaper too: when a worker exits it SIGKILLs the
worker's group (while the dead worker is still a zombie, so its group id cannot be
reused) and every orphan it has adopted (all of it came from a dead worker: a live
worker adopts its own); it looks again every :data:`PARENT_POLL_INTERVAL` seconds and,
at exit, kills all of it. The template dies with the pool's process by ``SIGTERM``
(``PR_SET_PDEATHSIG``, catchable, so a ``kill -9`` of the kernel still runs that
clean-up); a worker dies with the template by ``SIGKILL``. What can still escape: the
descendants of a template that is itself SIGKILLed from outside (its workers die, their
orphans go to init), a process that a program hands to another service (``systemd-run``,
``at``, a container runtime, a remote host), and a process that a program started in a
new PID namespace. A program calling ``setsid`` does not escape: the subreapers do not
care about sessions. Orphans a live worker adopted and that exit stay zombies until the
worker exits (reaping them would race with the program's own ``wait``).

**Memory.** With ``memory_limit`` (bytes) the worker sets ``RLIMIT_DATA`` and keeps an
emergency reserve (:func:`dspool_jupyter.runtime.reserve_memory`), so a blow-up is a
``MemoryError`` reply. When the worker cannot recover (the reserve cannot be taken
back, or more than 90 % of the limit is still in use after the failed call, e.g. held
by a global) it sends that reply and then exits with
:data:`dspool_jupyter.protocol.EXIT_OUT_OF_MEMORY`; out of memory outside a call it
exits with that code at once.

Signals are blocked across ``fork`` in the template, so a child that the closing
template SIGTERMs while it starts dies quietly instead of printing ``SystemExit``.

This module imports nothing of the kernel side (pool, magics, widgets).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import ctypes
import ctypes.util
import gc
import importlib
import inspect
import json
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

from . import protocol, runtime, shm
from .context import CallContext
from .errors import ProgramNotFound
from .store import ProgramStore

__all__ = ["main"]

SHUTDOWN_GRACE = 1.0  # seconds the template waits for workers after SIGTERM
PARENT_POLL_INTERVAL = 0.5  # seconds between checks that the parent is still there
PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- worker


class _Worker:
    def __init__(self, sock: socket.socket, worker_id: str, config: dict[str, Any]) -> None:
        self.sock = sock
        self.worker_id = worker_id
        self.config = config
        self.parent_pid = os.getppid()
        self.send_lock = threading.Lock()
        self.concurrency = int(config.get("concurrency") or 1)
        self.state: runtime.CallState | None = None  # the running call (concurrency 1)
        self.running: dict[int, runtime.CallState] = {}  # call id -> state (concurrency > 1)
        self.running_lock = threading.Lock()
        self.programs = runtime.ProgramCache()
        self.max_result_bytes: int = int(config["max_result_bytes"])
        self.store = ProgramStore(config["store"], anonymous_ttl=config.get("anonymous_ttl"))
        self.memory_limit = config.get("memory_limit")
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # [shm hook] descriptors received with frames, and the result threshold (bytes)
        self.fds: collections.deque[int] = collections.deque()
        self.shm_threshold: int | None = config.get("shared_memory_threshold")

    # -- plumbing
    def send(
        self,
        kind: int,
        meta: tuple[Any, ...],
        blob: bytes = b"",
        segments: list[shm.Segment] | None = None,
    ) -> None:
        if segments:  # [shm hook] a result's segments go with its frame, then are closed
            try:
                with self.send_lock:
                    protocol.send_frame(
                        self.sock,
                        kind,
                        meta,
                        blob,
                        [s.fd for s in segments],
                        tuple(s.size for s in segments),
                    )
            finally:
                for segment in segments:
                    segment.close()
            return
        with self.send_lock:
            protocol.send_frame(self.sock, kind, meta, blob)

    def reply(self, call_id: int, reply: runtime.Reply) -> None:
        try:
            if reply.info is None:
                meta: tuple[Any, ...] = (call_id, reply.out, reply.err, reply.usage)
                self.send(protocol.RESULT, meta, reply.blob, reply.segments)  # [shm hook]
            else:
                meta = (call_id, reply.info, reply.out, reply.err, reply.usage)
                self.send(protocol.ERROR, meta, reply.blob)
        except MemoryError:
            for segment in reply.segments:  # [shm hook] closed by send, unless it never ran
                segment.close()
            del reply
            self.send(protocol.ERROR, (call_id, _OUT_OF_MEMORY, "", "", None))  # small: may fit
        if self.memory_limit and runtime.memory_exhausted(int(self.memory_limit)):
            # The failed call's memory is still held (a global, a leak): every later call
            # would fail the same way. Exit; the pool replaces this worker.
            os._exit(protocol.EXIT_OUT_OF_MEMORY)

    def _on_sigint(self, signum: int, frame: types.FrameType | None) -> None:
        # Only a running program is interrupted; between calls SIGINT is a late cancel.
        state = self.state
        if state is not None and state.interruptible:
            state.cancelled = True
            raise KeyboardInterrupt

    def busy_call(self) -> int | None:
        """The running call's id (at concurrency > 1 the oldest running), or None."""
        state = self.state
        if state is not None:
            return state.call_id
        with self.running_lock:
            return min(self.running) if self.running else None

    def _heartbeat(self) -> None:
        interval = float(self.config["heartbeat_interval"])
        while True:
            time.sleep(min(interval, PARENT_POLL_INTERVAL))
            if os.getppid() != self.parent_pid:
                os._exit(0)  # the template is gone: so is the pool
            try:
                self.send(protocol.HEARTBEAT, (_rss_bytes(), self.busy_call()))
            except OSError:
                os._exit(0)  # the pool closed our socket
            except MemoryError:
                continue  # a call is at the memory limit; it gets the MemoryError
            if interval > PARENT_POLL_INTERVAL:
                time.sleep(interval - PARENT_POLL_INTERVAL)

    # -- calls
    def load(self, program_id: str, name: str) -> Callable[..., Any] | runtime.Reply:
        """The program, or the reply that says why it cannot run."""
        try:
            if not self.store.exists(program_id):
                return runtime.not_found_reply(name)
            fn = self.programs.get(program_id)
            if fn is None:
                fn = self.programs.build(self.store.get(program_id))
        except ProgramNotFound:
            return runtime.not_found_reply(name)
        except Exception as exc:
            return runtime.error_reply("load", exc)
        return fn

    def prepare(
        self,
        program_id: str,
        name: str,
        blob: bytes,
        attached: tuple[tuple[int, int], ...],
    ) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | runtime.Reply:
        """The program and its arguments, or the reply that says why the call cannot run
        (the frame's segments are closed either way: a view holds what it needs)."""
        fn = self.load(program_id, name)
        if isinstance(fn, runtime.Reply):
            shm.close_attached(attached)  # [shm hook]
            return fn
        try:
            args, kwargs = runtime.prepare_call(blob, attached)  # [shm hook] closes them
        except Exception as exc:
            return runtime.error_reply("args", exc)
        return fn, args, kwargs

    def handle_call(
        self,
        call_id: int,
        program_id: str,
        name: str,
        blob: bytes,
        attached: tuple[tuple[int, int], ...] = (),  # [shm hook] the frame's segments
    ) -> None:
        """Run one call in the main thread (concurrency 1); SIGINT interrupts it."""
        prepared = self.prepare(program_id, name, blob, attached)
        if isinstance(prepared, runtime.Reply):
            self.reply(call_id, prepared)
            return
        fn, args, kwargs = prepared
        state = runtime.CallState(call_id)
        context = CallContext(call_id, name, self.worker_id)
        self.state = state
        try:
            reply = runtime.run_call(
                fn,
                args,
                kwargs,
                self.max_result_bytes,
                context,
                state,
                solo=True,
                shm_threshold=self.shm_threshold,  # [shm hook]
            )
        finally:
            self.state = None
        self.reply(call_id, reply)

    def serve(self) -> None:
        runtime.install_output_capture()
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._heartbeat, name="dspool-heartbeat", daemon=True).start()
        if self.concurrency > 1:
            self._start_many()
        self.send(protocol.HELLO, (self.worker_id, os.getpid()))
        while True:
            try:
                frame = protocol.recv_frame(self.sock, self.fds)  # [shm hook] fds too
            except KeyboardInterrupt:
                continue  # a cancel that arrived after its call finished
            if frame is None:
                return
            kind, meta, blob = frame
            # [shm hook] the segments ((fd, size), ...) that came with the frame
            attached = protocol.attached(meta)
            if kind == protocol.CALL:
                call_id, program_id, name = meta[:3]
                if self.concurrency == 1:
                    self.handle_call(call_id, program_id, name, blob, attached)
                else:
                    self._submit(call_id, program_id, name, blob, attached)
                continue
            shm.close_attached(attached)  # only a call's frame carries segments
            if kind == protocol.INTERRUPT:
                with self.running_lock:
                    state = self.running.get(meta[0])
                if state is not None:
                    state.interrupt()
            elif kind == protocol.STOP:
                return
            else:
                raise protocol.ProtocolError(f"unexpected frame kind {kind}")

    # -- many calls at once (concurrency > 1)
    def _start_many(self) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(
            self.concurrency, thread_name_prefix="dspool-call"
        )
        loop = asyncio.new_event_loop()
        self.loop = loop
        threading.Thread(target=loop.run_forever, name="dspool-asyncio", daemon=True).start()

    def _submit(
        self,
        call_id: int,
        program_id: str,
        name: str,
        blob: bytes,
        attached: tuple[tuple[int, int], ...] = (),  # [shm hook] the frame's segments
    ) -> None:
        assert self.executor is not None
        state = runtime.CallState(call_id)
        with self.running_lock:
            self.running[call_id] = state
        self.executor.submit(self._thread_call, state, program_id, name, blob, attached)

    def _finish(self, state: runtime.CallState, reply: runtime.Reply) -> None:
        with self.running_lock:
            self.running.pop(state.call_id, None)
        self.reply(state.call_id, reply)

    def _thread_call(
        self,
        state: runtime.CallState,
        program_id: str,
        name: str,
        blob: bytes,
        attached: tuple[tuple[int, int], ...] = (),  # [shm hook] the frame's segments
    ) -> None:
        try:
            prepared = self.prepare(program_id, name, blob, attached)
            if isinstance(prepared, runtime.Reply):
                self._finish(state, prepared)
                return
            fn, args, kwargs = prepared
            context = CallContext(state.call_id, name, self.worker_id)
            if _is_async(fn):
                assert self.loop is not None
                state.loop = self.loop
                asyncio.run_coroutine_threadsafe(
                    self._async_call(state, fn, args, kwargs, context), self.loop
                )
                return
            state.thread_id = threading.get_ident()
            reply = runtime.run_call(
                fn,
                args,
                kwargs,
                self.max_result_bytes,
                context,
                state,
                shm_threshold=self.shm_threshold,  # [shm hook]
            )
            self._finish(state, reply)
        except MemoryError:
            os._exit(protocol.EXIT_OUT_OF_MEMORY)
        except BaseException as exc:  # a reply for every call, whatever broke
            self._finish(state, runtime.error_reply("run", exc))

    async def _async_call(
        self,
        state: runtime.CallState,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: CallContext,
    ) -> None:
        state.task = asyncio.current_task()
        try:
            reply = await runtime.arun_call(
                fn,
                args,
                kwargs,
                self.max_result_bytes,
                context,
                state,
                shm_threshold=self.shm_threshold,  # [shm hook]
            )
        except BaseException as exc:  # a reply for every call, whatever broke
            reply = runtime.error_reply("run", exc)
        self._finish(state, reply)


_OUT_OF_MEMORY = {
    "phase": "run",
    "type": "MemoryError",
    "message": "out of memory (the worker's memory limit); the reply could not be built",
    "traceback": "",
}


def _is_async(fn: Any) -> bool:
    """True for an ``async def`` function (or an object whose ``__call__`` is one)."""
    if inspect.iscoroutinefunction(fn):
        return True
    method = getattr(type(fn), "__call__", None)  # noqa: B004 - the method, not callable()
    return inspect.iscoroutinefunction(method)


def _worker_main(fd: int, worker_id: str, config: dict[str, Any], template_pid: int) -> int:
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != template_pid:
        return 0  # the template died before we could ask to die with it
    # Orphans of what a program starts stay this worker's until it exits; then the
    # template (a subreaper too) adopts and kills them.
    _set_child_subreaper()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    limit = config.get("memory_limit")
    if limit:
        # A program that blows up its memory gets MemoryError (a reply), not the OOM killer.
        resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
        runtime.reserve_memory()
    try:
        worker = _Worker(sock, worker_id, config)
    except Exception as exc:
        try:
            protocol.send_frame(sock, protocol.FATAL, (f"{type(exc).__name__}: {exc}",))
        except OSError:
            pass
        return 1
    try:
        worker.serve()
    except MemoryError:
        return protocol.EXIT_OUT_OF_MEMORY  # out of memory outside a call: cannot go on
    return 0


# ------------------------------------------------------------------------- template


class _Template:
    def __init__(self, control: socket.socket, config: dict[str, Any]) -> None:
        self.control = control
        self.config = config
        self.children: dict[int, str] = {}
        self.parent_pid = os.getppid()
        self.pid = os.getpid()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def preload(self) -> list[str]:
        errors = []
        for name in self.config.get("preload", []):
            try:
                importlib.import_module(name)
            except BaseException as exc:  # an import that exits must not end the template
                errors.append(f"preload {name!r} failed: {type(exc).__name__}: {exc}")
        return errors

    def spawn(self, worker_id: str, fd: int) -> None:
        # Signals stay blocked across fork: a SIGTERM must not run the template's
        # handler (SystemExit) in the child while Python's after-fork hooks run.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    self.control.close()
                    os.close(self.wake_r)
                    os.close(self.wake_w)
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    os.setpgid(0, 0)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
                    code = _worker_main(fd, worker_id, self.config, self.pid)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            try:
                os.setpgid(pid, pid)  # also here: whichever runs first, the group exists
            except OSError:
                pass
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
        os.close(fd)
        self.children[pid] = worker_id
        protocol.send_control(self.control, {"op": "spawned", "worker_id": worker_id, "pid": pid})

    def reap(self) -> None:
        """Collect exited children: report workers, kill what a dead worker left behind."""
        while True:
            try:
                # WNOWAIT: the dead worker stays a zombie, so its pid (and process group
                # id) cannot be reused before its group is killed.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            worker_id = self.children.get(pid)
            if worker_id is not None:
                _kill_group(pid)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            if worker_id is None:
                continue  # an orphan this template adopted and killed
            del self.children[pid]
            self.sweep()
            returncode = os.waitstatus_to_exitcode(status)
            try:
                protocol.send_control(
                    self.control,
                    {"op": "exited", "worker_id": worker_id, "pid": pid, "returncode": returncode},
                )
            except OSError:
                pass

    def sweep(self) -> int:
        """SIGKILL every child that is not a worker (orphans of dead workers); how many."""
        killed = 0
        for pid in _children_of(self.pid):
            if pid in self.children:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        return killed

    def shutdown(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
        for pid in list(self.children):
            _kill_group(pid)
        # Workers and their groups are gone; what left the groups was adopted by this
        # template (a child subreaper) or will be when its parent dies: kill it too.
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline:
            self.children.clear()
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            if not self.sweep() and not _children_of(self.pid):
                break
            time.sleep(0.01)

    def serve(self) -> int:
        _set_child_subreaper()
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            started = time.monotonic()
            errors = self.preload()
            # What the template imported is shared with every worker; keep the collector
            # off it so that a worker's first collection does not copy those pages (CoW).
            gc.freeze()
            protocol.send_control(
                self.control,
                {
                    "op": "ready",
                    "pid": self.pid,
                    "preload_errors": errors,
                    "preload_seconds": time.monotonic() - started,
                },
            )
            last_sweep = time.monotonic()
            while True:
                try:
                    readable, _, _ = select.select(
                        [self.control.fileno(), self.wake_r], [], [], PARENT_POLL_INTERVAL
                    )
                except InterruptedError:
                    continue
                if self.wake_r in readable:
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                if self.control.fileno() in readable:
                    received = protocol.recv_control(self.control)
                    if received is None:
                        return 0  # the pool is gone
                    message, fds = received
                    op = message.get("op")
                    if op == "spawn" and fds:
                        self.spawn(str(message["worker_id"]), fds[0])
                    elif op == "stop":
                        return 0
                if os.getppid() != self.parent_pid:
                    return 0
                self.reap()
                now = time.monotonic()
                if now - last_sweep > PARENT_POLL_INTERVAL:
                    last_sweep = now
                    self.sweep()
        finally:
            self.shutdown()


_FORK_BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
PR_SET_CHILD_SUBREAPER = 36


def _set_child_subreaper() -> None:
    """Orphans of this process's descendants become its children (Linux; no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _children_of(pid: int) -> list[int]:
    """Pids of ``pid``'s live children (Linux ``/proc``; empty where it is missing)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspool_jupyter.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config", required=True, help="JSON: store, preload, sys_path, ...")
    args = parser.parse_args(argv)
    # The template dies with the pool's thread that started it (the kernel), by a signal
    # it can catch: it kills its workers and what they started before it goes.
    _set_parent_death_signal(signal.SIGTERM)
    config = json.loads(args.config)
    if os.getppid() != int(config["parent_pid"]):
        return 0
    for entry in reversed(config.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    control = socket.socket(fileno=args.control_fd)
    control.setblocking(True)
    return _Template(control, config).serve()


if __name__ == "__main__":
    sys.exit(main())
