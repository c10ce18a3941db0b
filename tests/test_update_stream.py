"""The engine core's update stream (shoal/engine/update_stream.py): frames over a real Unix socket.

The core writes one frame per message; the reader gets them back whole and in order however the bytes
are split between reads (a frame cut anywhere, several frames in one read, a frame larger than a read),
and a sender whose reader is gone is told so instead of raising or blocking.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import msgspec
import pytest

from shoal.engine.update_stream import HEADER, UpdateListener, UpdateSender, _Frames

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


def test_messages_cross_a_real_socket_in_order(tmp_path):
    """The core's sender (on a thread, blocking) and the server's listener (on the event loop): 2,000
    messages, some larger than the socket's buffer, arrive decoded and in order."""
    messages = [{"i": i, "blob": "x" * (300_000 if i % 500 == 0 else i % 50)} for i in range(2000)]
    decoder = msgspec.msgpack.Decoder()

    async def main() -> list:
        listener = UpdateListener(str(tmp_path / "updates"))
        got: list = []
        done = asyncio.get_running_loop().create_future()

        def on_frame(payload: memoryview) -> None:
            got.append(decoder.decode(payload))
            if len(got) == len(messages):
                done.set_result(None)

        def core() -> None:
            sender = UpdateSender(listener.path)
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
    path = str(tmp_path / "updates")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    sender = UpdateSender(path)
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
