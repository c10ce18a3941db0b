"""The engine core's updates to the server: length-prefixed frames over a Unix stream socket.

Requests go to the core over ZMQ (engine/core_client.py, engine/interrupt.py: the core polls that inbox
between layers); its updates (one StepUpdate a step, so one a token for a single stream) come back here.
Why not ZMQ for them too: a ZMQ message crosses an I/O thread on each side (the core's thread hands it
to its I/O thread, which writes it; the server's I/O thread reads it and signals the event loop), so each
token woke three threads, on two cores that the engine's OpenMP threads need. Here the core's own thread
writes the frame and the server's event loop reads it: one wake-up a token. Measured in
docs/benchmarks.md ("the update stream without ZMQ").

A frame is a 4-byte little-endian payload length, then the payload (a msgpack message). The server
listens (`UpdateListener`, before the core is spawned) and the core connects (`UpdateSender`). The
core blocks while the socket's buffer is full (a server that cannot keep up slows the engine down,
as ZMQ's high-water mark did); a sender whose server is gone gets False and stops.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import msgspec

HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 31  # a 4-byte length; messages are far smaller (the largest: prompt logprobs)
# Asked for (the kernel caps it at net.core.wmem_max): room for some steps' updates while the server's event
# loop is busy elsewhere, before the core blocks; ZMQ queued up to 1,000 messages.
SEND_BUFFER_BYTES = 4 << 20


class UpdateSender:
    """The core's end: connect to the server's listener and send msgpack frames (blocking)."""

    def __init__(self, path: str):
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._socket.connect(path)
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer = bytearray(HEADER.size)  # reused: encode_into writes the payload after the header

    def send(self, message: object) -> bool:
        """Send one message as a frame. False if the server is gone (the caller stops); ValueError if the
        encoded message does not fit a frame (2 GiB)."""
        buffer = self._buffer
        self._encoder.encode_into(message, buffer, HEADER.size)  # truncates the buffer to its end
        size = len(buffer) - HEADER.size
        if size >= MAX_FRAME_BYTES:
            raise ValueError(f"an update of {size} bytes does not fit a frame")
        HEADER.pack_into(buffer, 0, size)
        try:
            self._socket.sendall(buffer)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def close(self) -> None:
        self._socket.close()


class UpdateListener:
    """The server's end: a listening socket bound before the core is spawned, then the accepted stream."""

    def __init__(self, path: str):
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._transport: asyncio.Transport | None = None

    async def follow(self, on_frame: Callable[[memoryview], None]) -> None:
        """Accept the core's connection, then call on_frame(payload) for each frame, in order, on the
        event loop. The payload is only valid during the call (it may point into a reused buffer)."""
        loop = asyncio.get_running_loop()
        connection, _ = await loop.sock_accept(self._listener)
        self._listener.close()
        self._transport, _ = await loop.connect_accepted_socket(lambda: _Frames(on_frame), connection)

    def close(self) -> None:
        """Close the listener and the stream (its reader leaves the event loop); safe to call twice, and
        after the event loop has closed."""
        self._listener.close()
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.close()
            except RuntimeError:  # the event loop is already closed: nothing is registered with it any more
                pass


class _Frames(asyncio.Protocol):
    """Splits the byte stream into frames. Most reads hold whole frames (a step's update), handed over
    from the read's bytes without a copy; a partial frame collects in a buffer, each byte copied once,
    and is parsed only once the bytes it needs are there (a frame of megabytes arrives in many reads of
    at most 256 KB: re-parsing or re-copying the buffer at each would be quadratic)."""

    def __init__(self, on_frame: Callable[[memoryview], None]):
        self._on_frame = on_frame
        self._pending = bytearray()
        self._needed = HEADER.size  # bytes the pending buffer must hold before a frame can be complete

    def data_received(self, data: bytes) -> None:
        if not self._pending:
            used = self._split(data)
            if used < len(data):
                self._pending += memoryview(data)[used:]
            return
        self._pending += data
        if len(self._pending) >= self._needed:
            used = self._split(self._pending)
            del self._pending[:used]

    def _split(self, buffer: bytes | bytearray) -> int:
        """Hand over every whole frame at the start of buffer; returns the bytes they took, and sets
        _needed for the incomplete one after them (the consumer must not keep the view it is given)."""
        start, end = 0, len(buffer)
        with memoryview(buffer) as view:
            while end - start >= HEADER.size:
                (size,) = HEADER.unpack_from(view, start)
                if end - start - HEADER.size < size:
                    self._needed = HEADER.size + size
                    return start
                start += HEADER.size
                self._on_frame(view[start : start + size])
                start += size
        self._needed = HEADER.size
        return start
