"""The stream between the server and its engine core: length-prefixed msgpack frames, both ways, over one
Unix stream socket.

The server listens (`ServerEnd`, before the core is spawned) and the core connects (`CoreEnd`). The
server's event loop writes requests (adds, aborts, control calls) and reads updates (one StepUpdate a
step, so one a token for a single stream); the core's own thread writes updates and reads requests,
between steps and, under `--scheduling-policy priority`, between decoder layers (engine/interrupt.py).

Why not ZMQ, as vLLM V1 has it: a ZMQ message crosses an I/O thread on each side (the sender's thread
hands it to its I/O thread, which writes it; the receiver's I/O thread reads it and signals the
receiving thread), so each message woke three threads, on two cores that the engine's OpenMP threads
need. Here the thread that sends writes the socket and the thread that receives reads it: one wake-up a
message. Measured in docs/benchmarks.md ("the update stream without ZMQ", then "requests without ZMQ").

A frame is a 4-byte little-endian payload length, then the payload (a msgpack message). Neither side
waits for the other's reads: the server's writes queue in its transport (never blocking the event loop,
as ZMQ's unlimited high-water mark did), and the core blocks only while its own send buffer is full (a
server that cannot keep up slows the engine down). A core whose server is gone gets False from `send`,
or sees `closed`, and stops.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from collections.abc import Callable

import msgspec

HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 1 << 31  # a 4-byte length; messages are far smaller (the largest: prompt logprobs)
# Asked for (the kernel caps it at net.core.wmem_max): room for some steps' updates while the server's event
# loop is busy elsewhere, before the core blocks; ZMQ queued up to 1,000 messages.
SEND_BUFFER_BYTES = 4 << 20
RECEIVE_BYTES = 1 << 16  # one read of the core's; requests are small (an AddRequest: the prompt's token ids)


class FrameEncoder:
    """msgpack into one reused buffer, after room for the frame's header."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer = bytearray(HEADER.size)

    def frame(self, message: object) -> bytearray:
        """The frame of message (valid until the next call); ValueError past MAX_FRAME_BYTES."""
        buffer = self._buffer
        self._encoder.encode_into(message, buffer, HEADER.size)  # truncates the buffer to its end
        size = len(buffer) - HEADER.size
        if size >= MAX_FRAME_BYTES:
            raise ValueError(f"a message of {size} bytes does not fit a frame")
        HEADER.pack_into(buffer, 0, size)
        return buffer


class CoreEnd:
    """The core's end: connect to the server's listener, send updates (blocking) and receive requests
    (never blocking; `readable` waits for one while the core is idle)."""

    def __init__(self, path: str):
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        connection.connect(path)
        self._use(connection)

    @classmethod
    def over(cls, connection: socket.socket) -> CoreEnd:
        """A core's end on a socket already connected (a socketpair's, in tests and benchmarks)."""
        end = cls.__new__(cls)
        end._use(connection)
        return end

    def _use(self, connection: socket.socket) -> None:
        self._socket = connection
        self._frames = FrameEncoder()
        self._poller = select.poll()
        self._poller.register(self._socket.fileno(), select.POLLIN)
        self._received: list[bytes] = []
        self._splitter = _Frames(lambda payload: self._received.append(bytes(payload)))
        self.closed = False  # the server closed its end (or it broke): the core stops

    def send(self, message: object) -> bool:
        """Send one message as a frame. False if the server is gone (the caller stops); ValueError if the
        encoded message does not fit a frame (2 GiB)."""
        try:
            self._socket.sendall(self._frames.frame(message))
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False
        return True

    def readable(self, timeout_ms: int) -> bool:
        """Whether bytes (or the end of the stream) have arrived, waiting up to timeout_ms for them."""
        return bool(self._poller.poll(timeout_ms))

    def receive(self) -> list[bytes]:
        """The payloads of every whole frame that has arrived, in order, without blocking: one poll(2)
        when nothing has (this is called between decoder layers). Sets `closed` at the end of the stream."""
        while not self.closed and self._poller.poll(0):
            try:
                data = self._socket.recv(RECEIVE_BYTES)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                break
            self._splitter.data_received(data)
        received, self._received = self._received, []
        return received

    def close(self) -> None:
        self._socket.close()


class ServerEnd:
    """The server's end: a listening socket bound before the core is spawned, then the accepted stream,
    read and written on the event loop."""

    def __init__(self, path: str):
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._transport: asyncio.Transport | None = None
        self._frames = FrameEncoder()
        self._unsent: list[bytes] = []  # frames sent before the core connected, in order
        self._closed = False

    async def follow(self, on_frame: Callable[[memoryview], None]) -> None:
        """Accept the core's connection, then call on_frame(payload) for each frame, in order, on the
        event loop. The payload is only valid during the call (it may point into a reused buffer)."""
        loop = asyncio.get_running_loop()
        connection, _ = await loop.sock_accept(self._listener)
        self._listener.close()
        self._transport, _ = await loop.connect_accepted_socket(lambda: _Frames(on_frame), connection)
        for frame in self._unsent:
            self._transport.write(frame)
        self._unsent = []

    def send(self, message: object) -> None:
        """Queue one message for the core (never blocks); kept in order until the core has connected.
        Dropped once the stream is closed. ValueError if the encoded message does not fit a frame."""
        if self._closed:
            return
        frame = bytes(self._frames.frame(message))  # a transport may keep what it could not write yet
        if self._transport is None:
            self._unsent.append(frame)
        elif not self._transport.is_closing():
            self._transport.write(frame)

    def close(self) -> None:
        """Close the listener and the stream (its reader leaves the event loop); safe to call twice, and
        after the event loop has closed."""
        self._closed = True
        self._unsent = []
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
