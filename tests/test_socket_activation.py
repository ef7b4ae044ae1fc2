"""Socket activation (``LISTEN_FDS``): virnetd serves listening sockets that a service
manager bound and handed over, read-only ones included, and leaves their files alone."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import virnet
from _rpcutil import remove_tree, short_tmpdir
from virnet.daemon.activation import inherited_sockets
from virnet.errors import RPCError
from virnet.services import files as f


def _listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    return s


def test_nothing_inherited_without_the_variables() -> None:
    assert inherited_sockets({}) == []
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert inherited_sockets(env, pid=2) == []  # meant for another process
    assert env == {}  # read once, then removed


def _start(tmp: str, socks: list[tuple[socket.socket, str]]) -> subprocess.Popen[str]:
    """virnetd with ``socks`` at descriptors 3, 4, ... and the variables set for it."""
    names = ":".join(name for _, name in socks)
    fds = [s.fileno() for s, _ in socks]

    return subprocess.Popen(
        _as_activated(fds, [sys.executable, "-m", "virnet.daemon", "--root",
                            os.path.join(tmp, "root")]),
        env=_env(tmp, LISTEN_FDS=str(len(socks)), LISTEN_FDNAMES=names),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, pass_fds=fds,
    )


# What a service manager does before it executes the daemon: the sockets moved to
# descriptors 3, 4, ... and LISTEN_PID set to the daemon's own pid (exec keeps it).
_TRAMPOLINE = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way first
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def _as_activated(fds: list[int], argv: list[str]) -> list[str]:
    return [sys.executable, "-c", _TRAMPOLINE, ",".join(map(str, fds)), *argv]


def _env(tmp: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop("LISTEN_PID", None)
    # Should activation not work, the daemon's default socket stays inside the test.
    env["VIRNET_SOCKET"] = os.path.join(tmp, "default.sock")
    return env


async def _wait_connect(uri: str) -> virnet.Client:
    for _ in range(200):
        try:
            return await virnet.connect(uri)
        except (OSError, virnet.ConnectionClosedError):
            await asyncio.sleep(0.05)
    return await virnet.connect(uri)


async def test_inherited_sockets_are_served_and_left_in_place() -> None:
    tmp = short_tmpdir()
    rw_path, ro_path = os.path.join(tmp, "rw.sock"), os.path.join(tmp, "ro.sock")
    rw, ro = _listener(rw_path), _listener(ro_path)
    proc = _start(tmp, [(rw, "virnetd"), (ro, "readonly")])
    rw.close()
    ro.close()  # the daemon holds its own copies now
    try:
        async with await _wait_connect(f"unix://{rw_path}") as c:
            await c.call(f.MKDIR, f.PathArgs("d"))
            st = await c.call(f.STAT, f.PathArgs("d"))
            assert st.kind == f.Kind.DIRECTORY
        async with await _wait_connect(f"unix://{ro_path}") as c:
            assert (await c.call(f.STAT, f.PathArgs("d"))).kind == f.Kind.DIRECTORY
            with pytest.raises(RPCError):
                await c.call(f.MKDIR, f.PathArgs("e"))  # read-only listener
        # no default socket was made beside them
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["ro.sock", "root", "rw.sock"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"listening on unix://{rw_path}" in err and f"listening on unix://{ro_path}" in err
    # the manager's socket files survive the daemon (it bound them, it removes them)
    assert os.path.exists(rw_path) and os.path.exists(ro_path)
    remove_tree(tmp)


async def test_a_pipe_in_place_of_a_socket_is_a_clear_startup_error() -> None:
    tmp = short_tmpdir()
    r, w = os.pipe()
    try:
        proc = subprocess.run(
            _as_activated([r], [sys.executable, "-m", "virnet.daemon", "--root",
                                os.path.join(tmp, "root")]),
            env=_env(tmp, LISTEN_FDS="1"), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, pass_fds=[r], timeout=30,
        )
    finally:
        os.close(r)
        os.close(w)
        remove_tree(tmp)
    assert proc.returncode == 1
    assert "descriptor 3 is not a socket" in proc.stderr or "not a listening" in proc.stderr
    assert "Traceback" not in proc.stderr
