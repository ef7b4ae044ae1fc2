"""The asyncio glue: a ``BufferedProtocol`` around the sans-IO ``ConnectionCore``.

The transport receives straight into the core's buffers (``get_buffer`` /
``buffer_updated`` are the core's own).  Outgoing packets are queued by the core and
written once per loop iteration with ``writelines`` (header and payload stay separate
buffers); a lone call is written at once, a run of calls or replies every
``OUTPUT_BATCH`` buffers, and replies made while a read is handled when it is done.
``pause_writing`` stops pulling stream data; calls and replies still go out, they are
small.  Keepalive ticks come from ``loop.call_later``.

Bulk versus interactive: a call or reply can only overtake stream data that is still in
our own queue; whatever already sits in the transport's buffer or the socket goes first.
Bulk throughput wants plenty there (the socket never runs dry between flushes), latency
wants almost nothing.  So a connection runs *lean* for ``LEAN_HOLD`` seconds after each
call it sends (client) or starts serving (server) and each event it sends: no stream data
is added while the transport still holds any, small packets one at a time, and a Unix
socket's kernel send buffer shrunk to ``LEAN_SOCKET_BUFFER``.  Without calls it runs
with the bulk limits.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
from typing import cast

from ._core import Buffer, ConnectionCore, KeepaliveAction
from ._direct import DirectReader
from ._fileio import FileSpan
from .constants import STREAM_CHUNK
from .errors import ConnectionClosedError, ProtocolError
from .limits import DEFAULT_LIMITS, Limits

log = logging.getLogger("virnet")

#: Stream payload bytes taken per flush before yielding to the loop, so replies and
#: incoming packets are handled between bursts of bulk data.
FLUSH_BUDGET = 2 * 262144
#: Transport write-buffer high-water mark: large enough that the socket never idles
#: between flushes, small enough to bound memory per connection.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
#: Seconds a connection stays lean after a call or event (``note_interactive``): calls tend to
#: come in runs (a client's next call follows its last reply), so keep the path clear
#: across the gaps of a run, but no longer: a 4 GiB download beside a call every 0.25 s
#: ran at 3.5 GB/s with a 0.2 s hold (lean 80 % of the time) and at full speed (4.5) with
#: 0.05 s.
LEAN_HOLD = 0.05
#: While lean: stream payload per flush and per packet, and the transport limits
#: (nothing buffered).  Smaller packets leave less in the transport when the socket
#: takes only part of one; 32 KiB packets also fit the receiver's scratch buffer, several
#: per read (16 KiB ones cost more per byte than they save, in ``bench/latency.py``).
LEAN_FLUSH_BUDGET = 32 * 1024
LEAN_PACKET_LIMIT = 32 * 1024
LEAN_HIGH_WATER = 0
LEAN_LOW_WATER = 0
#: While lean, the kernel send buffer of a Unix socket (as ``SO_SNDBUF`` reads back; Linux
#: counts its own bookkeeping in it).  Everything in it is read by the peer before a
#: reply written now: the default (208 KiB) held up to 200 KiB ahead of a reply, which at
#: a saturating stream's rate was most of a call's time.  96 KiB still keeps the peer fed
#: (the writer is woken once the peer has drained it to a quarter full).  TCP keeps its
#: buffers: setting ``SO_SNDBUF`` there would end the kernel's autotuning for the
#: connection's lifetime.
LEAN_SOCKET_BUFFER = 96 * 1024
#: Outside lean mode, the kernel send buffer of a Unix socket (as read back).  The
#: default (208 KiB) is smaller than one stream packet, so the sender stalls until the
#: receiver has taken most of a packet and the two take turns instead of overlapping:
#: a daemon-to-daemon migration over a Unix socket ran at 0.53-0.64 GB/s with it and at
#: 0.82-0.86 with 4 MiB.  Lean mode still shrinks it while calls are served, so what it
#: holds ahead of a reply is bounded by the time the first lean flush happens.
BULK_SOCKET_BUFFER = 4 * 1024 * 1024
#: Calls (client) or replies (server) made in one go are written once this many buffers
#: (about 16 small packets) are queued, not only when the whole run is done: the peer
#: starts on the first ones while we make the rest, so the two processes overlap instead
#: of taking turns.  64 calls in flight went from 0.34x to 0.67x of the minimal echo in
#: ``bench/latency.py`` with it (8 to 32 packets did about as well; 4 worse).
OUTPUT_BATCH = 32
#: Linux doubles the ``SO_SNDBUF`` asked for (and reports the doubled size).
_SNDBUF_SCALE = 2 if sys.platform.startswith("linux") else 1


_YIELD = "yield to a woken task"  # a hold_reading reason
_STREAMS_FULL = "streams over their receive limit"  # a hold_reading reason


class RPCProtocol(ConnectionCore, asyncio.BufferedProtocol):
    """Shared glue for both roles; ``ClientProtocol``/``ServerProtocol`` add the rest."""

    def __init__(
        self,
        *,
        is_client: bool,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        ConnectionCore.__init__(self, is_client=is_client, limits=limits)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._flush_handle: asyncio.Handle | None = None
        #: Replies were queued while a read was handled (``send_reply_after_read``):
        #: write them when it is done.
        self._flush_after_read = False
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._draining_files = False  # see ``_drain_for_files``
        #: Whole packets (headers, file spans) a flush took but did not write because the
        #: socket filled: written by the first flush after the drain (``_write_with_files``).
        self._files_backlog: list[Buffer] = []
        self._lean_until = 0.0  # loop time until which the connection stays lean; 0: bulk
        self._lean_renewed = False  # note_interactive since the last flush: renew the hold
        self._unix_sock: socket.socket | None = None  # its send buffer shrinks while lean
        self._bulk_sndbuf = 0  # SO_SNDBUF (as read back) to restore after lean mode
        self._reading_paused = False
        self._read_pausers: set[object] = set()  # why reading is paused (bounded memory)
        self._read_size = 0  # size of the buffer last handed to the transport
        #: A plain socket's descriptor (no TLS), -1 elsewhere: stream data may be sent
        #: from files with ``sendfile`` on it, and a worker thread may read stream data
        #: from it straight into a file while the transport's reading is paused
        #: (``virnet._direct``).
        self.socket_fd = -1
        self.direct = DirectReader(self)
        #: A call, reply or event arrived in this read: let its task run before more
        #: bulk data is read (see ``buffer_updated``).
        self.yield_read = False
        self._yielding = False
        self.close_exc: BaseException | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()

    # ------------------------------------------------------------------ transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if (
            sock is not None
            and sock.family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
            and transport.get_extra_info("sslcontext") is None
            and transport.get_extra_info("ssl_object") is None
        ):
            # Bytes written to this descriptor go straight onto the wire, in order
            # with the transport's own writes once its buffer is empty.
            self.socket_fd = sock.fileno()
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - platform dependent
                pass
        elif sock is not None and sock.family == socket.AF_UNIX:
            self._unix_sock = sock
            self._grow_sndbuf(sock)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            ConnectionCore.buffer_updated(self, nbytes)
        except ProtocolError as exc:
            self.abort_connection(exc)
            return
        self._flush_owed_replies()
        if self.direct.requested is not None:
            self.direct.between_reads()
        if self.yield_read:
            self.yield_read = False
            if nbytes == self._read_size:
                self._yield_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            buf = self.decoder.get_buffer(sizehint)
        except ProtocolError:
            # Already failed and closing; give the transport somewhere harmless to write.
            return memoryview(bytearray(65536))
        self._read_size = len(buf)
        return buf

    def _yield_reading(self) -> None:
        """The read filled its buffer, so the transport would read again at once, and
        with a bulk stream behind it could go on for dozens of packets before the task
        just woken by a call, reply or event runs.  Pause reading until the next loop
        iteration, after that task."""
        if self._yielding or self.transport is None:
            return
        self._yielding = True
        self.hold_reading(_YIELD, True)
        self.loop.call_soon(self._end_yield)

    def _end_yield(self) -> None:
        self._yielding = False
        self.hold_reading(_YIELD, False)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_exc is None:
            if exc is None:
                self.close_exc = ConnectionClosedError("connection closed by peer")
            else:
                err = ConnectionClosedError(f"connection lost: {exc}")
                err.__cause__ = exc
                self.close_exc = err
        self.transport = None
        self.socket_fd = -1
        self._unix_sock = None  # its descriptor may be reused from now on
        self.direct.connection_lost()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        try:
            for stream in list(self.streams.values()):
                stream.connection_lost(self.close_exc)
            self.on_closed(self.close_exc)
        finally:
            if not self.closed.done():
                self.closed.set_result(None)

    def on_closed(self, exc: BaseException) -> None:
        """The connection is gone; fail whatever waits on it (roles override)."""

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._draining_files:
            self._draining_files = False
            transport = self.transport
            if transport is not None and not self._lean_until:
                transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if self._files_backlog or self.has_output():
            self.on_output()

    def hold_reading(self, reason: object, hold: bool) -> None:
        """Pause reading while any ``reason`` holds (a full call queue, a legacy stream
        over its receive limit); resume when none does."""
        if hold:
            self._read_pausers.add(reason)
        else:
            self._read_pausers.discard(reason)
        want = bool(self._read_pausers)
        if want != self._reading_paused and self.transport is not None:
            self._reading_paused = want
            if want:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def on_rx_pause(self, paused: bool) -> None:
        """The core says: stop reading (a legacy stream's reader fell behind), or go on."""
        self.hold_reading(_STREAMS_FULL, paused)

    def on_written(self) -> None:
        """Packets were just handed to the transport (roles override to bound what a
        peer leaves unread)."""

    # ------------------------------------------------------------------ closing
    def abort_connection(self, exc: BaseException) -> None:
        """Close at once because of ``exc`` (a protocol violation, keepalive timeout)."""
        if self.close_exc is None:
            if isinstance(exc, ProtocolError):
                log.warning("closing connection from %s: %s", self.peer, exc)
                err = ConnectionClosedError(f"protocol error: {exc}")
                err.__cause__ = exc
                self.close_exc = err
            else:
                self.close_exc = exc
        if self.transport is not None:
            self.transport.abort()

    def close_gracefully(self) -> None:
        """Flush what is queued, then close."""
        if self.close_exc is None:
            self.close_exc = ConnectionClosedError("connection closed")
        if self.transport is not None:
            self._flush()
            if self.transport is not None:
                self.transport.close()

    # ------------------------------------------------------------------ output
    def on_output(self) -> None:
        if self._flush_handle is None and self.transport is not None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def defer_flush(self) -> None:
        """Move a scheduled flush behind the callbacks scheduled so far (a task just
        woken to handle a call): its reply then joins that flush instead of waiting
        behind another round of stream data."""
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self._flush_handle = self.loop.call_soon(self._flush)

    def flush_now(self) -> None:
        """Write what is queued at once instead of at the next loop iteration (a lone
        call: nothing to batch it with, so waiting would only add latency)."""
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self._flush()
        elif self.has_output():  # queued with ``notify=False``: no flush was scheduled
            self._flush()

    def send_call_now(self, prog: int, vers: int, proc: int, payload: Buffer) -> int:
        """``send_call``, written at once (a lone call: nothing to batch it with).  No
        flush is scheduled for it: one scheduled only to be cancelled would still cost
        the loop an extra turn (an extra ``epoll_wait``) per call."""
        transport = self.transport
        if (
            transport is not None
            and self._flush_handle is None
            and not self._write_paused
            and not self._files_backlog
            and not self.has_output()
        ):
            # Nothing queued before it: hand the packet straight to the transport (what
            # a flush would do, without the queue and the rest of its bookkeeping).
            if self._lean_until:
                self._still_lean(transport)
            out: list[Buffer] = []
            serial = self.calls.add_call(out, prog, vers, proc, payload)
            transport.writelines(out)
            return serial
        serial = self.send_call(prog, vers, proc, payload, notify=False)
        self.flush_now()
        return serial

    def feed(self, data: Buffer) -> None:
        ConnectionCore.feed(self, data)
        self._flush_owed_replies()

    def send_reply_after_read(
        self, prog: int, vers: int, proc: int, serial: int, status: int, payload: Buffer
    ) -> None:
        """``send_reply`` for a call answered while its read is handled: written with the
        other replies of that read once it is done (one write per read, like the
        simplest echo server), or at once when a batch is full; no flush is scheduled."""
        self._flush_after_read = True
        queued = self.send_reply(prog, vers, proc, serial, status, payload, notify=False)
        if queued >= OUTPUT_BATCH:
            self.flush_now()

    def _flush_owed_replies(self) -> None:
        """A read (or ``feed``) is done: write the replies ``send_reply_after_read``
        queued during it."""
        if self._flush_after_read:
            self._flush_after_read = False
            self.flush_now()

    def flush_if_batched(self) -> None:
        """Write what is queued now if a batch's worth of calls or replies is waiting
        (``OUTPUT_BATCH``)."""
        # ``len(self._urgent)`` is ``urgent_backlog()``, without a call: once per call.
        if len(self._urgent) >= OUTPUT_BATCH:
            self.flush_now()

    def note_interactive(self) -> None:
        """A call was sent or is being served, or an event sent: run lean for the next
        ``LEAN_HOLD`` seconds.  Once lean, the hold is renewed by the next flush (one
        clock read per flush, not per call)."""
        if self._lean_until:
            self._lean_renewed = True
            return
        transport = self.transport
        if transport is None:
            return
        # May pause writing at once: stream data already buffered is enough.
        transport.set_write_buffer_limits(high=LEAN_HIGH_WATER, low=LEAN_LOW_WATER)
        self._set_sndbuf(lean=True)
        self._lean_until = self.loop.time() + LEAN_HOLD

    def end_lean(self) -> None:
        """Bulk data starts and no call waits for an answer (a stream was just opened
        after a lone call, such as a ``STAT`` before an upload): leave lean mode now
        rather than send the stream's first ``LEAN_HOLD`` seconds in small packets."""
        if not self._lean_until:
            return
        self._lean_until = 0.0
        self._lean_renewed = False
        transport = self.transport
        if transport is None:
            return
        if not self._draining_files:
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self._set_sndbuf(lean=False)

    def _grow_sndbuf(self, sock: socket.socket) -> None:
        """Give a Unix socket the bulk send buffer (``BULK_SOCKET_BUFFER``), or as much
        of it as the system allows (``net.core.wmem_max`` caps it; we keep to the
        administrator's cap)."""
        try:
            current = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            if current < BULK_SOCKET_BUFFER:
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, BULK_SOCKET_BUFFER // _SNDBUF_SCALE
                )
        except OSError:  # only an optimisation
            pass

    def _set_sndbuf(self, *, lean: bool) -> None:
        """Shrink a Unix socket's kernel send buffer for lean mode, or restore it.  Data
        already in the socket stays; no more is accepted until it drains below the new
        size."""
        sock = self._unix_sock
        if sock is None:
            return
        try:
            if lean:
                if not self._bulk_sndbuf:
                    self._bulk_sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                size = min(LEAN_SOCKET_BUFFER, self._bulk_sndbuf)
            elif self._bulk_sndbuf:
                size = self._bulk_sndbuf
            else:  # never shrunk: nothing to restore
                return
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size // _SNDBUF_SCALE)
        except OSError:  # the socket is closing; lean mode is only an optimisation
            self._unix_sock = None

    def _flush(self) -> None:
        self._flush_handle = None
        transport = self.transport
        if transport is None:
            return
        if not self._write_paused and not self._files_backlog:
            # The common case, calls and replies and no stream data ready: straight to
            # the transport, without the budget and the streams' round.
            urgent = self.take_urgent_alone()
            if urgent is not None:
                if urgent:
                    if self._lean_until:
                        self._still_lean(transport)
                    transport.writelines(urgent)
                    if self.transport is not None:
                        self.on_written()
                return
        budget = FLUSH_BUDGET
        packet_limit = STREAM_CHUNK
        if self._lean_until and self._still_lean(transport):
            budget = LEAN_FLUSH_BUDGET
            packet_limit = LEAN_PACKET_LIMIT
        out: list[Buffer] = self.take_output(0 if self._write_paused else budget, packet_limit)
        if self._files_backlog and not self._write_paused:
            # Packets taken by an earlier flush, held back while the socket drained:
            # they go first, and again with ``sendfile`` where the socket takes them.
            out = self._files_backlog + out
            self._files_backlog = []
        if out:
            for item in out:
                if isinstance(item, FileSpan):
                    self._write_with_files(transport, out)
                    break
            else:
                transport.writelines(out)
            if self.transport is None:
                return
            self.on_written()
        if (self._files_backlog or self.has_output()) and not self._write_paused:
            # Stream data still waiting and room left: continue next iteration so that
            # other tasks (and incoming calls) get their turn in between.
            self._flush_handle = self.loop.call_soon(self._flush)

    def _still_lean(self, transport: asyncio.Transport) -> bool:
        """Lean mode is on: renew its hold if ``note_interactive`` asked to, or end it
        once the hold has passed (back to the bulk limits)."""
        now = self.loop.time()
        if self._lean_renewed:
            self._lean_renewed = False
            self._lean_until = now + LEAN_HOLD
        if now < self._lean_until:
            return True
        self._lean_until = 0.0
        if not self._draining_files:
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self._set_sndbuf(lean=False)
        return False

    def _write_with_files(self, transport: asyncio.Transport, out: list[Buffer]) -> None:
        """Write ``out``, in which some payloads are ``FileSpan``: each one goes out
        with ``sendfile`` when everything before it is already in the socket (the
        transport's buffer is empty) and the socket takes it whole.  Where the socket
        fills, the rest of that one packet is read into memory and left to the
        transport (its header is already written: the payload must follow it), and the
        packets after it wait in ``_files_backlog`` until the transport has drained,
        to go out with ``sendfile`` too (reading them all, as before, put 12 % of a
        2 GiB upload through ``pread`` and a second copy)."""
        fd = self.socket_fd
        # Once the transport is closing, its descriptor may be closed (and reused) at
        # any time: only the transport writes then.
        direct = fd >= 0 and not transport.is_closing()
        try:
            while out:
                out = self._write_files_once(transport, out, direct)
                if out and transport.get_write_buffer_size():
                    self._files_backlog = out
                    break
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.abort_connection(ConnectionClosedError(f"connection lost: {exc}"))
            else:
                # The packet's header, already written, announced bytes the file no
                # longer has (it shrank), or the file cannot be read: the connection
                # cannot go on, its framing would be lost.
                self.abort_connection(ProtocolError(f"stream data could not be sent: {exc}"))
            return
        if transport.get_write_buffer_size():
            self._drain_for_files(transport)

    def _write_files_once(
        self, transport: asyncio.Transport, out: list[Buffer], direct: bool
    ) -> list[Buffer]:
        """One pass of ``_write_with_files``: what of ``out`` is left for after the
        drain (nothing if the socket took it all)."""
        fd = self.socket_fd
        pending: list[Buffer] = []
        rest: list[Buffer] = []
        for i, item in enumerate(out):
            if not isinstance(item, FileSpan):
                pending.append(item)
                continue
            if direct:
                if pending:
                    transport.writelines(pending)
                    pending = []
                if transport.get_write_buffer_size() == 0:
                    left = self._send_span(fd, item)
                    if left is None:
                        continue
                    item = left  # the socket is full inside this packet
                rest = out[i + 1 :]
                pending.append(item.read())
                break
            pending.append(item.read())
        if pending:
            transport.writelines(pending)
        return rest

    def _drain_for_files(self, transport: asyncio.Transport) -> None:
        """The socket is full and the transport holds the rest of a flush: take no
        more stream data until the transport has written *all* of it, so the next
        packets go out with ``sendfile`` again.  With the usual limits it would
        resume at the low-water mark, its buffer never empty, and every later file
        span would be read into memory (the pause-drain-send pattern of asyncio's
        own ``sendfile`` fallback)."""
        self._draining_files = True
        transport.set_write_buffer_limits(high=0, low=0)  # pauses writing at once

    @staticmethod
    def _send_span(fd: int, span: FileSpan) -> FileSpan | None:
        """Send as much of ``span`` as the socket takes now; None if all of it, else
        the part left."""
        src = span.source.fd
        offset = span.offset
        left = span.length
        while left:
            try:
                n = os.sendfile(fd, src, offset, left)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if n == 0:
                raise OSError(errno.EIO, f"file shrank while sending (at offset {offset})")
            offset += n
            left -= n
        if not left:
            return None
        return FileSpan(span.source, offset, left)

    # ------------------------------------------------------------------ keepalive
    def start_keepalive(self) -> None:
        """Begin the keepalive timer (after negotiation says the peer supports it)."""
        ka = self.keepalive
        if ka.enabled or ka.interval <= 0 or self.transport is None:
            return
        ka.enabled = True
        ka.seen = True
        self._keepalive_handle = self.loop.call_later(ka.interval, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive_handle = None
        if self.transport is None:
            return
        action = self.keepalive.tick()
        if action is KeepaliveAction.TIMEOUT:
            log.warning("closing connection from %s: keepalive timeout", self.peer)
            self.abort_connection(
                ConnectionClosedError("connection closed due to keepalive timeout")
            )
            return
        if action is KeepaliveAction.PING:
            self.ping()
        self._keepalive_handle = self.loop.call_later(
            self.keepalive.interval, self._keepalive_tick
        )
