"""Stream data received straight from the socket into a file descriptor.

A file transfer's stream is mostly one long run of STREAM+CONTINUE packets of one
stream.  Through the ordinary path every payload is read by the transport into a buffer
of ours and then written from there to the file: two copies through this process, on
the event loop's thread.  For such a run a worker thread takes over reading the socket
instead (the transport's reading is paused meanwhile): it reads each packet's header
itself and moves the payload into the file with ``splice(2)`` through a pipe, so the
kernel hands the socket's pages on and copies them once, into the file, and no byte
passes through Python.  Where ``splice`` does not apply (a sink without splice support,
a system without it) the thread copies through one buffer of its own, still off the
loop.

The run ends at the first header that is not one of its data packets (EOF, a hole, a
packet of another stream, a call, a reply, a keepalive, anything): the thread reads
exactly one header (28 bytes, the smallest packet there is) past the last payload it
took, never more, and hands those bytes back to be decoded as usual, so the framing
never changes hands mid-packet.  It also ends when asked to stop (it finishes the
packet it is in first) or, at once, when the connection is gone.

``DirectRun`` is the worker (blocking system calls only; no loop); ``DirectReader`` is
the loop side of one connection: it starts a run when the decoder is between packets,
applies the thread's progress (stream accounting, CREDIT, keepalive) on the loop, and
feeds the header that ended the run back to the decoder.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ._impl import direct_loop as _loop
from .constants import MIN_PACKET, MessageStatus, MessageType
from .errors import ConnectionClosedError, ProtocolError

if TYPE_CHECKING:
    from ._core import Buffer
    from ._protocol import RPCProtocol
    from ._streams import StreamCore

#: Runs at once in one process (each holds a thread, a pipe and two descriptors while
#: it lasts); past this, transfers take the ordinary path.
MAX_RUNS: Final = 8
_slots = threading.BoundedSemaphore(MAX_RUNS)
THREAD_NAME: Final = "virnet-direct-run"

_PREFIX: Final = struct.Struct(">IIIiiIi")  # length word + header
_STREAM: Final = int(MessageType.STREAM)
_CONTINUE: Final = int(MessageStatus.CONTINUE)
#: The pipe between socket and sink (``F_SETPIPE_SZ``; the default of 64 KiB would
#: take four splices per packet).
PIPE_SIZE: Final = 1024 * 1024
_COPY_BUFFER: Final = 256 * 1024
#: Bounds of the progress a run gathers before the loop is woken to apply it.
_MIN_POST: Final = 64 * 1024
_MAX_POST: Final = 1024 * 1024
_HAS_SPLICE: Final = hasattr(os, "splice")
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _Abandoned(Exception):
    """The connection is gone: stop at once, wherever the run is."""


class _Stopped(Exception):
    """Asked to stop, and between packets: the run ends here."""


class _Lost(Exception):
    """The socket closed or failed inside a packet: the framing is lost."""


class DirectRun:
    """One run of one stream's data packets, from the socket into ``sink_fd``.

    ``offset`` is where the first byte goes in the sink (positional writes), or None
    to write at the sink's own position (pipes, devices, stdout).  ``prefix`` holds
    payload already received the ordinary way, written first.  ``limit`` bounds the
    payload bytes taken from the socket (a packet that would pass it ends the run).
    The socket and the sink are duplicated: closing the caller's descriptors while
    the run finishes its last packet does no harm.  ``post()`` is called (from the
    thread) to have the loop apply the progress: once ``post_every`` bytes gathered
    since the last call, and before the thread waits for the socket (the peer may be
    waiting for the credit those bytes return).  Not per packet: each call wakes the
    loop, and the two threads then trade the GIL for every packet."""

    def __init__(
        self,
        sock_fd: int,
        key: tuple[int, int, int, int],
        sink_fd: int,
        offset: int | None,
        *,
        prefix: list[Buffer],
        limit: int | None,
        max_payload: int,
        post: Callable[[], None],
        post_every: int = 1024 * 1024,
    ) -> None:
        self.key = key
        self.offset = offset
        self.prefix = prefix
        self.limit = limit
        self.max_payload = max_payload
        self.received = 0  # payload bytes taken from the socket
        self.packets = 0
        self.leftover = b""  # the bytes of the header that ended the run
        self.error: OSError | None = None  # writing to the sink failed
        self.lost: BaseException | None = None  # the connection failed inside a packet
        self.posted = False  # a progress callback is scheduled on the loop
        self._post = post
        self._post_every = post_every
        self._posted_at = 0  # ``received`` when ``post`` was last called
        self._stopping = False
        self._stop_flag = bytearray(1)  # the same, for the core's loop (no GIL there)
        self._header = bytearray(MIN_PACKET)
        self._abandon = False
        self._sock = os.dup(sock_fd)
        self._sink = os.dup(sink_fd)
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._pipe: tuple[int, int] | None = None
        self._splice_out = _HAS_SPLICE  # cleared if the sink refuses splice
        self._spliced = False  # a splice into the sink worked (EINVAL then is an error)
        self._buf: bytearray | None = None
        self._pollers: dict[tuple[int, int], select.poll] = {}

    # ------------------------------------------------------------------ control
    def stop(self, *, abandon: bool = False) -> None:
        """Ask the run to end: after the packet it is in, or (``abandon``) at once."""
        self._stopping = True
        self._stop_flag[0] = 1
        if abandon:
            self._abandon = True
        with self._lock:  # never write to the number after the thread closed it
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        try:
            for chunk in self.prefix:
                self._write_copy(memoryview(chunk).cast("B"))
                if self.error is not None:
                    return
            self.prefix = []
            self._packets()
        except _Abandoned:
            pass
        except _Lost as exc:
            self.lost = exc.__cause__ or exc
        finally:
            self._close()

    def _close(self) -> None:
        with self._lock:
            fds = [self._sock, self._sink, self._wake_r, self._wake_w]
            self._wake_w = -1
        if self._pipe is not None:
            fds.extend(self._pipe)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _packets(self) -> None:
        while not self._stopping:
            started = b""  # header bytes the fast loop read and left to us
            if _HAS_SPLICE and self._splice_out and self.error is None:
                why, started = self._whole_packets()
                if self.error is not None:
                    return  # the packet that failed was taken whole: the run ends
                if why is None:
                    continue
                if why == _loop.FOREIGN:
                    self.leftover = started
                    return
            header = self._read_header(started)
            if not self._ours(header):
                self.leftover = header
                return
            n = int.from_bytes(header[:4], "big") - MIN_PACKET
            self._move(n)
            self._packet_done(n)
            if self.error is not None:
                return

    def _ours(self, header: bytes) -> bool:
        """``header`` is a whole header of this stream's data, within the limits."""
        if len(header) < MIN_PACKET:
            return False
        length, prog, vers, proc, mtype, serial, status = _PREFIX.unpack(header)
        n = length - MIN_PACKET
        return not (
            mtype != _STREAM
            or status != _CONTINUE
            or (prog, vers, proc, serial) != self.key
            or n <= 0
            or n > self.max_payload
            or (self.limit is not None and self.received + n > self.limit)
        )

    def _packet_done(self, n: int) -> None:
        self.received += n
        self.packets += 1
        if self.received - self._posted_at >= self._post_every:
            self._post_progress()

    def _whole_packets(self) -> tuple[int | None, bytes]:
        """Whole packets through the core's loop (``_impl.direct_loop``), as far as it
        goes; then what it stopped at, handled here: ``(None, b"")`` to go round again,
        or ``(why, header bytes)`` for the caller (PARTIAL, FOREIGN)."""
        r, w = self._the_pipe()
        why, moved, packets, offset, size, left, pending = _loop.splice_packets(
            self._sock, r, w, PIPE_SIZE, self._sink,
            -1 if self.offset is None else self.offset,
            self.key,
            self.max_payload,
            -1 if self.limit is None else self.limit - self.received,
            max(1, self._post_every - (self.received - self._posted_at)),
            self._stop_flag,
            self._header,
        )
        if self.offset is not None:
            self.offset = offset
        if moved or size - left - pending:
            self._spliced = True  # the sink takes splices: EINVAL later is an error
        self.received += moved
        self.packets += packets
        if why == _loop.BUDGET:
            self._post_progress()
        elif why == _loop.WAIT:
            try:
                self._wait(self._sock, select.POLLIN, mid_packet=False)
            except _Stopped:
                pass  # the loop condition ends the run
        elif why == _loop.PARTIAL:
            return why, bytes(self._header[:left])
        elif why == _loop.FOREIGN:
            return why, bytes(self._header)
        elif why in (_loop.SOCKET, _loop.SINK):  # finish the packet it was in
            if pending:
                self._drain_pipe(r, pending)
            self._move(left)
            self._packet_done(size)
        return None, b""

    def _post_progress(self) -> None:
        """Have the loop apply what was received (unless a call is pending: the loop
        clears ``posted`` before it reads ``received``, so it sees these bytes too)."""
        if not self.posted and self.received != self._posted_at:
            self.posted = True
            self._posted_at = self.received
            self._post()

    def _wait(self, fd: int, events: int, *, mid_packet: bool) -> None:
        """Wait until ``fd`` is ready; between packets a stop request ends the wait
        (``_Stopped``), inside one only an abandon does."""
        if fd == self._sock:
            self._post_progress()  # about to block: let the loop return the credit
        poller = self._pollers.get((fd, events))
        if poller is None:
            poller = self._pollers[fd, events] = select.poll()
            poller.register(fd, events)
            poller.register(self._wake_r, select.POLLIN)
        while True:
            if self._abandon:
                raise _Abandoned
            if self._stopping and not mid_packet:
                raise _Stopped
            woken = False
            for got, _ in poller.poll():
                if got == fd:
                    return
                woken = True
            if woken:  # the flags changed: look again (and empty the wake pipe)
                os.read(self._wake_r, 64)

    def _read_header(self, started: bytes = b"") -> bytes:
        """The next 28 bytes (after ``started``, already read); fewer if the run stops
        first or the socket ends."""
        got = bytearray(started)
        while len(got) < MIN_PACKET:
            try:  # read first: while the peer keeps up, the header is already there
                data = os.read(self._sock, MIN_PACKET - len(got))
            except BlockingIOError:
                try:
                    self._wait(self._sock, select.POLLIN, mid_packet=False)
                except _Stopped:
                    break
                continue
            except OSError:
                break  # the transport sees the same error when it reads again
            if not data:
                break
            got += data
        return bytes(got)

    def _move(self, n: int) -> None:
        """The packet's ``n`` payload bytes, from the socket into the sink."""
        if _HAS_SPLICE and self._splice_out and self.error is None:
            self._move_spliced(n)
        else:
            self._move_copied(n)

    def _from_socket(self, read: Callable[[int], int], most: int) -> int:
        """One read of at most ``most`` payload bytes, ``read(most)``, waiting while
        the socket has none: the byte count.  Inside a packet a closed or failed
        socket loses the framing (``_Lost``).  (EINTR is retried by ``os`` itself.)"""
        while True:
            try:
                k = read(most)
            except BlockingIOError:
                self._wait(self._sock, select.POLLIN, mid_packet=True)
                continue
            except OSError as exc:
                raise _Lost from exc
            if k == 0:
                raise _Lost from ConnectionClosedError("connection closed inside a packet")
            return k

    def _the_pipe(self) -> tuple[int, int]:
        pipe = self._pipe
        if pipe is None:
            pipe = self._pipe = os.pipe()
            try:
                fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:  # over the system's pipe-max-size: the default will do
                pass
        return pipe

    def _move_spliced(self, n: int) -> None:
        r, w = self._the_pipe()
        sock = self._sock

        def into_pipe(most: int) -> int:
            return os.splice(sock, w, most, flags=os.SPLICE_F_NONBLOCK)

        left = n
        while left:
            k = self._from_socket(into_pipe, min(left, PIPE_SIZE))
            left -= k
            self._drain_pipe(r, k)

    def _drain_pipe(self, r: int, k: int) -> None:
        """Move ``k`` bytes from our pipe into the sink (or, after a write error or
        where the sink refuses splice, through a buffer)."""
        while k:
            if self.error is not None or not self._splice_out:
                self._copy_from_pipe(r, k)
                return
            try:
                if self.offset is None:
                    m = os.splice(r, self._sink, k)
                else:
                    m = os.splice(r, self._sink, k, offset_dst=self.offset)
            except BlockingIOError:  # a non-blocking sink (a pipe) is full
                self._sink_wait()
                continue
            except OSError as exc:
                if exc.errno == errno.EINVAL and not self._spliced:
                    self._splice_out = False  # this sink cannot splice: copy instead
                    continue
                self.error = exc
                continue
            if m == 0:
                self.error = OSError(errno.EIO, "the target took no more data")
                continue
            k -= m
            self._spliced = True
            if self.offset is not None:
                self.offset += m

    def _copy_from_pipe(self, r: int, k: int) -> None:
        while k:
            data = os.read(r, min(k, _COPY_BUFFER))
            k -= len(data)
            if self.error is None:
                self._write_copy(memoryview(data))

    def _sink_wait(self) -> None:
        self._wait(self._sink, select.POLLOUT, mid_packet=True)

    def _move_copied(self, n: int) -> None:
        buf = self._buf
        if buf is None:
            buf = self._buf = bytearray(_COPY_BUFFER)
        view = memoryview(buf)
        sock = self._sock

        def into_buffer(most: int) -> int:
            return os.readv(sock, [view[:most]])

        left = n
        while left:
            k = self._from_socket(into_buffer, min(left, len(view)))
            left -= k
            if self.error is None:
                self._write_copy(view[:k])

    def _write_copy(self, data: memoryview) -> None:
        """Write ``data`` to the sink; the first failure is kept in ``error`` and
        later data is dropped (the run still takes whole packets off the socket)."""
        while data:
            try:
                if self.offset is None:
                    m = os.write(self._sink, data)
                else:
                    m = os.pwrite(self._sink, data, self.offset)
            except BlockingIOError:
                self._sink_wait()
                continue
            except OSError as exc:
                self.error = exc
                return
            data = data[m:]
            if self.offset is not None:
                self.offset += m


class DirectReader:
    """The loop side of direct runs for one connection (at most one at a time: a
    socket has one reader)."""

    def __init__(self, proto: RPCProtocol) -> None:
        self.proto = proto
        self.loop = proto.loop
        #: A run asked for, to start once the decoder is between packets.
        self.requested: _Request | None = None
        self._run: DirectRun | None = None
        self._current: _Request | None = None  # the request the run serves
        self._applied = 0  # of the run's ``received``, already applied on the loop
        self._applied_packets = 0
        #: Runs started, and payload bytes they took off the socket (statistics).
        self.runs = 0
        self.bytes = 0

    @property
    def busy(self) -> bool:
        return self.requested is not None or self._run is not None

    def request(
        self,
        core: StreamCore,
        fd: int,
        offset: int | None,
        limit: int | None,
        progress: Callable[[int], object] | None,
    ) -> asyncio.Future[int] | None:
        """Receive ``core``'s next run of data into ``fd``; None if that cannot be
        done now (the caller takes the next item the ordinary way)."""
        proto = self.proto
        if (
            self.busy
            or proto.socket_fd < 0
            or proto.transport is None
            or not core.can_take_direct()
        ):
            return None
        fut: asyncio.Future[int] = self.loop.create_future()
        req = _Request(core, fd, offset, limit, progress, fut)
        self.requested = req
        fut.add_done_callback(self._request_done)
        self.between_reads()  # starts at once if the decoder is between packets
        return fut

    def between_reads(self) -> None:
        """The decoder has handled a read (or nothing is being read): start the run
        asked for if no packet is half received."""
        req = self.requested
        if req is None or self.proto.decoder.pending:
            return
        self.requested = None
        if req.fut.done():
            return
        if self.proto.transport is None:
            req.fut.set_result(0)
            return
        core = req.core
        queued = core.queued_data()
        if not core.can_take_direct() or queued < 0:
            req.fut.set_result(0)  # a hole, EOF or an end is next: the ordinary way
            return
        if req.limit is not None and queued > req.limit:
            req.fut.set_result(0)
            return
        if not _slots.acquire(blocking=False):
            req.fut.set_result(0)
            return
        try:
            self._start(req, queued)
        except BaseException:
            _slots.release()
            raise

    def _start(self, req: _Request, queued: int) -> None:
        proto = self.proto
        core = req.core
        prefix = core.take_queued_data()
        offset = req.offset
        limit = None if req.limit is None else req.limit - queued
        run = DirectRun(
            proto.socket_fd,
            core.key,
            req.fd,
            offset,
            prefix=prefix,
            limit=limit,
            max_payload=proto.limits.max_message - (MIN_PACKET - 4),
            post=lambda: self._post(run),
            # Half a CREDIT step: the loop returns credit about as often as reading
            # through memory would, with one wake-up per MiB rather than per packet.
            post_every=max(_MIN_POST, min(_MAX_POST, core.grant_step // 2)),
        )
        self._run = run
        self.runs += 1
        self._applied = 0
        self._applied_packets = 0
        req.prefix_bytes = queued
        self._current = req
        proto.hold_reading(_DIRECT, True)
        core.grant_direct_bonus()
        thread = threading.Thread(
            target=self._in_thread, args=(run,), name=THREAD_NAME, daemon=True
        )
        thread.start()

    def _in_thread(self, run: DirectRun) -> None:
        try:
            run.run()
        finally:
            _slots.release()
            try:
                self.loop.call_soon_threadsafe(self._finished, run)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _post(self, run: DirectRun) -> None:
        try:
            self.loop.call_soon_threadsafe(self._progress, run)
        except RuntimeError:
            run.stop(abandon=True)

    def _progress(self, run: DirectRun) -> None:
        run.posted = False  # before reading ``received``: later packets post again
        if run is not self._run:
            return
        received = run.received
        packets = run.packets
        delta = received - self._applied
        if not delta:
            return
        self._applied = received
        self.bytes += delta
        proto = self.proto
        proto.keepalive.seen = True
        proto.bytes_received += delta + (packets - self._applied_packets) * MIN_PACKET
        self._applied_packets = packets
        req = self._current
        assert req is not None
        req.core.received_directly(delta)
        if req.progress is not None:
            req.progress(req.prefix_bytes + received)

    def _finished(self, run: DirectRun) -> None:
        if run is not self._run:
            return
        self._progress(run)
        self._run = None
        req = self._current
        self._current = None
        assert req is not None
        proto = self.proto
        if not req.fut.done():
            if run.error is not None:
                req.fut.set_exception(run.error)
            else:
                req.fut.set_result(req.prefix_bytes + run.received)
        if run.lost is not None:
            lost = run.lost
            if not isinstance(lost, ConnectionClosedError):
                lost = ConnectionClosedError(f"connection lost: {run.lost}")
                lost.__cause__ = run.lost
            proto.abort_connection(lost)
            return
        if proto.transport is None:
            return
        if run.leftover:
            try:
                proto.feed(run.leftover)
            except ProtocolError as exc:
                proto.abort_connection(exc)
                return
        proto.hold_reading(_DIRECT, False)

    def _request_done(self, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled():
            return
        # The consumer gave up (cancelled): forget a request, end a run after its packet.
        req = self.requested
        if req is not None and req.fut is fut:
            self.requested = None
        run = self._run
        if run is not None and self._current is not None and self._current.fut is fut:
            run.stop()

    def stream_changed(self, core: StreamCore) -> None:
        """``core`` reported a change (it failed, ended, or its reader is to stop): a
        run for it that may no longer go on ends after its packet."""
        if core.can_take_direct():
            return
        req = self.requested
        if req is not None and req.core is core:
            self.requested = None
            if not req.fut.done():
                req.fut.set_result(0)
        current = self._current
        if self._run is not None and current is not None and current.core is core:
            self._run.stop()

    def connection_lost(self) -> None:
        req, self.requested = self.requested, None
        if req is not None and not req.fut.done():
            req.fut.set_result(0)
        if self._run is not None:
            self._run.stop(abandon=True)


_DIRECT = "stream data read by a direct run"  # a hold_reading reason


class _Request:
    __slots__ = ("core", "fd", "fut", "limit", "offset", "prefix_bytes", "progress")

    def __init__(
        self,
        core: StreamCore,
        fd: int,
        offset: int | None,
        limit: int | None,
        progress: Callable[[int], object] | None,
        fut: asyncio.Future[int],
    ) -> None:
        self.core = core
        self.fd = fd
        self.offset = offset
        self.limit = limit
        self.progress = progress
        self.fut = fut
        self.prefix_bytes = 0
