"""Large arguments and results through shared memory instead of the worker's socket.

Decisions (issue 17):

- **Pickle protocol 5, out of band.** Values are pickled with a ``buffer_callback``:
  every buffer pickle hands out of band (numpy arrays and anything that reduces to a
  ``PickleBuffer``, at any depth; ``memoryview`` at any depth through
  :class:`_Pickler`; ``bytes`` and ``bytearray`` only as a top-level argument or as
  the result itself, because the C pickler never offers them to a reducer) that is at
  least ``threshold`` bytes goes into its own shared segment; smaller ones stay in the pickle.
- **Anonymous segments.** A segment is a ``memfd_create`` file: it has no name, so
  nothing can be left behind by a crash (the memory is freed when the last descriptor
  and mapping are gone), and it is not limited by the size of ``/dev/shm`` (a memfd
  lives on the kernel's internal tmpfs; only the memory cgroup bounds it). Its
  descriptor rides with the frame as SCM_RIGHTS ancillary data (see
  :mod:`~dspool_jupyter.protocol`); byte counts of the stream do not change.
- **Read-only arguments.** The worker maps an argument's segment ``PROT_READ`` and
  unpickles over the mapping: a numpy argument is a read-only array over the caller's
  segment (no copy); writing into it raises numpy's ``ValueError: assignment
  destination is read-only``. The pool seals argument segments (``F_SEAL_WRITE``) so a
  program cannot corrupt a segment other calls share even by re-mapping it.
  ``bytes`` and ``bytearray`` are rebuilt by one copy out of the mapping (they must own
  their memory); ``memoryview`` stays a read-only view. A worker keeps its recent
  argument mappings (:data:`WORKER_MAPPED_BYTES`), so the same array to the next call
  costs no map, page faults or unmap; such a segment is freed once the worker drops it.
- **Results** come back the same way (a fresh segment per buffer, written once by the
  worker); the pool maps them copy-on-write (``MAP_PRIVATE``), so a numpy result is an
  ordinary writable array that stays valid after its worker is gone.
- **Placed once: keyed by identity, guarded by content.** The caller's side keeps an
  LRU cache from the buffer's owner (``id`` with a weak reference, or a strong one when
  the owner cannot be weakly referenced, so the id cannot be reused while cached) to
  its segment. A content hash would cost a hash of every large argument on every call
  (blake2b of 8 MB is several ms); identity costs nothing, and the guard that the
  owner did not change since is a comparison with the segment (memcmp speed, several
  times faster than a hash, and exact), skipped for a whole ``bytes``, which cannot
  change.
  A hit sends only the descriptor: the same array passed to 1,000 calls is copied once.
  The cache is bounded (:data:`CACHE_BYTES`, :data:`CACHE_ENTRIES`); a segment is freed
  when neither the cache nor a pending call holds it and no worker maps it.
- **Fallback.** When a segment cannot be made (``memfd_create``, ``ftruncate`` or the
  copy fail: ENOMEM, EMFILE, EFBIG, a seccomp profile), the buffer goes in-band through
  the socket, as without shared memory; the pool says so once (log warning and
  ``status().last_error``) and keeps trying for later buffers.

Both sides import this module; it imports nothing of the kernel side.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import fcntl
import io
import logging
import mmap
import os
import pickle
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

__all__ = [
    "CACHE_BYTES",
    "CACHE_ENTRIES",
    "DEFAULT_THRESHOLD",
    "MAX_SEGMENTS_PER_FRAME",
    "Placer",
    "Segment",
    "close_attached",
    "dumps_result",
    "loads",
]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 1 << 20  # bytes: smaller buffers stay in the pickle
CACHE_BYTES = 2 << 30  # bytes of placed segments the caller's side keeps for reuse
CACHE_ENTRIES = 256  # placed segments kept for reuse
MAX_SEGMENTS_PER_FRAME = 64  # more out-of-band buffers in one value go in-band
WORKER_MAPPED_BYTES = 256 << 20  # bytes of argument segments a worker keeps mapped
WORKER_MAPPED_ENTRIES = 16  # argument segments a worker keeps mapped

_SEALS = (
    getattr(fcntl, "F_SEAL_WRITE", 0)
    | getattr(fcntl, "F_SEAL_SHRINK", 0)
    | getattr(fcntl, "F_SEAL_GROW", 0)
    | getattr(fcntl, "F_SEAL_SEAL", 0)
)


class Segment:
    """One shared segment: its descriptor, size, and a read-only mapping for the guard.

    The descriptor is closed when the object goes (cache eviction and the end of every
    call that carries it).
    """

    __slots__ = ("__weakref__", "fd", "size", "view")

    def __init__(self, fd: int, size: int, view: mmap.mmap | None) -> None:
        self.fd = fd
        self.size = size
        self.view = view

    def close(self) -> None:
        view, self.view = self.view, None
        if view is not None:
            try:
                view.close()
            except BufferError:
                pass  # a guard's memoryview is still alive; the collector unmaps it
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def _new_segment(data: memoryview, seal: bool) -> Segment:
    """A memfd holding a copy of ``data`` (flat bytes); raises OSError when it cannot."""
    size = data.nbytes
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0)
    fd = os.memfd_create("dspool", flags)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as out:
            out.write(data)
        view = None
        if seal:
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            except (OSError, AttributeError):
                pass
            view = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    return Segment(fd, size, view)


def _load_memcmp() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        memcmp = libc.memcmp
    except (OSError, AttributeError):
        return None
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    memcmp.restype = ctypes.c_int
    return memcmp


_memcmp = _load_memcmp()


def _same(a: memoryview, b: memoryview) -> bool:
    """Whether ``a`` and ``b`` (flat, equal length) hold the same bytes.

    libc's memcmp through ctypes (measured 1.5x numpy's ``equal``, and it lets other
    threads run); numpy only finds the two addresses of read-only buffers.
    """
    np = sys.modules.get("numpy")
    if np is None or _memcmp is None:
        return a == b
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    return bool(_memcmp(x.ctypes.data, y.ctypes.data, x.size) == 0)


# ------------------------------------------------------------------ pickling


def _rebuild_bytes(buf: Any) -> bytes:
    return bytes(buf)


def _rebuild_bytearray(buf: Any) -> bytearray:
    return bytearray(buf)


def _rebuild_memoryview(buf: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buf).cast("B")
    if (fmt, shape) == ("B", (view.nbytes,)):
        return view
    shaped: memoryview = view.cast(fmt, shape)  # type: ignore[call-overload]
    return shaped


class _Big:
    """A top-level ``bytes``/``bytearray`` argument or result, pickled out of band."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild = _rebuild_bytes if type(self.data) is bytes else _rebuild_bytearray
        return rebuild, (pickle.PickleBuffer(self.data),)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, protocol 5, with large ``memoryview`` out of band (pickle offers
    neither ``bytes`` nor ``bytearray`` to a reducer: see :func:`_wrap`)."""

    def __init__(self, file: io.BytesIO, threshold: int, callback: Callable[[Any], Any]) -> None:
        super().__init__(file, protocol=5, buffer_callback=callback)
        self.threshold = threshold

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is memoryview and obj.nbytes >= self.threshold and obj.c_contiguous:
            return _rebuild_memoryview, (pickle.PickleBuffer(obj), obj.format, obj.shape)
        return super().reducer_override(obj)


def _dumps(obj: Any, threshold: int, callback: Callable[[Any], Any]) -> bytes:
    out = io.BytesIO()
    _Pickler(out, threshold, callback).dump(obj)
    return out.getvalue()


def _wrap(value: Any, threshold: int) -> Any:
    kind = type(value)
    if (kind is bytes or kind is bytearray) and len(value) >= threshold:
        return _Big(value)
    return value


# ------------------------------------------------------------------ caller side


class _Entry:
    __slots__ = ("owner", "segment")

    def __init__(self, owner: Any, segment: Segment) -> None:
        self.owner = owner  # a weakref.ref, or the owner itself
        self.segment = segment

    def holds(self, owner: object) -> bool:
        held = self.owner() if isinstance(self.owner, weakref.ref) else self.owner
        return held is owner


class Placer:
    """The caller's side: pickles a call's arguments, placing large buffers once.

    Thread-safe (``Pool.submit`` runs on callers' threads). Counters, in bytes:
    ``placed`` copied into segments, ``reused`` sent again as a descriptor only.
    """

    def __init__(
        self,
        threshold: int,
        on_fallback: Callable[[str], None] | None = None,
        cache_bytes: int = CACHE_BYTES,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.threshold = threshold
        self.on_fallback = on_fallback
        self.cache_bytes = cache_bytes
        self.cache_entries = cache_entries
        self.lock = threading.RLock()
        self.entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self.cached_bytes = 0
        self.placed = 0
        self.reused = 0
        self.fallbacks = 0
        self.said_so = False

    def dumps_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, tuple[Segment, ...]]:
        """The pickled ``(args, kwargs)`` and the segments of its out-of-band buffers."""
        t = self.threshold
        args = tuple(_wrap(a, t) for a in args)
        kwargs = {k: _wrap(v, t) for k, v in kwargs.items()}
        segments: list[Segment] = []

        def callback(buf: pickle.PickleBuffer) -> bool:
            raw = buf.raw()
            if raw.nbytes < t or len(segments) >= MAX_SEGMENTS_PER_FRAME:
                return True
            segment = self.place(raw)
            if segment is None:
                return True
            segments.append(segment)
            return False

        return _dumps((args, kwargs), t, callback), tuple(segments)

    def place(self, raw: memoryview) -> Segment | None:
        """The segment holding ``raw``'s bytes (reused when its owner is unchanged)."""
        owner = raw.obj
        while type(owner) is memoryview and owner.obj is not None:
            owner = owner.obj  # a fresh view per call of the same object
        # Only a whole ``bytes`` is trusted unchanged: a view of part of one is compared.
        trusted = type(owner) is bytes and len(owner) == raw.nbytes
        key = id(owner)
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                segment = entry.segment
                if (
                    entry.holds(owner)
                    and segment.size == raw.nbytes
                    and segment.view is not None
                    and (trusted or _same(raw, memoryview(segment.view)))
                ):
                    self.entries.move_to_end(key)
                    self.reused += raw.nbytes
                    return segment
                self._drop(key)
            try:
                segment = _new_segment(raw, seal=True)
            except (OSError, ValueError) as exc:
                self._fallback(raw.nbytes, exc)
                return None
            self.placed += raw.nbytes
            try:
                ref: Any = weakref.ref(owner, self._forget(key))
            except TypeError:
                ref = owner  # bytes, bytearray: held until evicted
            self.entries[key] = _Entry(ref, segment)
            self.cached_bytes += segment.size
            while self.entries and (
                self.cached_bytes > self.cache_bytes or len(self.entries) > self.cache_entries
            ):
                self._drop(next(iter(self.entries)))
            return segment

    def _forget(self, key: int) -> Callable[[Any], None]:
        def forget(ref: Any) -> None:
            with self.lock:
                entry = self.entries.get(key)
                if entry is not None and entry.owner is ref:
                    self._drop(key)

        return forget

    def _drop(self, key: int) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.cached_bytes -= entry.segment.size

    def _fallback(self, size: int, exc: BaseException) -> None:
        self.fallbacks += 1
        if self.said_so:
            return
        self.said_so = True
        message = (
            f"shared memory unavailable ({type(exc).__name__}: {exc}); a {size}-byte "
            "argument and later ones that cannot be placed go through the socket"
        )
        log.warning("dspool: %s", message)
        if self.on_fallback is not None:
            self.on_fallback(message)

    def clear(self) -> None:
        """Drop every cached segment (the pool closed)."""
        with self.lock:
            self.entries.clear()
            self.cached_bytes = 0


# ------------------------------------------------------------------ both sides


def dumps_result(value: Any, threshold: int | None) -> tuple[bytes, list[Segment]]:
    """The pickled ``value`` and fresh segments for its large buffers (worker side).

    ``threshold`` None: plain cloudpickle, nothing out of band. A buffer whose segment
    cannot be made goes in-band.
    """
    if threshold is None:
        return cloudpickle.dumps(value), []
    segments: list[Segment] = []

    def callback(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < threshold or len(segments) >= MAX_SEGMENTS_PER_FRAME:
            return True
        try:
            segments.append(_new_segment(raw, seal=False))
        except (OSError, ValueError):
            return True
        return False

    try:
        return _dumps(_wrap(value, threshold), threshold, callback), segments
    except BaseException:
        for segment in segments:
            segment.close()
        raise


_mapped: collections.OrderedDict[tuple[int, int, int], mmap.mmap] = collections.OrderedDict()
_mapped_lock = threading.Lock()


def _map_shared(fd: int, size: int) -> mmap.mmap:
    """A read-only mapping of argument segment ``fd``, reused while it is recent.

    An argument segment never changes (sealed), and a mapping keeps its inode alive,
    so (device, inode) names the same bytes for as long as we map it. Reuse saves the
    map, the page faults and the unmap of every call after the first (measured: about
    2 ms of an 8 MB argument's round trip).
    """
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino, size)
    with _mapped_lock:
        view = _mapped.get(key)
        if view is not None:
            _mapped.move_to_end(key)
            return view
        view = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        _mapped[key] = view
        total = sum(k[2] for k in _mapped)
        while len(_mapped) > 1 and (
            total > WORKER_MAPPED_BYTES or len(_mapped) > WORKER_MAPPED_ENTRIES
        ):
            old, _view = _mapped.popitem(last=False)
            total -= old[2]  # unmapped when the last call using it lets go
        return view


def _map(attached: Sequence[tuple[int, int]], writable: bool) -> list[mmap.mmap]:
    # MAP_POPULATE was measured: no faster here (shmem maps 16 pages per fault).
    views = []
    try:
        for fd, size in attached:
            if writable:
                views.append(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
            else:
                views.append(_map_shared(fd, size))
    finally:
        close_attached(attached)
    return views


def loads(blob: bytes, attached: Sequence[tuple[int, int]] = (), writable: bool = False) -> Any:
    """Unpickle ``blob`` over the segments that came with its frame (closing their fds).

    ``writable``: map copy-on-write (results in the caller) instead of read-only
    (arguments in a worker).
    """
    if not attached:
        return pickle.loads(blob)
    return pickle.loads(blob, buffers=_map(attached, writable))


def close_attached(attached: Sequence[tuple[int, int]]) -> None:
    """Close the descriptors of a frame's segments (a frame nobody will load)."""
    for fd, _size in attached:
        try:
            os.close(fd)
        except OSError:
            pass
