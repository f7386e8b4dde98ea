"""The wire protocol between the pool, the template process and the workers.

Pool <-> worker: a stream socket per worker (a socketpair the pool makes; the worker's
end reaches it through the template by SCM_RIGHTS). Each frame is a fixed header
``(kind, meta length, blob length)``, a small pickled ``meta`` tuple and a raw ``blob``
(the cloudpickled arguments or result, so big payloads are not copied twice).

Pool <-> template: a SOCK_SEQPACKET socket; each packet is one pickled dict (``op`` says
what it is), a worker's socket riding along as ancillary data on ``spawn``.

Frames with shared segments (:mod:`~dspool_jupyter.shm`): the kind byte has
:data:`WITH_FDS` set, the meta's last element is the tuple of the segments' sizes, and
their descriptors ride as SCM_RIGHTS ancillary data on the frame's first byte (so they
change no byte count of the stream). A receiver that passes a descriptor queue gets the
kind without the flag and, as the meta's last element, an :class:`Attached` tuple
``((fd, size), ...)`` (find it with :func:`attached`, wherever the meta ends); it owns
those descriptors. Frames without segments are byte-for-byte what they were before.

Both sides import only this module, so the worker never imports the kernel side.
"""

from __future__ import annotations

import array
import collections
import os
import pickle
import socket
import struct
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CALL",
    "CONTROL_MAX_BYTES",
    "ERROR",
    "EXIT_OUT_OF_MEMORY",
    "FATAL",
    "HEADER",
    "HEARTBEAT",
    "HELLO",
    "INTERRUPT",
    "RESULT",
    "STOP",
    "WITH_FDS",
    "Attached",
    "FrameReader",
    "ProtocolError",
    "attached",
    "encode_frame",
    "recv_control",
    "recv_frame",
    "send_control",
    "recv_some",
    "send_frame",
]

HEADER = struct.Struct("!BIQ")  # kind, meta bytes, blob bytes

# pool -> worker
CALL = 1  # meta: (call_id, program_id, program name); blob: cloudpickled (args, kwargs)
STOP = 2  # meta: (); the worker exits 0
# meta: (call_id, reason) with reason "cancel" or "timeout". Only a worker that runs
# several calls at once (config "concurrency" > 1) gets it: it interrupts that one call
# (KeyboardInterrupt in its thread, or its asyncio task cancelled), which then replies
# ERROR with phase "cancelled". A worker of concurrency 1 is interrupted by SIGINT instead.
# An INTERRUPT for a call the worker no longer runs is ignored.
INTERRUPT = 3
# worker -> pool
HELLO = 10  # meta: (worker_id, pid)
# ``usage``: the call's LM usage (a dict, see usage.Usage.as_dict) or None.
RESULT = 11  # meta: (call_id, stdout, stderr, usage); blob: cloudpickled value
ERROR = 12  # meta: (call_id, error dict, stdout, stderr, usage); blob: pickled exception or b""
HEARTBEAT = 13  # meta: (rss bytes or None, busy call id or None)
FATAL = 14  # meta: (message,); the worker could not start and exits next

# A worker's exit status when it ran out of memory (its worker_memory_limit) and could
# not recover: it exits with this code instead of replying. The pool reports the calls
# it ran as WorkerCrashed naming the memory limit.
EXIT_OUT_OF_MEMORY = 86

WITH_FDS = 0x80  # kind flag: the frame carries descriptors (see the module docstring)
MAX_FDS = 64  # descriptors one frame may carry
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
MAX_META_BYTES = 64 * 1024 * 1024  # a larger meta part is a protocol breach
CONTROL_MAX_BYTES = 1 << 16  # control packets are small dicts


class ProtocolError(Exception):
    """A peer sent something that is not a frame of this protocol."""


def encode_frame(
    kind: int, meta: tuple[Any, ...], blob: bytes = b"", sizes: tuple[int, ...] = ()
) -> bytes:
    """One frame; ``sizes``: those of the segments whose descriptors go with it."""
    if sizes:
        kind |= WITH_FDS
        meta = (*meta, sizes)
    meta_bytes = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(kind, len(meta_bytes), len(blob)) + meta_bytes + blob


def send_frame(
    sock: socket.socket,
    kind: int,
    meta: tuple[Any, ...],
    blob: bytes = b"",
    fds: Sequence[int] = (),
    sizes: tuple[int, ...] = (),
) -> None:
    """Blocking send of one frame (worker side), with segment descriptors ``fds``."""
    if fds:
        frame = memoryview(encode_frame(kind, meta, blob, sizes))
        sent = sock.sendmsg(
            [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        )
        if sent < len(frame):
            sock.sendall(frame[sent:])
        return
    meta_bytes = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    header = HEADER.pack(kind, len(meta_bytes), len(blob))
    if len(blob) > 65536:
        sock.sendall(header + meta_bytes)
        sock.sendall(blob)
    else:
        sock.sendall(header + meta_bytes + blob)


def _take_fds(
    ancillary: list[tuple[int, int, bytes]], flags: int, fds: collections.deque[int]
) -> None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    if flags & socket.MSG_CTRUNC:
        raise ProtocolError("a frame carried more descriptors than allowed")


def _recv_exactly(
    sock: socket.socket, size: int, fds: collections.deque[int] | None = None
) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if fds is None:
            n = sock.recv_into(view[got:])
        else:
            n, ancillary, flags, _addr = sock.recvmsg_into([view[got:]], ANCILLARY_SPACE)
            _take_fds(ancillary, flags, fds)
        if n == 0:
            return None
        got += n
    return bytes(buf)


class Attached(tuple[tuple[int, int], ...]):
    """The segments a received frame carried, ``((fd, size), ...)``: its meta's last element.

    A type of its own, so a receiver finds them by :func:`attached` and not by position
    (a meta that grows an element does not shift them onto something else).
    """

    __slots__ = ()


def attached(meta: tuple[Any, ...]) -> Attached:
    """The segments that came with a received frame whose meta is ``meta`` (or none)."""
    last = meta[-1] if meta else None
    return last if isinstance(last, Attached) else Attached()


def _attach(
    kind: int, meta: tuple[Any, ...], fds: collections.deque[int]
) -> tuple[int, tuple[Any, ...]]:
    sizes = meta[-1]
    if len(fds) < len(sizes):
        raise ProtocolError(f"a frame announced {len(sizes)} descriptors, {len(fds)} came")
    segments = Attached((fds.popleft(), int(size)) for size in sizes)
    return kind & ~WITH_FDS, (*meta[:-1], segments)


def recv_frame(
    sock: socket.socket, fds: collections.deque[int] | None = None
) -> tuple[int, tuple[Any, ...], bytes] | None:
    """Blocking receive of one frame; ``None`` when the peer closed the socket.

    With ``fds`` (a queue kept for the socket) descriptors are received too, and a
    frame that carries some gets them as its meta's last element (module docstring).
    """
    header = _recv_exactly(sock, HEADER.size, fds)
    if header is None:
        return None
    kind, meta_len, blob_len = HEADER.unpack(header)
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"frame meta of {meta_len} bytes")
    # Descriptors ride on a frame's first byte, read with the header: the body is read
    # with plain recv (recvmsg costs ~6 us more per read).
    body = _recv_exactly(sock, meta_len + blob_len) if meta_len + blob_len else b""
    if body is None:
        return None
    meta = pickle.loads(body[:meta_len])
    if kind & WITH_FDS:
        if fds is None:
            raise ProtocolError("a frame with descriptors on a socket read without them")
        kind, meta = _attach(kind, meta, fds)
    return kind, meta, body[meta_len:]


def recv_some(sock: socket.socket, buffer: memoryview) -> tuple[int, list[int]]:
    """Read into ``buffer``: how many bytes, and the descriptors that came with them.

    Into a buffer kept by the reader: ``recv(1 MiB)`` allocates a megabyte per read.
    """
    n, ancillary, flags, _addr = sock.recvmsg_into([buffer], ANCILLARY_SPACE)
    if not ancillary:
        return n, []
    fds: collections.deque[int] = collections.deque()
    _take_fds(ancillary, flags, fds)
    return n, list(fds)


class FrameReader:
    """Incremental frame parser for the pool's non-blocking reads."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: collections.deque[int] = collections.deque()

    def feed(
        self, data: bytes | memoryview, fds: Sequence[int] = ()
    ) -> list[tuple[int, tuple[Any, ...], bytes]]:
        """The frames ``data`` completes; ``fds`` came with it (see the module docstring)."""
        self._buf += data
        if fds:
            self._fds.extend(fds)
        frames = []
        buf = self._buf
        offset = 0
        size = len(buf)
        while size - offset >= HEADER.size:
            kind, meta_len, blob_len = HEADER.unpack_from(buf, offset)
            if meta_len > MAX_META_BYTES:
                raise ProtocolError(f"frame meta of {meta_len} bytes")
            end = offset + HEADER.size + meta_len + blob_len
            if end > size:
                break
            start = offset + HEADER.size
            meta = pickle.loads(buf[start : start + meta_len])
            if kind & WITH_FDS:
                kind, meta = _attach(kind, meta, self._fds)
            frames.append((kind, meta, bytes(buf[start + meta_len : end])))
            offset = end
        if offset:
            del buf[:offset]
        return frames

    def pending_bytes(self) -> int:
        """How many bytes of an unfinished frame are buffered."""
        return len(self._buf)

    def close(self) -> None:
        """Close descriptors that came for a frame that will never be complete."""
        while self._fds:
            _close_quietly(self._fds.popleft())


def send_control(
    sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None
) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv_control(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One control packet and the descriptors that came with it; ``None`` on EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, CONTROL_MAX_BYTES, 4)
    if not data:
        for fd in fds:
            _close_quietly(fd)
        return None
    message = pickle.loads(data)
    if not isinstance(message, dict):
        raise ProtocolError("control packet is not a dict")
    return message, list(fds)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
