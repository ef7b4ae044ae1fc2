"""virnetd at its open-file limit: a real daemon in a subprocess with a low
RLIMIT_NOFILE, on uvloop and on stock asyncio.  Connections it has no descriptor for
are refused (closed at once, not left waiting), the refusals are logged at most once
per interval with their count, the daemon does not spin while it is out of
descriptors, and it accepts again as soon as some are free."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import virnet
from _daemon import stop_process
from _rpcutil import remove_tree, short_tmpdir
from virnet import _listen as listen_module
from virnet.services import files as f

#: The daemon's descriptor limit: room for its own and a few dozen connections.
NOFILE = 48
#: The daemon's log interval for refusals, shortened so the test sees several reports.
LOG_INTERVAL = 1.0

DAEMON = f"""
import sys
from virnet import _listen
_listen.REFUSED_LOG_INTERVAL = {LOG_INTERVAL}
from virnet.daemon.__main__ import main
sys.exit(main(sys.argv[1:]))
"""

REFUSED_LINE = re.compile(r"cannot accept connections on \S+: .*; refused (\d+) ")


class Daemon:
    def __init__(self, tmp: str, loop: str) -> None:
        self.sock = os.path.join(tmp, "d.sock")
        self.uri = f"unix://{self.sock}"
        env = dict(os.environ, VIRNET_LOOP=loop)
        env.pop("VIRNET_ROOT", None)

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

        self.proc = subprocess.Popen(
            [sys.executable, "-c", DAEMON, "--listen", self.uri, "--root",
             os.path.join(tmp, "root")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=limit,
        )
        self.log: list[tuple[float, str]] = []  # each stderr line and when it came
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while not any("listening on" in line for _, line in self.log):
            assert self.proc.poll() is None, self.stderr
            assert time.monotonic() < deadline, self.stderr
            time.sleep(0.02)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append((time.monotonic(), line))

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.log)

    def refused_reports(self) -> list[int]:
        return [int(m.group(1)) for _, line in self.log if (m := REFUSED_LINE.search(line))]

    def report_times(self) -> list[float]:
        return [t for t, line in self.log if REFUSED_LINE.search(line)]

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        return stop_process(self.proc, self._reader)


@pytest.fixture(params=["uvloop", "asyncio"])
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    tmp = short_tmpdir()
    d = Daemon(tmp, request.param)
    try:
        yield d
    finally:
        d.stop()
        remove_tree(tmp)


def count_refused(socks: list[socket.socket], timeout: float) -> int:
    """How many of ``socks`` (clients that never sent anything) the daemon closed
    within ``timeout`` seconds."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    closed = 0
    deadline = time.monotonic() + timeout
    while by_fd and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            try:
                closed += by_fd.pop(fd).recv(1) == b""
            except ConnectionResetError:
                closed += 1
    return closed


def test_out_of_descriptors_refuses_logs_and_does_not_spin(daemon: Daemon) -> None:
    async def fill() -> list[virnet.Client]:
        """Connect real clients until the daemon refuses one."""
        clients: list[virnet.Client] = []
        for _ in range(NOFILE):
            try:
                clients.append(await virnet.connect(daemon.uri, timeout=10))
            except (virnet.ConnectionClosedError, OSError):
                return clients
        raise AssertionError(f"{len(clients)} clients and none refused")

    async def serves() -> bool:
        try:
            async with await virnet.connect(daemon.uri, timeout=10) as c:
                return (await c.call(f.STAT, f.PathArgs(""))).kind == f.Kind.DIRECTORY
        except (virnet.ConnectionClosedError, OSError):
            return False

    loop = asyncio.new_event_loop()
    clients = loop.run_until_complete(fill())
    try:
        assert len(clients) > 5
        # Out of descriptors now: every new connection is refused, promptly, while the
        # daemon's CPU time stays low (nothing spins on the listener).
        cpu = daemon.cpu_seconds()
        started = time.monotonic()
        attempts: list[socket.socket] = []
        try:
            while time.monotonic() - started < 2.0:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                attempts.append(s)
                s.connect(daemon.sock)
                time.sleep(0.01)
            cpu = daemon.cpu_seconds() - cpu
            refusals = count_refused(attempts, 3.0)
        finally:
            for s in attempts:
                s.close()
        assert len(attempts) > 100 and refusals == len(attempts), (len(attempts), refusals)
        assert cpu < 0.3, f"the daemon used {cpu:.2f} s of CPU in 2 s"
        # Logged: once at first, then at most once per interval, with the counts.
        deadline = time.monotonic() + LOG_INTERVAL + 5
        while sum(daemon.refused_reports()) < refusals + 1:  # +1: fill()'s last client
            assert time.monotonic() < deadline, (refusals, daemon.stderr)
            time.sleep(0.05)
        reports = daemon.refused_reports()
        print(f"{len(clients)} clients, {refusals} refused, cpu {cpu:.3f} s, reports {reports}")
        assert sum(reports) == refusals + 1, (reports, refusals)
        assert 2 <= len(reports) <= 2.0 / LOG_INTERVAL + 2, reports
        times = daemon.report_times()
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) > LOG_INTERVAL * 0.8, gaps
        assert "Traceback" not in daemon.stderr, daemon.stderr
        # With a few descriptors free again, new clients are served.
        for c in clients[:3]:
            loop.run_until_complete(c.close())
        time.sleep(0.5)
        assert loop.run_until_complete(serves()), daemon.stderr
    finally:
        for c in clients:
            loop.run_until_complete(c.close())
        loop.close()
    assert daemon.stop() == 0, daemon.stderr
    assert "Traceback" not in daemon.stderr, daemon.stderr


class FailingAccept:
    """A listening socket whose accept() fails with EMFILE while ``failing`` is set."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failing = True
        self.calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


async def test_without_a_spare_descriptor_accepting_pauses(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If not even the spare descriptor is there to refuse with, the waiting
    connections stay in the backlog: logged, and the listener is left alone for
    ACCEPT_PAUSE at a time (it stays readable: watching it would spin the loop)."""
    monkeypatch.setattr(listen_module.Refusals, "ensure_spare", lambda self: None)
    tmp = short_tmpdir()
    server = virnet.Server()
    try:
        uri = str(await server.listen(f"unix://{tmp}/s.sock"))
        (listener,) = server._listeners
        failing = FailingAccept(listener.sock)
        listener.sock = failing  # type: ignore[assignment]
        with caplog.at_level(logging.WARNING, "virnet.server"):
            connecting = asyncio.ensure_future(virnet.connect(uri, timeout=10))
            await asyncio.sleep(1.0)
            assert not connecting.done()  # waiting in the backlog, not refused
            # one accept() per pause, not a spin
            assert 2 <= failing.calls <= 1.0 / listen_module.ACCEPT_PAUSE + 2, failing.calls
            failing.failing = False
            client = await connecting  # accepted at the next try
            await client.close()
        lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "refused 0" in lines[0] and "no descriptor to spare" in lines[0], lines
    finally:
        await server.close()
        remove_tree(tmp)
