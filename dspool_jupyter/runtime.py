"""Running one call inside a worker: shared by the local worker and the Dask worker tasks.

What a call goes through, whichever process runs it: its arguments are unpickled, the
program (built by :mod:`dspool_jupyter.programs`, cached by content id in a
:class:`ProgramCache`) is called with :data:`dspool_jupyter.context.current_call` set and
its output captured, and the outcome becomes a :class:`Reply`: the pickled value, or an
error description (``phase``, ``type``, ``message``, ``traceback``) and the pickled
exception. A program's failure is a reply, never an exception out of :func:`run_call`.

Decisions recorded here:

- **Output is captured per call, not per process.** :func:`install_output_capture` puts
  one proxy in ``sys.stdout`` and one in ``sys.stderr`` for the life of the process; a
  write goes to the buffer of the call whose context (a ContextVar: per thread, per
  asyncio task) made it, else, in a worker that runs one call at a time, to that call
  (so that threads a program starts are captured as before), else to the original
  stream. A program that closes or replaces ``sys.stdout`` cannot break the next call:
  ``close()`` on the proxy does nothing, and the proxies are put back after every call.
- **What travels is capped.** Each captured stream keeps its first
  :data:`MAX_OUTPUT_CHARS` characters, an error message its first
  :data:`MAX_MESSAGE_CHARS`, a traceback its last :data:`MAX_TRACEBACK_CHARS`; a cut
  says how much was left out. A pickled exception larger than :data:`MAX_ERROR_BLOB`
  is not sent (the text still is). So a 40 MiB message or 70 MiB of prints is an
  ordinary reply.
- **A cancel is only what the pool asked for.** Whoever interrupts a call (SIGINT at
  concurrency 1, an INTERRUPT frame at concurrency > 1, the Dask cancel) goes through
  :meth:`CallState.interrupt`, which marks the call; a ``KeyboardInterrupt`` (or
  ``asyncio.CancelledError``) that ends an unmarked call is the program's own error
  (phase ``"run"``), a marked one is phase ``"cancelled"``. An interrupt can only land
  while the program runs: the state's ``interruptible`` flag is cleared (and a pending
  asynchronous exception withdrawn) before the reply is built.
- **A failing ``str()`` is not a crash.** An exception whose ``__str__`` raises gets
  the placeholder message ``<str() of TypeName failed: ...>``.
- **Out of memory.** On ``MemoryError`` the emergency reserve (:func:`reserve_memory`)
  is released and the failed call's frames are cleared before the reply is built, then
  the reserve is taken again; :func:`memory_exhausted` says when the process cannot
  recover (the worker then exits, see :mod:`dspool_jupyter.worker`).
- **Shared memory is the local worker's.** A local worker passes the segments that came
  with a call's frame to :func:`prepare_call` and its pool's threshold to
  :func:`run_call`/:func:`arun_call`, so large arguments are read-only views and large
  results go back as segments (:mod:`dspool_jupyter.shm`); the Dask tasks pass neither
  and keep Dask's transport (plain cloudpickle).

Imports nothing of the kernel side.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import inspect
import io
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

import cloudpickle

from . import llm, shm
from .context import CallContext, current_call
from .programs import build_program
from .store import ProgramSpec
from .usage import Usage

__all__ = [
    "MAX_ERROR_BLOB",
    "MAX_MESSAGE_CHARS",
    "MAX_OUTPUT_CHARS",
    "MAX_TRACEBACK_CHARS",
    "PROGRAM_CACHE_SIZE",
    "CallState",
    "CappedText",
    "ProgramCache",
    "Reply",
    "arun_call",
    "error_info",
    "error_reply",
    "install_output_capture",
    "memory_exhausted",
    "prepare_call",
    "reserve_memory",
    "run_call",
    "not_found_reply",
    "safe_str",
]

PROGRAM_CACHE_SIZE = 256  # built programs kept per worker process
MAX_OUTPUT_CHARS = 1 << 20  # characters of each captured stream sent back per call
MAX_MESSAGE_CHARS = 64 * 1024  # characters of an error message sent back
MAX_TRACEBACK_CHARS = 256 * 1024  # characters of a traceback sent back (its end)
MAX_ERROR_BLOB = 1 << 20  # bytes: a larger pickled exception is not sent back
MEMORY_RESERVE_BYTES = 4 << 20  # freed on MemoryError so the reply can be built


# ------------------------------------------------------------------------ output


class CappedText:
    """A text buffer that keeps the first ``limit`` characters and counts the rest."""

    __slots__ = ("_buf", "_dropped", "_kept", "_limit")

    def __init__(self, limit: int = MAX_OUTPUT_CHARS) -> None:
        self._buf = io.StringIO()
        self._kept = 0
        self._dropped = 0
        self._limit = limit

    def write(self, text: str) -> int:
        """Append ``text`` (what does not fit is counted, not kept); returns its length."""
        size = len(text)
        room = self._limit - self._kept
        if size <= room:
            self._buf.write(text)
            self._kept += size
        else:
            if room > 0:
                self._buf.write(text[:room])
                self._kept += room
            self._dropped += size - max(room, 0)
        return size

    def getvalue(self) -> str:
        """The text kept, with a last line saying how many characters were cut."""
        text = self._buf.getvalue()
        if self._dropped:
            text += f"\n[dspool: output cut here: {self._dropped} more characters not shown]\n"
        return text


_streams: ContextVar[tuple[CappedText, CappedText] | None] = ContextVar(
    "dspool_call_streams", default=None
)
# The call a worker of concurrency 1 runs: writes from threads it started go there too.
_solo: list[tuple[CappedText, CappedText] | None] = [None]


class _CallStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` in a worker: each write goes to its call's buffer."""

    def __init__(self, index: int, fallback: Any) -> None:
        super().__init__()
        self._index = index
        self._fallback = fallback

    def _target(self) -> CappedText | None:
        streams = _streams.get() or _solo[0]
        return None if streams is None else streams[self._index]

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        target = self._target()
        if target is not None:
            return target.write(text)
        try:
            self._fallback.write(text)
        except (ValueError, OSError, AttributeError):  # the original stream is closed or gone
            pass
        return len(text)

    def flush(self) -> None:
        if self._target() is None:
            try:
                self._fallback.flush()
            except (ValueError, OSError, AttributeError):
                pass

    def close(self) -> None:
        """A program may not close the worker's streams: nothing happens."""

    @property
    def closed(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._fallback, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._fallback, "errors", None)

    def fileno(self) -> int:
        if self._fallback is None:
            raise io.UnsupportedOperation("fileno")
        return int(self._fallback.fileno())


_capture_lock = threading.Lock()
_proxies: list[_CallStream] = []


def install_output_capture() -> None:
    """Put the per-call proxies in ``sys.stdout``/``sys.stderr`` (again, if replaced)."""
    if _proxies and sys.stdout is _proxies[0] and sys.stderr is _proxies[1]:
        return
    with _capture_lock:
        if not _proxies:
            # Writes outside any call go where they went before (a Dask worker's stream).
            _proxies.append(_CallStream(0, sys.stdout or sys.__stdout__))
            _proxies.append(_CallStream(1, sys.stderr or sys.__stderr__))
        sys.stdout = cast(TextIO, _proxies[0])
        sys.stderr = cast(TextIO, _proxies[1])


# ------------------------------------------------------------------------ programs


class ProgramCache:
    """Built programs by content-hash id, least recently used evicted first.

    A redefined program has a new id, so an entry is never stale. Thread-safe; a program
    is built outside the lock (two threads may build the same one; the first kept wins).
    """

    def __init__(self, size: int = PROGRAM_CACHE_SIZE) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._programs: OrderedDict[str, Callable[..., Any]] = OrderedDict()

    def get(self, program_id: str) -> Callable[..., Any] | None:
        """The built program, or None when it is not cached."""
        with self._lock:
            fn = self._programs.get(program_id)
            if fn is not None:
                self._programs.move_to_end(program_id)
            return fn

    def build(self, spec: ProgramSpec) -> Callable[..., Any]:
        """Build ``spec`` (raises what building raises), cache it and return it."""
        fn = build_program(spec)
        with self._lock:
            kept = self._programs.setdefault(spec.id, fn)
            self._programs.move_to_end(spec.id)
            while len(self._programs) > self._size:
                self._programs.popitem(last=False)
        return kept

    def __len__(self) -> int:
        return len(self._programs)


# ------------------------------------------------------------------------- replies


@dataclass
class Reply:
    """A call's outcome: ``info is None`` for a value (``blob`` = the pickled value), else
    the error description and ``blob`` = the pickled exception or ``b""``. ``usage`` is
    the call's LM usage (:meth:`dspool_jupyter.usage.Usage.as_dict`) when it made LM
    requests, else None. ``segments``: the value's large buffers as shared segments
    (:mod:`dspool_jupyter.shm`), sent with the reply's frame and then closed by whoever
    sends it; empty unless a shared-memory threshold was given."""

    info: dict[str, Any] | None
    out: str
    err: str
    blob: bytes
    usage: dict[str, Any] | None = None
    segments: list[shm.Segment] = field(default_factory=list)


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when that raises."""
    try:
        return str(exc)
    except BaseException as inner:  # any failure of a program's __str__
        return f"<str() of {type(exc).__name__} failed: {type(inner).__name__}>"


def _cap_head(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [dspool: cut here: {len(text) - limit} more characters]"


def _cap_tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"[dspool: {len(text) - limit} characters cut here] ..." + text[-limit:]


def error_info(
    phase: str, exc: BaseException, skip_frames: int = 0
) -> tuple[dict[str, Any], bytes]:
    """``(info, pickled exception or b"")`` describing ``exc`` as a reply carries it."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    message = _cap_head(safe_str(exc), MAX_MESSAGE_CHARS)
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        text = f"{type(exc).__name__}: {message}\n(the traceback could not be formatted)\n"
    info = {
        "phase": phase,
        "type": type(exc).__name__,
        "message": message,
        "traceback": _cap_tail(text, MAX_TRACEBACK_CHARS),
    }
    blob = b""
    if len(message) < MAX_MESSAGE_CHARS and not isinstance(exc, MemoryError):
        try:
            blob = cloudpickle.dumps(exc)
        except BaseException:  # a program's __reduce__ may raise anything
            blob = b""
        if len(blob) > MAX_ERROR_BLOB:
            blob = b""
    return info, blob


def error_reply(
    phase: str, exc: BaseException, out: str = "", err: str = "", skip_frames: int = 0
) -> Reply:
    """The reply for a call that ended with ``exc`` in ``phase``."""
    info, blob = error_info(phase, exc, skip_frames)
    return Reply(info, out, err, blob)


def not_found_reply(name: str) -> Reply:
    """The reply for a program id that is not in the store."""
    info = {"phase": "not_found", "type": "ProgramNotFound", "message": name, "traceback": ""}
    return Reply(info, "", "", b"")


# --------------------------------------------------------------- memory reserve

_reserve: list[bytearray | None] = [None]
_memory_errors = [0]  # MemoryErrors replied since the last memory_exhausted()
MEMORY_HEADROOM = 0.1  # fraction of the limit that must be free after a MemoryError


def reserve_memory(size: int = MEMORY_RESERVE_BYTES) -> bool:
    """Hold ``size`` bytes to release on MemoryError; False when they could not be had."""
    if _reserve[0] is None:
        try:
            _reserve[0] = bytearray(size)
        except MemoryError:
            return False
    return True


def memory_exhausted(limit: int) -> bool:
    """After a call ended in MemoryError: True when this process cannot recover.

    That is when the emergency reserve could not be taken again, or when the data
    memory still in use (``VmData``, what ``RLIMIT_DATA`` counts) leaves less than
    :data:`MEMORY_HEADROOM` of ``limit`` (bytes): something the call left behind (a
    global, a leak) holds it, and every later call would fail the same way.
    """
    if not _memory_errors[0]:
        return False
    _memory_errors[0] = 0
    if _reserve[0] is None and not reserve_memory():
        return True
    data = _data_bytes()
    return data is not None and data > limit * (1 - MEMORY_HEADROOM)


def _data_bytes() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_reserve() -> None:
    _reserve[0] = None


# ------------------------------------------------------------------------ one call


def _raise_in_thread(thread_id: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(KeyboardInterrupt)
    )


def _withdraw_from_thread(thread_id: int) -> None:
    # NULL (not None) withdraws a pending asynchronous exception.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.c_void_p(None))


@dataclass
class CallState:
    """One call as the code that may interrupt it sees it.

    ``interruptible`` is True only while the program runs. :meth:`interrupt` marks the
    call ``cancelled``: before the program starts, it then never starts; while it runs,
    ``KeyboardInterrupt`` is raised in its thread (or its task is cancelled); after it
    ended, nothing happens.
    """

    call_id: int
    thread_id: int = 0
    task: asyncio.Task[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    interruptible: bool = False
    cancelled: bool = False
    finished: bool = False
    async_sent: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def interrupt(self) -> bool:
        """Interrupt the call from another thread; False if it already ended."""
        with self.lock:
            if self.finished:
                return False
            self.cancelled = True
            if self.interruptible:
                if self.task is not None and self.loop is not None:
                    self.loop.call_soon_threadsafe(self._cancel_task)
                else:
                    _raise_in_thread(self.thread_id)
                    self.async_sent = True
            return True

    def _cancel_task(self) -> None:
        # On the task's loop, as end() is: a cancel that comes after the program's end
        # is void.
        if self.interruptible and self.task is not None:
            self.task.cancel()

    def begin(self) -> bool:
        """The program starts now; False when it was cancelled before it could."""
        with self.lock:
            if self.cancelled:
                return False
            self.interruptible = True
            return True

    def end(self) -> None:
        """No interrupt may land after this (a pending one is withdrawn)."""
        with self.lock:
            self.interruptible = False
            self.finished = True
            if self.async_sent:
                self.async_sent = False
                _withdraw_from_thread(self.thread_id)


def prepare_call(
    blob: bytes, attached: Sequence[tuple[int, int]] = ()
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's ``(args, kwargs)`` from its pickled arguments (raises what loading raised).

    ``attached``: the shared segments that came with the call's frame (a local worker's;
    see :mod:`~dspool_jupyter.shm`), mapped read-only; their descriptors are closed here,
    whether or not loading succeeds.
    """
    args, kwargs = shm.loads(blob, attached)
    return args, kwargs


def _interrupted(exc: BaseException, state: CallState | None) -> bool:
    return (
        state is not None
        and state.cancelled
        and isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError))
    )


def _finish(
    value: Any,
    outcome: BaseException | None,
    streams: tuple[CappedText, CappedText],
    state: CallState | None,
    max_result_bytes: int,
    shm_threshold: int | None = None,
) -> Reply:
    out, err = streams
    if outcome is not None:
        if isinstance(outcome, MemoryError):
            _release_reserve()
            # The program's frames hold what filled the memory; the text needs none of it.
            traceback.clear_frames(outcome.__traceback__)
            gc.collect()
            info, _ = error_info("run", outcome, skip_frames=1)
            del outcome
            _memory_errors[0] += 1
            reserve_memory()
            return Reply(info, out.getvalue(), err.getvalue(), b"")
        if _interrupted(outcome, state):
            return error_reply("cancelled", outcome, out.getvalue(), err.getvalue())
        return error_reply("run", outcome, out.getvalue(), err.getvalue(), skip_frames=1)
    try:
        # Buffers of at least shm_threshold bytes go as shared segments (None: none do).
        result, segments = shm.dumps_result(value, shm_threshold)
    except Exception as exc:
        return error_reply(
            "result",
            TypeError(f"the result ({type(value).__name__}) cannot be pickled: {safe_str(exc)}"),
            out.getvalue(),
            err.getvalue(),
        )
    except MemoryError:
        del value
        return error_reply(
            "result",
            MemoryError("the result could not be pickled: out of memory"),
            out.getvalue(),
            err.getvalue(),
        )
    size = len(result) + sum(segment.size for segment in segments)
    if size > max_result_bytes:
        for segment in segments:
            segment.close()
        return error_reply(
            "result",
            ValueError(
                f"the result is {size} bytes pickled, over the pool's "
                f"max_result_bytes of {max_result_bytes}"
            ),
            out.getvalue(),
            err.getvalue(),
        )
    return Reply(None, out.getvalue(), err.getvalue(), result, segments=segments)


def run_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    max_result_bytes: int,
    context: CallContext | None = None,
    state: CallState | None = None,
    solo: bool = False,
    shm_threshold: int | None = None,
) -> Reply:
    """Call ``fn(*args, **kwargs)`` in this thread and describe the outcome as a reply.

    A coroutine that ``fn`` returns is run to its end on a new event loop here. The
    result's pickled size is checked against ``max_result_bytes`` (bytes). ``solo``:
    this is the process's only call, so output from threads the program starts is its.
    ``shm_threshold``: the result's buffers of at least this many bytes go as shared
    segments (:attr:`Reply.segments`, a local worker's); None (Dask): plain cloudpickle.
    """
    streams = (CappedText(), CappedText())
    token = _streams.set(streams)
    if solo:
        _solo[0] = streams
    context_token = current_call.set(context)
    value: Any = None
    outcome: BaseException | None = None
    usage: Usage | None = None
    try:
        with _collect_usage(context) as usage:
            try:
                if state is not None and not state.begin():
                    raise KeyboardInterrupt
                value = fn(*args, **kwargs)
                if inspect.iscoroutine(value):
                    value = asyncio.run(value)
            finally:
                if state is not None:
                    state.end()
    except BaseException as exc:  # SystemExit too: a program's exit is its error
        outcome = exc
    finally:
        current_call.reset(context_token)
        _streams.reset(token)
        if solo:
            _solo[0] = None
        install_output_capture()
    reply = _finish(value, outcome, streams, state, max_result_bytes, shm_threshold)
    reply.usage = _usage_dict(usage)
    return reply


async def arun_call(
    fn: Callable[..., Coroutine[Any, Any, Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    max_result_bytes: int,
    context: CallContext | None = None,
    state: CallState | None = None,
    shm_threshold: int | None = None,
) -> Reply:
    """Await ``fn(*args, **kwargs)`` in the running loop's current task; like :func:`run_call`.

    Set ``state.task``/``state.loop`` to this task first for :meth:`CallState.interrupt`.
    """
    streams = (CappedText(), CappedText())
    _streams.set(streams)  # the task's own context: nothing to reset
    current_call.set(context)
    value: Any = None
    outcome: BaseException | None = None
    usage: Usage | None = None
    try:
        with _collect_usage(context) as usage:
            try:
                if state is not None and not state.begin():
                    raise asyncio.CancelledError
                value = await fn(*args, **kwargs)
            finally:
                if state is not None:
                    state.end()
    except BaseException as exc:  # CancelledError too: see _interrupted
        outcome = exc
    finally:
        install_output_capture()
    reply = _finish(value, outcome, streams, state, max_result_bytes, shm_threshold)
    reply.usage = _usage_dict(usage)
    return reply


@contextmanager
def _collect_usage(context: CallContext | None) -> Iterator[Usage | None]:
    """The call's LM usage while the block runs (None outside a pool call)."""
    if context is None:
        yield None
        return
    with llm.collect_call_usage(context.call_id) as usage:
        yield usage


def _usage_dict(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None or not (usage.requests or usage.rate_limited):
        return None
    return usage.as_dict()
