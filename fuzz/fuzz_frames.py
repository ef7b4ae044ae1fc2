"""Fuzz the frame decoder (``FrameDecoder``) of the wire core, fed arbitrary splits.

    python fuzz/fuzz_frames.py [-runs=N] [-max_len=N] [corpus_dir ...]
    VIRNET_NO_EXTENSIONS=1 python fuzz/fuzz_frames.py ...   # the pure-Python twin

Input layout (``make_seeds.py`` writes seeds in it):

* byte 0: configuration.  Bits 0-2 pick ``max_message``; bit 3: the rest is a *script*
  (records that expand to large packets cheaply) rather than the raw byte stream; bit 4:
  use ``feed()`` instead of ``get_buffer``/``buffer_updated``; bit 5: hold on to every
  payload until the end (pooled buffers must then never be reused under it).
* byte 1: ``k``, the number of split bytes that follow (0-63); each gives the size of
  one read (cycled); none means one read per ``get_buffer``.
* the rest: the byte stream, or the script: a record is a tag byte, then for an even tag
  a length byte and that many raw bytes, for an odd tag a 24-byte header, a 3-byte
  payload length (modulo ``MAX_PAYLOAD``) and a fill byte: a whole well-formed packet.

Oracle: a ten-line reference parser of the same stream.  The decoder must deliver
exactly its packets (fields and payload bytes), raise ``ProtocolError`` exactly when it
meets a bad length word, stay dead after that, and report the bytes of an incomplete
last packet as ``pending``.  Any other exception is a finding.
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness

_harness.start(__name__ == "__main__")

with atheris.instrument_imports(include=["virnet"]):
    from virnet._impl import FrameDecoder
    from virnet.constants import LEN_SIZE, MAX_MESSAGE, MIN_PACKET
    from virnet.errors import ProtocolError

MAX_MESSAGES = [MAX_MESSAGE, 24, 100, 4096, 65536, 70000, 262144 + 24, 1 << 20]
#: Bounds on what a script expands to: a synthetic payload of up to 320 KiB passes every
#: size threshold of the decoder (64 KiB direct reads, 256 KiB pooled buffers) and
#: costs far less per input than megabytes would.
MAX_PAYLOAD = 320 << 10
MAX_STREAM = 1 << 20
MAX_READS = 512
_LEN = struct.Struct(">I")
_HEADER = struct.Struct(">IIiiIi")


def expand(script: bytes) -> bytes:
    """The byte stream a script describes."""
    out = bytearray()
    pos = 0
    n = len(script)
    while pos < n and len(out) < MAX_STREAM:
        tag = script[pos]
        pos += 1
        if tag & 1 == 0:
            size = script[pos] if pos < n else 0
            out += script[pos + 1 : pos + 1 + size]
            pos += 1 + size
        else:
            header = script[pos : pos + 24].ljust(24, b"\0")
            pos += 24
            plen = int.from_bytes(script[pos : pos + 3].ljust(3, b"\0"), "big") % MAX_PAYLOAD
            pos += 3
            fill = script[pos : pos + 1] or b"\0"
            pos += 1
            out += _LEN.pack(MIN_PACKET + plen) + header + fill * plen
    return bytes(out)


def reference(stream: bytes, max_message: int) -> tuple[list[tuple[object, ...]], int, int]:
    """(packets, offset of a bad length word or -1, pending bytes at the end)."""
    packets: list[tuple[object, ...]] = []
    pos = 0
    while len(stream) - pos >= LEN_SIZE:
        (length,) = _LEN.unpack_from(stream, pos)
        if length < MIN_PACKET or length - LEN_SIZE > max_message:
            return packets, pos, 0
        if len(stream) - pos < length:
            break
        fields = _HEADER.unpack_from(stream, pos + LEN_SIZE)
        packets.append((*fields, stream[pos + MIN_PACKET : pos + length]))
        pos += length
    return packets, -1, len(stream) - pos


def picture(msg: object) -> tuple[object, ...]:
    m: object = msg
    return (
        m.prog, m.vers, m.proc, m.type, m.serial, m.status,  # type: ignore[attr-defined]
        bytes(m.payload),  # type: ignore[attr-defined]
    )


def test_one(data: bytes) -> None:
    if len(data) < 2:
        return
    config = data[0]
    k = data[1] & 63
    splits = [b + 1 if b < 240 else (b - 239) * 16384 for b in data[2 : 2 + k]]
    body = data[2 + k :]
    stream = expand(body) if config & 8 else body
    max_message = MAX_MESSAGES[config & 7]
    use_feed = bool(config & 16)
    hold = bool(config & 32)

    want, bad_at, want_pending = reference(stream, max_message)
    dec = FrameDecoder(max_message)
    got: list[tuple[object, ...]] = []
    held: list[object] = []
    failed_at = -1
    pos = 0
    i = 0
    total = len(stream)
    try:
        while pos < total:
            # Past MAX_READS reads the rest goes in whole reads (bounded time per input).
            step = splits[i % len(splits)] if splits and i < MAX_READS else total - pos
            i += 1
            if use_feed:
                n = min(step, total - pos)
                msgs = dec.feed(stream[pos : pos + n])
            else:
                buf = dec.get_buffer(step)
                n = min(len(buf), step, total - pos)
                if n == 0:
                    raise AssertionError(f"get_buffer gave {len(buf)} bytes of room")
                buf[:n] = stream[pos : pos + n]
                msgs = dec.buffer_updated(n)
            pos += n
            for m in msgs:
                got.append(picture(m))
                if hold:
                    held.append(m)
    except ProtocolError:
        failed_at = pos
    if bad_at < 0:
        if failed_at >= 0:
            raise AssertionError(f"ProtocolError on a valid stream (after {failed_at} bytes)")
        if got != want:
            raise AssertionError(f"decoded {len(got)} packets, the reference {len(want)}")
        if dec.pending != want_pending:
            raise AssertionError(f"pending {dec.pending}, expected {want_pending}")
    else:
        if failed_at < 0:
            raise AssertionError(f"no ProtocolError for the bad length word at {bad_at}")
        # Packets completed in the same read as the bad length word are not delivered
        # (the connection is closing anyway): the ones delivered are a prefix.
        if got != want[: len(got)]:
            raise AssertionError("packets before the bad length word differ")
        for call in (lambda: dec.get_buffer(), lambda: dec.buffer_updated(0)):
            try:
                call()
            except ProtocolError:
                pass
            else:
                raise AssertionError("the decoder works on after a ProtocolError")
    if hold:
        again = [picture(m) for m in held]
        if again != got:
            raise AssertionError("a held payload changed: a pooled buffer was reused")


if __name__ == "__main__":
    atheris.instrument_func(reference)
    atheris.instrument_func(expand)
    _harness.fuzz("frames", test_one)
