"""Listening sockets, and accepting on them without the loop's ``create_server``.

The server accepts on its listening sockets itself, so that running out of file
descriptors behaves the same on every loop (asyncio logged a traceback per attempt, up
to 256 a second; uvloop refused silently and, without its spare descriptor, closed the
listener): the waiting connections are refused with a spare descriptor, the refusals
logged at most every ``REFUSED_LOG_INTERVAL`` seconds with their count, and accepting
pauses for ``ACCEPT_PAUSE`` seconds, so the loop never spins on a listener it cannot
serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from ._uri import Address

log = logging.getLogger("virnet.server")  # what it logs is the server's to say

#: Connections accepted per wake-up of a listener before other work gets a turn.
ACCEPT_BATCH = 64
#: Seconds a listener stops accepting after an accept failed for lack of resources.
ACCEPT_PAUSE = 0.25
#: Connections refused for lack of descriptors are logged at most once per this many
#: seconds (with how many were refused since the last line).
REFUSED_LOG_INTERVAL = 10.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Refusals:
    """Connections refused for lack of descriptors: the spare descriptor that makes
    refusing them possible, and the rate-limited log of how many were refused."""

    def __init__(self) -> None:
        self.spare: int | None = None
        self.count = 0
        self.stuck = False
        self.reason = ""
        self.where = ""
        self.logged_at: float | None = None
        self.report: asyncio.TimerHandle | None = None

    def ensure_spare(self) -> None:
        """Hold one descriptor to give up when accept() runs out (any will do)."""
        if self.spare is None:
            with contextlib.suppress(OSError):
                self.spare = os.open("/", os.O_PATH | os.O_CLOEXEC)

    def refuse_waiting(self, listener: Listener, exc: OSError) -> None:
        """accept() failed with ``exc``: with the spare descriptor's slot, accept and
        close the connections waiting on ``listener`` (they would otherwise wait in the
        backlog, or time out), then count and maybe log it."""
        refused = 0
        if self.spare is None:
            self.stuck = True  # nothing to refuse them with: they wait in the backlog
        else:
            os.close(self.spare)
            self.spare = None
            for _ in range(ACCEPT_BATCH * 16):
                try:
                    conn, _ = listener.sock.accept()
                except OSError:  # none waiting any more, or the slot was taken again
                    break
                conn.close()
                refused += 1
            self.ensure_spare()
            if not refused:
                # accept() fails before it looks for a connection: none was waiting.
                return
        self.count += refused
        self.reason = exc.strerror or str(exc)
        self.where = str(listener.address)
        now = listener.loop.time()
        if self.logged_at is None or now - self.logged_at >= REFUSED_LOG_INTERVAL:
            self._log(now)
        elif self.report is None:
            self.report = listener.loop.call_at(
                self.logged_at + REFUSED_LOG_INTERVAL, self._log_later, listener.loop
            )

    def _log_later(self, loop: asyncio.AbstractEventLoop) -> None:
        self.report = None
        if self.count or self.stuck:
            self._log(loop.time())

    def _log(self, now: float) -> None:
        stuck = "; no descriptor to spare: others wait" if self.stuck else ""
        if self.logged_at is None:
            log.warning(
                "cannot accept connections on %s: %s; refused %d waiting connection(s)%s "
                "(reported at most every %g s)",
                self.where, self.reason, self.count, stuck, REFUSED_LOG_INTERVAL,
            )
        else:
            log.warning(
                "cannot accept connections on %s: %s; refused %d connection(s) in the "
                "last %.0f s%s",
                self.where, self.reason, self.count, now - self.logged_at, stuck,
            )
        self.count = 0
        self.stuck = False
        self.logged_at = now
        if self.report is not None:
            self.report.cancel()
            self.report = None

    def close(self) -> None:
        if self.report is not None:
            self.report.cancel()
            self.report = None
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None


class Listener:
    """One listening socket, accepted on by the server itself."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        address: Address,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        refusals: Refusals,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.address = address
        self.protocol_factory = protocol_factory
        self.refusals = refusals
        self._fd = sock.fileno()
        self._resume: asyncio.TimerHandle | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        self.loop.add_reader(self._fd, self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self.refusals.refuse_waiting(self, exc)
                else:
                    log.warning("accepting a connection on %s failed: %s", self.address, exc)
                self._pause()
                return
            self._connect(conn)

    def _pause(self) -> None:
        """Stop watching the socket for a while: a listener it cannot accept on stays
        readable, and the loop would spin on it."""
        if self._closed or self._resume is not None:
            return
        self.loop.remove_reader(self._fd)
        self._resume = self.loop.call_later(ACCEPT_PAUSE, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if not self._closed:
            self.refusals.ensure_spare()
            self.start()

    def _connect(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = self.loop.create_task(self._start_connection(conn))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_connection(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception as exc:  # the socket failed before the connection started
            log.debug("connection on %s failed to start: %s", self.address, exc)
            conn.close()

    def close(self) -> None:
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        else:
            self.loop.remove_reader(self._fd)
        self.sock.close()


def unix_listener(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(256)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def tcp_listeners(
    loop: asyncio.AbstractEventLoop, host: str, port: int
) -> list[socket.socket]:
    """A listening socket per address of ``host`` (as ``loop.create_server`` binds)."""
    infos = await loop.getaddrinfo(
        host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {sockaddr!r}: "
                    f"{exc.strerror}"
                ) from None
            sock.listen(256)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise OSError(f"no address to listen on for {host!r}")
    return socks


def remove_stale_socket(path: str) -> None:
    """Remove a leftover socket file (a previous daemon that died); refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
    except OSError as exc:
        # A busy server (full backlog: a timeout or EAGAIN) is still a server: only a
        # refusal proves the file is stale, and removing a live daemon's socket is worse
        # than refusing to start.
        raise OSError(
            errno.EADDRINUSE, f"{path} may be in use (probing it failed: {exc})"
        ) from None
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by a running server")
    finally:
        probe.close()
