"""The tasks the Dask backend runs inside Dask worker processes (child side).

The kernel submits these functions by reference, so a Dask worker imports this module
and, through :mod:`dspool_jupyter.runtime`, the shared call handling; it never imports
the kernel side (``pool``, ``dask_backend``, magics, widgets).

- :func:`_dask_hello`: the first task on every worker (preloads, identity, versions).
- :func:`_dask_call`: one pool call; the reply is a tuple whose first item is
  :data:`_RESULT`, :data:`_ERROR`, :data:`_NEED_SPEC` (the worker lacks the program and
  the call did not carry its spec) or :data:`_MISROUTED` (Dask reran the task on
  another worker process: a call never runs twice).
- :func:`_interrupt_call` (``client.run``): interrupt one running call, which then
  replies phase ``"cancelled"``; a program raising ``KeyboardInterrupt`` by itself is
  its own error (phase ``"run"``), see :mod:`dspool_jupyter.runtime`. It answers
  :data:`_INTERRUPT_SENT`, :data:`_INTERRUPT_PENDING` (the task is still on its way to
  the program: ask again) or :data:`_INTERRUPT_GONE`.
- :func:`_kill_worker_process` (``client.run(..., nanny=True)``): SIGKILL a worker.

A Dask worker runs several calls at once in its threads; output is captured per call
by :mod:`dspool_jupyter.runtime`'s ContextVar-routed ``sys.stdout``/``sys.stderr``.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Any

from . import runtime
from .context import CallContext
from .store import ProgramSpec

__all__ = [
    "WORKER_PROGRAM_CACHE",
    "_ERROR",
    "_INTERRUPT_GONE",
    "_INTERRUPT_PENDING",
    "_INTERRUPT_SENT",
    "_MISROUTED",
    "_NEED_SPEC",
    "_RESULT",
    "_dask_call",
    "_dask_hello",
    "_dspool_version",
    "_interrupt_call",
    "_kill_worker_process",
]

WORKER_PROGRAM_CACHE = runtime.PROGRAM_CACHE_SIZE  # built programs a Dask worker keeps

_RESULT = "result"
_ERROR = "error"
_NEED_SPEC = "need_spec"
_MISROUTED = "misrouted"
# What _interrupt_call found, and the Dask task states that may still reach the program.
_INTERRUPT_SENT = "sent"
_INTERRUPT_PENDING = "pending"
_INTERRUPT_GONE = "gone"
_TASK_WAITING = frozenset({"ready", "constrained", "waiting", "executing", "long-running"})

_programs = runtime.ProgramCache(WORKER_PROGRAM_CACHE)
_running_lock = threading.Lock()
_running: dict[str, runtime.CallState] = {}  # call key -> its state
_interrupted: set[str] = set()  # running calls already sent their interrupt


def _dspool_version() -> str:
    from . import __version__

    return str(__version__)


def _dask_hello(preload: list[str]) -> dict[str, Any]:
    """First task on every Dask worker: preloads, identity, versions."""
    from distributed import get_worker

    worker = get_worker()
    runtime.install_output_capture()
    errors = []
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # an import that exits must not end the worker
            errors.append(
                f"preload {name!r} failed on {worker.address}: "
                f"{type(exc).__name__}: {runtime.safe_str(exc)}"
            )
    return {
        "uid": worker.id,
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "dspool": _dspool_version(),
        "preload_errors": errors,
    }


def _error_tuple(reply: runtime.Reply) -> tuple[Any, ...]:
    return (_ERROR, reply.info, reply.out, reply.err, reply.blob, reply.usage)


def _dask_call(
    uid: str,
    key: str,
    program_id: str,
    name: str,
    record: dict[str, Any] | None,
    blob: bytes,
    max_result_bytes: int,
    call_id: int = 0,
) -> tuple[Any, ...]:
    """One pool call on a Dask worker; the reply is a tuple, never an exception."""
    from distributed import get_worker

    worker = get_worker()
    if worker.id != uid:
        return (_MISROUTED,)
    fn = _programs.get(program_id)
    if fn is None:
        if record is None:
            return (_NEED_SPEC,)
        try:
            fn = _programs.build(ProgramSpec.from_record(record))
        except Exception as exc:
            return _error_tuple(runtime.error_reply("load", exc))
    try:
        args, kwargs = runtime.prepare_call(blob)
    except Exception as exc:
        return _error_tuple(runtime.error_reply("args", exc))
    runtime.install_output_capture()
    state = runtime.CallState(call_id, thread_id=threading.get_ident())
    with _running_lock:
        _running[key] = state
    try:
        reply = runtime.run_call(
            fn, args, kwargs, max_result_bytes, CallContext(call_id, name, str(worker.id)), state
        )
    finally:
        with _running_lock:
            _running.pop(key, None)
            _interrupted.discard(key)
    if reply.info is not None:
        return _error_tuple(reply)
    return (_RESULT, reply.out, reply.err, reply.blob, reply.usage)


def _interrupt_call(key: str, dask_worker: Any = None) -> str:
    """Raise KeyboardInterrupt in the thread running call ``key`` (``client.run``).

    Says whether it was sent, whether the task is still on its way to the program (try
    again), or whether nothing of it runs here any more.
    """
    with _running_lock:
        state = _running.get(key)
        if state is not None:
            if key in _interrupted:
                return _INTERRUPT_SENT  # once: a second one could land in its handler
            if state.interrupt():
                _interrupted.add(key)
                return _INTERRUPT_SENT
    worker_state = getattr(dask_worker, "state", None)
    if worker_state is None:
        return _INTERRUPT_GONE
    task = worker_state.tasks.get(key)
    if task is not None and (task in worker_state.executing or task.state in _TASK_WAITING):
        return _INTERRUPT_PENDING
    return _INTERRUPT_GONE


def _kill_worker_process(pid: int, dask_worker: Any = None) -> bool:
    """In a nanny (``client.run(..., nanny=True)``): SIGKILL its worker if it is ``pid``."""
    process = getattr(getattr(dask_worker, "process", None), "process", None)
    if process is None or process.pid != pid:
        return False  # already gone or replaced
    os.kill(pid, signal.SIGKILL)
    return True
