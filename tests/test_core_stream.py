"""The stream between the server and the engine core (shoal/engine/core_stream.py): frames over a real
Unix socket, both ways.

Each side writes one frame per message; the reader gets them back whole and in order however the bytes
are split between reads (a frame cut anywhere, several frames in one read, a frame larger than a read).
The server's messages sent before the core connects wait for it. The core never blocks to read, sees the
server's end close, and a core whose server is gone is told so instead of raising or blocking.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import msgspec
import pytest

from shoal.engine.core_stream import HEADER, CoreEnd, ServerEnd, _Frames

pytestmark = pytest.mark.timeout(30)


def _framed(payloads: list[bytes]) -> bytes:
    return b"".join(HEADER.pack(len(p)) + p for p in payloads)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 7, 64])
def test_frames_come_back_whole_and_in_order_however_the_stream_is_split(cut):
    payloads = [b"", b"a", b"xyz" * 100, bytes(range(256)), b"end"]
    stream = _framed(payloads)
    got: list[bytes] = []
    frames = _Frames(lambda p: got.append(bytes(p)))
    for start in range(0, len(stream), cut):
        frames.data_received(stream[start : start + cut])
    assert got == payloads


def test_several_frames_in_one_read_and_a_partial_tail():
    got: list[bytes] = []
    frames = _Frames(lambda p: got.append(bytes(p)))
    stream = _framed([b"one", b"two", b"three"])
    frames.data_received(stream[:-2])
    assert got == [b"one", b"two"]
    frames.data_received(stream[-2:])
    assert got == [b"one", b"two", b"three"]


def test_updates_cross_a_real_socket_in_order(tmp_path):
    """The core's end (on a thread, blocking) and the server's (on the event loop): 2,000 messages, some
    larger than the socket's buffer, arrive decoded and in order."""
    messages = [{"i": i, "blob": "x" * (300_000 if i % 500 == 0 else i % 50)} for i in range(2000)]
    decoder = msgspec.msgpack.Decoder()

    async def main() -> list:
        listener = ServerEnd(str(tmp_path / "stream"))
        got: list = []
        done = asyncio.get_running_loop().create_future()

        def on_frame(payload: memoryview) -> None:
            got.append(decoder.decode(payload))
            if len(got) == len(messages):
                done.set_result(None)

        def core() -> None:
            sender = CoreEnd(listener.path)
            assert all(sender.send(m) for m in messages)
            sender.close()

        following = asyncio.ensure_future(listener.follow(on_frame))
        thread = threading.Thread(target=core)
        thread.start()
        await following
        await asyncio.wait_for(done, 20)
        thread.join(5)
        listener.close()
        return got

    assert asyncio.run(main()) == messages


def test_a_sender_whose_reader_is_gone_gets_false(tmp_path):
    path = str(tmp_path / "stream")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    sender = CoreEnd(path)
    connection, _ = server.accept()
    assert sender.send({"hello": 1})
    connection.close()
    server.close()
    # The first write after the close may still be accepted by the kernel; a later one fails.
    results = [sender.send({"after": i, "pad": "x" * 100_000}) for i in range(4)]
    assert results[-1] is False
    sender.close()


def test_a_frame_of_megabytes_in_many_reads_is_parsed_once_it_is_whole():
    """16 MB in 256 KB reads (asyncio's read size): the pending buffer is parsed only when it holds the
    whole frame, not at each of the 64 reads (which re-copied it each time: quadratic, 0.4 s here)."""
    payload = bytes(range(256)) * (1 << 16)  # 16 MB
    stream = _framed([payload, b"next"])
    got: list[bytes] = []
    frames = _Frames(lambda p: got.append(bytes(p)))
    parses = []
    split = frames._split
    frames._split = lambda buffer: parses.append(len(buffer)) or split(buffer)
    for start in range(0, len(stream), 1 << 18):
        frames.data_received(stream[start : start + (1 << 18)])
    assert got == [payload, b"next"]
    assert len(parses) == 2  # the first read (the header), then the read that completed the frame


def test_requests_reach_the_core_in_order_and_it_never_blocks_to_read_them(tmp_path):
    """The server's messages, sent before the core connects and after, arrive whole and in order (the
    largest in many reads); the core's receive returns at once when nothing has arrived, and it sees the
    server's end close."""
    early = [{"early": i} for i in range(3)]
    late = [{"late": i, "ids": list(range(i * 5_000))} for i in range(20)]  # up to ~190 KB of msgpack
    decoder = msgspec.msgpack.Decoder()

    async def main() -> tuple[list, list[bool], bool]:
        server = ServerEnd(str(tmp_path / "stream"))
        for m in early:
            server.send(m)  # queued: no core yet
        following = asyncio.ensure_future(server.follow(lambda payload: None))
        core = await asyncio.to_thread(CoreEnd, server.path)
        await following

        def read(count: int) -> list:
            got: list = []
            while len(got) < count:
                assert core.readable(5_000)
                got += [decoder.decode(p) for p in core.receive()]
            return got

        got = await asyncio.to_thread(read, len(early))
        empty = [await asyncio.to_thread(core.receive) == [], not await asyncio.to_thread(core.readable, 50)]
        for m in late:
            server.send(m)
        got += await asyncio.to_thread(read, len(late))
        server.close()
        server.send({"after": "close"})  # dropped, not kept: nothing would ever send it
        assert server._unsent == []
        await asyncio.to_thread(core.readable, 5_000)
        assert await asyncio.to_thread(core.receive) == []
        closed = core.closed
        core.close()
        return got, empty, closed

    got, empty, closed = asyncio.run(main())
    assert got == early + late
    assert empty == [True, True]
    assert closed
