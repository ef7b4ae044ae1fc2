"""Fuzz the sans-IO connection core (``virnet._core.ConnectionCore``) with byte streams.

    python fuzz/fuzz_core.py [-runs=N] [corpus_dir ...]
    VIRNET_NO_EXTENSIONS=1 python fuzz/fuzz_core.py ...   # the pure-Python twin

A ``ConnectionCore`` subclass with stub hooks (they record what they get) is fed the
stream; the rule is h11's: whatever the bytes, the core only ever raises the library's
own errors (``virnet.errors.VirnetError`` and its subclasses ``ProtocolError`` and
``XdrError``), and what it queues for output is well-formed packets.

Input layout: byte 0 configures the core: bit 0 client role (else server), bit 1 native
mode (HELLO negotiated: CREDIT allowed), bit 2 streams opened (real
``_streams.StreamCore``s, through ``open_stream``; odd serials sparse) for FILES
UPLOAD/DOWNLOAD serials 1-4, bit 3 calls pending (client role: FILES procedures
1-7 with serials 1-7, so that REPLY packets can match), bit 4 ``feed()`` instead of
``get_buffer``/``buffer_updated``, bit 5 a small ``max_message`` (4096).  Byte 1: the
read size (1-255, 0 means as much as the buffer takes; after ``MAX_READS`` reads,
the rest in one).  The rest: the byte stream.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness

_harness.start(__name__ == "__main__")

with atheris.instrument_imports(include=["virnet"]):
    from virnet._core import ConnectionCore, KeepaliveAction, Mode
    from virnet._impl import FrameDecoder, Message
    from virnet.constants import FILES_PROGRAM
    from virnet.errors import VirnetError
    from virnet.limits import Limits


MAX_READS = 256


class Core(ConnectionCore):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.log: list[object] = []
        self.outputs = 0

    def on_call(self, msg: Message) -> None:
        self.log.append(("call", msg.prog, msg.serial, bytes(msg.payload)))
        # Answer like a server would, so output is exercised on the server side too.
        self.send_reply(msg.prog, msg.vers, msg.proc, msg.serial, 1, b"")

    def on_reply(self, serial: int, status: int, payload: object) -> None:
        self.log.append(("reply", serial, status))

    def on_event(self, msg: Message) -> None:
        self.log.append(("event", msg.prog, msg.proc))

    def on_unrouted_stream(self, msg: Message) -> None:
        self.log.append(("unrouted", msg.serial))

    def on_pong(self) -> None:
        self.log.append("pong")

    def on_output(self) -> None:
        self.outputs += 1


def test_one(data: bytes) -> None:
    if len(data) < 2:
        return
    config = data[0]
    step = data[1]
    stream = data[2:]
    core = Core(
        is_client=bool(config & 1),
        limits=Limits(max_message=4096 if config & 32 else 1 << 25),
    )
    if config & 2:
        core.mode = Mode.NATIVE
        core.features = 3
    if config & 4:
        for serial in range(1, 5):
            for proc in (3, 4):
                core.open_stream(FILES_PROGRAM, 1, proc, serial, sparse=bool(serial & 1))
    if config & 8 and core.is_client:
        for serial in range(1, 8):
            core.send_call(FILES_PROGRAM, 1, serial, b"", serial=serial)
        core.take_output(1 << 20)
    reads = 0
    try:
        if config & 16:
            pos = 0
            while pos < len(stream):
                # Past MAX_READS reads the rest goes in one (bounded time per input).
                n = step if step and reads < MAX_READS else len(stream)
                reads += 1
                core.feed(stream[pos : pos + n])
                pos += n
        else:
            pos = 0
            while pos < len(stream):
                want = step if step and reads < MAX_READS else 0
                reads += 1
                buf = core.get_buffer(want or -1)
                n = min(len(buf), want or len(buf), len(stream) - pos)
                buf[:n] = stream[pos : pos + n]
                core.buffer_updated(n)
                pos += n
    except VirnetError:
        pass
    for _ in range(3):
        if core.keepalive.tick() is KeepaliveAction.PING:
            core.ping()
    out = b"".join(bytes(b) for b in core.take_output(1 << 22))
    check = FrameDecoder()
    msgs = check.feed(out)
    if check.pending:
        raise AssertionError("the core queued a partial packet")
    for m in msgs:
        if m.type not in (0, 1, 2, 3):  # CALL, REPLY, MESSAGE, STREAM (stream errors)
            raise AssertionError(f"the core queued a packet of type {m.type}")


if __name__ == "__main__":
    _harness.fuzz("core", test_one)
