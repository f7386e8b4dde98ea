"""The child side: a warm template process that forks workers, and the worker loop.

Run as ``python -m dspool_jupyter.worker --control-fd N --config JSON`` by the pool.
The *template* imports the preload modules once, then forks a worker for every
``spawn`` request (forkserver-style), so N workers start in about the time of one even
when each needs a heavy import. It reaps its children and reports each exit code to the
pool. The template is single-threaded: forking from it is safe.

A *worker* resolves the program by id from the store, caches the compiled program by
its content-hash id (a redefined program has a new id, so the cache is never stale),
runs the call and replies with the value or the error and its traceback. A program's
exception, an unpicklable result or a program that fails to load is a reply, never a
reason to exit. A worker exits when told to, when its socket closes, or when its parent
is gone: on Linux the kernel kills it (``PR_SET_PDEATHSIG``) when the template dies, and
the template likewise dies with the pool's process, so no worker outlives the kernel,
even after ``kill -9``. A heartbeat thread reports memory and watches the parent where
no death signal exists.

This module imports nothing of the kernel side (pool, magics, widgets).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import gc
import importlib
import io
import json
import linecache
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
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import protocol, shm
from .errors import ProgramNotFound
from .store import ProgramSpec, ProgramStore

__all__ = ["main"]

PROGRAM_CACHE_SIZE = 256  # compiled programs kept per worker
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
        self.in_call = False
        self.current_call: int | None = None
        self.programs: OrderedDict[str, Callable[..., Any]] = OrderedDict()
        self.max_result_bytes: int = int(config["max_result_bytes"])
        self.store = ProgramStore(config["store"], anonymous_ttl=config.get("anonymous_ttl"))
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

    def _on_sigint(self, signum: int, frame: types.FrameType | None) -> None:
        # Only a running program is interrupted; between calls SIGINT is a late cancel.
        if self.in_call:
            raise KeyboardInterrupt

    def _heartbeat(self) -> None:
        interval = float(self.config["heartbeat_interval"])
        while True:
            time.sleep(min(interval, PARENT_POLL_INTERVAL))
            if os.getppid() != self.parent_pid:
                os._exit(0)  # the template is gone: so is the pool
            try:
                self.send(protocol.HEARTBEAT, (_rss_bytes(), self.current_call))
            except OSError:
                os._exit(0)  # the pool closed our socket
            if interval > PARENT_POLL_INTERVAL:
                time.sleep(interval - PARENT_POLL_INTERVAL)

    # -- programs
    def _load(self, program_id: str) -> Callable[..., Any]:
        fn = self.programs.get(program_id)
        if fn is not None:
            self.programs.move_to_end(program_id)
            return fn
        spec = self.store.get(program_id)
        fn = build_program(spec)
        self.programs[program_id] = fn
        if len(self.programs) > PROGRAM_CACHE_SIZE:
            self.programs.popitem(last=False)
        return fn

    def _error_reply(
        self,
        call_id: int,
        phase: str,
        exc: BaseException,
        out: str,
        err: str,
        skip_frames: int = 0,
    ) -> None:
        tb = exc.__traceback__
        for _ in range(skip_frames):
            if tb is not None:
                tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        info = {
            "phase": phase,
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": text,
        }
        try:
            blob = cloudpickle.dumps(exc)
            if len(blob) > 1 << 20:
                blob = b""
        except Exception:
            blob = b""
        self.send(protocol.ERROR, (call_id, info, out, err), blob)

    def handle_call(
        self,
        call_id: int,
        program_id: str,
        name: str,
        blob: bytes,
        attached: tuple[tuple[int, int], ...] = (),  # [shm hook] the frame's segments
    ) -> None:
        self.current_call = call_id
        out_buf, err_buf = io.StringIO(), io.StringIO()
        try:
            try:
                if not self.store.exists(program_id):
                    raise ProgramNotFound(name)
                fn = self._load(program_id)
            except ProgramNotFound:
                info = {
                    "phase": "not_found",
                    "type": "ProgramNotFound",
                    "message": name,
                    "traceback": "",
                }
                shm.close_attached(attached)  # [shm hook]
                self.send(protocol.ERROR, (call_id, info, "", ""), b"")
                return
            except Exception as exc:
                shm.close_attached(attached)  # [shm hook]
                self._error_reply(call_id, "load", exc, "", "")
                return
            try:
                args, kwargs = shm.loads(blob, attached)  # [shm hook] was cloudpickle.loads
            except Exception as exc:
                self._error_reply(call_id, "args", exc, "", "")
                return
            saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = out_buf, err_buf
            try:
                self.in_call = True
                value = fn(*args, **kwargs)
                self.in_call = False
            except KeyboardInterrupt as exc:
                self.in_call = False
                sys.stdout, sys.stderr = saved
                self._error_reply(call_id, "cancelled", exc, out_buf.getvalue(), err_buf.getvalue())
                return
            except BaseException as exc:  # SystemExit too: a program's exit is its error
                self.in_call = False
                sys.stdout, sys.stderr = saved
                self._error_reply(
                    call_id, "run", exc, out_buf.getvalue(), err_buf.getvalue(), skip_frames=1
                )
                return
            finally:
                self.in_call = False
                sys.stdout, sys.stderr = saved
            try:
                # [shm hook] was cloudpickle.dumps(value): large buffers as segments
                result, segments = shm.dumps_result(value, self.shm_threshold)
            except Exception as exc:
                self._error_reply(
                    call_id,
                    "result",
                    TypeError(f"the result ({type(value).__name__}) cannot be pickled: {exc}"),
                    out_buf.getvalue(),
                    err_buf.getvalue(),
                )
                return
            size = len(result) + sum(s.size for s in segments)
            if size > self.max_result_bytes:
                for segment in segments:
                    segment.close()
                self._error_reply(
                    call_id,
                    "result",
                    ValueError(
                        f"the result is {size} bytes pickled, over the pool's "
                        f"max_result_bytes of {self.max_result_bytes}"
                    ),
                    out_buf.getvalue(),
                    err_buf.getvalue(),
                )
                return
            self.send(
                protocol.RESULT,
                (call_id, out_buf.getvalue(), err_buf.getvalue()),
                result,
                segments,  # [shm hook]
            )
        finally:
            self.current_call = None

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self._heartbeat, name="dspool-heartbeat", daemon=True).start()
        self.send(protocol.HELLO, (self.worker_id, os.getpid()))
        while True:
            try:
                frame = protocol.recv_frame(self.sock, self.fds)  # [shm hook] fds too
            except KeyboardInterrupt:
                continue  # a cancel that arrived after its call finished
            if frame is None:
                return
            kind, meta, blob = frame
            if kind == protocol.CALL:
                call_id, program_id, name = meta[:3]
                # [shm hook] the segments ((fd, size), ...) that came with the frame
                self.handle_call(call_id, program_id, name, blob, protocol.attached(meta))
            elif kind == protocol.STOP:
                return
            else:
                raise protocol.ProtocolError(f"unexpected frame kind {kind}")


def build_program(spec: ProgramSpec) -> Callable[..., Any]:
    """Turn a stored spec into the callable a call runs."""
    if spec.kind == "source":
        filename = f"<dspool program {spec.name}>"
        module = types.ModuleType(f"dspool_program_{spec.id}")
        module.__file__ = filename
        source = str(spec.payload)
        # Tracebacks show the program's lines, like a local cell's.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        sys.modules[module.__name__] = module
        # Objects of classes the program defines travel back by value.
        cloudpickle.register_pickle_by_value(module)
        exec(compile(source, filename, "exec"), module.__dict__)
        entry = spec.entry or spec.name
        fn = module.__dict__.get(entry)
        if fn is None:
            raise NameError(f"program {spec.name!r} defines no {entry!r} when it runs")
        if not callable(fn):
            raise TypeError(f"entry {entry!r} of program {spec.name!r} is not callable")
        if isinstance(fn, type) and _is_dspy_module(fn):
            # A dspy.Module class: built once per worker, and its instance is called.
            from . import dspy_programs

            return dspy_programs.build_module_program(spec, fn)
        return fn  # type: ignore[no-any-return]
    if spec.kind == "pickle":
        fn = cloudpickle.loads(spec.payload)
        if not callable(fn):
            raise TypeError(f"program {spec.name!r} is not callable")
        return fn  # type: ignore[no-any-return]
    if spec.kind == "signature":
        from . import dspy_programs  # optional extra, imported only when used

        return dspy_programs.build_signature_program(spec)
    raise TypeError(f"program {spec.name!r} has unknown kind {spec.kind!r}")


def _is_dspy_module(cls: type) -> bool:
    """True for a ``dspy.Module`` subclass (dspy is loaded then: the program imported it)."""
    module_type = getattr(sys.modules.get("dspy"), "Module", None)
    return isinstance(module_type, type) and issubclass(cls, module_type)


def _worker_main(fd: int, worker_id: str, config: dict[str, Any], template_pid: int) -> int:
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != template_pid:
        return 0  # the template died before we could ask to die with it
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    limit = config.get("memory_limit")
    if limit:
        # A program that blows up its memory gets MemoryError (a reply), not the OOM killer.
        resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
    try:
        worker = _Worker(sock, worker_id, config)
    except Exception as exc:
        try:
            protocol.send_frame(sock, protocol.FATAL, (f"{type(exc).__name__}: {exc}",))
        except OSError:
            pass
        return 1
    worker.serve()
    return 0


# ------------------------------------------------------------------------- template


class _Template:
    def __init__(self, control: socket.socket, config: dict[str, Any]) -> None:
        self.control = control
        self.config = config
        self.children: dict[int, str] = {}
        self.parent_pid = os.getppid()
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
                code = _worker_main(fd, worker_id, self.config, self.pid)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(fd)
        self.children[pid] = worker_id
        protocol.send_control(self.control, {"op": "spawned", "worker_id": worker_id, "pid": pid})

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_id = self.children.pop(pid, None)
            if worker_id is None:
                continue
            returncode = os.waitstatus_to_exitcode(status)
            try:
                protocol.send_control(
                    self.control,
                    {"op": "exited", "worker_id": worker_id, "pid": pid, "returncode": returncode},
                )
            except OSError:
                pass

    def shutdown(self) -> None:
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
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.pop(pid, None)

    def serve(self) -> int:
        self.pid = os.getpid()
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        started = time.monotonic()
        errors = self.preload()
        # What the template imported is shared with every worker; keep the collector off
        # it so that a worker's first collection does not copy those pages (fork CoW).
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
        try:
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
        finally:
            self.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dspool_jupyter.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config", required=True, help="JSON: store, preload, sys_path, ...")
    args = parser.parse_args(argv)
    # The template dies with the pool's thread that started it (the kernel).
    _set_parent_death_signal(signal.SIGKILL)
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
