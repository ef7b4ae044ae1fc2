"""The inner loop of a direct run, pure Python: twin of ``pyx/virnet/_direct_loop.pyx``.

A direct run (``virnet._direct``) takes one stream's data packets off a socket and
splices each payload socket -> pipe -> sink.  While every system call succeeds at once,
the work per packet is the same few calls; ``splice_packets`` does exactly that much,
for as many whole packets as it can, and returns at the first thing that needs a
decision (a wait, a header that is not this stream's data, a sink that did not take a
splice, the stop flag, the progress budget).  ``DirectRun`` handles each of those in
Python and calls again.  The compiled twin runs the same loop in C without the GIL:
per packet, Python's share was a seventh of the run's time, the rest being the kernel's
copy into the sink.  The parity tests (``tests/test_direct_loop.py``) hold the two to
one behaviour.

Every system call that fails is left for the caller to repeat: it sees the same
condition (EAGAIN, EOF, an error) and handles it its own way, so no errno has to travel.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Final

from .constants import MIN_PACKET, MessageStatus, MessageType

IS_COMPILED: Final = False

# Why ``splice_packets`` returned.
BUDGET: Final = 0  # ``budget`` payload bytes moved (after a whole packet)
STOPPED: Final = 1  # the stop flag is set (checked before each packet)
WAIT: Final = 2  # at a packet boundary the socket had no byte
PARTIAL: Final = 3  # a header read gave ``left`` bytes (0..27): in ``header[:left]``
FOREIGN: Final = 4  # ``header`` holds a whole header that is not this stream's data
SOCKET: Final = 5  # inside a packet the socket gave nothing: ``left`` bytes still to come
SINK: Final = 6  # the sink did not take a splice whole: ``pending`` bytes in the pipe

_PREFIX: Final = struct.Struct(">IIIiiIi")  # length word + header
_STREAM: Final = int(MessageType.STREAM)
_CONTINUE: Final = int(MessageStatus.CONTINUE)


def splice_packets(
    sock: int,
    pipe_r: int,
    pipe_w: int,
    pipe_size: int,
    sink: int,
    offset: int,
    key: tuple[int, int, int, int],
    max_payload: int,
    limit: int,
    budget: int,
    stop: bytearray,
    header: bytearray,
) -> tuple[int, int, int, int, int, int, int]:
    """Move whole data packets of stream ``key`` from ``sock`` (non-blocking) into
    ``sink`` while every call succeeds at once.

    ``offset`` is the sink position, or -1 to write at the sink's own position;
    ``limit`` the payload bytes still allowed (-1: no limit; a packet that would pass
    it is FOREIGN); ``pipe_size`` what the (empty) pipe holds.  ``stop[0]`` non-zero
    ends the call before the next packet; ``header`` (28 bytes) receives header bytes
    read and not consumed.

    Returns ``(why, moved, packets, offset, size, left, pending)``: the payload bytes
    and the packets completed in this call, the sink position after them, and for
    SOCKET and SINK the packet in progress: its payload ``size``, the ``left`` bytes of
    it still in the socket and the ``pending`` bytes of it in the pipe.  For PARTIAL,
    ``left`` is the number of header bytes in ``header``."""
    if len(stop) < 1 or len(header) != MIN_PACKET:
        raise ValueError("stop must hold a byte and header 28 bytes")
    moved = packets = 0
    while True:
        if stop[0]:
            return STOPPED, moved, packets, offset, 0, 0, 0
        try:
            got = os.read(sock, MIN_PACKET)
        except BlockingIOError:
            return WAIT, moved, packets, offset, 0, 0, 0
        except OSError:
            got = b""
        if len(got) < MIN_PACKET:
            header[: len(got)] = got
            return PARTIAL, moved, packets, offset, 0, len(got), 0
        header[:] = got
        length, prog, vers, proc, mtype, serial, status = _PREFIX.unpack(got)
        size = length - MIN_PACKET
        if (
            mtype != _STREAM
            or status != _CONTINUE
            or (prog, vers, proc, serial) != key
            or size <= 0
            or size > max_payload
            or (limit >= 0 and moved + size > limit)
        ):
            return FOREIGN, moved, packets, offset, 0, 0, 0
        left = size
        while left:
            try:
                k = os.splice(sock, pipe_w, min(left, pipe_size), flags=os.SPLICE_F_NONBLOCK)
            except OSError:
                k = 0
            if k <= 0:
                return SOCKET, moved, packets, offset, size, left, 0
            left -= k
            while k:
                try:
                    if offset < 0:
                        m = os.splice(pipe_r, sink, k)
                    else:
                        m = os.splice(pipe_r, sink, k, offset_dst=offset)
                except OSError as exc:
                    if exc.errno == errno.EINTR:  # pragma: no cover - os retries it
                        continue
                    m = 0
                if m <= 0:
                    return SINK, moved, packets, offset, size, left, k
                k -= m
                if offset >= 0:
                    offset += m
        moved += size
        packets += 1
        if moved >= budget:
            return BUDGET, moved, packets, offset, 0, 0, 0
