"""The wire protocol between the pool, the template process and the workers.

Pool <-> worker: a stream socket per worker (a socketpair the pool makes; the worker's
end reaches it through the template by SCM_RIGHTS). Each frame is a fixed header
``(kind, meta length, blob length)``, a small pickled ``meta`` tuple and a raw ``blob``
(the cloudpickled arguments or result, so big payloads are not copied twice).

Pool <-> template: a SOCK_SEQPACKET socket; each packet is one pickled dict (``op`` says
what it is), a worker's socket riding along as ancillary data on ``spawn``.

Both sides import only this module, so the worker never imports the kernel side.
"""

from __future__ import annotations

import pickle
import socket
import struct
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
    "FrameReader",
    "ProtocolError",
    "encode_frame",
    "recv_control",
    "recv_frame",
    "send_control",
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

MAX_META_BYTES = 64 * 1024 * 1024  # a larger meta part is a protocol breach
CONTROL_MAX_BYTES = 1 << 16  # control packets are small dicts


class ProtocolError(Exception):
    """A peer sent something that is not a frame of this protocol."""


def encode_frame(kind: int, meta: tuple[Any, ...], blob: bytes = b"") -> bytes:
    meta_bytes = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(kind, len(meta_bytes), len(blob)) + meta_bytes + blob


def send_frame(sock: socket.socket, kind: int, meta: tuple[Any, ...], blob: bytes = b"") -> None:
    """Blocking send of one frame (worker side)."""
    meta_bytes = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    header = HEADER.pack(kind, len(meta_bytes), len(blob))
    if len(blob) > 65536:
        sock.sendall(header + meta_bytes)
        sock.sendall(blob)
    else:
        sock.sendall(header + meta_bytes + blob)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[int, tuple[Any, ...], bytes] | None:
    """Blocking receive of one frame; ``None`` when the peer closed the socket."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    kind, meta_len, blob_len = HEADER.unpack(header)
    if meta_len > MAX_META_BYTES:
        raise ProtocolError(f"frame meta of {meta_len} bytes")
    body = _recv_exactly(sock, meta_len + blob_len) if meta_len + blob_len else b""
    if body is None:
        return None
    meta = pickle.loads(body[:meta_len])
    return kind, meta, body[meta_len:]


class FrameReader:
    """Incremental frame parser for the pool's non-blocking reads."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, tuple[Any, ...], bytes]]:
        self._buf += data
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
            frames.append((kind, meta, bytes(buf[start + meta_len : end])))
            offset = end
        if offset:
            del buf[:offset]
        return frames

    def pending_bytes(self) -> int:
        """How many bytes of an unfinished frame are buffered."""
        return len(self._buf)


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
    import os

    try:
        os.close(fd)
    except OSError:
        pass
