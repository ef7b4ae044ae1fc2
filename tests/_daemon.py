"""A real ``virnetd`` in a subprocess for tests that watch the daemon from outside (its
memory, its log), ready once its socket accepts connections."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class Virnetd:
    def __init__(
        self, directory: str, root: str, *args: str, loop: str = "uvloop"
    ) -> None:
        self.sock = os.path.join(directory, "d.sock")
        self.uri = f"unix://{self.sock}"
        env = dict(os.environ, VIRNET_LOOP=loop)
        for var in ("VIRNET_ROOT", "VIRNET_SOCKET", "VIRNET_DEFAULT_URI", "LISTEN_PID"):
            env.pop(var, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virnet.daemon", "--listen", self.uri, "--root", root,
             *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"virnetd did not start:\n{self.stderr}")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.sock)
            except OSError:
                return False
        return True

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def rss(self) -> int:
        """Resident set size in bytes, from /proc."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def stop(self) -> int:
        return stop_process(self.proc, self._reader)


def stop_process(
    proc: subprocess.Popen[str], reader: threading.Thread | None = None
) -> int:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT`` s; join the thread reading its stderr
    and close the pipe; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if reader is not None:
        reader.join(5)
    if proc.stderr is not None:
        proc.stderr.close()
    return proc.returncode
