"""Fuzz a live virnetd over a Unix socket: each input is sent on a fresh connection.

    python fuzz/fuzz_daemon.py [-runs=N] [corpus_dir ...]
    VIRNET_NO_EXTENSIONS=1 python fuzz/fuzz_daemon.py ...   # the pure-Python twin

The daemon (``virnet.daemon.app.Daemon``: the FILES service over a data root in a
temporary directory) runs in this process, on an event loop in a thread of its own, so
atheris sees the coverage of the server code that each input reaches (the Python
modules are instrumented; the compiled wire core only with a coverage build).

Input layout: byte 0: bit 0 sends a valid HELLO first and waits for its reply (native
mode: CREDIT and flow control reachable), bit 1 connects to the read-only listener;
the rest is sent as it is, then the write side is shut down and the reply read to EOF.

Checks, each a finding when it fails:

* the daemon closes every connection within ``HANG_SECONDS`` of the client's EOF;
* nothing is logged at ERROR or above and no exception reaches the loop's handler (a
  handler's crash, a protocol callback that raised something else than the library's
  errors, a task that died);
* every ``HEALTH_EVERY`` inputs (libFuzzer exits without a last one): a STAT on
  another connection is answered, the connections are gone from the server, and the
  open descriptors and threads are not growing (``/proc/self``).  Memory is bounded
  by libFuzzer's ``-rss_limit_mb``; ``FUZZ_DAEMON_STATS=1`` prints RSS, the loop's
  task count, descriptors and threads at each health check.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import os
import shutil
import socket
import sys
import threading
import time

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness

_harness.start(__name__ == "__main__")

with atheris.instrument_imports(include=["virnet"]):
    from virnet import protocol, xdr
    from virnet._impl import FrameDecoder, encode_message
    from virnet.constants import (
        CONTROL_HELLO,
        CONTROL_PROGRAM,
        CONTROL_VERSION,
        FILES_PROGRAM,
    )
    from virnet.daemon.app import Daemon
    from virnet.daemon.config import DaemonConfig
    from virnet.services import files

HANG_SECONDS = 10.0
HEALTH_EVERY = 200
#: Slack over the descriptors and threads counted after warm-up: worker pools start
#: lazily and a few connections may still be closing.
FD_SLACK = 64
THREAD_SLACK = 16

HELLO = b"".join(
    encode_message(
        CONTROL_PROGRAM, CONTROL_VERSION, CONTROL_HELLO, 0, 1, 0,
        xdr.encode(protocol.Hello, protocol.Hello(3, 4 << 20)),
    )
)
STAT = b"".join(
    encode_message(FILES_PROGRAM, 1, 1, 0, 7, 0, xdr.encode(files.PathArgs, files.PathArgs("a")))
)


class Findings(logging.Handler):
    """Collects log records at ERROR and above, and exceptions the loop reports."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.items: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.items.append(self.format(record))

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]
                       ) -> None:
        self.items.append(f"loop exception: {context.get('message')}: "
                          f"{context.get('exception')!r}")


def populate(root: str) -> None:
    """The data root's files (re-made at every health check: inputs may delete them)."""
    os.makedirs(os.path.join(root, "d", "e"), exist_ok=True)
    for name, size in (("a", 4096), ("d/b", 100), ("d/e/c", 70000), ("empty", 0)):
        path = os.path.join(root, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            with open(path, "wb") as fh:
                fh.write(bytes(i & 0xFF for i in range(size)))


async def _count_tasks() -> int:
    return len(asyncio.all_tasks())


class Harness:
    def __init__(self) -> None:
        self.tmp = _harness.scratch_dir("vnfuzz")
        self.root = os.path.join(self.tmp, "root")
        self.sock = os.path.join(self.tmp, "rw.sock")
        self.ro_sock = os.path.join(self.tmp, "ro.sock")
        populate(self.root)
        self.findings = Findings()
        logging.getLogger().addHandler(self.findings)
        logging.getLogger().setLevel(logging.WARNING)
        # The expected warnings ("closing connection ...: protocol error") stay quiet.
        logging.getLogger("virnet").propagate = True
        logging.lastResort = None
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self.findings.loop_exception)
        config = DaemonConfig(
            listen=[f"unix://{self.sock}"], listen_readonly=[f"unix://{self.ro_sock}"],
            root=self.root, log_level="warning",
        )
        self.daemon = Daemon(config)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.daemon.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="virnetd", daemon=True)
        self.thread.start()
        if not started.wait(30):
            raise SystemExit("fuzz daemon: virnetd did not start")
        self.count = 0
        self.baseline: tuple[int, int] | None = None
        atexit.register(self.close)

    def close(self) -> None:
        try:
            self.health()
        finally:
            fut = asyncio.run_coroutine_threadsafe(self.daemon.stop(), self.loop)
            try:
                fut.result(30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(30)
                shutil.rmtree(self.tmp, ignore_errors=True)

    def connect(self, readonly: bool = False) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(HANG_SECONDS)
        s.connect(self.ro_sock if readonly else self.sock)
        return s

    def check_findings(self, data: bytes | None) -> None:
        if self.findings.items:
            items = self.findings.items[:]
            self.findings.items.clear()
            raise AssertionError("daemon logged errors:\n" + "\n".join(items))

    def exchange(self, data: bytes) -> None:
        flags = data[0]
        body = data[1:]
        with self.connect(readonly=bool(flags & 2)) as s:
            if flags & 1:
                s.sendall(HELLO)
                dec = FrameDecoder()
                got: list[object] = []
                while not got:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise AssertionError("the daemon closed the connection on HELLO")
                    got = dec.feed(chunk)
            try:
                s.sendall(body)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon already refused the stream and closed: fine
            deadline = time.monotonic() + HANG_SECONDS
            while True:
                try:
                    chunk = s.recv(1 << 16)
                except ConnectionResetError:
                    break
                except TimeoutError:
                    raise AssertionError(
                        f"the daemon kept the connection open {HANG_SECONDS} s after EOF"
                    ) from None
                if not chunk:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError("the daemon kept sending after EOF")

    def health(self) -> None:
        populate(self.root)
        with self.connect() as s:
            s.sendall(STAT)
            dec = FrameDecoder()
            msgs: list[object] = []
            while not msgs:
                chunk = s.recv(4096)
                if not chunk:
                    raise AssertionError("the daemon closed a STAT connection unanswered")
                msgs = dec.feed(chunk)
            reply = msgs[0]
            if reply.type != 1 or reply.serial != 7 or reply.status != 0:  # type: ignore[attr-defined]
                raise AssertionError(f"STAT answered with {reply!r}")
        # Every earlier connection must be gone from the server by now (or very soon).
        deadline = time.monotonic() + HANG_SECONDS
        while len(self.daemon.server.connections) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.daemon.server.connections:
            raise AssertionError(
                f"{len(self.daemon.server.connections)} connections still open on the server"
            )
        fds = len(os.listdir("/proc/self/fd"))
        threads = threading.active_count()
        if self.baseline is None:
            self.baseline = (fds, threads)
        elif fds > self.baseline[0] + FD_SLACK or threads > self.baseline[1] + THREAD_SLACK:
            raise AssertionError(
                f"descriptors {self.baseline[0]} -> {fds}, threads {self.baseline[1]} -> "
                f"{threads}: something leaks"
            )
        self.check_findings(None)
        if os.environ.get("FUZZ_DAEMON_STATS"):
            tasks = asyncio.run_coroutine_threadsafe(_count_tasks(), self.loop).result(10)
            with open("/proc/self/status") as fh:
                rss = next(ln.split()[1] for ln in fh if ln.startswith("VmRSS"))
            print(f"health #{self.count}: rss {int(rss) // 1024} MiB, tasks {tasks}, "
                  f"objects {len(gc.get_objects())}, "
                  f"fds {fds}, threads {threads}", file=sys.stderr, flush=True)

    def test_one(self, data: bytes) -> None:
        if not data:
            return
        self.exchange(data)
        self.count += 1
        self.check_findings(data)
        if self.count % HEALTH_EVERY == 0:
            self.health()


if __name__ == "__main__":
    harness = Harness()
    _harness.fuzz("daemon", harness.test_one)
